"""The worker's side of data kept on a device between calls (see handles): the buffers
each client kept on this worker, by id, least recently used first, within a byte budget
per device."""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Any, Callable

from .errors import StaleHandleError


@dataclass
class Kept:
    value: Any
    device_id: str  # the device (warm context) whose memory holds it
    nbytes: int


class BufferStore:
    """Buffers kept for clients on one worker, least recently used first.

    Each device has a byte budget; storing past it evicts that device's least recently
    used buffers. Ids of buffers that went away are remembered for a while, so that using
    their handle says why.
    """

    def __init__(self, budget: Callable[[str], int]):
        self._budget = budget  # device_id -> bytes allowed
        self._buffers: collections.OrderedDict[tuple[str, str], Kept] = collections.OrderedDict()
        self._gone: collections.OrderedDict[tuple[str, str], str] = collections.OrderedDict()
        self._lock = threading.Lock()

    def put(self, client: str, id: str, value: Any, device_id: str) -> None:
        kept = Kept(value, device_id, int(getattr(value, "nbytes", 0)))
        with self._lock:
            self._buffers[(client, id)] = kept
            self._evict_over_budget(device_id, keep=(client, id))

    def get(self, client: str, id: str) -> Kept:
        with self._lock:
            kept = self._buffers.get((client, id))
            if kept is not None:
                self._buffers.move_to_end((client, id))
                return kept
            why = self._gone.get((client, id), "this worker never had it (the worker may have restarted)")
        raise StaleHandleError(f"kept buffer {id} is not available: {why}")

    def free(self, client: str, ids) -> int:
        freed = 0
        with self._lock:
            for id in ids:
                if self._buffers.pop((client, id), None) is not None:
                    freed += 1
                    self._forget((client, id), "it was freed")
        return freed

    def free_client(self, client: str) -> int:
        with self._lock:
            keys = [k for k in self._buffers if k[0] == client]
            for key in keys:
                del self._buffers[key]
                self._forget(key, "its client closed the pool")
            return len(keys)

    def bytes_on(self, device_id: str) -> int:
        with self._lock:
            return sum(k.nbytes for k in self._buffers.values() if k.device_id == device_id)

    def count(self) -> int:
        return len(self._buffers)

    def _evict_over_budget(self, device_id: str, keep: tuple[str, str]) -> None:
        budget = self._budget(device_id)
        used = sum(k.nbytes for k in self._buffers.values() if k.device_id == device_id)
        for key in list(self._buffers):
            if used <= budget:
                break
            kept = self._buffers[key]
            if kept.device_id != device_id or key == keep:
                continue
            del self._buffers[key]
            used -= kept.nbytes
            self._forget(key, f"it was evicted under memory pressure (least recently used; "
                              f"this device keeps at most {budget:,} bytes, kaas.keep.max-bytes)")

    def _forget(self, key: tuple[str, str], why: str) -> None:
        self._gone[key] = why
        while len(self._gone) > 10_000:
            self._gone.popitem(last=False)
