"""API keys: generation, hashing, lookup. Keys are random and long, so a SHA-256 digest is a
safe stored form (no slow hash needed); the visible prefix finds the row.

`PrincipalCache` spares the API a key lookup per request. A revocation reaches it two ways:
`NOTIFY nbcron_keys` (sent by the revoking statement, heard by each API process's listener, see
service/api/revocations.py) clears it within milliseconds, and no entry outlives `ttl` seconds,
the bound when a notification is lost (a key revoked by hand in SQL, a listener reconnecting).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service.errors import AuthError
from service.models import Role
from service.store import Store

KEY_PREFIX = "nbc_"
KEYS_CHANNEL = "nbcron_keys"  # NOTIFY'd on every revocation (queries.sql: revoke_api_key_notify)


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


class PrincipalCache:
    """Principals of recently authenticated credentials (held as SHA-256 digests).

    An entry lives `ttl` seconds at most, and never past the `until` (epoch seconds) it was put
    with, such as a JWT's expiry. The cache answers only while `live`, i.e. while a listener
    hears revocations; going live or not clears it, since notifications may have been missed.
    """

    def __init__(
        self, ttl: float, *, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self.live = False
        self.generation = 0  # bumped by every clear; a lookup that raced one is not stored
        self._entries: dict[str, tuple[Principal, float]] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.ttl > 0 and self.live

    def get(self, credential: str) -> Principal | None:
        """The cached principal for `credential`, or None (unknown, expired, or cache off)."""
        if not self.enabled:
            return None
        entry = self._entries.get(hash_key(credential))
        if entry is None or entry[1] <= self.clock():
            return None
        return entry[0]

    def put(
        self, credential: str, principal: Principal, *, generation: int, until: float | None = None
    ) -> None:
        """Remember `principal` unless the cache was cleared since `generation` was read."""
        lifetime = self.ttl if until is None else min(self.ttl, until - time.time())
        with self._lock:
            if not self.enabled or generation != self.generation or lifetime <= 0:
                return
            if len(self._entries) >= self.max_entries:
                self._prune()
            self._entries[hash_key(credential)] = (principal, self.clock() + lifetime)

    def _prune(self) -> None:
        """Drop expired entries; if that frees nothing, start over (bounded memory)."""
        now = self.clock()
        self._entries = {k: v for k, v in self._entries.items() if v[1] > now}
        if len(self._entries) >= self.max_entries:
            self._entries.clear()

    def clear(self) -> None:
        """Forget every principal (a key was revoked)."""
        with self._lock:
            self.generation += 1
            self._entries.clear()

    def set_live(self, live: bool) -> None:
        """Answer from the cache (True) or not; either way what it held is forgotten."""
        with self._lock:
            self.live = live
            self.generation += 1
            self._entries.clear()


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
