# streamproxy: a streaming-safe reverse proxy for LLM APIs.
#
#   docker build -t streamproxy:0.1.0 .
#   docker run --rm --read-only --tmpfs /tmp -p 8080:8080 -p 9090:9090 streamproxy:0.1.0 \
#       --upstream https://api.openai.com
#
# Two stages: `build` turns this checkout into a wheel and installs it, with its
# dependencies from PyPI, into a venv at /opt/streamproxy; the runtime stage is the slim
# Python base plus that venv and tini. Nothing is downloaded but from the package
# registries (PyPI, Debian). Runs as uid 10001 and needs no writable path but /tmp
# (TMPDIR; Prometheus multiprocess files with --workers > 1), so a read-only root
# filesystem with a tmpfs or emptyDir at /tmp works.
ARG PYTHON_IMAGE=python:3.11-slim-trixie

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY streamproxy ./streamproxy
# The wheel first, then the venv from that wheel (not from the source tree).
RUN pip wheel --no-deps --wheel-dir /dist . \
    && python -m venv /opt/streamproxy \
    && /opt/streamproxy/bin/pip install /dist/streamproxy-*.whl \
    && /opt/streamproxy/bin/streamproxy --version

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="streamproxy" \
      org.opencontainers.image.description="A streaming-safe reverse proxy for LLM APIs" \
      org.opencontainers.image.licenses="MIT"
# tini as PID 1: forwards SIGTERM to the server (which drains) and reaps children.
RUN apt-get update \
    && apt-get install -y --no-install-recommends 'tini=0.19.*' \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 streamproxy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin streamproxy
COPY --from=build /opt/streamproxy /opt/streamproxy
# The documented default config; the Helm chart mounts its ConfigMap over /etc/streamproxy.
COPY config.yaml /etc/streamproxy/config.yaml
ENV PATH=/opt/streamproxy/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TMPDIR=/tmp \
    STREAMPROXY_CONFIG=/etc/streamproxy/config.yaml
WORKDIR /opt/streamproxy
# Numeric, so Kubernetes can check runAsNonRoot.
USER 10001:10001
# Proxy (listen.port) and admin (admin.port: /metrics, /healthz, /readyz).
EXPOSE 8080 9090
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('STREAMPROXY_ADMIN__PORT', '9090'), timeout=2)"]
STOPSIGNAL SIGTERM
# Arguments go to `streamproxy serve` (--upstream, --port, --workers, ...). For the other
# commands: docker run --entrypoint streamproxy IMAGE check-config /etc/streamproxy/config.yaml
ENTRYPOINT ["/usr/bin/tini", "--", "streamproxy", "serve"]
# The base image's CMD (python3) would become an argument of `serve`.
CMD []
