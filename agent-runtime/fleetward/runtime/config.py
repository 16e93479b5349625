"""Loading the rendered runtime config (SPEC §3) and the credentials it names, with
errors that name the field or file and say what is wrong."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from fleetward.api.runtimeconfig import RuntimeConfig


class ConfigError(Exception):
    """The config or a file it names is unusable; the message says which and why."""


def load_config(path: Path) -> RuntimeConfig:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read the runtime config {path}: {e.strerror}") from e
    try:
        config = RuntimeConfig.model_validate_json(text)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors()[:10]]
        raise ConfigError(f"invalid runtime config {path}:\n" + "\n".join(lines)) from e
    if config.config_hash and config.config_hash != config.content_hash():
        raise ConfigError(
            f"runtime config {path}: configHash {config.config_hash} does not match its content "
            f"({config.content_hash()}); it was edited by hand or truncated"
        )
    return config


@dataclass(frozen=True)
class SigningKey:
    key_id: str
    private_key: Ed25519PrivateKey


def load_signing_key(config: RuntimeConfig) -> SigningKey:
    path = Path(config.credentials.signing_key_file)
    try:
        pem = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"credentials.signingKeyFile {path}: {e.strerror}") from e
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except ValueError as e:
        raise ConfigError(f"credentials.signingKeyFile {path}: not a PEM private key") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"credentials.signingKeyFile {path}: expected an Ed25519 key")
    return SigningKey(config.credentials.key_id, key)


MIN_PII_HASH_KEY_BYTES = 16


def read_pii_hash_key(path: Path) -> bytes:
    """A PII hash key file (trailing newline ignored), as the runtime and `fleetward guardrail
    scan --hash-key-file` read it; ValueError says what is wrong (the caller names the setting)."""
    try:
        key = path.read_bytes().rstrip(b"\r\n")
    except OSError as e:
        raise ValueError(f"cannot read: {e.strerror or e}") from e
    if len(key) < MIN_PII_HASH_KEY_BYTES:
        raise ValueError(f"the key has {len(key)} bytes; give one of at least {MIN_PII_HASH_KEY_BYTES}")
    return key


def load_pii_hash_key(config: RuntimeConfig) -> bytes | None:
    """The HMAC key of the `hash` strategy (credentials.piiHashKeyFile); None without one."""
    if config.credentials.pii_hash_key_file is None:
        return None
    path = Path(config.credentials.pii_hash_key_file)
    try:
        return read_pii_hash_key(path)
    except ValueError as e:
        raise ConfigError(f"credentials.piiHashKeyFile {path}: {e}") from e


def kafka_client_config(config: RuntimeConfig) -> dict[str, str]:
    """librdkafka settings for this agent's principal."""
    k = config.kafka
    out = {"bootstrap.servers": k.bootstrap_servers, "security.protocol": k.security_protocol}
    if k.sasl_mechanism:
        if not (k.username and k.password_file):
            raise ConfigError("kafka.saslMechanism is set but kafka.username or kafka.passwordFile is missing")
        try:
            password = Path(k.password_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"kafka.passwordFile {k.password_file}: {e.strerror}") from e
        out.update({"sasl.mechanism": k.sasl_mechanism, "sasl.username": k.username, "sasl.password": password})
    return out


# --- Process settings the rendered config does not carry ---------------------------------
# These come from the pod's environment: the operator sets FLEETWARD_DATABASE_DSN from its
# `runtime.databaseSecret`; the others have defaults that suit one pod and can be tuned per
# Deployment. Model prices and the SOP similarity threshold are in the config
# (`modelPrices`, `spec.sopRetrieval`), not here.

SHUTDOWN_SECONDS_ENV = "FLEETWARD_SHUTDOWN_SECONDS"


@dataclass(frozen=True)
class ModelPrice:
    """USD per million tokens."""

    input_per_million: float
    output_per_million: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_million + completion_tokens * self.output_per_million) / 1e6


def model_prices(config: RuntimeConfig) -> dict[str, ModelPrice]:
    """The config's price table (validated non-negative by the API model), by model name."""
    return {
        name: ModelPrice(p.input_per_million_tokens, p.output_per_million_tokens)
        for name, p in config.model_prices.items()
    }


@dataclass(frozen=True)
class ProcessSettings:
    database_dsn: str | None
    """PostgreSQL DSN (from the env variable `persistence.dsnEnv` names); None: SQLite."""
    sqlite_path: str
    instance: str
    """This pod (POD_NAME), or the host name outside Kubernetes: acks and logs name it."""
    shutdown_seconds: float
    """How long SIGTERM waits for in-flight runs to reach a step boundary."""


def _float_env(env: dict[str, str], name: str, default: float, low: float, high: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a number from {low} to {high}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={raw!r}: expected a number from {low} to {high}")
    return value


def process_settings(config: RuntimeConfig, env: dict[str, str] | None = None) -> ProcessSettings:
    import os
    import socket

    env = dict(os.environ) if env is None else env
    dsn = None
    if config.persistence.dsn_env:
        dsn = env.get(config.persistence.dsn_env) or None
        if dsn is None:
            raise ConfigError(
                f"persistence.dsnEnv names {config.persistence.dsn_env}, but that environment variable is empty"
            )
    return ProcessSettings(
        database_dsn=dsn,
        sqlite_path=config.persistence.sqlite_path,
        instance=env.get("POD_NAME") or socket.gethostname(),
        shutdown_seconds=_float_env(env, SHUTDOWN_SECONDS_ENV, 20.0, 0.0, 3600.0),
    )


def load_model_api_key(config: RuntimeConfig, index: int = 0) -> str | None:
    """The mounted API key of model `index` (0 = primary); None when the model needs none."""
    entry = next((m for m in config.credentials.models if m.index == index), None)
    if entry is None or entry.api_key_file is None:
        return None
    try:
        return Path(entry.api_key_file).read_text().strip() or None
    except OSError as e:
        raise ConfigError(f"credentials.models[{index}].apiKeyFile {entry.api_key_file}: {e.strerror}") from e
