"""A map's dispatcher thread: which worker gets the next batch (the least loaded with a
free slot), how many items go in it, taking them from the iterable (or the retries) within
``max_in_flight``, and the backlog that autoscaling sees as demand."""

from __future__ import annotations

import concurrent.futures
import math
import random
import threading
from typing import Any, Callable, Iterator

from .map_job import MapJob
from .map_state import MapBatch, MapItem, MapState, item_error

DEPTH = 2  # batches in flight per worker: the next is there when one ends
FIRST_BATCH = 8  # items in a batch before any per-item time is measured
TARGET_BATCH_S = 0.02  # worker time one batch aims at
MAX_BATCH = 1024


class MapDispatcher:
    """Sends a map's batches, each by ``send(batch, route, service)`` in a sender thread
    (see map_replies), until everything is sent, or the map is cancelled."""

    def __init__(self, pool, job: MapJob, state: MapState, items: Iterator, *, batch_size: int | None,
                 max_in_flight: int, retries: int, map_id: str, send: Callable[[MapBatch, Any, Any], None]):
        self.pool = pool
        self.calls = pool._calls
        self.control = pool._control
        self.router = pool._router
        self.job = job
        self.state = state
        self.fixed_batch = batch_size
        self.max_in_flight = max_in_flight
        self.retries = retries
        self.map_id = map_id
        self._items = items
        self._send = send
        self._senders: concurrent.futures.ThreadPoolExecutor | None = None

    def start(self) -> None:
        threading.Thread(target=self._dispatch, name=f"kaas-map-{self.map_id}", daemon=True).start()

    def shutdown_senders(self) -> None:
        if self._senders is not None:
            self._senders.shutdown(wait=False)

    def _dispatch(self) -> None:
        state = self.state
        try:
            self._dispatch_loop()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            with state.cond:
                state.failure = state.failure or e
                state.cond.notify_all()

    def _dispatch_loop(self) -> None:
        try:
            self._dispatch_batches()
        finally:
            self.control.set_demand(self.map_id, self.job.target, 0)

    def _dispatch_batches(self) -> None:
        state = self.state
        while True:
            with state.cond:
                self.control.set_demand(self.map_id, self.job.target, self._backlog())
                slot = self._wait_for_slot_locked()
                if slot is None:
                    return
                route, service, _ = slot
                size = self.batch_size()
                items = [state.retry.popleft() for _ in range(min(size, len(state.retry)))]
                room = min(size - len(items), self.max_in_flight - state.unclaimed_locked())
                state.per_worker[route.address] += 1  # reserved while the batch is made
            try:
                if room > 0:
                    items += self._pull(room)
            except BaseException:
                with state.cond:
                    state.per_worker[route.address] -= 1
                raise
            batch = self._claim(route.address, items)
            if batch is not None:
                self._sender_pool().submit(self._send, batch, route, service)

    def _wait_for_slot_locked(self):
        """Wait (called locked) until there are items to send and a worker with room for
        them: its slot; None when there is nothing more to send."""
        state = self.state
        while True:
            if state.cancelled:
                return None
            if state.exhausted and not state.retry and (not state.in_flight or not self.retries):
                return None  # everything is sent (and no lost batch can come back to resend)
            room = self.max_in_flight - state.unclaimed_locked()
            if state.retry or (room > 0 and not state.exhausted):
                slot = self._free_slot()
                if slot is not None:
                    return slot
            state.cond.wait(0.25)

    def _claim(self, address: str, items: list[MapItem]) -> MapBatch | None:
        """``items`` as a batch in flight on its reserved slot; None (the slot given back)
        when there are none or the map was cancelled meanwhile."""
        state = self.state
        with state.cond:
            if not items or state.cancelled:
                state.per_worker[address] -= 1
                state.cond.notify_all()
                return None
            call_id = f"{self.pool.client_id[:16]}-{next(self.calls.counter)}"
            batch = MapBatch(call_id, address, items)
            state.in_flight[call_id] = batch
        return batch

    def _free_slot(self):
        """The least-loaded worker with room for another batch, or None (called locked)."""
        state = self.state
        slots = self.job.slots(self.router)
        if not slots:
            if not self.router.warming() and not state.in_flight:
                raise self.router.unavailable(self.job.target, self.job.backend, self.job.fallback, self.job.worker)
            return None
        free = [s for s in slots if state.per_worker[s[0].address] < DEPTH]
        if not free:
            return None
        busy = self.router.busy
        return min(free, key=lambda s: (state.per_worker[s[0].address],
                                        busy(s[0].address, s[1]) / max(s[2], 1), random.random()))

    def batch_size(self) -> int:
        """Items in the next batch (called locked): about TARGET_BATCH_S of worker time,
        and no more than the items left spread over the workers."""
        state = self.state
        if self.fixed_batch:
            return self.fixed_batch
        size = FIRST_BATCH if state.per_item_s is None else int(TARGET_BATCH_S / max(state.per_item_s, 1e-7))
        if state.stats.total is not None:  # the tail spreads over every worker
            left = state.stats.total - state.stats.pulled + len(state.retry)
            size = min(size, math.ceil(left / max(len(self.job.slots(self.router)), 1)))
        return max(1, min(size, MAX_BATCH))

    def _backlog(self) -> int:
        """Batches' worth of items not yet sent (called locked): the demand autoscaling
        sees (see ControlPlane.set_demand). An iterable of unknown length not yet exhausted
        wants at least one more worker's worth."""
        state = self.state
        waiting = len(state.retry)
        if state.stats.total is not None:
            waiting += state.stats.total - state.stats.pulled
        elif not state.exhausted:
            waiting += DEPTH * self.batch_size()
        return math.ceil(waiting / max(self.batch_size(), 1))

    def _pull(self, n: int) -> list[MapItem]:
        """Up to ``n`` items from the iterable, packed; an item that cannot be (a wrong
        number of arguments, a value that cannot travel) gets its error as its result."""
        state = self.state
        items = []
        for _ in range(n):
            try:
                element = next(self._items)
            except StopIteration:
                with state.cond:
                    state.exhausted = True
                break
            with state.cond:
                index = state.stats.pulled
                state.stats.pulled += 1
            try:
                items.append(MapItem(index, self.job.pack(element)))
            except Exception as e:  # noqa: BLE001 - this item's error, named by its index
                state.finish(index, False, item_error(e, index))
        return items

    def _sender_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._senders is None:
            n = max(2, min(32, DEPTH * max(len(self.job.slots(self.router)), 1)))
            self._senders = concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix=f"kaas-map-{self.map_id}")
        return self._senders
