"""What one reproduction measured: the completion times of single tasks, the sharing
streams, the targets skipped and why, and the arithmetic the paper's figure is."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .children._child import PHASES
from .naive import NaiveRun
from .tasks import KIND_LABEL, Task


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def reduction_pct(naive: float, kaas: float) -> float:
    """Completion-time reduction as the paper states it: 1 - KaaS / naive, in percent."""
    return 100.0 * (1.0 - kaas / naive)


@dataclass
class Completion:
    task: Task
    kind: str  # of the device KaaS ran on: device, simulator or fallback
    device: str  # as the run record presents it ("FALLBACK CPU stand-in for fpga: ...")
    naive: list[NaiveRun]
    kaas: list[float]

    @property
    def naive_median(self) -> float:
        return statistics.median(r.seconds for r in self.naive)

    @property
    def kaas_median(self) -> float:
        return statistics.median(self.kaas)

    @property
    def reduction(self) -> float:
        return reduction_pct(self.naive_median, self.kaas_median)

    def breakdown(self) -> dict[str, float]:
        """Median seconds of each naive phase, interpreter start-up and exit first."""
        parts = {"process": statistics.median(r.process for r in self.naive)}
        parts.update({p: statistics.median(r.phases.get(p, 0.0) for r in self.naive) for p in PHASES})
        return parts

    @property
    def naive_device(self) -> str:
        run = self.naive[0]
        return run.device if run.kind == "device" else f"{KIND_LABEL[run.kind]} {run.device}"


@dataclass
class Stream:
    """One way of serving several clients' task streams."""

    latencies: list[float]  # seconds from asking to having the result, one per task
    seconds: float  # from the first request to the last result
    busy: float  # fraction of that time the device was busy

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.seconds


@dataclass
class Sharing:
    task: Task
    kind: str
    clients: int
    naive: Stream
    kaas: Stream


@dataclass
class Results:
    header: list[str]
    completions: list[Completion] = field(default_factory=list)
    sharing: list[Sharing] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # target -> why

    def table(self, markdown: bool = False) -> str:
        from .report import tables

        return "\n".join(tables(self, markdown))

    def csv_rows(self) -> list[dict[str, Any]]:
        from .report import csv_rows

        return csv_rows(self)
