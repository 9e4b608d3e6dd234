"""Key custody: the KEK backend and keystore a deployment is configured with, opened the same way by
the gateway and by the `fieldguard keys` commands."""

from __future__ import annotations

import os

from proxy.config import Settings
from proxy.kek import FileKek, KekError, KeyEncryptionKey, Pkcs11Kek
from proxy.keyring import KeyRing
from proxy.keystore import SqliteKeystore
from proxy.secretfile import check_private


def passphrase(settings: Settings) -> bytes:
    keys = settings.keys
    value = os.environ.get(keys.passphrase_env)
    if value:
        return value.encode()
    if keys.passphrase_file:
        path = settings.path(keys.passphrase_file)
        check_private(path)
        return path.read_bytes().strip()
    raise KekError(f"no KEK passphrase: set {keys.passphrase_env} or keys.passphrase_file")


def pkcs11_pin(settings: Settings) -> str:
    pin = os.environ.get(settings.keys.pkcs11_pin_env)
    if not pin:
        raise KekError(f"no PKCS#11 user PIN: set {settings.keys.pkcs11_pin_env}")
    return pin


def open_kek(settings: Settings) -> KeyEncryptionKey:
    keys = settings.keys
    if keys.kek == "file":
        return FileKek(settings.path(keys.dir) / keys.kek_file, passphrase(settings))
    if keys.kek == "pkcs11":
        return Pkcs11Kek(keys.pkcs11_module, keys.pkcs11_token, pkcs11_pin(settings))
    raise KekError(f"unknown keys.kek backend {keys.kek!r} (file or pkcs11)")


def create_kek(settings: Settings) -> KeyEncryptionKey:
    keys = settings.keys
    if keys.kek == "file":
        return FileKek.create(settings.path(keys.dir) / keys.kek_file, passphrase(settings))
    if keys.kek == "pkcs11":
        return Pkcs11Kek.create(keys.pkcs11_module, keys.pkcs11_token, pkcs11_pin(settings))
    raise KekError(f"unknown keys.kek backend {keys.kek!r} (file or pkcs11)")


async def open_keyring(settings: Settings, kek: KeyEncryptionKey | None) -> KeyRing:
    keys = settings.keys
    store = await SqliteKeystore.open(settings.path(keys.dir) / keys.keystore)
    return KeyRing(store, kek, keys.cache_size, keys.cache_seconds)
