"""The naive baseline: a fresh Python process per task running the task's child program,
with every disk cache in a fresh empty folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from .tasks import N, SHOTS, Task, kernel_source

SUFFIX = {"cuda": ".cu", "opencl": ".cl", "jax": ".py", "qiskit": ".qasm"}


@dataclass
class NaiveRun:
    seconds: float  # the whole process, as the caller waits for it
    phases: dict[str, float]
    device: str
    kind: str

    @property
    def process(self) -> float:
        """Interpreter start-up and exit: what the child's own clock does not see."""
        return max(0.0, self.seconds - sum(self.phases.values()))


def cold_env(folder: str) -> dict[str, str]:
    """The environment of a naive child: every framework's disk cache in a fresh empty
    folder (PoCL, PyOpenCL and anything under XDG_CACHE_HOME, CuPy), JAX's persistent
    cache off."""
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.update(
        XDG_CACHE_HOME=folder,
        POCL_CACHE_DIR=os.path.join(folder, "pocl"),
        CUPY_CACHE_DIR=os.path.join(folder, "cupy"),
        JAX_ENABLE_COMPILATION_CACHE="false",
        XLA_PYTHON_CLIENT_PREALLOCATE="false",
    )
    return env


def child_command(task: Task, folder: str) -> list[str]:
    """The command line of the task's naive child, its kernel's source written into
    ``folder`` as the file the child reads."""
    command = [sys.executable, str(task.child_path), "--n", str(N), "--shots", str(SHOTS)]
    if task.kernel is not None:
        path = os.path.join(folder, task.kernel + SUFFIX[task.language])
        with open(path, "w") as f:
            f.write(kernel_source(task.kernel, task.language))
        command += ["--source", path]
    return command


def run_naive(task: Task) -> NaiveRun:
    """One naive run of ``task``: its child in a fresh process, timed from outside."""
    with tempfile.TemporaryDirectory(prefix="kaas-naive-") as folder:
        command = child_command(task, folder)
        started = time.perf_counter()
        proc = subprocess.run(command, env=cold_env(folder), cwd=folder, capture_output=True, text=True, timeout=600)
        seconds = time.perf_counter() - started
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"naive {task.target} task failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    report = json.loads(lines[-1])
    if not report["ok"]:
        raise RuntimeError(f"naive {task.target} task gave a wrong result on {report['device']}")
    return NaiveRun(seconds, report["phases"], report["device"], report["kind"])
