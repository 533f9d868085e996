"""Rendering: the monitor as HTML (a table under a cell, narrow cards in a side panel) and
as plain text, and the small formatters both use (bytes, memory, percent, plurals).

Everything is inline styles and inline SVG (no script): the live widget's HTML is set as
is, and the static snapshot stays readable wherever HTML outputs render (JupyterLab's
sanitiser of untrusted notebooks drops the SVG, nothing else).
"""

from __future__ import annotations

import html
import time
from typing import Iterable

from ..widgets import KIND_COLOURS, badge, format_duration
from .devices import DeviceLoad, group_devices, row_services, target_loads
from .history import History, Sample, history_legend, sparkline_svg
from .theme import BORDER, BUSY_COLOUR, ERROR, GREY, MUTED, OCCUPANCY_COLOUR, TEXT, TRACK, WARN


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


def format_memory_short(used: int | None, total: int | None) -> str:
    """"3.2/80.0 GiB" where both are in one unit, else as format_memory."""
    long = format_memory(used, total)
    if used is not None and total is not None:
        u, t = format_bytes(used).split(), format_bytes(total).split()
        if u[1] == t[1]:
            return f"{u[0]}/{t[0]} {t[1]}"
    return long


def format_percent(fraction: float) -> str:
    return f"{100 * fraction:.0f}%"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def _bar(fraction: float, colour: str, width_px: int = 90) -> str:
    return (
        f"<div class='kaas-bar' style='display:inline-block;vertical-align:middle;width:{width_px}px;height:9px;"
        f"background:{TRACK};border-radius:2px;overflow:hidden;margin-right:4px'>"
        f"<div style='width:{100 * max(0.0, min(1.0, fraction)):.1f}%;height:100%;background:{colour}'></div></div>"
    )


def _clipped(text: str, width_px: int, cls: str = "", title: str | None = None, style: str = GREY) -> str:
    """``text`` on one line, cut with an ellipsis past ``width_px`` (all of it on hover)."""
    return (f"<span class='{cls}' title='{html.escape(text if title is None else title)}' style='{style};display:inline-block;"
            f"max-width:{width_px}px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap;vertical-align:bottom'>"
            f"{html.escape(text)}</span>")


_TAG = "display:inline-block;padding:0 2px;margin:0 1px 1px 0;border-radius:3px;font-size:10px;line-height:13px;"


def device_tags(d: DeviceLoad, long: bool = False) -> str:
    """The targets a device serves (a dashed outline: a simulator or a CPU stand-in), then
    the backends that run on it, as small tags."""
    by_backend: dict[str, list[str]] = {}
    for r in d.rows:
        for s in row_services(r):
            by_backend.setdefault(s.target, []).append(s.backend)
    tags = []
    for target, kind in d.targets().items():
        via = ", ".join(dict.fromkeys(by_backend.get(target, ())))
        if kind == "device":
            style = f"border:1px solid {BORDER};color:{TEXT}"
        else:
            style = f"border:1px dashed {KIND_COLOURS.get(kind, WARN)};color:{TEXT}"
        text = target if kind == "device" or not long else f"{target} {kind}"
        tags.append(f"<span class='kaas-tag kaas-serves-{html.escape(target)}' title='{html.escape(f'{target}: {kind}, through {via}')}' "
                    f"style='{_TAG}{style}'>{html.escape(text)}</span>")
    for backend in d.backends:
        tags.append(f"<span class='kaas-tag kaas-backend' title='backend {html.escape(backend)}' "
                    f"style='{_TAG}background:{TRACK};color:{MUTED};border:1px solid transparent'>{html.escape(backend)}</span>")
    return "".join(tags)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text)


def _row_attributes(d: DeviceLoad) -> str:
    """The row's class names its primary target (what its first backend serves for real);
    every target it serves is a ``kaas-serves-*`` tag; ``data-device`` names the device."""
    return f"class='kaas-row kaas-target-{html.escape(d.rows[0]['target'])}' data-device='{html.escape(d.physical)}'"


def _kind_badge(d: DeviceLoad) -> str:
    return badge(d.kind.upper(), KIND_COLOURS[d.kind], d.description) if d.kind in KIND_COLOURS else ""


def _calls(d: DeviceLoad) -> str:
    return f"{d.calls}" + (f" <span class='kaas-failed' style='color:{ERROR}'>({d.errors} failed)</span>" if d.errors else "")


def _in_flight(d: DeviceLoad, width_px: int) -> str:
    return (_bar(d.occupancy, OCCUPANCY_COLOUR, width_px)
            + f"<span class='kaas-in-flight'>{d.in_flight}/{d.capacity}</span>"
            + (f" <span style='{GREY}'>+{d.queued} queued</span>" if d.queued else ""))


def _kernels(d: DeviceLoad, width_px: int) -> str:
    return _clipped(", ".join(d.warm_kernels), width_px, style=f"color:{TEXT}") if d.warm_kernels else "\u2014"


def _memory(d: DeviceLoad, short: bool = False) -> str:
    return ((format_memory_short if short else format_memory)(d.memory_used, d.memory_total)
            + (f" <span style='{GREY}'>kept {format_bytes(d.kept_bytes)}</span>" if d.kept_bytes else ""))


def _latency(d: DeviceLoad) -> str:
    return format_duration(d.median_latency_s) if d.median_latency_s is not None else "\u2014"


def _descriptions(d: DeviceLoad) -> str:
    return "; ".join(dict.fromkeys(str(r.get("device", "")) for r in d.rows))


# Field -> column header, in the order shown (each cell gets class ``kaas-<field>``). The
# table keeps to one line per device and about 900 px: what a device is, in words, its warm
# kernels and its busy share over 60 s are in tooltips (and in the panel's cards).
FIELDS = {
    "device": "device", "worker": "worker", "serves": "serves", "occupancy": "in flight",
    "busy-10s": "busy 10 s", "calls": "calls", "latency": "latency", "history": "last 60 s",
    "memory": "memory",
}


def row_fields(d: DeviceLoad, samples: list[Sample], marks: list, now: float,
               since: float | None = None) -> dict[str, str]:
    """One physical device's cells as HTML, keyed by FIELDS: each fits one line."""
    about = _descriptions(d) + (f"; warm kernels: {', '.join(d.warm_kernels)}" if d.warm_kernels else "")
    return {
        "device": f"<b title='{html.escape(about)}'>{html.escape(d.physical)}</b>"
        + (f" {_kind_badge(d)}" if d.kind in KIND_COLOURS else ""),
        "worker": _clipped(d.worker_name, 80, title=f"{d.worker} on {d.host}", style=f"color:{TEXT}"),
        "serves": f"<span style='display:inline-block;max-width:320px;overflow:hidden;white-space:nowrap;vertical-align:bottom' "
                  f"title='{html.escape(serves_summary(d))}'>{device_tags(d)}</span>",
        "occupancy": _in_flight(d, 36),
        "busy-10s": f"<span title='busy {format_percent(d.busy_60s)} over 60 s'>{_bar(d.busy_10s, BUSY_COLOUR, 32)}"
                    f"{format_percent(d.busy_10s)}</span>",
        "calls": _calls(d),
        "latency": _latency(d),
        "history": sparkline_svg(samples, marks, now, width=100, since=since),
        "memory": _memory(d, short=True),
    }


_CELL = "text-align:left;padding:1px 8px 1px 0;white-space:nowrap;vertical-align:middle"


def render_table(devices: list[DeviceLoad], history: History | None = None, marks: list | None = None,
                 now: float = 0.0) -> str:
    """The notebook layout: one table row, one line, per physical device."""
    marks = list(marks or ())
    rows = "".join(
        f"<tr {_row_attributes(d)}>"
        + "".join(f"<td class='kaas-{field}' style='{_CELL}'>{cell}</td>"
                  for field, cell in row_fields(d, history.of(d.key) if history else [], marks, now,
                                                history.since if history else None).items())
        + "</tr>"
        for d in devices
    ) or f"<tr><td colspan='{len(FIELDS)}' style='{_CELL}'>no worker serves anything yet</td></tr>"
    return (
        "<table class='kaas-table' style='border-collapse:collapse;margin-top:4px;width:auto;color:inherit'><thead><tr>"
        + "".join(f"<th style='{_CELL};font-weight:600;border-bottom:1px solid {BORDER}'>{h}</th>" for h in FIELDS.values())
        + f"</tr></thead><tbody>{rows}</tbody></table>"
    )


def render_cards(devices: list[DeviceLoad], history: History | None = None, marks: list | None = None,
                 now: float = 0.0) -> str:
    """The side-panel layout (~300 px): a narrow card per physical device."""
    marks = list(marks or ())
    cards = []
    for d in devices:
        lines = [
            f"<div class='kaas-device'><b>{html.escape(d.physical)}</b> {_kind_badge(d)}"
            f"<span class='kaas-worker' style='{GREY}' title='{html.escape(d.worker)}'>worker {html.escape(d.worker_name)}"
            f"{' on ' + html.escape(d.host) if d.host else ''}</span></div>",
            f"<div>{_clipped(d.description, 270, 'kaas-device-name', _descriptions(d))}</div>",
            f"<div class='kaas-serves'>{device_tags(d, long=True)}</div>",
            f"<div><span style='{GREY}'>in flight</span> <span class='kaas-occupancy'>{_in_flight(d, 60)}</span></div>",
            f"<div><span style='{GREY}'>busy</span> <span class='kaas-busy-10s'>{_bar(d.busy_10s, BUSY_COLOUR, 60)}"
            f"{format_percent(d.busy_10s)}</span> <span style='{GREY}'>(10 s)</span> "
            f"<span class='kaas-busy-60s'>{format_percent(d.busy_60s)}</span> <span style='{GREY}'>(60 s)</span></div>",
            f"<div><span class='kaas-calls'>{_calls(d)}</span> <span style='{GREY}'>calls, median latency</span> "
            f"<span class='kaas-latency'>{_latency(d)}</span></div>",
        ]
        if d.memory_used is not None or d.memory_total is not None or d.kept_bytes:
            lines.append(f"<div class='kaas-memory'><span style='{GREY}'>memory</span> {_memory(d)}</div>")
        if d.warm_kernels:
            lines.append(f"<div class='kaas-kernels'><span style='{GREY}'>kernels</span> {_kernels(d, 220)}</div>")
        chart = sparkline_svg(history.of(d.key) if history else [], marks, now, width=260, height=28, fill="100%",
                              since=history.since if history else None)
        lines.append(f"<div class='kaas-history'>{chart}</div>")
        cards.append(f"<div {_row_attributes(d)} style='border-top:1px solid {BORDER};padding:4px 0'>{''.join(lines)}</div>")
    return "".join(cards) or "<div>no worker serves anything yet</div>"


def device_summary(d: DeviceLoad) -> str:
    """A device's load in words, as ``%kaas status`` and the text snapshot say it."""
    return (f"{d.in_flight}/{d.capacity} in flight" + (f" +{d.queued} queued" if d.queued else "")
            + f", busy {format_percent(d.busy_10s)} (10 s) {format_percent(d.busy_60s)} (60 s), "
            + plural(d.calls, "call") + (f" ({d.errors} failed)" if d.errors else "")
            + (f", median latency {format_duration(d.median_latency_s)}" if d.median_latency_s is not None else ""))


def serves_summary(d: DeviceLoad) -> str:
    """"cpu, gpu (fallback) through numpy, jax"."""
    targets = ", ".join(t if k == "device" else f"{t} ({k})" for t, k in d.targets().items())
    return f"{targets} through {', '.join(d.backends)}"


# Pure CSS, restarted by every redraw: when redraws stop (the kernel restarted or died,
# which a kernel cannot announce to the page), the live view dims and says so by itself.
_STALE_CSS = "<style>@keyframes kaas-stale{to{max-height:10em}}@keyframes kaas-dim{to{opacity:.4}}</style>"


def render_monitor(metrics: list[dict], events: list[str], now: float, note: str = "", compact: bool = False,
                   stale_after: float | None = None, history: History | None = None,
                   marks: Iterable[tuple[float, str, str]] = (), policy: str = "") -> str:
    """The whole monitor as HTML (inline styles, plain classes; see widgets.render_html):
    a table under a cell, or narrow cards (``compact``) in a side panel. A live view passes
    ``stale_after``: seconds without a redraw after which it reads as no longer updating."""
    devices = group_devices(metrics)
    marks = list(marks)
    loads = "".join(
        f"<div class='kaas-load'><b>{html.escape(t.target)}</b> {plural(t.devices, 'device')}"
        + (f" ({t.kind})" if t.kind != "device" else "")
        + f", {t.in_flight}/{t.capacity} in flight, busy {format_percent(t.busy_10s)}"
        + ("" if compact else f" (10 s) {format_percent(t.busy_60s)} (60 s), {plural(t.calls, 'call')}")
        + "</div>"
        for t in target_loads(metrics)
    )
    workers = len({d.worker for d in devices})
    head = (
        f"<div><b>kaas pool</b>: {plural(workers, 'worker')}, {plural(len(devices), 'device')}"
        f" &middot; updated {time.strftime('%H:%M:%S', time.localtime(now))}"
        + (f" &middot; <span class='kaas-note' style='color:{WARN}'>{html.escape(note)}</span>" if note else "")
        + f"</div>{loads}"
        + (f"<div class='kaas-policy' style='{GREY}'>autoscaling: {html.escape(policy)}</div>" if policy else "")
    )
    body = head + (render_cards(devices, history, marks, now) if compact else render_table(devices, history, marks, now))
    if devices:
        body += history_legend()
    body += "".join(f"<div class='kaas-event' style='{GREY}'>{html.escape(e)}</div>" for e in events)
    if stale_after is not None:
        body = (
            f"{_STALE_CSS}<div class='kaas-stale' style='max-height:0;overflow:hidden;color:{ERROR};font-weight:600;"
            f"animation:kaas-stale 0s {stale_after:g}s forwards'>not updating since "
            f"{time.strftime('%H:%M:%S', time.localtime(now))}: the kernel restarted or stopped</div>"
            f"<div style='animation:kaas-dim 0s {stale_after:g}s forwards'>{body}</div>"
        )
    return (
        "<div class='kaas-monitor' style='font-family:var(--jp-code-font-family,monospace);"
        f"font-size:12px;line-height:1.6;padding:4px;color:{TEXT}'>{body}</div>"
    )


def render_monitor_text(metrics: list[dict], note: str = "") -> str:
    """Plain-text snapshot: one line per physical device."""
    devices = group_devices(metrics)
    lines = [f"kaas pool: {plural(len(devices), 'device')}" + (f" ({note})" if note else "")]
    for d in devices:
        lines.append(f"  {d.physical:<6} @ {d.worker_name} ({serves_summary(d)}): {device_summary(d)}")
    return "\n".join(lines)
