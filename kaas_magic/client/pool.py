"""``Pool``: a client of a pool of warm workers. A facade: its lifecycle, and thin methods
over the parts that do the work (see the package's docstring)."""

from __future__ import annotations

import asyncio
import time
import uuid
import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, TextIO

from .. import config as kaas_config
from .. import fastlink, shared_frames
from .. import pool_log as _pool_log
from ..errors import PoolNotRunning
from ..fastlink import Links
from ..handles import DeviceHandle
from ..protocol import FETCH_HANDLE, FETCH_VALUE, PUT_KEPT, PUT_VALUE, CallRequest, Op
from ..record import RunRecord
from ..targets import Service
from . import cluster as _cluster
from .calls import CallPath, RunResult, _transfer_limits
from .cell_inputs import CellInputs
from .futures import Background, KaasFuture
from .control import ControlPlane
from .kept import KeptData
from .kernels import KernelRegistry
from .router import Router, WorkerRoute

if TYPE_CHECKING:
    from ..pool_status import KernelTable, PoolStatus
    from .fanout import MapIterator


# Pool.run's options, as CallPath.run takes them (a call in the background passes them on).
_RUN_DEFAULTS = dict(backend=None, fallback=None, worker=None, stdout=None, stderr=None, keep=False, progress=None,
                     timeout=None, retries=0, value=True)


def _start_time(started: float | None) -> float:
    """When the caller began waiting: ``started`` (a perf_counter() the module functions
    take before starting the pool), else now."""
    return time.perf_counter() if started is None else started


class Pool:
    """A client of a Dask cluster whose workers run the kaas runtime."""

    # Embedded pools this process started (see cluster.embedded_clusters).
    _embedded_clusters = _cluster.embedded_clusters

    def __init__(self, client, cluster=None):
        self.client = client
        self.cluster = cluster
        # The pool's log (see pool_log): Dask's and kaas's log lines, not the cells'.
        self.pool_log = _pool_log.take(client, embedded=cluster is not None)
        weakref.finalize(self, self.pool_log.close)  # also if this constructor fails
        # Names this client on shared workers: its kept buffers are its own.
        self.client_id = uuid.uuid4().hex
        self._router = Router()
        self._control = ControlPlane(client, self._router, self.client_id)
        self.loop: asyncio.AbstractEventLoop = self._control.loop
        self._links = Links(client.connection_args.get("ssl_context"))
        self._kept = KeptData(self, self._control)
        self._registry = KernelRegistry(self._control)
        self._calls = CallPath(self._control, self._links, self._kept, self.client_id, embedded=cluster is not None)
        self._background = Background(lambda record: self._control.cancel(record.worker, record.call_id))
        max_value, max_message = _transfer_limits()
        fastlink.set_limits(max_value + 2**20, max_message + 2**24)
        shared_frames.configure(*(kaas_config.get(f"transfer.shared-memory-{k}") for k in ("threshold", "keep", "idle")))
        self._closed = False
        self._control.start()
        self._register_plugin()
        self._control.sync(self._control.refresh_routes())
        self._refresher = asyncio.run_coroutine_threadsafe(
            self._control.refresh_forever(lambda: self._closed, self._kept.pending), self.loop)
        self._calls.ready_at = time.perf_counter()  # a call begun before waited for the pool

    # -- construction --

    @classmethod
    def start(cls, n_workers: int | None = None, **cluster_kwargs) -> "Pool":
        """Start an embedded LocalCluster of worker processes, on 127.0.0.1 only, and
        (kaas.pool.security: temporary, the default) with mutual TLS on throwaway
        certificates, so that other users of this machine cannot use it."""
        return cls(*_cluster.start_cluster(n_workers, **cluster_kwargs))

    @classmethod
    def connect(cls, address: str, security=None, timeout: float = 30) -> "Pool":
        """Use an existing Dask scheduler (any deployment: jobqueue, Kubernetes, Gateway)."""
        return cls(_cluster.connect_client(address, security, timeout))

    def _register_plugin(self) -> None:
        from ..worker import KaasWorkerPlugin

        self.client.register_plugin(KaasWorkerPlugin(kaas_config.snapshot()), name="kaas")

    # -- routing --

    def refresh(self) -> None:
        """Read the routing table from the scheduler now."""
        self._control.refresh()

    def routes(self) -> list[WorkerRoute]:
        return self._router.routes()

    def route(self, target: str, backend: str | None = None, fallback: bool | None = None,
              worker: str | None = None, timeout: float | None = None):
        """The (worker, service) a call would use; waits while workers are still warming."""
        return self._control.route(target, backend, fallback, worker, timeout)

    def served(self) -> list[str]:
        """Human-readable list of what the pool serves, e.g. 'tpu jax fallback'."""
        return self._router.served()

    def wait_ready(self, timeout: float = 180) -> None:
        """Block until every worker has finished warming up all its backends."""
        self._control.wait_ready(timeout)

    def _forget_worker(self, address: str) -> None:
        """A worker died (or is being replaced): route nothing more to it."""
        self._control.forget_worker(address)

    # -- calls --

    def run(
        self,
        code: str,
        target: str = "cpu",
        *,
        inputs: Mapping[str, Any] | CellInputs | None = None,
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
        value: bool = True,
        started: float | None = None,
        block: bool = True,
    ) -> "RunResult | KaasFuture":
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

        When ``code`` ends in an expression, its value comes home as ``RunResult.value``
        (as IPython keeps a cell's value; under the same rules as outputs, a handle with
        ``keep``); ``value=False`` leaves it on the worker. ``started``: the
        ``time.perf_counter()`` at which the caller began waiting for this call (the module
        functions pass the moment before they started the pool, so that a first call's
        record counts the pool's start as its startup phase).

        ``block=False`` returns at once with a :class:`~kaas_magic.client.futures.KaasFuture`
        whose ``result()`` is what this call would return (or raises its error), whose
        ``record`` is the call's record, and whose ``cancel()`` stops the remote call.
        """
        t_start = _start_time(started)

        def call(watch=None) -> RunResult:
            return self._calls.run(code, target, inputs, outputs, filename, line_offset, self._registry.registered,
                                   t_start, backend=backend, fallback=fallback, worker=worker, stdout=stdout,
                                   stderr=stderr, keep=keep, progress=progress, timeout=timeout, retries=retries,
                                   value=value, watch=watch)

        return self._now_or_in_background(call, block)

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
        t_start = _start_time(options.pop("started", None))
        block = options.pop("block", True)
        # The variables as they are now (a call in the background reads them later).
        chosen = CellInputs(code, namespace, inputs, exclude, options.get("filename"), options.get("line_offset", 0))
        if block:
            result = self.run(code, target, inputs=chosen, outputs=outputs, started=t_start, **options)
            namespace.update(result.outputs)
            return result

        def call(watch=None) -> RunResult:  # its outputs assigned when it finishes
            result = self._calls.run(code, target, chosen, outputs, options.pop("filename", None),
                                     options.pop("line_offset", 0), self._registry.registered, t_start,
                                     watch=watch, **{**_RUN_DEFAULTS, **options})
            namespace.update(result.outputs)
            return result

        return self._now_or_in_background(call, block=False)

    def _now_or_in_background(self, call: Callable[..., Any], block: bool) -> Any:
        """``call(watch=None)`` now, or (``block=False``) in the background: then it returns
        at once a KaasFuture, whose ``watch`` the call is given (see futures.Background)."""
        self._check_usable()
        return call() if block else self._background.submit(call)

    def _check_usable(self) -> None:
        if self._closed:
            raise PoolNotRunning("this pool is closed; start or connect a new one")
        if self._control.scheduler_lost():
            raise self._control.lost_scheduler_error()

    def _exchange(self, address: str, message: CallRequest, stdout: TextIO, stderr: TextIO,
                  on_state: Callable[[str], None]):
        """Send one call over a direct link and relay its output (see CallPath.exchange)."""
        return self._calls.exchange(address, message, stdout, stderr, on_state)

    def transport(self, address: str) -> str:
        """How calls reach worker ``address``: "unix" (a Unix socket, for a worker on this
        machine) or "tcp"."""
        return self._calls.transport(address)

    def _endpoint(self, address: str) -> dict:
        """Where a worker serves direct links; asked once per worker."""
        return self._control.endpoint(address)

    @property
    def _endpoints(self) -> dict[str, dict]:
        return self._control.endpoints

    @property
    def _dead(self) -> dict[tuple[str, str], float]:
        return self._router.dead

    @property
    def _load(self) -> dict[str, tuple[dict[str, int], int]]:
        return self._router.load

    # -- data kept on devices --

    def put(self, value, target: str = "cpu", *, backend: str | None = None, fallback: bool | None = None,
            worker: str | None = None) -> DeviceHandle:
        """Copy a host array onto a device of ``target`` and keep it there."""
        result = self._operation("put", target, {PUT_VALUE: value}, PUT_KEPT, filename="<kaas put>",
                                 backend=backend, fallback=fallback, worker=worker, keep=True)
        return result.outputs[PUT_KEPT]

    def fetch(self, handle: DeviceHandle):
        """Copy a kept array home (``handle.get()``)."""
        service = Service.from_resource(handle.service)
        result = self._operation("fetch", service.target, {FETCH_HANDLE: handle}, FETCH_VALUE, filename="<kaas get>",
                                 backend=service.backend, fallback=True, worker=handle.worker)
        return result.outputs[FETCH_VALUE]

    def _operation(self, op: Op, target: str, inputs: dict, output: str, **options) -> RunResult:
        """One of kaas's own operations (see protocol): put, fetch, or compile a kernel."""
        t_start = time.perf_counter()
        self._check_usable()
        return self._calls.operation(op, target, inputs, output, t_start, **options)

    def release(self, worker: str, id: str) -> None:
        """Free the kept buffer ``id`` on ``worker`` (what ``DeviceHandle.free`` and a
        handle's ``__del__`` call): with the next call to that worker, or within a second
        with the background refresh. Safe to call from ``__del__``; does nothing once the
        pool is closed (the workers drop a closed client's buffers themselves)."""
        if self._closed:
            return
        self._kept.release(worker, id)

    # -- registered kernels --

    def library(self) -> dict:
        return self._registry.library()

    @property
    def _kernels(self) -> dict:
        """Kernels this client registered: name -> KernelSpec."""
        return self._registry.registered

    def call(self, name: str, *args, target: str | None = None, backend: str | None = None,
             fallback: bool | None = None, keep: bool = False, timeout: float | None = None,
             retries: int = 0, started: float | None = None, block: bool = True, **kwargs) -> Any:
        """Run kernel ``name`` with ``args`` on the best device that can, and return its
        result as host values (``keep=True``: as handles to device buffers). Arguments are
        checked against the signature before launch; handles among them are used in place.
        ``retries``, ``started`` and ``block`` as for :meth:`run`."""
        t_start = _start_time(started)

        def call(watch=None) -> Any:
            return self._registry.call(self._calls.submit, name, args, kwargs, target=target, backend=backend,
                                       fallback=fallback, keep=keep, timeout=timeout, retries=retries,
                                       t_start=t_start, watch=watch)

        return self._now_or_in_background(call, block)

    def map(self, fn_or_code: str, iterable, *, ordered: bool = True, return_exceptions: bool = False,
            batch_size: int | None = None, max_in_flight: int | None = None, progress: bool | None = None,
            target: str | None = None, backend: str | None = None, fallback: bool | None = None,
            timeout: float | None = None, **call_options) -> "MapIterator":
        """Many small calls at once, like ``Executor.map``: kernel ``fn_or_code`` once per
        element of ``iterable`` (a tuple of positional arguments, a dict of keyword
        arguments, or one argument), or code ``fn_or_code`` once per dict of inputs (its
        result: the value of its final expression, else a dict of the names it assigns).

        Returns an iterator over the results, lazily: in order, or as they complete with
        ``ordered=False``; its ``stats`` sum the map up. Items travel in batches, one message
        per batch run as one call on the worker, spread over every device that can serve
        them by load. At most ``max_in_flight`` items (kaas.map.max-in-flight) are taken
        from ``iterable`` and not yet handed back. The first error raises (with
        ``kaas_index``, the item's index) after cancelling the rest; with
        ``return_exceptions=True`` errors come back in place. ``timeout`` is per item;
        ``retries``, ``worker`` as for :meth:`call`. ``progress``: a bar (default: in a
        Jupyter kernel) or a line on stderr."""
        from .fanout import start_map

        return start_map(self, fn_or_code, iterable, ordered=ordered, return_exceptions=return_exceptions,
                         batch_size=batch_size, max_in_flight=max_in_flight, progress=progress, target=target,
                         backend=backend, fallback=fallback, timeout=timeout, **call_options)

    def register(self, source: str, language: str, *, signature: str | None = None,
                 name: str | None = None, target: str | None = None, fallback: bool | None = None,
                 line_offset: int = 0):
        """Register a kernel from source and compile it on a warm worker straight away.

        A compile error raises with the compiler's log (lines point into the cell when
        ``line_offset`` says where the source starts) and registers nothing."""
        return self._registry.register(self._operation, source, language, signature=signature, name=name,
                                       target=target, fallback=fallback, line_offset=line_offset)

    def kernels(self) -> "KernelTable":
        return self._registry.table(self.status())

    # -- status and lifecycle --

    def last_run(self) -> RunRecord | None:
        return self._calls.last_record

    def status(self) -> "PoolStatus":
        return self._control.status(embedded=self.cluster is not None)

    def metrics(self) -> list[dict]:
        """One row per device per worker: occupancy, utilisation over the last 10 s and
        60 s, calls, median latency, memory, warm kernels (what the monitor shows).
        Workers that do not answer within a second are left out."""
        return self._control.metrics()

    # -- autoscaling (see client.adapt) --

    def adapt(self, minimum: int = 1, maximum: int | None = None, *, cluster=None, **policy):
        """Grow and shrink the pool with kaas's load (Dask sees no tasks: calls bypass its
        scheduler): workers are added after ``scale_up_after`` seconds of queued calls and
        removed after ``idle_after`` seconds idle (never one with a call in flight or kept
        buffers), between ``minimum`` (0 allowed: a call then waits for a warm worker, and
        is recorded as cold) and ``maximum`` (None: no limit). ``policy``: ``interval``,
        ``scale_up_after``, ``idle_after``, ``target_occupancy``, ``settle`` (default
        ``kaas.adapt.*``). Works on a pool kaas started, or with ``cluster=`` the cluster
        manager (dask-jobqueue, dask-kubernetes, Gateway...) running a connected pool's
        workers. Returns the :class:`~kaas_magic.client.adapt.KaasAdaptive` (``.stop()``,
        ``.events``); calling again replaces it."""
        from .adapt import start_adaptive

        self._check_usable()
        adaptive = start_adaptive(self, minimum, maximum, cluster=cluster, **policy)
        self._adaptive = adaptive
        return adaptive

    def adapt_stop(self) -> None:
        """Stop autoscaling; the pool keeps the workers it has."""
        adaptive = getattr(self, "_adaptive", None)
        if adaptive is not None:
            adaptive.stop(reason="stopped by the user")

    def adapt_log(self) -> list[str]:
        """Autoscaling's scale-ups and scale-downs, each with its reason (oldest first)."""
        adaptive = getattr(self, "_adaptive", None)
        return adaptive.log_lines() if adaptive is not None else []

    def adapt_reason(self) -> str:
        """The latest autoscaling decision's reason ("" when none): the monitor shows it."""
        adaptive = getattr(self, "_adaptive", None)
        return adaptive.latest_reason() if adaptive is not None else ""

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def scheduler_address(self) -> str:
        return self._control.scheduler_address

    def close(self) -> None:
        if self._closed:
            return
        self._refresher.cancel()
        self.adapt_stop()
        self._background.close()
        if self.cluster is None:  # our kept buffers on shared workers go with us
            self._control.free_everything()
        self._closed = True
        self._links.close()
        self._control.close()
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()
        self.pool_log.close()  # after the cluster's last lines

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "embedded" if self.cluster is not None else "connected"
        return f"<kaas Pool {kind} {self.scheduler_address} workers={len(self.routes())}>"
