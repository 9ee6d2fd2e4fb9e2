"""`nbcron jupyter enable|disable`: load the %schedule magic in every IPython kernel.

A startup file in the IPython profile (`<ipython dir>/profile_<name>/startup/`) is used rather
than an edit of `ipython_config.py`: it is one file nbcron owns, easy to remove, and it stays
silent in kernels of other environments where nbcron is not installed.
"""

from __future__ import annotations

from pathlib import Path

STARTUP_NAME = "50-nbcron-magic.py"
STARTUP_CODE = """\
# Written by `nbcron jupyter enable`; `nbcron jupyter disable` removes it.
# Loads the %schedule magic in every IPython kernel that can import nbcron.
try:
    import service.magic as _nbcron_magic
except ImportError:  # a kernel of another environment: nbcron is not installed there
    pass
else:
    get_ipython().extension_manager.load_extension("service.magic")  # noqa: F821
    del _nbcron_magic
"""


def startup_file(profile: str = "default", ipython_dir: Path | None = None) -> Path:
    """Where the startup file of `profile` goes (IPYTHONDIR is honoured)."""
    from IPython.paths import get_ipython_dir

    root = ipython_dir or Path(get_ipython_dir())
    return root / f"profile_{profile}" / "startup" / STARTUP_NAME


def enable(profile: str = "default", ipython_dir: Path | None = None) -> Path:
    """Write the startup file (again, if it is there); return its path."""
    path = startup_file(profile, ipython_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(STARTUP_CODE)
    return path


def disable(profile: str = "default", ipython_dir: Path | None = None) -> Path | None:
    """Remove the startup file; return its path, or None when it was not there."""
    path = startup_file(profile, ipython_dir)
    if not path.is_file():
        return None
    path.unlink()
    return path
