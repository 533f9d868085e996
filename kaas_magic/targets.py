"""The five targets a user names, and which backend serves each by default."""

from __future__ import annotations

from dataclasses import dataclass

TARGETS: dict[str, str] = {
    # target: what it means to a user
    "gpu": "CUDA GPU through CuPy",
    "tpu": "TPU or other XLA accelerator through JAX",
    "fpga": "FPGA or other OpenCL accelerator device through PyOpenCL",
    "qpu": "quantum processor through Qiskit (Aer simulator by default)",
    "cpu": "the worker's CPU through NumPy",
}

DEFAULT_BACKEND: dict[str, str] = {
    "gpu": "cupy",
    "tpu": "jax",
    "fpga": "opencl",
    "qpu": "qiskit",
    "cpu": "numpy",
}

BACKENDS: tuple[str, ...] = ("numpy", "cupy", "jax", "opencl", "qiskit")

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
    if backend is not None and backend not in BACKENDS:
        from .errors import KaasUsageError

        raise KaasUsageError(
            f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}"
        )
    return backend
