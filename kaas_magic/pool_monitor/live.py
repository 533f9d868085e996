"""The live view: a :class:`Monitor` thread that polls ``pool.metrics()`` and redraws one
ipywidgets ``HTML`` widget, shown under the cell (:func:`monitor`) or docked in
JupyterLab's right side area (:func:`panel`, a ``sidecar``).

Widget messages may be sent from any thread, so the monitor keeps moving while other cells
run, and nothing is ever captured through an ``Output``.

It stops when asked (``.stop()``) or when its pool closes: the inline view is swapped for
a static snapshot and the widget closed, so nothing is left bound to a model. A kernel
restart gives the kernel no way to reach the page (JupyterLab drops a restarting kernel's
messages), so the live HTML carries a CSS timer that every redraw resets: when redraws
stop, the view dims and says it is no longer updating. At interpreter exit the threads are
stopped before the interpreter tears down what they use.

ipywidgets (and sidecar) are imported only inside :func:`monitor` and :func:`panel`.
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from typing import Any, Protocol

from .devices import group_devices
from .history import History, Roster
from .render import render_monitor, render_monitor_text


class MetricsSource(Protocol):
    """What the monitor needs of a pool: ``metrics()``, and its Dask ``client`` to tell
    when the pool has closed."""

    client: Any

    def metrics(self) -> list[dict]: ...


def _adapt_reason(pool: MetricsSource) -> str:
    """The latest autoscaling decision of the pool, if it adapts (see client.adapt)."""
    try:
        return str(getattr(pool, "adapt_reason", lambda: "")() or "")
    except Exception:  # noqa: BLE001 - the monitor shows what it can
        return ""


def _pool_closed(pool: MetricsSource) -> bool:
    return bool(getattr(pool, "closed", False)) or pool.client.status in ("closing", "closed")


KERNEL_EXIT = "kernel shut down"
_running: "weakref.WeakSet[Monitor]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """Kernel restart or shutdown: end every monitor while the kernel can still send."""
    for monitor in list(_running):
        try:
            monitor.stop(KERNEL_EXIT)
        except Exception:  # the kernel can no longer send; the thread has stopped regardless
            pass


class Monitor:
    """A running monitor: its widget, its refresh thread, and ``stop()``.

    ``show_final(data, reason)`` is called with the static snapshot's display data when
    the monitor stops, to replace the live view (inline: ``DisplayHandle.update``; panel:
    the sidecar's outputs).
    """

    def __init__(self, pool: MetricsSource, widget: Any, interval: float, show_final, compact: bool = False):
        self.pool = pool
        self.interval = interval
        self.compact = compact
        self.widget = widget
        self.roster = Roster()
        self.history = History()
        for other in list(_running):  # another live view of this pool: carry on from its history
            if other.pool is pool and other.stopped_because is None:
                self.history.seed(other.history)
                self.roster.marks.extend(other.roster.marks)
                break
        self.metrics: list[dict] = []
        self.stopped_because: str | None = None
        self._show_final = show_final
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kaas-monitor", daemon=True)

    def start(self) -> "Monitor":
        _running.add(self)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _fetch(self) -> tuple[list[dict], str]:
        """Fresh metrics, or the last ones with a note saying why there are none."""
        try:
            return self.pool.metrics(), ""
        except Exception as e:  # a scheduler hiccup: keep showing the last rows
            return self.metrics, f"pool unreachable: {type(e).__name__}: {e}"

    def _take(self, metrics: list[dict], fresh: bool = True) -> None:
        """Keep ``metrics`` as the rows shown; fresh ones are also a sample of history (the
        last rows kept while the pool is unreachable are not)."""
        now = time.time()
        self.metrics = metrics
        self.roster.observe(metrics, now)
        if fresh:
            self.history.add(group_devices(metrics), now)

    def refresh(self) -> None:
        """Poll the pool once and redraw; what the thread does every ``interval``."""
        metrics, note = self._fetch()
        with self._lock:
            if self.stopped_because is not None:
                return
            self._take(metrics, fresh=not note)
            self.widget.value = self.render(note, live=True)

    def render(self, note: str = "", now: float | None = None, live: bool = False) -> str:
        stale_after = max(5.0, 3 * self.interval) if live else None
        return render_monitor(self.metrics, list(self.roster.events), now or time.time(), note, self.compact, stale_after,
                              self.history, list(self.roster.marks), policy=_adapt_reason(self.pool))

    def _run(self) -> None:
        while not self._stopping.is_set():
            if _pool_closed(self.pool):
                self.stop("pool closed")
                return
            began = time.monotonic()
            self.refresh()
            self._stopping.wait(max(0.0, self.interval - (time.monotonic() - began)))

    def stop(self, reason: str = "stopped") -> None:
        """End the refresh thread and leave a static snapshot in place of the live view."""
        with self._lock:
            if self.stopped_because is not None:
                return
            self.stopped_because = reason
        self._stopping.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)
        _running.discard(self)
        if reason == "stopped":  # the pool is still there: the snapshot is of now
            metrics, note = self._fetch()
            self._take(metrics, fresh=not note)
        now = time.time()
        note = f"monitor {reason} at {time.strftime('%H:%M:%S', time.localtime(now))}"
        self._show_final({
            "text/html": self.render(note, now),
            "text/plain": render_monitor_text(self.metrics, note),
        }, reason)
        self.widget.close()

    def __repr__(self) -> str:
        state = f"stopped ({self.stopped_because})" if self.stopped_because else f"every {self.interval:g} s"
        return f"<kaas Monitor {state}; .stop() ends it>"


def _interval(interval: float | None) -> float:
    from .. import config

    return float(interval if interval is not None else config.get("widgets.monitor-interval"))


def monitor(pool: MetricsSource, interval: float | None = None) -> Monitor:
    """Show the pool monitor under the current cell and keep it updating."""
    import ipywidgets
    from IPython.display import display

    starting = render_monitor([], [], time.time(), "starting")
    widget = ipywidgets.HTML(value=starting)
    bundle = {**widget._repr_mimebundle_(), "text/html": starting, "text/plain": "kaas pool monitor (live)"}
    handle = display(bundle, raw=True, display_id=True)
    mon = Monitor(pool, widget, _interval(interval), lambda data, reason: handle.update(data, raw=True))
    mon.refresh()
    return mon.start()


def panel(pool: MetricsSource, interval: float | None = None) -> Monitor:
    """Dock the pool monitor in JupyterLab's right side area (a ``sidecar``)."""
    import ipywidgets
    from sidecar import Sidecar
    from IPython.display import display

    widget = ipywidgets.HTML(value=render_monitor([], [], time.time(), "starting", compact=True))
    side = Sidecar(title="kaas pool", anchor="right")
    side.outputs = ({"output_type": "display_data", "data": widget._repr_mimebundle_(), "metadata": {}},)

    def show_final(data: dict, reason: str) -> None:
        if reason == KERNEL_EXIT:  # the panel's own model dies with the kernel: remove it
            side.close()
        else:
            side.outputs = ({"output_type": "display_data", "data": data, "metadata": {}},)

    display({**side._repr_mimebundle_(), "text/plain": "kaas pool monitor, docked in the right side area"}, raw=True)
    mon = Monitor(pool, widget, _interval(interval), show_final, compact=True)
    mon.refresh()
    return mon.start()
