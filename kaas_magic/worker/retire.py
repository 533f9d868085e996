"""A worker's side of autoscaling (see client.adapt): its load as the policy reads it, and
retiring safely.

Every call passes :meth:`Retirement.enter` on arrival and :meth:`Retirement.leave` when
answered. ``kaas_retire`` accepts only when no call is inside and no buffer is kept (and,
with ``quiet``, none arrived for that long); from then on a call that still arrives is
refused before anything runs (it cannot be half-run on a worker that is going away), so
no call is ever lost silently or run twice.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from ..errors import KaasError
from ..targets import KIND_ORDER

if TYPE_CHECKING:
    from .runtime import WorkerRuntime


class WorkerRetiring(KaasError):
    """The call reached a worker that autoscaling is retiring: it was not run."""


class Retirement:
    def __init__(self, runtime: "WorkerRuntime"):
        self.runtime = runtime
        self._lock = threading.Lock()
        self.active = 0  # calls arrived and not yet answered
        self.closing = False
        self.last_active = time.monotonic()

    # -- every call --

    def enter(self) -> bool:
        """A call arrives: False when the worker is retiring (refuse it, unrun)."""
        with self._lock:
            if self.closing:
                return False
            self.active += 1
            self.last_active = time.monotonic()
            return True

    def leave(self) -> None:
        with self._lock:
            self.active -= 1
            self.last_active = time.monotonic()

    def refusal(self) -> WorkerRetiring:
        return WorkerRetiring(f"worker {self.runtime.worker.address} is retiring (autoscaling): the call was "
                              f"not run; run it again and it goes to another worker")

    # -- handlers (Dask comms, the worker's event loop) --

    async def handle_load(self) -> dict:
        """What autoscaling reads, about once a second per client that adapts: per device its
        best target, calls running and waiting, places; calls inside; kept buffers; idle seconds."""
        rt = self.runtime
        devices: dict[str, tuple] = {}
        for resource, session in list(rt.sessions.items()):
            service = session.offer.service
            rank = (KIND_ORDER[service.kind], service.target)
            best = devices.get(session.device_id)
            if best is None or rank < best[0]:
                devices[session.device_id] = (rank, service.target, session)
        rows = []
        for device_id, (_, target, session) in devices.items():
            slot = rt.slots.get(device_id)
            rows.append({"target": target, "running": slot.in_flight if slot else 0,
                         "queued": slot.queued if slot else 0,
                         "concurrency": slot.concurrency if slot else rt.concurrency})
        with self._lock:
            active, idle = self.active, (0.0 if self.active else time.monotonic() - self.last_active)
            closing = self.closing
        return {"devices": rows, "active": active, "kept": rt.buffers.count(), "idle_s": idle,
                "closing": closing}

    async def handle_retire(self, quiet: float = 0.0, cancel: bool = False) -> dict:
        """Retire if idle: no call inside, no kept buffer, none arrived for ``quiet`` s.
        ``cancel``: serve calls again."""
        with self._lock:
            if cancel:
                self.closing = False
                return {"ok": True, "closing": False}
            kept = self.runtime.buffers.count()
            idle = time.monotonic() - self.last_active
            ok = self.closing or (self.active == 0 and kept == 0 and idle >= float(quiet))
            if ok:
                self.closing = True
            return {"ok": ok, "active": self.active, "kept": kept, "idle_s": idle, "closing": self.closing}
