"""One batch of a map, in a sender thread: its request, the exchange with its worker, and
what the reply (or its failure) means for each item: a value or an error, a retry
elsewhere after a lost worker, or the whole batch sent again when a worker retiring under
autoscaling refused it unrun."""

from __future__ import annotations

import time
from typing import Any

from .. import config as kaas_config
from .. import serial
from ..errors import CellInterrupted, KaasError, WorkerLost, rebuild_remote_exception
from ..protocol import BATCH_RESULTS, CallRequest, Reply
from ..record import RunRecord, Timings
from ..stopping import max_timeout
from .calls import _refused_as_retiring
from .map_job import MapJob
from .map_state import MapBatch, MapState, indexed, item_error


class BatchSender:
    """Sends a map's batches (``send``, from the dispatcher's sender threads) and records
    each item's outcome in the map's state."""

    def __init__(self, pool, job: MapJob, state: MapState, *, timeout: float | None, retries: int, map_id: str):
        self.pool = pool
        self.calls = pool._calls
        self.control = pool._control
        self.router = pool._router
        self.job = job
        self.state = state
        self.timeout = timeout  # per item; None: the worker's maximum
        self.retries = retries
        self.map_id = map_id

    def send(self, batch: MapBatch, route, service) -> None:
        """Send ``batch`` to its worker and hand each of its items its outcome."""
        t_start = time.perf_counter()
        wall = time.time()
        message = self._request(batch, service)
        n = len(batch.items)
        record = RunRecord(call_id=batch.call_id, target=self.job.target, started_at=wall, backend=service.backend,
                           kind=service.kind, worker=route.address, host=route.host,
                           device=self.calls._device(service.resource, route.address),
                           inputs=(f"{n} items",), notes=[f"a batch of {n} items of map {self.map_id}"])
        in_flight = self.router.in_flight
        in_flight[batch.address] += 1
        try:
            reply, _ = self.calls.exchange(batch.address, message, self.job.stdout, None, _ignore)
        except BaseException as e:  # noqa: BLE001 - its items' error (or resent, for a lost worker)
            in_flight[batch.address] -= 1
            self._failed(batch, e, record, t_start)
            return
        in_flight[batch.address] -= 1
        t_received = time.perf_counter()
        if reply["worker_exiting"]:
            self.control.forget_worker(batch.address)
        if _refused_as_retiring(reply):  # autoscaling retired that worker: nothing ran, all go again
            self._resend(batch)
            return
        self._replied(batch, route, reply, record, t_start, t_received)

    def _request(self, batch: MapBatch, service) -> CallRequest:
        n = len(batch.items)
        per_item = self.timeout if self.timeout is not None else max_timeout(kaas_config.get("limits.max-timeout"))
        limit = max_timeout(kaas_config.get("limits.max-timeout"))
        return CallRequest(**{  # type: ignore[typeddict-item]
            **self.job.body,
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

    def _resend(self, batch: MapBatch) -> None:
        """A worker being retired refused the batch without running it: its items go to
        another worker, whatever the retries."""
        self.control.router.mark_retiring(batch.address)
        state = self.state
        with state.cond:
            state.batch_ended_locked(batch)
            state.retry.extend(batch.items)
            state.cond.notify_all()

    def _replied(self, batch: MapBatch, route, reply: Reply, record: RunRecord, t_start: float,
                 t_received: float) -> None:
        """The batch's reply: each item's value or error, the per-item time measured, the
        record written."""
        where = f"{self.job.target} on {reply['device'] or record.device}"
        results = reply["outputs"].get(BATCH_RESULTS) if reply["outputs"] else None
        outcomes, ran = _outcomes(batch, reply, results, where)
        t_end = time.perf_counter()
        w = reply["timings"]
        if ran:
            measured = (w["execute"] + w["to_host"]) / ran
            state = self.state
            state.per_item_s = measured if state.per_item_s is None else 0.5 * (state.per_item_s + measured)
        record.device = reply["device"] or record.device
        record.kernels = dict(reply["kernels"])
        record.add_conversions(reply.get("conversions"))  # kept buffers of another backend (worker.convert)
        record.ok = reply["ok"] and all(ok for _, ok, _ in outcomes)
        record.error = None if record.ok else (reply["error"] or {}).get("type", "item error").rsplit(".", 1)[-1]
        record.timings = Timings.balanced({"queue": w["queue"], "startup": w["warm_wait"], "setup": w["setup"],
                                           "execute": w["execute"], "transfer_out": w["to_host"] + t_end - t_received},
                                          t_end - t_start, rest="transfer_in")
        self.calls.last_record = record
        device = f"{route.name}: {record.device}" if record.device else str(route.name)
        self._deliver(batch, outcomes, results, device, ran)

    def _deliver(self, batch: MapBatch, outcomes: list[tuple[int, bool, Any]], results, device: str,
                 ran: int) -> None:
        state = self.state
        with state.cond:
            state.batch_ended_locked(batch)
            state.stats.batches += 1
            state.stats.batch_sizes.append(len(batch.items))
            state.stats.per_device[device] += ran
            for index, ok, value in outcomes:
                state.finish_locked(index, ok, value, not_run=not ok and _not_run(results, batch, index))
            state.cond.notify_all()

    def _failed(self, batch: MapBatch, error: BaseException, record: RunRecord, t_start: float) -> None:
        """A batch with no reply: a lost worker's items go again elsewhere while retries
        last; else each item gets the error."""
        record.ok, record.error = False, type(error).__qualname__
        record.timings = Timings.balanced({}, time.perf_counter() - t_start, rest="execute")
        self.calls.last_record = record
        state = self.state
        with state.cond:
            state.batch_ended_locked(batch)
            for item in batch.items:
                if isinstance(error, WorkerLost) and item.attempts < self.retries and not state.cancelled:
                    item.attempts += 1
                    state.stats.retried += 1
                    state.retry.append(item)
                else:
                    state.finish_locked(item.index, False, indexed(error, item.index, copy=True), not_run=True)
            state.cond.notify_all()


def _outcomes(batch: MapBatch, reply: Reply, results, where: str) -> tuple[list[tuple[int, bool, Any]], int]:
    """(index, ok, value or error) of each item of ``batch`` from its reply, and how many
    of them ran. An item the worker did not run gets the batch's error (or says so)."""
    batch_error = None
    if reply["error"] is not None:
        batch_error = rebuild_remote_exception(reply["error"], worker=batch.address, where=where)
    outcomes: list[tuple[int, bool, Any]] = []
    ran = 0
    for i, item in enumerate(batch.items):
        got = results[i] if results is not None and i < len(results) else None
        if got is None or got.get("not_run"):
            error = batch_error or CellInterrupted(f"item {item.index} was not run: its batch was stopped")
            outcomes.append((item.index, False, indexed(error, item.index, copy=batch_error is not None)))
            continue
        ran += 1
        if got.get("ok"):
            try:
                outcomes.append((item.index, True, serial.loads(got["value"])))
            except Exception as e:  # noqa: BLE001
                outcomes.append((item.index, False, item_error(KaasError(
                    f"its result could not be rebuilt in the notebook ({type(e).__name__}: {e})"), item.index)))
        else:
            error = rebuild_remote_exception(got["error"], worker=batch.address, where=where)
            outcomes.append((item.index, False, indexed(error, item.index)))
    return outcomes, ran


def _not_run(results, batch: MapBatch, index: int) -> bool:
    if results is None:
        return True
    position = next(i for i, item in enumerate(batch.items) if item.index == index)
    return position >= len(results) or bool(results[position].get("not_run"))


def _ignore(state: str) -> None:
    pass
