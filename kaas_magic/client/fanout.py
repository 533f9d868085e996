"""Many calls at once: ``Pool.map`` (``kaas.map``).

A map sends its items in **batches**, one "batch" request (see protocol) per batch: the
worker runs the items in a tight loop as ONE call (one device turn, one timeout), so the
per-item cost falls well below a single call's. Every device that can serve the call is
kept busy: each worker has up to ``_DEPTH`` batches in flight (so its device never idles
between two), each sent on its own direct link from a small thread pool (the call path is
synchronous per link: see CallPath.exchange), and each new batch goes to the least-loaded
worker (the router's view of the load, plus this client's own calls in flight).

Batch sizes adapt: the first are small, then each aims at about ``_TARGET_BATCH_S`` of
worker time, from the per-item time the replies measure, and no more than the items left
spread over the workers (so the tail spreads). At most ``max_in_flight`` items are pulled
from the iterable and not yet handed to the caller (memory stays bounded on an endless
iterable). Results come lazily: in order (out-of-order ones held until their turn), or as
they complete.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import io
import math
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .. import config as kaas_config
from .. import serial
from ..errors import CellInterrupted, KaasError, KaasUsageError, WorkerLost, rebuild_remote_exception
from ..protocol import BATCH_RESULTS, CallRequest
from ..record import RunRecord, Timings
from ..stopping import check_call_options, max_timeout
from .calls import _refused_as_retiring

_DEPTH = 2  # batches in flight per worker: the next is there when one ends
_FIRST_BATCH = 8  # items in a batch before any per-item time is measured
_TARGET_BATCH_S = 0.02  # worker time one batch aims at
_MAX_BATCH = 1024
_DEFAULT_MAX_IN_FLIGHT = 4096


@dataclass
class MapStats:
    """A map's summary so far (``iterator.stats``)."""

    items: int = 0  # items with a result (value or error)
    errors: int = 0
    not_run: int = 0  # items a stop or a cancel left unrun
    batches: int = 0  # batches answered
    retried: int = 0  # items sent again after their worker was lost
    pulled: int = 0  # items taken from the iterable
    per_device: collections.Counter = field(default_factory=collections.Counter)  # device -> items run
    batch_sizes: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    ended: float | None = None
    total: int | None = None  # len() of the iterable, when it has one

    @property
    def seconds(self) -> float:
        return (self.ended or time.perf_counter()) - self.started

    @property
    def rate(self) -> float:
        """Items with a result per second, so far."""
        return self.items / self.seconds if self.seconds > 0 else 0.0

    def __repr__(self) -> str:
        split = ", ".join(f"{d}: {n}" for d, n in sorted(self.per_device.items()))
        return (f"<MapStats {self.items} items ({self.errors} errors, {self.not_run} not run) in {self.batches} "
                f"batches, {self.rate:,.0f}/s; {split}>")


class MapIterator:
    """What ``Pool.map`` returns: an iterator over the results (lazily), with ``stats``.
    Dropping it, or :meth:`close`, cancels what has not run."""

    def __init__(self, run: "_MapRun"):
        self._run = run

    def __iter__(self) -> "MapIterator":
        return self

    def __next__(self) -> Any:
        return self._run.next()

    @property
    def stats(self) -> MapStats:
        return self._run.stats

    def close(self) -> None:
        """Stop: send nothing more and ask the workers to stop the batches in flight."""
        self._run.cancel(wait=False)

    def __del__(self) -> None:
        try:
            self._run.cancel(wait=False)
        except Exception:  # noqa: BLE001 - at interpreter exit
            pass

    def __repr__(self) -> str:
        return f"<kaas map {self._run.what}: {self._run.stats!r}>"


@dataclass
class _Item:
    index: int
    inputs: dict  # name -> serial.Packed
    attempts: int = 0


@dataclass
class _Batch:
    call_id: str
    address: str
    items: list[_Item]


def start_map(pool, fn_or_code: str, iterable: Iterable, *, ordered: bool = True, return_exceptions: bool = False,
              batch_size: int | None = None, max_in_flight: int | None = None, progress: bool | None = None,
              target: str | None = None, backend: str | None = None, fallback: bool | None = None,
              worker: str | None = None, timeout: float | None = None, retries: int = 0,
              **call_options) -> MapIterator:
    """Pool.map (see there)."""
    if call_options:
        raise KaasUsageError(f"map takes no option {', '.join(sorted(call_options))}; it takes target, backend, "
                             f"fallback, worker, timeout, retries, ordered, return_exceptions, batch_size, "
                             f"max_in_flight, progress")
    if not isinstance(fn_or_code, str):
        raise KaasUsageError(f"map takes a kernel's name or code (a str), not {type(fn_or_code).__name__}")
    if batch_size is not None and (type(batch_size) is not int or not 1 <= batch_size <= _MAX_BATCH):
        raise KaasUsageError(f"batch_size must be a whole number from 1 to {_MAX_BATCH}, not {batch_size!r}")
    if max_in_flight is None:
        max_in_flight = kaas_config.get("map.max-in-flight") or _DEFAULT_MAX_IN_FLIGHT
    if type(max_in_flight) is not int or max_in_flight < 1:
        raise KaasUsageError(f"max_in_flight must be a whole number of at least 1, not {max_in_flight!r}")
    timeout, retries = check_call_options(timeout, retries)
    pool._check_usable()
    run = _MapRun(pool, fn_or_code, iterable, ordered=ordered, return_exceptions=return_exceptions,
                  batch_size=batch_size, max_in_flight=max_in_flight, target=target, backend=backend,
                  fallback=fallback, worker=worker, timeout=timeout, retries=retries)
    if progress is None:
        from ..map_view import in_jupyter

        progress = in_jupyter()
    if progress:
        from ..map_view import MapView

        run.view = MapView(run)
    run.start()
    return MapIterator(run)


class _MapRun:
    def __init__(self, pool, fn_or_code: str, iterable: Iterable, *, ordered, return_exceptions, batch_size,
                 max_in_flight, target, backend, fallback, worker, timeout, retries):
        self.pool = pool
        self.calls = pool._calls
        self.control = pool._control
        self.router = pool._router
        self.ordered = ordered
        self.return_exceptions = return_exceptions
        self.fixed_batch = batch_size
        self.max_in_flight = max_in_flight
        self.timeout = timeout  # per item; None: the worker's maximum
        self.retries = retries
        self.worker = worker
        self.view = None
        self.stats = MapStats()
        try:
            self.stats.total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            pass
        self._items = iter(iterable)
        if fallback is None:
            fallback = bool(kaas_config.get("fallback"))
        self._setup(fn_or_code, target, backend, fallback)
        self._cond = threading.Condition()
        self._results: dict[int, tuple[bool, Any]] = {}
        self._done_order: collections.deque[int] = collections.deque()
        self._retry: collections.deque[_Item] = collections.deque()
        self._next_yield = 0
        self._yielded = 0
        self._exhausted = False
        self._failure: BaseException | None = None
        self._cancelled = False
        self._in_flight: dict[str, _Batch] = {}  # call_id -> batch
        self._per_worker: collections.Counter[str] = collections.Counter()  # batches in flight
        self._per_item_s: float | None = None  # measured worker time per item (moving average)
        self._senders: concurrent.futures.ThreadPoolExecutor | None = None
        self._map_id = hashlib.blake2b(f"{id(self)}{time.time()}".encode(), digest_size=4).hexdigest()

    # -- what runs, and where it may --

    def _setup(self, fn_or_code: str, target, backend, fallback) -> None:
        registry = self.pool._registry
        # A bare name is a kernel's (code that is only a name would map nothing): an unknown
        # one fails here, naming it, as kaas.call does, not once per item as a NameError.
        if fn_or_code.isidentifier():
            specs = registry.specs(fn_or_code)
            self.spec, self.target = registry.route(specs, target, backend, fallback)
            self.backend, self.fallback = self.spec.backend, True  # the spec's target is the best there is
            self.kind = "kernel"
            self.what = f"kernel {fn_or_code}"
            self.body = {"op": "batch", "kernel": fn_or_code, "filename": f"<kaas map {fn_or_code}>",
                         "kernels": [self.spec.to_dict()] if self.spec.origin == "user" else [],
                         "outputs": [], "outputs_explicit": False}
            self.stdout = io.StringIO()
        else:
            from ..cellcode import analyse

            self.kind = "code"
            self.spec = None
            filename = f"<kaas map {hashlib.blake2b(fn_or_code.encode(), digest_size=8).hexdigest()}>"
            info = analyse(fn_or_code, filename, 0)  # SyntaxError here: nothing is sent
            self.target = target or "cpu"
            self.what = f"code on {self.target}"
            self.body = {"op": "batch", "code": fn_or_code, "filename": filename, "line_offset": 0, "value": True,
                         "outputs": sorted(info.writes), "outputs_explicit": False,
                         "kernels": ([k.to_dict() for k in registry.registered.values()]
                                     if "kernels" in info.reads else [])}
            self.backend, self.fallback = backend, fallback
            self.stdout = sys.stdout
        # One backend and one kind of device for the whole map (as a call would be routed):
        # real devices before simulators before stand-ins, the target's default backend first.
        route, service, _ = self.control.route(self.target, self.backend, self.fallback, self.worker)
        self.backend, self.service_kind = service.backend, service.kind

    def _slots(self) -> list:
        """(route, service, concurrency) of every worker that can serve the map now."""
        found = [c for c in self.router.candidates(self.target, self.backend, self.fallback, self.worker)
                 if c[1].kind == self.service_kind]
        return found

    # -- the dispatcher thread --

    def start(self) -> None:
        if self.view is not None:
            self.view.start()
        threading.Thread(target=self._dispatch, name=f"kaas-map-{self._map_id}", daemon=True).start()

    def _dispatch(self) -> None:
        try:
            self._dispatch_loop()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            with self._cond:
                self._failure = self._failure or e
                self._cond.notify_all()

    def _backlog(self) -> int:
        """Batches' worth of items not yet sent (called locked): the demand autoscaling
        sees (see ControlPlane.set_demand). An iterable of unknown length not yet exhausted
        wants at least one more worker's worth."""
        waiting = len(self._retry)
        if self.stats.total is not None:
            waiting += self.stats.total - self.stats.pulled
        elif not self._exhausted:
            waiting += _DEPTH * self._batch_size()
        return math.ceil(waiting / max(self._batch_size(), 1))

    def _dispatch_loop(self) -> None:
        try:
            self._dispatch_batches()
        finally:
            self.control.set_demand(self._map_id, self.target, 0)

    def _dispatch_batches(self) -> None:
        while True:
            with self._cond:
                self.control.set_demand(self._map_id, self.target, self._backlog())
                while True:
                    if self._cancelled:
                        return
                    if self._exhausted and not self._retry and (not self._in_flight or not self.retries):
                        return  # everything is sent (and no lost batch can come back to resend)
                    room = self.max_in_flight - (self.stats.pulled - self._yielded)
                    if self._retry or (room > 0 and not self._exhausted):
                        slot = self._free_slot()
                        if slot is not None:
                            break
                    self._cond.wait(0.25)
                route, service, _ = slot
                size = self._batch_size()
                items = [self._retry.popleft() for _ in range(min(size, len(self._retry)))]
                room = min(size - len(items), self.max_in_flight - (self.stats.pulled - self._yielded))
                self._per_worker[route.address] += 1  # reserved while the batch is made
            try:
                if room > 0:
                    items += self._pull(room)
            except BaseException:
                with self._cond:
                    self._per_worker[route.address] -= 1
                raise
            with self._cond:
                if not items or self._cancelled:
                    self._per_worker[route.address] -= 1
                    self._cond.notify_all()
                    continue
                call_id = f"{self.pool.client_id[:16]}-{next(self.calls.counter)}"
                batch = _Batch(call_id, route.address, items)
                self._in_flight[call_id] = batch
            self._sender_pool().submit(self._send, batch, route, service)

    def _free_slot(self):
        """The least-loaded worker with room for another batch, or None (called locked)."""
        slots = self._slots()
        if not slots:
            if not self.router.warming() and not self._in_flight:
                raise self.router.unavailable(self.target, self.backend, self.fallback, self.worker)
            return None
        free = [s for s in slots if self._per_worker[s[0].address] < _DEPTH]
        if not free:
            return None
        busy = self.router.busy
        return min(free, key=lambda s: (self._per_worker[s[0].address],
                                        busy(s[0].address, s[1]) / max(s[2], 1), random.random()))

    def _batch_size(self) -> int:
        if self.fixed_batch:
            return self.fixed_batch
        size = _FIRST_BATCH if self._per_item_s is None else int(_TARGET_BATCH_S / max(self._per_item_s, 1e-7))
        if self.stats.total is not None:  # the tail spreads over every worker
            left = self.stats.total - self.stats.pulled + len(self._retry)
            size = min(size, math.ceil(left / max(len(self._slots()), 1)))
        return max(1, min(size, _MAX_BATCH))

    def _pull(self, n: int) -> list[_Item]:
        """Up to ``n`` items from the iterable, packed; an item that cannot be (a wrong
        number of arguments, a value that cannot travel) gets its error as its result."""
        items = []
        for _ in range(n):
            try:
                element = next(self._items)
            except StopIteration:
                with self._cond:
                    self._exhausted = True
                break
            with self._cond:
                index = self.stats.pulled
                self.stats.pulled += 1
            try:
                items.append(_Item(index, self._pack(element)))
            except Exception as e:  # noqa: BLE001 - this item's error, named by its index
                self._finish(index, False, _item_error(e, index))
        return items

    def _pack(self, element: Any) -> dict:
        if self.kind == "kernel":
            if isinstance(element, Mapping):
                args, kwargs = (), dict(element)
            elif isinstance(element, tuple):
                args, kwargs = element, {}
            else:  # one argument
                args, kwargs = (element,), {}
            if self.spec.params is not None:
                from ..kernelspec import bind

                inputs = bind(self.spec, args, kwargs).values
            else:  # a Python kernel taking any arguments
                inputs = {"__args": args, "__kwargs": kwargs}
        else:
            if not isinstance(element, Mapping):
                raise KaasUsageError(f"a map over code takes a dict of inputs per item, not "
                                     f"{type(element).__name__}")
            inputs = dict(element)
        from .calls import _serialize_inputs

        return _serialize_inputs(inputs)[0]

    def _sender_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._senders is None:
            n = max(2, min(32, _DEPTH * max(len(self._slots()), 1)))
            self._senders = concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix=f"kaas-map-{self._map_id}")
        return self._senders

    # -- one batch, in a sender thread --

    def _send(self, batch: _Batch, route, service) -> None:
        t_start = time.perf_counter()
        wall = time.time()
        n = len(batch.items)
        per_item = self.timeout if self.timeout is not None else max_timeout(kaas_config.get("limits.max-timeout"))
        limit = max_timeout(kaas_config.get("limits.max-timeout"))
        message = CallRequest(**{  # type: ignore[typeddict-item]
            **self.body,
            "service": service.resource,
            "inputs": {},
            "items": [item.inputs for item in batch.items],
            "client": self.pool.client_id,
            "call_id": batch.call_id,
            "timeout": float(min(per_item * n, limit)),
            "keep": False,
            "progress": False,
            "free": self.calls.kept.frees_for(batch.address),
        })
        record = RunRecord(call_id=batch.call_id, target=self.target, started_at=wall, backend=service.backend,
                           kind=service.kind, worker=route.address, host=route.host,
                           device=self.calls._device(service.resource, route.address),
                           inputs=(f"{n} items",), notes=[f"a batch of {n} items of map {self._map_id}"])
        in_flight = self.router.in_flight
        in_flight[batch.address] += 1
        try:
            reply, _ = self.calls.exchange(batch.address, message, self.stdout, None, _ignore)
        except BaseException as e:  # noqa: BLE001 - its items' error (or resent, for a lost worker)
            in_flight[batch.address] -= 1
            self._failed_batch(batch, e, record, t_start)
            return
        in_flight[batch.address] -= 1
        t_received = time.perf_counter()
        if reply["worker_exiting"]:
            self.control.forget_worker(batch.address)
        if _refused_as_retiring(reply):  # autoscaling retired that worker: nothing ran, all go again
            self.control.router.mark_retiring(batch.address)
            with self._cond:
                self._in_flight.pop(batch.call_id, None)
                self._per_worker[batch.address] -= 1
                self._retry.extend(batch.items)
                self._cond.notify_all()
            return
        where = f"{self.target} on {reply['device'] or record.device}"
        results = reply["outputs"].get(BATCH_RESULTS) if reply["outputs"] else None
        batch_error = None
        if reply["error"] is not None:
            batch_error = rebuild_remote_exception(reply["error"], worker=batch.address, where=where)
        outcomes: list[tuple[int, bool, Any]] = []
        ran = 0
        for i, item in enumerate(batch.items):
            got = results[i] if results is not None and i < len(results) else None
            if got is None or got.get("not_run"):
                error = batch_error or CellInterrupted(f"item {item.index} was not run: its batch was stopped")
                outcomes.append((item.index, False, _indexed(error, item.index, copy=batch_error is not None)))
                continue
            ran += 1
            if got.get("ok"):
                try:
                    outcomes.append((item.index, True, serial.loads(got["value"])))
                except Exception as e:  # noqa: BLE001
                    outcomes.append((item.index, False, _item_error(KaasError(
                        f"its result could not be rebuilt in the notebook ({type(e).__name__}: {e})"), item.index)))
            else:
                error = rebuild_remote_exception(got["error"], worker=batch.address, where=where)
                outcomes.append((item.index, False, _indexed(error, item.index)))
        t_end = time.perf_counter()
        w = reply["timings"]
        if ran:
            measured = (w["execute"] + w["to_host"]) / ran
            self._per_item_s = measured if self._per_item_s is None else 0.5 * (self._per_item_s + measured)
        record.device = reply["device"] or record.device
        record.kernels = dict(reply["kernels"])
        record.ok = reply["ok"] and all(ok for _, ok, _ in outcomes)
        record.error = None if record.ok else (reply["error"] or {}).get("type", "item error").rsplit(".", 1)[-1]
        record.timings = Timings.balanced({"queue": w["queue"], "startup": w["warm_wait"], "setup": w["setup"],
                                           "execute": w["execute"], "transfer_out": w["to_host"] + t_end - t_received},
                                          t_end - t_start, rest="transfer_in")
        self.calls.last_record = record
        device = f"{route.name}: {record.device}" if record.device else str(route.name)
        with self._cond:
            self._in_flight.pop(batch.call_id, None)
            self._per_worker[batch.address] -= 1
            self.stats.batches += 1
            self.stats.batch_sizes.append(n)
            self.stats.per_device[device] += ran
            for index, ok, value in outcomes:
                self._finish_locked(index, ok, value, not_run=not ok and _not_run(results, batch, index))
            self._cond.notify_all()

    def _failed_batch(self, batch: _Batch, error: BaseException, record: RunRecord, t_start: float) -> None:
        """A batch with no reply: a lost worker's items go again elsewhere while retries
        last; else each item gets the error."""
        record.ok, record.error = False, type(error).__qualname__
        record.timings = Timings.balanced({}, time.perf_counter() - t_start, rest="execute")
        self.calls.last_record = record
        with self._cond:
            self._in_flight.pop(batch.call_id, None)
            self._per_worker[batch.address] -= 1
            for item in batch.items:
                if isinstance(error, WorkerLost) and item.attempts < self.retries and not self._cancelled:
                    item.attempts += 1
                    self.stats.retried += 1
                    self._retry.append(item)
                else:
                    self._finish_locked(item.index, False, _indexed(error, item.index, copy=True), not_run=True)
            self._cond.notify_all()

    def _finish(self, index: int, ok: bool, value: Any) -> None:
        with self._cond:
            self._finish_locked(index, ok, value)
            self._cond.notify_all()

    def _finish_locked(self, index: int, ok: bool, value: Any, not_run: bool = False) -> None:
        self._results[index] = (ok, value)
        self._done_order.append(index)
        self.stats.items += 1
        if not ok:
            self.stats.errors += 1
            self.stats.not_run += int(not_run)

    # -- the caller's side --

    def next(self) -> Any:
        with self._cond:
            while True:
                if self.ordered:
                    if self._next_yield in self._results:
                        index = self._next_yield
                        break
                elif self._done_order:
                    index = self._done_order.popleft()
                    if index not in self._results:  # taken already
                        continue
                    break
                if self._exhausted and self._yielded >= self.stats.pulled:
                    self._end()
                    raise StopIteration
                if self._cancelled:
                    self._end()
                    raise StopIteration
                if self._failure is not None and not self._in_flight:
                    failure, self._failure = self._failure, None
                    self._exhausted = True
                    self._cancelled = True
                    self._end()
                    raise failure
                self._cond.wait(0.25)
            ok, value = self._results.pop(index)
            self._next_yield += 1 if self.ordered else 0
            self._yielded += 1
            self._cond.notify_all()  # room for more items
        if not ok and not self.return_exceptions:
            self.cancel(wait=True)
            raise value
        return value

    def _end(self) -> None:
        if self.stats.ended is None:
            self.stats.ended = time.perf_counter()
            if self._senders is not None:
                self._senders.shutdown(wait=False)
            if self.view is not None:
                self.view.close()

    def cancel(self, wait: bool) -> None:
        """Send nothing more; ask the workers to stop the batches in flight (through the
        control plane, as an interrupted call is); with ``wait``, give them a few seconds
        to answer, so that ``stats`` is final."""
        with self._cond:
            if self._cancelled and not self._in_flight:
                self._end()
                return
            self._cancelled = True
            self._exhausted = True
            batches = list(self._in_flight.values())
            self._retry.clear()
            self._cond.notify_all()
        for batch in batches:
            threading.Thread(target=self._cancel_one, args=(batch,), daemon=True).start()
        if wait:
            deadline = time.monotonic() + 5
            with self._cond:
                while self._in_flight and time.monotonic() < deadline:
                    self._cond.wait(0.1)
        with self._cond:
            self._end()

    def _cancel_one(self, batch: _Batch) -> None:
        try:
            self.control.cancel(batch.address, batch.call_id)
        except Exception:  # noqa: BLE001 - gone, or done already
            pass

    def snapshot(self) -> tuple[int, int | None, float, dict[str, int], bool]:
        """(done, total, rate, per-device items, ended) for the progress view."""
        with self._cond:
            s = self.stats
            return s.items, s.total, s.rate, dict(s.per_device), s.ended is not None


def _not_run(results, batch: _Batch, index: int) -> bool:
    if results is None:
        return True
    position = next(i for i, item in enumerate(batch.items) if item.index == index)
    return position >= len(results) or bool(results[position].get("not_run"))


def _indexed(error: BaseException, index: int, copy: bool = False) -> BaseException:
    """``error`` with ``kaas_index``: the item's index. One error shared by several items
    (a stopped batch, a lost worker) is copied per item where it can be."""
    if copy:
        try:
            import copy as _copy

            error = _copy.copy(error)
        except Exception:  # noqa: BLE001
            pass
    try:
        error.kaas_index = index  # type: ignore[attr-defined]
    except AttributeError:
        pass
    return error


def _item_error(error: BaseException, index: int) -> BaseException:
    """An item that could not be sent: its error, its message naming the item."""
    try:
        named = type(error)(f"item {index}: {error}")
    except Exception:  # noqa: BLE001 - a constructor that takes other arguments
        named = KaasUsageError(f"item {index}: {type(error).__name__}: {error}")
    named.__cause__ = error
    return _indexed(named, index)


def _ignore(state: str) -> None:
    pass
