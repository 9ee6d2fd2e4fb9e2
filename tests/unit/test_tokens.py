"""JWTs: HS256 only, signed with the settings' secret (or one generated into the data dir),
and every kind of bad token refused with AuthError (401)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from service.config import Settings
from service.errors import AuthError
from service.models import Role
from service.tokens import ISSUER, MAX_TTL_SECONDS, issue, jwt_secret, looks_like_jwt, verify

SECRET = "s" * 64


def _claims(**changes: object) -> dict[str, object]:
    now = int(time.time())
    base: dict[str, object] = {
        "iss": ISSUER,
        "sub": "7",
        "role": "operator",
        "iat": now,
        "exp": now + 60,
    }
    return base | changes


def test_issue_and_verify_round_trip() -> None:
    token = issue(key_id=7, role=Role.OPERATOR, secret=SECRET, ttl_seconds=60)
    claims = verify(token, secret=SECRET)
    assert claims.key_id == 7 and claims.role is Role.OPERATOR
    assert 55 <= claims.expires_at - time.time() <= 61
    assert looks_like_jwt(token) and not looks_like_jwt("nbc_abcd1234_secret")


def test_ttl_is_clamped() -> None:
    token = issue(key_id=1, role=Role.VIEWER, secret=SECRET, ttl_seconds=10**9)
    assert verify(token, secret=SECRET).expires_at - time.time() <= MAX_TTL_SECONDS + 1


def _rsa_token() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode(_claims(), key, algorithm="RS256")


BAD_TOKENS = {
    "expired": lambda: jwt.encode(_claims(exp=int(time.time()) - 60), SECRET, algorithm="HS256"),
    "alg none": lambda: jwt.encode(_claims(), None, algorithm="none"),
    "alg none, signature kept": lambda: _swap_header(
        jwt.encode(_claims(), SECRET, algorithm="HS256"), '{"alg":"none","typ":"JWT"}'
    ),
    "HS512 with the right secret": lambda: jwt.encode(_claims(), SECRET, algorithm="HS512"),
    "RS256": _rsa_token,
    "wrong secret": lambda: jwt.encode(_claims(), "t" * 48, algorithm="HS256"),
    "payload tampered": lambda: _swap_payload(
        jwt.encode(_claims(), SECRET, algorithm="HS256"), _claims(role="admin")
    ),
    "wrong issuer": lambda: jwt.encode(_claims(iss="evil"), SECRET, algorithm="HS256"),
    "no exp": lambda: jwt.encode(
        {k: v for k, v in _claims().items() if k != "exp"}, SECRET, algorithm="HS256"
    ),
    "unknown role": lambda: jwt.encode(_claims(role="root"), SECRET, algorithm="HS256"),
    "sub not a key id": lambda: jwt.encode(_claims(sub="bob"), SECRET, algorithm="HS256"),
    "not yet valid": lambda: jwt.encode(
        _claims(nbf=int(time.time()) + 600), SECRET, algorithm="HS256"
    ),
    "garbage": lambda: "a.b.c",
    "empty signature": lambda: (
        jwt.encode(_claims(), SECRET, algorithm="HS256").rsplit(".", 1)[0] + "."
    ),
}


def _swap_header(token: str, header: str) -> str:
    _, payload, signature = token.split(".")
    return f"{jwt.utils.base64url_encode(header.encode()).decode()}.{payload}.{signature}"


def _swap_payload(token: str, claims: dict[str, object]) -> str:
    header, _, signature = token.split(".")
    body = jwt.utils.base64url_encode(jwt.api_jws.json.dumps(claims).encode()).decode()
    return f"{header}.{body}.{signature}"


@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
def test_bad_tokens_are_refused(kind: str) -> None:
    with pytest.raises(AuthError) as info:
        verify(BAD_TOKENS[kind](), secret=SECRET)
    assert info.value.status_code == 401
    if kind == "expired":
        assert "expired" in info.value.detail


def test_secret_is_generated_once_into_the_data_dir_0600(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    first = jwt_secret(settings)
    assert len(first) >= 32 and jwt_secret(settings) == first
    assert settings.jwt_secret_path.read_text().strip() == first
    assert settings.jwt_secret_path.stat().st_mode & 0o777 == 0o600


def test_secret_from_settings_wins_and_must_be_long(tmp_path: Path) -> None:
    given = Settings(data_dir=tmp_path, jwt_secret="k" * 40)
    assert jwt_secret(given) == "k" * 40
    assert not given.jwt_secret_path.exists()
    with pytest.raises(ValueError, match="at least"):
        jwt_secret(Settings(data_dir=tmp_path, jwt_secret="short"))


def test_processes_starting_together_agree_on_one_secret(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "racy")
    seen: list[str] = []
    threads = [threading.Thread(target=lambda: seen.append(jwt_secret(settings))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(seen)) == 1 and len(seen) == 8
    assert [p.name for p in settings.data_dir.iterdir()] == ["jwt-secret"]
