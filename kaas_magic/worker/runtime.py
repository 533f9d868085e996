"""The worker runtime, the composition root of the worker side: it warms backends up and
opens a session per device, advertises them as Dask resources, starts the direct link,
admits each call to its device's turn, and answers the info, load and metrics handlers.
A call's own work is the executor's (see execute); stopping calls is CallStops' (see stops).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import faulthandler
import logging
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any, cast

from .. import backends, compile_cache, fastlink, isolation, protocol, shared_frames
from .. import config as kaas_config
from ..backends.base import Offer, Session
from ..buffer_store import BufferStore
from ..call_stream import CallStream
from ..device_slot import DeviceSlot, LeftQueue
from ..errors import KaasError, KaasUsageError
from ..protocol import CallRequest, MetricsRow, Reply
from ..stopping import GRACE_S, RunningCall, check_seconds, stop_error
from ..targets import KIND_ORDER, READY_RESOURCE
from . import link
from .execute import Executor, failed_reply
from .kernel_library import KernelLibrary
from .retire import Retirement
from .stops import CallStops

logger = logging.getLogger(__name__)

_MAX_LINE_OFFSET = 10**6  # a cell's first line in its notebook cell; far past any real cell


class WorkerRuntime:
    GRACE = GRACE_S  # seconds a stopped cell has to end before its worker is replaced

    def __init__(self, worker, config: dict):
        self.worker = worker
        self.config = config
        self.loop = asyncio.get_running_loop()
        self.host = socket.gethostname()
        self.concurrency = int(kaas_config.get("pool.concurrency", config))
        self.slots: dict[str, DeviceSlot] = {}  # each device admits `concurrency` calls at once
        # Every call runs under a timeout (kaas.limits.max-timeout at most, and by default),
        # enforced in place by the watchdog, and from outside by the supervisor process when
        # the code holds the interpreter (see stopping and supervisor).
        self.max_timeout = _configured_max_timeout(config)
        self.stops = CallStops(worker, self.loop, self.GRACE, self._addressed)
        self._stats_lock = threading.Lock()
        self._keep_budgets: dict[str, int] = {}
        self.buffers = BufferStore(self._keep_budget)
        max_value_bytes = int(kaas_config.get("transfer.max-bytes", config) or 2**31)
        max_message_bytes = int(kaas_config.get("transfer.max-message-bytes", config) or 2**32)
        fastlink.set_limits(max_value_bytes + 2**20, max_message_bytes + 2**24)
        shared_frames.configure(*(kaas_config.get(f"transfer.shared-memory-{k}", config) for k in ("threshold", "keep", "idle")))
        # Before any framework is imported: their on-disk caches go in the kaas cache folder.
        compile_cache.prepare_environment(config)
        _keep_buffers_in_the_heap()
        self.offers: dict[str, Offer] = {}
        self.sessions: dict[str, Session] = {}
        self.kernels = KernelLibrary(self.sessions)
        self.executor = Executor(worker, self.sessions, self.buffers, self.kernels, max_value_bytes, max_message_bytes)
        self.backend_state: dict[str, str] = {name: "pending" for name in kaas_config.get("backends", config)}
        self._backend_done = {name: threading.Event() for name in self.backend_state}
        self.warm_started = time.time()
        self.warm_finished: float | None = None
        self.in_flight = 0
        self.calls = collections.Counter()  # per service resource
        self.errors = 0
        self.load_requests = 0  # kaas_load asked of this worker (the control plane's cost; see bench control)
        self._closing = threading.Event()
        # A crash inside a native kernel should leave a trace in the worker's log.
        faulthandler.enable(file=sys.__stderr__)
        isolation.install()  # routes print output by call; each call's own view of process state
        self.retirement = Retirement(self)  # autoscaling's view of this worker (see retire)
        self.endpoint, self._server = link.start(worker, self.handle_call, self.host, self._link_path())
        threading.Thread(target=self._warm_up_all, name="kaas-warm-up", daemon=True).start()

    def _link_path(self) -> str:
        return link.socket_path(self.worker)

    # -- warm-up, in a background thread --

    def _warm_up_all(self) -> None:
        for name in list(self.backend_state):
            self.backend_state[name] = "warming"
            started = time.perf_counter()
            try:
                backend = backends.load(name)(self.config)
                offers = backend.discover()
                for offer in offers:
                    session = backend.open(offer)
                    resource = offer.service.resource
                    self.offers[resource] = offer
                    self.sessions[resource] = session
                state = f"ready in {time.perf_counter() - started:.1f} s" if offers else "no device"
            except Exception as e:  # a broken backend must not take the worker down
                logger.exception("kaas backend %s failed to start", name)
                state = f"failed: {type(e).__name__}: {e}"
            self.backend_state[name] = state
            self._publish()
            self._backend_done[name].set()
        if kaas_config.get("kernels.warm-library", self.config):
            try:
                self.kernels.warm()
            except Exception:  # a broken library must not keep the worker from being ready
                logger.exception("kaas could not load the kernel library")
        self.warm_finished = time.time()
        self._publish(ready=True)
        # Keep this thread alive: some extension modules (qiskit 2's Rust core) segfault
        # when used after the thread that first imported them has exited.
        self._closing.wait()

    def _publish(self, ready: bool = False) -> None:
        resources = {o.service.resource: float(self.concurrency) for o in self.offers.values()}
        if ready:
            resources[READY_RESOURCE] = 1.0
        future = asyncio.run_coroutine_threadsafe(self.worker.set_resources(**resources), self.loop)
        try:
            future.result(timeout=30)
        except Exception:
            logger.exception("kaas could not advertise resources to the scheduler")

    def _session_for(self, resource: str) -> tuple[Session, float]:
        """The warm session for a service, waiting for warm-up if it is still running."""
        session = self.sessions.get(resource)
        if session is not None:
            return session, 0.0
        backend = resource.split("/")[2]
        started = time.perf_counter()
        if backend in self._backend_done:
            self._backend_done[backend].wait()
        session = self.sessions.get(resource)
        if session is None:
            served = ", ".join(sorted(self.sessions)) or "nothing yet"
            raise LookupError(f"worker {self.worker.address} does not serve {resource}; it serves {served}")
        return session, time.perf_counter() - started

    # -- the hot path: runs in the thread serving the caller's link (see fastlink) --

    def handle_call(self, replier, **fields: Any) -> Reply | None:
        """One call (see _run_call), counted for autoscaling; refused unrun once this
        worker is retiring (see retire)."""
        if not self.retirement.enter():
            replier.call_id = fields.get("call_id")
            return self._addressed(failed_reply(self.retirement.refusal()), "", time.time())
        try:
            return self._run_call(replier, **fields)
        finally:
            self.retirement.leave()

    def _run_call(self, replier, **fields: Any) -> Reply | None:
        received_at = time.time()
        msg = cast(CallRequest, fields)  # typed, not validated: what matters is checked as it is used
        replier.call_id = msg.get("call_id")  # stamped on every reply (see fastlink.Replier)
        try:  # checked here too: a request need not come from kaas's client
            timeout = self._call_timeout(msg)
            if msg.get("op") == "batch":
                timeout = self._batch_timeout(msg, timeout)
        except KaasUsageError as e:
            return self._addressed(failed_reply(e), "", received_at)
        if msg.get("free"):  # buffers the client dropped since its last call here
            self.buffers.free(msg.get("client", ""), msg["free"])
        try:
            session, warm_wait = self._session_for(msg["service"])
        except LookupError as e:
            return self._addressed(failed_reply(e), "", received_at)
        slot = self.slot(session)
        call = RunningCall(msg.get("call_id") or uuid.uuid4().hex, timeout, received_at=received_at)
        stops = self.stops
        if not stops.register(call, slot):
            return self._addressed(failed_reply(KaasUsageError(
                f"a call with id {call.id!r} is already running on worker {self.worker.address}")), "", received_at)
        with self._stats_lock:
            self.in_flight += 1
        try:
            stops.watch(call, replier)
            queued_at = time.perf_counter()
            try:
                with slot.turn(give_up=lambda: call.reason is not None) as waited:
                    stream = CallStream(replier)
                    stops.started(call, slot, stream, replier)
                    run = self.executor.execute_batch if msg.get("op") == "batch" else self.executor.execute
                    reply = run(session, msg, stream, call)
                    stream.finish()
            except LeftQueue:
                waited = time.perf_counter() - queued_at
                reply = failed_reply(stop_error(call, self.worker.address, replaced=False, queued=True))
            if call.abandoned:  # already answered by CallStops._escalate; this process is on its way out
                return None
            slot.finished(time.time() - received_at, reply["ok"])
            reply["timings"].update(warm_wait=warm_wait, queue=waited)
            with self._stats_lock:
                self.calls[msg["service"]] += 1
                self.errors += 0 if reply["ok"] else 1
            return self._addressed(reply, session.device, received_at)
        finally:
            stops.forget(call)
            with self._stats_lock:
                self.in_flight -= 1

    def _call_timeout(self, msg: CallRequest) -> float:
        """The request's timeout, checked (a bad one could switch the safety off), else the
        maximum: no call runs unbounded. Its operation and line offset are checked with it."""
        op = msg.get("op", "run")
        if type(op) is not str or op not in protocol.OPS:
            raise KaasUsageError(f"unknown operation (op) {op!r}: a worker runs "
                                 f"{', '.join(sorted(protocol.OPS))}; nothing was run")
        timeout = msg.get("timeout")
        if timeout is None:
            timeout = self.max_timeout
        elif type(timeout) is not float or not 0 < timeout <= self.max_timeout:
            timeout = check_seconds(timeout, "timeout", self.max_timeout)
        line_offset = msg.get("line_offset", 0)
        if type(line_offset) is not int or not 0 <= line_offset <= _MAX_LINE_OFFSET:
            raise KaasUsageError(f"line_offset must be a whole number from 0 to {_MAX_LINE_OFFSET}, "
                                 f"not {line_offset!r}")
        return timeout

    def _batch_timeout(self, msg: CallRequest, timeout: float) -> float:
        """A batch (Pool.map) is one call under one timeout, so the watchdog and the
        supervisor bound it as any call: the client sends the per-item timeout times its
        items (at most kaas.limits.max-timeout; the client's own wait for the reply uses the
        same figure). Its items are checked to be a list of inputs by name."""
        items = msg.get("items")
        if type(items) is not list or not all(type(i) is dict for i in items):
            raise KaasUsageError("a batch's items must be a list of inputs by name; nothing was run")
        if msg.get("kernel") is None and type(msg.get("code")) is not str:
            raise KaasUsageError("a batch names a kernel or carries code; this one neither; nothing was run")
        return timeout

    def _addressed(self, reply: Reply, device: str, received_at: float) -> Reply:
        """Who answered and when, on a reply as protocol.reply built it."""
        reply.update(worker=self.worker.address, host=self.host, device=device, received_at=received_at,
                     replied_at=time.time(), load=self.load())
        return reply

    def slot(self, session: Session) -> DeviceSlot:
        slot = self.slots.get(session.device_id)
        if slot is None:  # setdefault: two threads may get here at once
            slot = self.slots.setdefault(session.device_id, DeviceSlot(session.device_id, self.concurrency))
        return slot

    # -- data kept on the device between calls --

    def _keep_budget(self, device_id: str) -> int:
        """Bytes of kept buffers a device holds before evicting (asked on every keep; a
        device's size does not change, so it is worked out once)."""
        if device_id not in self._keep_budgets:
            configured = kaas_config.get("keep.max-bytes", self.config)
            session = next((s for s in self.sessions.values() if s.device_id == device_id), None)
            total = None if configured or session is None else session.memory()[1]
            self._keep_budgets[device_id] = int(configured or (total * 0.5 if total else 2**31))
        return self._keep_budgets[device_id]

    async def handle_free(self, client: str = "", ids=(), everything: bool = False) -> int:
        if everything:  # the client closed its pool
            return self.buffers.free_client(client)
        return self.buffers.free(client, ids)

    # -- introspection: Dask comm handlers on the worker's event loop --

    async def handle_endpoint(self) -> dict | None:
        """Where this worker serves direct links, and the device behind each warm service
        (so a call's view names its device before the first reply)."""
        if self.endpoint is None:
            return None
        return {**self.endpoint, "devices": {resource: s.device for resource, s in list(self.sessions.items())}}

    async def handle_info(self) -> dict:
        return self.info()

    async def handle_load(self) -> dict[str, int]:
        """Calls running or queued per service: what clients balance on (asked only of
        workers a client has not heard from lately; replies carry it too)."""
        self.load_requests += 1
        return self.load()

    def load(self) -> dict[str, int]:
        return {resource: self.slot(session).load() for resource, session in list(self.sessions.items())}

    async def handle_metrics(self) -> list[MetricsRow]:
        return self.metrics()

    def info(self) -> dict:
        return {
            "address": self.worker.address,
            "name": str(self.worker.name),
            "host": self.host,
            "pid": os.getpid(),
            "backends": dict(self.backend_state),
            "ready": self.warm_finished is not None,
            "warm_seconds": (self.warm_finished or time.time()) - self.warm_started,
            "concurrency": self.concurrency,
            "in_flight": self.in_flight,
            "errors": self.errors,
            "load_requests": self.load_requests,
            "kernels": self.kernels.info(),
            "services": [
                {
                    "resource": resource,
                    "target": offer.service.target,
                    "backend": offer.service.backend,
                    "kind": offer.service.kind,
                    "device": offer.device,
                    "physical_device": _physical_device(self.sessions[resource]) if resource in self.sessions else "",
                    "calls": self.calls[resource],
                }
                for resource, offer in self.offers.items()
            ],
        }

    def metrics(self) -> list[MetricsRow]:
        """One row per device on this worker, for the pool monitor."""
        by_device: dict[str, list[tuple[str, Session]]] = {}
        for resource, session in self.sessions.items():
            by_device.setdefault(session.device_id, []).append((resource, session))
        return [self._device_metrics(device_id, members) for device_id, members in by_device.items()]

    def _device_metrics(self, device_id: str, members: list[tuple[str, Session]]) -> MetricsRow:
        members.sort(key=lambda m: (KIND_ORDER[m[1].offer.service.kind], m[1].offer.service.target))
        session = members[0][1]
        service = session.offer.service
        slot = self.slot(session)
        try:
            memory_used, memory_total = session.memory()
        except Exception:  # a backend that cannot tell right now
            memory_used, memory_total = None, None
        stats = session.kernel_stats()
        return {
            "worker": self.worker.address,
            "worker_name": str(self.worker.name),
            "host": self.host,
            "device_id": device_id,
            # The physical device (shared by backends: "cpu" for NumPy, JAX on XLA:CPU,
            # PoCL and Aer alike), by which the monitor groups rows; see Session.physical_device.
            "physical_device": _physical_device(session),
            "target": service.target,
            "backend": service.backend,
            "kind": service.kind,
            "device": session.device,
            "services": [r for r, _ in members],
            "concurrency": slot.concurrency,
            "in_flight": slot.in_flight,
            "queued": slot.queued,
            "busy_10s": slot.busy_fraction(10.0),
            "busy_60s": slot.busy_fraction(60.0),
            "calls": slot.calls,
            "errors": slot.errors,
            "median_latency_s": slot.median_latency(),
            "memory_used": memory_used,
            "memory_total": memory_total,
            "kept_bytes": self.buffers.bytes_on(device_id),
            "warm_kernels": sorted(n for n, st in stats.items() if st["compiles"] + st["disk_loads"] + st["cache_hits"]),
        }


def _physical_device(session: Session) -> str:
    try:
        return str(session.physical_device)
    except Exception:  # a backend that cannot tell: its session is a device of its own
        return session.device_id


def _configured_max_timeout(config: dict) -> float:
    """kaas.limits.max-timeout as this worker was configured; the default if it is not a
    positive, finite number of seconds (said in the log)."""
    from ..stopping import DEFAULT_MAX_TIMEOUT, max_timeout

    try:
        return max_timeout(kaas_config.get("limits.max-timeout", config))
    except KaasError as e:
        logger.error("kaas: %s; using %g s", e, DEFAULT_MAX_TIMEOUT)
        return DEFAULT_MAX_TIMEOUT


def _keep_buffers_in_the_heap() -> None:
    """Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_ set, which also freezes glibc's
    mmap threshold at 128 KiB: then every array a call receives or makes is a fresh mmap whose
    pages fault in on first touch. Serve buffers up to 32 MiB from the heap again (glibc's own
    dynamic limit), and trim the heap only past 128 MiB of free memory at its top."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 * 2**20)
    libc.mallopt(m_trim_threshold, 128 * 2**20)
