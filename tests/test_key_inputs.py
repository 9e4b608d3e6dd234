"""A public key that is not the one a command needs (an RSA key, a private key, a curve nobody supports, an
X25519 key, no PEM at all) is one sentence saying what the file holds, never a traceback: `audit verify
--public-key`, the audit views' `--public-key`, and the identity key `fieldguard serve` is configured with."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, x25519

from tests.conftest import REPO, make_keys

# an EC public key on secp112r1: valid PEM and DER, a curve `cryptography` refuses (UnsupportedAlgorithm)
SECP112R1 = b"""-----BEGIN PUBLIC KEY-----
MDIwEAYHKoZIzj0CAQYFK4EEAAYDHgAE23QgQfuFvbu4mNRHY1CoAO6nJFl21HzD
x89ywQ==
-----END PUBLIC KEY-----
"""

PUBLIC = (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
PRIVATE = (serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def wrong_keys(directory: Path) -> dict[str, tuple[Path, str]]:
    """Files that are not an Ed25519 public key, and what the sentence says each holds."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    files = {
        "rsa public": (rsa_key.public_key().public_bytes(*PUBLIC), "an RSA key (2048 bits)"),
        "rsa private": (rsa_key.private_bytes(*PRIVATE), "a private key"),
        "p-256": (ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(*PUBLIC), "an EC key (secp256r1)"),
        "x25519": (x25519.X25519PrivateKey.generate().public_key().public_bytes(*PUBLIC), "a key of type X25519"),
        "secp112r1": (SECP112R1, "a key of a type that cannot be read here"),
        "garbage": (b"hello, not a key\n", "no PEM public key"),
    }
    out = {}
    for name, (data, holds) in files.items():
        path = directory / f"{name.replace(' ', '-')}.pem"
        path.write_bytes(data)
        out[name] = (path, holds)
    return out


def config(directory: Path, identity: str = "") -> Path:
    keys = make_keys(directory / "keys")
    path = directory / "fieldguard.toml"
    path.write_text(f'[policy]\ndir = "{REPO / "policies"}"\n[keys]\ndir = "{keys}"\n'
                    f'[audit]\nstore = "{directory / "audit.sqlite3"}"\n[identity]\n{identity}\n')
    return path


def test_audit_verify_says_what_the_public_key_file_holds(tmp_path: Path) -> None:
    from tests.conftest import fieldguard

    cfg = config(tmp_path)
    for name, (key, holds) in wrong_keys(tmp_path).items():
        out = fieldguard(cfg, "audit", "verify", "--public-key", str(key))
        assert out.returncode == 1, name
        assert out.stderr == f"Error: {key} is not an Ed25519 public key: it holds {holds}\n", name


def test_the_audit_views_warn_in_one_sentence_on_a_wrong_public_key(tmp_path: Path) -> None:
    """The views still show the trail (they say it could not be checked); the sentence names what the file holds."""
    import asyncio

    from proxy.audit import record_operation
    from proxy.config import load_settings
    from tests.conftest import fieldguard

    cfg = config(tmp_path)
    asyncio.run(record_operation(load_settings(cfg, env={}), "test", who="tester"))  # a trail of one record
    for name, (key, holds) in wrong_keys(tmp_path).items():
        out = fieldguard(cfg, "audit", "export", "--format", "jsonl", "--output", str(tmp_path / "x.jsonl"),
                         "--public-key", str(key))
        assert "Traceback" not in out.stderr, name
        assert (f"warning: the audit trail does not verify: it could not be checked: {key} is not an Ed25519 "
                f"public key: it holds {holds}; pass --public-key") in out.stderr, name


@pytest.mark.parametrize("name, holds", [
    ("rsa private", "a private key"), ("x25519", "a key of type X25519"),
    ("secp112r1", "a key of a type or curve that cannot be used"), ("garbage", "no PEM public key")])
def test_serve_names_an_unusable_identity_key(tmp_path: Path, name: str, holds: str) -> None:
    from tests.conftest import fieldguard

    key = wrong_keys(tmp_path)[name][0]
    out = fieldguard(config(tmp_path, f'public_key_file = "{key}"'), "serve")
    assert out.returncode == 1
    assert (f"configuration error: identity.public_key_file {key} holds {holds}; tokens are verified with an RSA "
            "or EC (P-256, P-384) public key in PEM") in out.stderr
    assert "Traceback" not in out.stderr


def test_serve_says_where_the_identity_key_should_be(tmp_path: Path) -> None:
    from tests.conftest import fieldguard

    missing = tmp_path / "idp.pub.pem"
    out = fieldguard(config(tmp_path, f'public_key_file = "{missing}"'), "serve")
    assert out.returncode == 1
    assert (f"configuration error: identity.public_key_file {missing} cannot be read (No such file or directory): "
            "it should hold your identity provider's token-signing public key (PEM)") in out.stderr
