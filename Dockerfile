# The Reflow Gateway image: one static `reflow` binary for every role (control-plane, data-plane,
# operator, up), on an empty base, as a non-root user. No shell, no package manager, nothing
# else to patch.
#
#   docker build -t reflow .                          the image (target `reflow`)
#   docker build --target reflow-stdio -t reflow:stdio .   the same binary on Debian with node and
#                                                      python, for data planes that run STDIO targets
#
# Offline builds (no registry to pull the builder from) pass a prepared binary stage:
#   docker build --build-arg BINARY_FROM=<image holding /out from scripts/build-static> .

ARG RUST_VERSION=1.89
ARG BINARY_FROM=builder

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS builder
RUN apt-get update \
    && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
RUN scripts/build-static /out

FROM ${BINARY_FROM} AS binary

# For data planes with STDIO targets (npx, uvx, python): the same binary beside node and python.
FROM docker.io/library/debian:bookworm-slim AS reflow-stdio
RUN apt-get update \
    && apt-get install -y --no-install-recommends nodejs npm python3 python3-venv pipx ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 65532 reflow \
    && useradd --uid 65532 --gid 65532 --home-dir /var/lib/reflow --create-home --shell /usr/sbin/nologin reflow
COPY --from=binary /out/reflow /usr/local/bin/reflow
WORKDIR /var/lib/reflow
USER 65532:65532
ENV REFLOW_HOST=0.0.0.0
EXPOSE 3000
ENTRYPOINT ["/usr/local/bin/reflow"]
CMD ["data-plane"]

FROM scratch AS reflow
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="Reflow Gateway" \
      org.opencontainers.image.description="MCP gateway: default-deny policies, credential injection, audit" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/reflow-gateway/reflow" \
      org.opencontainers.image.licenses="MIT"
COPY --from=binary /out/etc/ /etc/
COPY --from=binary /out/reflow /usr/local/bin/reflow
# The one writable place a bare `reflow up` needs (Kubernetes mounts its own volumes).
COPY --from=binary --chown=65532:65532 /out/home/ /var/lib/reflow/
WORKDIR /var/lib/reflow
USER 65532:65532
ENV REFLOW_HOST=0.0.0.0
EXPOSE 3000 50051
ENTRYPOINT ["/usr/local/bin/reflow"]
CMD ["up", "--data-dir", "/var/lib/reflow/data"]
