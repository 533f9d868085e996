"""The five targets a user names, and which backend serves each by default.

The backends themselves (their names, what each serves, which is a target's default) are
declared by each backend and listed by :mod:`kaas_magic.backends.registry`; the tables here
read it when first used, so importing this module imports no backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

TARGETS: dict[str, str] = {
    # target: what it means to a user
    "gpu": "CUDA GPU through CuPy",
    "tpu": "TPU or other XLA accelerator through JAX",
    "fpga": "FPGA or other OpenCL accelerator device through PyOpenCL",
    "qpu": "quantum processor through Qiskit (Aer simulator by default)",
    "cpu": "the worker's CPU through NumPy",
}


def __getattr__(name: str):
    # DEFAULT_BACKEND (target -> its default backend) and BACKENDS (every installed
    # backend's name), made on first use: the registry module is imported only then.
    if name in ("DEFAULT_BACKEND", "BACKENDS"):
        from .backends import registry

        value = registry.DEFAULT_BACKEND if name == "DEFAULT_BACKEND" else registry.Names()
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


DEFAULT_BACKEND: Mapping[str, str]
BACKENDS: Sequence[str]

# What a Service's kind means:
#   device     - the real thing (a CUDA GPU for gpu, a TPU for tpu, the CPU for cpu ...)
#   simulator  - a faithful software model of the device (Aer for qpu); used without --fallback
#   fallback   - a CPU stand-in that runs the same code; used only when fallback is allowed
KINDS = ("device", "simulator", "fallback")
# Preference when several serve a target: a real device, then a simulator, then a stand-in.
KIND_ORDER = {kind: rank for rank, kind in enumerate(KINDS)}

RESOURCE_PREFIX = "kaas/"
READY_RESOURCE = "kaas/ready"


@dataclass(frozen=True)
class Service:
    """One (target, backend, device) a worker serves. Advertised as a Dask worker resource."""

    target: str
    backend: str
    kind: str
    index: int = 0

    @property
    def resource(self) -> str:
        return f"{RESOURCE_PREFIX}{self.target}/{self.backend}/{self.kind}/{self.index}"

    @classmethod
    def from_resource(cls, name: str) -> Service | None:
        if not name.startswith(RESOURCE_PREFIX):
            return None
        parts = name[len(RESOURCE_PREFIX):].split("/")
        if len(parts) != 4 or parts[0] not in TARGETS or parts[2] not in KINDS:
            return None
        return cls(parts[0], parts[1], parts[2], int(parts[3]))

    def label(self) -> str:
        extra = "" if self.kind == "device" else f" ({self.kind})"
        return f"{self.target}:{self.backend}{extra}"


def check_target(target: str) -> str:
    if target not in TARGETS:
        from .errors import KaasUsageError

        raise KaasUsageError(
            f"unknown target {target!r}; valid targets: {', '.join(TARGETS)}"
        )
    return target


def check_backend(backend: str | None) -> str | None:
    if backend is None:
        return backend
    from .backends import registry

    if backend not in registry.Names():
        from .errors import KaasUsageError

        raise KaasUsageError(
            f"unknown backend {backend!r}; valid backends: {', '.join(registry.names())}"
        )
    return backend
