"""What the parts of one map share (see fanout): its items and batches, its stats, and its
progress, all under one lock, so that the dispatcher, the sender threads and the caller
see one consistent picture."""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import KaasUsageError


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


@dataclass
class MapItem:
    index: int
    inputs: dict  # name -> serial.Packed
    attempts: int = 0


@dataclass
class MapBatch:
    call_id: str
    address: str
    items: list[MapItem]


class MapState:
    """One map's shared progress. Every field is read and written holding ``cond``
    (methods named ``..._locked`` expect it held); waiters wake on ``cond.notify_all()``."""

    def __init__(self, stats: MapStats):
        self.cond = threading.Condition()
        self.stats = stats
        self.results: dict[int, tuple[bool, Any]] = {}  # index -> (ok, value), not yet handed back
        self.done_order: collections.deque[int] = collections.deque()  # indexes, as they completed
        self.retry: collections.deque[MapItem] = collections.deque()  # items to send again
        self.next_yield = 0  # the index an ordered map hands back next
        self.yielded = 0  # results handed back
        self.exhausted = False  # nothing more is taken from the iterable
        self.failure: BaseException | None = None  # the dispatcher's own, for the caller
        self.cancelled = False
        self.in_flight: dict[str, MapBatch] = {}  # call_id -> batch
        self.per_worker: collections.Counter[str] = collections.Counter()  # batches in flight
        self.per_item_s: float | None = None  # measured worker time per item (moving average)

    def unclaimed_locked(self) -> int:
        """Items taken from the iterable and not yet handed back: max_in_flight bounds it."""
        return self.stats.pulled - self.yielded

    def batch_ended_locked(self, batch: MapBatch) -> None:
        """``batch`` is no longer in flight on its worker."""
        self.in_flight.pop(batch.call_id, None)
        self.per_worker[batch.address] -= 1

    def finish(self, index: int, ok: bool, value: Any) -> None:
        with self.cond:
            self.finish_locked(index, ok, value)
            self.cond.notify_all()

    def finish_locked(self, index: int, ok: bool, value: Any, not_run: bool = False) -> None:
        """Item ``index`` has its result (``ok``: a value, else its error)."""
        self.results[index] = (ok, value)
        self.done_order.append(index)
        self.stats.items += 1
        if not ok:
            self.stats.errors += 1
            self.stats.not_run += int(not_run)


def indexed(error: BaseException, index: int, copy: bool = False) -> BaseException:
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


def item_error(error: BaseException, index: int) -> BaseException:
    """An item that could not be sent: its error, its message naming the item."""
    try:
        named = type(error)(f"item {index}: {error}")
    except Exception:  # noqa: BLE001 - a constructor that takes other arguments
        named = KaasUsageError(f"item {index}: {type(error).__name__}: {error}")
    named.__cause__ = error
    return indexed(named, index)
