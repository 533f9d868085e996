"""Routing: which worker and service a call goes to. Pure: no Dask, no I/O, no threads.

The :class:`Router` holds this client's view of the pool: the routing table (each worker's
services and their concurrency, as the scheduler last listed them), the load the workers
last reported (all clients' calls), this client's calls in flight, and the workers seen
dying. The control plane refreshes that view; the call path asks it for a choice: a real
device first, then a simulator, then (only when allowed) a CPU stand-in; the target's
default backend before others; then the least loaded device.
"""

from __future__ import annotations

import collections
import math
import random
import threading
import time
from dataclasses import dataclass, field

from .. import targets
from ..errors import TargetUnavailable
from ..targets import KIND_ORDER, TARGETS, Service, check_target


@dataclass
class WorkerRoute:
    address: str
    name: str
    host: str
    services: dict[Service, float] = field(default_factory=dict)  # service -> concurrency
    ready: bool = False
    # Tells a worker restarted at the same address (a fixed port) from the one that died.
    incarnation: str = ""


# How long a worker seen dying stays out of routing (its address may come back).
_DEAD_FOR_S = 600


class Router:
    """This client's routing table and its choices. The table is replaced wholesale by
    :meth:`set_table`; choices that depend on it alone are cached until it changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the table, the dead workers and the caches
        self.table: dict[str, WorkerRoute] = {}
        self.dead: dict[tuple[str, str], float] = {}  # workers seen dying: (address, incarnation) -> when
        # Calls running or queued per worker and service, as the workers last said (all
        # clients' calls), and how many of ours were in flight then: for least-loaded routing.
        self.load: dict[str, tuple[dict[str, int], int]] = {}
        self.load_heard: dict[str, float] = {}  # address -> monotonic time its load was last heard
        # Calls this client has in flight per worker; kept apart from the routing table,
        # which the background refresh replaces wholesale.
        self.in_flight: collections.Counter[str] = collections.Counter()
        self._candidate_cache: tuple[dict | None, dict] = (None, {})  # see candidates
        # Which spec and target each kernel call uses, for the current routing table.
        self._kernel_cache: tuple[dict | None, dict] = (None, {})
        # Workers being retired by autoscaling (see client.adapt): routed to no more, and
        # when each worker was last chosen (calls chosen before the mark may still be on
        # their way there).
        self.retiring: set[str] = set()
        self.last_chosen: dict[str, float] = {}

    # -- the view --

    def set_table(self, routes: dict[str, WorkerRoute]) -> None:
        with self._lock:
            self.table = routes
            self.retiring &= set(routes)  # retired: gone from the table

    def routes(self) -> list[WorkerRoute]:
        """The workers in the table, less those seen dying."""
        with self._lock:
            return [r for a, r in self.table.items() if (a, r.incarnation) not in self.dead and a not in self.retiring]

    # -- workers retiring (autoscaling: see client.adapt) --

    def mark_retiring(self, address: str) -> None:
        """Route nothing more to ``address``: it is about to retire."""
        with self._lock:
            self.retiring.add(address)
            self._kernel_cache = (None, {})
            self._candidate_cache = (None, {})

    def unmark_retiring(self, address: str) -> None:
        """It stays after all: route to it again."""
        with self._lock:
            self.retiring.discard(address)
            self._kernel_cache = (None, {})
            self._candidate_cache = (None, {})

    def route_named(self, name: str) -> WorkerRoute | None:
        """The listed worker called ``name`` (or at that address), retiring or not."""
        with self._lock:
            return next((r for a, r in self.table.items() if name in (r.name, a)
                         and (a, r.incarnation) not in self.dead), None)

    def chosen_within(self, address: str, seconds: float) -> bool:
        """Whether a call chose ``address`` in the last ``seconds``."""
        return time.monotonic() - self.last_chosen.get(address, -math.inf) < seconds

    def forget(self, address: str) -> None:
        """A worker died (or is being replaced): route nothing more to it. The scheduler may
        list it a while longer; its replacement comes back under a new address, or under the
        same one (a fixed port) as a new incarnation."""
        with self._lock:
            route = self.table.get(address)
            self.dead[(address, route.incarnation if route else "")] = time.monotonic()
            self._kernel_cache = (None, {})
            self._candidate_cache = (None, {})
            for gone in [k for k, t in self.dead.items() if time.monotonic() - t > _DEAD_FOR_S]:
                del self.dead[gone]

    def note_load(self, address: str, load: dict[str, int]) -> None:
        """What worker ``address`` just said its services are running or queueing (in a
        reply, or asked)."""
        self.load[address] = (load, self.in_flight[address])
        self.load_heard[address] = time.monotonic()

    def keep_load_of(self, addresses) -> None:
        """Forget the load of workers no longer listed."""
        for gone in set(self.load) - set(addresses):
            self.load.pop(gone, None)
            self.load_heard.pop(gone, None)

    def stale_load(self, addresses, older_than: float, at_most: int) -> list[str]:
        """Up to ``at_most`` of ``addresses`` whose load was last heard longer ago than
        ``older_than`` seconds (never heard first, then the stalest; ties at random): the
        workers worth asking. A client calling a worker hears its load in every reply, so
        a busy client asks (almost) nobody, and an idle one a few workers a second however
        large the pool: control messages grow with clients, not clients x workers."""
        now = time.monotonic()
        stale = [(self.load_heard.get(a, -math.inf), random.random(), a) for a in addresses
                 if now - self.load_heard.get(a, -math.inf) > older_than]
        return [a for _, _, a in sorted(stale)[:at_most]]

    def busy(self, address: str, service: Service) -> float:
        """Calls running or queued on that worker's service: the last report from the
        worker (everyone's calls), corrected for our own calls since."""
        reported, ours_then = self.load.get(address, ({}, 0))
        ours_now = self.in_flight[address]
        return max(reported.get(service.resource, 0) - ours_then, 0) + ours_now

    def warming(self) -> bool:
        """No worker is listed yet, or one is still warming up."""
        routes = self.routes()
        return not routes or any(not r.ready for r in routes)

    # -- choosing a worker --

    def candidates(self, target: str, backend: str | None, fallback: bool, worker: str | None):
        """(route, service, concurrency) of every worker that could serve such a call; kept
        until the routing table changes (a refresh, or a worker found dead)."""
        with self._lock:
            table, cached = self.table, self._candidate_cache
        if cached[0] is not table:
            cached = self._candidate_cache = (table, {})
        key = (target, backend, fallback, worker)
        found = cached[1].get(key)
        if found is None:
            found = cached[1][key] = self._find_candidates(target, backend, fallback, worker)
        return found

    def _find_candidates(self, target: str, backend: str | None, fallback: bool, worker: str | None):
        found = []
        for route in self.routes():
            if worker is not None and worker not in (route.address, route.name):
                continue
            for service, concurrency in route.services.items():
                if service.target != target or (backend and service.backend != backend):
                    continue
                if service.kind == "fallback" and not fallback:
                    continue
                found.append((route, service, concurrency))
        return found

    def choose(self, target: str, backend: str | None, fallback: bool, worker: str | None):
        """The (route, service) for such a call now, or None: the best kind of device, the
        target's default backend, then the least loaded for its concurrency."""
        found = self.candidates(target, backend, fallback, worker)
        if not found:
            return None
        default = targets.DEFAULT_BACKEND[target]  # read from the backend registry on first use

        def rank(item):
            route, service, concurrency = item
            return (
                KIND_ORDER[service.kind],
                service.backend != default,
                self.busy(route.address, service) / max(concurrency, 1),
                random.random(),
            )

        route, service, _ = min(found, key=rank) if len(found) > 1 else found[0]
        self.last_chosen[route.address] = time.monotonic()
        return route, service

    def served(self) -> list[str]:
        """Human-readable list of what the pool serves, e.g. 'tpu jax fallback'."""
        seen = set()
        for route in self.routes():
            for service in route.services:
                seen.add((service.target, service.backend, service.kind))
        order = list(TARGETS)
        return [
            f"{t} {b}" + ("" if k == "device" else f" {k}")
            for t, b, k in sorted(seen, key=lambda s: (order.index(s[0]), KIND_ORDER[s[2]], s[1]))
        ]

    def unavailable(self, target, backend, fallback, worker) -> TargetUnavailable:
        wanted = target + (f" with backend {backend}" if backend else "")
        where = f" on worker {worker}" if worker else ""
        serves = self.served()
        lines = [f"{s}" for s in serves] or ["nothing (no kaas worker has finished warming up)"]
        hint = ""
        if not fallback and any(s.startswith(f"{target} ") and "fallback" in s for s in serves):
            hint = f"\nAdd --fallback (or fallback=True) to run on the CPU stand-in for {target}."
        return TargetUnavailable(
            f"no worker{where} in the pool serves {wanted} ({TARGETS[target]}). "
            f"The pool serves:\n  " + "\n  ".join(lines) + hint
        )

    # -- choosing a kernel's spec and target --

    def kernel_choice(self, specs: list, target: str | None, backend: str | None, fallback: bool):
        """(spec, target) for a kernel call, or None: a real device first, then a
        simulator, then a stand-in. The choice depends only on what the pool serves, so it
        is kept until the routing table changes; which worker serves the call is decided
        per call, by load."""
        with self._lock:
            table = self.table
        if self._kernel_cache[0] is not table:
            self._kernel_cache = (table, {})
        cache = self._kernel_cache[1]
        key = (tuple(map(id, specs)), target, backend, fallback)
        cached = cache.get(key)
        if cached is None:
            choice = self._choose_kernel(specs, target, backend, fallback)
            if choice is None:
                return None
            # The specs stay referenced here, so that their ids in the key are not reused.
            cached = cache[key] = (choice, tuple(specs))
        return cached[0]

    @staticmethod
    def _kernel_options(specs: list, target: str | None, backend: str | None):
        return [
            (spec, t) for spec in specs for t in (spec.targets if target is None else (target,))
            if backend is None or spec.backend == backend
        ]

    def _choose_kernel(self, specs: list, target: str | None, backend: str | None, fallback: bool):
        if target is not None:
            check_target(target)
        options = self._kernel_options(specs, target, backend)
        for allow in ((False, True) if fallback else (False,)):
            best = None
            for spec, t in options:
                choice = self.choose(t, spec.backend, allow, None)
                if choice is not None:
                    rank = KIND_ORDER[choice[1].kind]
                    if best is None or rank < best[0]:
                        best = (rank, spec, t)
            if best is not None:
                return best[1], best[2]
        return None

    def kernel_unavailable(self, specs: list, target: str | None, backend: str | None,
                           fallback: bool) -> TargetUnavailable:
        options = self._kernel_options(specs, target, backend)
        where = ", ".join(sorted({f"{t} ({s.language})" for s, t in options})) or "nothing that matches"
        return TargetUnavailable(
            f"no worker in the pool can run kernel {specs[0].name!r} on {where}. The pool serves:\n  "
            + "\n  ".join(self.served())
            + ("" if fallback else "\nAdd fallback=True (--fallback) to allow a CPU stand-in.")
        )
