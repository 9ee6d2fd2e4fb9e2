"""The `nbcron` command: roles (up, api, dispatcher, worker, dashboard, migrate) and the REST commands."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from service.client import TERMINAL, Client, ClientError, Progress, exit_status
from service.config import Settings, load_settings, settings_env
from service.errors import NbcronError

F = TypeVar("F", bound=Callable[..., Any])
RUN_COLUMNS = ("id", "task_name", "status", "trigger", "attempt", "queued_at", "finished_at")
TASK_COLUMNS = ("id", "name", "executor", "schedule", "enabled", "queue")


def friendly(fn: F) -> F:
    """Turn our errors into one line on stderr and exit code 1 (2 for bad input)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            click.echo(f"nbcron: {exc}", err=True)
            sys.exit(2 if exc.status in (400, 409, 422) else 1)
        except (NbcronError, ValueError) as exc:
            click.echo(f"nbcron: {exc}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def _settings(ctx: click.Context) -> Settings:
    return ctx.obj["settings"]


def _client(ctx: click.Context) -> Client:
    return Client(_settings(ctx))


def _setup_logging(settings: Settings) -> None:
    """Structured logs (JSON, or console on a terminal) tagged with this command's role."""
    from service.logging import configure_logging
    from service.tracing import setup_tracing

    role = click.get_current_context().info_name or "nbcron"
    configure_logging(settings, role=role)
    setup_tracing(settings, role=role)  # a no-op unless tracing_enabled


@click.group()
@click.option("--config", type=click.Path(path_type=Path), help="nbcron.toml to read")
@click.pass_context
def main(ctx: click.Context, config: Path | None) -> None:
    """nbcron: schedule shell commands, HTTP calls and notebooks."""
    try:
        ctx.obj = {"settings": load_settings(toml_path=config), "config": config}
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc


# -- roles ------------------------------------------------------------------


@main.command()
@click.option("--data-dir", type=click.Path(path_type=Path))
@click.option("--port", type=int, help="API port (default 8080)")
@click.option("--dashboard-port", type=int)
@click.option("--workers", type=int, help="worker processes")
@click.pass_context
@friendly
def up(
    ctx: click.Context,
    data_dir: Path | None,
    port: int | None,
    dashboard_port: int | None,
    workers: int | None,
) -> None:
    """Start everything: embedded Postgres/Valkey unless URLs are set, API, dispatcher, workers."""
    from service.supervisor import run_up

    settings = _settings(ctx).with_overrides(
        data_dir=data_dir, api_port=port, dashboard_port=dashboard_port, worker_processes=workers
    )
    if port is not None:
        settings = settings.with_overrides(api_url=f"http://{settings.api_host}:{port}")
    sys.exit(run_up(settings))


@main.command()
@click.option("--host")
@click.option("--port", type=int)
@click.option("--workers", type=int, help="API processes sharing the port (default 1)")
@click.pass_context
@friendly
def api(ctx: click.Context, host: str | None, port: int | None, workers: int | None) -> None:
    """Serve the REST API."""
    import uvicorn

    settings = _settings(ctx).with_overrides(api_host=host, api_port=port, api_workers=workers)
    _setup_logging(settings)
    uvicorn.run(
        **_api_target(settings, ctx.obj.get("config")),
        host=settings.api_host,
        port=settings.api_port,
        log_level="warning",
        access_log=False,
    )


def _api_target(settings: Settings, config: Path | None) -> dict[str, Any]:
    """What uvicorn serves: the app itself, or (several processes) a factory each process calls.

    The processes rebuild the settings from the environment, so this one exports them all."""
    if settings.api_workers <= 1:
        from service.api import create_app

        return {"app": create_app(settings)}
    os.environ.update(settings_env(settings))
    if config is not None:
        os.environ["NBCRON_CONFIG"] = str(config)  # the same file for what env leaves unset
    return {"app": "service.api:app_from_env", "factory": True, "workers": settings.api_workers}


@main.command()
@click.pass_context
@friendly
def dispatcher(ctx: click.Context) -> None:
    """Fire cron schedules and send due runs to the broker."""
    from service.dispatcher import run_dispatcher

    _setup_logging(_settings(ctx))
    run_dispatcher(_settings(ctx))


@main.command()
@click.option("--queues", help="comma-separated queues to consume (default: default)")
@click.option("--threads", type=int)
@click.pass_context
@friendly
def worker(ctx: click.Context, queues: str | None, threads: int | None) -> None:
    """Execute runs from the broker."""
    from service.worker import run_worker

    qs = tuple(q.strip() for q in queues.split(",") if q.strip()) if queues else None
    settings = _settings(ctx).with_overrides(worker_queues=qs, worker_threads=threads)
    _setup_logging(settings)
    run_worker(settings)


@main.command()
@click.option("--port", type=int, help="dashboard port (default 5006)")
@click.pass_context
@friendly
def dashboard(ctx: click.Context, port: int | None) -> None:
    """Serve the monitoring dashboard."""
    from dashboards.app import serve_dashboard

    settings = _settings(ctx).with_overrides(dashboard_port=port)
    _setup_logging(settings)
    serve_dashboard(settings)


@main.command()
@click.pass_context
@friendly
def migrate(ctx: click.Context) -> None:
    """Apply pending database migrations."""
    from service.bootstrap import require_database_url
    from service.migrate import migrate as apply

    done = apply(require_database_url(_settings(ctx)))
    click.echo("\n".join(f"applied {name}" for name in done) or "database is up to date")


# -- keys -------------------------------------------------------------------


@main.group()
def keys() -> None:
    """API keys (admin)."""


@keys.command("create")
@click.option("--name", required=True)
@click.option("--role", required=True, type=click.Choice(["admin", "author", "operator", "viewer"]))
@click.option("--json", "as_json", is_flag=True, help="print the whole record, key included")
@click.pass_context
@friendly
def keys_create(ctx: click.Context, name: str, role: str, as_json: bool) -> None:
    """Create a key and print it alone on stdout (it is shown once)."""
    created = _client(ctx).create_key(name, role)
    _emit(created, True) if as_json else click.echo(created["key"])


# -- tasks ------------------------------------------------------------------


@main.group()
def tasks() -> None:
    """Tasks: list, add, show, trigger, pause, resume, rm."""


def _table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    text = str(value)
    return text[:19].replace("T", " ") if len(text) >= 19 and text[4:5] == "-" else text


def _emit(data: Any, as_json: bool, columns: tuple[str, ...] | None = None) -> None:
    if as_json or columns is None:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        click.echo(_table(data, columns))


def _params(pairs: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"{pair!r} is not k=v", param_hint="--param")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


@tasks.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@friendly
def tasks_list(ctx: click.Context, as_json: bool) -> None:
    """List tasks."""
    _emit(_client(ctx).tasks(limit=500), as_json, TASK_COLUMNS)


@tasks.command("add")
@click.option("--name", required=True)
@click.option("--executor", default="shell", show_default=True)
@click.option("--command", help="shell command")
@click.option("--url", help="HTTP executor URL")
@click.option("--notebook", help="notebook path under the notebooks dir")
@click.option("--schedule", help="cron expression or @daily etc.")
@click.option("--timezone")
@click.option("--queue")
@click.option("--timeout", "timeout_seconds", type=int)
@click.option("--retries", "max_retries", type=int)
@click.option("--param", "params", multiple=True, help="k=v default parameter (notebooks)")
@click.option("--keep-last", "keep_last", type=int, help="keep the artifacts of the newest N runs")
@click.option("--body", "raw", help="the whole task body as JSON (other options are merged in)")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@friendly
def tasks_add(
    ctx: click.Context, params: tuple[str, ...], raw: str | None, as_json: bool, **fields: Any
) -> None:
    """Create a task."""
    body = json.loads(raw) if raw else {}
    body.update({k: v for k, v in fields.items() if v is not None})
    if params:
        body["parameters"] = _params(params)
    task = _client(ctx).create_task(body)
    _emit(task, True) if as_json else click.echo(f"created task {task['name']} (id {task['id']})")


@tasks.command("show")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="JSON (the default for one record)")
@click.pass_context
@friendly
def tasks_show(ctx: click.Context, ref: str, as_json: bool) -> None:
    """Show a task (id or name) with its next fire times."""
    _emit(_client(ctx).task(ref), True)


@tasks.command("trigger")
@click.argument("ref")
@click.option("--param", "params", multiple=True, help="k=v")
@click.option("--wait", is_flag=True, help="wait for the run; exit with its status")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@friendly
def tasks_trigger(
    ctx: click.Context, ref: str, params: tuple[str, ...], wait: bool, as_json: bool
) -> None:
    """Queue a run now."""
    client = _client(ctx)
    run = client.trigger(ref, _params(params))
    if not wait:
        _emit(run, True) if as_json else click.echo(f"run {run['id']} queued")
        return
    final = client.watch(run["id"], _progress_printer())
    _emit(final, True) if as_json else click.echo(_run_line(final))
    sys.exit(exit_status(final))


def _progress_printer() -> Callable[[Progress], None]:
    """Progress on stderr: one line redrawn in place on a terminal, else a line per change."""
    tty = sys.stderr.isatty()
    seen: list[tuple[str, tuple[int, int] | None]] = []

    def show(progress: Progress) -> None:
        if tty:
            end = progress.status in TERMINAL
            click.echo(f"\r\x1b[K{progress.describe()}", err=True, nl=end)
        elif not seen or seen[-1] != (progress.status, progress.cell):
            seen.append((progress.status, progress.cell))
            click.echo(progress.describe(), err=True)

    return show


def _run_line(run: dict[str, Any]) -> str:
    """`run 7 failed: exit code 3 ...` for a finished run."""
    text = f"run {run['id']} {run['status']}"
    if run.get("error"):
        return f"{text}: {run['error']}"  # it names the exit code when there is one
    return text + (f" (exit code {run['exit_code']})" if run.get("exit_code") else "")


def _set_enabled(ctx: click.Context, ref: str, enabled: bool, as_json: bool = False) -> None:
    task = _client(ctx).update_task(ref, {"enabled": enabled})
    if as_json:
        _emit(task, True)
        return
    click.echo(f"task {task['name']} {'resumed' if enabled else 'paused'}")


@tasks.command("pause")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@friendly
def tasks_pause(ctx: click.Context, ref: str, as_json: bool) -> None:
    """Stop a task from firing."""
    _set_enabled(ctx, ref, False, as_json)


@tasks.command("resume")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@friendly
def tasks_resume(ctx: click.Context, ref: str, as_json: bool) -> None:
    """Let a paused task fire again."""
    _set_enabled(ctx, ref, True, as_json)


@tasks.command("rm")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@friendly
def tasks_rm(ctx: click.Context, ref: str, as_json: bool) -> None:
    """Delete a task and its history."""
    _client(ctx).delete_task(ref)
    _emit({"deleted": ref}, True) if as_json else click.echo(f"task {ref} deleted")


# -- runs -------------------------------------------------------------------


@main.group()
def runs() -> None:
    """Runs: list, show, logs, cancel."""


@runs.command("list")
@click.option("--task")
@click.option("--status")
@click.option("--limit", type=int, default=50)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@friendly
def runs_list(
    ctx: click.Context, task: str | None, status: str | None, limit: int, as_json: bool
) -> None:
    """List runs, newest first."""
    _emit(_client(ctx).runs(task=task, status=status, limit=limit), as_json, RUN_COLUMNS)


@runs.command("show")
@click.argument("run_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="JSON (the default for one record)")
@click.pass_context
@friendly
def runs_show(ctx: click.Context, run_id: int, as_json: bool) -> None:
    """Show one run."""
    _emit(_client(ctx).run(run_id), True)


@runs.command("logs")
@click.argument("run_id", type=int)
@click.option("-f", "--follow", is_flag=True, help="stream until the run ends")
@click.pass_context
@friendly
def runs_logs(ctx: click.Context, run_id: int, follow: bool) -> None:
    """Print a run's output."""
    client = _client(ctx)
    if follow:
        for text in client.follow_logs(run_id):
            click.echo(text, nl=False)
        return
    click.echo(client.logs(run_id)["text"], nl=False)


@runs.command("cancel")
@click.argument("run_id", type=int)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@friendly
def runs_cancel(ctx: click.Context, run_id: int, as_json: bool) -> None:
    """Cancel a queued or running run."""
    run = _client(ctx).cancel(run_id)
    if as_json:
        _emit(run, True)
        return
    click.echo(
        f"run {run['id']}: {run['status']}"
        + (" (stopping)" if run["cancel_requested"] and run["status"] == "running" else "")
    )


# -- jupyter ----------------------------------------------------------------


@main.group()
def jupyter() -> None:
    """Jupyter: load the %schedule magic in every IPython kernel."""


@jupyter.command("enable")
@click.option("--profile", default="default", show_default=True, help="IPython profile")
@friendly
def jupyter_enable(profile: str) -> None:
    """Write an IPython startup file that loads `service.magic` in every kernel."""
    from service.jupyter import enable

    path = enable(profile=profile)
    click.echo(f"wrote {path}; new kernels load %schedule (restart running ones)")


@jupyter.command("disable")
@click.option("--profile", default="default", show_default=True, help="IPython profile")
@friendly
def jupyter_disable(profile: str) -> None:
    """Remove the startup file `nbcron jupyter enable` wrote."""
    from service.jupyter import disable

    path = disable(profile=profile)
    click.echo(f"removed {path}" if path else "nothing to remove: it was not enabled")


if __name__ == "__main__":
    main()
