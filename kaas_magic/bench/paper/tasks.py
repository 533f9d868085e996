"""The paper's fine-grained tasks: for each target, the naive child that runs it in a
fresh process, the library kernel (or cell) the warm pool runs, its inputs and its check."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .children._child import matmul_inputs, mlp_inputs

PAPER_REDUCTION: dict[str, float] = {"gpu": 96.0, "fpga": 68.4, "tpu": 98.6, "qpu": 34.9}
ALL_TARGETS = ("gpu", "fpga", "tpu", "qpu", "cpu")
KIND_LABEL = {"device": "device", "fallback": "FALLBACK", "simulator": "SIMULATOR"}
N = 64  # matrices are N x N float32
SHOTS = 256
CHILDREN = Path(__file__).parent / "children"



@dataclass(frozen=True)
class Task:
    """One fine-grained task, as a naive child runs it and as the pool runs it."""

    target: str
    backend: str
    summary: str
    child: str  # the naive child's program, a file in ``children``
    kernel: str | None  # the library kernel the KaaS side calls (None: ``cell`` instead)
    language: str = ""  # which implementation of ``kernel`` the naive child compiles
    inputs: Callable[[int], tuple] | None = None  # the child's own input maker, called here with N too
    kwargs: dict[str, Any] = field(default_factory=dict)
    cell: str = ""
    fallback: bool = True  # whether a CPU stand-in may serve it

    @property
    def child_path(self) -> Path:
        return CHILDREN / self.child

    @functools.cached_property
    def args(self) -> tuple:
        """The inputs, made once here by the same function the naive child calls."""
        return self.inputs(N) if self.inputs is not None else ()

    def check(self, output: Any) -> bool:
        """Whether the KaaS side's output is right: a broken path must not pass as fast."""
        args = self.args
        if self.target == "qpu":
            return set(output) <= {"00000", "11111"} and sum(output.values()) == SHOTS
        if self.kernel == "mlp_forward":
            x, w1, b1, w2, b2 = args
            return np.allclose(output, np.maximum(x @ w1 + b1, 0) @ w2 + b2, rtol=1e-4, atol=1e-4)
        a, b = args
        return np.allclose(output, a @ b, rtol=1e-4)


TASKS: dict[str, Task] = {
    "gpu": Task("gpu", "cupy", f"{N}x{N} float32 matmul, library kernel (CUDA C)", "gpu_cupy.py",
                "matmul", "cuda", matmul_inputs, fallback=False),
    "fpga": Task("fpga", "opencl", f"{N}x{N} float32 matmul, library kernel (OpenCL C)", "fpga_opencl.py",
                 "matmul", "opencl", matmul_inputs),
    "tpu": Task("tpu", "jax", f"2-layer MLP on {N}x{N} float32, library kernel (JAX jit)", "tpu_jax.py",
                "mlp_forward", "jax", mlp_inputs),
    "qpu": Task("qpu", "qiskit", f"5-qubit GHZ, {SHOTS} shots, library kernel (OpenQASM)", "qpu_qiskit.py",
                "ghz", "qiskit", kwargs={"shots": SHOTS}),
    "cpu": Task("cpu", "numpy", f"{N}x{N} float32 matmul, a NumPy cell", "cpu_numpy.py",
                None, inputs=matmul_inputs, cell="c = a @ b"),
}


@functools.cache
def kernel_source(kernel: str, language: str) -> str:
    """The library kernel's source in ``language``: the file a naive child compiles."""
    from ...kernelspec import load_library

    return next(s.source for s in load_library()[kernel] if s.language == language)
