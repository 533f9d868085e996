"""A map's results on the caller's side: the iterator ``Pool.map`` returns, handing them
back lazily, in order (out-of-order ones held until their turn) or as they complete."""

from __future__ import annotations

from typing import Any, Callable

from .map_state import MapState, MapStats


class MapIterator:
    """What ``Pool.map`` returns: an iterator over the results (lazily), with ``stats``.
    Dropping it, or :meth:`close`, cancels what has not run."""

    def __init__(self, run):
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


class MapResults:
    """Hands back a map's results one at a time. ``end()`` is called (locked) when there
    are no more; ``cancel(wait)`` when an error is raised to the caller (the rest is not run)."""

    def __init__(self, state: MapState, *, ordered: bool, return_exceptions: bool, end: Callable[[], None],
                 cancel: Callable[[bool], None]):
        self.state = state
        self.ordered = ordered
        self.return_exceptions = return_exceptions
        self._end = end
        self._cancel = cancel

    def next(self) -> Any:
        state = self.state
        with state.cond:
            index = self._wait_for_next_locked()
            ok, value = state.results.pop(index)
            state.next_yield += 1 if self.ordered else 0
            state.yielded += 1
            state.cond.notify_all()  # room for more items
        if not ok and not self.return_exceptions:
            self._cancel(True)
            raise value
        return value

    def _wait_for_next_locked(self) -> int:
        """The index of the result to hand back next, waiting for it (called locked).
        StopIteration when there are no more; the dispatcher's failure, once nothing is
        left in flight."""
        state = self.state
        while True:
            if self.ordered:
                if state.next_yield in state.results:
                    return state.next_yield
            elif state.done_order:
                index = state.done_order.popleft()
                if index not in state.results:  # taken already
                    continue
                return index
            if state.exhausted and state.yielded >= state.stats.pulled:
                self._end()
                raise StopIteration
            if state.cancelled:
                self._end()
                raise StopIteration
            if state.failure is not None and not state.in_flight:
                failure, state.failure = state.failure, None
                state.exhausted = True
                state.cancelled = True
                self._end()
                raise failure
            state.cond.wait(0.25)
