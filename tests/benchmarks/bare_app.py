"""Baseline: a bare Litestar route served by uvicorn exactly as `nbcron api` serves its app
(`python -m tests.benchmarks.bare_app PORT [WORKERS]`, workers as `api_workers`)."""

from __future__ import annotations

import sys

import uvicorn
from litestar import Litestar, get


@get("/", sync_to_thread=False)
def hello() -> dict[str, bool]:
    return {"ok": True}


app = Litestar([hello])

if __name__ == "__main__":
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    uvicorn.run(
        app if workers <= 1 else "tests.benchmarks.bare_app:app",
        host="127.0.0.1",
        port=int(sys.argv[1]),
        log_level="warning",
        access_log=False,
        workers=workers,
    )
