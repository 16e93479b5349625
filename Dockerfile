# syntax=docker/dockerfile:1
# Fleetward images (SPEC §9): multi-stage, pinned bases, non-root.
#   docker build --target operator -t fleetward/operator .   # operator + agent runtime
# The gateway image stage is added with gateway-rs/ (SPEC §5).
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
