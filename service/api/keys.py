"""/api/keys: create (shown once), list, revoke — admin only."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, delete, get, post
from litestar.params import FromPath, JSONBody
from litestar.status_codes import HTTP_201_CREATED

from service.api.common import StoreDep, audit
from service.api.security import ADMIN_ONLY
from service.auth import create_key
from service.models import ApiKey, Role


class KeyCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    role: Role


class KeyCreated(msgspec.Struct, kw_only=True):
    id: int
    name: str
    role: Role
    key: str  # shown once; only its hash is stored


class KeyController(Controller):
    path = "/api/keys"
    tags = ["keys"]
    guards = ADMIN_ONLY

    @post("/", operation_id="createKey", sync_to_thread=True, status_code=HTTP_201_CREATED)
    def create(
        self, request: Request[Any, Any, Any], store: StoreDep, data: JSONBody[KeyCreate]
    ) -> KeyCreated:
        """Create a key; the response is the only time it is shown."""
        key, key_id = create_key(store, name=data.name, role=data.role)
        audit(request, store, "key.create", "key", str(key_id))
        return KeyCreated(id=key_id, name=data.name, role=data.role, key=key)

    @get("/", operation_id="listKeys", sync_to_thread=True)
    def list_keys(self, store: StoreDep) -> list[ApiKey]:
        """Every key's record (never the key itself)."""
        return store.list_api_keys()

    @delete("/{key_id:int}", operation_id="revokeKey", sync_to_thread=True, status_code=200)
    def revoke(
        self, request: Request[Any, Any, Any], store: StoreDep, key_id: FromPath[int]
    ) -> ApiKey:
        """Revoke a key; it is refused from the next request on."""
        record = store.revoke_api_key_notify(key_id)
        request.app.state.principals.clear()  # here at once; other processes on the NOTIFY
        audit(request, store, "key.revoke", "key", str(key_id))
        return record
