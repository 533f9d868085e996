"""Stopping a call that runs too long or that its notebook interrupted.

A cell runs in a worker thread, and Python cannot kill a thread. What it can do is raise an
exception in it at its next bytecode (``PyThreadState_SetAsyncExc``): that stops pure-Python
loops at once, and code inside a long C call (a sleep, a kernel) when the call returns.
Code that does not stop within a grace period is beyond reach: the worker then answers the
caller, and exits so that its nanny starts a fresh, re-warmed process.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass, field


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
