"""Moving values between notebook and worker with Dask's serialisers.

NumPy arrays travel as zero-copy frames ("dask" family); anything else through
pickle/cloudpickle. Serialising eagerly lets us refuse, by name, a value that cannot travel
before anything runs, and count the bytes moved.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

_PICKLE_LOGGER = logging.getLogger("distributed.protocol.pickle")


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


def dumps(value: Any):
    """A ``Serialized`` ready to put in a comm message. Raises on unsendable values."""
    from distributed.protocol import Serialized, serialize

    with _quiet_pickle_errors():
        header, frames = serialize(value, serializers=("dask", "pickle"), on_error="raise")
    return Serialized(header, frames)


def loads(serialized) -> Any:
    from distributed.protocol import deserialize

    return deserialize(serialized.header, serialized.frames)


def nbytes(serialized) -> int:
    return sum(memoryview(f).nbytes for f in serialized.frames)
