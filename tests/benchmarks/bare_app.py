"""Baseline: a bare Litestar route served by uvicorn exactly as `nbcron api` serves its app."""

from __future__ import annotations

import sys

import uvicorn
from litestar import Litestar, get


@get("/", sync_to_thread=False)
def hello() -> dict[str, bool]:
    return {"ok": True}


if __name__ == "__main__":
    uvicorn.run(
        Litestar([hello]),
        host="127.0.0.1",
        port=int(sys.argv[1]),
        log_level="warning",
        access_log=False,
    )
