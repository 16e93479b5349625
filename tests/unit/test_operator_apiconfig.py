"""The operator's own API configuration loader (apiconfig.py): kubeconfig files as the
local cluster and `kubectl config` write them, the pod's service account, clear errors."""

from __future__ import annotations

import base64
import ssl
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fleetward.operator import apiconfig
from fleetward.operator.apiconfig import ApiConfigError


def self_signed(tmp_path: Path, name: str) -> tuple[bytes, bytes]:
    """A certificate and key in PEM, for ssl contexts to load."""
    import datetime

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), pem_key


def kubeconfig(tmp_path: Path, cluster: dict, user: dict, *, context: str = "dev") -> Path:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": context, "context": {"cluster": "c", "user": "u"}}],
        "current-context": context,
    }
    path = tmp_path / "kubeconfig.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_files_relative_to_the_kubeconfig_and_an_ssl_context_that_loads_them(tmp_path):
    cert, key = self_signed(tmp_path, "admin")
    (tmp_path / "pki").mkdir()
    (tmp_path / "pki" / "ca.crt").write_bytes(cert)
    (tmp_path / "pki" / "admin.crt").write_bytes(cert)
    (tmp_path / "pki" / "admin.key").write_bytes(key)
    path = kubeconfig(
        tmp_path,
        {"server": "https://127.0.0.1:6443/", "certificate-authority": "pki/ca.crt"},
        {"client-certificate": "pki/admin.crt", "client-key": str(tmp_path / "pki" / "admin.key")},
    )
    cfg = apiconfig.load(str(path))
    assert cfg.host == "https://127.0.0.1:6443"
    assert cfg.ca_file == str(tmp_path / "pki" / "ca.crt")
    assert cfg.cert_file == str(tmp_path / "pki" / "admin.crt") and cfg.bearer_token() is None
    ctx = cfg.ssl_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


def test_inline_data_a_token_and_skip_verify(tmp_path):
    cert, key = self_signed(tmp_path, "ci")
    path = kubeconfig(
        tmp_path,
        {
            "server": "https://api.example:443",
            "certificate-authority-data": base64.b64encode(cert).decode(),
            "insecure-skip-tls-verify": True,
        },
        {
            "client-certificate-data": base64.b64encode(cert).decode(),
            "client-key-data": base64.b64encode(key).decode(),
            "token": "t0ken",
        },
    )
    cfg = apiconfig.from_kubeconfig(str(path))
    assert cfg.ca_data == cert.decode() and not cfg.verify
    assert Path(cfg.key_file).read_bytes() == key and (Path(cfg.key_file).stat().st_mode & 0o077) == 0
    assert cfg.bearer_token() == "t0ken"
    assert cfg.ssl_context().verify_mode == ssl.CERT_NONE


def test_the_service_account_token_is_read_again_when_it_rotates(tmp_path, monkeypatch):
    (tmp_path / "token").write_text("first\n")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    cfg = apiconfig.in_cluster(tmp_path)
    assert cfg.host == "https://10.0.0.1:6443" and cfg.ca_file is None
    assert cfg.bearer_token() == "first"
    (tmp_path / "token").write_text("second\n")
    assert cfg.bearer_token() == "first", "cached between re-reads"
    cfg._token_read_at -= apiconfig.TOKEN_REREAD_SECONDS + 1
    assert cfg.bearer_token() == "second"


@pytest.mark.parametrize(
    ("user", "cluster", "message"),
    [
        ({"exec": {"command": "aws"}}, {"server": "https://x"}, "uses exec"),
        ({}, {}, "has no server"),
    ],
)
def test_unsupported_or_incomplete_kubeconfigs_are_named(tmp_path, user, cluster, message):
    path = kubeconfig(tmp_path, cluster, user)
    with pytest.raises(ApiConfigError, match=message):
        apiconfig.from_kubeconfig(str(path))
    with pytest.raises(ApiConfigError, match="no context named 'other'"):
        apiconfig.from_kubeconfig(str(path), context="other")
    with pytest.raises(ApiConfigError, match="cannot read kubeconfig"):
        apiconfig.from_kubeconfig(str(tmp_path / "missing"))
