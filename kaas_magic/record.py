"""The record every run leaves: where it ran and where its time went."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

PHASES = ("startup", "queue", "transfer_in", "setup", "execute", "transfer_out")


@dataclass
class Timings:
    """Seconds spent in each phase of one call; the phases add up to ``total``.

    startup      waiting for the pool to start, or for a worker's backend to warm up (a
                 call that waited here is recorded as cold)
    queue        waiting for a free slot on the device (and routing)
    transfer_in  serialising inputs and moving them to the worker
    setup        compiling the cell, preparing its namespace; device warm-up when cold
    execute      running the cell and waiting for the device to finish (on OpenCL, with the
                 copies of results home, which are queued behind the work and waited
                 for at once)
    transfer_out device-to-host copies, serialising outputs, moving them back
    """

    startup: float = 0.0
    queue: float = 0.0
    transfer_in: float = 0.0
    setup: float = 0.0
    execute: float = 0.0
    transfer_out: float = 0.0
    total: float = 0.0

    @classmethod
    def balanced(cls, parts: dict[str, float], total: float, rest: str = "queue") -> "Timings":
        """Timings whose phases add up to ``total`` exactly: ``parts`` (seconds by phase,
        any missing taken as 0, any negative as 0), the time they leave unexplained added to
        phase ``rest``. Parts that add up to more than the total (wire times estimated
        across two clocks) are scaled down together: no phase is ever reported longer than
        the whole call."""
        total = max(0.0, total)
        seconds = {phase: max(0.0, float(parts.get(phase, 0.0))) for phase in PHASES}
        known = sum(seconds.values())
        if known > total:
            scale = total / known
            seconds = {phase: value * scale for phase, value in seconds.items()}
        else:
            seconds[rest] += total - known
        return cls(**seconds, total=total)

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
    # What the call is waiting for while it waits ("starting the pool", "warming jax on
    # worker 1"); empty once it runs.
    waiting_for: str = ""
    # Things the user did not ask about but may want to know, shown as info lines in the
    # run view (a name the cell made that cannot travel, a worker replaced meanwhile).
    notes: list[str] = field(default_factory=list)
    # Kept buffers of another backend that the worker converted for this call (a NumPy
    # handle used by a JAX cell): {name, from, to, device, copied, how, why, nbytes} each,
    # ``copied`` False when the call used the same memory through DLPack (worker.convert).
    conversions: list[dict] = field(default_factory=list)

    def add_conversions(self, conversions) -> None:
        """Takes a reply's conversions, and a note line for each (shown in the run view)."""
        self.conversions = [dict(c) for c in conversions or ()]
        self.notes += [conversion_note(c) for c in self.conversions]

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

    @property
    def state(self) -> str:
        """How the call ended, in the run view's words: done, error or cancelled."""
        if self.ok:
            return "done"
        return "cancelled" if self.error in ("KeyboardInterrupt", "CellInterrupted") else "error"

    def summary(self) -> str:
        """One line, worded as the run view's text form (``widgets.render_line``) so that
        a record reads the same under a cell, in a terminal and in ``%kaas last``."""
        from .widgets import render_line  # widgets imports nothing at load time: no cycle

        return render_line(self.state, self, str(self.error or "") if self.state == "error" else "")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fallback"] = self.fallback
        d["simulator"] = self.simulator
        return d

    def __str__(self) -> str:
        return self.summary()

    def _repr_pretty_(self, printer, cycle: bool) -> None:  # IPython's text/plain: the line and its notes
        from .widgets import render_text

        printer.text(render_text(self.state, self, str(self.error or "") if self.state == "error" else ""))

    def _repr_html_(self) -> str:  # %kaas last: the run view's final form, word for word
        from .widgets import render_html

        return render_html(self.state, self, str(self.error or "") if self.state == "error" else "")


def conversion_note(conversion: dict) -> str:
    """A conversion as one line: ``x: numpy -> jax on cpu, zero-copy (dlpack)``."""
    what = "copied" if conversion.get("copied") else "zero-copy"
    line = (f"{conversion.get('name')}: {conversion.get('from')} -> {conversion.get('to')} on "
            f"{conversion.get('device')}, {what} ({conversion.get('how')})")
    return line + (f": {conversion['why']}" if conversion.get("why") else "")
