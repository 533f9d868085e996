"""The calls queued or running on a worker, and stopping them: timeouts (the watchdog, and
the supervisor from outside), interrupts from the notebook, callers that went away; and a
call that does not stop within the grace period ends its worker (see stopping)."""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

from ..call_stream import CallStream
from ..device_slot import DeviceSlot
from ..protocol import Reply
from ..stopping import HANGUP_POLL_S, HangupWatcher, RunningCall, Watchdog, stop_error
from .execute import failed_reply

logger = logging.getLogger(__name__)


class CallStops:
    """``running``: each call queued or running, with its device's slot and, once it runs,
    its stream. ``addressed`` completes a reply as the runtime sends it."""

    def __init__(self, worker, loop, grace: float, addressed: Callable[[Reply, str, float], Reply]):
        self.worker = worker
        self.loop = loop
        self.grace = grace  # seconds a stopped cell has to end before its worker is replaced
        self._addressed = addressed
        self.running: dict[str, tuple[RunningCall, DeviceSlot, CallStream | None]] = {}
        self.supervisor = start_supervisor(worker, grace)
        self.watchdog = Watchdog(lambda call_id: self.stop(call_id, "timeout"),
                                 board=self.supervisor.board if self.supervisor else None)
        self.hangups = HangupWatcher(self.caller_gone, on_tick=self.supervisor.check if self.supervisor else None)

    # -- a call's life: registered, watched, running, forgotten --

    def register(self, call: RunningCall, slot: DeviceSlot) -> bool:
        """False when a call of that id is here already. A queued call can be cancelled too."""
        entry = (call, slot, None)
        return self.running.setdefault(call.id, entry) is entry

    def watch(self, call: RunningCall, replier) -> None:
        """Its timeout starts; a caller that goes away (its notebook killed) frees what its
        call holds."""
        self.watchdog.arm(call.id, call.timeout)
        self.hangups.watch(call.id, getattr(replier, "sock", None))

    def started(self, call: RunningCall, slot: DeviceSlot, stream: CallStream, replier) -> None:
        """Its turn on the device came. Stuck past its deadline, or with its caller gone:
        the supervisor ends it."""
        self.running[call.id] = (call, slot, stream)
        self.watchdog.running(call.id, self.supervisor.link(replier) if self.supervisor else 0)

    def forget(self, call: RunningCall) -> None:
        self.hangups.unwatch(call.id)
        self.watchdog.disarm(call.id)
        self.running.pop(call.id, None)

    # -- stopping --

    def stop(self, call_id: str, reason: str) -> bool:
        """From the event loop (an interrupt), the watchdog (a timeout) or the hang-up
        watcher (the caller went away)."""
        entry = self.running.get(call_id)
        if entry is None:
            return False
        call, slot, stream = entry
        call.stop(reason)
        slot.wake()  # a queued call leaves the queue
        if stream is not None and not call.escalating:  # running: make sure it ends
            call.escalating = True
            self.loop.call_soon_threadsafe(self.loop.call_later, self.grace, self._escalate, call, stream)
        return True

    def caller_gone(self, call_id: str) -> None:
        """The caller's link hung up (its notebook was killed, or it gave up on the call):
        stop the call and free its place on the device. A running call that cannot be
        stopped in place is the supervisor's from now: past its allowance it ends the worker."""
        entry = self.running.get(call_id)
        if entry is None:
            return
        if entry[2] is not None:
            self.watchdog.expire_now(call_id)
        logger.warning("kaas call %s: its caller went away; stopping it", call_id)
        self.stop(call_id, "caller gone")

    def _escalate(self, call: RunningCall, stream: CallStream) -> None:
        """The cell did not stop: answer its caller, then let the nanny replace this process
        (no other way ends a thread stuck in native code)."""
        entry = self.running.get(call.id)
        if entry is None or entry[0] is not call:  # it ended (another call may have its id now)
            return
        call.abandoned = True
        stream.finish()
        error = stop_error(call, self.worker.address, replaced=True)
        # Built as every reply is (see protocol.reply), saying the worker is on its way out.
        # Its phases as they were: it ran from its arrival until now (see RunningCall).
        ran = max(0.0, time.time() - call.received_at) if call.received_at else call.timeout or 0.0
        reply = self._addressed(failed_reply(error, execute=ran, worker_exiting=True), "",
                                call.received_at or time.time())
        try:
            stream.replier.write(reply, timeout=0.2)
        except OSError:
            pass
        logger.error("kaas call %s did not stop within %.1f s of its %s; replacing worker %s",
                     call.id, self.grace, call.reason, self.worker.address)
        self.loop.call_later(0.5, os._exit, 75)

    async def handle_cancel(self, call_id: str = "", reason: str = "interrupt") -> bool:
        if reason not in ("interrupt", "timeout", "caller gone"):  # it is shown to the caller
            reason = "interrupt"
        return self.stop(str(call_id), reason)


def start_supervisor(worker, grace: float):
    """This worker's supervisor process (see supervisor): for workers a nanny restarts.
    A worker without one may run inside the notebook's own process (a LocalCluster of
    threads), which a supervisor must never kill."""
    if not getattr(worker, "nanny", None):
        return None
    from ..supervisor import MARGIN_S, Supervisor, owner_from_environment

    try:
        return Supervisor(allowance=grace + MARGIN_S,
                          hangup_allowance=HANGUP_POLL_S + grace + MARGIN_S,
                          owner=owner_from_environment())
    except Exception:  # noqa: BLE001 - the worker serves on, with in-process stops only
        logger.exception("kaas could not start the supervisor of worker %s", worker.address)
        return None
