"""The `%schedule` IPython magic: schedule the notebook you are looking at, from inside it.

    %load_ext service.magic
    %schedule "0 7 * * *" [--name N] [--param k=v ...] [--timezone TZ] [--timeout S]
              [--retries N] [--keep-last N] [--notebook PATH]
    %schedule list | runs NAME | run NAME [--wait] [--param k=v] | logs RUN | pause|resume|rm NAME

    %%schedule "*/15 * * * *" --name N [--param k=v ...]
    <the cell's code, scheduled on its own>

The notebook is the one Jupyter says this kernel serves (`__session__`, set from JPY_SESSION_NAME;
else the sessions API of the running Jupyter servers, matched by this kernel's id), or
`--notebook PATH`. It goes to the API as a snapshot (`notebook_content`), so workers need no
shared disk; running `%schedule` again updates the same task to a new snapshot version (options
left out keep their values; the version changes only when the content does). The snapshot is the
notebook as last saved, with its outputs cleared, its `%schedule` and `%load_ext service.magic`
lines removed (a scheduled run must not schedule itself again) and without the cells tagged
`nbcron-skip`. Errors are one line, never a traceback. The magic talks to the API through
`service.client`, the same REST client as the CLI, configured the same way (`NBCRON_*`).
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn
from zoneinfo import ZoneInfo

import httpx
from IPython.core.magic import Magics, line_cell_magic, magics_class

from service.client import Client, ClientError, Progress, parse_param
from service.config import load_settings

SKIP_TAG = "nbcron-skip"
SUBCOMMANDS = ("list", "runs", "run", "logs", "pause", "resume", "rm", "help")
_CONTROL_LINE = re.compile(
    r"^\s*(?:[A-Za-z_][\w.]*\s*=\s*)?"
    r"(?:%schedule\b|%(?:re)?load_ext\s+service\.magic\b|.*run_line_magic\(\s*['\"]schedule['\"])"
)
_NAME_BAD = re.compile(r"[^A-Za-z0-9_.-]+")
_TASK_COLUMNS = ("id", "name", "executor", "schedule", "timezone", "enabled", "next_fire_at")
_RUN_COLUMNS = ("id", "status", "trigger", "attempt", "queued_at", "started_at", "duration_s")
_STATUS_COLOURS = {"succeeded": "#1a7f37", "failed": "#cf222e", "timed_out": "#cf222e"}
USAGE = (
    'usage: %schedule "CRON" [--name N] [--param k=v ...] [--timezone TZ] [--timeout S]'
    " [--retries N] [--keep-last N] [--notebook PATH] | list | runs NAME"
    " | run NAME [--wait] | logs RUN | pause NAME | resume NAME | rm NAME"
)


class ScheduleError(Exception):
    """A problem shown to the person as one line, never as a traceback."""

    def _render_traceback_(self) -> list[str]:  # IPython shows this instead of a traceback
        return [f"nbcron: {self}"]


class _Parser(argparse.ArgumentParser):
    """argparse that raises ScheduleError instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise ScheduleError(f"{message}; {USAGE}")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise ScheduleError(message or USAGE)


# -- arguments ---------------------------------------------------------------------------------


def _schedule_parser() -> _Parser:
    parser = _Parser(prog="%schedule", add_help=False)
    parser.add_argument("cron", nargs="+")
    parser.add_argument("--name")
    parser.add_argument("--param", action="append", default=[])
    parser.add_argument("--timezone")
    parser.add_argument("--timeout", type=int)
    parser.add_argument("--retries", type=int)
    parser.add_argument("--keep-last", dest="keep_last", type=int)
    parser.add_argument("--notebook")
    return parser


def _run_parser() -> _Parser:
    parser = _Parser(prog="%schedule run", add_help=False)
    parser.add_argument("name")
    parser.add_argument("--wait", action="store_true")
    parser.add_argument("--param", action="append", default=[])
    return parser


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """`--param k=v` options as a dict (values read as JSON when they are JSON)."""
    try:
        return dict(parse_param(pair) for pair in pairs)
    except ValueError as exc:
        raise ScheduleError(str(exc)) from exc


def task_name_for(path: Path) -> str:
    """A valid task name from a notebook's file name: `Sales report.ipynb` -> `Sales-report`."""
    name = _NAME_BAD.sub("-", path.stem).strip("-._")[:100] or "notebook"
    return f"nb-{name}"[:100] if name.isdigit() else name


def schedule_body(args: argparse.Namespace, params: dict[str, Any]) -> dict[str, Any]:
    """The task fields `%schedule` sets: the schedule always, the options that were given."""
    body: dict[str, Any] = {"schedule": " ".join(args.cron)}
    given = {
        "timezone": args.timezone,
        "timeout_seconds": args.timeout,
        "max_retries": args.retries,
        "keep_last": args.keep_last,
    }
    body.update({k: v for k, v in given.items() if v is not None})
    if params:
        body["parameters"] = params
    return body


# -- finding and snapshotting the notebook -----------------------------------------------------


def find_notebook(explicit: str | None, user_ns: dict[str, Any]) -> Path:
    """The notebook to schedule: `--notebook`, else the one this kernel serves in Jupyter."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ScheduleError(f"--notebook {explicit}: no such file")
        return path.resolve()
    found = session_path(user_ns) or server_session_path()
    if found is None:
        raise ScheduleError(
            "cannot tell which notebook this kernel runs (no Jupyter session found);"
            " pass --notebook PATH"
        )
    return found


def session_path(user_ns: dict[str, Any]) -> Path | None:
    """The notebook path Jupyter gives the kernel (`__session__`, from JPY_SESSION_NAME)."""
    value = user_ns.get("__session__") or os.environ.get("JPY_SESSION_NAME")
    if not value or not str(value).endswith(".ipynb"):
        return None
    path = Path(str(value)).expanduser()
    return path.resolve() if path.is_file() else None


def server_session_path(
    runtime_dir: Path | None = None, kernel_id: str | None = None
) -> Path | None:
    """Ask the running Jupyter servers (sessions API) which notebook owns this kernel."""
    kernel_id = kernel_id or _kernel_id()
    if kernel_id is None:
        return None
    for info in _server_infos(runtime_dir):
        found = _session_of(info, kernel_id)
        if found is not None:
            return found
    return None


def _kernel_id() -> str | None:
    """This kernel's id, from its connection file name (`kernel-<id>.json`)."""
    try:
        from ipykernel.connect import get_connection_file

        name = Path(get_connection_file()).name
    except Exception:  # not inside an ipykernel
        return None
    match = re.fullmatch(r"kernel-(.+)\.json", name)
    return match.group(1) if match else None


def _server_infos(runtime_dir: Path | None) -> Iterator[dict[str, Any]]:
    """The `jpserver-*.json` (and classic `nbserver-*.json`) files of running servers."""
    if runtime_dir is None:
        from jupyter_core.paths import jupyter_runtime_dir

        runtime_dir = Path(jupyter_runtime_dir())
    for path in sorted(runtime_dir.glob("*server-*.json")):
        try:
            yield json.loads(path.read_text())
        except (OSError, ValueError):
            continue


def _session_of(info: dict[str, Any], kernel_id: str) -> Path | None:
    url = str(info.get("url", "")).rstrip("/") + "/api/sessions"
    headers = {"Authorization": f"token {info['token']}"} if info.get("token") else {}
    try:
        sessions = httpx.get(url, headers=headers, timeout=2.0).json()
    except (httpx.HTTPError, ValueError):
        return None
    root = Path(info.get("root_dir") or info.get("notebook_dir") or ".")
    for session in sessions if isinstance(sessions, list) else []:
        if (session.get("kernel") or {}).get("id") == kernel_id:
            path = root / (session.get("path") or session.get("notebook", {}).get("path", ""))
            return path if path.is_file() else None
    return None


def snapshot(path: Path) -> dict[str, Any]:
    """The saved notebook as JSON, made fit to run on a worker (see the module docstring)."""
    try:
        nb = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ScheduleError(f"cannot read {path}: {exc}") from exc
    if not isinstance(nb, dict) or nb.get("nbformat") != 4:
        raise ScheduleError(f"{path} is not an nbformat 4 notebook")
    nb["cells"] = [c for c in (_clean_cell(cell) for cell in nb.get("cells", [])) if c]
    nb.get("metadata", {}).pop("widgets", None)
    return nb


def _clean_cell(cell: dict[str, Any]) -> dict[str, Any] | None:
    """The cell as a scheduled run should see it, or None to leave it out."""
    if SKIP_TAG in cell.get("metadata", {}).get("tags", []):
        return None
    if cell.get("cell_type") != "code":
        return cell
    source = cell.get("source", "")
    text = "".join(source) if isinstance(source, list) else str(source)
    if text.lstrip().startswith("%%schedule"):
        return None  # a scheduled cell is a task of its own
    kept = [ln for ln in text.splitlines(keepends=True) if not _CONTROL_LINE.match(ln)]
    if not "".join(kept).strip():
        return None
    return cell | {"source": "".join(kept), "outputs": [], "execution_count": None}


def cell_notebook(code: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """A one-cell notebook for `%%schedule`, with a `parameters` cell when parameters are given."""
    cells = []
    if parameters:
        defaults = "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
        cells.append(_code_cell(defaults, tags=["parameters"]))
    cells.append(_code_cell(code))
    return {
        "nbformat": 4,
        "nbformat_minor": 5,
        "metadata": {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
        },
        "cells": cells,
    }


def _code_cell(source: str, *, tags: list[str] | None = None) -> dict[str, Any]:
    index = len(source) + sum(map(ord, source))  # any stable id will do
    return {
        "cell_type": "code",
        "id": f"nbcron-{index:x}"[:64],
        "metadata": {"tags": tags} if tags else {},
        "execution_count": None,
        "outputs": [],
        "source": source,
    }


# -- what the magic shows ------------------------------------------------------------------


def _when(value: str | None, tz: str = "UTC") -> str:
    """An API timestamp in the task's zone: `2025-03-01 07:00 CET`."""
    if not value:
        return "-"
    moment = datetime.fromisoformat(value).astimezone(ZoneInfo(tz))
    return moment.strftime("%Y-%m-%d %H:%M %Z")


class Scheduled:
    """What `%schedule "CRON"` did: the task (as the API returned it) and where to find it."""

    def __init__(self, task: dict[str, Any], *, action: str, source: str, client: Client):
        self.task, self.action, self.source = task, action, source
        self.task_url = f"{client.base}/api/tasks/{task['id']}"
        self.report_url = client.report_url(task["id"])

    @property
    def next_fire_times(self) -> list[str]:
        tz = self.task.get("timezone") or "UTC"
        return [_when(t, tz) for t in (self.task.get("next_fire_times") or [])[:3]]

    def _facts(self) -> list[str]:
        task = self.task
        version = task.get("notebook_version")
        lines = [
            f"{self.action} task {task['name']} (id {task['id']})"
            + (f", snapshot v{version}" if version else "")
            + f" of {self.source}",
            f"schedule {task.get('schedule')} ({task.get('timezone')})"
            + ("" if task.get("enabled", True) else f" - paused: %schedule resume {task['name']}"),
            "next: " + (", ".join(self.next_fire_times) or "-"),
        ]
        return lines

    def __repr__(self) -> str:
        return "\n".join([*self._facts(), f"task: {self.task_url}", f"report: {self.report_url}"])

    def _repr_html_(self) -> str:
        facts = "<br>".join(html.escape(line) for line in self._facts())
        name = html.escape(self.task["name"])
        return (
            f"<div><b>nbcron</b> · {facts}<br>"
            f'<a href="{html.escape(self.task_url)}" target="_blank">task</a> · '
            f'<a href="{html.escape(self.report_url)}" target="_blank">latest report</a> · '
            f"run now: <code>%schedule run {name} --wait</code></div>"
        )


class RunView:
    """One run as the magic shows it: status, timing, error, links to its report."""

    def __init__(self, run: dict[str, Any], *, client: Client, has_report: bool = False):
        self.run, self.has_report = run, has_report
        self.report_url = client.run_report_url(run["id"]) if has_report else None
        self.task_report_url = client.report_url(run["task_id"])

    @property
    def id(self) -> int:
        return int(self.run["id"])

    @property
    def status(self) -> str:
        return str(self.run["status"])

    def _summary(self) -> str:
        run = self.run
        text = f"run {run['id']} of {run.get('task_name') or run['task_id']}: {run['status']}"
        duration = _duration(run)
        if duration is not None:
            text += f" in {duration:.1f}s"
        return text + (f" - {run['error']}" if run.get("error") else "")

    def __repr__(self) -> str:
        lines = [self._summary(), f"logs: %schedule logs {self.id}"]
        if self.report_url:
            lines.append(f"report: {self.report_url}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        colour = _STATUS_COLOURS.get(self.status, "#6e7781")
        links = [f"logs: <code>%schedule logs {self.id}</code>"]
        if self.report_url:
            links.append(f'<a href="{html.escape(self.report_url)}" target="_blank">report</a>')
        if self.status == "succeeded" and self.has_report:
            url = html.escape(self.task_report_url)
            links.append(f'<a href="{url}" target="_blank">latest report (stable link)</a>')
        return (
            f'<div><b>nbcron</b> · <span style="color:{colour};font-weight:bold">'
            f"{html.escape(self._summary())}</span><br>{' · '.join(links)}</div>"
        )


def _duration(run: dict[str, Any]) -> float | None:
    if not (run.get("started_at") and run.get("finished_at")):
        return None
    start, end = (datetime.fromisoformat(run[k]) for k in ("started_at", "finished_at"))
    return (end - start).total_seconds()


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


def _moment(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value).replace(microsecond=0) if value else None


def _frame(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> Any:
    """A Polars table of `rows` (timestamps as datetimes, durations in seconds)."""
    import polars as pl

    data: dict[str, list[Any]] = {}
    for col in columns:
        if col == "duration_s":
            data[col] = [_rounded(_duration(r)) for r in rows]
        elif col.endswith("_at"):
            data[col] = [_moment(r.get(col)) for r in rows]
        else:
            data[col] = [r.get(col) for r in rows]
    return pl.DataFrame(data, strict=False)


def _progress_html(progress: Progress) -> str:
    bar = ""
    if progress.cell:
        done, total = progress.cell
        bar = f'<progress value="{done - 1}" max="{total}"></progress> '
    line = html.escape(progress.last_line)
    return f"<div>{bar}{html.escape(progress.describe())}<br><code>{line}</code></div>"


class LiveProgress:
    """Progress of a run while it goes: a display updated in place inside a Jupyter kernel, one
    line redrawn on stderr in a terminal IPython."""

    def __init__(self) -> None:
        from IPython import get_ipython
        from IPython.display import HTML, display

        self.in_kernel = getattr(get_ipython(), "kernel", None) is not None
        self.handle = None
        if self.in_kernel:
            waiting = HTML("<div>nbcron: waiting for the run to start…</div>")
            self.handle = display(waiting, display_id=True)

    def __call__(self, progress: Progress) -> None:
        from IPython.display import HTML

        if self.handle is not None:
            self.handle.update(HTML(_progress_html(progress)))
        else:
            print(f"\r\x1b[K{progress.describe()}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Remove the progress line: the result shown next replaces it."""
        from IPython.display import HTML

        if self.handle is not None:
            self.handle.update(HTML(""))
        else:
            print("\r\x1b[K", end="", file=sys.stderr, flush=True)


# -- the magic -------------------------------------------------------------------------------


@contextmanager
def _api() -> Iterator[Client]:
    """A client configured like the CLI (NBCRON_* env, nbcron.toml); API errors as one line."""
    try:
        client = Client(load_settings())
    except ValueError as exc:
        raise ScheduleError(f"configuration: {exc}") from exc
    try:
        yield client
    except ClientError as exc:
        raise ScheduleError(_one_line(exc)) from None
    finally:
        client.http.close()


def _one_line(exc: ClientError) -> str:
    """The API's problem detail without the status code, with a hint where one helps."""
    text = re.sub(r"^\d{3} ", "", str(exc)).splitlines()[0]
    if exc.status == 401:
        text += " (set NBCRON_API_KEY, or NBCRON_DATA_DIR to the folder that holds admin-key)"
    return text


@magics_class
class ScheduleMagics(Magics):
    """`%schedule` and `%%schedule`."""

    @line_cell_magic
    def schedule(self, line: str, cell: str | None = None) -> Any:
        """Schedule this notebook (or, as %%schedule, this cell); see `%schedule help`."""
        try:
            tokens = shlex.split(line)
        except ValueError as exc:
            raise ScheduleError(f"{exc}; {USAGE}") from None
        if cell is not None:
            return self._schedule_cell(tokens, cell)
        if not tokens:
            raise ScheduleError(USAGE)
        if tokens[0] in SUBCOMMANDS:
            return self._subcommand(tokens[0], tokens[1:])
        return self._schedule_notebook(tokens)

    def _schedule_notebook(self, tokens: list[str]) -> Scheduled:
        args = _schedule_parser().parse_args(tokens)
        path = find_notebook(args.notebook, self.shell.user_ns if self.shell else {})
        content = snapshot(path)
        body = schedule_body(args, parse_params(args.param))
        name = args.name or task_name_for(path)
        saved = datetime.fromtimestamp(path.stat().st_mtime).strftime("%H:%M:%S")
        return _upsert(name, body, content, source=f"{path.name} (saved {saved})")

    def _schedule_cell(self, tokens: list[str], cell: str) -> Scheduled:
        args = _schedule_parser().parse_args(tokens)
        if not args.name:
            raise ScheduleError('%%schedule needs --name NAME, e.g. %%schedule "@hourly" --name N')
        params = parse_params(args.param)
        body = schedule_body(args, params)
        return _upsert(args.name, body, cell_notebook(cell, params), source="the cell")

    def _subcommand(self, command: str, rest: list[str]) -> Any:
        if command == "help":
            print(USAGE)
            return None
        if command == "list":
            return _list()
        if command == "run":
            return _run(_run_parser().parse_args(rest))
        if len(rest) != 1:
            raise ScheduleError(f"%schedule {command} takes one argument; {USAGE}")
        return _SIMPLE[command](rest[0])


def _upsert(name: str, body: dict[str, Any], content: dict[str, Any], *, source: str) -> Scheduled:
    """Create the task, or give the existing one the new snapshot (a new version)."""
    fields = body | {"notebook_content": content, "notebook": None}
    with _api() as client:
        existing = client.find_task(name)
        if existing is None:
            new = {"name": name, "executor": "notebook", "description": f"%schedule {source}"}
            task, action = client.create_task(new | fields), "created"
        elif existing["executor"] != "notebook":
            raise ScheduleError(
                f"task {name!r} exists and is a {existing['executor']} task; choose another --name"
            )
        else:
            task, action = client.update_task(str(existing["id"]), fields), "updated"
        return Scheduled(task, action=action, source=source, client=client)


def _list() -> Any:
    with _api() as client:
        return _frame(client.tasks(limit=500), _TASK_COLUMNS)


def _runs(name: str) -> Any:
    with _api() as client:
        return _frame(client.task_runs(name, limit=20), (*_RUN_COLUMNS, "exit_code", "error"))


def _run(args: argparse.Namespace) -> RunView:
    with _api() as client:
        run = client.trigger(args.name, parse_params(args.param))
        if not args.wait:
            return RunView(run, client=client)
        progress = LiveProgress()
        try:
            final = client.watch(run["id"], progress)
        except KeyboardInterrupt:
            raise ScheduleError(
                f"stopped waiting; run {run['id']} goes on (%schedule logs {run['id']})"
            ) from None
        finally:
            progress.close()
        names = {a["name"] for a in client.artifacts(final["id"])}
        return RunView(final, client=client, has_report="report.html" in names)


def _logs(run_ref: str) -> None:
    if not run_ref.isdigit():
        raise ScheduleError(f"%schedule logs takes a run id, not {run_ref!r}")
    with _api() as client:
        text = client.logs(int(run_ref))["text"]
    print(text, end="" if text.endswith("\n") else "\n")


def _set_enabled(name: str, enabled: bool) -> None:
    with _api() as client:
        task = client.update_task(name, {"enabled": enabled})
    print(f"task {task['name']} {'resumed' if enabled else 'paused'}")


def _remove(name: str) -> None:
    with _api() as client:
        client.delete_task(name)
    print(f"task {name} deleted")


_SIMPLE: dict[str, Callable[[str], Any]] = {
    "runs": _runs,
    "logs": _logs,
    "pause": lambda name: _set_enabled(name, False),
    "resume": lambda name: _set_enabled(name, True),
    "rm": _remove,
}


def load_ipython_extension(ipython: Any) -> None:
    """`%load_ext service.magic`."""
    ipython.register_magics(ScheduleMagics)


def unload_ipython_extension(ipython: Any) -> None:
    """Nothing to undo: IPython keeps registered magics until the kernel stops."""
