"""Stopping a call that runs too long, whose notebook interrupted it, or whose caller went
away; and the checks that keep a call's options from switching any of that off.

A cell runs in a worker thread, and Python cannot kill a thread. What it can do is raise an
exception in it at its next bytecode (``PyThreadState_SetAsyncExc``): that stops pure-Python
loops at once, and code inside a long C call (a sleep, a kernel) when the call returns.
Code that does not stop within a grace period is beyond reach: the worker then answers the
caller, and exits so that its nanny starts a fresh, re-warmed process.

Code that stays in C *holding the GIL* stops every thread of the worker, these included:
each worker's supervisor, a process of its own (see supervisor), kills such a worker from
outside. The Watchdog publishes every call's deadline to it, and the worker tells it which
link each running call's caller waits on.
"""

from __future__ import annotations

import ctypes
import heapq
import logging
import math
import select
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import CallTimeout, KaasError, KaasUsageError
from .supervisor import MARGIN_S, POLL_S

logger = logging.getLogger("kaas_magic.stopping")

GRACE_S = 1.0  # seconds a stopped cell has to end before its worker is replaced
HANGUP_POLL_S = 0.5  # how often a worker looks for callers that went away
DEFAULT_MAX_TIMEOUT = 86400.0  # kaas.limits.max-timeout


# Seconds past a call's timeout that its caller waits for the reply: the worker's grace to
# stop it in place, the supervisor's margin and look interval, and a few seconds for the
# reply to come. Past that the caller gives up on the worker.
REPLY_MARGIN_S = GRACE_S + MARGIN_S + POLL_S + 5.0


class StopCall(BaseException):
    """Raised inside a cell's thread to stop it. A BaseException, so that user code's
    ``except Exception`` cannot swallow it."""


@dataclass
class RunningCall:
    id: str
    timeout: float | None = None
    thread: int | None = None  # threading.get_ident() of the thread running the cell
    in_user_code: bool = False
    reason: str | None = None  # "timeout" | "interrupt" | "caller gone" once asked to stop
    abandoned: bool = False  # did not stop in time: the worker is being replaced
    escalating: bool = False  # the worker's replacement is scheduled should it not stop
    received_at: float = 0.0  # wall clock when the request arrived (for the record's phases)
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


def stop_error(call: RunningCall, worker: str, replaced: bool, queued: bool = False) -> BaseException:
    """What the caller of a stopped call is told: why it stopped, and what became of its
    worker (stopped in place, or replaced as it did not stop within GRACE_S); ``queued``
    when it was stopped before its turn came, so none of it ran."""
    if queued:
        how = f"it was stopped while queued on worker {worker}, before any of it ran"
    elif replaced:
        how = f"it did not stop within {GRACE_S:.0f} s, so worker {worker} is being replaced by a fresh one"
    else:
        how = f"it was stopped in place on worker {worker}; the worker goes on"
    if call.reason == "timeout":
        return CallTimeout(f"the cell ran past its timeout of {call.timeout:g} s: {how}")
    if call.reason == "caller gone":
        return KaasError(f"its caller went away: {how}")
    return KeyboardInterrupt(f"interrupted from the notebook: {how}")


def _raise_in_thread(thread_id: int, exc_type: type[BaseException]) -> bool:
    changed = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc_type))
    return changed == 1


# --- options a call may carry ---------------------------------------------------------------


def check_seconds(value: Any, option: str, maximum: float, limit_name: str = "kaas.limits.max-timeout") -> float:
    """``value`` as seconds: a real number, finite, above 0 and at most ``maximum``. Anything
    else (inf, nan, a negative, a string, a bool) is refused, naming ``option``."""
    if type(value) is not float and type(value) is not int:
        import numbers

        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise KaasUsageError(f"{option} must be a number of seconds, not {type(value).__name__} {value!r}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise KaasUsageError(f"{option} must be a positive, finite number of seconds, not {value!r}")
    if seconds > maximum:
        raise KaasUsageError(f"{option} of {value!r} s is over the maximum of {maximum:g} s ({limit_name})")
    return seconds


def check_count(value: Any, option: str, minimum: int, maximum: int, limit_name: str) -> int:
    """``value`` as a whole number from ``minimum`` to ``maximum``, refused otherwise."""
    if type(value) is not int:
        import numbers

        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise KaasUsageError(f"{option} must be a whole number, not {type(value).__name__} {value!r}")
    count = int(value)
    if not minimum <= count <= maximum:
        raise KaasUsageError(f"{option} must be from {minimum} to {maximum} ({limit_name}), not {value!r}")
    return count


def max_timeout(configured: Any) -> float:
    """kaas.limits.max-timeout, checked (None: the default)."""
    if configured is None:
        return DEFAULT_MAX_TIMEOUT
    return check_seconds(configured, "kaas.limits.max-timeout", math.inf)


def call_timeout(timeout: Any, configured_default: Any, maximum: float) -> float | None:
    """The timeout a call asks for: its own, else kaas.timeout; None for neither, and then
    it runs under the worker's kaas.limits.max-timeout (its caller waits for at most its
    own). Every call has one, so nothing runs unbounded on a shared worker."""
    if timeout is not None:
        return check_seconds(timeout, "timeout", maximum)
    if configured_default is not None:
        return check_seconds(configured_default, "kaas.timeout", maximum)
    return None


# --- the watchdog -----------------------------------------------------------------------------


class Watchdog:
    """Stops calls that pass their timeout: one thread for all of a worker's calls, asleep
    until the nearest deadline. Arming and disarming are cheap, as every call does both:
    a heap push, and a store into the supervisor's board when there is one; the thread is
    woken only by a deadline nearer than the one it sleeps towards.

    The thread survives anything a single call brings: a failure while expiring one call
    is logged and the next goes on."""

    MAX_WAIT_S = 60.0  # the longest single sleep (threading refuses sleeps past ~292 years)

    def __init__(self, on_expire: Callable[[str], Any], board=None):
        self._on_expire = on_expire
        self._board = board  # supervisor.DeadlineBoard, or None
        self._changed = threading.Condition(threading.Lock())
        self._deadlines: dict[str, float] = {}
        self._slots: dict[str, int] = {}  # call -> its slot on the board
        self._heap: list[tuple[float, str]] = []
        self._thread: threading.Thread | None = None
        self._wake_at = math.inf  # the deadline the thread sleeps towards

    def arm(self, call_id: str, seconds: float) -> None:
        seconds = float(seconds)
        if not 0 < seconds < math.inf:  # also false for nan
            raise ValueError(f"a call's timeout must be a positive, finite number of seconds, not {seconds!r}")
        deadline = time.monotonic() + seconds
        if self._board is not None:
            slot = self._board.take(deadline)
            if slot >= 0:
                self._slots[call_id] = slot
        with self._changed:
            self._deadlines[call_id] = deadline
            heapq.heappush(self._heap, (deadline, call_id))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kaas-watchdog", daemon=True)
                self._thread.start()
            if deadline < self._wake_at:
                self._changed.notify()

    def running(self, call_id: str, link: int) -> None:
        """The call has its device turn; its caller waits on ``link`` (see Supervisor.link)."""
        slot = self._slots.get(call_id)
        if slot is not None:
            self._board.set_running(slot, link)

    def expire_now(self, call_id: str) -> None:
        """Tell the supervisor this call is past its deadline now (its caller went away):
        unless it ends within the supervisor's allowance, the worker is replaced."""
        slot = self._slots.get(call_id)
        if slot is not None:
            self._board.set_deadline(slot, time.monotonic())

    def disarm(self, call_id: str) -> None:
        slot = self._slots.pop(call_id, None)
        if slot is not None:
            self._board.release(slot)
        with self._changed:
            self._deadlines.pop(call_id, None)
            if len(self._heap) > 64 and len(self._heap) > 4 * len(self._deadlines):  # drop stale entries
                self._heap = [(d, c) for c, d in self._deadlines.items()]
                heapq.heapify(self._heap)

    def _run(self) -> None:
        while True:
            try:
                expired = self._next_expired()
            except Exception:  # noqa: BLE001 - never die: every later call's timeout depends on it
                logger.exception("kaas watchdog: unexpected error; going on")
                time.sleep(0.1)
                continue
            for call_id in expired:
                try:
                    self._on_expire(call_id)
                except Exception:  # noqa: BLE001
                    logger.exception("kaas watchdog: stopping call %s failed", call_id)

    def _next_expired(self) -> list[str]:
        """Wait until a deadline passes; the calls whose deadline it was."""
        with self._changed:
            while True:
                now = time.monotonic()
                expired = []
                while self._heap and (self._heap[0][0] <= now or self._deadlines.get(self._heap[0][1]) != self._heap[0][0]):
                    deadline, call_id = heapq.heappop(self._heap)
                    if self._deadlines.get(call_id) == deadline:
                        del self._deadlines[call_id]
                        expired.append(call_id)
                if expired:
                    self._wake_at = -math.inf  # awake: arming needs no notify
                    return expired
                wait = min(self._heap[0][0] - now, self.MAX_WAIT_S) if self._heap else self.MAX_WAIT_S
                self._wake_at = now + wait
                self._changed.wait(wait)


# --- callers that went away ------------------------------------------------------------------


class HangupWatcher:
    """Notices calls, queued or running, whose caller went away (its notebook was killed,
    or it gave up and closed the link): every HANGUP_POLL_S, one non-blocking poll of
    their links' sockets for a hang-up. Watching and unwatching are dict stores.

    ``on_tick`` runs on every round too (the worker checks on its supervisor there)."""

    def __init__(self, on_hangup: Callable[[str], Any], on_tick: Callable[[], Any] | None = None):
        self._on_hangup = on_hangup
        self._on_tick = on_tick
        self._calls: dict[str, Any] = {}  # call -> its caller's socket
        self._closed = threading.Event()
        threading.Thread(target=self._run, name="kaas-hangups", daemon=True).start()

    def watch(self, call_id: str, sock) -> None:
        if sock is not None:
            self._calls[call_id] = sock

    def unwatch(self, call_id: str) -> None:
        self._calls.pop(call_id, None)

    def close(self) -> None:
        self._closed.set()

    def _run(self) -> None:
        while not self._closed.wait(HANGUP_POLL_S):
            try:
                if self._on_tick is not None:
                    self._on_tick()
                self._look()
            except Exception:  # noqa: BLE001 - never die
                logger.exception("kaas hang-up watcher: unexpected error; going on")

    def _look(self) -> None:
        calls = list(self._calls.items())  # a copy, made without releasing the GIL
        if not calls:
            return
        poller = select.poll()
        by_fd: dict[int, tuple[str, Any]] = {}
        for call_id, sock in calls:
            try:
                fd = sock.fileno()
            except (OSError, ValueError):
                continue
            if fd >= 0:
                poller.register(fd, _HANGUP)  # not POLLIN: a request on the link is no hang-up
                by_fd[fd] = (call_id, sock)
        for fd, events in poller.poll(0):
            if events & select.POLLNVAL or fd not in by_fd:
                continue
            call_id, sock = by_fd[fd]
            if self._calls.get(call_id) is sock:  # still that call's
                self._calls.pop(call_id, None)
                try:
                    self._on_hangup(call_id)
                except Exception:  # noqa: BLE001
                    logger.exception("kaas hang-up watcher: stopping call %s failed", call_id)


_HANGUP = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR


def check_call_options(timeout: Any, retries: Any, kernel_arguments: dict | None = None
                       ) -> tuple[float | None, int]:
    """A call's numeric options, checked in the notebook before anything is sent, against
    the kaas settings (config.get). Returns (timeout, retries): the timeout the call asks
    for (its own, else kaas.timeout; None: the worker's kaas.limits.max-timeout) and the
    retries.
    ``kernel_arguments``: a registered kernel's arguments, whose ``shots`` (Qiskit) is
    checked too. Errors name the option and the value."""
    from . import config as kaas_config

    timeout = call_timeout(timeout, kaas_config.get("timeout"), max_timeout(kaas_config.get("limits.max-timeout")))
    if retries != 0 or type(retries) is not int:
        most = check_count(kaas_config.get("limits.max-retries"), "kaas.limits.max-retries", 0, 10**6,
                           "a setting")
        retries = check_count(retries, "retries", 0, most, "kaas.limits.max-retries")
    if kernel_arguments:
        shots = kernel_arguments.get("shots")
        if shots is None and isinstance(kernel_arguments.get("__kwargs"), dict):
            shots = kernel_arguments["__kwargs"].get("shots")
        if shots is not None:
            most = check_count(kaas_config.get("limits.max-shots"), "kaas.limits.max-shots", 1, 10**12,
                               "a setting")
            check_count(shots, "shots", 1, most, "kaas.limits.max-shots")
    return timeout, retries
