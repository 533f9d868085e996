"""One call's clock: the phase marks the call path takes as a call goes, and the record's
Timings from them for every ending (see record.Timings.balanced)."""

from __future__ import annotations

import socket
import time

from ..protocol import Reply
from ..record import RunRecord, Timings


class CallClock:
    """One call's phase marks, and the record's Timings from them for every ending: the
    phases always add up to the call's total (see record.Timings.balanced)."""

    def __init__(self, t_start: float, pool_ready_at: float, watch=None):
        self.t_start = t_start
        self.watch = watch
        now = time.perf_counter()
        # The part of the caller's wait that came before the pool was usable.
        self.startup = max(0.0, min(pool_ready_at, now) - t_start)
        self.state = "queued"
        self.t_routed = self.t_serialized = self.t_sent = None
        self.route_wait = 0.0
        self._t_route_from = now

    def routed(self, waited: bool) -> None:
        self.t_routed = time.perf_counter()
        if waited:  # waiting for a warm worker is startup, not queueing
            self.route_wait = self.t_routed - self._t_route_from

    def serialized(self) -> None:
        self.t_serialized = time.perf_counter()

    def sent(self, record: RunRecord) -> None:
        self.t_sent = time.perf_counter()
        if self.watch is not None:  # a future's: it can now stop the call on its worker
            self.watch("sent", record)

    def cut_short(self, t_end: float) -> Timings:
        """A call that ended without a reply (interrupted, timed out, its worker lost, bad
        input): the phases it went through, the rest to the phase it was in."""
        parts = {"startup": self.startup + self.route_wait}
        if self.t_routed is not None:
            parts["queue"] = self.t_routed - self.t_start - parts["startup"]
        if self.t_serialized is not None:
            parts["transfer_in"] = self.t_serialized - self.t_routed
        if self.t_sent is not None:
            parts["transfer_in"] += self.t_sent - self.t_serialized
        return Timings.balanced(parts, t_end - self.t_start, rest=_PHASE_OF_STATE.get(
            self.state if self.t_sent is None or self.state != "sending" else "running", "queue"))

    def replied(self, reply: Reply, sent_at: float, t_received: float, t_end: float,
                deserialize_time: float) -> Timings:
        """Where the time went. On one host the wall clocks agree, so the wire time of each
        direction is measured; across hosts it is split evenly."""
        w = reply["timings"]
        t_routed = self.t_routed if self.t_routed is not None else self.t_start
        t_serialized = self.t_serialized if self.t_serialized is not None else t_routed
        worker_span = max(0.0, reply["replied_at"] - reply["received_at"])
        worker_phases = w["warm_wait"] + w["queue"] + w["setup"] + w["execute"] + w["to_host"]
        wire = max(0.0, (t_received - t_serialized) - worker_span)
        if reply["host"] == _hostname():
            wire_in = min(wire, max(0.0, reply["received_at"] - sent_at))
        else:
            wire_in = wire / 2
        startup = self.startup + self.route_wait
        parts = {
            "startup": startup + w["warm_wait"],
            "queue": (t_routed - self.t_start - startup) + w["queue"] + max(0.0, worker_span - worker_phases),
            "transfer_in": (t_serialized - t_routed) + wire_in,
            "setup": w["setup"],
            "execute": w["execute"],
            "transfer_out": w["to_host"] + (wire - wire_in) + deserialize_time,
        }
        return Timings.balanced(parts, t_end - self.t_start, rest="queue")


# The phase a call that ended early was in, by its last reported state.
_PHASE_OF_STATE = {"starting": "startup", "queued": "queue", "sending": "transfer_in", "running": "execute",
                   "compiling": "setup", "receiving": "transfer_out"}


_HOST = None


def _hostname() -> str:
    global _HOST
    if _HOST is None:
        _HOST = socket.gethostname()
    return _HOST
