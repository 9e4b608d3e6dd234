"""Signed checkpoints: the trail's head, signed with Ed25519, so an auditor can trust it offline.

A checkpoint is a short text note (origin, number of records, hash of the chain head, time) and its
signature. The signing key lives under keys/; its public key is what auditors are given out of band.
A trail whose checkpoints do not verify under that public key has been rewritten or re-signed.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from proxy.secretfile import check_private, write_private

HEADER = "fieldguard-audit-checkpoint/v1"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    origin: str
    size: int  # records covered: 1..size
    head: bytes  # chain hash after record `size`
    time: str
    key_id: str
    signature: bytes

    @property
    def note(self) -> bytes:
        return note(self.origin, self.size, self.head, self.time)

    def as_dict(self) -> dict[str, object]:
        return {"origin": self.origin, "size": self.size, "head": self.head.hex(), "time": self.time,
                "key_id": self.key_id, "signature": base64.b64encode(self.signature).decode()}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Checkpoint:
        return cls(str(d["origin"]), int(str(d["size"])), bytes.fromhex(str(d["head"])), str(d["time"]),
                   str(d["key_id"]), base64.b64decode(str(d["signature"])))

    def verify(self, public: Ed25519PublicKey) -> bool:
        try:
            public.verify(self.signature, self.note)
            return True
        except InvalidSignature:
            return False


def note(origin: str, size: int, head: bytes, time: str) -> bytes:
    return f"{HEADER}\norigin: {origin}\nsize: {size}\nhead: {head.hex()}\ntime: {time}\n".encode()


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class CheckpointSigner:
    """The trail's signing key, made on first use under keys/ with its public half beside it."""

    def __init__(self, path: Path) -> None:
        if not path.exists():
            key = Ed25519PrivateKey.generate()
            write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
            public_path(path).write_bytes(public_pem(key.public_key()))
        check_private(path)
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(loaded, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 private key")
        self._key = loaded
        self.public = loaded.public_key()
        self.key_id = key_id(self.public)

    def sign(self, origin: str, size: int, head: bytes) -> Checkpoint:
        time = datetime.now(UTC).isoformat(timespec="milliseconds")
        return Checkpoint(origin, size, head, time, self.key_id, self._key.sign(note(origin, size, head, time)))


def public_path(private: Path) -> Path:
    return private.with_name(private.name.removesuffix(".pem") + ".pub.pem")


def public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public(path: Path) -> Ed25519PublicKey:
    """The Ed25519 public key in a PEM file. Anything else (an RSA or EC key, a private key, no PEM at all, a
    key type this build cannot read) is a ValueError of one sentence saying what the file holds instead."""
    data = path.read_bytes()
    try:
        key = serialization.load_pem_public_key(data)
    except UnsupportedAlgorithm:
        raise ValueError(f"{path} is not an Ed25519 public key: it holds a key of a type that cannot be read "
                         "here") from None
    except ValueError:
        what = "a private key" if b"PRIVATE KEY-----" in data else "no PEM public key"
        raise ValueError(f"{path} is not an Ed25519 public key: it holds {what}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key: it holds {_kind(key)}")
    return key


def _kind(key: object) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return f"an RSA key ({key.key_size} bits)"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"an EC key ({key.curve.name})"
    return f"a key of type {type(key).__name__.removeprefix('_').removesuffix('PublicKey')}"
