"""Calls that do not block: ``Pool.run(..., block=False)`` and ``Pool.call(..., block=False)``
return a :class:`KaasFuture`, a ``concurrent.futures.Future``.

Each such call runs the ordinary blocking call path in a thread of the pool's executor: a
warm call spends its time waiting on its link to the worker (the GIL is released there), so
threads are what it needs, and the futures work with ``concurrent.futures.wait`` and
``as_completed`` (re-exported as ``kaas.wait`` and ``kaas.as_completed``).

Cancelling stops the remote call, not only the local wait: a call not yet started never
runs; one being routed or sent stops before it is sent; one on a worker, queued or running,
is stopped there (as the notebook's stop button stops a cell) and its future ends cancelled.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from concurrent.futures._base import CANCELLED_AND_NOTIFIED, FINISHED
from typing import Any, Callable

from .. import config as kaas_config
from ..errors import CallCancelled
from ..record import RunRecord

# How long a cancel keeps asking the worker: a call just sent may not have arrived yet.
_CANCEL_RETRY_S = 2.0
_BEFORE_SENDING = frozenset({"pending", "starting", "queued", "sending"})


class KaasFuture(concurrent.futures.Future):
    """The result of a call running in the background. ``record`` is the call's RunRecord:
    live while it runs (where it was routed, its state), final once done."""

    def __init__(self, cancel_remote: Callable[[RunRecord], bool]):
        super().__init__()
        self.record: RunRecord | None = None
        self.state = "pending"  # the call's last state: pending, queued, sending, running ... done
        self._cancel_remote = cancel_remote
        self._stop = threading.Event()

    # -- the call path's view of it --

    def watch(self, state: str, record: RunRecord) -> None:
        """The call path's client-side states ("sent" once the request is on its way). A
        cancel asked before the call was sent stops it here, so it never reaches a worker;
        one asked while it was being sent stops it on the worker."""
        self.state, self.record = state, record
        if not self._stop.is_set():
            return
        if state in _BEFORE_SENDING:
            raise CallCancelled(f"call {record.call_id} was cancelled before it was sent")
        if state == "sent":
            self._stop_remote_soon(record)

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    # -- concurrent.futures.Future --

    def cancel(self) -> bool:
        """Stop the call wherever it is; False only once it has finished. A call already on
        a worker ends shortly after, as cancelled (``result()`` waits for that)."""
        if super().cancel():  # not started: it never runs
            return True
        with self._condition:
            if self._state == FINISHED:
                return False
            self._stop.set()
        record = self.record
        if record is not None and record.worker and self.state not in _BEFORE_SENDING:
            self._stop_remote_soon(record)
        return True

    def _stop_remote_soon(self, record: RunRecord) -> None:
        threading.Thread(target=self._stop_remote, args=(record,), daemon=True,
                         name=f"kaas-cancel-{record.call_id}").start()

    def _stop_remote(self, record: RunRecord) -> None:
        deadline = time.monotonic() + _CANCEL_RETRY_S
        while not self.done() and time.monotonic() < deadline:
            try:
                if self._cancel_remote(record):
                    return
            except Exception:  # noqa: BLE001 - the worker is gone: the call ends by itself
                return
            time.sleep(0.05)  # sent, not yet arrived: ask again

    def end_cancelled(self) -> None:
        """The call stopped because it was cancelled: the future ends cancelled, and every
        waiter (``result``, ``wait``, ``as_completed``) is told so.

        Uses Future's internals (its condition, state and waiters, unchanged since Python
        3.2): the public API cannot cancel a future that has started running."""
        with self._condition:
            self._state = CANCELLED_AND_NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()
        self._invoke_callbacks()

    def __repr__(self) -> str:
        where = f" on {self.record.worker}" if self.record is not None and self.record.worker else ""
        return f"<KaasFuture {self.state}{where} {super().__repr__()[1:-1]}>"


class Background:
    """The pool's threads for calls that do not block (``kaas.futures.max-threads``)."""

    def __init__(self, cancel_remote: Callable[[RunRecord], bool]):
        self._cancel_remote = cancel_remote
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def submit(self, call: Callable[[Callable[[str, RunRecord], None]], Any]) -> KaasFuture:
        """Run ``call(watch)`` in a thread; ``watch`` is the call path's state observer."""
        future = KaasFuture(self._cancel_remote)
        self._pool().submit(self._run, future, call)
        return future

    @staticmethod
    def _run(future: KaasFuture, call) -> None:
        if not future.set_running_or_notify_cancel():  # cancelled while waiting for a thread
            return
        try:
            result = call(future.watch)
        except BaseException as e:  # noqa: BLE001 - handed to the future, whatever it is
            if future.stop_requested:
                future.state = "cancelled"
                future.end_cancelled()
            else:
                future.state = "error"
                future.set_exception(e)
        else:
            future.state = "done"
            future.set_result(result)

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=int(kaas_config.get("futures.max-threads")), thread_name_prefix="kaas-call")
            return self._executor

    def close(self) -> None:
        """Calls not started never run; running ones end with the pool's links."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
