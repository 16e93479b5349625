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
