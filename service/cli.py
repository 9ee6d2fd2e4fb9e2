"""The `nbcron` command: roles (up, api, dispatcher, worker, migrate) and the REST commands."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from service.client import Client, ClientError
from service.config import Settings, load_settings
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
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@click.group()
@click.option("--config", type=click.Path(path_type=Path), help="nbcron.toml to read")
@click.pass_context
def main(ctx: click.Context, config: Path | None) -> None:
    """nbcron: schedule shell commands, HTTP calls and notebooks."""
    try:
        ctx.obj = {"settings": load_settings(toml_path=config)}
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
@click.pass_context
@friendly
def api(ctx: click.Context, host: str | None, port: int | None) -> None:
    """Serve the REST API."""
    import uvicorn

    from service.api import create_app

    settings = _settings(ctx).with_overrides(api_host=host, api_port=port)
    _setup_logging(settings)
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_level="warning",
        access_log=False,
    )


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
@click.pass_context
@friendly
def keys_create(ctx: click.Context, name: str, role: str) -> None:
    """Create a key and print it alone on stdout (it is shown once)."""
    click.echo(_client(ctx).create_key(name, role)["key"])


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
@click.pass_context
@friendly
def tasks_show(ctx: click.Context, ref: str) -> None:
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
    click.echo(f"run {run['id']} queued, waiting…", err=True)
    final = client.wait(run["id"])
    _emit(final, True) if as_json else click.echo(f"run {final['id']} {final['status']}")
    sys.exit(0 if final["status"] == "succeeded" else 1)


def _set_enabled(ctx: click.Context, ref: str, enabled: bool) -> None:
    task = _client(ctx).update_task(ref, {"enabled": enabled})
    click.echo(f"task {task['name']} {'resumed' if enabled else 'paused'}")


@tasks.command("pause")
@click.argument("ref")
@click.pass_context
@friendly
def tasks_pause(ctx: click.Context, ref: str) -> None:
    """Stop a task from firing."""
    _set_enabled(ctx, ref, False)


@tasks.command("resume")
@click.argument("ref")
@click.pass_context
@friendly
def tasks_resume(ctx: click.Context, ref: str) -> None:
    """Let a paused task fire again."""
    _set_enabled(ctx, ref, True)


@tasks.command("rm")
@click.argument("ref")
@click.pass_context
@friendly
def tasks_rm(ctx: click.Context, ref: str) -> None:
    """Delete a task and its history."""
    _client(ctx).delete_task(ref)
    click.echo(f"task {ref} deleted")


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
@click.pass_context
@friendly
def runs_show(ctx: click.Context, run_id: int) -> None:
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
@click.pass_context
@friendly
def runs_cancel(ctx: click.Context, run_id: int) -> None:
    """Cancel a queued or running run."""
    run = _client(ctx).cancel(run_id)
    click.echo(
        f"run {run['id']}: {run['status']}"
        + (" (stopping)" if run["cancel_requested"] and run["status"] == "running" else "")
    )


if __name__ == "__main__":
    main()
