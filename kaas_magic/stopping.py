"""Stopping a call that runs too long or that its notebook interrupted.

A cell runs in a worker thread, and Python cannot kill a thread. What it can do is raise an
exception in it at its next bytecode (``PyThreadState_SetAsyncExc``): that stops pure-Python
loops at once, and code inside a long C call (a sleep, a kernel) when the call returns.
Code that does not stop within a grace period is beyond reach: the worker then answers the
caller, and exits so that its nanny starts a fresh, re-warmed process.
"""

from __future__ import annotations

import ctypes
import heapq
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable


class StopCall(BaseException):
    """Raised inside a cell's thread to stop it. A BaseException, so that user code's
    ``except Exception`` cannot swallow it."""


@dataclass
class RunningCall:
    id: str
    timeout: float | None = None
    thread: int | None = None  # threading.get_ident() of the thread running the cell
    in_user_code: bool = False
    reason: str | None = None  # "timeout" | "interrupt" once asked to stop
    abandoned: bool = False  # did not stop in time: the worker is being replaced
    lock: threading.Lock = field(default_factory=threading.Lock)

    def enter_user_code(self) -> None:
        with self.lock:
            self.thread = threading.get_ident()
            self.in_user_code = True

    def leave_user_code(self) -> None:
        with self.lock:
            self.in_user_code = False

    def stop(self, reason: str) -> bool:
        """Ask the cell to stop; False when it is not (or no longer) running user code."""
        with self.lock:
            if self.reason is None:
                self.reason = reason
            if not self.in_user_code or self.thread is None:
                return False
            return _raise_in_thread(self.thread, StopCall)


def _raise_in_thread(thread_id: int, exc_type: type[BaseException]) -> bool:
    changed = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc_type))
    return changed == 1


class Watchdog:
    """Stops calls that pass their timeout: one thread for all of a worker's calls, asleep
    until the nearest deadline. Arming and disarming are cheap, as every call with a
    timeout does both."""

    def __init__(self, on_expire: Callable[[str], Any]):
        self._on_expire = on_expire
        self._changed = threading.Condition()
        self._deadlines: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._thread: threading.Thread | None = None

    def arm(self, call_id: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        with self._changed:
            self._deadlines[call_id] = deadline
            heapq.heappush(self._heap, (deadline, call_id))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kaas-watchdog", daemon=True)
                self._thread.start()
            if self._heap[0][1] == call_id:
                self._changed.notify()

    def disarm(self, call_id: str) -> None:
        with self._changed:
            self._deadlines.pop(call_id, None)
            if len(self._heap) > 64 and len(self._heap) > 4 * len(self._deadlines):  # drop stale entries
                self._heap = [(d, c) for c, d in self._deadlines.items()]
                heapq.heapify(self._heap)

    def _run(self) -> None:
        while True:
            expired = []
            with self._changed:
                now = time.monotonic()
                while self._heap and (self._heap[0][0] <= now or self._deadlines.get(self._heap[0][1]) != self._heap[0][0]):
                    deadline, call_id = heapq.heappop(self._heap)
                    if self._deadlines.get(call_id) == deadline:
                        del self._deadlines[call_id]
                        expired.append(call_id)
                if not expired:
                    self._changed.wait(self._heap[0][0] - now if self._heap else None)
                    continue
            for call_id in expired:
                self._on_expire(call_id)
