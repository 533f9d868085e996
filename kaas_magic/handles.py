"""Data that stays on a device between calls.

``keep=True`` (``--keep``) leaves a call's array results on the worker that made them and
gives the notebook a :class:`DeviceHandle` for each. A later call that takes the handle as
an input goes to that worker and uses the device buffer in place, with no copy;
``handle.get()`` (or ``numpy.asarray(handle)``) brings the data home. A handle that the
notebook drops frees its buffer, and a worker under memory pressure drops its least
recently used buffers first. A call of another backend on the same physical device (a JAX
cell on a NumPy handle) gets the buffer converted on the worker through DLPack, said in its
run record (see worker.convert).

On the wire a handle is only a :class:`HandleRef` (its id); the worker looks the id up in
its buffer store (see buffer_store), which is kept per client so no client sees another's
buffers.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Any, Iterator

from .buffer_store import BufferStore, Kept  # noqa: F401 (re-exported: the worker's side)
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

    def owned_by(self, pool) -> bool:
        """Whether ``pool`` made this handle (true even once that pool is closed)."""
        return self._pool() is pool

    def pool(self):
        """The pool that made this handle; StaleHandleError once it is closed or gone."""
        pool = self._pool()
        if pool is None or pool.closed:
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
                pool.release(self.worker, self.id)

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
