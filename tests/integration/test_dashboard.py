"""The dashboard end to end: a real `nbcron dashboard` process on a real database, driven in
Debian's Chromium through Playwright (plus its SQL reads checked directly against Postgres).

Screenshots land in test-artifacts/dashboard/.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest
from playwright.sync_api import Browser, Page, expect

from dashboards import data
from dashboards.data import Filters
from dashboards.views import TaskView
from service.auth import Principal
from service.config import Settings
from service.models import Role
from service.store import Store
from service.tokens import issue, jwt_secret
from tests.integration.dashboard_support import (
    XSS,
    Watch,
    add_task,
    key_for,
    launch_browser,
    login,
    shot,
    sql,
    start_dashboard,
    wait_text,
)
from tests.support import Stack, wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with launch_browser() as b:
        yield b


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture
def dashboard(settings: Settings, admin_key: str, tmp_path: Path) -> Iterator[str]:
    """Only the dashboard process (no API, dispatcher or worker)."""
    stack = Stack(settings=settings, key=admin_key, logs=tmp_path)
    try:
        yield start_dashboard(stack)
    finally:
        stack.stop_all()


def _history(database_url: str, task_id: int, rows: int = 200) -> None:
    """Finished runs of a task spread over the last 20 hours (70% succeed)."""
    sql(
        database_url,
        """
        INSERT INTO runs (task_id, status, trigger, queued_at, started_at, finished_at, exit_code)
        SELECT %s, CASE WHEN g %% 10 < 7 THEN 'succeeded' WHEN g %% 10 < 9 THEN 'failed'
                        ELSE 'timed_out' END,
               'schedule', ts, ts + interval '1 second', ts + (1 + g %% 30) * interval '1 second',
               CASE WHEN g %% 10 < 7 THEN 0 ELSE 1 END
        FROM generate_series(1, %s) g, LATERAL (SELECT now() - g * interval '6 minutes' AS ts) t
        """,
        (task_id, rows),
    )


# -- access --------------------------------------------------------------------------------


def test_anonymous_visitor_gets_only_the_login(dashboard: str, page: Page) -> None:
    for path in ("/", "/?task=x", "/?run=1", "/artifacts/1/report.html"):
        resp = httpx.get(dashboard + path, follow_redirects=False)
        assert resp.status_code in (302, 403), (path, resp.status_code)
        if resp.status_code == 302:
            location = resp.headers["location"]
            assert location.lstrip(".").startswith("/login?"), location
    page.goto(dashboard + "/")
    expect(page.locator("#key")).to_be_visible()
    assert page.url.startswith(dashboard + "/login")
    assert page.locator("canvas").count() == 0
    shot(page, "01-login")


def test_wrong_or_revoked_key_is_refused(
    dashboard: str, page: Page, store: Store, admin_key: str
) -> None:
    page.goto(dashboard + "/login")
    page.fill("#key", "nbc_dead_beef")
    page.click("#login-button")
    expect(page.locator("#login-error")).to_contain_text("not valid")
    key = key_for(store, Role.VIEWER)
    login(page, dashboard, key)
    store.revoke_api_key(store.list_api_keys()[-1].id)
    page.reload()
    expect(page.locator("#key")).to_be_visible()


def test_a_token_from_the_api_logs_in_too(
    dashboard: str, page: Page, store: Store, settings: Settings
) -> None:
    key = key_for(store, Role.OPERATOR)
    record = store.list_api_keys()[-1]
    token = issue(key_id=record.id, role=Role.OPERATOR, secret=jwt_secret(settings), ttl_seconds=60)
    login(page, dashboard, token)
    expect(page.locator("#whoami")).to_have_text("dashboard-operator (operator)")
    assert key  # the key itself never reached the browser
    assert key not in page.content() and token not in page.content()


# -- overview ------------------------------------------------------------------------------


def test_overview_renders_charts_without_console_errors(
    dashboard: str, page: Page, store: Store, settings: Settings, admin_key: str
) -> None:
    etl = add_task(store, name="etl-load", tags=["etl"], schedule="*/30 * * * *")
    add_task(store, name="nightly", tags=["report"], schedule="0 3 * * *")
    assert settings.database_url
    _history(settings.database_url, etl.id)
    watch = Watch()
    watch.attach(page)
    login(page, dashboard, admin_key)
    expect(page.locator("#kpi-runs")).to_contain_text("200")
    expect(page.locator("#kpi-success")).to_contain_text("70.0%")
    expect(page.locator("#durations")).to_contain_text("etl-load")
    expect(page.locator("#upcoming")).to_contain_text("nightly")
    expect(page.locator("canvas").first).to_be_visible()
    assert page.locator("canvas").count() >= 2
    page.wait_for_timeout(500)
    shot(page, "02-overview")
    assert watch.errors == []


def test_overview_refreshes_in_place_and_filters(
    dashboard: str, page: Page, store: Store, settings: Settings, admin_key: str
) -> None:
    etl = add_task(store, name="etl-load", tags=["etl"])
    add_task(store, name="other", tags=["misc"])
    assert settings.database_url
    login(page, dashboard, admin_key)
    expect(page.locator("#kpi-runs")).to_contain_text("0")
    page.evaluate("window.__still_the_same_page = true")
    _history(settings.database_url, etl.id, rows=50)
    expect(page.locator("#kpi-runs")).to_contain_text("50", timeout=15_000)
    expect(page.locator("#tasks")).to_contain_text("etl-load")
    page.locator("select").nth(1).select_option("failed")  # status filter
    expect(page.locator("#kpi-runs")).to_contain_text("10")
    expect(page.locator("#kpi-success")).to_contain_text("0.0%")
    page.locator("select").nth(2).select_option("misc")  # tag filter
    expect(page.locator("#kpi-runs .v")).to_have_text("0")
    expect(page.locator("#tasks")).not_to_contain_text("etl-load")
    assert page.evaluate("window.__still_the_same_page") is True
    shot(page, "03-overview-filtered")


# -- task page, trigger, run page ------------------------------------------------------------


def test_operator_opens_a_task_triggers_it_and_follows_the_run(
    stack: Stack, page: Page, store: Store, settings: Settings
) -> None:
    add_task(store, name="hello", command="echo hello; sleep 2; echo bye", tags=["demo"])
    operator = key_for(store, Role.OPERATOR)
    base = start_dashboard(stack)
    watch = Watch()
    watch.attach(page)
    login(page, base, operator)
    page.locator("#tasks a.task-link", has_text="hello").click()
    page.wait_for_url(base + "/?task=hello")
    expect(page.locator("#task-name")).to_have_text("hello")
    expect(page.locator("#history")).to_contain_text("no runs yet")
    page.evaluate("window.__still_the_same_page = true")
    page.get_by_role("button", name="Run now").click()
    expect(page.locator("#trigger-notice")).to_contain_text("queued")
    run_id = int(page.locator("#trigger-notice a.run-link").inner_text().lstrip("#"))
    expect(page.locator("#history")).to_contain_text(f"#{run_id}")
    shot(page, "04-task-triggered")

    page.locator("#trigger-notice a.run-link").click()
    page.wait_for_url(f"{base}/?run={run_id}")
    expect(page.locator("#log")).to_contain_text("hello", timeout=20_000)
    page.evaluate("window.__still_the_same_page = true")
    expect(page.locator("#run-status")).to_have_text("succeeded", timeout=20_000)
    expect(page.locator("#log")).to_contain_text("bye")
    assert page.evaluate("window.__still_the_same_page") is True  # updated without a reload
    shot(page, "05-run-page")

    page.goto(base + "/?task=hello")
    expect(page.locator("#history .badge").first).to_have_text("succeeded")
    expect(page.locator("canvas").first).to_be_visible()
    shot(page, "06-task-after-run")
    assert watch.errors == []
    assert watch.dialogs == []
    with stack.client() as api:
        run = api.get(f"/api/runs/{run_id}").json()
    assert run["trigger"] == "manual" and run["status"] == "succeeded"
    audit = wait_for(lambda: _audit_rows(settings, run_id), what="audit row")
    assert audit == [("dashboard-operator", "task.trigger", "dashboard")]


def _audit_rows(settings: Settings, run_id: int) -> list[tuple[str, str, str]]:
    assert settings.database_url
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute(
            "SELECT actor, action, detail->>'via' FROM audit_log"
            " WHERE (detail->>'run_id')::bigint = %s",
            (run_id,),
        ).fetchall()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def test_viewer_sees_but_cannot_trigger(dashboard: str, page: Page, store: Store) -> None:
    add_task(store, name="hello")
    viewer = key_for(store, Role.VIEWER)
    login(page, dashboard, viewer)
    page.goto(dashboard + "/?task=hello")
    expect(page.locator("#task-name")).to_have_text("hello")
    button = page.get_by_role("button", name="Run now")
    expect(button).to_be_disabled()
    expect(page.locator("#trigger-note")).to_contain_text("viewer")
    button.click(force=True)  # a click on the disabled button does nothing
    page.wait_for_timeout(500)
    assert store.list_runs(limit=10) == []
    shot(page, "07-task-viewer")
    page.goto(dashboard + "/?task=nope")
    expect(page.get_by_text("task 'nope' not found")).to_be_visible()


def test_trigger_is_checked_on_the_server(store: Store) -> None:
    """Even if a viewer's browser sent the click, the server refuses it and writes nothing."""
    task = add_task(store, name="hello")
    viewer = Principal(key_id=1, name="v", role=Role.VIEWER)
    view = TaskView(store, task, principal=viewer, authorize=lambda: viewer)
    assert view.trigger() is None
    assert "Refused" in view.notice.object
    assert store.list_runs(limit=10) == []
    revoked = TaskView(store, task, principal=viewer, authorize=lambda: None)
    assert revoked.trigger() is None
    operator = Principal(key_id=2, name="op", role=Role.OPERATOR)
    run = TaskView(store, task, principal=operator, authorize=lambda: operator).trigger()
    assert run is not None and [r.id for r in store.list_runs(limit=10)] == [run.id]


# -- escaping ---------------------------------------------------------------------------------


def test_task_and_log_text_is_shown_as_text(
    dashboard: str, page: Page, store: Store, settings: Settings, admin_key: str
) -> None:
    db = settings.database_url
    assert db
    # The API refuses such a name; the dashboard must not rely on that, so force it in.
    sql(db, "ALTER TABLE tasks DROP CONSTRAINT tasks_name_check")
    sql(
        db,
        "INSERT INTO tasks (name, executor, spec, description, tags)"
        " VALUES (%s, 'shell', '{}', %s, %s)",
        (XSS, XSS, [XSS]),
    )
    sql(
        db,
        """INSERT INTO runs (task_id, status, trigger, parameters, started_at, finished_at, error,
                             worker)
           SELECT id, 'failed', 'manual', jsonb_build_object('x', %s::text), now() - interval '2 s',
                  now(), %s, %s FROM tasks""",
        (XSS, XSS, XSS),
    )
    sql(db, "INSERT INTO run_logs (run_id, seq, data) SELECT id, 0, %s FROM runs", (XSS + "\n",))
    run_id = store.list_runs(limit=1)[0].id
    watch = Watch()
    watch.attach(page)
    login(page, dashboard, admin_key)
    pages = {
        "08-xss-overview": "/",
        "09-xss-task": "/?task=%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E",
        "10-xss-run": f"/?run={run_id}",
    }
    for name, path in pages.items():
        page.goto(dashboard + path)
        wait_text(page, "#refreshed", "Updated")
        expect(page.get_by_text(XSS, exact=True).filter(visible=True).first).to_be_visible()
        assert page.locator("img[src='x']").count() == 0, name
        page.wait_for_timeout(300)
        shot(page, name)
    expect(page.locator("#log")).to_contain_text(XSS)
    assert watch.dialogs == []
    assert watch.errors == []


# -- reports and artifacts --------------------------------------------------------------------

REPORT = b"""<!doctype html><html><body><h1 id="r">Weekly report</h1>
<script>try { parent.document.title = "pwned"; } catch (e) {}
document.getElementById("r").dataset.ran = "yes";</script></body></html>"""


def test_latest_report_inline_in_a_sandbox_and_artifacts_behind_the_login(
    dashboard: str, page: Page, store: Store, settings: Settings, admin_key: str
) -> None:
    db = settings.database_url
    assert db
    task = add_task(store, name="report")
    for status in ("succeeded", "failed"):  # the newest run failed: show the succeeded one's
        sql(
            db,
            "INSERT INTO runs (task_id, status, trigger, started_at, finished_at)"
            " VALUES (%s, %s, 'manual', now(), now())",
            (task.id, status),
        )
    good = max(r.id for r in store.list_runs(limit=5, status="succeeded"))
    sql(
        db,
        "INSERT INTO artifacts (run_id, name, content_type, size, data)"
        " VALUES (%s, 'report.html', 'text/html', %s, %s),"
        "        (%s, 'output.ipynb', 'application/x-ipynb+json', 2, '{}')",
        (good, len(REPORT), REPORT, good),
    )
    assert httpx.get(f"{dashboard}/artifacts/{good}/report.html").status_code == 403
    login(page, dashboard, admin_key)
    page.goto(dashboard + "/?task=report")
    frame = page.locator("#report")
    expect(frame).to_have_attribute("sandbox", "allow-scripts")
    expect(frame).to_have_attribute("src", f"/artifacts/{good}/report.html")
    heading = page.frame_locator("#report").locator("#r")
    expect(heading).to_have_text("Weekly report")
    expect(heading).to_have_attribute("data-ran", "yes")
    assert page.title() != "pwned"  # the report cannot reach the dashboard page
    shot(page, "11-task-report")

    got = page.request.get(f"{dashboard}/artifacts/{good}/report.html?download=1")
    assert got.status == 200 and got.body() == REPORT
    assert got.headers["content-security-policy"].startswith("sandbox")
    assert got.headers["content-disposition"] == 'attachment; filename="report.html"'
    page.goto(f"{dashboard}/?run={good}")
    expect(page.locator("#artifacts")).to_contain_text("output.ipynb")
    expect(page.locator("#artifacts")).to_contain_text("report.html")
    shot(page, "12-run-artifacts")


# -- the SQL behind the filters, against real Postgres ---------------------------------------


def test_data_filters_by_task_status_tag_and_time(store: Store, settings: Settings) -> None:
    db = settings.database_url
    assert db
    etl = add_task(store, name="etl", tags=["nightly"])
    web = add_task(store, name="web", tags=["hourly"])
    _history(db, etl.id, rows=100)
    _history(db, web.id, rows=20)
    sql(
        db,
        "INSERT INTO runs (task_id, status, trigger, queued_at)"
        " VALUES (%s, 'succeeded', 'manual', now() - interval '3 days')",
        (web.id,),
    )
    now = datetime.now(UTC)
    assert data.overview(store, Filters(), now=now).total == 120
    assert data.overview(store, Filters(hours=168), now=now).total == 121
    assert data.overview(store, Filters(task="web"), now=now).total == 20
    assert data.overview(store, Filters(tag="nightly"), now=now).total == 100
    failed = data.overview(store, Filters(status="failed"), now=now)
    assert failed.total == 24 and failed.success_rate == 0.0
    view = data.overview(store, Filters(), now=now)
    assert view.success_rate == pytest.approx(0.7)
    assert set(view.durations["task"]) == {"etl", "web"}
    row = view.durations.filter(view.durations["task"] == "etl").row(0, named=True)
    assert 1 <= row["p50"] <= row["p95"] <= 30
    assert view.queue.queued == 0
    assert view.tasks["last_status"].to_list() == ["succeeded", "succeeded"]
    assert data.task_runs(store, etl.id, status="timed_out").height == 10
    since = now - timedelta(minutes=63)
    assert data.task_runs(store, etl.id, since=since).height == 10
