"""Key-encryption keys: what wraps every client's data key. Never in the CRM, never in git.

Two backends:
- `file`: KEKs sealed in `keys/kek.json` with a key derived by scrypt from a passphrase (from an
  environment variable or a file). The file is refused if group or others can read it.
- `pkcs11`: a non-extractable AES-256 key inside a PKCS#11 token (an HSM; SoftHSM2 in tests). The key
  never leaves the token; wrapping is AES-GCM performed by the token.

Both keep every KEK version they have made, each named by a `kek_id`, so rotation can re-wrap data keys
from the old KEK to the new one without touching the CRM.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from proxy.secretfile import check_private, write_private

_NONCE = 12


class KekError(Exception):
    """The KEK cannot be used (missing, locked, wrong passphrase, token absent)."""


class KeyEncryptionKey(Protocol):
    """Wraps and unwraps data keys. `wrap` always uses the current KEK version.

    Rotation runs in another process (`fieldguard keys rotate-kek`) beside running gateways: `refresh`
    takes up the versions it made or retired, cheaply when nothing changed. `blocking` says a call may
    wait on a device (a token), so the request path makes it off the event loop."""

    blocking: bool

    @property
    def current_id(self) -> str: ...

    def refresh(self) -> bool: ...

    def wrap(self, dek: bytes, aad: bytes) -> tuple[bytes, str]: ...

    def unwrap(self, blob: bytes, aad: bytes, kek_id: str) -> bytes: ...

    def rotate(self) -> str: ...

    def known_ids(self) -> list[str]: ...

    def retire(self, kek_id: str) -> None: ...


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


@dataclass(frozen=True, slots=True)
class ScryptParams:
    n: int = 2**15
    r: int = 8
    p: int = 1


class FileKek:
    """KEKs sealed in a JSON file under a passphrase-derived key."""

    blocking = False

    def __init__(self, path: Path, passphrase: bytes) -> None:
        self.path = path
        if not path.exists():
            raise KekError(f"{path} does not exist: run `fieldguard keys init`")
        check_private(path)
        doc, seen = self._read()
        params = doc["kdf"]
        self._salt = _unb64(params["salt"])
        self._wrapping = AESGCM(_derive(passphrase, self._salt, ScryptParams(params["n"], params["r"], params["p"])))
        self._keks: dict[str, AESGCM] = {}
        self._load(doc, seen)

    def _read(self) -> tuple[dict[str, Any], tuple[int, int, int]]:
        st = os.stat(self.path)
        try:
            doc = json.loads(self.path.read_bytes())
        except ValueError:
            raise KekError(f"{self.path} is not a FieldGuard KEK file") from None
        if not isinstance(doc, dict) or doc.get("format") != "fieldguard-kek-file-1":
            raise KekError(f"{self.path} is not a FieldGuard KEK file")
        return doc, (st.st_ino, st.st_mtime_ns, st.st_size)

    def _load(self, doc: dict[str, Any], seen: tuple[int, int, int]) -> None:
        keks: dict[str, AESGCM] = {}
        for entry in doc["keks"]:
            known = self._keks.get(entry["kek_id"])
            if known is not None:
                keks[entry["kek_id"]] = known
                continue
            try:
                raw = self._wrapping.decrypt(_unb64(entry["nonce"]), _unb64(entry["sealed"]), entry["kek_id"].encode())
            except InvalidTag:
                raise KekError(f"{self.path}: wrong passphrase (or the file was altered)") from None
            keks[entry["kek_id"]] = AESGCM(raw)
        if doc["current"] not in keks:
            raise KekError(f"{self.path}: its current KEK is not among its keys")
        self._doc, self._keks, self._current, self._seen = doc, keks, str(doc["current"]), seen

    def refresh(self) -> bool:
        """Take up a rotation or retirement another process wrote (the file is replaced atomically, so a
        changed inode, time or size is the sign); a file that cannot be used keeps the versions held."""
        try:
            st = os.stat(self.path)
            if (st.st_ino, st.st_mtime_ns, st.st_size) == self._seen:
                return False
            doc, seen = self._read()
            if _unb64(doc["kdf"]["salt"]) != self._salt:
                raise KekError(f"{self.path} was replaced by a KEK file under another passphrase")
            self._load(doc, seen)
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise KekError(f"{self.path} cannot be re-read: {type(exc).__name__}") from None
        return True

    @classmethod
    def create(cls, path: Path, passphrase: bytes, params: ScryptParams = ScryptParams()) -> FileKek:
        if path.exists():
            raise KekError(f"{path} already exists; refusing to overwrite a key-encryption key")
        if len(passphrase) < 12:
            raise KekError("the passphrase must be at least 12 characters")
        salt = secrets.token_bytes(16)
        kdf = {"name": "scrypt", "salt": _b64(salt), "n": params.n, "r": params.r, "p": params.p}
        doc: dict[str, Any] = {"format": "fieldguard-kek-file-1", "kdf": kdf, "keks": [], "current": ""}
        wrapping = AESGCM(_derive(passphrase, salt, params))
        kek_id = _new_kek_id()
        doc["keks"].append(_seal_entry(wrapping, kek_id, AESGCM.generate_key(256)))
        doc["current"] = kek_id
        write_private(path, json.dumps(doc, indent=2).encode())
        return cls(path, passphrase)

    @property
    def current_id(self) -> str:
        return str(self._current)

    def wrap(self, dek: bytes, aad: bytes) -> tuple[bytes, str]:
        nonce = os.urandom(_NONCE)
        return nonce + self._keks[self._current].encrypt(nonce, dek, aad), self._current

    def unwrap(self, blob: bytes, aad: bytes, kek_id: str) -> bytes:
        kek = self._keks.get(kek_id)
        if kek is None:
            raise KekError(f"unknown or retired KEK {kek_id}")
        try:
            return kek.decrypt(blob[:_NONCE], blob[_NONCE:], aad)
        except InvalidTag:
            raise KekError("wrapped key failed authentication") from None

    def rotate(self) -> str:
        self.refresh()
        kek_id = _new_kek_id()
        raw = AESGCM.generate_key(256)
        self._doc["keks"].append(_seal_entry(self._wrapping, kek_id, raw))
        self._doc["current"] = kek_id
        self._write()
        self._keks[kek_id] = AESGCM(raw)
        self._current = kek_id
        return kek_id

    def _write(self) -> None:
        write_private(self.path, json.dumps(self._doc, indent=2).encode())
        st = os.stat(self.path)
        self._seen = (st.st_ino, st.st_mtime_ns, st.st_size)

    def known_ids(self) -> list[str]:
        return list(self._keks)

    def retire(self, kek_id: str) -> None:
        self.refresh()
        if kek_id == self._current:
            raise KekError("the current KEK cannot be retired")
        self._doc["keks"] = [e for e in self._doc["keks"] if e["kek_id"] != kek_id]
        self._write()
        self._keks.pop(kek_id, None)


def _derive(passphrase: bytes, salt: bytes, p: ScryptParams) -> bytes:
    return Scrypt(salt=salt, length=32, n=p.n, r=p.r, p=p.p).derive(passphrase)


def _seal_entry(wrapping: AESGCM, kek_id: str, raw: bytes) -> dict[str, str]:
    nonce = os.urandom(_NONCE)
    return {"kek_id": kek_id, "nonce": _b64(nonce), "sealed": _b64(wrapping.encrypt(nonce, raw, kek_id.encode())),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _new_kek_id() -> str:
    return f"kek-{time.strftime('%Y%m%d', time.gmtime())}-{secrets.token_hex(4)}"


_SESSIONS: dict[tuple[str, str], tuple[Any, threading.Lock]] = {}
_SESSIONS_LOCK = threading.Lock()


def _shared_session(module: str, token_label: str, pin: str) -> tuple[Any, threading.Lock]:
    """One logged-in session per token per process. PKCS#11 login state belongs to the process, so a
    second login fails (CKR_USER_ALREADY_LOGGED_IN) and sessions are not thread-safe: share one, locked."""
    import pkcs11

    with _SESSIONS_LOCK:
        found = _SESSIONS.get((module, token_label))
        if found is not None:
            return found
        try:
            token = pkcs11.lib(module).get_token(token_label=token_label)
            try:
                session = token.open(user_pin=pin, rw=True)
            except pkcs11.exceptions.UserAlreadyLoggedIn:
                session = token.open(rw=True)
        except pkcs11.exceptions.PKCS11Error as exc:
            raise KekError(f"PKCS#11 token {token_label!r} not usable: {type(exc).__name__}") from None
        except RuntimeError as exc:  # the module cannot be loaded
            raise KekError(f"PKCS#11 module {module} not usable: {type(exc).__name__}") from None
        _SESSIONS[(module, token_label)] = found = (session, threading.Lock())
        return found


class Pkcs11Kek:
    """A KEK that never leaves a PKCS#11 token: AES-256, sensitive, non-extractable; the token wraps."""

    LABEL_PREFIX = "fieldguard-kek-"
    blocking = True

    def __init__(self, module: str, token_label: str, pin: str) -> None:
        import pkcs11

        self._pkcs11 = pkcs11
        self._session, self._lock = _shared_session(module, token_label, pin)
        self._keys: dict[str, Any] = {}
        ids = self.known_ids()
        if not ids:
            raise KekError(f"no FieldGuard KEK in token {token_label!r}: run `fieldguard keys init`")
        self._current = max(ids)

    @classmethod
    def create(cls, module: str, token_label: str, pin: str) -> Pkcs11Kek:
        session, lock = _shared_session(module, token_label, pin)
        with lock:
            if _labels(session):
                raise KekError("the token already holds a FieldGuard KEK; refusing to make another")
            _generate(session, f"{cls.LABEL_PREFIX}{_stamp()}")
        return cls(module, token_label, pin)

    def _key(self, kek_id: str) -> Any:
        key = self._keys.get(kek_id)
        if key is None:
            try:
                key = self._session.get_key(label=kek_id, key_type=self._pkcs11.KeyType.AES)
            except self._pkcs11.exceptions.PKCS11Error:
                raise KekError(f"KEK {kek_id} not found in the token") from None
            self._keys[kek_id] = key
        return key

    @property
    def current_id(self) -> str:
        return self._current

    def refresh(self) -> bool:
        """The newest label is current: another process's rotation is taken up, a retired label forgotten."""
        ids = self.known_ids()
        if not ids:
            raise KekError("the token holds no FieldGuard KEK any more")
        for gone in set(self._keys) - set(ids):
            self._keys.pop(gone, None)
        changed = max(ids) != self._current
        self._current = max(ids)
        return changed

    def wrap(self, dek: bytes, aad: bytes) -> tuple[bytes, str]:
        from pkcs11.mechanisms import GCMParams

        nonce = os.urandom(_NONCE)
        with self._lock:
            blob = self._key(self._current).encrypt(dek, mechanism=self._pkcs11.Mechanism.AES_GCM,
                                                    mechanism_param=GCMParams(nonce, aad, 128))
        return nonce + bytes(blob), self._current

    def unwrap(self, blob: bytes, aad: bytes, kek_id: str) -> bytes:
        from pkcs11.mechanisms import GCMParams

        with self._lock:
            key = self._key(kek_id)
            try:
                return bytes(key.decrypt(blob[_NONCE:], mechanism=self._pkcs11.Mechanism.AES_GCM,
                                         mechanism_param=GCMParams(blob[:_NONCE], aad, 128)))
            except self._pkcs11.exceptions.PKCS11Error:
                raise KekError("wrapped key failed authentication in the token") from None

    def rotate(self) -> str:
        label = f"{self.LABEL_PREFIX}{_stamp()}"
        with self._lock:
            _generate(self._session, label)
        self._current = label
        return label

    def known_ids(self) -> list[str]:
        with self._lock:
            return _labels(self._session)

    def retire(self, kek_id: str) -> None:
        if kek_id == self._current:
            raise KekError("the current KEK cannot be retired")
        with self._lock:
            self._key(kek_id).destroy()
        self._keys.pop(kek_id, None)


def _labels(session: Any) -> list[str]:
    import pkcs11

    labels = [str(k[pkcs11.Attribute.LABEL])
              for k in session.get_objects({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.SECRET_KEY})]
    return sorted(label for label in labels if label.startswith(Pkcs11Kek.LABEL_PREFIX))


def _generate(session: Any, label: str) -> None:
    import pkcs11

    session.generate_key(pkcs11.KeyType.AES, 256, label=label, store=True, template={
        pkcs11.Attribute.EXTRACTABLE: False, pkcs11.Attribute.SENSITIVE: True,
        pkcs11.Attribute.ENCRYPT: True, pkcs11.Attribute.DECRYPT: True,
    })


def _stamp() -> str:
    return f"{time.strftime('%Y%m%d%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
