"""The control plane: everything but the calls themselves, over Dask's comms.

It keeps the router's view current (the routing table from the scheduler, each worker's
load, in the background once a second), and asks workers for what is not a call: info,
metrics, where their direct links listen, freeing kept buffers, cancelling a call. The
hot path uses none of it for a warm call, except a worker's endpoint, asked once.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
import time
from typing import TYPE_CHECKING, Callable

from .. import config as kaas_config
from ..errors import KaasError, SchedulerLost
from ..targets import READY_RESOURCE, TARGETS, Service, check_backend, check_target
from .router import Router, WorkerRoute

if TYPE_CHECKING:
    from ..pool_status import PoolStatus


class CallTotals:
    """Call counts that survive a worker's replacement. A replaced worker comes back under
    its name with a new address (or, restarted in place, with counts that went down): the
    counts last seen of its previous incarnation are kept, per worker name and key, and
    added to what the new one reports. Counts a dead incarnation made after it was last
    asked are not known, and so not kept."""

    def __init__(self):
        self._lock = threading.Lock()
        self._last: dict[str, tuple[str, dict]] = {}  # name -> (address, key -> (calls, errors))
        self._before: dict[str, dict] = {}  # name -> key -> (calls, errors) of earlier incarnations

    def totals(self, name: str, address: str, counts: dict) -> dict:
        """``counts`` (key -> (calls, errors)) of worker ``name`` at ``address`` now, plus
        those of its earlier incarnations."""
        with self._lock:
            last_address, last = self._last.get(name, (address, {}))
            replaced = last_address != address or any(
                counts[k][0] < c or counts[k][1] < e for k, (c, e) in last.items() if k in counts)
            if replaced:
                before = self._before.setdefault(name, {})
                for k, (c, e) in last.items():
                    c0, e0 = before.get(k, (0, 0))
                    before[k] = (c0 + c, e0 + e)
                last = {}
            self._last[name] = (address, {**last, **counts})
            before = self._before.get(name, {})
            return {k: (c + before.get(k, (0, 0))[0], e + before.get(k, (0, 0))[1]) for k, (c, e) in counts.items()}


class ControlPlane:
    """A client's Dask comms to the scheduler and the workers, outside the hot path."""

    def __init__(self, client, router: Router, client_id: str):
        self.client = client
        self.client_id = client_id  # names this client to shared workers
        self.router = router
        self.loop: asyncio.AbstractEventLoop = client.loop.asyncio_loop
        self.scheduler_address: str = client.scheduler.address  # kept: the client forgets it when lost
        self.routes_updated = threading.Event()
        self.endpoints: dict[str, dict] = {}  # worker address -> where its direct link listens
        self.scheduler_lost_since: float | None = None
        self.scheduler_error: BaseException | None = None
        self.comms = None
        self.load_requests = 0  # kaas_load requests this client sent (see bench control)
        self.route_refreshes = 0  # routing-table reads from the scheduler
        # Call counts per worker name, summed over its incarnations (status and metrics).
        self.device_calls = CallTotals()
        self.service_calls = CallTotals()
        # Calls waiting in route() for a worker to serve them, per target: demand that no
        # worker can report (a pool scaled to zero, or all warming); autoscaling reads it.
        self._waiting_lock = threading.Lock()
        self._waiting: collections.Counter[str] = collections.Counter()
        self._backlogs: dict[str, tuple[str, int]] = {}  # map id -> (target, calls' worth waiting)

    def start(self) -> None:
        self.comms = self.sync(self._start_comm_pool())

    async def _start_comm_pool(self):
        from distributed.core import ConnectionPool

        # Our own pool so replies are *not* deserialised by the comm: outputs and
        # exceptions are rebuilt one by one, and one bad value cannot lose the others.
        # A short connect timeout: a worker that does not answer in 5 s is dead to a notebook.
        pool = ConnectionPool(deserialize=False, connection_args=self.client.connection_args, timeout=5)
        await pool.start()
        return pool

    def sync(self, coro, timeout: float = 60):
        """Run ``coro`` on the client's event loop and wait for it, never forever."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise KaasError(f"the Dask client's event loop did not answer within {timeout:g} s") from None

    async def call(self, address: str, op: str, **kwargs):
        """One request to a worker's kaas handler ``op``, and its reply."""
        comm = await self.comms.connect(address)
        try:
            await comm.write({"op": op, **kwargs})
            reply = await comm.read()
        except Exception:
            comm.abort()
            raise
        self.comms.reuse(address, comm)
        return reply

    def close(self) -> None:
        try:
            self.sync(self.comms.close(), timeout=10)
        except Exception:
            pass

    # -- the routing table, refreshed in the background from the scheduler --

    async def refresh_routes(self) -> None:
        self.route_refreshes += 1
        try:
            identity = await asyncio.wait_for(self.client.scheduler.identity(), timeout=5)
        except Exception as e:
            if self.scheduler_lost_since is None:
                self.scheduler_lost_since = time.monotonic()
            self.scheduler_error = e
            raise
        self.scheduler_lost_since = None
        routes: dict[str, WorkerRoute] = {}
        for address, info in identity.get("workers", {}).items():
            route = WorkerRoute(address, str(info.get("name", address)), info.get("host", ""),
                                incarnation=str(info.get("local_directory", "")))
            for resource, amount in (info.get("resources") or {}).items():
                service = Service.from_resource(resource)
                if service is not None:
                    route.services[service] = amount
                elif resource == READY_RESOURCE:
                    route.ready = True
            routes[address] = route
        self.router.set_table(routes)
        self.routes_updated.set()

    async def refresh_forever(self, closed: Callable[[], bool], pending_frees: Callable[[], dict]) -> None:
        interval = float(kaas_config.get("pool.routing-refresh"))
        while not closed():
            await asyncio.sleep(interval)
            try:
                await self.refresh_routes()
            except Exception:  # scheduler briefly unreachable: keep the last table
                pass
            await self.refresh_load()
            await self.free(pending_frees())

    async def refresh_load(self) -> None:
        """Ask workers how busy their services are (all clients' calls): with
        ``kaas.pool.load-poll: sample`` (the default) only those not heard from for
        ``load-staleness`` seconds, at most ``load-sample`` a refresh (replies carry the
        load of the workers this client calls); with ``all``, every ready worker."""

        async def ask(address: str):
            self.load_requests += 1
            try:
                load = await asyncio.wait_for(self.call(address, "kaas_load"), timeout=2)
            except Exception:
                return
            if isinstance(load, dict):
                self.router.note_load(address, load)

        addresses = [r.address for r in self.router.routes() if r.ready]
        if kaas_config.get("pool.load-poll") == "all":
            asked = addresses
        else:
            asked = self.router.stale_load(addresses, float(kaas_config.get("pool.load-staleness")),
                                           int(kaas_config.get("pool.load-sample")))
        await asyncio.gather(*(ask(a) for a in asked))
        self.router.keep_load_of(addresses)

    def refresh(self) -> None:
        """Read the routing table from the scheduler now; SchedulerLost if it does not answer."""
        try:
            self.sync(self.refresh_routes())
        except Exception as e:
            raise self.lost_scheduler_error() from e

    def scheduler_answers(self) -> bool:
        try:
            self.sync(self.refresh_routes(), timeout=10)
            return True
        except Exception:
            return False

    def scheduler_lost(self) -> bool:
        """The scheduler stopped answering: the client says so, or refreshes failed for a
        few seconds (one slow answer on a busy machine is not a loss)."""
        if self.scheduler_lost_since is None:
            return False
        return self.client.status != "running" or time.monotonic() - self.scheduler_lost_since > 3

    def lost_scheduler_error(self) -> SchedulerLost:
        return SchedulerLost(
            f"lost the Dask scheduler at {self.scheduler_address} "
            f"({type(self.scheduler_error).__name__}: {self.scheduler_error}); calls cannot be routed. "
            f"Once it is back, run %kaas connect {self.scheduler_address} "
            f"(kaas.connect({self.scheduler_address!r}))"
        )

    def forget_worker(self, address: str) -> None:
        """A worker died (or is being replaced): route nothing more to it (see Router.forget)."""
        self.router.forget(address)
        self.endpoints.pop(address, None)

    # -- routing that may wait for the pool --

    def route(self, target: str, backend: str | None = None, fallback: bool | None = None,
              worker: str | None = None, timeout: float | None = None,
              on_wait: Callable[[str], None] | None = None):
        """(route, service, waited): waits (refreshing) while workers are still warming,
        telling ``on_wait`` what it waits for whenever that changes."""
        check_target(target)
        check_backend(backend)
        if fallback is None:
            fallback = bool(kaas_config.get("fallback"))
        router = self.router
        choice = router.choose(target, backend, fallback, worker)
        if choice is not None:  # the warm pool's usual answer
            return choice[0], choice[1], False
        timeout = float(kaas_config.get("pool.warmup-timeout")) if timeout is None else timeout
        deadline = time.monotonic() + timeout
        waited, told = False, ""
        with self._waiting_lock:
            self._waiting[target] += 1
        try:
            while True:
                choice = router.choose(target, backend, fallback, worker)
                if choice is not None:
                    return choice[0], choice[1], waited
                routes = router.routes()
                warming = [r for r in routes if not r.ready]
                if routes and not warming or time.monotonic() > deadline:
                    raise router.unavailable(target, backend, fallback, worker)
                if on_wait is not None:
                    why = _waiting_for(warming, target, backend)
                    if why != told:
                        told = why
                        on_wait(why)
                waited = True
                self.routes_updated.clear()
                self.refresh()
                if not router.choose(target, backend, fallback, worker):
                    time.sleep(0.05)
        finally:
            with self._waiting_lock:
                self._waiting[target] -= 1

    def pending_demand(self) -> dict[str, int]:
        """Calls waiting now for a worker to route to, per target (see route), and the
        backlog maps report (see set_demand): what autoscaling grows the pool for."""
        with self._waiting_lock:
            demand = collections.Counter({t: n for t, n in self._waiting.items() if n > 0})
            for target, n in self._backlogs.values():
                demand[target] += n
            return {t: n for t, n in demand.items() if n > 0}

    def set_demand(self, source: str, target: str, calls: int) -> None:
        """A map's backlog, in calls' worth of work not yet sent (its batches wait for a
        free place rather than queue on workers, so workers alone would not show it);
        0 when it ends."""
        with self._waiting_lock:
            if calls > 0:
                self._backlogs[source] = (target, calls)
            else:
                self._backlogs.pop(source, None)

    def wait_ready(self, timeout: float = 180) -> None:
        """Block until every worker has finished warming up all its backends."""
        deadline = time.monotonic() + timeout
        while True:
            self.refresh()
            routes = self.router.routes()
            if routes and all(r.ready for r in routes):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers still warming up after {timeout} s")
            time.sleep(0.1)

    def reroute_after_loss(self, dead: str, target, backend, fallback, worker):
        """After a worker died under a call: wait until the scheduler has noticed, then
        route again (to a survivor, or the dead worker's replacement)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self.refresh()
            if dead not in {r.address for r in self.router.routes()}:
                break
            time.sleep(0.2)
        route, service, _ = self.route(target, backend, fallback, worker)
        return route, service

    # -- asking workers --

    def endpoint(self, address: str) -> dict:
        """Where a worker serves direct links; asked once per worker."""
        endpoint = self.endpoints.get(address)
        if endpoint is None:
            endpoint = self.sync(self.call(address, "kaas_endpoint"), timeout=10)
            if not isinstance(endpoint, dict):
                raise KaasError(f"worker {address} runs no kaas runtime (no call endpoint)")
            self.endpoints[address] = endpoint = dict(endpoint)
        return endpoint

    def info(self, route: WorkerRoute) -> dict:
        """What a worker says about itself (its services, backends, kernels), or its error."""
        try:
            return self.sync(self.call(route.address, "kaas_info"), timeout=10)
        except Exception as e:
            return {"address": route.address, "name": route.name, "host": route.host,
                    "error": f"{type(e).__name__}: {e}", "services": [], "backends": {}}

    def status(self, embedded: bool) -> "PoolStatus":
        """The pool's status: the table read now, and every worker's info."""
        from ..pool_status import PoolStatus

        self.refresh()
        infos = [self.info(route) for route in self.router.routes()]
        for info in infos:  # each service's calls, over the worker's incarnations
            services = [s for s in info.get("services", ()) if isinstance(s, dict)]
            totals = self.service_calls.totals(str(info.get("name", info["address"])), info["address"],
                                               {s["resource"]: (int(s.get("calls", 0)), 0) for s in services})
            for s in services:
                s["calls"] = totals[s["resource"]][0]
        try:
            metrics = self.metrics()
        except Exception:  # the status without load figures
            metrics = []
        return PoolStatus(
            scheduler=self.scheduler_address,
            embedded=embedded,
            workers=sorted(infos, key=lambda i: i.get("name", "")),
            metrics=metrics,
        )

    def metrics(self) -> list[dict]:
        """One row per device session per worker (its ``physical_device`` names the device
        several may share); workers that do not answer within a second are left out. Calls
        and errors are counted over each worker's incarnations (see CallTotals)."""

        async def gather():
            async def ask(address: str):
                try:
                    return await asyncio.wait_for(self.call(address, "kaas_metrics"), timeout=1)
                except Exception:
                    return []

            replies = await asyncio.gather(*(ask(r.address) for r in self.router.routes()))
            # msgpack brings lists back as tuples
            return [dict(row) for rows in replies if isinstance(rows, (list, tuple)) for row in rows]

        rows = self.sync(gather(), timeout=5)
        with_calls_before(rows, self.device_calls)
        return sorted(rows, key=lambda r: (r["worker_name"], list(TARGETS).index(r["target"]), r["device"]))

    async def free(self, batches: dict[str, list[str]]) -> None:
        """Free kept buffers: worker address -> ids."""
        for worker, ids in batches.items():
            try:
                await self.call(worker, "kaas_free", client=self.client_id, ids=ids)
            except Exception:  # the worker is gone, and its buffers with it
                pass

    def free_everything(self) -> None:
        """This client's kept buffers on every worker (a connected pool's close)."""

        async def free_all():
            await asyncio.gather(*(
                self.call(r.address, "kaas_free", client=self.client_id, everything=True)
                for r in self.router.routes()), return_exceptions=True)

        try:
            self.sync(free_all(), timeout=5)
        except Exception:  # workers unreachable: their buffers are gone anyway
            pass

    def cancel(self, address: str, call_id: str) -> bool:
        """Ask a worker to stop a call (the notebook was interrupted, or its future was
        cancelled): True when the worker had it, queued or running."""
        return bool(self.sync(self.call(address, "kaas_cancel", call_id=call_id, reason="interrupt"), timeout=2))


def with_calls_before(rows: list[dict], totals: CallTotals) -> list[dict]:
    """Metrics rows with each worker's calls and errors summed over its incarnations."""
    by_worker: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        by_worker.setdefault((str(row.get("worker_name") or row["worker"]), row["worker"]), []).append(row)
    for (name, address), worker_rows in by_worker.items():
        counts = totals.totals(name, address, {_row_key(r): (int(r.get("calls") or 0), int(r.get("errors") or 0))
                                               for r in worker_rows})
        for row in worker_rows:
            row["calls"], row["errors"] = counts[_row_key(row)]
    return rows


def _row_key(row: dict):
    """A metrics row's session, the same in every incarnation of its worker."""
    return row.get("device_id") or (row.get("target"), row.get("backend"), row.get("device"))


def _waiting_for(warming: list[WorkerRoute], target: str, backend: str | None) -> str:
    """What a call waiting for the pool waits for, in a few words for the run view."""
    if not warming:
        return "waiting for the pool's workers to start"
    names = ", ".join(sorted(r.name for r in warming)[:3]) + (" ..." if len(warming) > 3 else "")
    if backend is None:
        from ..backends import registry

        backend = registry.default_backend(target)
    what = f"{backend} for {target}"
    return f"warming up {what} on worker{'s' if len(warming) > 1 else ''} {names}"
