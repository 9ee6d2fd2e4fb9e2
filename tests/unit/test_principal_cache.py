"""The principal cache: entries bounded by a TTL (and a token's expiry), answered only while its
revocation listener is live, cleared on a revocation, and never refilled by a lookup that raced
one. `resolve` fills it; `cached` reads it without blocking."""

from __future__ import annotations

import time
from typing import Any

import pytest

from service.auth import KEY_PREFIX, Principal, PrincipalCache, hash_key
from service.errors import AuthError
from service.models import Role
from service.tokens import cached, issue, resolve

ALICE = Principal(key_id=1, name="alice", role=Role.OPERATOR)
SECRET = "s" * 64


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def live_cache(ttl: float = 5.0, **kw: Any) -> tuple[PrincipalCache, Clock]:
    clock = Clock()
    cache = PrincipalCache(ttl, clock=clock, **kw)
    cache.set_live(True)
    return cache, clock


def test_a_put_principal_is_served_until_the_ttl_ends() -> None:
    cache, clock = live_cache(ttl=5.0)
    cache.put("nbc_k_secret", ALICE, generation=cache.generation)
    assert cache.get("nbc_k_secret") == ALICE
    assert cache.get("nbc_k_other") is None
    clock.now += 4.9
    assert cache.get("nbc_k_secret") == ALICE
    clock.now += 0.2
    assert cache.get("nbc_k_secret") is None


def test_an_entry_never_outlives_its_until() -> None:
    cache, _ = live_cache(ttl=60.0)
    cache.put("token.a.b", ALICE, generation=cache.generation, until=time.time() - 1)
    assert cache.get("token.a.b") is None  # already expired: not stored
    cache.put("token.c.d", ALICE, generation=cache.generation, until=time.time() + 30)
    assert cache.get("token.c.d") == ALICE


def test_clear_forgets_everything_and_a_racing_lookup_is_not_stored() -> None:
    cache, _ = live_cache()
    cache.put("nbc_k_secret", ALICE, generation=cache.generation)
    before = cache.generation  # a lookup starts...
    cache.clear()  # ...a revocation is heard...
    cache.put("nbc_k_secret", ALICE, generation=before)  # ...and the lookup ends
    assert cache.get("nbc_k_secret") is None


def test_nothing_is_served_or_kept_while_not_live() -> None:
    cache, _ = live_cache()
    cache.put("nbc_k_secret", ALICE, generation=cache.generation)
    cache.set_live(False)
    assert cache.get("nbc_k_secret") is None
    cache.put("nbc_k_secret", ALICE, generation=cache.generation)
    cache.set_live(True)  # back: it starts empty, revocations may have been missed
    assert cache.get("nbc_k_secret") is None


def test_a_zero_ttl_turns_the_cache_off() -> None:
    cache, _ = live_cache(ttl=0)
    cache.put("nbc_k_secret", ALICE, generation=cache.generation)
    assert not cache.enabled and cache.get("nbc_k_secret") is None


def test_memory_is_bounded() -> None:
    cache, clock = live_cache(ttl=5.0, max_entries=3)
    for i in range(3):
        cache.put(f"old{i}", ALICE, generation=cache.generation)
    clock.now += 10  # all three expired: pruned to make room
    cache.put("new", ALICE, generation=cache.generation)
    assert cache.get("new") == ALICE and len(cache._entries) == 1
    for i in range(3):
        cache.put(f"fresh{i}", ALICE, generation=cache.generation)
    assert len(cache._entries) <= 3


class KeyStore:
    """Just the api_keys lookups `resolve` makes, counted."""

    def __init__(self, key: str) -> None:
        self.row = {"id": 1, "name": "alice", "role": "operator", "revoked_at": None}
        self.row["key_hash"] = hash_key(key)
        self.lookups = 0

    def key_by_prefix(self, prefix: str) -> dict[str, Any]:
        self.lookups += 1
        return self.row

    def key_by_id(self, key_id: int) -> dict[str, Any]:
        self.lookups += 1
        return self.row

    def touch_key(self, key_id: int) -> None:
        pass


KEY = f"{KEY_PREFIX}abcd1234_secretpart"


@pytest.mark.parametrize("kind", ["key", "jwt"])
def test_resolve_fills_the_cache_and_a_revocation_empties_it(kind: str) -> None:
    store = KeyStore(KEY)
    cache, _ = live_cache()
    state = {"store": store, "jwt_secret": SECRET, "principals": cache}
    credential = (
        KEY if kind == "key" else issue(key_id=1, role=Role.OPERATOR, secret=SECRET, ttl_seconds=60)
    )
    assert cached(state, credential) is None
    assert resolve(state, credential) == ALICE
    assert cached(state, credential) == ALICE and store.lookups == 1

    store.row["revoked_at"] = "now"
    cache.clear()  # what the listener does on NOTIFY nbcron_keys
    assert cached(state, credential) is None
    with pytest.raises(AuthError):
        resolve(state, credential)


def test_failures_are_not_cached_and_no_cache_means_lookups() -> None:
    store = KeyStore(KEY)
    cache, _ = live_cache()
    state = {"store": store, "jwt_secret": SECRET, "principals": cache}
    with pytest.raises(AuthError):
        resolve(state, KEY + "x")
    assert cached(state, KEY + "x") is None
    bare = {"store": store, "jwt_secret": SECRET}  # e.g. the dashboard's state
    assert resolve(bare, KEY) == ALICE and cached(bare, KEY) is None
