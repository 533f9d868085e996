"""Moving values between notebook and worker.

A plain NumPy array goes as its dtype, its shape and its bytes; a NumPy scalar as its
dtype and bytes; a handle as its buffer's id. Plain pickle (protocol 5, arrays out of band,
never copied) carries what it can, in the form Dask's "pickle" serialiser reads; Dask's
serialisers (cloudpickle, its "dask" family) the rest. Serialising each value eagerly lets
us refuse, by name, a value that cannot travel before anything runs, and count the bytes
moved.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
from typing import Any, Iterator

import numpy as np

from .handles import DeviceHandle, HandleRef

_PICKLE_LOGGER = logging.getLogger("distributed.protocol.pickle")


# One value serialised: ``(header, frames)``. A plain tuple, because the link pickles its
# messages and pickle writes tuples, dicts and PickleBuffers natively; a class of our own
# cost a Python-level __reduce__ per value. Frames that are PickleBuffers travel out of
# band (an array is never copied into the message) and arrive as writable buffers.
Packed = tuple


def nbytes(packed: Packed) -> int:
    return sum(len(f) if type(f) in (bytes, bytearray) else memoryview(f).nbytes for f in packed[1])


@contextlib.contextmanager
def _quiet_pickle_errors() -> Iterator[None]:
    # Dask logs a full traceback at ERROR for every value that fails to pickle; we
    # report the failure ourselves, by name, so that log is only noise in a notebook.
    previous = _PICKLE_LOGGER.disabled
    _PICKLE_LOGGER.disabled = True
    try:
        yield
    finally:
        _PICKLE_LOGGER.disabled = previous


def dumps(value: Any) -> Packed:
    """``value`` ready to travel. Raises on unsendable values."""
    kind = type(value)
    if kind is np.ndarray and value.dtype.kind in _RAW_KINDS and value.flags.c_contiguous:
        # Its bytes as a flat uint8 view: no copy, and any shape (0-d and empty too).
        return ({"serializer": "kaas-array", "dtype": value.dtype.str, "shape": value.shape},
                [pickle.PickleBuffer(value.reshape(-1).view(np.uint8))])
    if kind in _NUMPY_SCALARS:
        return {"serializer": "kaas-scalar", "dtype": value.dtype.str}, [value.tobytes()]
    if kind is DeviceHandle or kind is HandleRef:  # a handle travels as the id of its buffer
        return {"serializer": "kaas-handle", "id": value.id}, []
    fast = _plain_pickle(value)
    if fast is not None:
        return fast
    from distributed.protocol import serialize

    with _quiet_pickle_errors():
        header, frames = serialize(value, serializers=("dask", "pickle"), on_error="raise")
    return header, [f if type(f) is bytes else pickle.PickleBuffer(f) for f in frames]


# dtypes that their ``.str`` names exactly (no fields, no objects): the common arrays.
_RAW_KINDS = frozenset("biufcmM?")
_NUMPY_SCALARS = frozenset(np.dtype(c).type for c in "?bBhHiIlLqQefdgFDG")


def _plain_pickle(value: Any) -> Packed | None:
    """Most values (scalars, handles, NumPy arrays and tuples of them) need only plain pickle
    with arrays out of band, in the form Dask's "pickle" serialiser reads. Going straight to
    it skips Dask's dispatch on both ends. None when Dask must decide: something pickle
    refuses, or something defined in ``__main__`` (cloudpickle sends it by value)."""
    buffers: list = []
    try:
        head = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    except Exception:
        return None
    if b"__main__" in head:
        return None
    return {"serializer": "pickle", "writeable": tuple(not b.raw().readonly for b in buffers)}, [head, *buffers]


def loads(packed: Packed, read_only_ok: bool = False) -> Any:
    """The value ``packed`` holds. An array is a view of the received bytes (which are the
    receiver's own) where they are writable; read-only bytes (memory sent back by
    reference, see shared_frames) are copied unless ``read_only_ok``: the consumer only
    reads the array during the call."""
    header, frames = packed
    serializer = header.get("serializer")
    if serializer == "kaas-array":
        array = np.frombuffer(frames[0], header["dtype"]).reshape(header["shape"])
        return array if array.flags.writeable or read_only_ok else array.copy()
    if serializer == "kaas-scalar":
        return np.frombuffer(frames[0], header["dtype"])[0]
    if serializer == "kaas-handle":
        return HandleRef(header["id"])
    if serializer == "pickle" and all(header["writeable"]) and all(
            not memoryview(f).readonly for f in frames[1:]):
        # What Dask's "pickle" deserialiser does when no buffer needs its flag changed.
        return pickle.loads(frames[0], buffers=frames[1:])
    from distributed.protocol import deserialize

    return deserialize(header, [f.raw() if isinstance(f, pickle.PickleBuffer) else f for f in frames])
