"""API keys: generation, hashing, lookup. Keys are random and long, so a SHA-256 digest is a
safe stored form (no slow hash needed); the visible prefix finds the row."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from service.errors import AuthError
from service.models import Role
from service.store import Store

KEY_PREFIX = "nbc_"


@dataclass(frozen=True, kw_only=True)
class Principal:
    """Who is calling: the key's id, name and role."""

    key_id: int
    name: str
    role: Role


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh key and its visible prefix: `nbc_<prefix>_<secret>`."""
    prefix = secrets.token_hex(4)
    return f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}", prefix


def create_key(store: Store, *, name: str, role: Role) -> tuple[str, int]:
    """Store a new key (hashed) and return it once, with its id."""
    key, prefix = new_key()
    record = store.insert_api_key(name=name, role=role, prefix=prefix, key_hash=hash_key(key))
    return key, record.id


def _prefix_of(key: str) -> str | None:
    if not key.startswith(KEY_PREFIX):
        return None
    parts = key[len(KEY_PREFIX) :].split("_", 1)
    return parts[0] if len(parts) == 2 else None


def authenticate(store: Store, key: str) -> Principal:
    """The principal for a key, or AuthError for a missing, wrong or revoked one."""
    prefix = _prefix_of(key)
    row = store.key_by_prefix(prefix) if prefix else None
    if row is None or not hmac.compare_digest(row["key_hash"], hash_key(key)):
        raise AuthError("invalid API key")
    if row["revoked_at"] is not None:
        raise AuthError("this API key has been revoked")
    _touch(store, row["id"])
    return Principal(key_id=row["id"], name=row["name"], role=Role(row["role"]))


_TOUCH_EVERY_SECONDS = 60.0
_touched: dict[int, float] = {}


def _touch(store: Store, key_id: int) -> None:
    """Keep last_used_at fresh to the minute without a write on every request."""
    now = time.monotonic()
    if now - _touched.get(key_id, -_TOUCH_EVERY_SECONDS) >= _TOUCH_EVERY_SECONDS:
        _touched[key_id] = now
        store.touch_key(key_id)


def write_secret_file(path: Path, content: str) -> None:
    """Write a file readable by its owner only (0600), created that way from the start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(content + "\n")
    os.chmod(path, 0o600)


def ensure_admin_key(store: Store, path: Path) -> bool:
    """On first start, create an admin key and write it to `path`; True when one was made."""
    if path.exists() and store.count_admin_keys() > 0:
        return False
    key, _ = create_key(store, name="admin (first start)", role=Role.ADMIN)
    write_secret_file(path, key)
    return True
