"""Data kept on devices, as the client sees it: handles, where calls using them go, frees.

A call whose inputs are kept on a worker goes to that worker (data locality beats
balance); handles the chosen worker does not hold are fetched home and sent as values. A
dropped handle's buffer is freed with the next call to its worker, or within a second by
the background refresh (see :class:`~kaas_magic.client.control.ControlPlane`).
"""

from __future__ import annotations

import collections
import threading
import weakref
from typing import Any, Callable

from ..containers import map_containers
from ..errors import StaleHandleError, TargetUnavailable
from ..handles import DeviceHandle, handles_in
from ..protocol import KeptBuffer


class KeptData:
    """The kept buffers of one pool (its ``owner``): their handles and pending frees."""

    def __init__(self, owner, control):
        self._owner = weakref.ref(owner)  # handles point at the Pool itself
        self._control = control
        self._to_free: dict[str, list[str]] = {}
        self._release_lock = threading.Lock()

    def handles(self, kept: KeptBuffer | list[KeptBuffer], worker: str, service: str, device: str):
        """Handles for a reply's kept outputs (one, or a tuple for a list)."""
        if isinstance(kept, list):
            return tuple(self.handles(k, worker, service, device) for k in kept)
        return DeviceHandle(self._owner(), kept["id"], worker, service, device, kept)

    def route_with_data(self, target, backend, fallback, worker, inputs: dict, on_wait=None):
        """Route a call; one whose inputs are kept on a worker goes to that worker (data
        locality beats balance). Handles the chosen worker does not hold are fetched home
        and sent as values."""
        route_to = self._control.route
        handles = [h for value in inputs.values() for h in handles_in(value)]
        if handles:
            live = {r.address for r in self._control.router.routes()}
            for h in handles:
                self.check_handle(h, live)
        home = None
        if handles and worker is None:
            homes = {h.worker for h in handles}
            if len(homes) == 1:  # the usual case
                (home,) = homes
            else:  # the worker holding the most bytes
                held = collections.Counter()
                for h in handles:
                    held[h.worker] += h.nbytes
                home = held.most_common(1)[0][0]
            try:
                route, service, waited = route_to(target, backend, fallback, home, timeout=0)
            except TargetUnavailable:  # that worker cannot serve the target: move the data
                home = None
        if home is None:
            route, service, waited = route_to(target, backend, fallback, worker, on_wait=on_wait)
        if any(h.worker != route.address for h in handles):
            inputs = {name: _map_handles(value, lambda h: h if h.worker == route.address else h.get())
                      for name, value in inputs.items()}
        return route, service, waited, inputs

    def check_handle(self, handle: DeviceHandle, live: set[str]) -> None:
        if not handle.owned_by(self._owner()):
            raise StaleHandleError(f"{handle!r} belongs to another pool")
        if handle.freed:
            raise StaleHandleError(f"{handle!r} was freed")
        if handle.worker not in live:
            raise StaleHandleError(
                f"{handle!r} lived on worker {handle.worker}, which has left the pool (it died or "
                f"was stopped); its data is lost: compute it again"
            )

    def release(self, worker: str, id: str) -> None:
        """Free a kept buffer (this may run in __del__). The id rides along with the next call
        to that worker, or goes within a second with the background refresh: a chain of
        kept calls then costs no extra messages."""
        with self._release_lock:
            self._to_free.setdefault(worker, []).append(id)

    def frees_for(self, worker: str) -> list[str]:
        """The ids to free on ``worker``, handed to a call going there."""
        with self._release_lock:
            return self._to_free.pop(worker, [])

    def pending(self) -> dict[str, list[str]]:
        """Every id waiting to be freed, by worker, taken for the background refresh."""
        with self._release_lock:
            batches, self._to_free = self._to_free, {}
        return batches


def _map_handles(value: Any, convert: Callable[[DeviceHandle], Any]) -> Any:
    return map_containers(value, lambda v: convert(v) if isinstance(v, DeviceHandle) else v)
