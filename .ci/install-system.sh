#!/usr/bin/env bash
# System tools the tests use, from Debian's packages only, without starting any service.
# Idempotent; needs root on a machine that lacks them.
set -euo pipefail
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
if have nginx && have haproxy && have promtool; then
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "install-system: run as root to install nginx and haproxy" >&2; exit 1; }
# Debian's maintainer scripts start services through invoke-rc.d, which honours
# policy-rc.d: exit 101 means "do not start". Add one only for this install.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"
  trap 'rm -f "$policy"' EXIT
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# nginx/haproxy: the load-balancer tests; prometheus: promtool checks the alert rules.
apt-get install -y -qq --no-install-recommends nginx haproxy prometheus >/dev/null
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  systemctl disable --now nginx haproxy prometheus >/dev/null 2>&1 || true
fi
