"""The run view under a ``%%kaas`` cell: where the cell ran and where its time went.

While the cell runs, the view is an ipywidgets ``HTML`` widget whose value the run's
progress callback replaces as the call moves through its states. When the call ends the
displayed output is swapped (``update_display``) for a static HTML copy of the final view
and the widget is closed. So the record left in the notebook needs no widget state: it
renders in classic Notebook, VS Code, nbconvert and GitHub, shows no "model not found"
after a kernel restart, and a long notebook does not accumulate one live widget per cell.

Printed output never goes through the widget (ipywidgets' ``Output`` capture misroutes
prints made from threads): the view is displayed once, and the cell's stdout follows it in
the cell's own output area.

ipywidgets is imported only when a view is made, so ``%load_ext kaas_magic`` stays cheap.
"""

from __future__ import annotations

import html
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .record import RunRecord, Timings

STATES = ("queued", "sending", "compiling", "running", "receiving", "done", "error", "cancelled")
FINAL_STATES = frozenset({"done", "error", "cancelled"})

# Phase -> (label, colour, what the time was spent on).
PHASES: dict[str, tuple[str, str, str]] = {
    "queue": ("queue", "#9ca3af", "waiting for a worker and for a free slot on the device"),
    "transfer_in": ("transfer in", "#60a5fa", "serialising the inputs and sending them"),
    "setup": ("compile", "#f59e0b", "compiling the cell and its kernels; device warm-up when cold"),
    "execute": ("execute", "#10b981", "running the cell and waiting for the device"),
    "transfer_out": ("transfer out", "#a78bfa", "copying results to the host and sending them back"),
}

STATE_COLOURS = {
    "queued": "#6b7280", "sending": "#2563eb", "compiling": "#d97706", "running": "#059669",
    "receiving": "#7c3aed", "done": "#047857", "error": "#b91c1c", "cancelled": "#92400e",
}
KIND_COLOURS = {"fallback": "#b45309", "simulator": "#6d28d9"}
WARMTH_COLOURS = {"cold": "#1d4ed8", "disk-cached": "#0e7490", "warm": "#65a30d"}


def format_duration(seconds: float) -> str:
    """Short and exact enough to compare phases: 0.42 ms, 12.3 ms, 1.25 s."""
    ms = seconds * 1e3
    if ms < 10:
        return f"{ms:.2f} ms"
    if ms < 1000:
        return f"{ms:.1f} ms"
    return f"{seconds:.2f} s"


def badge(text: str, colour: str, title: str = "") -> str:
    return (
        f"<span title='{html.escape(title)}' style='background:{colour};color:#fff;"
        f"padding:0 5px;border-radius:3px;font-weight:600;margin-right:4px'>{html.escape(text)}</span>"
    )


def warmth(record: "RunRecord") -> tuple[str, str]:
    """("cold" | "disk-cached" | "warm", why): whether this call paid for warming up.

    Cold when the worker was still warming or a kernel was compiled for this call;
    disk-cached when a kernel was loaded from the compile cache; warm otherwise.
    """
    if record.cold:
        return "cold", "the worker was still warming up when the call arrived"
    compiled = sorted(name for name, how in record.kernels.items() if how == "compiled")
    if compiled:
        return "cold", "compiled for this call: " + ", ".join(compiled)
    cached = sorted(name for name, how in record.kernels.items() if how == "disk")
    if cached:
        return "disk-cached", "loaded from the compile cache: " + ", ".join(cached)
    return "warm", "warm worker" + (", warm kernels: " + ", ".join(sorted(record.kernels)) if record.kernels else "")


@dataclass(frozen=True)
class Segment:
    phase: str
    label: str
    seconds: float
    fraction: float  # of the phases' sum, for the bar's width


def phase_segments(timings: "Timings") -> list[Segment]:
    """The stacked bar's segments, in the order the phases happen."""
    seconds = {phase: max(0.0, getattr(timings, phase)) for phase in PHASES}
    whole = sum(seconds.values())
    return [
        Segment(phase, PHASES[phase][0], s, s / whole if whole > 0 else 0.0) for phase, s in seconds.items()
    ]


def _where(record: "RunRecord") -> str:
    # The device is known once the worker has replied: not for a call cut short.
    on = f" on {record.label()}" if record.device else ""
    return f"{record.target} [{record.backend}]{on} @ {record.worker}"


def render_text(state: str, record: "RunRecord | None", note: str = "") -> str:
    """The plain-text form, what nbconvert, terminals and ``text/plain`` readers see."""
    if record is None or not record.worker:
        return f"kaas {state}" + (f": {note}" if note else "")
    parts = [f"kaas {_where(record)}", warmth(record)[0], state + (f" {note}" if note else "")]
    if record.timings.total > 0:
        phases = " ".join(f"{s.label} {format_duration(s.seconds)}" for s in phase_segments(record.timings))
        parts.append(f"total {format_duration(record.timings.total)} ({phases})")
    return " | ".join(parts)


def _bar(timings: "Timings") -> str:
    segments = phase_segments(timings)
    blocks = "".join(
        f"<div class='kaas-phase kaas-phase-{s.phase}' title='{html.escape(s.label)}: "
        f"{format_duration(s.seconds)} ({html.escape(PHASES[s.phase][2])})' "
        f"style='width:{100 * s.fraction:.2f}%;background:{PHASES[s.phase][1]}'></div>"
        for s in segments if s.fraction > 0
    )
    legend = "".join(
        f"<span class='kaas-phase-value kaas-phase-{s.phase}' style='margin-right:10px'>"
        f"<span style='display:inline-block;width:8px;height:8px;background:{PHASES[s.phase][1]};"
        f"margin-right:3px'></span>{html.escape(s.label)} <b>{format_duration(s.seconds)}</b></span>"
        for s in segments
    )
    return (
        "<div style='display:flex;height:10px;width:100%;max-width:640px;border-radius:2px;"
        f"overflow:hidden;background:#e5e7eb;margin:3px 0'>{blocks}</div>"
        f"<div>{legend}<span class='kaas-total'>total <b>{format_duration(timings.total)}</b></span></div>"
    )


def render_html(state: str, record: "RunRecord | None", note: str = "") -> str:
    """The view: state, where it ran with its badges, and (once known) the phase bar.

    Styles are inline and classes plain so that the static copy survives JupyterLab's
    HTML sanitiser; the classes are what the browser tests look for.
    """
    head = [badge(state, STATE_COLOURS[state], "state of the call")]
    if record is not None and record.worker:
        if record.kind in KIND_COLOURS:
            head.append(badge(record.kind.upper(), KIND_COLOURS[record.kind],
                              f"not the {record.target} itself: {record.device}"))
        temperature, why = warmth(record)
        head.append(badge(temperature, WARMTH_COLOURS[temperature], why))
        on = f"on <b>{html.escape(record.device)}</b> " if record.device else ""
        head.append(
            f"<span class='kaas-where'>kaas <b>{html.escape(record.target)}</b> "
            f"[{html.escape(record.backend)}] {on}@ {html.escape(record.worker)}</span>"
        )
    elif record is not None:
        head.append(f"<span class='kaas-where'>kaas <b>{html.escape(record.target)}</b></span>")
    else:
        head.append("<span class='kaas-where'>kaas</span>")
    error = note or (record.error if record is not None and state == "error" else "")
    if error:
        head.append(f" <span class='kaas-error' style='color:#b91c1c'>{html.escape(str(error))}</span>")
    body = _bar(record.timings) if record is not None and record.timings.total > 0 else ""
    return (
        f"<div class='kaas-run kaas-state-{state}' style='font-family:var(--jp-code-font-family,monospace);"
        f"font-size:12px;line-height:1.6'><div>{''.join(head)}</div>{body}</div>"
    )


class DisplayHandle(Protocol):
    def update(self, obj: Any, *, raw: bool = False) -> None: ...


def display_data(state: str, record: "RunRecord | None", note: str = "", widget: Any = None) -> dict[str, Any]:
    """The display data: the live widget while running, plus HTML and text for readers
    that cannot show widgets (and, once the call ended, only those)."""
    data: dict[str, Any] = {
        "text/html": render_html(state, record, note),
        "text/plain": render_text(state, record, note),
    }
    if widget is not None:
        data["application/vnd.jupyter.widget-view+json"] = widget._repr_mimebundle_()[
            "application/vnd.jupyter.widget-view+json"
        ]
    return data


class RunView:
    """One call's live view. ``update`` is the run's progress callback.

    ``update`` is thread-safe and does no waiting: it renders a few hundred bytes of HTML
    and sends one widget message. Updates after the final state are ignored.
    """

    def __init__(self, widget: Any, handle: DisplayHandle):
        self._widget = widget
        self._handle = handle
        self._lock = threading.Lock()
        self.state = "queued"
        self.record: "RunRecord | None" = None

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    def update(self, state: str, record: "RunRecord | None", note: str = "") -> None:
        if state not in STATES:
            raise ValueError(f"unknown run state {state!r}; expected one of {', '.join(STATES)}")
        with self._lock:
            if self.finished:
                return
            self.state, self.record = state, record
            if state in FINAL_STATES:
                self._handle.update(display_data(state, record, note), raw=True)
                self._widget.close()
            else:
                self._widget.value = render_html(state, record, note)

    def finish_if_unfinished(self, error: BaseException | None) -> None:
        """End a view the run never ended: the call failed before it was routed (so no
        progress came at all), or the cell was interrupted outside the call."""
        if isinstance(error, KeyboardInterrupt):
            self.update("cancelled", self.record)
        else:
            self.update("error", self.record, type(error).__name__ if error else "ended without a result")


def _frontend_shows_widgets() -> bool:
    """True inside a Jupyter kernel (Lab, Notebook, VS Code); a terminal IPython has no
    frontend for widgets and gets the text record instead."""
    from IPython import get_ipython

    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def inline_view() -> RunView | None:
    """Display a run view in the current cell and return it, or None when the setting
    ``kaas.widgets.inline`` is off, ipywidgets is missing or no frontend can show it."""
    from . import config

    if not config.get("widgets.inline") or not _frontend_shows_widgets():
        return None
    try:
        import ipywidgets
    except ImportError:
        return None
    from IPython import get_ipython
    from IPython.display import display

    widget = ipywidgets.HTML(value=render_html("queued", None))
    view = RunView(widget, display(display_data("queued", None, widget=widget), raw=True, display_id=True))
    _finish_with_cell(view, get_ipython())
    return view


def _finish_with_cell(view: RunView, shell) -> None:
    """End the view when its cell ends, whatever happened (a no-op when it has ended)."""

    def on_cell_end(result) -> None:
        shell.events.unregister("post_run_cell", on_cell_end)
        view.finish_if_unfinished(result.error_in_exec)

    shell.events.register("post_run_cell", on_cell_end)
