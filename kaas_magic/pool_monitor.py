"""The pool monitor: one live row per device, refreshed from a background thread.

``monitor(pool)`` shows it under the cell, ``panel(pool)`` in JupyterLab's right side area
(a ``sidecar``). A daemon thread polls ``pool.metrics()`` and replaces the HTML of one
ipywidgets ``HTML`` widget; widget messages may be sent from any thread, so the monitor
keeps moving while other cells run, and nothing is ever captured through an ``Output``.

It stops when asked (``.stop()``) or when its pool closes: the inline view is swapped for
a static snapshot and the widget closed, so nothing is left bound to a model. A kernel
restart gives the kernel no way to reach the page (JupyterLab drops a restarting kernel's
messages), so the live HTML carries a CSS timer that every redraw resets: when redraws
stop, the view dims and says it is no longer updating. At interpreter exit the threads are
stopped before the interpreter tears down what they use.

Everything the monitor knows comes from ``pool.metrics()``; it touches no device library
itself (no NVML at import time, nor ever).
"""

from __future__ import annotations

import atexit
import html
import statistics
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

from .targets import Service
from .widgets import KIND_COLOURS, badge, format_duration


class MetricsSource(Protocol):
    """What the monitor needs of a pool: ``metrics()``, and its Dask ``client`` to tell
    when the pool has closed."""

    client: Any

    def metrics(self) -> list[dict]: ...


def occupancy(metric: dict) -> float:
    """Calls in flight over the device's concurrency, 0..1."""
    concurrency = metric.get("concurrency") or 0
    return min(1.0, metric.get("in_flight", 0) / concurrency) if concurrency > 0 else 0.0


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_memory(used: int | None, total: int | None) -> str:
    """"3.2 GiB / 80.0 GiB", or what is known of it, or an em dash."""
    if used is None and total is None:
        return "\u2014"
    return f"{format_bytes(used) if used is not None else '?'} / {format_bytes(total) if total is not None else '?'}"


def format_percent(fraction: float) -> str:
    return f"{100 * fraction:.0f}%"


@dataclass(frozen=True)
class TargetLoad:
    """One target across the pool: how much of it is in use."""

    target: str
    devices: int
    in_flight: int
    capacity: int
    busy_10s: float  # mean over its devices: the fraction of device-time busy
    busy_60s: float
    calls: int


def target_loads(metrics: list[dict]) -> list[TargetLoad]:
    """Aggregate device rows per target, for the monitor's summary line."""
    by_target: dict[str, list[dict]] = {}
    for m in metrics:
        by_target.setdefault(m["target"], []).append(m)
    return [
        TargetLoad(
            target=target,
            devices=len(rows),
            in_flight=sum(r.get("in_flight", 0) for r in rows),
            capacity=sum(int(r.get("concurrency") or 0) for r in rows),
            busy_10s=statistics.fmean(r.get("busy_10s", 0.0) for r in rows),
            busy_60s=statistics.fmean(r.get("busy_60s", 0.0) for r in rows),
            calls=sum(r.get("calls", 0) for r in rows),
        )
        for target, rows in sorted(by_target.items())
    ]


class Roster:
    """Which workers the monitor has seen, and a short log of joins and departures."""

    def __init__(self, keep: int = 5):
        self.workers: dict[str, str] = {}  # address -> name
        self.events: deque[str] = deque(maxlen=keep)
        self._first = True

    def observe(self, metrics: list[dict], now: float) -> None:
        current = {m["worker"]: m.get("worker_name") or m["worker"] for m in metrics}
        stamp = time.strftime("%H:%M:%S", time.localtime(now))
        if not self._first:
            for address in current.keys() - self.workers.keys():
                self.events.append(f"{stamp} worker {current[address]} ({address}) joined")
            for address in self.workers.keys() - current.keys():
                self.events.append(f"{stamp} worker {self.workers[address]} ({address}) left")
        self._first = False
        self.workers = current


def _row_key(m: dict) -> tuple:
    return (m["target"], str(m.get("worker_name") or m["worker"]), m["backend"], m.get("device", ""))


def _bar(fraction: float, colour: str, width_px: int = 90) -> str:
    return (
        f"<div style='display:inline-block;vertical-align:middle;width:{width_px}px;height:9px;"
        f"background:#e5e7eb;border-radius:2px;overflow:hidden;margin-right:4px'>"
        f"<div style='width:{100 * fraction:.1f}%;height:100%;background:{colour}'></div></div>"
    )


def also_serves(m: dict) -> list[str]:
    """The device's other services, e.g. the CPU that is also gpu's NumPy stand-in."""
    services = (Service.from_resource(r) for r in m.get("services", ()))
    return [s.label() for s in services if s is not None and s.target != m["target"]]


GREY = "color:#6b7280"

# Field -> column header, in the order shown.
FIELDS = {
    "target": "target", "device": "device", "worker": "worker", "occupancy": "occupancy",
    "busy-10s": "busy 10 s", "busy-60s": "busy 60 s", "calls": "calls", "latency": "median latency",
    "memory": "memory", "kernels": "warm kernels",
}


def row_fields(m: dict) -> dict[str, str]:
    """One device's cells as HTML, keyed by FIELDS (each cell gets class ``kaas-<field>``)."""
    kernels = list(m.get("warm_kernels") or [])
    others = also_serves(m)
    kept = m.get("kept_bytes") or 0
    latency = m.get("median_latency_s")
    name = str(m.get("worker_name") or m["worker"])
    tag = badge(m["kind"].upper(), KIND_COLOURS[m["kind"]]) if m.get("kind") in KIND_COLOURS else ""
    return {
        "target": f"<b>{html.escape(m['target'])}</b> [{html.escape(m['backend'])}]"
        + (f"<div style='{GREY}'>also {html.escape(', '.join(others))}</div>" if others else ""),
        "device": f"{tag}{html.escape(m.get('device', ''))}",
        "worker": html.escape(name) + (f"<div style='{GREY}'>{html.escape(m['worker'])}</div>" if name != m["worker"] else ""),
        "occupancy": _bar(occupancy(m), "#059669")
        + f"<span class='kaas-in-flight'>{m.get('in_flight', 0)}/{m.get('concurrency', 0)}</span>"
        + (f" +{m['queued']} queued" if m.get("queued") else ""),
        "busy-10s": _bar(m.get("busy_10s", 0.0), "#2563eb", 50) + format_percent(m.get("busy_10s", 0.0)),
        "busy-60s": _bar(m.get("busy_60s", 0.0), "#2563eb", 50) + format_percent(m.get("busy_60s", 0.0)),
        "calls": f"{m.get('calls', 0)}" + (f" ({m['errors']} failed)" if m.get("errors") else ""),
        "latency": format_duration(latency) if latency is not None else "\u2014",
        "memory": format_memory(m.get("memory_used"), m.get("memory_total"))
        + (f"<div style='{GREY}'>kept {format_bytes(kept)}</div>" if kept else ""),
        "kernels": html.escape(", ".join(kernels[:4]) + (f" +{len(kernels) - 4}" if len(kernels) > 4 else ""))
        or "\u2014",
    }


def _row_class(m: dict) -> str:
    return f"kaas-row kaas-target-{html.escape(m['target'])}"


def render_table(metrics: list[dict]) -> str:
    """The notebook layout: one table row per device."""
    rows = "".join(
        f"<tr class='{_row_class(m)}' style='vertical-align:top'>"
        + "".join(f"<td class='kaas-{field}' style='padding-right:10px'>{cell}</td>" for field, cell in row_fields(m).items())
        + "</tr>"
        for m in sorted(metrics, key=_row_key)
    ) or f"<tr><td colspan='{len(FIELDS)}'>no worker serves anything yet</td></tr>"
    return (
        "<table style='border-collapse:collapse;margin-top:4px'><thead><tr>"
        + "".join(f"<th style='text-align:left;padding-right:10px'>{h}</th>" for h in FIELDS.values())
        + f"</tr></thead><tbody>{rows}</tbody></table>"
    )


def render_cards(metrics: list[dict]) -> str:
    """The side-panel layout: a narrow card per device, its fields one per line."""
    cards = []
    for m in sorted(metrics, key=_row_key):
        fields = row_fields(m)
        lines = "".join(
            f"<div class='kaas-{field}'><span style='{GREY}'>{FIELDS[field]}</span> {fields[field]}</div>"
            for field in FIELDS if field not in ("target", "device")
        )
        cards.append(
            f"<div class='{_row_class(m)}' style='border-top:1px solid #d1d5db;padding:4px 0'>"
            f"<div class='kaas-target'>{fields['target']}</div><div class='kaas-device'>{fields['device']}</div>{lines}</div>"
        )
    return "".join(cards) or "<div>no worker serves anything yet</div>"


# Pure CSS, restarted by every redraw: when redraws stop (the kernel restarted or died,
# which a kernel cannot announce to the page), the live view dims and says so by itself.
_STALE_CSS = "<style>@keyframes kaas-stale{to{max-height:10em}}@keyframes kaas-dim{to{opacity:.4}}</style>"


def render_monitor(metrics: list[dict], events: list[str], now: float, note: str = "", compact: bool = False,
                   stale_after: float | None = None) -> str:
    """The whole monitor as HTML (inline styles, plain classes; see widgets.render_html):
    a table under a cell, or narrow cards (``compact``) in a side panel. A live view passes
    ``stale_after``: seconds without a redraw after which it reads as no longer updating."""
    loads = "".join(
        f"<div><b>{html.escape(t.target)}</b> {t.devices} device{'s' * (t.devices != 1)}, "
        f"{t.in_flight}/{t.capacity} in flight, busy {format_percent(t.busy_10s)} (10 s) "
        f"{format_percent(t.busy_60s)} (60 s), {t.calls} call{'s' * (t.calls != 1)}</div>"
        for t in target_loads(metrics)
    )
    workers = len({m["worker"] for m in metrics})
    head = (
        f"<div><b>kaas pool</b>: {workers} worker{'s' * (workers != 1)}, {len(metrics)} device"
        f"{'s' * (len(metrics) != 1)} &middot; updated {time.strftime('%H:%M:%S', time.localtime(now))}"
        + (f" &middot; <span class='kaas-note' style='color:#b45309'>{html.escape(note)}</span>" if note else "")
        + f"</div>{loads}"
    )
    body = head + (render_cards(metrics) if compact else render_table(metrics))
    body += "".join(f"<div class='kaas-event' style='{GREY}'>{html.escape(e)}</div>" for e in events)
    if stale_after is not None:
        body = (
            f"{_STALE_CSS}<div class='kaas-stale' style='max-height:0;overflow:hidden;color:#b91c1c;font-weight:600;"
            f"animation:kaas-stale 0s {stale_after:g}s forwards'>not updating since "
            f"{time.strftime('%H:%M:%S', time.localtime(now))}: the kernel restarted or stopped</div>"
            f"<div style='animation:kaas-dim 0s {stale_after:g}s forwards'>{body}</div>"
        )
    return (
        "<div class='kaas-monitor' style='font-family:var(--jp-code-font-family,monospace);"
        f"font-size:12px;line-height:1.6;padding:4px'>{body}</div>"
    )


def render_monitor_text(metrics: list[dict], note: str = "") -> str:
    """Plain-text snapshot: one line per device."""
    lines = [f"kaas pool: {len(metrics)} device(s)" + (f" ({note})" if note else "")]
    for m in sorted(metrics, key=_row_key):
        lines.append(
            f"  {m['target']:<5} {m['backend']:<7} {m.get('device', '')} @ {m.get('worker_name') or m['worker']}: "
            f"{m.get('in_flight', 0)}/{m.get('concurrency', 0)} in flight, busy {format_percent(m.get('busy_10s', 0.0))} "
            f"(10 s) {format_percent(m.get('busy_60s', 0.0))} (60 s), {m.get('calls', 0)} calls"
        )
    return "\n".join(lines)


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

    def _take(self, metrics: list[dict]) -> None:
        self.metrics = metrics
        self.roster.observe(metrics, time.time())

    def refresh(self) -> None:
        """Poll the pool once and redraw; what the thread does every ``interval``."""
        metrics, note = self._fetch()
        with self._lock:
            if self.stopped_because is not None:
                return
            self._take(metrics)
            self.widget.value = self.render(note, live=True)

    def render(self, note: str = "", now: float | None = None, live: bool = False) -> str:
        stale_after = max(5.0, 3 * self.interval) if live else None
        return render_monitor(self.metrics, list(self.roster.events), now or time.time(), note, self.compact, stale_after)

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
            self._take(self._fetch()[0])
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
    from . import config

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
