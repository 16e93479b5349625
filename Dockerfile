# syntax=docker/dockerfile:1
# Fleetward images (SPEC §9): multi-stage, pinned bases, non-root.
#   docker build --target operator -t ghcr.io/fleetward/fleetward:0.1.0 .          # operator + agent runtime + CLI
#   docker build --target gateway -t ghcr.io/fleetward/fleetward-gateway:0.1.0 .  # the Rust WebSocket gateway
# (the names are the Helm chart's defaults: values `operator.image`, `runtime.image`, `gateway.image`)
#
# Note: this machine has no container engine, so this file is not built by the tests;
# the local cluster runs the same `fleetward` entry points as host processes instead.

FROM python:3.11.7-slim-bookworm AS build
# The guardrail engine's compiled core (agent-runtime/guardrail-core) is a Rust wheel.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev curl ca-certificates \
    && curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.95.0
ENV PATH=/root/.cargo/bin:$PATH
WORKDIR /src
COPY pyproject.toml setup.py requirements.lock README.md ./
COPY src ./src
COPY operator ./operator
COPY agent-runtime ./agent-runtime
RUN pip install --no-cache-dir --prefix=/install -c requirements.lock . ./agent-runtime/guardrail-core

FROM python:3.11.7-slim-bookworm AS operator
COPY --from=build /install /usr/local
RUN useradd --uid 65532 --no-create-home --shell /usr/sbin/nologin fleetward
USER 65532:65532
ENTRYPOINT ["fleetward"]
CMD ["--help"]

# The gateway: librdkafka is compiled from the rdkafka crate's bundled sources (cmake) against
# Debian's OpenSSL, as hack/build-gateway.sh does on a host; the final image needs only the
# shared libraries that links (libssl3, zlib) and CA certificates (JWKS URL over HTTPS).
FROM rust:1.95.0-slim-bookworm AS gateway-build
RUN apt-get update && apt-get install -y --no-install-recommends \
        cmake make gcc g++ pkg-config libssl-dev zlib1g-dev libcurl4-openssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY gateway-rs ./gateway-rs
RUN cd gateway-rs && cargo build --release --locked && cp target/release/fleetward-gateway /fleetward-gateway

FROM debian:12.8-slim AS gateway
RUN apt-get update && apt-get install -y --no-install-recommends libssl3 zlib1g ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 65532 --no-create-home --shell /usr/sbin/nologin fleetward
COPY --from=gateway-build /fleetward-gateway /usr/local/bin/fleetward-gateway
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["fleetward-gateway"]
