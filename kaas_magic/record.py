"""The record every run leaves: where it ran and where its time went."""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass, field

PHASES = ("queue", "transfer_in", "setup", "execute", "transfer_out")


@dataclass
class Timings:
    """Seconds spent in each phase of one call; the phases add up to ``total``.

    queue        waiting for a worker (routing, warm-up of the pool) and for a free slot
    transfer_in  serialising inputs and moving them to the worker
    setup        compiling the cell, preparing its namespace; device warm-up when cold
    execute      running the cell and waiting for the device to finish (on OpenCL, with the
                 copies of results home, which are queued behind the work and waited
                 for at once)
    transfer_out device-to-host copies, serialising outputs, moving them back
    """

    queue: float = 0.0
    transfer_in: float = 0.0
    setup: float = 0.0
    execute: float = 0.0
    transfer_out: float = 0.0
    total: float = 0.0

    def as_ms(self) -> dict[str, float]:
        return {k: v * 1e3 for k, v in asdict(self).items()}


@dataclass
class RunRecord:
    call_id: str
    target: str
    backend: str = ""
    kind: str = ""  # device | simulator | fallback
    device: str = ""
    worker: str = ""
    host: str = ""
    cold: bool = False
    ok: bool = True
    error: str | None = None
    timings: Timings = field(default_factory=Timings)
    bytes_in: int = 0
    bytes_out: int = 0
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)
    kernels: dict[str, str] = field(default_factory=dict)  # kernel -> compiled | warm
    started_at: float = 0.0

    @property
    def fallback(self) -> bool:
        return self.kind == "fallback"

    @property
    def simulator(self) -> bool:
        return self.kind == "simulator"

    def label(self) -> str:
        """How the device is presented: never a stand-in as the real thing."""
        if self.kind == "fallback":
            return f"FALLBACK {self.device}"
        if self.kind == "simulator":
            return f"SIMULATOR {self.device}"
        return self.device

    def summary(self) -> str:
        t = self.timings.as_ms()
        state = "ok" if self.ok else f"error {self.error}"
        phases = " ".join(f"{p.replace('transfer_', '')} {t[p]:.1f}" for p in ("queue", "transfer_in", "setup", "execute", "transfer_out"))
        return (
            f"kaas {self.target} [{self.backend}] on {self.label()} @ {self.worker} | "
            f"{'cold' if self.cold else 'warm'} | {state} | total {t['total']:.1f} ms ({phases} ms)"
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fallback"] = self.fallback
        d["simulator"] = self.simulator
        return d

    def __str__(self) -> str:
        return self.summary()

    def _repr_pretty_(self, printer, cycle: bool) -> None:  # IPython's text/plain
        printer.text(self.summary())

    def _repr_html_(self) -> str:
        colour = {"fallback": "#b45309", "simulator": "#6d28d9"}.get(self.kind, "#047857")
        return (
            "<div class='kaas-run' style='font-family:monospace;font-size:12px'>"
            f"<span style='background:{colour};color:white;padding:0 4px;border-radius:3px'>"
            f"{self.kind.upper()}</span> {html.escape(self.summary())}</div>"
        )

