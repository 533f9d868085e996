"""Many calls at once: ``Pool.map`` (``kaas.map``).

A map sends its items in **batches**, one "batch" request (see protocol) per batch: the
worker runs the items in a tight loop as ONE call (one device turn, one timeout), so the
per-item cost falls well below a single call's. Every device that can serve the call is
kept busy: each worker has up to ``DEPTH`` batches in flight (so its device never idles
between two), each sent on its own direct link from a small thread pool (the call path is
synchronous per link: see CallPath.exchange), and each new batch goes to the least-loaded
worker (the router's view of the load, plus this client's own calls in flight).

Batch sizes adapt: the first are small, then each aims at about ``TARGET_BATCH_S`` of
worker time, from the per-item time the replies measure, and no more than the items left
spread over the workers (so the tail spreads). At most ``max_in_flight`` items are pulled
from the iterable and not yet handed to the caller (memory stays bounded on an endless
iterable). Results come lazily: in order (out-of-order ones held until their turn), or as
they complete.

The parts, a module each: map_job (what runs, where), map_state (what the parts share,
under one lock), map_dispatch (slots, batch sizes, backlog), map_replies (one batch's
request and each item's outcome) and map_results (the iterator). Here: ``start_map``, and
the run that ties the parts together.
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any, Iterable

from .. import config as kaas_config
from ..errors import KaasUsageError
from ..stopping import check_call_options
from .map_dispatch import MAX_BATCH, MapDispatcher
from .map_job import MapJob
from .map_replies import BatchSender
from .map_results import MapIterator, MapResults
from .map_state import MapBatch, MapState, MapStats

_DEFAULT_MAX_IN_FLIGHT = 4096

__all__ = ["MapIterator", "MapStats", "start_map"]


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
    if batch_size is not None and (type(batch_size) is not int or not 1 <= batch_size <= MAX_BATCH):
        raise KaasUsageError(f"batch_size must be a whole number from 1 to {MAX_BATCH}, not {batch_size!r}")
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
    """One map: what it runs, the state its parts share, and those parts (the dispatcher,
    the batches' sender, the results handed back), started and stopped together."""

    def __init__(self, pool, fn_or_code: str, iterable: Iterable, *, ordered, return_exceptions, batch_size,
                 max_in_flight, target, backend, fallback, worker, timeout, retries):
        self.control = pool._control
        self.view = None
        self.stats = MapStats()
        try:
            self.stats.total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            pass
        items = iter(iterable)
        self.job = MapJob(pool, fn_or_code, target, backend, fallback, worker)
        self.what = self.job.what
        self.state = MapState(self.stats)
        self._map_id = hashlib.blake2b(f"{id(self)}{time.time()}".encode(), digest_size=4).hexdigest()
        sender = BatchSender(pool, self.job, self.state, timeout=timeout, retries=retries, map_id=self._map_id)
        self.dispatcher = MapDispatcher(pool, self.job, self.state, items, batch_size=batch_size,
                                        max_in_flight=max_in_flight, retries=retries, map_id=self._map_id,
                                        send=sender.send)
        self.results = MapResults(self.state, ordered=ordered, return_exceptions=return_exceptions,
                                  end=self._end, cancel=self.cancel)

    def start(self) -> None:
        if self.view is not None:
            self.view.start()
        self.dispatcher.start()

    def next(self) -> Any:
        return self.results.next()

    def _end(self) -> None:
        """No more results (called locked): the senders and the view go."""
        if self.stats.ended is None:
            self.stats.ended = time.perf_counter()
            self.dispatcher.shutdown_senders()
            if self.view is not None:
                self.view.close()

    def cancel(self, wait: bool) -> None:
        """Send nothing more; ask the workers to stop the batches in flight (through the
        control plane, as an interrupted call is); with ``wait``, give them a few seconds
        to answer, so that ``stats`` is final."""
        state = self.state
        with state.cond:
            if state.cancelled and not state.in_flight:
                self._end()
                return
            state.cancelled = True
            state.exhausted = True
            batches = list(state.in_flight.values())
            state.retry.clear()
            state.cond.notify_all()
        for batch in batches:
            threading.Thread(target=self._cancel_one, args=(batch,), daemon=True).start()
        if wait:
            deadline = time.monotonic() + 5
            with state.cond:
                while state.in_flight and time.monotonic() < deadline:
                    state.cond.wait(0.1)
        with state.cond:
            self._end()

    def _cancel_one(self, batch: MapBatch) -> None:
        try:
            self.control.cancel(batch.address, batch.call_id)
        except Exception:  # noqa: BLE001 - gone, or done already
            pass

    def snapshot(self) -> tuple[int, int | None, float, dict[str, int], bool]:
        """(done, total, rate, per-device items, ended) for the progress view."""
        with self.state.cond:
            s = self.stats
            return s.items, s.total, s.rate, dict(s.per_device), s.ended is not None
