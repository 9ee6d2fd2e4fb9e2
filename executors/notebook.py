"""Notebook executor: papermill runs a parameterised notebook on a fresh (pre-warmed) kernel.

A task names a notebook under the notebooks folder (`notebook`) or carries the notebook itself
(`notebook_content`, stored with the task and versioned by content hash, so any worker can run
it without a shared file system). Parameters are checked against the notebook's `parameters`
cell when the task is written and when it is triggered. Every run stores `output.ipynb` and
`report.html`, also when it failed, timed out or was cancelled.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import logging
import queue
import re
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec
import nbformat
import papermill
from jupyter_client.client import KernelClient
from nbclient.util import ensure_async, run_hook, run_sync
from nbformat import NotebookNode
from papermill.clientwrap import PapermillNotebookClient
from papermill.engines import NBClientEngine, NotebookExecutionManager, papermill_engines
from papermill.exceptions import PapermillExecutionError

from executors import Executor, ExecutorConfig, Outcome, Result, RunContext, SpecError, kernels
from executors.paths import check_relative, resolve_notebook

log = logging.getLogger("nbcron.notebook")
ENGINE_NAME = "nbcron"
DEFAULT_KERNEL = "python3"
IPYNB_TYPE = "application/x-ipynb+json"
HTML_TYPE = "text/html"
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_KERNEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
_POLL_SECONDS = 0.1
_IOPUB_RETRY_SECONDS = 0.5


class NotebookSpec(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Fields of a notebook task; `notebook_version`/`notebook_sha256` are kept by nbcron."""

    notebook: str | None = None
    notebook_content: dict[str, Any] | None = None
    notebook_version: Annotated[int, msgspec.Meta(ge=1)] | None = None
    notebook_sha256: str | None = None
    parameters: dict[str, Any] = {}
    kernel: Annotated[str, msgspec.Meta(pattern=_KERNEL_PATTERN)] | None = None
    hide_code: bool = False
    report: bool = True


# -- parameters -----------------------------------------------------------------------------


class _Unknown:
    """A default that is an expression, not a literal: any value fits."""


UNKNOWN = _Unknown()
_TYPE_NAMES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (float,),
    "str": (str,),
    "bool": (bool,),
    "list": (list,),
    "List": (list,),
    "tuple": (list,),
    "Tuple": (list,),
    "Sequence": (list,),
    "dict": (dict,),
    "Dict": (dict,),
    "Mapping": (dict,),
    "None": (type(None),),
}


@dataclass(frozen=True)
class Declared:
    """One parameter the notebook declares in its `parameters` cell."""

    name: str
    default: Any
    annotation: str | None = None

    def kinds(self) -> tuple[type, ...] | None:
        """The JSON value types this parameter accepts, or None for any."""
        if self.annotation:
            return _annotation_kinds(self.annotation)
        if self.default is UNKNOWN or self.default is None:
            return None
        if isinstance(self.default, tuple):
            return (list,)
        return (type(self.default),)

    def describe(self) -> str:
        if self.annotation:
            return self.annotation
        return type(self.default).__name__


def _annotation_kinds(annotation: str) -> tuple[type, ...] | None:
    """`int`, `float | None`, `Optional[str]`, `list[int]` … as accepted types (None: any)."""
    text = annotation.replace("typing.", "").replace(" ", "")
    optional = re.fullmatch(r"Optional\[(.+)\]", text)
    parts = [optional.group(1), "None"] if optional else text.split("|")
    kinds: list[type] = []
    for part in parts:
        found = _TYPE_NAMES.get(part.split("[", 1)[0])
        if found is None:
            return None  # a type we do not model: do not guess
        kinds.extend(found)
    return tuple(kinds)


def _fits(value: Any, kinds: tuple[type, ...] | None) -> bool:
    if kinds is None:
        return True
    if isinstance(value, bool):  # bool is an int in Python, not in a notebook's eyes
        return bool in kinds
    if isinstance(value, int) and float in kinds:
        return True
    return isinstance(value, kinds)


def parameters_cell(nb: NotebookNode) -> NotebookNode | None:
    """The first cell tagged `parameters`, if any."""
    for cell in nb.cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            return cell
    return None


def notebook_language(nb: NotebookNode) -> str:
    meta = nb.get("metadata", {})
    language = meta.get("kernelspec", {}).get("language") or meta.get("language_info", {}).get(
        "name"
    )
    return str(language or "python").lower()


def declared_parameters(nb: NotebookNode) -> dict[str, Declared] | None:
    """The parameters a Python notebook declares; None when they cannot be read."""
    cell = parameters_cell(nb)
    if cell is None:
        return {}
    if notebook_language(nb) != "python":
        return None
    lines = [ln for ln in str(cell.source).splitlines() if not ln.lstrip().startswith(("%", "!"))]
    try:
        tree = ast.parse("\n".join(lines))
    except SyntaxError:
        return None
    found: dict[str, Declared] = {}
    for stmt in tree.body:
        declared = _declared(stmt)
        if declared is not None:
            found[declared.name] = declared
    return found


def _declared(stmt: ast.stmt) -> Declared | None:
    """`name = literal` or `name: type = literal` as a Declared parameter."""
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
        target = stmt.targets[0]
        if isinstance(target, ast.Name):
            return Declared(name=target.id, default=_literal(stmt.value))
    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
        annotation = ast.unparse(stmt.annotation)
        return Declared(name=stmt.target.id, default=_literal(stmt.value), annotation=annotation)
    return None


def _literal(node: ast.expr | None) -> Any:
    if node is None:
        return UNKNOWN
    try:
        return ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError):
        return UNKNOWN


def check_against_notebook(nb: NotebookNode, parameters: Mapping[str, Any]) -> None:
    """SpecError (field `parameters`) for unknown names or values that do not fit a default."""
    declared = declared_parameters(nb)
    if declared is None or not parameters:
        return
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        names = ", ".join(sorted(declared)) or "none (no cell is tagged 'parameters')"
        raise SpecError(
            f"unknown parameter(s) {', '.join(unknown)}; the notebook declares: {names}",
            field="parameters",
        )
    for name, value in parameters.items():
        decl = declared[name]
        if not _fits(value, decl.kinds()):
            raise SpecError(
                f"parameter {name!r} must be {decl.describe()} (the notebook declares"
                f" {name} = {decl.default!r}), got {type(value).__name__} {value!r}",
                field="parameters",
            )


# -- loading --------------------------------------------------------------------------------


def content_sha256(content: Mapping[str, Any]) -> str:
    """A stable hash of an uploaded notebook (keys sorted)."""
    return hashlib.sha256(msgspec.json.encode(content, order="sorted")).hexdigest()


def notebook_from_content(content: Mapping[str, Any]) -> NotebookNode:
    """An uploaded notebook as a validated v4 NotebookNode; SpecError naming notebook_content."""
    if content.get("nbformat") != 4:  # nbformat would read anything else as an ancient format
        raise SpecError(
            "notebook_content must be an nbformat 4 notebook (the .ipynb JSON)",
            field="notebook_content",
        )
    try:
        nb = nbformat.reads(msgspec.json.encode(content).decode(), as_version=4)
        nbformat.validate(nb)
    except Exception as exc:  # nbformat raises several unrelated types
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SpecError(
            f"notebook_content is not a valid notebook: {message}", field="notebook_content"
        ) from exc
    return nb


def notebook_from_file(path: Path, label: str) -> NotebookNode:
    try:
        return nbformat.read(path, as_version=4)
    except Exception as exc:
        raise SpecError(f"notebook {label!r} cannot be read: {exc}", field="notebook") from exc


def load_notebook(spec: NotebookSpec, config: ExecutorConfig) -> NotebookNode:
    """The notebook a spec names: the uploaded snapshot, or the file under the notebooks folder."""
    if spec.notebook_content is not None:
        return notebook_from_content(spec.notebook_content)
    assert spec.notebook is not None
    path = resolve_notebook(config.notebooks_dir, spec.notebook)
    return notebook_from_file(path, spec.notebook)


def kernel_cwd(config: ExecutorConfig) -> Path:
    """Where kernels start: the notebooks folder, or an empty private folder without one."""
    root = config.notebooks_dir
    return root.resolve() if root.is_dir() else _scratch_dir()


@functools.cache
def _scratch_dir() -> Path:
    # not the shared temp folder itself: a stray `json.py` there would shadow modules
    return Path(tempfile.mkdtemp(prefix="nbcron-kernels-"))


# -- the papermill engine ----------------------------------------------------------------------


class _LogWriter:
    """A file-like sink papermill writes a notebook's stdout/stderr to, as it happens."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self._log = log

    def write(self, text: str) -> int:
        self._log(text)
        return len(text)

    def flush(self) -> None:
        return None


def _cell_error(cell: NotebookNode) -> NotebookNode | None:
    for output in cell.get("outputs", []):
        if output.get("output_type") == "error":
            return output
    return None


class ProgressManager(NotebookExecutionManager):  # type: ignore[misc]
    """papermill's execution manager, writing per-cell progress to the run log."""

    def __init__(self, nb: NotebookNode, log: Callable[[str], None]) -> None:
        super().__init__(
            nb, output_path=None, progress_bar=False, log_output=False, autosave_cell_every=0
        )
        self.log = log
        self.current: int | None = None
        self.code_total = sum(1 for c in nb.cells if c.cell_type == "code")
        self.code_seen = 0

    def cell_start(self, cell: NotebookNode, cell_index: int | None = None, **kw: Any) -> None:
        super().cell_start(cell, cell_index, **kw)
        self.current = cell_index
        if cell.cell_type == "code":
            self.code_seen += 1
            self.log(f"[nbcron] cell {cell_index} ({self.code_seen}/{self.code_total}) started\n")

    def cell_complete(self, cell: NotebookNode, cell_index: int | None = None, **kw: Any) -> None:
        super().cell_complete(cell, cell_index, **kw)
        if cell.cell_type != "code":
            return
        error = _cell_error(cell)
        if error is not None:
            self.log(_ANSI_RE.sub("", "\n".join(error.get("traceback", []))) + "\n")
        meta = cell.metadata.papermill
        seconds = float(meta.get("duration") or 0.0)
        self.log(f"[nbcron] cell {cell_index} {meta.get('status')} in {seconds:.3f}s\n")


class WarmClient(PapermillNotebookClient):  # type: ignore[misc]
    """papermill's nbclient, connecting to an already-ready kernel without fixed waits.

    jupyter_client's `wait_for_ready` always ends with a 0.2 s drain of iopub, a fixed cost
    that dominates a warm run. Seeing the kernel's iopub answer to one `kernel_info` proves
    what matters: the kernel responds and our iopub subscription is live, so no output of the
    first cell can be lost.
    """

    async def async_start_new_kernel_client(self) -> KernelClient:
        assert self.km is not None
        self.kc = self.km.client()
        self.kc.start_channels()
        await _await_iopub(self.kc, timeout=float(self.startup_timeout))
        self.kc.allow_stdin = False
        await run_hook(self.on_notebook_start, notebook=self.nb)
        return self.kc

    start_new_kernel_client = run_sync(async_start_new_kernel_client)


async def _await_iopub(kc: KernelClient, *, timeout: float) -> None:
    """Send `kernel_info` until its iopub status arrives (a new subscriber may miss the first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg_id = kc.kernel_info()
        resend_at = time.monotonic() + _IOPUB_RETRY_SECONDS
        while (left := resend_at - time.monotonic()) > 0:
            try:
                msg = await ensure_async(kc.iopub_channel.get_msg(timeout=left))
            except queue.Empty:
                break
            if msg["parent_header"].get("msg_id") == msg_id:
                return
    raise RuntimeError(f"the kernel did not answer kernel_info within {timeout}s")


class NbcronEngine(NBClientEngine):  # type: ignore[misc]
    """papermill engine `nbcron`: nbclient on the kernel the run already holds."""

    @classmethod
    def execute_notebook(cls, nb: NotebookNode, kernel_name: str, **kw: Any) -> NotebookNode:
        run: NotebookRun = kw["nbcron_run"]
        assert run.kernel is not None
        manager = run.manager = ProgressManager(nb, run.ctx.log)
        manager.notebook_start()
        client = WarmClient(
            manager,
            km=run.kernel.manager,
            kernel_name=kernel_name,
            startup_timeout=int(run.config.kernel_start_timeout),
            stdout_file=_LogWriter(run.ctx.log),
            stderr_file=_LogWriter(run.ctx.log),
        )
        try:
            client.execute()
        finally:
            if client.kc is not None:
                client.kc.stop_channels()
            manager.notebook_complete()
        return manager.nb


papermill_engines.register(ENGINE_NAME, NbcronEngine)


# -- one run --------------------------------------------------------------------------------


class NotebookRun:
    """One notebook execution: kernel, watchdog (timeout and cancel), papermill, artifacts."""

    def __init__(
        self, spec: NotebookSpec, ctx: RunContext, nb: NotebookNode, kernel_name: str
    ) -> None:
        self.spec, self.ctx, self.nb, self.kernel_name = spec, ctx, nb, kernel_name
        self.config = ctx.config
        self.kernel: kernels.Kernel | None = None
        self.manager: ProgressManager | None = None
        self.stop_reason: Outcome | None = None
        self.started = time.monotonic()
        self.done = threading.Event()

    def execute(self, parameters: dict[str, Any], language: str) -> Result:
        try:
            self.kernel = self._acquire_kernel()
        except Exception as exc:
            message = f"kernel {self.kernel_name!r} could not start: {type(exc).__name__}: {exc}"
            self.ctx.log(f"[nbcron] {message}\n")
            return Result(outcome=Outcome.FAILED, error=message)
        threading.Thread(target=self._watch, name="nbcron-watchdog", daemon=True).start()
        error: BaseException | None = None
        try:
            self._papermill(parameters, language)
        except Exception as exc:
            error = exc
        finally:
            self.done.set()
            kernels.retire(self.kernel)
        self._store(self.manager.nb if self.manager is not None else self.nb)
        return self._result(error)

    def _acquire_kernel(self) -> kernels.Kernel:
        pool = kernels.active_pool()
        if pool is not None and not self.ctx.env:  # pooled kernels cannot take per-task env
            kernel = pool.take(self.kernel_name)
            if kernel is not None:
                self.ctx.log(
                    f"[nbcron] kernel {self.kernel_name} (pid {kernel.pid}) from the warm pool,"
                    f" fresh and never used\n"
                )
                return kernel
        self.ctx.log(f"[nbcron] starting kernel {self.kernel_name}\n")
        kernel = kernels.start_kernel(
            self.kernel_name,
            cwd=kernel_cwd(self.config),
            env=self.ctx.env,
            timeout=self.config.kernel_start_timeout,
        )
        self.ctx.log(f"[nbcron] kernel {self.kernel_name} (pid {kernel.pid}) ready\n")
        return kernel

    def _papermill(self, parameters: dict[str, Any], language: str) -> None:
        papermill.execute_notebook(
            self.nb,
            None,
            parameters=parameters or None,
            engine_name=ENGINE_NAME,
            kernel_name=self.kernel_name,
            language=language,
            progress_bar=False,
            log_output=False,
            start_timeout=int(self.config.kernel_start_timeout),
            nbcron_run=self,
        )

    def _watch(self) -> None:
        """Stop the kernel on cancel or at the deadline: interrupt, then kill after a grace."""
        timeout = self.ctx.timeout_seconds
        deadline = self.started + timeout if timeout else None
        while not self.done.wait(_POLL_SECONDS):
            if self.ctx.cancel_event.is_set():
                self.stop_reason = Outcome.CANCELLED
            elif deadline is not None and time.monotonic() >= deadline:
                self.stop_reason = Outcome.TIMED_OUT
            if self.stop_reason is not None:
                self._stop_kernel()
                return

    def _stop_kernel(self) -> None:
        assert self.kernel is not None
        why = "cancel requested" if self.stop_reason is Outcome.CANCELLED else "time is up"
        self.ctx.log(f"[nbcron] {why}: interrupting the kernel\n")
        self.kernel.interrupt()
        if not self.done.wait(self.config.kill_grace_seconds):
            self.ctx.log("[nbcron] the kernel did not stop; killing it\n")
            self.kernel.kill()

    def _store(self, output: NotebookNode) -> None:
        output.metadata["nbcron"] = {"run_id": self.ctx.run_id, "task": self.ctx.task_name}
        self.ctx.add_artifact("output.ipynb", IPYNB_TYPE, nbformat.writes(output).encode())
        if not self.spec.report:
            return
        try:
            html = render_report(output, hide_code=self.spec.hide_code)
        except Exception as exc:  # a report that cannot render must not hide the run's result
            self.ctx.log(f"[nbcron] HTML report failed: {type(exc).__name__}: {exc}\n")
            return
        self.ctx.add_artifact("report.html", HTML_TYPE, html.encode())

    def _result(self, error: BaseException | None) -> Result:
        where = self._where(error)
        if self.stop_reason is Outcome.TIMED_OUT:
            text = f"timed out after {self.ctx.timeout_seconds}s{where}"
            return Result(outcome=Outcome.TIMED_OUT, error=text)
        if self.stop_reason is Outcome.CANCELLED:
            return Result(outcome=Outcome.CANCELLED, error=f"cancelled{where}")
        if error is None:
            self.ctx.log("[nbcron] notebook finished\n")
            return Result(outcome=Outcome.SUCCEEDED, exit_code=0)
        message = _error_text(error, self._current())
        self.ctx.log(f"[nbcron] {message}\n")
        return Result(outcome=Outcome.FAILED, exit_code=1, error=message)

    def _current(self) -> int | None:
        return self.manager.current if self.manager is not None else None

    def _where(self, error: BaseException | None) -> str:
        index = getattr(error, "cell_index", None)
        index = self._current() if index is None else index
        return f" while running cell {index}" if index is not None else ""


def _error_text(error: BaseException, current: int | None) -> str:
    """`cell 3 (In [2]) raised ZeroDivisionError: division by zero`, or what else happened."""
    if isinstance(error, PapermillExecutionError):
        return (
            f"cell {error.cell_index} (In [{error.exec_count}]) raised"
            f" {error.ename}: {error.evalue}"
        )
    name = type(error).__name__
    if name == "DeadKernelError":
        return f"the kernel died while running cell {current}"
    return f"notebook run failed: {name}: {error}"


_exporters: dict[bool, Any] = {}
_exporter_lock = threading.Lock()


def render_report(nb: NotebookNode, *, hide_code: bool) -> str:
    """The executed notebook as standalone HTML (nbconvert), code cells hidden on request.

    One exporter per setting is kept: building one costs ~4x the render itself. Renders are
    serialised because nbconvert's preprocessors are not documented as thread-safe.
    """
    from nbconvert import HTMLExporter

    with _exporter_lock:
        exporter = _exporters.get(hide_code)
        if exporter is None:
            exporter = HTMLExporter(exclude_input=hide_code, exclude_input_prompt=hide_code)
            _exporters[hide_code] = exporter
        body, _ = exporter.from_notebook_node(nb)
    return str(body)


def warm_report() -> None:
    """Render an empty notebook once, so the first real report does not load templates."""
    try:
        for hide_code in (False, True):
            render_report(nbformat.v4.new_notebook(), hide_code=hide_code)
    except Exception as exc:  # only a warm-up
        log.warning("HTML report warm-up failed: %s", exc)


# -- the executor ------------------------------------------------------------------------------


class NotebookExecutor(Executor):
    kind = "notebook"
    spec_type = NotebookSpec

    def parse_spec(
        self, fields: Mapping[str, Any], *, config: ExecutorConfig | None = None
    ) -> msgspec.Struct:
        """Parse, validate, and stamp an uploaded notebook with its hash and version."""
        spec = super().parse_spec(fields, config=config)
        assert isinstance(spec, NotebookSpec)
        return stamp_version(spec)

    def validate(self, spec: Any) -> None:
        if (spec.notebook is None) == (spec.notebook_content is None):
            raise SpecError(
                "give exactly one of notebook (a path under the notebooks folder) or"
                " notebook_content (the .ipynb JSON); send null to clear the other",
                field="notebook",
            )
        for name in spec.parameters:
            if not name.isidentifier():
                raise SpecError(f"parameter name {name!r} is not an identifier", field="parameters")
        if spec.notebook is not None:
            check_relative(spec.notebook)
            return
        nb = notebook_from_content(spec.notebook_content)
        check_against_notebook(nb, spec.parameters)

    def validate_on_machine(self, spec: Any, config: ExecutorConfig) -> None:
        """On a machine that has the notebooks folder, the named notebook must be in it."""
        if spec.notebook is None or not config.notebooks_dir.is_dir():
            return
        nb = load_notebook(spec, config)
        check_against_notebook(nb, spec.parameters)

    def check_parameters(
        self, spec: Any, parameters: Mapping[str, Any], *, config: ExecutorConfig | None = None
    ) -> None:
        if spec.notebook_content is None and (config is None or not config.notebooks_dir.is_dir()):
            return  # the worker checks again when it loads the notebook
        nb = load_notebook(spec, config or ExecutorConfig())
        check_against_notebook(nb, {**spec.parameters, **parameters})

    def on_worker_start(self, config: ExecutorConfig) -> None:
        # nbconvert's first export loads templates (~1 s); pay that before the first run
        threading.Thread(target=warm_report, name="nbcron-report-warmup", daemon=True).start()
        if config.kernel_pool_size > 0:
            kernels.start_pool(
                size=config.kernel_pool_size,
                names=config.kernel_pool_kernels,
                cwd=kernel_cwd(config),
                start_timeout=config.kernel_start_timeout,
            )

    def on_worker_stop(self) -> None:
        kernels.stop_pool()

    def execute(self, spec: Any, ctx: RunContext) -> Result:
        try:
            nb = load_notebook(spec, ctx.config)
            parameters = {**spec.parameters, **ctx.parameters}
            check_against_notebook(nb, parameters)
            kernel_name = spec.kernel or nb.metadata.get("kernelspec", {}).get("name")
            kernel_name = kernel_name or DEFAULT_KERNEL
            language = kernels.kernel_spec(kernel_name).language or notebook_language(nb)
        except (SpecError, kernels.KernelUnavailableError) as exc:
            ctx.log(f"[nbcron] {exc}\n")
            return Result(outcome=Outcome.FAILED, error=str(exc))
        ctx.log(f"[nbcron] notebook {_describe(spec)} on kernel {kernel_name}\n")
        return NotebookRun(spec, ctx, nb, kernel_name).execute(parameters, language)


def stamp_version(spec: NotebookSpec) -> NotebookSpec:
    """Uploaded content gets its hash; a new hash bumps `notebook_version` (1 for the first)."""
    if spec.notebook_content is None:
        return msgspec.structs.replace(spec, notebook_version=None, notebook_sha256=None)
    digest = content_sha256(spec.notebook_content)
    if digest == spec.notebook_sha256 and spec.notebook_version:
        return spec
    version = (spec.notebook_version or 0) + 1
    return msgspec.structs.replace(spec, notebook_sha256=digest, notebook_version=version)


def _describe(spec: NotebookSpec) -> str:
    if spec.notebook is not None:
        return repr(spec.notebook)
    return f"snapshot v{spec.notebook_version} (sha256 {str(spec.notebook_sha256)[:12]})"
