# pytunnel: a TLS tunnel that reads stunnel.conf, as a small non-root container.
#
#   docker build -t pytunnel .
#   docker build -t pytunnel --build-arg BASE=python:3.12-slim .   # another base (no TLS-PSK below 3.13)
#
# BASE must be a Debian-like image with python3 (>= 3.11) and its venv module; both
# stages use it, so the virtual environment's python links to the same interpreter.
# Usage and configuration: docs/docker.md.
ARG BASE=python:3.13-slim

# ---------------------------------------------------------------- build: a venv in /opt/pytunnel
FROM ${BASE} AS build
# a package index other than PyPI (a mirror, a proxy): docker build --build-arg PIP_INDEX_URL=...
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tunnel ./tunnel
# binary wheels only for the dependencies (uvloop, pydantic-core, cryptography): no compiler
# anywhere; pip and setuptools leave the venv afterwards (nothing installs at run time)
RUN python3 -m venv /opt/pytunnel \
 && /opt/pytunnel/bin/python -m pip install --only-binary=:all: . \
 && /opt/pytunnel/bin/python -m pip uninstall -y -q pip setuptools wheel \
 && /opt/pytunnel/bin/pytunnel version

# ---------------------------------------------------------------- runtime
FROM ${BASE}
ARG VERSION=0.1.0
ARG SOURCE=https://github.com/pytunnel/pytunnel
LABEL org.opencontainers.image.title="pytunnel" \
      org.opencontainers.image.description="TLS tunnel that reads stunnel.conf: a drop-in stunnel replacement and TLS sidecar" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="${VERSION}"

COPY --from=build /opt/pytunnel /opt/pytunnel

# PYTUNNEL_STATUS: /livez, /readyz and /metrics on loopback inside the container (what the
# HEALTHCHECK asks); set it to 0.0.0.0:9102 to scrape /metrics from outside.
ENV PATH=/opt/pytunnel/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTUNNEL_STATUS=127.0.0.1:9102

# no passwd entry is needed for a numeric user; files mounted in must be readable by it
USER 65532:65532

# nothing is EXPOSEd: the ports are whatever the configuration says (accept = ...)
HEALTHCHECK --interval=5s --timeout=3s --start-period=2s --retries=3 CMD ["pytunnel", "healthcheck"]

# exec form: pytunnel is PID 1 and receives `docker stop`'s SIGTERM itself (then drains)
ENTRYPOINT ["pytunnel"]
# `run` with no file: one service from STUNNEL_* variables (STUNNEL_SERVICE, STUNNEL_ACCEPT,
# STUNNEL_CONNECT, ...).  A mounted file: `docker run IMAGE /etc/pytunnel/stunnel.conf`
# (stunnel's defaults) or `docker run IMAGE run /etc/pytunnel/stunnel.conf` (secure defaults).
CMD ["run"]
