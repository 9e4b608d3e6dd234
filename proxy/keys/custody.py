"""Key custody: the KEK backend and keystore a deployment is configured with, opened the same way by
the gateway and by the `fieldguard keys` commands."""

from __future__ import annotations

import os
from pathlib import Path

from proxy.config import KeysSection
from proxy.keys.kek import FileKek, KekError, KeyEncryptionKey, Pkcs11Kek
from proxy.keys.ring import KeyRing
from proxy.keys.store import Keystore, SqliteKeystore
from proxy.postgres import is_postgres, redact
from proxy.secretfile import check_private


def passphrase(keys: KeysSection) -> bytes:
    value = os.environ.get(keys.passphrase_env)
    if value:
        return value.encode()
    if keys.passphrase_file:
        path = Path(keys.passphrase_file)
        check_private(path)
        return path.read_bytes().strip()
    raise KekError(f"no KEK passphrase: set {keys.passphrase_env} or keys.passphrase_file")


def pkcs11_pin(keys: KeysSection) -> str:
    pin = os.environ.get(keys.pkcs11_pin_env)
    if not pin:
        raise KekError(f"no PKCS#11 user PIN: set {keys.pkcs11_pin_env}")
    return pin


def open_kek(keys: KeysSection) -> KeyEncryptionKey:
    if keys.kek == "file":
        return FileKek(keys.in_dir(keys.kek_file), passphrase(keys))
    if keys.kek == "pkcs11":
        return Pkcs11Kek(keys.pkcs11_module, keys.pkcs11_token, pkcs11_pin(keys))
    raise KekError(f"unknown keys.kek backend {keys.kek!r} (file or pkcs11)")


def create_kek(keys: KeysSection) -> KeyEncryptionKey:
    if keys.kek == "file":
        return FileKek.create(keys.in_dir(keys.kek_file), passphrase(keys))
    if keys.kek == "pkcs11":
        return Pkcs11Kek.create(keys.pkcs11_module, keys.pkcs11_token, pkcs11_pin(keys))
    raise KekError(f"unknown keys.kek backend {keys.kek!r} (file or pkcs11)")


def keystore_where(keys: KeysSection) -> str:
    """The keystore, for messages: its file, or its database without the password."""
    return redact(keys.store) if keys.store else str(keys.in_dir(keys.keystore))


async def open_keystore(keys: KeysSection) -> Keystore:
    """The configured keystore: `[keys] store` when it names PostgreSQL, else the SQLite file in the keys dir."""
    if keys.store:
        if not is_postgres(keys.store):
            raise KekError("keys.store must be a postgresql:// URL, or empty for the keystore file")
        from proxy.keys.pgstore import PgKeystore
        return await PgKeystore.open(keys.store)
    return await SqliteKeystore.open(keys.in_dir(keys.keystore))


async def open_keyring(keys: KeysSection, kek: KeyEncryptionKey | None) -> KeyRing:
    return KeyRing(await open_keystore(keys), kek, keys.cache_size, keys.cache_seconds)
