"""The history: which workers the monitor has seen (:class:`Roster`), the last 60 s of
each device row (:class:`History`), and its small inline SVG chart with the pool's joins and
departures marked on it (:func:`sparkline_svg`, :func:`history_legend`).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Iterable

from .devices import DeviceLoad
from .theme import BUSY_COLOUR, GREY, JOINED_COLOUR, LATENCY_COLOUR, LEFT_COLOUR, OCCUPANCY_COLOUR, TRACK

HISTORY_WINDOW = 60.0  # seconds of samples each device row keeps


class Roster:
    """Which workers the monitor has seen, and a short log of joins and departures (as
    text, and as (time, "joined"/"left", name) marks for the history charts)."""

    def __init__(self, keep: int = 5):
        self.workers: dict[str, str] = {}  # address -> name
        self.events: deque[str] = deque(maxlen=keep)
        self.marks: deque[tuple[float, str, str]] = deque(maxlen=64)
        self._first = True

    def observe(self, metrics: list[dict], now: float) -> None:
        current = {m["worker"]: m.get("worker_name") or m["worker"] for m in metrics}
        stamp = time.strftime("%H:%M:%S", time.localtime(now))
        if not self._first:
            for address in sorted(current.keys() - self.workers.keys()):
                self.events.append(f"{stamp} worker {current[address]} ({address}) joined")
                self.marks.append((now, "joined", str(current[address])))
            for address in sorted(self.workers.keys() - current.keys()):
                self.events.append(f"{stamp} worker {self.workers[address]} ({address}) left")
                self.marks.append((now, "left", str(self.workers[address])))
        self._first = False
        self.workers = current


@dataclass(frozen=True)
class Sample:
    """One refresh of one device row."""

    t: float
    busy: float  # busy over the last 10 s, 0..1
    in_flight: int
    capacity: int
    latency: float | None


class History:
    """The last ``window`` seconds of samples of every device row, one per refresh."""

    def __init__(self, window: float = HISTORY_WINDOW):
        self.window = window
        self.series: dict[tuple[str, str], deque[Sample]] = {}
        self.since: float | None = None  # when the first sample was taken

    def seed(self, other: "History") -> None:
        """Start from another monitor's samples of the same pool (a panel opened after
        ``%kaas monitor`` shows the minute before it, too)."""
        self.series = {key: deque(samples) for key, samples in list(other.series.items())}
        self.since = other.since

    def add(self, devices: list[DeviceLoad], now: float) -> None:
        if self.since is None:
            self.since = now
        for d in devices:
            self.series.setdefault(d.key, deque()).append(
                Sample(now, d.busy_10s, d.in_flight, d.capacity, d.median_latency_s))
        for key, samples in list(self.series.items()):
            while samples and samples[0].t < now - self.window:
                samples.popleft()
            if not samples:  # a device gone for a whole window
                del self.series[key]

    def of(self, key: tuple[str, str]) -> list[Sample]:
        return list(self.series.get(key, ()))


def _points(values: list[tuple[float, float]]) -> str:
    return " ".join(f"{x:.1f},{y:.1f}" for x, y in values)


def sparkline_svg(samples: list[Sample], marks: Iterable[tuple[float, str, str]], now: float,
                  window: float = HISTORY_WINDOW, width: int = 120, height: int = 20, fill: str = "",
                  since: float | None = None) -> str:
    """The last ``window`` seconds as a small SVG: busy % (solid), calls in flight over
    capacity (solid), median latency scaled to its window's largest (dashed), and a
    vertical line where a worker joined or left. A monitor that has watched for less than
    the window passes ``since`` (when it began): the chart then spans what it has seen.
    Plain ``<svg>``, ``<polyline>`` and ``<line>`` with inline styles: no script, theme
    colours from CSS variables."""
    start = now - window if since is None else max(now - window, min(since, now - 1.0))
    span = now - start
    pad = 1.5

    def x(t: float) -> float:
        return max(0.0, min(float(width), width * (t - start) / span))

    def y(fraction: float) -> float:
        return pad + (1.0 - max(0.0, min(1.0, fraction))) * (height - 2 * pad)

    shown = [s for s in samples if start <= s.t <= now]
    scale = max([s.capacity for s in shown] + [s.in_flight for s in shown] + [1])
    slowest = max((s.latency for s in shown if s.latency is not None), default=0.0)
    lines = []
    for name, colour, values, dash in (
        ("busy", BUSY_COLOUR, [(x(s.t), y(s.busy)) for s in shown], ""),
        ("in-flight", OCCUPANCY_COLOUR, [(x(s.t), y(s.in_flight / scale)) for s in shown], ""),
        ("latency", LATENCY_COLOUR,
         [(x(s.t), y(s.latency / slowest)) for s in shown if s.latency is not None and slowest > 0], ";stroke-dasharray:2 2"),
    ):
        if len(values) == 1:  # one sample: a short stroke, so that it shows
            values = [(max(0.0, values[0][0] - 2), values[0][1]), values[0]]
        if values:
            lines.append(f"<polyline class='kaas-history-{name}' points='{_points(values)}' "
                         f"style='fill:none;stroke:{colour};stroke-width:1.2;vector-effect:non-scaling-stroke{dash}'/>")
    for t, what, _name in marks:
        if start <= t <= now:
            colour = JOINED_COLOUR if what == "joined" else LEFT_COLOUR
            lines.append(f"<line class='kaas-mark-{what}' x1='{x(t):.1f}' x2='{x(t):.1f}' y1='0' y2='{height}' "
                         f"style='stroke:{colour};stroke-width:1;stroke-dasharray:3 2;vector-effect:non-scaling-stroke'/>")
    # fill: the width the SVG takes (e.g. "100%", stretching the drawing to a card's width)
    size = f"width='{fill}' preserveAspectRatio='none'" if fill else f"width='{width}'"
    return (f"<svg class='kaas-history' {size} height='{height}' viewBox='0 0 {width} {height}' "
            f"style='vertical-align:middle;background:{TRACK};border-radius:2px;display:inline-block'>{''.join(lines)}</svg>")


def history_legend() -> str:
    def swatch(colour: str, dash: str = "solid") -> str:
        return f"<span style='display:inline-block;width:12px;border-top:2px {dash} {colour};vertical-align:middle'></span>"

    return (f"<div class='kaas-legend' style='{GREY}'>last 60 s: {swatch(BUSY_COLOUR)} busy "
            f"{swatch(OCCUPANCY_COLOUR)} in flight {swatch(LATENCY_COLOUR, 'dashed')} latency "
            f"<span style='color:{JOINED_COLOUR}'>\u250a</span> joined "
            f"<span style='color:{LEFT_COLOUR}'>\u250a</span> left</div>")
