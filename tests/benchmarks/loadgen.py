"""An open-loop HTTP/1.1 load generator: requests leave on a fixed schedule, whatever the
server does, and latency is measured from the scheduled time (no coordinated omission)."""

from __future__ import annotations

import asyncio
import gc
import time
from collections import defaultdict
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Request:
    label: str
    method: str
    path: str
    body: bytes = b""


@dataclass
class Result:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    seconds: float = 0.0  # from the first request's departure to the last answer

    @property
    def throughput(self) -> float:
        """Answers per second: below the offered rate when the server fell behind."""
        done = sum(len(v) for v in self.latencies.values())
        return done / self.seconds if self.seconds else 0.0


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def _exchange(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], raw: bytes) -> int:
    reader, writer = conn
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(
        (int(v.split(":", 1)[1]) for v in lines if v.lower().startswith("content-length:")), 0
    )
    await reader.readexactly(length)
    return status


def _raw(req: Request, headers: dict[str, str]) -> bytes:
    head = [f"{req.method} {req.path} HTTP/1.1", "Host: 127.0.0.1", "Connection: keep-alive"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    if req.body:
        head += ["Content-Type: application/json", f"Content-Length: {len(req.body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + req.body


async def _run(
    port: int,
    requests: list[Request],
    rate: float,
    seconds: float,
    headers: dict[str, str],
    connections: int,
) -> Result:
    result = Result()
    pool: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(await _open(port))
    raws = [_raw(r, headers) for r in requests]
    start = time.perf_counter()
    total = int(rate * seconds)

    async def one(i: int) -> None:
        scheduled = start + i / rate
        req = requests[i % len(requests)]
        conn = await pool.get()
        try:
            status = await _exchange(conn, raws[i % len(raws)])
            if status >= 400:
                result.errors[req.label] += 1
        except (OSError, asyncio.IncompleteReadError, ValueError):
            result.errors[req.label] += 1
            conn = await _open(port)
        finally:
            pool.put_nowait(conn)
        result.latencies[req.label].append((time.perf_counter() - scheduled) * 1000)

    tasks = []
    for i in range(total):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    result.seconds = time.perf_counter() - start
    return result


def run_open_loop(
    port: int,
    requests: list[Request],
    *,
    rate: float,
    seconds: float,
    headers: dict[str, str] | None = None,
    connections: int = 64,
) -> Result:
    """Send `rate` requests/s for `seconds`, cycling through `requests`.

    The generator's own garbage collector is held off meanwhile: a full collection of the test
    process's heap would stall every departure and be counted as the server's latency."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        return asyncio.run(_run(port, requests, rate, seconds, headers or {}, connections))
    finally:
        gc.enable()
        gc.unfreeze()
