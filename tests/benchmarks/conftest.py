"""Benchmark harness: every benchmark records figures next to a baseline measured in the same
run; the session ends by printing one markdown table (and writing it to test-artifacts/)."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.support import ROOT

OUT = ROOT / "test-artifacts" / "benchmarks.md"


@dataclass(frozen=True)
class Figure:
    name: str
    value: float
    unit: str
    baseline_name: str = ""
    baseline: float | None = None
    target: str = ""
    higher_is_better: bool = True

    @property
    def ratio(self) -> float | None:
        if not self.baseline:
            return None
        return self.value / self.baseline

    def row(self) -> str:
        ratio = f"{self.ratio:.2f}" if self.ratio is not None else "-"
        base = f"{self.baseline:,.1f} {self.unit} ({self.baseline_name})" if self.baseline else "-"
        digits = 2 if self.unit == "x" else 1  # a ratio near its bound needs two
        value = f"{self.value:,.{digits}f}"
        return f"| {self.name} | {value} {self.unit} | {base} | {ratio} | {self.target} |"


class Recorder:
    def __init__(self) -> None:
        self.figures: list[Figure] = []

    def add(self, name: str, value: float, unit: str, **kw: object) -> Figure:
        figure = Figure(name, value, unit, **kw)  # type: ignore[arg-type]
        self.figures.append(figure)
        print(figure.row())
        return figure


_recorder = Recorder()


@pytest.fixture(scope="session")
def record() -> Recorder:
    return _recorder


def machine() -> str:
    mem = psutil.virtual_memory().total / 2**30
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


def table(figures: list[Figure]) -> str:
    head = ["| figure | nbcron | baseline (same run) | ratio | target |", "|---|---|---|---|---|"]
    return "\n".join([f"Machine: {machine()}", "", *head, *(f.row() for f in figures)])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _recorder.figures:
        return
    text = table(_recorder.figures)
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(text + "\n")
    terminalreporter.write_sep("=", "nbcron benchmarks")
    terminalreporter.write_line(text)
    terminalreporter.write_line(f"(written to {Path(OUT).relative_to(ROOT)})")
