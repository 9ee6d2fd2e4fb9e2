"""/api/auth/token: exchange the caller's API key for a short-lived JWT."""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from litestar import Controller, Request, post
from litestar.status_codes import HTTP_200_OK

from service.api.common import StoreDep, audit
from service.api.security import CAN_READ, caller
from service.errors import AuthError
from service.tokens import issue, looks_like_jwt, token_ttl


class TokenResponse(msgspec.Struct, kw_only=True):
    """An OAuth-style bearer token: send it as `Authorization: Bearer <access_token>`."""

    access_token: str
    token_type: Literal["Bearer"] = "Bearer"
    expires_in: int  # seconds


class AuthController(Controller):
    path = "/api/auth"
    tags = ["auth"]
    guards = CAN_READ

    @post("/token", operation_id="createToken", sync_to_thread=True, status_code=HTTP_200_OK)
    def token(self, request: Request[Any, Any, Any], store: StoreDep) -> TokenResponse:
        """A JWT for the calling key, with the key's role; revoking the key ends it too."""
        if looks_like_jwt(str(request.auth)):
            raise AuthError("a token cannot be exchanged for another; send the API key itself")
        principal = caller(request)
        settings = request.app.state.settings
        ttl = token_ttl(settings.token_ttl_seconds)
        token = issue(
            key_id=principal.key_id,
            role=principal.role,
            secret=request.app.state.jwt_secret,
            ttl_seconds=ttl,
        )
        audit(request, store, "auth.token", "key", str(principal.key_id), expires_in=ttl)
        return TokenResponse(access_token=token, expires_in=ttl)
