"""`fleetward runtime run` refuses a bad rendered config with an error that names the
field or file, before it serves anything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetward.operator.desired.agent import AgentInputs, AgentRef, runtime_config
from fleetward.operator.settings import OperatorSettings

from fleetward.api.agent import AgentSpec

SPEC = {"role": "specialist", "model": {"name": "m", "baseURL": "http://127.0.0.1:1/v1"}}


def _config(tmp_path: Path, pii_hash_key_file: Path | None = None) -> dict:
    key = tmp_path / "signing-key.pem"
    key.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    inputs = AgentInputs(
        ref=AgentRef("ns", "a", "uid"),
        spec=AgentSpec.model_validate(SPEC),
        settings=OperatorSettings(namespace="fleetward-system"),
        key_id="ns.a.1",
    )
    config = runtime_config(inputs).model_copy(deep=True)
    config.credentials.signing_key_file = str(key)
    config.credentials.pii_hash_key_file = str(pii_hash_key_file) if pii_hash_key_file else None
    return json.loads(config.with_hash().to_json())


def _check(tmp_path: Path, config: dict | str) -> subprocess.CompletedProcess:
    path = tmp_path / "config.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    return subprocess.run(
        [sys.executable, "-m", "fleetward.cli.main", "runtime", "run", "--check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_valid_config_passes(tmp_path):
    out = _check(tmp_path, _config(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "ns/a" in out.stdout


def test_an_invalid_field_is_named(tmp_path):
    config = _config(tmp_path)
    config["spec"]["model"]["temperature"] = 7
    out = _check(tmp_path, config)
    assert out.returncode == 2
    assert "spec.model.temperature" in out.stderr


def test_a_missing_section_is_named(tmp_path):
    config = _config(tmp_path)
    del config["topics"]
    out = _check(tmp_path, config)
    assert out.returncode == 2 and "topics" in out.stderr


def test_an_edited_config_fails_its_hash(tmp_path):
    config = _config(tmp_path)
    config["topics"]["request"] = "someone.elses.topic"
    out = _check(tmp_path, config)
    assert out.returncode == 2 and "configHash" in out.stderr


def test_a_missing_key_file_is_named(tmp_path):
    config = _config(tmp_path)
    Path(config["credentials"]["signingKeyFile"]).unlink()
    out = _check(tmp_path, config)
    assert out.returncode == 2 and "credentials.signingKeyFile" in out.stderr


def test_not_json_at_all(tmp_path):
    out = _check(tmp_path, "{not json")
    assert out.returncode == 2 and "invalid runtime config" in out.stderr


def test_a_pii_hash_key_that_cannot_be_read_or_is_too_short_is_named(tmp_path):
    missing = _check(tmp_path, _config(tmp_path, tmp_path / "no-such-key"))
    assert missing.returncode == 2 and "credentials.piiHashKeyFile" in missing.stderr
    short = tmp_path / "short-key"
    short.write_text("abc\n")
    out = _check(tmp_path, _config(tmp_path, short))
    assert out.returncode == 2 and "credentials.piiHashKeyFile" in out.stderr and "3 bytes" in out.stderr
    good = tmp_path / "good-key"
    good.write_text("k" * 48)
    assert _check(tmp_path, _config(tmp_path, good)).returncode == 0
