"""One device's share of a worker: how many calls it runs at once, and how busy it is.

A device takes up to ``concurrency`` calls at once (the paper's "requests per GPU");
further calls wait their turn in arrival order and none is rejected. The slot also keeps
what the monitor and the router read: calls in flight and queued, utilisation over recent
windows, call count and latencies.
"""

from __future__ import annotations

import collections
import contextlib
import statistics
import threading
import time
from typing import Callable, Iterator


class LeftQueue(Exception):
    """A queued call was cancelled before its turn."""


class DeviceSlot:
    WINDOW = 60.0  # seconds of busy intervals kept for utilisation

    def __init__(self, device_id: str, concurrency: int):
        self.device_id = device_id
        self.concurrency = concurrency
        self._changed = threading.Condition()
        self._waiting: collections.deque[object] = collections.deque()  # arrival order
        self.in_flight = 0
        self.queued = 0
        self.calls = 0
        self.errors = 0
        self._latencies: collections.deque[float] = collections.deque(maxlen=512)
        self._busy: collections.deque[tuple[float, float]] = collections.deque()
        self._busy_since: float | None = None

    @contextlib.contextmanager
    def turn(self, give_up: Callable[[], bool] = lambda: False) -> Iterator[float]:
        """Wait, in the calling thread, for a free place on the device; yields the seconds
        spent waiting. Raises :class:`LeftQueue` when ``give_up()`` turns true while waiting
        (the call was cancelled; :meth:`wake` makes waiters look again)."""
        started = time.perf_counter()
        with self._changed:
            if self.in_flight >= self.concurrency or self._waiting:
                ticket = object()
                self._waiting.append(ticket)
                self.queued += 1
                try:
                    while self.in_flight >= self.concurrency or self._waiting[0] is not ticket:
                        if give_up():
                            raise LeftQueue()
                        self._changed.wait()
                finally:
                    self.queued -= 1
                    self._waiting.remove(ticket)
                    self._changed.notify_all()  # the next in line may go now
            self.in_flight += 1
            if self.in_flight == 1:
                self._busy_since = time.monotonic()
        waited = time.perf_counter() - started
        try:
            yield waited
        finally:
            with self._changed:
                self.in_flight -= 1
                if self.in_flight == 0 and self._busy_since is not None:
                    self._busy.append((self._busy_since, time.monotonic()))
                    self._busy_since = None
                if self._waiting:
                    self._changed.notify_all()

    def wake(self) -> None:
        """Make queued calls check whether they were cancelled."""
        with self._changed:
            self._changed.notify_all()

    def finished(self, seconds: float, ok: bool) -> None:
        with self._changed:  # calls finish in several threads at once
            self.calls += 1
            self.errors += 0 if ok else 1
            self._latencies.append(seconds)

    def load(self) -> int:
        """Calls running or waiting here: what the router balances on."""
        return self.in_flight + self.queued

    def busy_fraction(self, window: float, now: float | None = None) -> float:
        """Share of the last ``window`` seconds during which at least one call ran."""
        now = time.monotonic() if now is None else now
        start = now - window
        while self._busy and self._busy[0][1] < now - self.WINDOW:
            self._busy.popleft()
        busy = sum(max(0.0, min(end, now) - max(begin, start)) for begin, end in self._busy)
        if self._busy_since is not None:
            busy += now - max(self._busy_since, start)
        return min(1.0, busy / window)

    def median_latency(self) -> float | None:
        return statistics.median(self._latencies) if self._latencies else None
