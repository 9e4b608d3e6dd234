"""Identity: who is calling, from a verified bearer token. No identity, no access.

Tokens are JWTs checked against configured keys (RS256/ES256 from a PEM or JWKS file; HS256 only in an
explicitly declared demo). Issuer, audience and expiry are always checked. A verified token is cached
by its SHA-256 until it expires, so the signature is checked once per token, not once per request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import structlog
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.config import IdentitySection
from proxy.errors import GatewayError
from proxy.policy import PURPOSES

log = structlog.get_logger("fieldguard.identity")

ROLE_HEADER = "x-fieldguard-role"
PURPOSE_HEADER = "x-fieldguard-purpose"
BREAK_GLASS_HEADER = "x-fieldguard-break-glass"
_SUBJECT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of one request: verified claims plus the role and purpose chosen for it."""

    subject: str  # the token's subject, for the audit record ("u:alice")
    roles: frozenset[str]
    role: str  # the active role (NIST RBAC: one at a time)
    purpose: str  # HL7 PurposeOfUse
    client_id: str | None = None  # for the client role: whose record "self" means
    token_id: str | None = None  # jti, for the audit record (never the token itself)
    issuer: str = ""
    crm_user: str | None = None  # who the CRM knows them as (identity.user_claim), matched to a staff row

    @property
    def staff(self) -> str | None:
        """What the need-to-know facts are matched against (see RelationIndex.staff_id)."""
        return self.crm_user

    @property
    def user(self) -> str:
        """Namespaced, so no user id can equal a role name (Casbin's g(x, x) is true)."""
        return f"u:{self.subject}"


@dataclass(frozen=True, slots=True)
class Claims:
    subject: str
    roles: frozenset[str]
    purposes: tuple[str, ...]
    client_id: str | None
    token_id: str | None
    issuer: str
    expires: float
    crm_user: str | None = None


class TokenVerifier:
    """Turns an Authorization header and the role/purpose headers into a `Principal`."""

    def __init__(self, settings: IdentitySection) -> None:
        self.settings = settings
        self._keys, self._algorithms = _load_keys(settings)
        self._cache: OrderedDict[bytes, Claims] = OrderedDict()

    def authenticate(self, headers: Mapping[str, str]) -> Principal:
        auth = headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise GatewayError(401, "bearer token required", reason="no token")
        token = token.strip()
        if len(token) > self.settings.max_token_bytes:  # before any parsing: a huge token costs the loop
            raise GatewayError(401, "token too large", reason="token too large")
        claims = self.verify(token)
        return self._principal(claims, headers)

    def verify(self, token: str) -> Claims:
        digest = hashlib.sha256(_canonical(token).encode()).digest()
        cached = self._cache.get(digest)
        now = time.time()
        if cached is not None:
            if cached.expires + self.settings.leeway_seconds > now:
                self._cache.move_to_end(digest)
                return cached
            del self._cache[digest]
        claims = self._decode(token)
        self._cache[digest] = claims
        if len(self._cache) > self.settings.token_cache_size:
            self._cache.popitem(last=False)
        return claims

    def _decode(self, token: str) -> Claims:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise GatewayError(401, "malformed token", reason="malformed token") from None
        alg = header.get("alg")
        if alg not in self._algorithms:
            raise GatewayError(401, "token algorithm not accepted", reason=f"algorithm {alg!r} refused")
        key = self._key_for(header)
        try:
            payload: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=self.settings.audience,
                issuer=self.settings.issuer,
                leeway=self.settings.leeway_seconds,
                options={"require": ["exp", "iat", "sub", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise GatewayError(401, "token expired", reason="token expired") from None
        except jwt.InvalidAudienceError:
            raise GatewayError(401, "token audience not accepted", reason="wrong audience") from None
        except jwt.InvalidIssuerError:
            raise GatewayError(401, "token issuer not accepted", reason="wrong issuer") from None
        except jwt.PyJWTError as exc:
            raise GatewayError(401, "token not valid", reason=f"invalid token: {type(exc).__name__}") from None
        return self._claims(payload)

    def _key_for(self, header: Mapping[str, Any]) -> Any:
        kid = header.get("kid")
        if kid is not None and kid in self._keys:
            return self._keys[kid]
        if len(self._keys) == 1 and (kid is None or "" in self._keys):
            return next(iter(self._keys.values()))
        raise GatewayError(401, "token signed by an unknown key", reason="unknown kid")

    def _claims(self, payload: Mapping[str, Any]) -> Claims:
        s = self.settings
        for name in ("exp", "iat", "nbf"):  # numbers, not numeric strings a lenient parser converts
            if name in payload and (isinstance(payload[name], bool) or not isinstance(payload[name], int | float)):
                raise GatewayError(401, "token not valid", reason=f"claim {name} is not a number")
        if payload["exp"] - payload["iat"] > s.max_token_lifetime_seconds:
            raise GatewayError(401, "token lives too long", reason="token lifetime above identity.max_token_lifetime")
        subject = payload.get("sub")
        if not isinstance(subject, str) or not _SUBJECT.fullmatch(subject):
            raise GatewayError(401, "token subject not valid", reason="bad sub")
        roles = payload.get(s.roles_claim)
        if not isinstance(roles, list) or not roles or not all(isinstance(r, str) for r in roles):
            raise GatewayError(403, "token carries no roles", reason="no roles claim (a list of names)")
        purposes = payload.get(s.purpose_claim, [])
        if isinstance(purposes, str):
            purposes = [purposes]
        if not isinstance(purposes, list) or not all(isinstance(p, str) for p in purposes):
            raise GatewayError(401, "token purpose of use not valid", reason="bad purpose claim")
        client_id = payload.get(s.client_claim)
        jti = payload.get("jti")
        crm_user = payload.get(s.user_claim)
        return Claims(
            subject=subject,
            roles=frozenset(_text(r) for r in roles),
            purposes=tuple(_text(p) for p in purposes),
            client_id=_text(client_id) if client_id is not None else None,
            token_id=_text(jti) if jti is not None else None,
            issuer=str(payload.get("iss", "")),
            expires=float(payload["exp"]),
            crm_user=_text(crm_user) if isinstance(crm_user, str) and crm_user else None,
        )

    def _principal(self, claims: Claims, headers: Mapping[str, str]) -> Principal:
        wanted = headers.get(ROLE_HEADER)
        if wanted is not None:
            if wanted not in claims.roles:
                raise GatewayError(403, "requested role is not among the token's roles", reason="role not held")
            role = wanted
        elif len(claims.roles) == 1:
            (role,) = claims.roles
        else:
            raise GatewayError(400, f"several roles held: choose one with the {ROLE_HEADER} header",
                               reason="no active role chosen")
        purpose_header = headers.get(PURPOSE_HEADER)
        if purpose_header is not None:
            if purpose_header not in claims.purposes:
                raise GatewayError(403, "purpose of use not granted by the token", reason="purpose not in token")
            purpose = purpose_header
        elif len(claims.purposes) == 1:
            purpose = claims.purposes[0]
        elif not claims.purposes:
            raise GatewayError(403, "purpose of use required", reason="no purpose of use")
        else:
            raise GatewayError(400, f"several purposes granted: choose one with the {PURPOSE_HEADER} header",
                               reason="no purpose chosen")
        if purpose not in PURPOSES:
            raise GatewayError(403, "unknown purpose of use", reason="unknown purpose")
        if BREAK_GLASS_HEADER in headers:  # it used to be free text that granted nothing: say so, not ignore it
            raise GatewayError(400, "break-glass is declared with POST /_fieldguard/break-glass (a coded reason and a "
                                    "justification), not with a header", reason="break-glass header refused")
        return Principal(
            subject=claims.subject,
            roles=claims.roles,
            role=role,
            purpose=purpose,
            client_id=claims.client_id,
            token_id=claims.token_id,
            issuer=claims.issuer,
            crm_user=claims.crm_user,
        )


def _load_keys(s: IdentitySection) -> tuple[dict[str, Any], frozenset[str]]:
    """Keys by kid ('' for a single unnamed key) and the algorithms they may verify.

    One key type per deployment: an RSA or EC public key never verifies HS256 and a demo secret
    never verifies RS256, which closes the HS/RS confusion attack.
    """
    sources = [x for x in (s.public_key_file, s.jwks_file, s.demo_hs256_secret_file) if x]
    if len(sources) != 1:
        raise ValueError("configure exactly one of identity.public_key_file, jwks_file, demo_hs256_secret_file")
    if s.demo_hs256_secret_file:
        if not s.demo:
            raise ValueError("HS256 shared secrets are accepted only with identity.demo = true")
        secret = Path(s.demo_hs256_secret_file).read_bytes().strip()
        if len(secret) < 32:
            raise ValueError("the demo HS256 secret must be at least 32 bytes")
        log.warning("HS256 demo secret in use: never run this configuration in production")
        return {"": secret}, frozenset({"HS256"})
    if s.public_key_file:
        key = _public_key_file(Path(s.public_key_file))
        return {"": key}, _algorithms_for(key)
    jwks = json.loads(Path(s.jwks_file).read_text())
    keys: dict[str, Any] = {}
    algorithms: set[str] = set()
    for jwk in jwks.get("keys", []):
        if jwk.get("kty") not in ("RSA", "EC"):
            continue
        key = jwt.PyJWK(jwk).key
        keys[str(jwk.get("kid", ""))] = key
        algorithms |= _algorithms_for(key)
    if not keys:
        raise ValueError(f"{s.jwks_file}: no RSA or EC keys")
    return keys, frozenset(algorithms)


def _public_key_file(path: Path) -> Any:
    """identity.public_key_file, or one sentence saying why it cannot be used."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"identity.public_key_file {path} cannot be read ({exc.strerror or exc}): it should hold "
                         "your identity provider's token-signing public key (PEM)") from None
    need = "tokens are verified with an RSA or EC (P-256, P-384) public key in PEM"
    try:
        key = serialization.load_pem_public_key(data)
    except UnsupportedAlgorithm:
        raise ValueError(f"identity.public_key_file {path} holds a key of a type or curve that cannot be used; "
                         f"{need}") from None
    except ValueError:
        what = "a private key" if b"PRIVATE KEY-----" in data else "no PEM public key"
        raise ValueError(f"identity.public_key_file {path} holds {what}; {need}") from None
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        raise ValueError(f"identity.public_key_file {path} holds a key of type "
                         f"{type(key).__name__.removesuffix('PublicKey')}; {need}")
    return key


def _algorithms_for(key: Any) -> frozenset[str]:
    if isinstance(key, rsa.RSAPublicKey):
        return frozenset({"RS256", "RS384", "RS512", "PS256"})
    if isinstance(key, ec.EllipticCurvePublicKey):
        return frozenset({{"secp256r1": "ES256", "secp384r1": "ES384"}.get(key.curve.name, "ES256")})
    raise ValueError("public keys must be RSA or EC")


_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _canonical(token: str) -> str:
    """ECDSA signatures are malleable: (r, s) and (r, n - s) both verify, so one signed token has two
    spellings. Refusing the high-S one would refuse half of every IdP's genuine ES256 tokens; instead both
    spellings are one token here: one cache entry, one verification, one identity in the trail."""
    head, _, sig = token.rpartition(".")
    try:
        raw = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
    except ValueError:
        return token
    if len(raw) != 64:  # not an ES256 signature (RS256 is not malleable this way)
        return token
    s = int.from_bytes(raw[32:], "big")
    if s <= _P256_ORDER // 2:
        return token
    low = raw[:32] + (_P256_ORDER - s).to_bytes(32, "big")
    return f"{head}.{base64.urlsafe_b64encode(low).rstrip(b'=').decode()}"


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")


def _text(value: Any, limit: int = 128) -> str:
    """A claim value as the audit record may carry it: printable, encodable, bounded. A signed token can
    carry anything its issuer put in it; none of it may stop the audit trail."""
    return _UNPRINTABLE.sub("\ufffd", str(value))[:limit]
