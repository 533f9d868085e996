"""The run view under a ``%%kaas`` cell: where the cell ran and where its time went.

The view is one display output with an id (see :class:`ViewDisplay`). While the call runs,
the run's progress callback and a shared ticker replace its HTML by id
(``update_display_data``, through a :class:`DisplaySurface`); when the call ends it is
replaced by the final record. No widget: the record left in the notebook is plain HTML that
renders in classic Notebook, VS Code, nbconvert and GitHub, shows no "model not found" after a
kernel restart, and each cell costs the kernel no comm of its own. A call that ends within
``SHOW_AFTER_SECONDS`` and prints nothing sends its final record only: one message for the
cell, its display (the view of such a call is shown at its first update; see ViewDisplay).

While the call is not final the view counts the seconds since the cell started (like
tqdm), so a slow start or a long cell looks alive. One shared daemon thread re-renders all
live views (see ``_Ticker``); a view that ends within ``TICK_AFTER_SECONDS`` is never ticked.

Printed output never goes through the view: the view is displayed once, and the cell's
stdout follows it in the cell's own output area.

Colours of text and tracks are JupyterLab's CSS variables (``--jp-*``) with light-theme
fallbacks, so the view is readable in the dark theme too; badges are white on saturated
colours, readable in both.
"""
from __future__ import annotations

import html
import itertools
import os
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    from .record import RunRecord, Timings

STATES = ("starting", "queued", "sending", "compiling", "running", "receiving", "done", "error", "cancelled")
FINAL_STATES = frozenset({"done", "error", "cancelled"})
# States in which the call waits for something that ``record.waiting_for`` names.
WAITING_STATES = frozenset({"starting", "queued"})
# States only the worker reports (streamed to the caller before the call's output).
WORKER_STATES = frozenset({"compiling", "running"})

# Phase -> (label, colour, what the time was spent on).
PHASES: dict[str, tuple[str, str, str]] = {
    "startup": ("startup", "#22d3ee", "waiting for the pool to start or a backend to warm up"),
    "queue": ("queue", "#9ca3af", "waiting for a worker and for a free slot on the device"),
    "transfer_in": ("transfer in", "#60a5fa", "serialising the inputs and sending them"),
    "setup": ("compile", "#f59e0b", "compiling the cell and its kernels; device warm-up when cold"),
    "execute": ("execute", "#10b981", "running the cell and waiting for the device"),
    "transfer_out": ("transfer out", "#a78bfa", "copying results to the host and sending them back"),
}

STATE_COLOURS = {
    "starting": "#0891b2", "queued": "#6b7280", "sending": "#2563eb", "compiling": "#d97706",
    "running": "#059669", "receiving": "#7c3aed", "done": "#047857", "error": "#b91c1c", "cancelled": "#92400e",
}
KIND_COLOURS = {"fallback": "#b45309", "simulator": "#6d28d9"}
WARMTH_COLOURS = {"cold": "#1d4ed8", "disk-cached": "#0e7490", "warm": "#65a30d"}

# Theme-aware colours: JupyterLab's variables, with the light theme's values for readers
# without them (classic Notebook, nbconvert, GitHub).
TEXT = "var(--jp-ui-font-color1, inherit)"
MUTED = "var(--jp-ui-font-color2, #6b7280)"
TRACK = "var(--jp-layout-color2, #e5e7eb)"  # as the monitor's: dark in the dark theme
ERROR_TEXT = "var(--jp-error-color1, #b91c1c)"

# The elapsed counter: live views are re-rendered every TICK_SECONDS, but not before
# TICK_AFTER_SECONDS (most cells end sooner; ticking them would only be comm traffic).
TICK_SECONDS = 0.5
TICK_AFTER_SECONDS = 0.3
# The ticker's thread waits this long without a live view before it ends, so that cells run
# one after another do not each start one (a start is a hand-off to the new thread and back,
# about 0.1 ms of the cell).
TICKER_LINGER_SECONDS = 30.0
# A state reported before this is not sent: the ticker shows the state of a call still
# running then, and a call that ends sooner sends its final record only (each message costs
# the notebook's kernel time on every cell).
SHOW_AFTER_SECONDS = 0.3


def format_duration(seconds: float) -> str:
    """Short and exact enough to compare phases: 0.42 ms, 12.3 ms, 1.25 s."""
    ms = seconds * 1e3
    if ms < 10:
        return f"{ms:.2f} ms"
    if ms < 1000:
        return f"{ms:.1f} ms"
    return f"{seconds:.2f} s"


def format_elapsed(seconds: float) -> str:
    """The live counter: 3.2 s; past a minute, 1 min 05 s (tenths no longer matter)."""
    if seconds < 60:
        return f"{max(0.0, seconds):.1f} s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes} min {rest:02d} s"


def badge(text: str, colour: str, title: str = "") -> str:
    return (
        f"<span title='{html.escape(title)}' style='background:{colour};color:#fff;"
        f"padding:0 5px;border-radius:3px;font-weight:600;margin-right:4px'>{html.escape(text)}</span>"
    )


def warmth(record: "RunRecord") -> tuple[str, str]:
    """("cold" | "disk-cached" | "warm", why): whether this call paid for warming up.

    Cold when the call waited for the pool to start or a backend to warm (startup), when
    the worker was still warming or a kernel was compiled for this call; disk-cached when
    a kernel was loaded from the compile cache; warm otherwise.
    """
    if record.timings.startup > 0:
        return "cold", f"waited {format_duration(record.timings.startup)} for the pool to start or a backend to warm up"
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
    """The stacked bar's segments, in the order the phases happen.

    Startup is listed only when the call waited for it: a warm pool's record does not
    show a phase no warm call ever has."""
    seconds = {phase: max(0.0, getattr(timings, phase)) for phase in PHASES}
    if seconds["startup"] == 0:
        del seconds["startup"]
    whole = sum(seconds.values())
    return [
        Segment(phase, PHASES[phase][0], s, s / whole if whole > 0 else 0.0) for phase, s in seconds.items()
    ]


def _where(record: "RunRecord") -> str:
    """"cpu [numpy] on CPU x86_64 @ tcp://...", each part once it is known: the backend,
    device and worker are filled when the call is routed, so a call still starting has
    only its target, and a call cut short after routing still names its device."""
    where = record.target
    if record.backend:
        where += f" [{record.backend}]"
    if record.device:
        where += f" on {record.label()}"
    if record.worker:
        where += f" @ {record.worker}"
    return where


def _status(state: str, record: "RunRecord | None", note: str) -> str:
    """The state, what a waiting call waits for, and the note (an error's name)."""
    waiting = record.waiting_for if record is not None and state in WAITING_STATES else ""
    return state + (f": {waiting}" if waiting else "") + (f" {note}" if note else "")


def render_line(state: str, record: "RunRecord | None", note: str = "") -> str:
    """The one-line text record (``RunRecord.summary`` is this line for a finished call)."""
    if record is None:
        return f"kaas {state}" + (f": {note}" if note else "")
    parts = [f"kaas {_where(record)}"]
    if record.worker:
        parts.append(warmth(record)[0])
    parts.append(_status(state, record, note))
    if record.timings.total > 0:
        phases = " ".join(f"{s.label} {format_duration(s.seconds)}" for s in phase_segments(record.timings))
        parts.append(f"total {format_duration(record.timings.total)} ({phases})")
    return " | ".join(parts)


def render_text(state: str, record: "RunRecord | None", note: str = "") -> str:
    """The plain-text form, what nbconvert, terminals and ``text/plain`` readers see: the
    one-line record, then the record's notes, one a line."""
    notes = list(record.notes) if record is not None else []
    return "\n".join([render_line(state, record, note), *(f"  note: {n}" for n in notes)])


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
        "<div class='kaas-track' style='display:flex;height:10px;width:100%;max-width:640px;border-radius:2px;"
        f"overflow:hidden;background:{TRACK};margin:3px 0'>{blocks}</div>"
        f"<div>{legend}<span class='kaas-total'>total <b>{format_duration(timings.total)}</b></span></div>"
    )


def render_html(state: str, record: "RunRecord | None", note: str = "", elapsed: float | None = None) -> str:
    """The view: state (with what a waiting call waits for and, while not final, the
    seconds since the cell started), where it ran with its badges, the phase bar once
    known, and the record's notes.

    Styles are inline and classes plain so that the static copy survives JupyterLab's
    HTML sanitiser; the classes are what the browser tests look for.
    """
    head = [badge(state, STATE_COLOURS[state], "state of the call")]
    if record is not None and record.waiting_for and state in WAITING_STATES:
        head.append(f"<span class='kaas-waiting' style='color:{MUTED};margin-right:6px'>"
                    f"{html.escape(record.waiting_for)}\u2026</span>")
    if elapsed is not None and state not in FINAL_STATES:
        head.append(f"<span class='kaas-elapsed' title='since the cell started' "
                    f"style='color:{MUTED};margin-right:6px'>{format_elapsed(elapsed)}</span>")
    if record is not None:
        if record.kind in KIND_COLOURS:
            head.append(badge(record.kind.upper(), KIND_COLOURS[record.kind],
                              f"not the {record.target} itself: {record.device}"))
        if record.worker:  # warmth is the worker's, known once the call has one
            temperature, why = warmth(record)
            head.append(badge(temperature, WARMTH_COLOURS[temperature], why))
        backend = f" [{html.escape(record.backend)}]" if record.backend else ""
        on = f" on <b>{html.escape(record.device)}</b>" if record.device else ""
        at = f" @ {html.escape(record.worker)}" if record.worker else ""
        head.append(f"<span class='kaas-where'>kaas <b>{html.escape(record.target)}</b>{backend}{on}{at}</span>")
    else:
        head.append("<span class='kaas-where'>kaas</span>")
    error = note or (record.error if record is not None and state == "error" else "")
    if error:
        head.append(f" <span class='kaas-error' style='color:{ERROR_TEXT}'>{html.escape(str(error))}</span>")
    body = _bar(record.timings) if record is not None and record.timings.total > 0 else ""
    notes = "".join(
        f"<div class='kaas-note' style='color:{MUTED}'>note: {html.escape(str(n))}</div>"
        for n in (list(record.notes) if record is not None else [])
    )
    return (
        f"<div class='kaas-run kaas-state-{state}' style='font-family:var(--jp-code-font-family,monospace);"
        f"font-size:12px;line-height:1.6;color:{TEXT}'><div>{''.join(head)}</div>{body}{notes}</div>"
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
    and sends one widget message. Updates after the final state are ignored. Until then
    the shared ticker re-renders the view so its elapsed counter moves; both render under
    the view's lock.
    """

    def __init__(self, widget: Any, handle: DisplayHandle):
        self._widget = widget
        self._handle = handle
        self._lock = threading.Lock()
        # The counter's base: the view is made before the pool is started or asked for
        # anything, so the count includes the wait for the pool.
        self._started = time.monotonic()
        self._note = ""
        self._shown = ""  # the widget's value, so a tick that changes nothing sends nothing
        self.state = "queued"
        self.record: "RunRecord | None" = None
        _ticker.add(self)

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def update(self, state: str, record: "RunRecord | None", note: str = "") -> None:
        if state not in STATES:
            raise ValueError(f"unknown run state {state!r}; expected one of {', '.join(STATES)}")
        with self._lock:
            if self.finished:
                return
            # A later report without a record does not forget what is known (the device).
            record = record if record is not None else self.record
            self.state, self.record, self._note = state, record, note
            if state in FINAL_STATES:
                self._handle.update(display_data(state, record, note), raw=True)
                self._widget.close()
            elif self.elapsed() >= SHOW_AFTER_SECONDS or (
                    state in WORKER_STATES and not getattr(self._handle, "shown", True)):
                # A view not shown yet is shown at the worker's first word, which comes
                # before anything the call prints or displays (see ViewDisplay).
                self._show(render_html(state, record, note, self.elapsed()))
        if state in FINAL_STATES:
            _ticker.remove(self)

    def tick(self) -> None:
        """Re-render with the time elapsed now (the ticker's call; a no-op once final or
        before ``TICK_AFTER_SECONDS``)."""
        with self._lock:
            elapsed = self.elapsed()
            if self.finished or elapsed < TICK_AFTER_SECONDS:
                return
            self._show(render_html(self.state, self.record, self._note, elapsed))

    def _show(self, value: str) -> None:
        if value != self._shown:
            self._widget.value = self._shown = value

    def finish_if_unfinished(self, error: BaseException | None) -> None:
        """End a view the run never ended: the call failed before it was routed (so no
        progress came at all), or the cell was interrupted outside the call."""
        if isinstance(error, KeyboardInterrupt):
            self.update("cancelled", self.record)
        else:
            self.update("error", self.record, type(error).__name__ if error else "ended without a result")


class _Ticker:
    """One daemon thread for all live views, so many cells running at once (threads,
    ``asyncio``) cost one thread, not one each. It runs while there are live views and
    ends when there has been none for TICKER_LINGER_SECONDS; the next view starts it again.

    Views are held weakly and dropped on their final state: a finished view, or one its
    caller abandoned, is not kept alive (with its widget) by the ticker.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._views: weakref.WeakSet[RunView] = weakref.WeakSet()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        with self._lock:
            return self._thread is not None

    def add(self, view: RunView) -> None:
        with self._lock:
            self._views.add(view)
            if self._thread is not None:
                return
            thread = threading.Thread(target=self._loop, name="kaas-run-view-ticker", daemon=True)
            try:
                thread.start()
            except RuntimeError:  # no thread to be had: the view works, only without its counter
                return
            self._thread = thread

    def remove(self, view: RunView) -> None:
        with self._lock:
            self._views.discard(view)

    def _loop(self) -> None:
        idle_since = None
        while True:
            time.sleep(TICK_SECONDS)  # read each time: tests make it short
            with self._lock:
                # Decided under the lock that ``add`` takes: a view added after this sees
                # no thread and starts one, so none is left without ticks.
                if not self._views:
                    now = time.monotonic()
                    idle_since = now if idle_since is None else idle_since
                    if now - idle_since >= TICKER_LINGER_SECONDS:
                        self._thread = None
                        return
                    continue
                idle_since = None
            self._tick_all()

    def _tick_all(self) -> None:
        # In a function of its own so that no view stays referenced while the loop sleeps.
        with self._lock:
            views = list(self._views)
        for view in views:
            try:
                view.tick()
            except Exception:  # never into the user's cell; a dict the call thread mutated
                pass           # mid-render, a closed comm: the next tick or update redraws


_ticker = _Ticker()


def _frontend_shows_widgets() -> bool:
    """True inside a Jupyter kernel (Lab, Notebook, VS Code); a terminal IPython has no
    frontend for widgets and gets the text record instead."""
    from IPython import get_ipython

    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def inline_view(end_with_cell: bool = True) -> RunView | None:
    """Display a run view in the current cell and return it, or None when the setting
    ``kaas.widgets.inline`` is off or no frontend can show it (a terminal IPython).
    ``end_with_cell=False`` for a call that outlives its cell (``%%kaas --background``):
    the call ends the view itself."""
    from . import config

    if not config.get("widgets.inline") or not _frontend_shows_widgets():
        return None
    from IPython import get_ipython

    shell = get_ipython()
    handle = ViewDisplay(shell)
    # A view that ends with its cell is shown at its first update (see ViewDisplay.open).
    handle.open(lambda: display_data("queued", None), defer=end_with_cell)
    view = RunView(DisplaySurface(handle), handle)
    if end_with_cell:
        _finish_with_cell(view, shell)
    return view


class ViewDisplay:
    """The run view's display output: shown once, then updated by id.

    A view that ends with its cell (``open(..., defer=True)``) is shown at its first update
    instead of at once: a quick call's view is one message, its final record, not a display
    and its update. The run view updates as soon as the call has taken SHOW_AFTER_SECONDS, or
    the worker says it is running (which comes before anything the call prints or displays,
    see call_stream), so the view still comes before the cell's output. Its messages carry
    the cell's parent header, taken when the view is made, whichever thread sends them.

    In a Jupyter kernel the view's messages go straight to the kernel's IOPub socket.
    IPython's ``display()`` and ``update_display()`` would first flush stdout and stderr, and
    each flush waits for the kernel's IOPub thread (two hand-offs between threads) even when
    nothing is waiting to go out: four waits on another thread in every cell with a view.
    Here a stream is flushed before the view is shown only when it holds text (so text
    printed before the view still comes before it), and never before an update, which
    changes an output already in place. The display's id is made here: IPython's reads 16
    bytes from ``os.urandom`` for each. Anywhere else (``capture_output``, a display
    publisher of another kind, a test's fake) it goes through IPython's ``display()``.
    """

    def __init__(self, shell):
        self._shell = shell
        self.display_id = f"kaas-{_DISPLAY_PREFIX}-{next(_DISPLAY_COUNT)}"
        self._ipython_handle = None
        self._pub = None  # the kernel's display publisher, when its messages are sent here
        self._parent: dict = {}
        self.shown = False  # whether the display is out (later messages update it)

    def open(self, data: Callable[[], dict[str, Any]], defer: bool = False) -> None:
        """Show ``data()`` now or, with ``defer`` in a kernel, at the first update (and
        ``data`` is not called)."""
        pub = self._kernel_publisher()
        if pub is None:
            from IPython.display import display

            self._ipython_handle = display(data(), raw=True, display_id=self.display_id)
            self.shown = True
            return
        self._pub, self._parent = pub, pub.parent_header
        if not defer:
            self._send(data())

    def update(self, obj: Any, *, raw: bool = False) -> None:
        """Replace the display's data (showing it, the first time, when it was deferred).
        Callers serialise their calls (RunView's lock)."""
        if self._ipython_handle is not None:
            self._ipython_handle.update(obj, raw=raw)
        elif self._pub is not None and raw:
            self._send(obj)
        else:
            from IPython.display import update_display

            update_display(obj, raw=raw, display_id=self.display_id)

    def _kernel_publisher(self):
        """The kernel's display publisher when it is ipykernel's own (the view's messages
        are then sent as it sends them); None elsewhere: IPython's display() is used."""
        pub = getattr(self._shell, "display_pub", None)
        zmqshell = sys.modules.get("ipykernel.zmqshell")
        if (zmqshell is None or type(pub) is not getattr(zmqshell, "ZMQDisplayPublisher", None)
                or getattr(pub, "store_display_history", False)
                or getattr(pub, "session", None) is None or getattr(pub, "pub_socket", None) is None):
            return None
        return pub

    def _send(self, data: dict[str, Any]) -> None:
        """Publish as ipykernel's publisher does, with its hooks (an ipywidgets ``Output``
        captures the view like any display): a ``display_data`` the first time, then
        ``update_display_data``."""
        pub, first = self._pub, not self.shown
        if first:
            for stream in (sys.stdout, sys.stderr):
                # ipykernel's streams say whether they hold text not yet sent.
                if getattr(stream, "_flush_pending", True) or getattr(stream, "_subprocess_flush_pending", False):
                    stream.flush()
        content = {"data": data, "metadata": {}, "transient": {"display_id": self.display_id}}
        msg = pub.session.msg("display_data" if first else "update_display_data", content, parent=self._parent)
        self.shown = True
        for hook in pub._hooks:
            msg = hook(msg)
            if msg is None:
                return
        pub.session.send(pub.pub_socket, msg, ident=pub.topic)


# Display ids: this process's random prefix (ids stay unique across kernel restarts) and a count.
_DISPLAY_PREFIX = os.urandom(6).hex()
_DISPLAY_COUNT = itertools.count(1)


class DisplaySurface:
    """Where a live view's HTML goes: its display, updated by id (``update_display_data``).
    No widget: a widget costs the kernel a comm of its own and a message per change on every
    cell, and a display update reaches the right output from any thread, as the frontend
    finds it by its id."""

    def __init__(self, handle: DisplayHandle):
        self._handle = handle

    @property
    def value(self) -> str:
        return ""

    @value.setter
    def value(self, html_: str) -> None:
        self._handle.update({"text/html": html_, "text/plain": "kaas (running)"}, raw=True)

    def close(self) -> None:
        pass


def _finish_with_cell(view: RunView, shell) -> None:
    """End the view when its cell ends, whatever happened (a no-op when it has ended)."""

    def on_cell_end(result) -> None:
        shell.events.unregister("post_run_cell", on_cell_end)
        view.finish_if_unfinished(result.error_in_exec)

    shell.events.register("post_run_cell", on_cell_end)
