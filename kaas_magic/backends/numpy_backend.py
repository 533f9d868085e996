"""NumPy on the worker's CPU: the ``cpu`` target, and the stand-in for ``gpu``."""

from __future__ import annotations

from typing import Any

from ..targets import Service
from .base import Backend, Offer, Session, cpu_name


class NumpySession(Session):
    physical_device = "cpu"  # NumPy runs on the host CPU, for cpu and as gpu's stand-in

    def warm_up(self) -> None:
        import numpy

        numpy.arange(16).sum()

    def namespace(self) -> dict[str, Any]:
        import numpy

        return {"xp": numpy, "device": self.device}

    def is_own_array(self, value: Any) -> bool:
        import numpy

        return isinstance(value, numpy.ndarray)

    def from_dlpack(self, value: Any) -> Any:
        import numpy

        return numpy.from_dlpack(value)  # a view of a JAX buffer: read-only (JAX arrays are immutable)

    def device_copy(self, value: Any) -> Any:
        return aligned_copy(value)

    def data_pointer(self, value: Any) -> int | None:
        import numpy

        return value.__array_interface__["data"][0] if isinstance(value, numpy.ndarray) else None


def aligned_copy(value: Any, alignment: int = 64) -> Any:
    """A C-contiguous copy of NumPy array ``value`` whose data is ``alignment``-byte aligned:
    what XLA:CPU shares through DLPack (NumPy's own allocations are only 16-byte aligned)."""
    import numpy

    raw = numpy.empty(value.nbytes + alignment, numpy.uint8)
    start = -raw.__array_interface__["data"][0] % alignment
    out = raw[start:start + value.nbytes].view(value.dtype).reshape(value.shape)
    numpy.copyto(out, value)
    return out


class NumpyBackend(Backend):
    name = "numpy"
    session_class = NumpySession
    targets = {"cpu": ("device",), "gpu": ("fallback",)}
    default_for = ("cpu",)
    injected = ("xp", "device")

    def discover(self) -> list[Offer]:
        cpu = cpu_name()
        return [
            Offer(Service("cpu", "numpy", "device"), f"{cpu}, NumPy"),
            Offer(
                Service("gpu", "numpy", "fallback"),
                f"CPU stand-in for gpu: NumPy on {cpu}",
            ),
        ]


BACKEND = NumpyBackend
