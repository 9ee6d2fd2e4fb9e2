"""Short-lived JWTs (HS256) exchanged for an API key at POST /api/auth/token.

The signing secret comes from settings (`NBCRON_JWT_SECRET`) or is generated once into
`<data dir>/jwt-secret` (mode 0600). Verification accepts HS256 only — `alg: none`, any other
algorithm, a bad signature, a wrong issuer or an expired token are all AuthError (401). A token
names the key it was made from, so revoking the key ends its tokens too (as soon as the API
processes hear of it: see `PrincipalCache` in service/auth.py).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt

from service.auth import Principal, PrincipalCache, authenticate
from service.config import Settings
from service.errors import AuthError
from service.models import Role
from service.secrets import read_or_create
from service.store import Store

ALGORITHM = "HS256"
ISSUER = "nbcron"
MIN_SECRET_BYTES = 32
MAX_TTL_SECONDS = 24 * 3600


@dataclass(frozen=True, kw_only=True)
class TokenClaims:
    """What a verified token says: the key it stands for, that key's role, and when it ends."""

    key_id: int
    role: Role
    expires_at: int


def looks_like_jwt(credential: str) -> bool:
    """True for `header.payload.signature` text (API keys never contain dots)."""
    return credential.count(".") == 2


def jwt_secret(settings: Settings) -> str:
    """The signing secret: from settings, else generated into the data dir on first use."""
    secret = settings.jwt_secret or read_or_create(
        settings.jwt_secret_path, lambda: secrets.token_urlsafe(48)
    )
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise ValueError(f"jwt_secret must be at least {MIN_SECRET_BYTES} bytes long")
    return secret


def token_ttl(seconds: int) -> int:
    """The lifetime a token really gets: at least 1 s, at most a day."""
    return max(1, min(seconds, MAX_TTL_SECONDS))


def issue(
    *, key_id: int, role: Role, secret: str, ttl_seconds: int, now: float | None = None
) -> str:
    """A signed token for `key_id` valid for `ttl_seconds`."""
    issued = int(time.time() if now is None else now)
    ttl = token_ttl(ttl_seconds)
    claims = {
        "iss": ISSUER,
        "sub": str(key_id),
        "role": role.value,
        "iat": issued,
        "nbf": issued,
        "exp": issued + ttl,
        "jti": secrets.token_hex(8),
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify(token: str, *, secret: str) -> TokenClaims:
    """The claims of a valid token, or AuthError (401) saying why it is refused."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],  # never taken from the token's own header
            issuer=ISSUER,
            options={"require": ["exp", "iat", "sub", "iss", "role"]},
            leeway=5,
        )
    except jwt.ExpiredSignatureError as exc:
        raise AuthError("the token has expired; ask POST /api/auth/token for a new one") from exc
    except jwt.InvalidTokenError as exc:
        raise AuthError("invalid token") from exc
    return _claims(claims)


def _claims(claims: dict[str, object]) -> TokenClaims:
    try:
        return TokenClaims(
            key_id=int(str(claims["sub"])),
            role=Role(str(claims["role"])),
            expires_at=int(str(claims["exp"])),
        )
    except (ValueError, KeyError) as exc:
        raise AuthError("invalid token") from exc


def principal_from_token(store: Store, token: str, *, secret: str) -> Principal:
    """The principal a JWT stands for; its key must still exist and be unrevoked."""
    return principal_for_claims(store, verify(token, secret=secret))


def principal_for_claims(store: Store, claims: TokenClaims) -> Principal:
    """The principal behind verified claims; the key must still exist and be unrevoked."""
    row = store.key_by_id(claims.key_id)
    if row is None or row["revoked_at"] is not None:
        raise AuthError("the API key behind this token has been revoked")
    store.touch_key(row["id"])
    role = Role(row["role"])
    if not claims.role.allows(role):  # a token never carries more than its key has now
        role = claims.role
    return Principal(key_id=row["id"], name=row["name"], role=role)


def cached(state: Mapping[str, Any], credential: str) -> Principal | None:
    """The principal from the process's cache (`state["principals"]`), if it holds one.

    Never blocks: safe on the event loop. None means: call `resolve` in a worker thread."""
    cache: PrincipalCache | None = state.get("principals")
    return cache.get(credential) if cache is not None else None


def resolve(state: Mapping[str, Any], credential: str) -> Principal:
    """The principal for an API key or a JWT (blocking: runs in a worker thread), remembered
    in `state["principals"]` when there is such a cache."""
    cache: PrincipalCache | None = state.get("principals")
    generation = cache.generation if cache is not None else 0
    principal, until = _lookup(state, credential)
    if cache is not None:
        cache.put(credential, principal, generation=generation, until=until)
    return principal


def _lookup(state: Mapping[str, Any], credential: str) -> tuple[Principal, float | None]:
    """The principal and, for a JWT, the time (epoch seconds) it stops being valid."""
    if looks_like_jwt(credential):
        claims = verify(credential, secret=state["jwt_secret"])
        return principal_for_claims(state["store"], claims), float(claims.expires_at)
    return authenticate(state["store"], credential), None
