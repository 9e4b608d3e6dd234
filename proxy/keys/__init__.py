"""The keys lifecycle: the field ciphertext, key-encryption keys (a sealed file or PKCS#11), each client's
data keys in the keystore, the key ring that caches them for the request path, and the field cipher that
opens them only for `clear`. The lifecycle commands (`proxy.keys.lifecycle`) and the CRM migration
(`proxy.keys.migration`) are tools on top, imported by their own names."""

from proxy.keys.cipher import CipherFailure, FieldCipher
from proxy.keys.custody import create_kek, keystore_where, open_kek, open_keyring, open_keystore
from proxy.keys.envelope import PREFIX, EnvelopeError, associated_class, associated_where, is_sealed, record_ref, seal
from proxy.keys.kek import FileKek, KekError, KeyEncryptionKey, Pkcs11Kek, ScryptParams
from proxy.keys.ring import BEAT_SECONDS, LIVE_SECONDS, KeyRing, OpenKey, wrap_aad
from proxy.keys.store import DataKey, KeyStatus, Keystore, KeystoreConflict, KeystoreUnavailable, SqliteKeystore

__all__ = [
    "BEAT_SECONDS", "LIVE_SECONDS", "PREFIX", "CipherFailure", "DataKey", "EnvelopeError", "FieldCipher", "FileKek",
    "KekError", "KeyEncryptionKey", "KeyRing", "KeyStatus", "Keystore", "KeystoreConflict", "KeystoreUnavailable",
    "OpenKey", "Pkcs11Kek", "ScryptParams", "SqliteKeystore", "associated_class", "associated_where", "create_kek",
    "is_sealed", "keystore_where", "open_kek", "open_keyring", "open_keystore", "record_ref", "seal", "wrap_aad",
]
