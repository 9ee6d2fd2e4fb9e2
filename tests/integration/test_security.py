"""Security end to end against the real API process: who may call what, tokens, limits, audit,
secrets that never leave the worker unmasked, and error bodies that cannot become HTML.

Modelled on bugs that hit schedulers before: a route without auth, a role that can do more than
it should, a token that outlives its key, secrets in logs, path traversal, reflected XSS.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import psycopg
import pytest
from psycopg import sql

from service.api import create_app
from service.api.security import open_paths
from service.config import Settings
from service.models import Role, RunResult
from service.store import Store
from service.tokens import ISSUER, issue
from tests.support import Stack, free_port, wait_run

METHODS = ("get", "post", "put", "patch", "delete")
SECRET = "hunter2-Very-S3cret-value"
ROLES = [Role.VIEWER, Role.OPERATOR, Role.AUTHOR, Role.ADMIN]


# -- helpers -----------------------------------------------------------------------------


@contextmanager
def extra_api(
    settings: Settings, admin_key: str, logs: Path, label: str, **overrides: Any
) -> Iterator[Stack]:
    """A second API process on the same database, with some settings changed."""
    port = free_port()
    changed = dataclasses.replace(
        settings, api_port=port, api_url=f"http://127.0.0.1:{port}", **overrides
    )
    stack = Stack(settings=changed, key=admin_key, logs=logs)
    stack.start("api", name=label)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(stack.base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise AssertionError(stack.log_text(label))
        yield stack
    finally:
        stack.stop_all()


def operations(schema: dict[str, Any]) -> list[tuple[str, str]]:
    """(METHOD, path) of every operation in an OpenAPI document."""
    return [
        (method.upper(), path)
        for path, item in schema["paths"].items()
        for method in item
        if method in METHODS
    ]


def make_key(admin: httpx.Client, role: Role, name: str | None = None) -> dict[str, Any]:
    resp = admin.post("/api/keys", json={"name": name or f"{role.value}-key", "role": role.value})
    assert resp.status_code == 201, resp.text
    return resp.json()


def jwt_secret_of(stack: Stack) -> str:
    return stack.settings.jwt_secret_path.read_text().strip()


def assert_problem(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/problem+json"), resp.headers
    assert resp.headers["x-content-type-options"] == "nosniff"
    body = resp.json()
    assert body["status"] == status and body["detail"]
    return body


# -- the auth structure: every route closed, twice ------------------------------------------


def test_every_documented_route_needs_auth_except_health(api_stack: Stack) -> None:
    """Walk the OpenAPI document: each operation declares security and refuses anonymous calls."""
    with api_stack.client() as api:
        schema = api.get("/schema/openapi.json").json()
    global_security = schema.get("security")
    assert global_security, "the document must declare security for every operation"
    open_ops = []
    with api_stack.client(key="") as anon:
        for method, path in operations(schema):
            op = schema["paths"][path][method.lower()]
            effective = op.get("security", global_security)
            concrete = path.replace("{ref}", "x").replace("{name}", "x")
            concrete = concrete.replace("{run_id}", "1").replace("{key_id}", "1")
            status = anon.request(method, concrete).status_code
            if not effective:
                open_ops.append((method, path))
                continue
            assert status == 401, f"{method} {path} answered {status} without credentials"
            for code in ("401", "403", "429"):
                assert code in op["responses"], f"{method} {path} does not document {code}"
    assert open_ops == [("GET", "/health")], open_ops


def test_every_route_handler_carries_a_role_guard(settings: Settings) -> None:
    """The second lock: besides the middleware, each handler has a guard naming its role."""
    app = create_app(settings)
    unguarded = []
    for route in app.routes:
        for handler in getattr(route, "route_handlers", []):
            methods = set(getattr(handler, "http_methods", ())) - {"OPTIONS", "HEAD"}
            if not methods or route.path == "/health" or route.path.startswith("/schema"):
                continue
            guards = [getattr(g, "func", g) for g in handler.resolve_guards()]  # unwrap
            roles = [getattr(g, "required_role", None) for g in guards]
            if not any(isinstance(r, Role) for r in roles):
                unguarded.append((sorted(methods), route.path))
    assert unguarded == []
    assert open_paths(settings) == ["^/health$", "^/schema"]
    public = dataclasses.replace(settings, metrics_public=True)
    assert open_paths(public) == ["^/health$", "^/schema", "^/metrics$"]


def test_metrics_is_open_only_when_configured_public(
    api_stack: Stack, settings: Settings, admin_key: str, tmp_path: Path
) -> None:
    with api_stack.client() as api:
        paths = api.get("/schema/openapi.json").json()["paths"]
    if "/metrics" not in paths:
        pytest.fail("GET /metrics is part of the contract but not in the OpenAPI document")
    with api_stack.client(key="") as anon:
        assert anon.get("/metrics").status_code == 401
        assert anon.get("/api/system/metrics").status_code == 401
    with (
        extra_api(settings, admin_key, tmp_path, "api-public", metrics_public=True) as public,
        public.client(key="") as anon,
    ):
        assert anon.get("/metrics").status_code == 200
        assert anon.get("/api/tasks").status_code == 401
        schema = public.client().get("/schema/openapi.json").json()
        assert schema["paths"]["/metrics"]["get"]["security"] == []


# -- the role matrix ------------------------------------------------------------------------


@dataclass
class Case:
    """One operation as the matrix calls it."""

    method: str
    path: str  # as in the OpenAPI document
    role: Role  # the least role allowed
    ok: tuple[int, ...]  # statuses that mean "allowed and done"
    body: Callable[[], Any] | None = None
    label: str = ""


@dataclass
class World:
    """Objects the matrix calls operations on; destructive ones are made fresh per call."""

    admin: httpx.Client
    store: Store
    counter: Iterator[int] = field(default_factory=itertools.count)
    task: str = "matrix"
    run_id: int = 0

    def setup(self) -> None:
        body = {"name": self.task, "executor": "shell", "command": "true"}
        assert self.admin.post("/api/tasks", json=body).status_code == 201
        self.run_id = self.trigger()
        self.store.add_artifact(self.run_id, "report.html", "text/html", b"<p>report</p>")
        done = self.trigger()  # a succeeded run with a report, for GET /api/tasks/{ref}/report
        assert self.store.claim_run(done, worker="matrix") is not None
        self.store.finish_runs([RunResult(run_id=done, status="succeeded", exit_code=0)])
        self.store.add_artifact(done, "report.html", "text/html", b"<p>latest</p>")

    def trigger(self) -> int:
        resp = self.admin.post(f"/api/tasks/{self.task}/trigger")
        assert resp.status_code == 202, resp.text
        return int(resp.json()["id"])

    def fresh_task(self) -> str:
        name = f"doomed-{next(self.counter)}"
        body = {"name": name, "executor": "shell", "command": "true"}
        assert self.admin.post("/api/tasks", json=body).status_code == 201
        return name

    def concrete(self, case: Case) -> str:
        path = case.path
        if case.method == "DELETE" and "{ref}" in path:
            path = path.replace("{ref}", self.fresh_task())
        if case.method == "POST" and path.endswith("/cancel"):
            path = path.replace("{run_id}", str(self.trigger()))
        if "{key_id}" in path:
            path = path.replace("{key_id}", str(make_key(self.admin, Role.VIEWER)["id"]))
        return (
            path.replace("{ref}", self.task)
            .replace("{run_id}", str(self.run_id))
            .replace("{name}", "report.html")
        )


def _task_body() -> dict[str, Any]:
    _task_body.n += 1  # type: ignore[attr-defined]
    return {"name": f"new-{_task_body.n}", "executor": "shell", "command": "true"}  # type: ignore[attr-defined]


_task_body.n = 0  # type: ignore[attr-defined]

CASES = [
    Case("GET", "/api/tasks", Role.VIEWER, (200,)),
    Case("POST", "/api/tasks", Role.AUTHOR, (201,), body=_task_body),
    Case("GET", "/api/tasks/{ref}", Role.VIEWER, (200,)),
    Case(
        "PATCH",
        "/api/tasks/{ref}",
        Role.OPERATOR,
        (200,),
        body=lambda: {"enabled": True},
        label="pause/resume",
    ),
    Case(
        "PATCH",
        "/api/tasks/{ref}",
        Role.AUTHOR,
        (200,),
        body=lambda: {"description": "edited", "enabled": True},
        label="edit",
    ),
    Case("DELETE", "/api/tasks/{ref}", Role.AUTHOR, (204,)),
    Case("POST", "/api/tasks/{ref}/trigger", Role.OPERATOR, (202,)),
    Case("GET", "/api/tasks/{ref}/runs", Role.VIEWER, (200,)),
    Case("GET", "/api/tasks/{ref}/report", Role.VIEWER, (200,)),
    Case("GET", "/api/runs", Role.VIEWER, (200,)),
    Case("GET", "/api/runs/{run_id}", Role.VIEWER, (200,)),
    Case("POST", "/api/runs/{run_id}/cancel", Role.OPERATOR, (200,)),
    Case("GET", "/api/runs/{run_id}/logs", Role.VIEWER, (200,)),
    Case("GET", "/api/runs/{run_id}/artifacts", Role.VIEWER, (200,)),
    Case("GET", "/api/runs/{run_id}/artifacts/{name}", Role.VIEWER, (200,)),
    Case("GET", "/api/workers", Role.VIEWER, (200,)),
    Case("GET", "/api/system/health", Role.VIEWER, (200, 503)),  # 503: no worker here
    Case("GET", "/api/system/stats", Role.VIEWER, (200,)),
    Case("GET", "/api/system/metrics", Role.VIEWER, (200,)),
    Case("GET", "/metrics", Role.VIEWER, (200,)),
    Case("POST", "/api/keys", Role.ADMIN, (201,), body=lambda: {"name": "k", "role": "viewer"}),
    Case("GET", "/api/keys", Role.ADMIN, (200,)),
    Case("DELETE", "/api/keys/{key_id}", Role.ADMIN, (200,)),
    Case("POST", "/api/auth/token", Role.VIEWER, (200,)),
    Case("GET", "/api/audit", Role.ADMIN, (200,)),
]


@pytest.fixture
def identities(api_stack: Stack, store: Store) -> dict[str, str | None]:
    """Credentials for each kind of caller the matrix tries."""
    secret = jwt_secret_of(api_stack)
    with api_stack.client() as admin:
        keys = {role: make_key(admin, role) for role in ROLES if role is not Role.ADMIN}
        revoked = make_key(admin, Role.ADMIN, "revoked")
        assert admin.delete(f"/api/keys/{revoked['id']}").status_code == 200
        token = admin.post(
            "/api/auth/token", headers={"Authorization": f"Bearer {keys[Role.OPERATOR]['key']}"}
        )
    expired = issue(
        key_id=1, role=Role.ADMIN, secret=secret, ttl_seconds=60, now=time.time() - 3600
    )
    forged = issue(key_id=1, role=Role.ADMIN, secret="x" * 48, ttl_seconds=600)
    return {
        "anonymous": None,
        "bad token": forged,
        "bad key": "nbc_deadbeef_" + "x" * 43,
        "expired token": expired,
        "revoked key": revoked["key"],
        "viewer": keys[Role.VIEWER]["key"],
        "operator": keys[Role.OPERATOR]["key"],
        "operator (JWT)": token.json()["access_token"],
        "author": keys[Role.AUTHOR]["key"],
        "admin": api_stack.key,
    }


ROLE_OF = {
    "viewer": Role.VIEWER,
    "operator": Role.OPERATOR,
    "operator (JWT)": Role.OPERATOR,
    "author": Role.AUTHOR,
    "admin": Role.ADMIN,
}


def expected_status(identity: str, case: Case) -> tuple[int, ...]:
    role = ROLE_OF.get(identity)
    if role is None or (identity.endswith("(JWT)") and case.path == "/api/auth/token"):
        return (401,)  # a token is never exchanged for a fresh one: only keys mint tokens
    return case.ok if role.allows(case.role) else (403,)


def test_role_matrix_every_operation_every_identity(
    api_stack: Stack, store: Store, identities: dict[str, str | None]
) -> None:
    with api_stack.client() as admin:
        documented = set(operations(admin.get("/schema/openapi.json").json()))
        world = World(admin=admin, store=store)
        world.setup()
        covered = {(c.method, c.path) for c in CASES}
        missing = documented - covered - {("GET", "/health")}
        assert not missing, f"add these operations to the role matrix: {sorted(missing)}"
        failures = []
        for case, (who, credential) in itertools.product(CASES, identities.items()):
            if (case.method, case.path) not in documented:
                failures.append(f"{case.method} {case.path} is not in the OpenAPI document")
                continue
            headers = {"Authorization": f"Bearer {credential}"} if credential else {}
            kwargs = {"json": case.body()} if case.body else {}
            resp = httpx.request(
                case.method,
                api_stack.base + world.concrete(case),
                headers=headers,
                timeout=30,
                **kwargs,
            )
            wanted = expected_status(who, case)
            if resp.status_code not in wanted:
                failures.append(
                    f"{case.method} {case.path} {case.label} as {who}: {resp.status_code}"
                    f" (wanted {wanted}) {resp.text[:200]}"
                )
    assert failures == [], "\n".join(failures)


def test_operator_may_pause_and_resume_but_not_edit(api_stack: Stack) -> None:
    with api_stack.client() as admin:
        admin.post("/api/tasks", json={"name": "t", "executor": "shell", "command": "true"})
        operator = make_key(admin, Role.OPERATOR)["key"]
    with api_stack.client(key=operator) as op:
        assert op.patch("/api/tasks/t", json={"enabled": False}).json()["enabled"] is False
        assert op.patch("/api/tasks/t", json={"enabled": True}).json()["enabled"] is True
        for body in ({"command": "rm -rf /"}, {"enabled": False, "env": {"A": "b"}}):
            body_ = assert_problem(op.patch("/api/tasks/t", json=body), 403)
            assert "author" in body_["detail"]
        assert (
            op.post(
                "/api/tasks", json={"name": "u", "executor": "shell", "command": "x"}
            ).status_code
            == 403
        )
        assert op.delete("/api/tasks/t").status_code == 403
    with api_stack.client() as admin:
        task = admin.get("/api/tasks/t").json()
    assert task["command"] == "true" and task["env"] == {}


# -- keys and tokens -------------------------------------------------------------------


def test_keys_have_a_visible_prefix_and_record_last_use(api_stack: Stack) -> None:
    with api_stack.client() as admin:
        created = make_key(admin, Role.VIEWER, "ci")
        listed = {k["id"]: k for k in admin.get("/api/keys").json()}
    record = listed[created["id"]]
    assert created["key"].startswith(f"nbc_{record['prefix']}_")
    assert record["last_used_at"] is None and record["revoked_at"] is None
    assert all("key" not in k and "key_hash" not in k for k in listed.values())
    with api_stack.client(key=created["key"]) as viewer:
        assert viewer.get("/api/tasks").status_code == 200
    with api_stack.client() as admin:
        used = {k["id"]: k for k in admin.get("/api/keys").json()}[created["id"]]
    assert used["last_used_at"] is not None


def test_token_exchange_and_everything_that_must_refuse_a_token(api_stack: Stack) -> None:
    secret = jwt_secret_of(api_stack)
    assert api_stack.settings.jwt_secret_path.stat().st_mode & 0o777 == 0o600
    with api_stack.client() as admin:
        viewer = make_key(admin, Role.VIEWER)
    with api_stack.client(key=viewer["key"]) as client:
        got = client.post("/api/auth/token")
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["token_type"] == "Bearer" and 0 < body["expires_in"] <= 900
    token = body["access_token"]
    claims = jwt.decode(token, secret, algorithms=["HS256"], issuer=ISSUER)
    assert claims["sub"] == str(viewer["id"]) and claims["role"] == "viewer"

    with api_stack.client(key=token) as client:
        assert client.get("/api/tasks").status_code == 200
        assert client.post("/api/tasks", json={"name": "x"}).status_code == 403
        assert_problem(client.post("/api/auth/token"), 401)  # no token-for-token renewals
    with api_stack.client(key="") as anon:
        assert anon.get("/api/tasks", headers={"X-API-Key": viewer["key"]}).status_code == 200

    payload = dict(claims)
    forged = [
        jwt.encode(payload | {"role": "admin"}, "wrong-secret-" * 4, algorithm="HS256"),
        jwt.encode(payload, secret, algorithm="HS512"),  # right secret, wrong algorithm
        jwt.encode(payload, None, algorithm="none"),  # alg: none
        _tamper(token, payload | {"role": "admin"}),  # payload changed, signature kept
        jwt.encode(payload | {"exp": int(time.time()) - 60}, secret, algorithm="HS256"),
        jwt.encode(payload | {"iss": "someone-else"}, secret, algorithm="HS256"),
        jwt.encode({k: v for k, v in payload.items() if k != "exp"}, secret, algorithm="HS256"),
        "not.a.jwt",
    ]
    for bad in forged:
        with api_stack.client(key=bad) as client:
            assert_problem(client.get("/api/tasks"), 401)

    with api_stack.client() as admin:
        assert admin.delete(f"/api/keys/{viewer['id']}").status_code == 200
    with api_stack.client(key=token) as client:
        assert_problem(client.get("/api/tasks"), 401)  # revoking the key ends its tokens at once


def _tamper(token: str, payload: dict[str, Any]) -> str:
    header, _, signature = token.split(".")
    body = jwt.utils.base64url_encode(jwt.api_jws.json.dumps(payload).encode()).decode()
    return f"{header}.{body}.{signature}"


# -- limits and hygiene ------------------------------------------------------------------


def test_rate_limit_per_key_answers_429_with_retry_after(
    api_stack: Stack, settings: Settings, admin_key: str, tmp_path: Path
) -> None:
    with api_stack.client() as admin:
        other = make_key(admin, Role.VIEWER)["key"]
    with extra_api(settings, admin_key, tmp_path, "api-limited", rate_limit_per_minute=5) as lim:
        with lim.client() as admin:
            statuses = [admin.get("/api/tasks").status_code for _ in range(5)]
            assert statuses == [200] * 5
            limited = admin.get("/api/tasks")
            body = assert_problem(limited, 429)
            assert 1 <= int(limited.headers["retry-after"]) <= 12
            assert "rate limit" in body["detail"]
        with lim.client(key=other) as viewer:  # per key: another key is not affected
            assert viewer.get("/api/tasks").status_code == 200
        assert httpx.get(lim.base + "/health").status_code == 200


def test_bodies_over_one_mib_get_413(api_stack: Stack) -> None:
    big = {"name": "big", "executor": "shell", "command": "true", "description": "x" * (1 << 20)}
    with api_stack.client() as api:
        assert_problem(api.post("/api/tasks", json=big), 413)

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while streaming
            yield b'{"name": "big", "executor": "shell", "command": "'
            for _ in range(17):
                yield b"y" * 65536
            yield b'"}'

        resp = api.post(
            "/api/tasks", content=chunks(), headers={"content-type": "application/json"}
        )
        assert_problem(resp, 413)
        assert api.get("/api/tasks").json()["items"] == []


@pytest.mark.parametrize("path", ["/api/tasks", "/api/runs", "/api/audit", "/api/tasks/t/runs"])
def test_limit_is_capped_at_500(api_stack: Stack, path: str) -> None:
    with api_stack.client() as api:
        api.post("/api/tasks", json={"name": "t", "executor": "shell", "command": "true"})
        assert api.get(path, params={"limit": 500}).status_code == 200
        for bad in (501, 100000, 0, -1):
            assert_problem(api.get(path, params={"limit": bad}), 422)
        assert_problem(api.get(path, params={"cursor": 2**64}), 422)


def test_cors_is_off_by_default_and_exact_when_configured(
    api_stack: Stack, settings: Settings, admin_key: str, tmp_path: Path
) -> None:
    preflight = {
        "Origin": "https://evil.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    with api_stack.client() as api:
        assert (
            "access-control-allow-origin"
            not in api.options("/api/tasks", headers=preflight).headers
        )
        got = api.get("/api/tasks", headers={"Origin": "https://evil.example"})
        assert got.status_code == 200 and "access-control-allow-origin" not in got.headers
    origin = "https://app.example"
    with (
        extra_api(settings, admin_key, tmp_path, "api-cors", cors_origins=(origin,)) as cors,
        cors.client() as api,
    ):
        ok = api.options("/api/tasks", headers=preflight | {"Origin": origin})
        assert ok.status_code in (200, 204)
        assert ok.headers["access-control-allow-origin"] == origin
        assert "authorization" in ok.headers["access-control-allow-headers"].lower()
        denied = api.options("/api/tasks", headers=preflight)
        assert denied.headers.get("access-control-allow-origin") != "https://evil.example"
        plain = api.get("/api/tasks", headers={"Origin": origin})
        assert plain.headers["access-control-allow-origin"] == origin
        assert "access-control-allow-credentials" not in plain.headers


def test_error_bodies_are_never_html(api_stack: Stack) -> None:
    payload = "<script>alert(1)</script>"
    with api_stack.client() as api:
        responses = [
            api.get(f"/api/tasks/{payload}"),
            api.get(f"/api/runs?task={payload}"),
            api.post("/api/tasks", json={"name": payload, "executor": "shell", "command": "x"}),
            api.post("/api/tasks", json={"name": "x", "executor": payload, "command": "x"}),
            api.get(f"/nope/{payload}"),
            api.request("PUT", "/api/tasks"),
            api.get("/api/tasks", params={"limit": payload}),
        ]
        with api_stack.client(key=payload) as bad:
            responses.append(bad.get("/api/tasks"))
    for resp in responses:
        assert 400 <= resp.status_code < 500, resp.text
        assert resp.headers["content-type"].startswith("application/problem+json"), resp.headers
        assert resp.headers["x-content-type-options"] == "nosniff"
        resp.json()  # a JSON document, not markup


def test_artifact_names_cannot_escape(api_stack: Stack, store: Store) -> None:
    with api_stack.client() as api:
        api.post("/api/tasks", json={"name": "t", "executor": "shell", "command": "true"})
        run_id = api.post("/api/tasks/t/trigger").json()["id"]
        store.add_artifact(run_id, "report.html", "text/html", b"<p>ok</p>")
        base = f"/api/runs/{run_id}/artifacts"
        assert api.get(f"{base}/report.html").status_code == 200
        attempts = [
            "..%2F..%2F..%2Fetc%2Fpasswd",
            "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
            "%2E%2E",
            ".report.html",
            "%2Fetc%2Fpasswd",
            "report.html%2F..%2F..%2Fpasswd",
            "..%5C..%5Cwin.ini",
            "report.html.bak",  # a sibling prefix is not the same name
            "report",
            "report.html%00.txt",
            "~%2F.ssh%2Fid_rsa",
        ]
        for name in attempts:
            resp = api.get(f"{base}/{name}")
            assert resp.status_code in (404, 422), (name, resp.status_code, resp.text)
            assert "root:" not in resp.text and "<p>ok</p>" not in resp.text
            assert resp.headers["content-type"].startswith("application/problem+json")
        other_run = api.post("/api/tasks/t/trigger").json()["id"]
        assert api.get(f"/api/runs/{other_run}/artifacts/report.html").status_code == 404


# -- audit ---------------------------------------------------------------------------------


def test_audit_records_every_change_and_trigger_for_admins_only(api_stack: Stack) -> None:
    with api_stack.client() as admin:
        author = make_key(admin, Role.AUTHOR, "alice")
        operator = make_key(admin, Role.OPERATOR, "olivia")
    with api_stack.client(key=author["key"]) as alice:
        task = alice.post(
            "/api/tasks", json={"name": "t", "executor": "shell", "command": "true"}
        ).json()
        alice.patch("/api/tasks/t", json={"description": "d"})
    with api_stack.client(key=operator["key"]) as olivia:
        olivia.patch("/api/tasks/t", json={"enabled": False})
        run = olivia.post("/api/tasks/t/trigger").json()
        olivia.post(f"/api/runs/{run['id']}/cancel")
        assert olivia.get("/api/audit").status_code == 403
    with api_stack.client(key=author["key"]) as alice:
        assert alice.get("/api/audit").status_code == 403
        alice.delete("/api/tasks/t")
    with api_stack.client() as admin:
        admin.delete(f"/api/keys/{operator['id']}")
        entries = admin.get("/api/audit", params={"limit": 500}).json()["items"]
        only_triggers = admin.get("/api/audit", params={"action": "task.trigger"}).json()
    seen = [(e["actor"], e["action"], e["object_type"], e["object_id"]) for e in entries][::-1]
    tid, rid = str(task["id"]), str(run["id"])
    assert seen[-8:] == [
        ("admin (first start)", "key.create", "key", str(operator["id"])),
        ("alice", "task.create", "task", tid),
        ("alice", "task.update", "task", tid),
        ("olivia", "task.update", "task", tid),
        ("olivia", "task.trigger", "task", tid),
        ("olivia", "run.cancel", "run", rid),
        ("alice", "task.delete", "task", tid),
        ("admin (first start)", "key.revoke", "key", str(operator["id"])),
    ]
    assert entries[4]["detail"]["fields"] == ["enabled"]  # what the operator changed
    assert all(e["remote"] == "127.0.0.1" and e["at"] for e in entries)
    assert [e["action"] for e in only_triggers["items"]] == ["task.trigger"]


# -- secrets ---------------------------------------------------------------------------------


def _tables_containing(database_url: str, needle: str) -> list[str]:
    """Every table with a row whose text form contains `needle`."""
    found = []
    with psycopg.connect(database_url) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )
        ]
        for table in tables:
            query = sql.SQL("SELECT count(*) FROM {} t WHERE t::text LIKE %s").format(
                sql.Identifier(table)
            )
            row = conn.execute(query, (f"%{needle}%",)).fetchone()
            if row and row[0]:
                found.append(table)
    return found


def test_a_task_that_prints_its_secret_shows_only_stars(stack: Stack) -> None:
    command = (
        'echo "token=$MY_SECRET"; '
        'printf "%s" "${MY_SECRET%????????}"; sleep 0.8; '  # the value split across two flushes
        'printf "%s\\n" "${MY_SECRET#"${MY_SECRET%????????}"}"; '
        '[ "${#MY_SECRET}" -eq 25 ] && echo "length ok"; '
        'echo "failing with $MY_SECRET" >&2; exit 3'
    )
    body = {
        "name": "leaky",
        "executor": "shell",
        "command": command,
        "env": {"PLAIN": "visible"},
        "secrets": {"MY_SECRET": SECRET},
    }
    with stack.client() as api:
        created = api.post("/api/tasks", json=body)
        assert created.status_code == 201, created.text
        assert created.json()["secrets"] == {"MY_SECRET": "***"}
        run = wait_run(api, api.post("/api/tasks/leaky/trigger").json()["id"])
        logs = api.get(f"/api/runs/{run['id']}/logs").json()["text"]
        seen = [
            created.text,
            api.get("/api/tasks/leaky").text,
            api.get("/api/tasks").text,
            api.get(f"/api/runs/{run['id']}").text,
            api.get("/api/runs").text,
            api.get("/api/tasks/leaky/runs").text,
            logs,
            api.get("/api/audit").text,
        ]
    assert run["status"] == "failed" and run["exit_code"] == 3
    assert "token=***" in logs and "length ok" in logs, logs
    assert logs.count("***") == 3, logs  # the split value was held back and masked whole
    assert "failing with ***" in run["error"]
    for text in seen:
        assert SECRET not in text and SECRET[:12] not in text
    assert _tables_containing(stack.settings.database_url or "", SECRET) == []
    assert _tables_containing(stack.settings.database_url or "", SECRET[:12]) == []
    assert stack.settings.secrets_key_path.stat().st_mode & 0o777 == 0o600


def test_secrets_can_be_kept_changed_and_removed(stack: Stack) -> None:
    with stack.client() as api:
        body = {"name": "s", "executor": "shell", "command": 'echo "[$A_SECRET][$B_SECRET]"'}
        api.post(
            "/api/tasks",
            json=body | {"secrets": {"A_SECRET": "alpha-1234", "B_SECRET": "beta-5678"}},
        )
        shown = api.get("/api/tasks/s").json()
        assert shown["secrets"] == {"A_SECRET": "***", "B_SECRET": "***"}
        # sending back what GET showed changes nothing
        resent = {
            k: v
            for k, v in shown.items()
            if k not in ("id", "created_at", "updated_at", "next_fire_at", "next_fire_times")
        }
        assert api.patch("/api/tasks/s", json=resent).status_code == 200
        changed = api.patch(
            "/api/tasks/s", json={"secrets": {"A_SECRET": "gamma-9999", "B_SECRET": None}}
        )
        assert changed.status_code == 200 and changed.json()["secrets"] == {"A_SECRET": "***"}
        run = wait_run(api, api.post("/api/tasks/s/trigger").json()["id"])
        text = api.get(f"/api/runs/{run['id']}/logs").json()["text"]
        assert text.strip() == "[***][]", text
        clash = api.patch("/api/tasks/s", json={"env": {"A_SECRET": "plain"}})
        assert assert_problem(clash, 422)["field"] == "secrets"
        for bad in (
            {"secrets": {"bad-name": "value-1234"}},
            {"secrets": {"X": "abc"}},
            {"secrets": ["X"]},
            {"secrets": {"NEW": "***"}},
        ):
            assert_problem(api.patch("/api/tasks/s", json=bad), 422)
        assert_problem(api.post("/api/tasks", json=body | {"name": "s2", "secrets": {"X": 5}}), 422)


def test_trigger_parameters_cannot_inject_commands(stack: Stack, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with stack.client() as api:
        api.post(
            "/api/tasks",
            json={"name": "p", "executor": "shell", "command": 'echo "$NBCRON_PARAM_X"'},
        )
        evil = f"$(touch {marker}); `touch {marker}`; touch {marker}"
        run = wait_run(
            api, api.post("/api/tasks/p/trigger", json={"parameters": {"x": evil}}).json()["id"]
        )
        text = api.get(f"/api/runs/{run['id']}/logs").json()["text"]
        assert_problem(api.post("/api/tasks/p/trigger", json={"parameters": {"x; rm": 1}}), 422)
    assert run["status"] == "succeeded" and text.strip() == evil
    assert not marker.exists()


def test_run_logs_are_capped(api_stack: Stack) -> None:
    """A task cannot fill the database through its output: the log stops at log_max_bytes."""
    api_stack.start("dispatcher")
    api_stack.start("worker", NBCRON_LOG_MAX_BYTES="4096")
    with api_stack.client() as api:
        command = "yes 0123456789abcdef | head -c 200000"
        api.post("/api/tasks", json={"name": "loud", "executor": "shell", "command": command})
        run = wait_run(api, api.post("/api/tasks/loud/trigger").json()["id"])
        text = api.get(f"/api/runs/{run['id']}/logs").json()["text"]
    assert run["status"] == "succeeded", run
    assert "output truncated" in text
    assert len(text.encode()) < 4096 + 200
