# syntax=docker/dockerfile:1
ARG BASE=python:3.12-slim

FROM ${BASE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tunnel ./tunnel
RUN python3 -m venv /opt/pytunnel && /opt/pytunnel/bin/pip install --no-cache-dir .

FROM ${BASE}
LABEL org.opencontainers.image.title="pytunnel" \
      org.opencontainers.image.description="TLS tunnel that reads stunnel.conf" \
      org.opencontainers.image.licenses="MIT"
COPY --from=build /opt/pytunnel /opt/pytunnel
ENV PATH=/opt/pytunnel/bin:$PATH
USER 65532:65532
ENTRYPOINT ["pytunnel"]
CMD ["/etc/pytunnel/stunnel.conf"]
