"""Notebook paths: a task names a notebook relative to the notebooks folder, and never escapes it.

Two layers. `check_relative` needs no file system (so the API can say 422 about `..` or an
absolute path on any machine). `resolve_notebook` resolves symlinks against the real folder and
compares whole path components, so `/srv/notebooks-evil` is not inside `/srv/notebooks`.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from executors import SpecError

FIELD = "notebook"
MAX_PATH_CHARS = 1024


def check_relative(path: str) -> PurePosixPath:
    """Lexical checks: a relative `.ipynb` path without `..`, NUL, backslashes or `~`."""
    if not path or len(path) > MAX_PATH_CHARS:
        raise SpecError(f"notebook path must be 1 to {MAX_PATH_CHARS} characters", field=FIELD)
    if "\x00" in path or "\\" in path:
        raise SpecError("notebook path must not contain NUL bytes or backslashes", field=FIELD)
    pure = PurePosixPath(path)
    if pure.is_absolute() or path.startswith("~"):
        raise SpecError(
            f"notebook path {path!r} must be relative to the notebooks folder", field=FIELD
        )
    if ".." in pure.parts:
        raise SpecError(f"notebook path {path!r} must not contain '..'", field=FIELD)
    if pure.suffix != ".ipynb":
        raise SpecError(f"notebook path {path!r} must end in .ipynb", field=FIELD)
    return pure


def notebooks_root(root: Path) -> Path:
    """The notebooks folder with every symlink resolved; SpecError when it does not exist."""
    try:
        resolved = root.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise SpecError(f"the notebooks folder {str(root)!r} does not exist", field=FIELD) from exc
    if not resolved.is_dir():
        raise SpecError(f"the notebooks folder {str(root)!r} is not a folder", field=FIELD)
    return resolved


def resolve_notebook(root: Path, path: str) -> Path:
    """The real file `path` names under `root`; SpecError if it escapes `root` or is missing."""
    relative = check_relative(path)
    base = notebooks_root(root)
    try:
        target = (base / relative).resolve(strict=True)
    except FileNotFoundError as exc:
        raise SpecError(
            f"notebook {path!r} not found in the notebooks folder", field=FIELD
        ) from exc
    except (OSError, RuntimeError) as exc:  # symlink loops, permissions
        raise SpecError(f"notebook {path!r} cannot be opened: {exc}", field=FIELD) from exc
    if not target.is_relative_to(base):  # compares components, not string prefixes
        raise SpecError(f"notebook {path!r} resolves outside the notebooks folder", field=FIELD)
    if not target.is_file():
        raise SpecError(f"notebook {path!r} is not a file", field=FIELD)
    return target
