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
