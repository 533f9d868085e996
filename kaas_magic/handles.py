"""Data that stays on a device between calls.

``keep=True`` (``--keep``) leaves a call's array results on the worker that made them and
gives the notebook a :class:`DeviceHandle` for each. A later call that takes the handle as
an input goes to that worker and uses the device buffer in place, with no copy;
``handle.get()`` (or ``numpy.asarray(handle)``) brings the data home. A handle that the
notebook drops frees its buffer, and a worker under memory pressure drops its least
recently used buffers first.

On the wire a handle is only a :class:`HandleRef` (its id); the worker looks the id up in
its :class:`BufferStore`, which is kept per client so no client sees another's buffers.
"""

from __future__ import annotations

import collections
import functools
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from .errors import StaleHandleError

@dataclass(frozen=True)
class HandleRef:
    """What a handle is on the wire: the id of a buffer in a worker's store."""

    id: str

    def __reduce__(self):  # plainer than a frozen dataclass's default, and quicker to load
        return HandleRef, (self.id,)


class DeviceHandle:
    """An array that lives on a worker's device. Pass it to later calls; ``get()`` it home."""

    __array_priority__ = 0  # numpy: treat as a foreign object, converted via __array__

    def __init__(self, pool, id: str, worker: str, service: str, device: str, meta: dict):
        self._pool = weakref.ref(pool)
        self.id = id
        self.worker = worker
        self.service = service  # resource of the service that made it
        self.device = device
        self.shape = tuple(meta["shape"])
        self.dtype = _dtype(meta["dtype"])
        self.nbytes = int(meta["nbytes"])
        self.array_type = meta.get("type", "")
        self.freed = False

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        size = 1
        for n in self.shape:
            size *= n
        return size

    def pool(self):
        pool = self._pool()
        if pool is None or pool._closed:
            raise StaleHandleError(f"{self!r} belongs to a pool that is closed")
        return pool

    def get(self):
        """Copy the data home as a NumPy array."""
        return self.pool().fetch(self)

    def __array__(self, dtype=None, copy=None):
        value = self.get()
        return value if dtype is None else value.astype(dtype)

    def free(self) -> None:
        """Release the device buffer now (dropping the last reference does the same)."""
        if not self.freed:
            self.freed = True
            pool = self._pool()
            if pool is not None:
                pool._release(self.worker, self.id)

    def __del__(self):
        try:
            self.free()
        except Exception:  # interpreter shutdown: the worker frees it with the client
            pass

    # A handle is a reference: copying it must not duplicate (or double-free) the buffer.
    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (HandleRef, (self.id,))

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        shape = ",".join(str(n) for n in self.shape)
        state = " FREED" if self.freed else ""
        return f"<kaas handle {self.dtype}[{shape}] on {self.device} @ {self.worker}{state}>"


@functools.lru_cache(maxsize=256)
def _dtype(text: str):
    import numpy

    return numpy.dtype(text)


def handles_in(value: Any) -> Iterator[DeviceHandle]:
    """Handles in ``value`` or, one level down, in its list/tuple/dict members."""
    if isinstance(value, DeviceHandle):
        yield value
    elif isinstance(value, (list, tuple)):
        yield from (v for v in value if isinstance(v, DeviceHandle))
    elif isinstance(value, dict):
        yield from (v for v in value.values() if isinstance(v, DeviceHandle))


def is_array(value: Any) -> bool:
    """Worth keeping on the device: an array with at least one dimension."""
    return (
        getattr(value, "ndim", 0) > 0
        and hasattr(value, "dtype")
        and hasattr(value, "nbytes")
        and hasattr(value, "shape")
    )


# --- the worker side ---------------------------------------------------------------------


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
