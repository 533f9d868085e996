"""The notebook side: a pool of warm workers, how calls are routed, and the hot path.

``Pool.run`` is the one execution path behind every magic and API call:

1. route: pick a worker that advertises the target (Dask worker resources), preferring a
   real device, then a simulator, then (only when allowed) a CPU stand-in;
2. serialise the inputs (refusing, by name, any that cannot travel);
3. talk to that worker directly over a pooled Dask comm (no scheduler round trip), relay
   its print output as it arrives, and read the final reply;
4. rebuild outputs, or the cell's exception with the cell's line numbers, and a RunRecord.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import hashlib
import concurrent.futures
import io
import itertools
import pickle
import random
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, TextIO

from . import config as kaas_config
from . import fastlink, serial
from .errors import (
    CallTimeout,
    KaasError,
    LinkBroken,
    PoolNotRunning,
    SchedulerLost,
    SchedulerUnreachable,
    StaleHandleError,
    TargetUnavailable,
    VariableNotSendable,
    WorkerLost,
    rebuild_remote_exception,
)
from .fastlink import Links
from .handles import DeviceHandle, handles_in
from .kernelspec import KernelError, bind
from .record import RunRecord, Timings
from .stopping import REPLY_MARGIN_S, check_call_options, check_count, max_timeout
from .targets import DEFAULT_BACKEND, KIND_ORDER, READY_RESOURCE, TARGETS, Service, check_backend, check_target

if TYPE_CHECKING:
    from .pool_status import KernelTable, PoolStatus



@dataclass
class WorkerRoute:
    address: str
    name: str
    host: str
    services: dict[Service, float] = field(default_factory=dict)  # service -> concurrency
    ready: bool = False
    # Tells a worker restarted at the same address (a fixed port) from the one that died.
    incarnation: str = ""


@dataclass
class RunResult:
    outputs: dict[str, Any]
    record: RunRecord
    stdout: str = ""
    stderr: str = ""

    def __getitem__(self, name: str) -> Any:
        return self.outputs[name]


class Pool:
    """A client of a Dask cluster whose workers run the kaas runtime."""

    def __init__(self, client, cluster=None):
        self.client = client
        self.cluster = cluster
        self.loop: asyncio.AbstractEventLoop = client.loop.asyncio_loop
        self._scheduler_address: str = client.scheduler.address  # kept: the client forgets it when lost
        self._routes: dict[str, WorkerRoute] = {}
        self._routes_lock = threading.Lock()
        self._routes_updated = threading.Event()
        # Calls this client has in flight per worker; kept apart from the routing table,
        # which the background refresh replaces wholesale.
        self._in_flight: collections.Counter[str] = collections.Counter()
        self._last_record: RunRecord | None = None
        self._counter = itertools.count(1)
        self._kernels: dict = {}  # kernels this client registered: name -> KernelSpec
        # Names this client on shared workers: its kept buffers are its own.
        self.client_id = uuid.uuid4().hex
        self._to_free: dict[str, list[str]] = {}
        self._release_lock = threading.Lock()
        # Calls running or queued per worker and service, as the workers last said (all
        # clients' calls), and how many of ours were in flight then: for least-loaded routing.
        self._load: dict[str, tuple[dict[str, int], int]] = {}
        self._dead: dict[tuple[str, str], float] = {}  # workers seen dying: (address, incarnation) -> when
        # Which spec and target each kernel call uses, for the current routing table.
        self._kernel_routes: tuple[dict | None, dict] = (None, {})
        self._candidate_cache: tuple[dict | None, dict] = (None, {})  # see _candidates
        self._library: dict | None = None  # the shipped kernels, read on first use
        self._scheduler_lost_since: float | None = None
        self._endpoints: dict[str, dict] = {}  # worker address -> where its direct link listens
        self._links = Links(client.connection_args.get("ssl_context"))
        max_value, max_message = _transfer_limits()
        fastlink.set_limits(max_value + 2**20, max_message + 2**24)
        self._scheduler_error: BaseException | None = None
        self._closed = False
        self._comms = self._sync(self._start_comm_pool())
        self._register_plugin()
        self._sync(self._refresh_routes())
        self._refresher = asyncio.run_coroutine_threadsafe(self._refresh_forever(), self.loop)

    # -- construction --

    # Embedded pools this process started: scheduler address -> a weak reference to the
    # cluster, whose certificates (in memory only) let Pool.connect reach it too.
    _embedded_clusters: dict = {}

    @classmethod
    def start(cls, n_workers: int | None = None, **cluster_kwargs) -> "Pool":
        """Start an embedded LocalCluster of worker processes, on 127.0.0.1 only, and
        (kaas.pool.security: temporary, the default) with mutual TLS on throwaway
        certificates, so that other users of this machine cannot use it."""
        import weakref

        import dask.config
        from distributed import Client, LocalCluster

        if n_workers is None:
            n_workers = kaas_config.get("pool.n-workers", 2)
        n_workers = check_count(n_workers, "n_workers", 1, 1024, "workers of one embedded pool")
        cluster_kwargs.setdefault("threads_per_worker", 1)
        cluster_kwargs.setdefault("memory_limit", kaas_config.get("pool.memory-limit", "auto"))
        # Loopback only: whoever reaches the pool can run code on it.
        cluster_kwargs.setdefault("dashboard_address", "127.0.0.1:0")
        cluster_kwargs.setdefault("worker_dashboard_address", "127.0.0.1:0")
        # And only this user: any local user can reach 127.0.0.1, so the scheduler, nannies,
        # workers, this client and kaas's direct links all require certificates made for this
        # pool alone (Dask's Security.temporary(), in memory: never written where others read).
        if "security" not in cluster_kwargs:
            mode = kaas_config.get("pool.security", "temporary")
            mode = "none" if mode in (None, False) else str(mode).strip().lower()
            if mode == "temporary":
                from distributed.security import Security

                try:
                    cluster_kwargs["security"] = Security.temporary()
                except ImportError as e:
                    raise KaasError(
                        "the embedded pool's TLS certificates need the `cryptography` package: "
                        "pip install cryptography (or set kaas.pool.security: none, and then any "
                        "user of this machine can run code as you through the pool)") from e
                cluster_kwargs.setdefault("protocol", "tls://")
            elif mode != "none":
                raise KaasError(f"kaas.pool.security must be 'temporary' or 'none', not {mode!r}")
        # The workers end with this process (a kernel restart, a crash), even one stuck in C
        # code: their supervisors watch this pid, handed on by the nannies (see supervisor).
        from .supervisor import owner_environment

        cluster_kwargs["env"] = {**(cluster_kwargs.get("env") or {}), **owner_environment()}
        # Nannies hand their config to the worker processes they start (and restart).
        profiler = bool(kaas_config.get("pool.worker-profiler", False))
        with dask.config.set({"distributed.worker.profile.enabled": profiler}):
            cluster = LocalCluster(
                n_workers=n_workers, processes=True, host="127.0.0.1", **cluster_kwargs
            )
        client = Client(cluster, security=getattr(cluster, "security", None), set_as_default=False)
        for address, ref in list(cls._embedded_clusters.items()):  # forget the collected ones
            if ref() is None:
                cls._embedded_clusters.pop(address, None)
        cls._embedded_clusters[cluster.scheduler_address] = weakref.ref(cluster)
        return cls(client, cluster)

    @classmethod
    def connect(cls, address: str, security=None, timeout: float = 30) -> "Pool":
        """Use an existing Dask scheduler (any deployment: jobqueue, Kubernetes, Gateway)."""
        from distributed import Client

        if security is None:  # an embedded pool of this process: with its own certificates
            cluster = cls._embedded_clusters.get(address, lambda: None)()
            security = getattr(cluster, "security", None)
        failure = None
        try:
            client = Client(address, security=security, timeout=timeout, set_as_default=False)
        except Exception as e:
            hint = ""
            if address.startswith("tls://"):
                hint = (" A tls:// scheduler needs security=distributed.security.Security(tls_ca_file=..., "
                        "tls_client_cert=..., tls_client_key=...) with a certificate its CA signed.")
            failure = SchedulerUnreachable(
                f"could not connect to the Dask scheduler at {address}: {type(e).__name__}: {e}.{hint}")
            failure.__cause__ = e.with_traceback(None)
        if failure is not None:
            # The half-made Client is garbage now. Collect it here: its __del__ takes the lock
            # of Dask's shared loop runner, and run later by chance (during the next Client's
            # start, which holds that lock) it deadlocked a test process once.
            gc.collect()
            raise failure
        return cls(client)

    def _register_plugin(self) -> None:
        from .worker import KaasWorkerPlugin

        self.client.register_plugin(KaasWorkerPlugin(kaas_config.snapshot()), name="kaas")

    async def _start_comm_pool(self):
        from distributed.core import ConnectionPool

        # Our own pool so replies are *not* deserialised by the comm: outputs and
        # exceptions are rebuilt one by one, and one bad value cannot lose the others.
        # A short connect timeout: a worker that does not answer in 5 s is dead to a notebook.
        pool = ConnectionPool(deserialize=False, connection_args=self.client.connection_args, timeout=5)
        await pool.start()
        return pool

    def _sync(self, coro, timeout: float = 60):
        """Run ``coro`` on the client's event loop and wait for it, never forever."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise KaasError(f"the Dask client's event loop did not answer within {timeout:g} s") from None

    # -- routing table, refreshed in the background from the scheduler --

    async def _refresh_routes(self) -> None:
        try:
            identity = await asyncio.wait_for(self.client.scheduler.identity(), timeout=5)
        except Exception as e:
            if self._scheduler_lost_since is None:
                self._scheduler_lost_since = time.monotonic()
            self._scheduler_error = e
            raise
        self._scheduler_lost_since = None
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
        with self._routes_lock:
            self._routes = routes
        self._routes_updated.set()

    async def _refresh_forever(self) -> None:
        interval = float(kaas_config.get("pool.routing-refresh", 1.0))
        while not self._closed:
            await asyncio.sleep(interval)
            try:
                await self._refresh_routes()
            except Exception:  # scheduler briefly unreachable: keep the last table
                pass
            await self._refresh_load()
            await self._free_pending()

    async def _refresh_load(self) -> None:
        """Ask every ready worker how busy its services are (all clients' calls)."""

        async def ask(address: str):
            try:
                load = await asyncio.wait_for(self._comms_call(address, "kaas_load"), timeout=2)
            except Exception:
                return
            if isinstance(load, dict):
                self._load[address] = (load, self._in_flight[address])

        addresses = [r.address for r in self.routes() if r.ready]
        await asyncio.gather(*(ask(a) for a in addresses))
        for gone in set(self._load) - set(addresses):
            self._load.pop(gone, None)

    def _busy(self, address: str, service: Service) -> float:
        """Calls running or queued on that worker's service: the last report from the
        worker (everyone's calls), corrected for our own calls since."""
        reported, ours_then = self._load.get(address, ({}, 0))
        ours_now = self._in_flight[address]
        return max(reported.get(service.resource, 0) - ours_then, 0) + ours_now

    def _scheduler_lost(self) -> bool:
        """The scheduler stopped answering: the client says so, or refreshes failed for a
        few seconds (one slow answer on a busy machine is not a loss)."""
        if self._scheduler_lost_since is None:
            return False
        return self.client.status != "running" or time.monotonic() - self._scheduler_lost_since > 3

    def _lost_scheduler_error(self) -> SchedulerLost:
        return SchedulerLost(
            f"lost the Dask scheduler at {self.scheduler_address} "
            f"({type(self._scheduler_error).__name__}: {self._scheduler_error}); calls cannot be routed. "
            f"Once it is back, run %kaas connect {self.scheduler_address} "
            f"(kaas.connect({self.scheduler_address!r}))"
        )

    def refresh(self) -> None:
        """Read the routing table from the scheduler now."""
        try:
            self._sync(self._refresh_routes())
        except Exception as e:
            raise self._lost_scheduler_error() from e

    def routes(self) -> list[WorkerRoute]:
        with self._routes_lock:
            return [r for a, r in self._routes.items() if (a, r.incarnation) not in self._dead]

    def _forget_worker(self, address: str) -> None:
        """A worker died (or is being replaced): route nothing more to it. The scheduler may
        list it a while longer; its replacement comes back under a new address, or under the
        same one (a fixed port) as a new incarnation."""
        with self._routes_lock:
            route = self._routes.get(address)
            self._dead[(address, route.incarnation if route else "")] = time.monotonic()
            self._kernel_routes = (None, {})
            self._candidate_cache = (None, {})
            for gone in [k for k, t in self._dead.items() if time.monotonic() - t > 600]:
                del self._dead[gone]
        self._endpoints.pop(address, None)

    def _candidates(self, target: str, backend: str | None, fallback: bool, worker: str | None):
        """(route, service, concurrency) of every worker that could serve such a call; kept
        until the routing table changes (a refresh, or a worker found dead)."""
        with self._routes_lock:
            table, cached = self._routes, self._candidate_cache
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

    def _choose(self, target: str, backend: str | None, fallback: bool, worker: str | None):
        found = self._candidates(target, backend, fallback, worker)
        if not found:
            return None
        default = DEFAULT_BACKEND[target]

        def rank(item):
            route, service, concurrency = item
            return (
                KIND_ORDER[service.kind],
                service.backend != default,
                self._busy(route.address, service) / max(concurrency, 1),
                random.random(),
            )

        route, service, _ = min(found, key=rank) if len(found) > 1 else found[0]
        return route, service

    def route(self, target: str, backend: str | None = None, fallback: bool | None = None,
              worker: str | None = None, timeout: float | None = None):
        """The (worker, service) a call would use; waits while workers are still warming."""
        check_target(target)
        check_backend(backend)
        if fallback is None:
            fallback = bool(kaas_config.get("fallback", False))
        choice = self._choose(target, backend, fallback, worker)
        if choice is not None:  # the warm pool's usual answer
            return choice[0], choice[1], False
        timeout = float(kaas_config.get("pool.warmup-timeout", 180)) if timeout is None else timeout
        deadline = time.monotonic() + timeout
        waited = False
        while True:
            choice = self._choose(target, backend, fallback, worker)
            if choice is not None:
                return choice[0], choice[1], waited
            routes = self.routes()
            warming = [r for r in routes if not r.ready]
            if routes and not warming or time.monotonic() > deadline:
                raise self._unavailable(target, backend, fallback, worker)
            waited = True
            self._routes_updated.clear()
            self.refresh()
            if not self._choose(target, backend, fallback, worker):
                time.sleep(0.05)

    def _unavailable(self, target, backend, fallback, worker) -> TargetUnavailable:
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

    def wait_ready(self, timeout: float = 180) -> None:
        """Block until every worker has finished warming up all its backends."""
        deadline = time.monotonic() + timeout
        while True:
            self.refresh()
            routes = self.routes()
            if routes and all(r.ready for r in routes):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers still warming up after {timeout} s")
            time.sleep(0.1)

    # -- the hot path --

    def run(
        self,
        code: str,
        target: str = "cpu",
        *,
        inputs: Mapping[str, Any] | None = None,
        outputs: Iterable[str] | None = None,
        backend: str | None = None,
        fallback: bool | None = None,
        worker: str | None = None,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
        filename: str | None = None,
        line_offset: int = 0,
        keep: bool = False,
        progress: Callable[[str, RunRecord], None] | None = None,
        timeout: float | None = None,
        retries: int = 0,
    ) -> RunResult:
        """Run ``code`` on a warm worker serving ``target``.

        Inside ``code``, ``kernels.NAME(...)`` calls a library kernel or one registered by
        this client, on the worker's device.

        ``inputs`` are sent to the worker; ``outputs`` (default: the names the code assigns
        at top level) come back as host values. Print output is written to ``stdout`` /
        ``stderr`` (default: this process's) as it arrives. An exception in ``code`` is
        raised here with its original type and the remote traceback.

        With ``keep``, array outputs stay on the worker's device and come back as
        :class:`~kaas_magic.handles.DeviceHandle` objects; inputs that are handles make the
        call go to the worker holding them, where they are used in place.

        ``progress(state, record)`` is told, in this thread, each state of the call:
        queued, sending, running, compiling (a kernel), receiving, then done or error
        (cancelled when the call is interrupted).

        ``timeout`` (default ``kaas.timeout``, else ``kaas.limits.max-timeout``: one day)
        bounds the seconds the code may run: past it the call fails with
        :class:`CallTimeout`, the code is stopped, and a worker that cannot stop it (native
        code holding the GIL) is killed from outside by its supervisor and replaced. Interrupting this call (Ctrl-C, the notebook's stop
        button) stops the remote code too. ``retries`` re-runs the call elsewhere when its
        worker dies under it; only ask for it when running the code twice is safe.
        """
        from .cellcode import analyse

        t_start = time.perf_counter()
        self._check_usable()
        # Named by content, so that running the same code again hits the parse cache here
        # and the compile cache on the worker.
        filename = filename or f"<kaas-cell-{hashlib.blake2b(code.encode(), digest_size=8).hexdigest()}>"
        line_offset = check_count(line_offset, "line_offset", 0, 10**6, "lines before a cell")
        info = analyse(code, filename, line_offset)  # SyntaxError here: nothing is sent
        body = {
            "code": code, "filename": filename, "line_offset": line_offset,
            "outputs_explicit": outputs is not None,
            "kernels": [k.to_dict() for k in self._kernels.values()] if "kernels" in info.reads else [],
        }
        return self._submit(body, target, dict(inputs or {}), list(outputs) if outputs is not None else list(info.writes),
                            backend=backend, fallback=fallback, worker=worker, stdout=stdout, stderr=stderr,
                            keep=keep, progress=progress, timeout=timeout, retries=retries, t_start=t_start)

    def _check_usable(self) -> None:
        if self._closed:
            raise PoolNotRunning("this pool is closed; start or connect a new one")
        if self._scheduler_lost():
            raise self._lost_scheduler_error()

    def _submit(self, body: dict, target: str, inputs: dict, output_names: list[str], *, backend, fallback,
                worker, stdout, stderr, keep, progress, timeout, retries, t_start: float) -> RunResult:
        """What run() and call() share: route, send, relay, rebuild, record. ``body`` says
        what runs: cell code, or (from call()) one registered kernel."""
        # Checked before anything is sent (a bad value must not switch a worker's safety
        # off). Every call runs under a timeout: its own, kaas.timeout, or (None) the
        # worker's kaas.limits.max-timeout.
        timeout, retries = check_call_options(kaas_config.get, timeout, retries,
                                              inputs if backend == "qiskit" and "kernel" in body else None)
        started_wall = time.time() - (time.perf_counter() - t_start)
        call_id = f"{self.client_id[:16]}-{next(self._counter)}"  # unique across clients and hosts

        route, service, waited, inputs = self._route_with_data(target, backend, fallback, worker, inputs)
        record = RunRecord(
            call_id=call_id, target=target, backend=service.backend, kind=service.kind,
            worker=route.address, host=route.host, inputs=tuple(inputs),
            started_at=started_wall,
        )
        t_routed = time.perf_counter()
        report = progress or _ignore
        report("queued", record)

        report("sending", record)
        serialized, record.bytes_in = _serialize_inputs(inputs)
        t_serialized = time.perf_counter()

        message = {
            **body,
            "service": service.resource,
            "inputs": serialized,
            "outputs": output_names,
            "client": self.client_id,
            "call_id": call_id,
            "timeout": float(timeout) if timeout is not None else None,
            "keep": keep,
            "progress": progress is not None,
            "free": self._frees_for(route.address),
        }
        while True:
            self._in_flight[route.address] += 1
            try:
                sent_at = time.time()
                reply, out = self._exchange(route.address, message, stdout or sys.stdout, stderr or sys.stderr,
                                            lambda state: report(state, record))
                break
            except WorkerLost as e:
                if self.cluster is None and not self._scheduler_answers():
                    raise self._lost_scheduler_error() from e  # the worker went with its scheduler
                # Kept inputs died with the worker: nothing to retry with.
                if retries <= 0 or any(True for v in inputs.values() for _ in handles_in(v)):
                    record.ok, record.error = False, type(e).__name__
                    report("error", record)
                    raise
                retries -= 1
                route, service = self._reroute_after_loss(route.address, target, backend, fallback, worker)
                record.worker, record.host = route.address, route.host
                message["service"] = service.resource
            except BaseException as e:
                record.ok, record.error = False, type(e).__name__
                report("cancelled" if isinstance(e, KeyboardInterrupt) else "error", record)
                raise
            finally:
                self._in_flight[route.address] -= 1
        t_received = time.perf_counter()
        if reply.get("worker_exiting"):
            self._forget_worker(route.address)

        result_outputs, deserialize_time = {}, 0.0
        if reply.get("ok"):
            report("receiving", record)
            t = time.perf_counter()
            result_outputs, record.bytes_out, skipped = _deserialize_outputs(reply["outputs"])
            record.skipped = {**reply.get("skipped", {}), **skipped}
            for name, kept in (reply.get("kept") or {}).items():
                result_outputs[name] = self._handles(kept, route.address, service.resource, reply.get("device", ""))
            deserialize_time = time.perf_counter() - t
        t_end = time.perf_counter()

        # Where the time went. On one host the wall clocks agree, so the wire time of each
        # direction is measured; across hosts it is split evenly.
        w = reply["timings"]
        worker_span = reply["replied_at"] - reply["received_at"]
        worker_phases = w["warm_wait"] + w["queue"] + w["setup"] + w["execute"] + w["to_host"]
        wire = max(0.0, (t_received - t_serialized) - worker_span)
        if reply.get("host") == _hostname():
            wire_in = min(wire, max(0.0, reply["received_at"] - sent_at))
        else:
            wire_in = wire / 2
        wire_out = wire - wire_in
        record.timings = Timings(
            queue=(t_routed - t_start) + w["queue"] + max(0.0, worker_span - worker_phases),
            transfer_in=(t_serialized - t_routed) + wire_in,
            setup=w["setup"] + w["warm_wait"],
            execute=w["execute"],
            transfer_out=w["to_host"] + wire_out + deserialize_time,
            total=t_end - t_start,
        )
        record.device = reply.get("device", "")
        record.kernels = dict(reply.get("kernels") or {})
        record.cold = waited or w["warm_wait"] > 0.001
        record.outputs = tuple(result_outputs)
        record.ok = bool(reply.get("ok"))
        self._last_record = record
        if not record.ok:
            error = reply["error"]
            record.error = error["type"]
            report("error", record)
            raise self._remote_exception(error, record)
        report("done", record)
        return RunResult(result_outputs, record, *out)

    def _scheduler_answers(self) -> bool:
        try:
            self._sync(self._refresh_routes(), timeout=10)
            return True
        except Exception:
            return False

    def _reroute_after_loss(self, dead: str, target, backend, fallback, worker):
        """After a worker died under a call: wait until the scheduler has noticed, then
        route again (to a survivor, or the dead worker's replacement)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self.refresh()
            if dead not in {r.address for r in self.routes()}:
                break
            time.sleep(0.2)
        route, service, _ = self.route(target, backend, fallback, worker)
        return route, service

    # -- data kept on devices --

    def _route_with_data(self, target, backend, fallback, worker, inputs: dict):
        """Route a call; one whose inputs are kept on a worker goes to that worker (data
        locality beats balance). Handles the chosen worker does not hold are fetched home
        and sent as values."""
        handles = [h for value in inputs.values() for h in handles_in(value)]
        if handles:
            live = {r.address for r in self.routes()}
            for h in handles:
                self._check_handle(h, live)
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
                route, service, waited = self.route(target, backend, fallback, home, timeout=0)
            except TargetUnavailable:  # that worker cannot serve the target: move the data
                home = None
        if home is None:
            route, service, waited = self.route(target, backend, fallback, worker)
        if any(h.worker != route.address for h in handles):
            inputs = {name: _map_handles(value, lambda h: h if h.worker == route.address else h.get())
                      for name, value in inputs.items()}
        return route, service, waited, inputs

    def _check_handle(self, handle: DeviceHandle, live: set[str]) -> None:
        if handle._pool() is not self:
            raise StaleHandleError(f"{handle!r} belongs to another pool")
        if handle.freed:
            raise StaleHandleError(f"{handle!r} was freed")
        if handle.worker not in live:
            raise StaleHandleError(
                f"{handle!r} lived on worker {handle.worker}, which has left the pool (it died or "
                f"was stopped); its data is lost: compute it again"
            )

    def _handles(self, kept, worker: str, service: str, device: str):
        if isinstance(kept, list):
            return tuple(self._handles(k, worker, service, device) for k in kept)
        return DeviceHandle(self, kept["id"], worker, service, device, kept)

    def put(self, value, target: str = "cpu", *, backend: str | None = None, fallback: bool | None = None,
            worker: str | None = None) -> DeviceHandle:
        """Copy a host array onto a device of ``target`` and keep it there."""
        result = self.run("__kept = to_device(__value)", target, inputs={"__value": value}, outputs=["__kept"],
                          backend=backend, fallback=fallback, worker=worker, keep=True,
                          stdout=io.StringIO(), filename="<kaas put>")
        return result.outputs["__kept"]

    def fetch(self, handle: DeviceHandle):
        """Copy a kept array home (``handle.get()``)."""
        service = Service.from_resource(handle.service)
        result = self.run("__value = __handle", service.target, inputs={"__handle": handle}, outputs=["__value"],
                          backend=service.backend, fallback=True, worker=handle.worker,
                          stdout=io.StringIO(), filename="<kaas get>")
        return result.outputs["__value"]

    def _release(self, worker: str, id: str) -> None:
        """Free a kept buffer (this may run in __del__). The id rides along with the next call
        to that worker, or goes within a second with the background refresh: a chain of
        kept calls then costs no extra messages."""
        if self._closed:
            return
        with self._release_lock:
            self._to_free.setdefault(worker, []).append(id)

    def _frees_for(self, worker: str) -> list[str]:
        with self._release_lock:
            return self._to_free.pop(worker, [])

    async def _free_pending(self) -> None:
        with self._release_lock:
            batches, self._to_free = self._to_free, {}
        for worker, ids in batches.items():
            try:
                await self._comms_call(worker, "kaas_free", client=self.client_id, ids=ids)
            except Exception:  # the worker is gone, and its buffers with it
                pass

    def _remote_exception(self, error: dict, record: RunRecord) -> BaseException:
        exception = rebuild_remote_exception(
            error, worker=record.worker, where=f"{record.target} on {record.label()}"
        )
        try:
            exception.kaas_record = record  # type: ignore[attr-defined]
        except AttributeError:
            pass
        return exception

    def _exchange(self, address: str, message: dict, stdout: TextIO, stderr: TextIO,
                  on_state: Callable[[str], None]):
        """Send one call and relay its streamed output, in the caller's thread, over a
        direct link to the worker (see fastlink): printing lands where the caller is (the
        right notebook cell), and no event loop sits in the hot path."""
        try:
            endpoint = self._endpoint(address)
            link = self._links.take(endpoint)
        except Exception as e:
            self._forget_worker(address)
            raise WorkerLost(f"worker {address} cannot be reached ({type(e).__name__}: {e}); it may have died. "
                             f"The pool replaces dead workers; calls on other workers go on") from e
        relay = _OutputRelay(stdout, stderr, on_state)
        call_id = message["call_id"]
        # Nothing here waits for ever: past its timeout (without one, this notebook's
        # kaas.limits.max-timeout) and the worker's and its supervisor's time to stop it,
        # plus a few seconds, the call is given up (and the worker with it).
        budget = message.get("timeout") or max_timeout(kaas_config.get("limits.max-timeout", None))
        deadline = time.monotonic() + budget + REPLY_MARGIN_S
        try:
            link.sock.settimeout(budget + REPLY_MARGIN_S)
            link.send(message)
            while True:
                reply = link.receive()
                if not _answers(reply, call_id):
                    raise _Mismatch(reply)
                if reply.get("kind") != "stream":
                    break
                relay.write(reply["chunks"])
                link.sock.settimeout(max(deadline - time.monotonic(), 0.001))
            link.sock.settimeout(None)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(self._cancel_remote(address, call_id, link)) from None
        except _Mismatch as e:
            link.close()
            raise LinkBroken(
                f"the link to worker {address} carried a reply that is not this call's ({e}); the link was "
                f"dropped and nothing from it was used. The worker goes on serving; run the call again"
            ) from None
        except (OSError, EOFError, ValueError, pickle.UnpicklingError) as e:  # the link, not our output
            link.close()
            if time.monotonic() > deadline - REPLY_MARGIN_S:  # past its timeout: the worker was stopped
                self._forget_worker(address)
                how = (f"did not answer within {REPLY_MARGIN_S:.0f} s more" if isinstance(e, TimeoutError)
                       else "was stopped, as the code could not be stopped in place")
                raise CallTimeout(f"the cell ran past its timeout of {budget:g} s and worker {address} {how}: "
                                  f"the worker is being replaced by a fresh one") from None
            raise self._link_failed(address, e) from e
        self._links.give_back(endpoint, link)
        if reply.get("kind") != "result":
            raise KaasError(f"worker {address} could not accept the call: {reply.get('text')}")
        return reply, relay.captured()

    def _link_failed(self, address: str, error: BaseException) -> KaasError:
        """A call's link broke. Only evidence that the worker is gone drops it from routing:
        the scheduler no longer lists it, or a fresh connection to it fails. A link broken
        for another reason (a peer's bad frame, a stalled send) costs this call only."""
        gone = False
        try:
            self._sync(self._refresh_routes(), timeout=5)
            gone = address not in {r.address for r in self.routes()}
        except Exception:  # the scheduler is unreachable: judge by the worker alone
            pass
        if not gone:
            try:
                self._links.probe(self._endpoint(address))
            except Exception:
                gone = True
        if gone:
            self._forget_worker(address)
            return WorkerLost(
                f"worker {address} died (or became unreachable) while running this call "
                f"({type(error).__name__}: {error}). The pool replaces dead workers and calls "
                f"on other workers go on; add --retries N (retries=N) to run it again elsewhere "
                f"if running it twice is safe")
        return LinkBroken(
            f"the link to worker {address} broke during this call ({type(error).__name__}: {error}); the worker "
            f"is still in the pool and goes on serving, but this call's result is lost: run it again")

    def transport(self, address: str) -> str:
        """How calls reach worker ``address``: "unix" (a Unix socket, for a worker on this
        machine) or "tcp"."""
        endpoint = self._endpoint(address)
        link = self._links.take(endpoint)
        try:
            return "unix" if link.sock.family == getattr(socket, "AF_UNIX", None) else "tcp"
        finally:
            self._links.give_back(endpoint, link)

    def _endpoint(self, address: str) -> dict:
        """Where a worker serves direct links; asked once per worker."""
        endpoint = self._endpoints.get(address)
        if endpoint is None:
            endpoint = self._sync(self._comms_call(address, "kaas_endpoint"), timeout=10)
            if not isinstance(endpoint, dict):
                raise KaasError(f"worker {address} runs no kaas runtime (no call endpoint)")
            self._endpoints[address] = endpoint = dict(endpoint)
        return endpoint

    def _cancel_remote(self, address: str, call_id: str, link) -> str:
        """The notebook was interrupted during a call: stop the code on the worker too, and
        give it about a second to confirm before handing the interrupt back."""
        try:
            self._sync(self._comms_call(address, "kaas_cancel", call_id=call_id, reason="interrupt"), timeout=2)
            reply = link.receive(timeout=1.5)
            while isinstance(reply, dict) and reply.get("kind") == "stream":
                reply = link.receive(timeout=1.5)
            if isinstance(reply, dict) and reply.get("error"):
                if reply.get("worker_exiting"):
                    self._forget_worker(address)
                return f"kaas: {reply['error']['message']}"
        except Exception:  # unreachable worker or slow stop: the worker escalates by itself
            pass
        finally:
            link.close()  # it may be mid-message: never reuse it
        return f"kaas: interrupted; asked worker {address} to stop the cell"

    # -- registered kernels --

    def library(self) -> dict:
        if self._library is None:
            from .kernelspec import load_library

            self._library = load_library()
        return self._library

    def _kernel_specs(self, name: str) -> list:
        if name in self._kernels:
            return [self._kernels[name]]
        specs = self.library().get(name)
        if not specs:
            known = sorted(set(self.library()) | set(self._kernels))
            raise KernelError(f"unknown kernel {name!r}; known kernels: {', '.join(known)}")
        return specs

    def _route_kernel(self, specs: list, target: str | None, backend: str | None, fallback: bool | None):
        """Pick (spec, target): a real device first, then a simulator, then a stand-in.

        The choice depends only on what the pool serves, so it is kept until the routing
        table changes (about once a second); which worker serves the call is decided per
        call, by load."""
        if fallback is None:
            fallback = bool(kaas_config.get("fallback", False))
        with self._routes_lock:
            table = self._routes
        if self._kernel_routes[0] is not table:
            self._kernel_routes = (table, {})
        key = (tuple(map(id, specs)), target, backend, fallback)
        cached = self._kernel_routes[1].get(key)
        if cached is None:
            choice = self._choose_kernel(specs, target, backend, fallback)
            # The specs stay referenced here, so that their ids in the key are not reused.
            cached = self._kernel_routes[1][key] = (choice, tuple(specs))
        return cached[0]

    def _choose_kernel(self, specs: list, target: str | None, backend: str | None, fallback: bool):
        if target is not None:
            check_target(target)
        options = [
            (spec, t) for spec in specs for t in (spec.targets if target is None else (target,))
            if backend is None or spec.backend == backend
        ]
        for allow in ((False, True) if fallback else (False,)):
            best = None
            for spec, t in options:
                choice = self._choose(t, spec.backend, allow, None)
                if choice is not None:
                    rank = KIND_ORDER[choice[1].kind]
                    if best is None or rank < best[0]:
                        best = (rank, spec, t)
            if best is not None:
                return best[1], best[2]
        if not self.routes() or any(not r.ready for r in self.routes()):
            self.wait_ready()
            return self._choose_kernel(specs, target, backend, fallback)
        where = ", ".join(sorted({f"{t} ({s.language})" for s, t in options})) or "nothing that matches"
        raise TargetUnavailable(
            f"no worker in the pool can run kernel {specs[0].name!r} on {where}. The pool serves:\n  "
            + "\n  ".join(self.served())
            + ("" if fallback else "\nAdd fallback=True (--fallback) to allow a CPU stand-in.")
        )

    def call(self, name: str, *args, target: str | None = None, backend: str | None = None,
             fallback: bool | None = None, keep: bool = False, timeout: float | None = None,
             retries: int = 0, **kwargs) -> Any:
        """Run kernel ``name`` with ``args`` on the best device that can, and return its
        result as host values (``keep=True``: as handles to device buffers). Arguments are
        checked against the signature before launch; handles among them are used in place.
        ``retries`` as for :meth:`run`."""
        t_start = time.perf_counter()
        self._check_usable()
        specs = self._kernel_specs(name)
        spec, target = self._route_kernel(specs, target, backend, fallback)
        if spec.params is not None:
            # Fails here, naming the argument, before anything is sent. The arguments then
            # travel by parameter name (an error sending one names it).
            inputs = bind(spec, args, kwargs).values
        else:  # a Python kernel taking any arguments
            inputs = {"__args": args, "__kwargs": kwargs}
        body = {"kernel": name, "kernels": [spec.to_dict()] if spec.origin == "user" else [],
                "filename": f"<kaas call {name}>"}
        result = self._submit(body, target, inputs, ["__result"], backend=spec.backend, fallback=True, worker=None,
                              stdout=io.StringIO(), stderr=None, keep=keep, progress=None, timeout=timeout,
                              retries=retries, t_start=t_start)
        return result.outputs["__result"]

    def register(self, source: str, language: str, *, signature: str | None = None,
                 name: str | None = None, target: str | None = None, fallback: bool | None = None,
                 line_offset: int = 0):
        """Register a kernel from source and compile it on a warm worker straight away.

        A compile error raises with the compiler's log (lines point into the cell when
        ``line_offset`` says where the source starts) and registers nothing."""
        from .kernelspec import spec_from_source

        spec = spec_from_source(source, language, signature=signature, name=name,
                                targets=(target,) if target else (), line_offset=line_offset)
        previous = self._kernels.get(spec.name)
        self._kernels[spec.name] = spec
        compile_here = dict(code=f"__how = kernels._compile({spec.name!r})", target=None, outputs=["__how"],
                            backend=spec.backend, fallback=True, stdout=io.StringIO(),
                            filename=f"<kaas register {spec.name}>")
        try:
            chosen, compile_here["target"] = self._route_kernel([spec], target, None, fallback)
            result = self.run(**compile_here)
            # Then on every other worker that could serve its calls, at once, so that no
            # call pays for a compile.
            others = {route.address for route, service, _ in self._candidates(
                compile_here["target"], spec.backend, True, None)} - {result.record.worker}
            if others:
                with concurrent.futures.ThreadPoolExecutor(len(others)) as ex:
                    list(ex.map(lambda w: self.run(**compile_here, worker=w), sorted(others)))
        except BaseException:
            if previous is None:
                del self._kernels[spec.name]
            else:
                self._kernels[spec.name] = previous
            raise
        return spec, result.record

    def kernels(self) -> "KernelTable":
        from .pool_status import KernelTable

        status = self.status()
        compiled: dict[str, list] = {}
        for worker in status.workers:
            for row in worker.get("kernels", []):
                compiled.setdefault(row["name"], []).append({"worker": worker.get("name"), **row})
        specs = [s for specs in self.library().values() for s in specs] + list(self._kernels.values())
        return KernelTable(specs, compiled)

    # -- the notebook-facing wrapper --

    def run_cell(
        self,
        code: str,
        target: str,
        namespace: dict,
        *,
        inputs: Iterable[str] | None = None,
        outputs: Iterable[str] | None = None,
        exclude: Iterable[str] = (),
        **options,
    ) -> RunResult:
        """Like :meth:`run`, but reads inputs from ``namespace`` and writes outputs back.

        Inputs default to the names the cell reads that ``namespace`` defines, except the
        names the backend injects (``xp``, ``device`` ...) and those in ``exclude``.
        """
        from . import backends
        from .cellcode import analyse

        info = analyse(code, options.get("filename") or "<kaas-cell>", options.get("line_offset", 0))
        if inputs is None:
            route, service, _ = self.route(
                target, options.get("backend"), options.get("fallback"), options.get("worker")
            )
            skip = set(backends.injected_names(service.backend)) | set(exclude)
            names = [n for n in sorted(info.reads) if n in namespace and n not in skip]
        else:
            names = list(inputs)
            missing = [n for n in names if n not in namespace]
            if missing:
                raise KaasError(f"--in names variables that are not defined: {', '.join(missing)}")
        result = self.run(code, target, inputs={n: namespace[n] for n in names}, outputs=outputs, **options)
        namespace.update(result.outputs)
        return result

    # -- status and lifecycle --

    def last_run(self) -> RunRecord | None:
        return self._last_record

    def status(self) -> "PoolStatus":
        from .pool_status import PoolStatus

        self.refresh()
        infos = []
        for route in self.routes():
            try:
                info = self._sync(self._comms_call(route.address, "kaas_info"), timeout=10)
            except Exception as e:
                info = {"address": route.address, "name": route.name, "host": route.host,
                        "error": f"{type(e).__name__}: {e}", "services": [], "backends": {}}
            infos.append(info)
        return PoolStatus(
            scheduler=self.scheduler_address,
            embedded=self.cluster is not None,
            workers=sorted(infos, key=lambda i: i.get("name", "")),
        )

    def metrics(self) -> list[dict]:
        """One row per device per worker: occupancy, utilisation over the last 10 s and
        60 s, calls, median latency, memory, warm kernels (what the monitor shows).
        Workers that do not answer within a second are left out."""

        async def gather():
            async def ask(address: str):
                try:
                    return await asyncio.wait_for(self._comms_call(address, "kaas_metrics"), timeout=1)
                except Exception:
                    return []

            replies = await asyncio.gather(*(ask(r.address) for r in self.routes()))
            # msgpack brings lists back as tuples
            return [dict(row) for rows in replies if isinstance(rows, (list, tuple)) for row in rows]

        rows = self._sync(gather(), timeout=5)
        return sorted(rows, key=lambda r: (r["worker_name"], list(TARGETS).index(r["target"]), r["device"]))

    async def _comms_call(self, address: str, op: str, **kwargs):
        comm = await self._comms.connect(address)
        try:
            await comm.write({"op": op, **kwargs})
            reply = await comm.read()
        except Exception:
            comm.abort()
            raise
        self._comms.reuse(address, comm)
        return reply

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def scheduler_address(self) -> str:
        return self._scheduler_address

    def close(self) -> None:
        if self._closed:
            return
        self._refresher.cancel()
        if self.cluster is None:  # our kept buffers on shared workers go with us
            async def free_everything():
                await asyncio.gather(*(
                    self._comms_call(r.address, "kaas_free", client=self.client_id, everything=True)
                    for r in self.routes()), return_exceptions=True)

            try:
                self._sync(free_everything(), timeout=5)
            except Exception:  # workers unreachable: their buffers are gone anyway
                pass
        self._closed = True
        self._links.close()
        try:
            self._sync(self._comms.close(), timeout=10)
        except Exception:
            pass
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "embedded" if self.cluster is not None else "connected"
        return f"<kaas Pool {kind} {self.scheduler_address} workers={len(self.routes())}>"


def _transfer_limits() -> tuple[int, int]:
    """kaas.transfer's (max-bytes, max-message-bytes)."""
    return (int(kaas_config.get("transfer.max-bytes", 2**31) or 2**31),
            int(kaas_config.get("transfer.max-message-bytes", 2**32) or 2**32))


def _serialize_inputs(inputs: Mapping[str, Any]):
    limit, message_limit = _transfer_limits()
    out, total = {}, 0
    for name, value in inputs.items():
        try:
            ser = serial.dumps(value)
        except Exception as e:
            reason = str(e).splitlines()[-1] if str(e) else type(e).__name__
            raise VariableNotSendable(name, value, reason) from None
        size = serial.nbytes(ser)
        if size > limit:
            raise VariableNotSendable(
                name, value, f"it is {size:,} bytes, over the transfer limit of {limit:,} bytes "
                f"(kaas.transfer.max-bytes)"
            )
        total += size
        if total > message_limit:
            raise VariableNotSendable(
                name, value, f"with it the call's variables come to {total:,} bytes, over the limit of "
                f"{message_limit:,} bytes for one call (kaas.transfer.max-message-bytes)")
        out[name] = ser
    return out, total


def _deserialize_outputs(outputs: Mapping[str, Any]):
    values, skipped, total = {}, {}, 0
    for name, ser in outputs.items():
        try:
            total += serial.nbytes(ser)
            values[name] = serial.loads(ser)
        except Exception as e:
            skipped[name] = f"could not be rebuilt in the notebook ({type(e).__name__}: {e})"
    return values, total, skipped


_HOST = None


def _hostname() -> str:
    global _HOST
    if _HOST is None:
        import socket

        _HOST = socket.gethostname()
    return _HOST


def _ignore(state: str, record: RunRecord) -> None:
    pass


def _map_handles(value: Any, convert: Callable[[DeviceHandle], Any]) -> Any:
    from .backends.base import map_containers

    return map_containers(value, lambda v: convert(v) if isinstance(v, DeviceHandle) else v)


class _Mismatch(Exception):
    """A reply on a link that does not answer the call waiting on it."""

    def __init__(self, reply: Any):
        got = reply.get("call_id") if isinstance(reply, dict) else type(reply).__name__
        super().__init__(f"it answers call {got!r}")


def _answers(reply: Any, call_id: str) -> bool:
    """Whether ``reply`` belongs to the call ``call_id``. A refusal of a request the worker
    could not even read names no call."""
    if type(reply) is not dict:
        return False
    got = reply.get("call_id")
    return got == call_id or (got is None and reply.get("kind") == "refused")


class _OutputRelay:
    """A call's streamed output, written where the caller prints as it arrives. A failure
    here is the notebook's own (a stream that cannot encode a character, a closed stream,
    a view that fails to update): it never breaks the link or blames the worker. Text a
    stream cannot encode is written with backslash escapes; a stream that fails otherwise
    is given up for this call (its text is still in the result)."""

    def __init__(self, stdout: TextIO, stderr: TextIO, on_state: Callable[[str], None]):
        self._streams: dict[str, TextIO | None] = {"stdout": stdout, "stderr": stderr}
        self._on_state = on_state
        self._text: dict[str, list[str]] = {"stdout": [], "stderr": []}

    def write(self, chunks) -> None:
        for name, text in chunks:
            if name == "state":
                try:
                    self._on_state(text)
                except Exception:  # noqa: BLE001 - a view's trouble is not the call's
                    pass
                continue
            self._text[name].append(text)
            stream = self._streams[name]
            if stream is not None:
                self._streams[name] = _write_or_give_up(stream, text)
        for name, stream in self._streams.items():
            if stream is not None:
                try:
                    stream.flush()
                except Exception:  # noqa: BLE001
                    self._streams[name] = None

    def captured(self) -> tuple[str, str]:
        return "".join(self._text["stdout"]), "".join(self._text["stderr"])


def _write_or_give_up(stream: TextIO, text: str) -> TextIO | None:
    try:
        stream.write(text)
        return stream
    except UnicodeEncodeError:
        encoding = getattr(stream, "encoding", None) or "utf-8"
        try:
            stream.write(text.encode(encoding, "backslashreplace").decode(encoding, "replace"))
            return stream
        except Exception:  # noqa: BLE001
            return None
    except Exception:  # noqa: BLE001 - closed or broken: stop writing to it
        return None
