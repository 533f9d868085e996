"""The worker side: a Dask worker extension that keeps backends warm and runs cells.

Installed on every worker by :class:`KaasWorkerPlugin` (registered by each client) or by
``kaas worker``'s preload.

Calls (the hot path) come on direct links from the calling threads (see fastlink), skipping
the scheduler as Dask actors do. Each link has its own thread on the worker, which waits for
the device's turn, runs the cell itself, streams print output back as it happens, and sends
the reply with outputs, timings and any error. Everything else is a Dask comm handler on the
worker's event loop: ``kaas_info`` (what this worker serves, how warm and busy it is),
``kaas_load``, ``kaas_metrics``, ``kaas_free``, ``kaas_cancel`` and ``kaas_endpoint``.

Warm-up runs in a background thread when the worker starts: each backend discovers its
devices, opens and warms a session per device, then advertises its services as Dask worker
resources (``kaas/<target>/<backend>/<kind>/<index>``), which clients route by.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import ctypes
import faulthandler
import functools
import linecache
import logging
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import types
import uuid
from typing import Any

import numpy as np
from distributed.diagnostics.plugin import WorkerPlugin

from . import backends, compile_cache, fastlink, serial
from .backends.base import Offer, Session, map_containers
from .call_stream import CallStream
from .cellcode import padded
from .device_slot import DeviceSlot, LeftQueue
from .errors import CallTimeout, DeviceOutOfMemory, KaasError, KaasUsageError, exception_state
from .handles import BufferStore, HandleRef, is_array
from .kernelspec import KernelError
from .stopping import GRACE_S, HANGUP_POLL_S, HangupWatcher, RunningCall, StopCall, Watchdog, check_seconds
from .targets import KIND_ORDER, READY_RESOURCE

logger = logging.getLogger("kaas_magic.worker")

EXTENSION = "kaas"


# --- print output of cells, routed to the call that produced it ---------------------------
# and each call's own view of process-wide state (sys.stdout, working directory, warnings
# filters, environment, ...): see isolation. report_state stays importable from here.

from . import isolation  # noqa: E402
from .isolation import report_state  # noqa: E402,F401  (backends use worker.report_state)


def _keep_buffers_in_the_heap() -> None:
    """Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_ set, which also freezes glibc's
    mmap threshold at 128 KiB: then every array a call receives or makes is a fresh mmap whose
    pages fault in, which doubled the time of a warm 1e5-element kernel call here. Serve
    buffers up to 32 MiB from the heap again (glibc's own dynamic limit), and trim the heap
    only past 128 MiB of free memory at its top."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 * 2**20)
    libc.mallopt(m_trim_threshold, 128 * 2**20)


# A running call's output, sent to its caller as it happens (see call_stream).
_CallStream = CallStream


# --- the runtime ----------------------------------------------------------------------


class WorkerRuntime:
    def __init__(self, worker, config: dict):
        self.worker = worker
        self.config = config
        self.loop = asyncio.get_running_loop()
        self.host = socket.gethostname()
        self.concurrency = int(config.get("pool", {}).get("concurrency", 4))
        self.slots: dict[str, DeviceSlot] = {}  # each device admits `concurrency` calls at once
        # Calls queued or running: (the call, its device's slot, its stream once it runs).
        self.running: dict[str, tuple[RunningCall, DeviceSlot, _CallStream | None]] = {}
        # Every call runs under a timeout (kaas.limits.max-timeout at most, and by default),
        # enforced in place by the watchdog, and from outside by the supervisor process when
        # the code holds the interpreter (see stopping and supervisor).
        self.max_timeout = _configured_max_timeout(config)
        self.supervisor = self._start_supervisor()
        self.watchdog = Watchdog(lambda call_id: self._stop(call_id, "timeout"),
                                 board=self.supervisor.board if self.supervisor else None)
        self.hangups = HangupWatcher(self._caller_gone, on_tick=self.supervisor.check if self.supervisor else None)
        self._stats_lock = threading.Lock()
        self._keep_budgets: dict[str, int] = {}
        self.buffers = BufferStore(self._keep_budget)
        transfer = config.get("transfer") or {}
        self.max_value_bytes = int(transfer.get("max-bytes") or 2**31)
        self.max_message_bytes = int(transfer.get("max-message-bytes") or 2**32)
        fastlink.set_limits(self.max_value_bytes + 2**20, self.max_message_bytes + 2**24)
        # Before any framework is imported: their on-disk caches go in the kaas cache folder.
        compile_cache.prepare_environment(config)
        _keep_buffers_in_the_heap()
        self.offers: dict[str, Offer] = {}
        self.sessions: dict[str, Session] = {}
        self.backend_state: dict[str, str] = {
            name: "pending" for name in config.get("backends", ["numpy"])
        }
        self._backend_done: dict[str, threading.Event] = {
            name: threading.Event() for name in self.backend_state
        }
        self.warm_started = time.time()
        self.warm_finished: float | None = None
        self.in_flight = 0
        self.calls = collections.Counter()  # per service resource
        self.errors = 0
        self._closing = threading.Event()
        self.library: dict | None = None
        self._code_cache: collections.OrderedDict = collections.OrderedDict()
        self._code_lock = threading.Lock()
        self._user_specs: collections.OrderedDict = collections.OrderedDict()  # see user_spec
        # A crash inside a native kernel should leave a trace in the worker's log.
        faulthandler.enable(file=sys.__stderr__)
        isolation.install()  # routes print output by call; each call's own view of process state
        self.endpoint, self._server = self._start_fast_link()
        threading.Thread(target=self._warm_up_all, name="kaas-warm-up", daemon=True).start()

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
        if self.config.get("kernels", {}).get("warm-library", True):
            try:
                self._warm_library()
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

    def handle_call(self, replier, **msg) -> dict | None:
        received_at = time.time()
        replier.call_id = msg.get("call_id")  # stamped on every reply (see fastlink.Replier)
        try:  # checked here too: a request need not come from kaas's client
            timeout = self._call_timeout(msg)
        except KaasUsageError as e:
            return self._addressed(_failed_reply(e), "", received_at)
        if msg.get("free"):  # buffers the client dropped since its last call here
            self.buffers.free(msg.get("client", ""), msg["free"])
        try:
            session, warm_wait = self._session_for(msg["service"])
        except LookupError as e:
            return self._addressed(_failed_reply(e), "", received_at)
        slot = self.slot(session)
        call = RunningCall(msg.get("call_id") or uuid.uuid4().hex, timeout)
        entry = (call, slot, None)
        if self.running.setdefault(call.id, entry) is not entry:  # a queued call can be cancelled too
            return self._addressed(_failed_reply(KaasUsageError(
                f"a call with id {call.id!r} is already running on worker {self.worker.address}")), "", received_at)
        with self._stats_lock:
            self.in_flight += 1
        try:
            self.watchdog.arm(call.id, timeout)
            # A caller that goes away (its notebook killed) frees what its call holds.
            self.hangups.watch(call.id, getattr(replier, "sock", None))
            queued_at = time.perf_counter()
            try:
                with slot.turn(give_up=lambda: call.reason is not None) as waited:
                    stream = _CallStream(replier, self.loop)
                    self.running[call.id] = (call, slot, stream)
                    # Stuck past its deadline, or with its caller gone: the supervisor ends it.
                    self.watchdog.running(call.id, self.supervisor.link(replier) if self.supervisor else 0)
                    reply = self._execute(session, msg, stream, call)
                    stream.finish()
            except LeftQueue:
                waited = time.perf_counter() - queued_at
                reply = _failed_reply(_stop_error(call, self.worker.address, replaced=False))
            if call.abandoned:  # already answered by _escalate; this process is on its way out
                return None
            slot.finished(time.time() - received_at, reply["ok"])
            reply["timings"].update(warm_wait=warm_wait, queue=waited)
            with self._stats_lock:
                self.calls[msg["service"]] += 1
                self.errors += 0 if reply["ok"] else 1
            return self._addressed(reply, session.device, received_at)
        finally:
            self.hangups.unwatch(call.id)
            self.watchdog.disarm(call.id)
            self.running.pop(call.id, None)
            with self._stats_lock:
                self.in_flight -= 1

    def _call_timeout(self, msg: dict) -> float:
        """The request's timeout, checked (a bad one could switch the safety off), else the
        maximum: no call runs unbounded. Its line offset is checked with it."""
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

    def _addressed(self, reply: dict, device: str, received_at: float) -> dict:
        reply.update(kind="result", worker=self.worker.address, host=self.host, device=device,
                     received_at=received_at, replied_at=time.time())
        return reply

    def _start_fast_link(self):
        """The direct link clients use for calls (see fastlink), on the worker's own host."""
        from distributed.comm.addressing import get_address_host

        from . import fastlink

        # A TLS pool: the link's TCP listener takes only clients with a certificate the
        # pool's CA signed, as Dask's own listener does (Dask's context requires client
        # certificates; fastlink.Server refuses one that does not). Its Unix socket has no
        # TLS: it is private to this user (see _link_path and fastlink.Server).
        ssl_context = None
        if self.worker.address.startswith("tls://"):
            ssl_context = self.worker.security.get_listen_args("worker").get("ssl_context")
            if ssl_context is None:
                raise KaasError(f"worker {self.worker.address} uses TLS but has no TLS context for its direct link")
        host = get_address_host(self.worker.address)
        server = fastlink.Server(host, self.handle_call, ssl_context, unix_path=self._link_path())
        return {"host": host, "port": server.port, "unix": server.unix_path, "hostname": self.host}, server

    def _link_path(self) -> str:
        """Where the Unix socket for local clients goes: the worker's own folder (removed
        with the worker) when it is private to this user (mode 0700, as Dask makes it with
        mkdtemp) and its path short enough for a socket; else a fresh private folder of its
        own (mkdtemp: 0700), removed when this process exits."""
        folder = self.worker.local_directory
        path = os.path.join(folder, "kaas-link.sock")
        try:
            info = os.stat(folder)
            private = info.st_uid == os.getuid() and not info.st_mode & 0o077
        except (OSError, AttributeError):  # AttributeError: no getuid (Windows)
            private = False
        if private and len(path.encode()) < 100:
            return path
        import multiprocessing.util
        import shutil

        folder = tempfile.mkdtemp(prefix="kaas-link-")
        # Run at exit by Dask's worker processes too (multiprocessing children end with
        # os._exit, which skips plain atexit handlers).
        multiprocessing.util.Finalize(None, shutil.rmtree, args=(folder,), kwargs={"ignore_errors": True},
                                      exitpriority=0)
        return os.path.join(folder, "link.sock")

    async def handle_endpoint(self) -> dict | None:
        return self.endpoint

    # -- stopping calls: timeouts, interrupts, callers gone --

    GRACE = GRACE_S  # seconds a stopped cell has to end before its worker is replaced

    def _start_supervisor(self):
        """This worker's supervisor process (see supervisor): for workers a nanny restarts.
        A worker without one may run inside the notebook's own process (a LocalCluster of
        threads), which a supervisor must never kill."""
        if not getattr(self.worker, "nanny", None):
            return None
        from .supervisor import MARGIN_S, Supervisor, owner_from_environment

        try:
            return Supervisor(allowance=self.GRACE + MARGIN_S,
                              hangup_allowance=HANGUP_POLL_S + self.GRACE + MARGIN_S,
                              owner=owner_from_environment())
        except Exception:  # noqa: BLE001 - the worker serves on, with in-process stops only
            logger.exception("kaas could not start the supervisor of worker %s", self.worker.address)
            return None

    def _stop(self, call_id: str, reason: str) -> bool:
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
            self.loop.call_soon_threadsafe(self.loop.call_later, self.GRACE, self._escalate, call, stream)
        return True

    def _caller_gone(self, call_id: str) -> None:
        """The caller's link hung up (its notebook was killed, or it gave up on the call):
        stop the call and free its place on the device. A running call that cannot be
        stopped in place is the supervisor's from now: past its allowance it ends the worker."""
        entry = self.running.get(call_id)
        if entry is None:
            return
        if entry[2] is not None:
            self.watchdog.expire_now(call_id)
        logger.warning("kaas call %s: its caller went away; stopping it", call_id)
        self._stop(call_id, "caller gone")

    def _escalate(self, call: RunningCall, stream: _CallStream) -> None:
        """The cell did not stop: answer its caller, then let the nanny replace this process
        (no other way ends a thread stuck in native code)."""
        entry = self.running.get(call.id)
        if entry is None or entry[0] is not call:  # it ended (another call may have its id now)
            return
        call.abandoned = True
        stream.finish()
        error = _stop_error(call, self.worker.address, replaced=True)
        reply = self._addressed(_failed_reply(error, execute=call.timeout or 0.0, worker_exiting=True), "", time.time())
        try:
            stream.replier.write(reply, timeout=0.2)
        except OSError:
            pass
        logger.error("kaas call %s did not stop within %.1f s of its %s; replacing worker %s",
                     call.id, self.GRACE, call.reason, self.worker.address)
        self.loop.call_later(0.5, os._exit, 75)

    async def handle_cancel(self, call_id: str = "", reason: str = "interrupt") -> bool:
        if reason not in ("interrupt", "timeout", "caller gone"):  # it is shown to the caller
            reason = "interrupt"
        return self._stop(str(call_id), reason)

    def _compile(self, source: str, filename: str, line_offset: int):
        key = (source, filename, line_offset)
        with self._code_lock:
            code = self._code_cache.get(key)
            if code is not None:
                self._code_cache.move_to_end(key)
                return code
        text = padded(source, line_offset)
        # dont_inherit: the cell gets exactly its own __future__ imports, as in the notebook,
        # never this module's (``annotations`` would turn its annotations into strings).
        code = compile(text, filename, "exec", dont_inherit=True)
        # Lets tracebacks on this worker quote the cell's lines.
        linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
        with self._code_lock:
            self._code_cache[key] = code
            if len(self._code_cache) > 512:
                self._code_cache.popitem(last=False)
        return code

    def _execute(self, session: Session, msg: dict, output: _CallStream, call: RunningCall) -> dict:
        """Runs in the thread serving the caller's link, once the device's turn has come."""
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        outputs: dict[str, Any] = {}
        skipped: dict[str, str] = {}
        error = None
        kernels = None
        kept: dict[str, Any] = {}
        sent = 0  # bytes of outputs going home: bounded like the link (kaas.transfer)
        client = msg.get("client", "")
        scope = isolation.call_scope(output.write, bool(msg.get("progress"))).enter()
        try:
            if call.reason is not None:  # cancelled while it waited for its turn
                raise StopCall()
            report_state("running")
            with session.activate():
                kernels = KernelNamespace(self, session, msg.get("kernels") or ())
                if "kernel" in msg:  # kaas.call: one registered kernel, its arguments by name
                    namespace = {}
                else:  # a cell, in a module of its own that libraries can look up
                    code = self._compile(msg["code"], msg["filename"], msg.get("line_offset", 0))
                    module = _cell_module(call.id)
                    namespace = module.__dict__
                    namespace.update(session.namespace())
                    namespace["kernels"] = kernels
                    namespace["to_device"] = session.to_device
                for name, packed in msg["inputs"].items():
                    namespace[name] = self._resolve_handles(self._unpack(name, packed), client, session)
                t1 = time.perf_counter()
                timings["setup"] = t1 - t0
                try:
                    call.enter_user_code()
                    if "kernel" in msg:
                        namespace["__result"] = kernels._invoke(msg["kernel"], namespace)
                    else:
                        # Registered while it runs (dataclasses, typing and pickle look a
                        # class's module up by name), gone after: nothing outlives the call.
                        sys.modules[module.__name__] = module
                        try:
                            exec(code, namespace)
                        finally:
                            sys.modules.pop(module.__name__, None)
                    names = [n for n in msg["outputs"] if n in namespace]
                    if msg.get("keep"):
                        session.synchronize([namespace[n] for n in names])
                    else:  # the device's work and the copies home, waited for at once
                        namespace.update(zip(names, session.download([namespace[n] for n in names])))
                    call.leave_user_code()
                finally:
                    call.leave_user_code()
                    t2 = time.perf_counter()
                    timings["execute"] = t2 - t1
                for name in msg["outputs"]:
                    if name not in namespace:
                        if msg.get("outputs_explicit"):
                            skipped[name] = "the cell did not assign it"
                        continue
                    if msg.get("keep") and _keepable(namespace[name]):
                        kept[name] = self._keep(namespace[name], client, session)
                        continue
                    try:
                        packed = serial.dumps(self.to_host(namespace[name], session))
                    except Exception as e:
                        value = namespace[name]
                        skipped[name] = (
                            f"{type(value).__module__}.{type(value).__qualname__} cannot leave "
                            f"the worker ({type(e).__name__})"
                        )
                        continue
                    size = serial.nbytes(packed)
                    if size > self.max_value_bytes or sent + size > self.max_message_bytes:
                        skipped[name] = self._too_large(name, namespace[name], size, sent, client, session, kept)
                        continue
                    outputs[name] = packed
                    sent += size
                timings["to_host"] = time.perf_counter() - t2
        except BaseException as e:
            if call.reason is not None:  # stopped on purpose: say why, not where it was hit
                e = _stop_error(call, self.worker.address, replaced=False)
            elif _is_out_of_memory(e):
                e = _out_of_memory_error(e, session)
            error = _error_payload(e, msg["filename"], msg.get("code"), msg.get("line_offset", 0))
            timings.setdefault("setup", time.perf_counter() - t0)
            timings.setdefault("execute", 0.0)
            timings.setdefault("to_host", 0.0)
        finally:
            scope.exit()  # what the cell changed of the process is put back (see isolation)
        if error is not None:  # a failed call keeps nothing
            self.buffers.free(client, [m["id"] for v in kept.values() for m in (v if isinstance(v, list) else [v])])
            kept = {}
        return {"ok": error is None, "outputs": outputs, "skipped": skipped, "error": error, "kept": kept,
                "timings": timings, "kernels": kernels.states if kernels else {}}

    def _too_large(self, name: str, value: Any, size: int, sent: int, client: str, session: Session,
                   kept: dict) -> str:
        """An output over kaas.transfer.max-bytes (or one that would take the reply past
        max-message-bytes) does not go home, where it could take the notebook's kernel down
        for memory: an array stays here as a handle, anything else is dropped; either way the
        notebook is told its name and size."""
        if size > self.max_value_bytes:
            why = f"{name!r} is {size:,} bytes, over the transfer limit of {self.max_value_bytes:,} (kaas.transfer.max-bytes)"
        else:
            why = (f"{name!r} ({size:,} bytes) would take this reply past {self.max_message_bytes:,} bytes "
                   f"(kaas.transfer.max-message-bytes; {sent:,} bytes of other outputs go home)")
        if _keepable(value):
            kept[name] = self._keep(value, client, session)
            return f"{why}: it stays on worker {self.worker.address} as a DeviceHandle; bring home pieces of it"
        return f"{why}: it was not sent"

    def _unpack(self, name: str, packed: serial.Packed) -> Any:
        try:
            return serial.loads(packed)
        except Exception as e:
            raise KaasError(
                f"variable {name!r} could not be rebuilt on worker {self.worker.address}: {type(e).__name__}: {e}. "
                f"Nothing was run. The worker needs the packages (and versions) the notebook has for it."
            ) from None

    # -- data kept on the device between calls --

    def _resolve_handles(self, value: Any, client: str, session: Session) -> Any:
        """Inputs that are handles become the kept device buffers they name, in place."""

        def resolve(v: Any) -> Any:
            if not isinstance(v, HandleRef):
                return v
            kept = self.buffers.get(client, v.id)
            if kept.device_id != session.device_id:  # kept on another device of this worker
                return self.to_host(kept.value, session)
            return kept.value

        return map_containers(value, resolve)

    def _keep(self, value: Any, client: str, session: Session) -> dict | list:
        if isinstance(value, (list, tuple)):
            return [self._keep(v, client, session) for v in value]
        # Random, so that a restarted worker's ids never match a dead one's handles; not
        # from os.urandom, a slow system call on some VMs (ids are namespaced per client).
        id = f"{random.getrandbits(128):032x}"
        self.buffers.put(client, id, value, session.device_id)
        return {"id": id, "shape": list(value.shape), "dtype": _type_name(value.dtype), "nbytes": int(value.nbytes),
                "type": _type_name(type(value))}

    def _keep_budget(self, device_id: str) -> int:
        """Bytes of kept buffers a device holds before evicting (asked on every keep; a
        device's size does not change, so it is worked out once)."""
        if device_id not in self._keep_budgets:
            configured = (self.config.get("keep") or {}).get("max-bytes")
            session = next((s for s in self.sessions.values() if s.device_id == device_id), None)
            total = None if configured or session is None else session.memory()[1]
            self._keep_budgets[device_id] = int(configured or (total * 0.5 if total else 2**31))
        return self._keep_budgets[device_id]

    async def handle_free(self, client: str = "", ids=(), everything: bool = False) -> int:
        if everything:  # the client closed its pool
            return self.buffers.free_client(client)
        return self.buffers.free(client, ids)

    def slot(self, session: Session) -> DeviceSlot:
        slot = self.slots.get(session.device_id)
        if slot is None:  # setdefault: two threads may get here at once
            slot = self.slots.setdefault(session.device_id, DeviceSlot(session.device_id, self.concurrency))
        return slot

    def to_host(self, value: Any, session: Session) -> Any:
        """Device arrays of any backend on this worker (a cell may call kernels of another
        backend than its own) become host arrays."""
        if type(value) in _HOST_TYPES:  # the usual case (downloaded already): nothing to convert
            return value
        value = session.to_host(value)
        for other in {type(s): s for s in self.sessions.values()}.values():
            if type(other) is not type(session):
                value = other.to_host(value)
        return value

    # -- registered kernels --

    def _library(self) -> dict:
        if self.library is None:
            from .kernelspec import load_library

            self.library = load_library()
        return self.library

    def user_spec(self, described: dict):
        """A kernel a client registered, as sent with its calls: parsed once, not per call
        (the same text gives the same spec; its compiled form is keyed by base.compiled_key)."""
        from .kernelspec import KernelSpec

        key = repr(described)
        with self._code_lock:
            spec = self._user_specs.get(key)
            if spec is not None:
                return spec
        spec = KernelSpec.from_dict(described)
        with self._code_lock:
            self._user_specs[key] = spec
            if len(self._user_specs) > 512:
                self._user_specs.popitem(last=False)
        return spec

    def sessions_for(self, backend: str, prefer: Session | None = None) -> list[Session]:
        """This worker's sessions of ``backend``: ``prefer`` first, then real devices."""
        found = [s for r, s in self.sessions.items() if r.split("/")[2] == backend]
        found.sort(key=lambda s: (s is not prefer, s.offer.service.kind != "device"))
        return found

    def _warm_library(self) -> None:
        """Compile every library kernel on every device that can run it, and launch each C
        kernel once on small inputs, so that first calls are warm."""
        from .kernelspec import sample_arguments

        for specs in self._library().values():
            for spec in specs:
                for session in {id(s): s for s in self.sessions_for(spec.backend)}.values():
                    try:
                        compiled, _ = session.kernel(spec)
                        if spec.language in ("opencl", "cuda") and spec.params:
                            with session.activate():
                                session.synchronize([session.launch(spec, compiled, sample_arguments(spec), {})])
                    except Exception:
                        logger.exception("kaas could not build library kernel %s on %s", spec.name, session.device)

    # -- introspection --

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
            "kernels": self.kernel_info(),
            "services": [
                {
                    "resource": resource,
                    "target": offer.service.target,
                    "backend": offer.service.backend,
                    "kind": offer.service.kind,
                    "device": offer.device,
                    "calls": self.calls[resource],
                }
                for resource, offer in self.offers.items()
            ],
        }

    def kernel_info(self) -> list[dict]:
        rows, seen = [], set()
        for session in self.sessions.values():
            stats = session._kernel_stats
            key = id(stats)
            if key in seen:
                continue
            seen.add(key)
            for name, st in stats.items():
                rows.append({"name": name, "device": session.device, **st})
        return rows

    async def handle_info(self) -> dict:
        return self.info()

    async def handle_load(self) -> dict[str, int]:
        """Calls running or queued per service: what clients balance on. Kept tiny, as
        every client asks every worker about once a second."""
        return {resource: self.slot(session).load() for resource, session in self.sessions.items()}

    async def handle_metrics(self) -> list[dict]:
        return self.metrics()

    def metrics(self) -> list[dict]:
        """One row per device on this worker, for the pool monitor."""
        by_device: dict[str, list[tuple[str, Session]]] = {}
        for resource, session in self.sessions.items():
            by_device.setdefault(session.device_id, []).append((resource, session))
        rows = []
        for device_id, members in by_device.items():
            members.sort(key=lambda m: (KIND_ORDER[m[1].offer.service.kind], m[1].offer.service.target))
            session = members[0][1]
            service = session.offer.service
            slot = self.slot(session)
            try:
                memory_used, memory_total = session.memory()
            except Exception:  # a backend that cannot tell right now
                memory_used, memory_total = None, None
            stats = session._kernel_stats
            rows.append({
                "worker": self.worker.address,
                "worker_name": str(self.worker.name),
                "host": self.host,
                "device_id": device_id,
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
            })
        return rows


def _cell_module(call_id: str) -> types.ModuleType:
    """A fresh module for one cell: its name is unique to the call, so concurrent cells never
    share one, and classes defined in the cell name a module that exists while it runs."""
    module = types.ModuleType(f"__kaas_cell_{call_id.replace('-', '_')}__")
    module.__dict__["__builtins__"] = builtins
    return module


@functools.lru_cache(maxsize=256)
def _type_name_cached(kind, aligned) -> str:
    return str(kind) if not isinstance(kind, type) else f"{kind.__module__}.{kind.__qualname__}"


def _type_name(kind) -> str:
    """A dtype's name ("float32"), or a class's dotted path; asked for every kept array.
    Keyed on alignment too: an aligned and a packed struct dtype are equal, named apart."""
    return _type_name_cached(kind, getattr(kind, "isalignedstruct", None))


_HOST_TYPES = frozenset({np.ndarray, int, float, complex, bool, str, bytes, type(None)})


def _failed_reply(exc: BaseException, execute: float = 0.0, worker_exiting: bool = False) -> dict:
    """The reply of a call that ended before or instead of running its code."""
    timings = {"warm_wait": 0.0, "queue": 0.0, "setup": 0.0, "execute": execute, "to_host": 0.0}
    return {"ok": False, "outputs": {}, "skipped": {}, "error": _error_payload(exc, None), "kept": {},
            "timings": timings, "kernels": {}, "worker_exiting": worker_exiting}


def _stop_error(call: RunningCall, worker: str, replaced: bool) -> BaseException:
    how = (f"it did not stop within {WorkerRuntime.GRACE:.0f} s, so worker {worker} is being replaced "
           f"by a fresh one" if replaced else f"it was stopped in place on worker {worker}; the worker goes on")
    if call.reason == "timeout":
        return CallTimeout(f"the cell ran past its timeout of {call.timeout:g} s: {how}")
    if call.reason == "caller gone":
        return KaasError(f"its caller went away: {how}")
    return KeyboardInterrupt(f"interrupted from the notebook: {how}")


_MAX_LINE_OFFSET = 10**6  # a cell's first line in its notebook cell; far past any real cell


def _configured_max_timeout(config: dict) -> float:
    """kaas.limits.max-timeout as this worker was configured; the default if it is not a
    positive, finite number of seconds (said in the log)."""
    from .stopping import DEFAULT_MAX_TIMEOUT, max_timeout

    try:
        return max_timeout((config.get("limits") or {}).get("max-timeout"))
    except KaasError as e:
        logger.error("kaas: %s; using %g s", e, DEFAULT_MAX_TIMEOUT)
        return DEFAULT_MAX_TIMEOUT


_OOM_NAMES = ("OutOfMemoryError", "MemoryError", "RESOURCE_EXHAUSTED", "MEM_OBJECT_ALLOCATION_FAILURE",
              "OUT_OF_RESOURCES")


def _is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError from NumPy or PyOpenCL, CuPy's OutOfMemoryError, XLA's RESOURCE_EXHAUSTED."""
    text = f"{type(exc).__name__} {exc}"
    return isinstance(exc, MemoryError) or any(name in text for name in _OOM_NAMES)


def _out_of_memory_error(exc: BaseException, session: Session) -> DeviceOutOfMemory:
    try:
        session.release_cached_memory()  # so the next call has the most room
        used, total = session.memory()
    except Exception:
        used, total = None, None
    known = f" ({used / 2**20:,.0f} MiB of {total / 2**20:,.0f} MiB in use)" if used and total else ""
    return DeviceOutOfMemory(
        f"{session.device} ran out of memory{known}: {type(exc).__name__}: {str(exc).rstrip('. ')}. "
        f"The worker goes on serving; free kept buffers or use smaller pieces."
    )


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _keepable(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return bool(value) and all(is_array(v) for v in value)
    return is_array(value)


def _error_payload(exc: BaseException, filename: str | None, source: str | None = None,
                   line_offset: int = 0) -> dict:
    """What the client needs to rebuild ``exc`` (see errors.exception_state): its type,
    message and attributes, and the traceback from the cell's first frame on. The cell's
    own lines are quoted from ``source``, this call's code: linecache holds whichever cell
    of that name this worker compiled last (another notebook's In[3], say)."""
    frames = traceback.extract_tb(exc.__traceback__)
    start = next((i for i, f in enumerate(frames) if f.filename == filename), None)
    frames = frames[start:] if start is not None else frames[-1:]
    # kaas's own frames between the cell and a kernel say nothing to the user.
    frames = [f for f in frames if not f.filename.startswith(_PACKAGE_DIR)] or frames[-1:]
    cell_lines = source.splitlines() if source is not None else None

    def line(frame) -> str | None:
        if cell_lines is None or frame.filename != filename:
            return frame.line
        index = (frame.lineno or 0) - 1 - line_offset
        return cell_lines[index].strip() if 0 <= index < len(cell_lines) else None

    cls = type(exc)
    return {
        "type": cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}",
        "message": str(exc),
        "exception_only": traceback.format_exception_only(cls, exc),
        "frames": [(f.filename, f.lineno, f.name, line(f)) for f in frames],
        "state": exception_state(exc),
    }


class KernelNamespace:
    """``kernels`` inside a cell: ``kernels.vector_add(a, b)`` runs on this worker's device,
    and its result stays there, so a cell can chain kernels without a round trip."""

    def __init__(self, runtime: WorkerRuntime, session: Session, user_specs):
        self._runtime = runtime
        self._session = session
        self._user = {d["name"]: runtime.user_spec(d) for d in user_specs}
        self.states: dict[str, str] = {}

    def _spec(self, name: str):
        if name in self._user:
            return [self._user[name]]
        specs = self._runtime._library().get(name)
        if not specs:
            known = sorted(set(self._runtime._library()) | set(self._user))
            raise KernelError(f"unknown kernel {name!r}; known kernels: {', '.join(known)}")
        return specs

    def _session_for(self, name: str):
        specs = self._spec(name)
        current = self._session.offer.service.backend
        for spec in sorted(specs, key=lambda s: s.backend != current):
            sessions = self._runtime.sessions_for(spec.backend, prefer=self._session)
            if sessions:
                return spec, sessions[0]
        langs = ", ".join(s.language for s in specs)
        raise KernelError(f"kernel {name!r} ({langs}) cannot run on worker {self._runtime.worker.address}: "
                          f"no {' or '.join(s.backend for s in specs)} device here")

    def _compile(self, name: str) -> str:
        spec, session = self._session_for(name)
        _, how = session.kernel(spec, report=report_state)
        self.states[name] = how
        return how

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)

        def call(*args, **kwargs):
            spec, session = self._session_for(name)
            result, how = session.call_kernel(spec, args, kwargs, report=report_state)
            self.states.setdefault(name, how)
            return result

        call.__name__ = name
        return call

    def _invoke(self, name: str, arguments: dict):
        """What ``kaas.call`` runs: ``arguments`` by parameter name, or a Python kernel's
        ``__args`` and ``__kwargs``. (Underscored, so that no kernel name is shadowed.)"""
        kernel = self.__getattr__(name)  # not getattr: a kernel may be named like an attribute here
        if "__args" in arguments:
            return kernel(*arguments["__args"], **arguments["__kwargs"])
        return kernel(**arguments)

    def __dir__(self):
        return sorted(set(self._runtime._library()) | set(self._user))


# --- installation ---------------------------------------------------------------------


def install(worker, config: dict | None = None) -> WorkerRuntime:
    """Install the kaas runtime on a Dask worker (once per worker process)."""
    runtime = worker.extensions.get(EXTENSION)
    if runtime is not None:
        return runtime
    if config is None:
        from . import config as kaas_config

        config = kaas_config.snapshot()
    _ignore_notebook_interrupts()
    runtime = WorkerRuntime(worker, config)
    worker.extensions[EXTENSION] = runtime
    worker.handlers["kaas_info"] = runtime.handle_info
    worker.handlers["kaas_load"] = runtime.handle_load
    worker.handlers["kaas_metrics"] = runtime.handle_metrics
    worker.handlers["kaas_free"] = runtime.handle_free
    worker.handlers["kaas_cancel"] = runtime.handle_cancel
    worker.handlers["kaas_endpoint"] = runtime.handle_endpoint
    return runtime


def _ignore_notebook_interrupts() -> None:
    """An embedded pool's workers share the notebook kernel's process group, and Jupyter's
    stop button sends SIGINT to the whole group: it would kill them. A kaas worker is
    stopped by its nanny (SIGTERM) or by kaas's own cancel, never by SIGINT."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing to protect here
        pass


class KaasWorkerPlugin(WorkerPlugin):
    """Registered by each client; installs the runtime on current and future workers."""

    name = "kaas"
    idempotent = True

    def __init__(self, config: dict):
        self.config = config

    def setup(self, worker) -> None:
        install(worker, self.config)


__all__ = ["KaasWorkerPlugin", "install", "WorkerRuntime"]
