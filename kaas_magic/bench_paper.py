"""``kaas bench paper``: the seed paper's headline measured on this machine, in one command.

The paper (Kernel-as-a-Service, Middleware '23) reports that against a naive implementation
KaaS cut the completion time of fine-grained tasks by up to 96.0 % (GPU), 68.4 % (FPGA),
98.6 % (TPU) and 34.9 % (QPU). Here each target the pool serves runs one small task two ways:

- **naive**, the paper's baseline: a fresh Python process per task that imports the
  framework, initialises the device, compiles, runs, checks and exits, with every disk
  cache a fresh empty folder so nothing is warm. The child times its own phases; what the
  parent sees beyond them is interpreter start-up and exit.
- **KaaS**: the same task through the warm pool with ``Pool.call`` / ``Pool.run``, as a
  notebook calls it, after one untimed call on each worker (a kernel compiles on its first
  call per shape, as JAX does, or on its first launch, as PoCL does).

Then **sharing**: several clients each send a stream of the same task. Naive, each task
holds the one device exclusively for its fresh process (one lock per device, so tasks
queue); KaaS, the clients share the warm devices. Throughput, latency and how busy the
device was. Stand-ins are named as such: a row on a CPU stand-in says FALLBACK, one on
Aer says SIMULATOR, and a target the machine lacks is skipped, saying so.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .targets import KIND_ORDER

if TYPE_CHECKING:
    from .client import Pool

PAPER_REDUCTION: dict[str, float] = {"gpu": 96.0, "fpga": 68.4, "tpu": 98.6, "qpu": 34.9}
ALL_TARGETS = ("gpu", "fpga", "tpu", "qpu", "cpu")
PHASES = ("import", "init", "compile", "run")
KIND_LABEL = {"device": "device", "fallback": "FALLBACK", "simulator": "SIMULATOR"}
N = 64  # matrices are N x N float32
SHOTS = 256
# KaaS sharing streams last exactly the window of the workers' busy_10s metric, so the
# figure read at the end covers the stream and nothing before it.
SHARE_SECONDS = 10.0


# --- the tasks ------------------------------------------------------------------------

_MATMUL_INPUTS = """
rng = np.random.default_rng(0)
a, b = (rng.random((N, N), dtype=np.float32) for _ in range(2))
ARGS = (a, b)
"""
_MLP_INPUTS = """
rng = np.random.default_rng(0)
ARGS = tuple(rng.random(shape, dtype=np.float32) - 0.5 for shape in ((N, N), (N, N), (N,), (N, N), (N,)))
"""

# Naive children: each phase ends with _phase(name); each defines DEVICE, KIND and OK.
_CHILD_PRELUDE = """
import json, time
_phases, _clock = {}, time.perf_counter()
def _phase(name):
    global _clock
    now = time.perf_counter()
    _phases[name], _clock = now - _clock, now
"""
_CHILD_EPILOGUE = """
print(json.dumps({"phases": _phases, "device": DEVICE, "kind": KIND, "ok": bool(OK)}))
"""

_CHILD_CPU = """
import numpy as np
_phase("import")
{inputs}
DEVICE, KIND = "CPU (NumPy)", "device"
_phase("init")
_phase("compile")
c = a @ b
_phase("run")
OK = np.isclose(c[1, 2], np.dot(a[1].astype(np.float64), b[:, 2]), rtol=1e-4)
"""

_CHILD_OPENCL = """
import numpy as np
import pyopencl as cl
_phase("import")
{inputs}
_devices = [d for p in cl.get_platforms() for d in p.get_devices()]
_fpgas = [d for d in _devices if d.type & (cl.device_type.ACCELERATOR | cl.device_type.CUSTOM)]
dev = (_fpgas or [d for d in _devices if d.type & cl.device_type.CPU])[0]
DEVICE, KIND = f"{{dev.name.strip()}} (OpenCL, {{dev.platform.name.strip()}})", "device" if _fpgas else "fallback"
ctx = cl.Context([dev])
queue = cl.CommandQueue(ctx)
_phase("init")
kernel = cl.Kernel(cl.Program(ctx, SOURCE).build(), "matmul")
_phase("compile")
mf = cl.mem_flags
a_dev = cl.Buffer(ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=a)
b_dev = cl.Buffer(ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=b)
c_dev = cl.Buffer(ctx, mf.WRITE_ONLY, a.nbytes)
kernel(queue, (N, N), (16, 16), a_dev, b_dev, c_dev, np.int32(N), np.int32(N), np.int32(N))
c = np.empty_like(a)
cl.enqueue_copy(queue, c, c_dev)
queue.finish()
_phase("run")
OK = np.allclose(c, a @ b, rtol=1e-4)
"""

_CHILD_CUPY = """
import numpy as np
import cupy
_phase("import")
{inputs}
cupy.cuda.Device(0).use()
cupy.zeros(1)  # creates the CUDA context
cupy.cuda.Device(0).synchronize()
DEVICE, KIND = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode() + " (CUDA device 0)", "device"
_phase("init")
kernel = cupy.RawKernel(SOURCE, "matmul")
kernel.compile()
_phase("compile")
a_dev, b_dev = cupy.asarray(a), cupy.asarray(b)
c_dev = cupy.empty((N, N), dtype=cupy.float32)
kernel((N // 16, N // 16), (16, 16), (a_dev, b_dev, c_dev, np.int32(N), np.int32(N), np.int32(N)))
c = cupy.asnumpy(c_dev)
_phase("run")
OK = np.allclose(c, a @ b, rtol=1e-4)
"""

_CHILD_JAX = """
import numpy as np
import jax
_phase("import")
{inputs}
_accelerators = [d for d in jax.devices() if d.platform != "cpu"]
dev = (_accelerators or jax.devices("cpu"))[0]
DEVICE, KIND = f"{{dev.device_kind}} (JAX/XLA {{dev.platform}})", "device" if _accelerators else "fallback"
_phase("init")
_kernel = {{}}
exec(SOURCE, _kernel)
with jax.default_device(dev):
    compiled = jax.jit(_kernel["mlp_forward"]).lower(*ARGS).compile()
_phase("compile")
out = np.asarray(compiled(*[jax.device_put(v, dev) for v in ARGS]))
_phase("run")
x, w1, b1, w2, b2 = ARGS
OK = np.allclose(out, np.maximum(x @ w1 + b1, 0) @ w2 + b2, rtol=1e-4, atol=1e-4)
"""

_CHILD_QISKIT = """
from qiskit import qasm2, transpile
from qiskit_aer import AerSimulator
_phase("import")
backend = AerSimulator()
DEVICE, KIND = "Aer simulator (qiskit-aer)", "simulator"
_phase("init")
circuit = transpile(qasm2.loads(SOURCE, custom_instructions=qasm2.LEGACY_CUSTOM_INSTRUCTIONS), backend,
                    optimization_level=1)
_phase("compile")
counts = backend.run(circuit, shots=SHOTS).result().get_counts()
_phase("run")
OK = set(counts) <= {{"00000", "11111"}} and sum(counts.values()) == SHOTS
"""


@dataclass(frozen=True)
class Task:
    """One fine-grained task, as a naive child runs it and as the pool runs it."""

    target: str
    backend: str
    summary: str
    child: str  # the naive child's body
    kernel: str | None  # the library kernel the KaaS side calls (None: ``cell`` instead)
    language: str = ""  # which implementation of ``kernel`` the naive child compiles
    inputs: str = ""  # code defining ARGS, run by the child and by this process alike
    kwargs: dict[str, Any] = field(default_factory=dict)
    cell: str = ""
    fallback: bool = True  # whether a CPU stand-in may serve it

    @functools.cached_property
    def args(self) -> tuple:
        """The inputs, made once here by the same code the naive child runs."""
        namespace: dict[str, Any] = {"np": np, "N": N}
        exec(self.inputs, namespace)
        return namespace.get("ARGS", ())

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
    "gpu": Task("gpu", "cupy", f"{N}x{N} float32 matmul, library kernel (CUDA C)", _CHILD_CUPY,
                "matmul", "cuda", _MATMUL_INPUTS, fallback=False),
    "fpga": Task("fpga", "opencl", f"{N}x{N} float32 matmul, library kernel (OpenCL C)", _CHILD_OPENCL,
                 "matmul", "opencl", _MATMUL_INPUTS),
    "tpu": Task("tpu", "jax", f"2-layer MLP on {N}x{N} float32, library kernel (JAX jit)", _CHILD_JAX,
                "mlp_forward", "jax", _MLP_INPUTS),
    "qpu": Task("qpu", "qiskit", f"5-qubit GHZ, {SHOTS} shots, library kernel (OpenQASM)", _CHILD_QISKIT,
                "ghz", "qiskit", kwargs={"shots": SHOTS}),
    "cpu": Task("cpu", "numpy", f"{N}x{N} float32 matmul, a NumPy cell", _CHILD_CPU,
                None, inputs=_MATMUL_INPUTS, cell="c = a @ b"),
}


def child_script(task: Task) -> str:
    """The naive child's whole program: the kernel's source is pasted in, as a script would."""
    from .kernelspec import load_library

    source = ""
    if task.kernel is not None:
        source = next(s.source for s in load_library()[task.kernel] if s.language == task.language)
    constants = f"N, SHOTS, SOURCE = {N}, {SHOTS}, {source!r}\n"
    body = task.child.format(inputs=task.inputs.strip())
    return _CHILD_PRELUDE + constants + body + _CHILD_EPILOGUE


# --- naive: a fresh process per task ----------------------------------------------------

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


def run_naive(script: str, target: str) -> NaiveRun:
    with tempfile.TemporaryDirectory(prefix="kaas-naive-") as folder:
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", script], env=cold_env(folder), cwd=folder,
                              capture_output=True, text=True, timeout=600)
        seconds = time.perf_counter() - started
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"naive {target} task failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    report = json.loads(lines[-1])
    if not report["ok"]:
        raise RuntimeError(f"naive {target} task gave a wrong result on {report['device']}")
    return NaiveRun(seconds, report["phases"], report["device"], report["kind"])


# --- KaaS: the warm pool ---------------------------------------------------------------

def kaas_call(pool: "Pool", task: Task, worker: str | None = None) -> Any:
    """The task through the pool: ``Pool.call`` as a notebook calls it, or with ``worker``
    the same kernel call pinned to one worker (for the untimed warm-up)."""
    sink = io.StringIO()
    args = task.args
    if task.kernel is None:
        inputs = dict(zip("ab", args))
        return pool.run(task.cell, task.target, inputs=inputs, outputs=["c"], backend=task.backend,
                        fallback=task.fallback, worker=worker, stdout=sink).outputs["c"]
    if worker is None:
        return pool.call(task.kernel, *args, target=task.target, backend=task.backend,
                         fallback=task.fallback, **task.kwargs)
    return pool.run(f"__result = kernels.{task.kernel}(*__args, **__kwargs)", task.target,
                    inputs={"__args": args, "__kwargs": task.kwargs}, outputs=["__result"],
                    backend=task.backend, fallback=task.fallback, worker=worker,
                    stdout=sink).outputs["__result"]


def serving(pool: "Pool", task: Task) -> dict[str, str]:
    """Worker address -> the best kind of service it has for the task (none: not served)."""
    found: dict[str, str] = {}
    for route in pool.routes():
        for service in route.services:
            if service.target != task.target or service.backend != task.backend:
                continue
            if service.kind == "fallback" and not task.fallback:
                continue
            if route.address not in found or KIND_ORDER[service.kind] < KIND_ORDER[found[route.address]]:
                found[route.address] = service.kind
    return found


def _checked(task: Task, output: Any) -> None:
    if not task.check(output):
        raise RuntimeError(f"KaaS {task.target} task gave a wrong result: {output!r:.200}")


def _time_kaas(pool: "Pool", task: Task, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        output = kaas_call(pool, task)
        times.append(time.perf_counter() - started)
        _checked(task, output)
    return times


# --- results -----------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def reduction_pct(naive: float, kaas: float) -> float:
    """Completion-time reduction as the paper states it: 1 - KaaS / naive, in percent."""
    return 100.0 * (1.0 - kaas / naive)


@dataclass
class Completion:
    task: Task
    kind: str  # of the device KaaS ran on: device, simulator or fallback
    device: str  # as the run record presents it ("FALLBACK CPU stand-in for fpga: ...")
    naive: list[NaiveRun]
    kaas: list[float]

    @property
    def naive_median(self) -> float:
        return statistics.median(r.seconds for r in self.naive)

    @property
    def kaas_median(self) -> float:
        return statistics.median(self.kaas)

    @property
    def reduction(self) -> float:
        return reduction_pct(self.naive_median, self.kaas_median)

    def breakdown(self) -> dict[str, float]:
        """Median seconds of each naive phase, interpreter start-up and exit first."""
        parts = {"process": statistics.median(r.process for r in self.naive)}
        parts.update({p: statistics.median(r.phases.get(p, 0.0) for r in self.naive) for p in PHASES})
        return parts

    @property
    def naive_device(self) -> str:
        run = self.naive[0]
        return run.device if run.kind == "device" else f"{KIND_LABEL[run.kind]} {run.device}"


@dataclass
class Stream:
    """One way of serving several clients' task streams."""

    latencies: list[float]  # seconds from asking to having the result, one per task
    seconds: float  # from the first request to the last result
    busy: float  # fraction of that time the device was busy

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.seconds


@dataclass
class Sharing:
    task: Task
    kind: str
    clients: int
    naive: Stream
    kaas: Stream


@dataclass
class Results:
    header: list[str]
    completions: list[Completion] = field(default_factory=list)
    sharing: list[Sharing] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # target -> why

    def table(self, markdown: bool = False) -> str:
        return "\n".join(_tables(self, markdown))

    def csv_rows(self) -> list[dict[str, Any]]:
        return _csv_rows(self)


CSV_COLUMNS = [
    "experiment", "target", "backend", "kind", "device", "naive_device", "task", "clients",
    "naive_n", "naive_median_ms", "naive_p95_ms", "kaas_n", "kaas_median_ms", "kaas_p95_ms",
    "reduction_pct", "paper_reduction_pct", "naive_tasks_per_s", "kaas_tasks_per_s",
    "naive_busy_pct", "kaas_busy_pct", "naive_process_ms", "naive_import_ms", "naive_init_ms",
    "naive_compile_ms", "naive_run_ms", "note",
]


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def _csv_rows(results: Results) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for target, why in results.skipped.items():
        rows.append({"experiment": "completion", "target": target, "backend": TASKS[target].backend,
                     "kind": "skipped", "task": TASKS[target].summary,
                     "paper_reduction_pct": PAPER_REDUCTION.get(target, ""), "note": why})
    for c in results.completions:
        parts = c.breakdown()
        rows.append({
            "experiment": "completion", "target": c.task.target, "backend": c.task.backend,
            "kind": KIND_LABEL[c.kind], "device": c.device, "naive_device": c.naive_device,
            "task": c.task.summary, "clients": 1,
            "naive_n": len(c.naive), "naive_median_ms": _ms(c.naive_median),
            "naive_p95_ms": _ms(percentile([r.seconds for r in c.naive], 95)),
            "kaas_n": len(c.kaas), "kaas_median_ms": _ms(c.kaas_median),
            "kaas_p95_ms": _ms(percentile(c.kaas, 95)),
            "reduction_pct": round(c.reduction, 2), "paper_reduction_pct": PAPER_REDUCTION.get(c.task.target, ""),
            **{f"naive_{p}_ms": _ms(v) for p, v in parts.items()},
        })
    for s in results.sharing:
        rows.append({
            "experiment": "sharing", "target": s.task.target, "backend": s.task.backend,
            "kind": KIND_LABEL[s.kind], "task": s.task.summary, "clients": s.clients,
            "naive_n": len(s.naive.latencies), "naive_median_ms": _ms(statistics.median(s.naive.latencies)),
            "naive_p95_ms": _ms(percentile(s.naive.latencies, 95)),
            "kaas_n": len(s.kaas.latencies), "kaas_median_ms": _ms(statistics.median(s.kaas.latencies)),
            "kaas_p95_ms": _ms(percentile(s.kaas.latencies, 95)),
            "reduction_pct": round(reduction_pct(statistics.median(s.naive.latencies),
                                                 statistics.median(s.kaas.latencies)), 2),
            "naive_tasks_per_s": round(s.naive.throughput, 3), "kaas_tasks_per_s": round(s.kaas.throughput, 3),
            "naive_busy_pct": round(100 * s.naive.busy, 1), "kaas_busy_pct": round(100 * s.kaas.busy, 1),
        })
    return rows


def write_csv(results: Results, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(results.csv_rows())
    return path


def _fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def _render(head: list[str], body: list[list[str]], markdown: bool, left: int) -> list[str]:
    """A table: the first ``left`` columns left-aligned, the rest right-aligned."""
    if markdown:
        rule = "|" + "|".join(["---"] * left + ["---:"] * (len(head) - left)) + "|"
        return ["| " + " | ".join(head) + " |", rule] + ["| " + " | ".join(r) + " |" for r in body]
    widths = [max(len(c) for c in col) for col in zip(head, *body)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(head), line(["-" * w for w in widths])] + [line(r) for r in body]


def _tables(results: Results, markdown: bool) -> list[str]:
    lines = ["Completion time of one fine-grained task: naive (fresh process) vs KaaS (warm pool)", ""]
    head = ["target", "runs on", "naive median ms", "naive p95 ms", "KaaS median ms", "KaaS p95 ms",
            "reduction", "paper"]
    body = []
    for c in results.completions:
        paper = PAPER_REDUCTION.get(c.task.target)
        body.append([c.task.target, KIND_LABEL[c.kind], _fmt_ms(c.naive_median),
                     _fmt_ms(percentile([r.seconds for r in c.naive], 95)), _fmt_ms(c.kaas_median),
                     _fmt_ms(percentile(c.kaas, 95)), f"{c.reduction:.1f} %",
                     f"{paper:.1f} %" if paper is not None else "-"])
    for target, why in results.skipped.items():
        body.append([target, "not run", "-", "-", "-", "-", "-", f"{PAPER_REDUCTION[target]:.1f} %"
                     if target in PAPER_REDUCTION else "-"])
    lines += _render(head, body, markdown, 2)
    lines.append("")
    for c in results.completions:
        lines.append(f"{c.task.target}: {c.task.summary}; KaaS on {c.device}; naive on {c.naive_device}")
    for target, why in results.skipped.items():
        lines.append(f"{target}: skipped: {why}")

    lines += ["", "Where the naive time goes (median ms of each phase; process = interpreter start-up and exit)", ""]
    head = ["target", "naive median ms", "process", "import", "device init", "compile", "run"]
    body = []
    for c in results.completions:
        parts = c.breakdown()
        body.append([c.task.target, _fmt_ms(c.naive_median)] + [_fmt_ms(parts[p]) for p in ("process",) + PHASES])
    lines += _render(head, body, markdown, 1)
    if any("Portable Computing Language" in c.naive_device for c in results.completions):
        lines += ["", "PoCL generates a kernel's machine code at its first launch, so on PoCL the naive run "
                      "phase holds code generation too"]

    if results.sharing:
        s0 = results.sharing[0]
        lines += ["", f"Sharing: {s0.clients} clients, each a stream of tasks; naive holds the one device per "
                      f"task (tasks queue), KaaS shares the warm devices", ""]
        head = ["target", "runs on", "naive tasks/s", "KaaS tasks/s", "naive p50 / p95 ms", "KaaS p50 / p95 ms",
                "naive device busy", "KaaS device busy"]
        body = []
        for s in results.sharing:
            body.append([
                s.task.target, KIND_LABEL[s.kind], f"{s.naive.throughput:.2f}", f"{s.kaas.throughput:.1f}",
                f"{_fmt_ms(statistics.median(s.naive.latencies))} / {_fmt_ms(percentile(s.naive.latencies, 95))}",
                f"{_fmt_ms(statistics.median(s.kaas.latencies))} / {_fmt_ms(percentile(s.kaas.latencies, 95))}",
                f"{100 * s.naive.busy:.1f} %", f"{100 * s.kaas.busy:.1f} %",
            ])
        lines += _render(head, body, markdown, 2)
        lines += ["", "device busy: naive, the share of the time the device ran a task's kernel (its run phase); "
                      "KaaS, the share of the last 10 s in which a call ran on the device (pool.metrics busy_10s, "
                      "mean over the workers' devices)"]
    return lines


def plot(results: Results, path: str | Path) -> Path:
    """Two panels: the reduction beside the paper's, and sharing throughput (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)  # no pyplot: a notebook's own backend is left alone
    left, right = fig.subplots(1, 2)

    measured = {c.task.target: c for c in results.completions}
    targets = [t for t in ALL_TARGETS if t in measured or t in results.skipped]
    xs = np.arange(len(targets))
    paper = [PAPER_REDUCTION.get(t, np.nan) for t in targets]
    ours = [measured[t].reduction if t in measured else np.nan for t in targets]
    left.bar(xs - 0.2, paper, 0.4, color="#9ca3af")
    bars = left.bar(xs + 0.2, ours, 0.4, color="#2563eb")
    for bar, t in zip(bars, targets):
        if t in measured and measured[t].kind != "device":
            bar.set_hatch("//")
            bar.set_edgecolor("white")
    for x, value in zip(xs, ours):
        if not np.isnan(value):
            left.annotate(f"{value:.1f}", (x + 0.2, max(value, 0)), ha="center", va="bottom", fontsize=8)
    for x, value in zip(xs, paper):
        if not np.isnan(value):
            left.annotate(f"{value:.1f}", (x - 0.2, value), ha="center", va="bottom", fontsize=8)
    left.set_xticks(xs, [_tick(t, measured, results.skipped) for t in targets], fontsize=8)
    left.set_ylabel("completion-time reduction vs naive (%)")
    lowest = float(np.nanmin([*ours, 0.0]))  # KaaS slower than naive shows below zero
    left.set_ylim(lowest - 10 if lowest < 0 else 0, 135)
    left.set_yticks([t for t in range(-100, 101, 20) if t >= min(lowest - 10, 0)])
    left.set_title("One fine-grained task: naive (fresh process) vs KaaS (warm)", fontsize=10)
    left.legend(handles=[Patch(color="#9ca3af", label="paper (Middleware '23)"),
                         Patch(color="#2563eb", label="this run, on the device"),
                         Patch(facecolor="#2563eb", edgecolor="white", hatch="//",
                               label="this run, on a stand-in (FALLBACK / SIMULATOR)")],
                loc="upper center", ncols=2, fontsize=7.5)

    if results.sharing:
        names = [s.task.target for s in results.sharing]
        xs = np.arange(len(names))
        naive = right.bar(xs - 0.2, [s.naive.throughput for s in results.sharing], 0.4,
                          label="naive (exclusive device per task)", color="#f59e0b")
        kaas = right.bar(xs + 0.2, [s.kaas.throughput for s in results.sharing], 0.4,
                         label="KaaS (shared warm devices)", color="#2563eb")
        for group, streams in ((naive, [s.naive for s in results.sharing]), (kaas, [s.kaas for s in results.sharing])):
            for bar, stream in zip(group, streams):
                right.annotate(f"busy {100 * stream.busy:.0f}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                               ha="center", va="bottom", fontsize=7)
        right.set_yscale("log")
        right.set_ylim(top=30 * max(s.kaas.throughput for s in results.sharing))
        right.set_xticks(xs, [_tick(t, measured, {}) for t in names], fontsize=8)
        right.set_ylabel("throughput (tasks/s, log scale)")
        right.set_title(f"Sharing: {results.sharing[0].clients} clients, streams of tasks", fontsize=10)
        right.legend(loc="upper center", ncols=2, fontsize=8)
    else:
        right.set_axis_off()
    fig.suptitle("kaas bench paper: " + results.header[1].removeprefix("machine: "), fontsize=9)
    fig.savefig(path, dpi=110)
    return path


def _tick(target: str, measured: dict[str, Completion], skipped: dict[str, str]) -> str:
    if target in skipped:
        return f"{target}\nnot run here"
    kind = measured[target].kind if target in measured else "device"
    return target if kind == "device" else f"{target}\n{KIND_LABEL[kind]}"


# --- the experiment ----------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    targets: tuple[str, ...] = ALL_TARGETS
    naive_repeats: int = 20
    kaas_repeats: int = 200
    clients: int = 4
    naive_per_client: int = 3  # naive tasks each sharing client sends (each takes seconds)
    command: str = ""

    @classmethod
    def quick(cls, **overrides: Any) -> "Settings":
        return replace(cls(naive_repeats=3, kaas_repeats=30, clients=2, naive_per_client=1), **overrides)


def _versions() -> str:
    from importlib import metadata

    found = []
    for dist in ("numpy", "dask", "distributed", "jax", "jaxlib", "pyopencl", "pocl-binary-distribution",
                 "qiskit", "qiskit-aer", "cupy-cuda12x", "cupy-cuda13x", "cupy"):
        try:
            found.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return f"python {platform.python_version()}, " + ", ".join(found)


def header(settings: Settings, gpu: str) -> list[str]:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    command = settings.command or shlex.join(getattr(sys, "orig_argv", sys.argv))
    return [
        f"command: {command}",
        f"machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), {memory:.0f} GiB, "
        f"{platform.system()} {platform.release()}, {gpu}; load average {os.getloadavg()[0]:.1f} at the start",
        _versions(),
        f"naive: {settings.naive_repeats} fresh `python -c` processes per target, one at a time, disk caches in a "
        f"fresh empty folder each (XDG_CACHE_HOME, POCL_CACHE_DIR, CUPY_CACHE_DIR), JAX's persistent cache off",
        f"KaaS: {settings.kaas_repeats} calls per target on the warm embedded pool, after one untimed call per "
        f"worker; sharing: {settings.clients} client threads, naive {settings.naive_per_client} task(s) each, "
        f"KaaS {SHARE_SECONDS:.0f} s of back-to-back calls each",
    ]


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _share_naive(script: str, task: Task, settings: Settings) -> Stream:
    device = threading.Lock()  # one device, held by one fresh process at a time
    latencies: list[float] = []
    run_time: list[float] = []
    errors: list[BaseException] = []

    def client() -> None:
        try:
            for _ in range(settings.naive_per_client):
                asked = time.perf_counter()
                with device:
                    run = run_naive(script, task.target)
                latencies.append(time.perf_counter() - asked)
                run_time.append(run.phases["run"])
        except BaseException as e:  # reported after the other clients finish
            errors.append(e)

    started = time.perf_counter()
    _run_threads(client, settings.clients)
    seconds = time.perf_counter() - started
    if errors:
        raise errors[0]
    return Stream(latencies, seconds, sum(run_time) / seconds)


def _share_kaas(pool: "Pool", task: Task, settings: Settings) -> Stream:
    latencies: list[float] = []
    errors: list[BaseException] = []
    started = time.perf_counter()
    deadline = started + SHARE_SECONDS

    def client() -> None:
        try:
            while time.perf_counter() < deadline:
                asked = time.perf_counter()
                output = kaas_call(pool, task)
                latencies.append(time.perf_counter() - asked)
                _checked(task, output)
        except BaseException as e:
            errors.append(e)

    _run_threads(client, settings.clients)
    seconds = time.perf_counter() - started
    if errors:
        raise errors[0]
    prefix = f"kaas/{task.target}/{task.backend}/"
    busy = [row["busy_10s"] for row in pool.metrics() if any(s.startswith(prefix) for s in row["services"])]
    return Stream(latencies, seconds, statistics.fmean(busy) if busy else 0.0)


def _run_threads(work: Callable[[], None], count: int) -> None:
    threads = [threading.Thread(target=work, daemon=True) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def reproduce(settings: Settings = Settings(), pool: "Pool | None" = None) -> Results:
    """Run the whole reproduction; starts (and closes) its own pool unless given one."""
    from .client import Pool

    own = pool is None
    if own:
        _progress("starting the kaas pool (2 workers) ...")
        pool = Pool.start(2)
    try:
        pool.wait_ready(timeout=300)
        wanted = [TASKS[t] for t in ALL_TARGETS if t in settings.targets]
        served = {task.target: serving(pool, task) for task in wanted}
        gpu = "a CUDA GPU" if serving(pool, TASKS["gpu"]) else "no CUDA GPU"
        results = Results(header(settings, gpu))
        for task in wanted:
            if not served[task.target]:
                why = ("no CUDA GPU: the pool serves gpu only through a CPU stand-in, and the paper's figure is "
                       "about a GPU" if task.target == "gpu" else
                       f"the pool does not serve {task.target} with {task.backend}: {', '.join(pool.served())}")
                results.skipped[task.target] = why
                _progress(f"{task.target}: skipped: {why}")
        tasks = [t for t in wanted if served[t.target]]
        scripts = {t.target: child_script(t) for t in tasks}

        # Naive first, while the pool sits idle: the fresh processes have the CPUs to themselves.
        naive: dict[str, list[NaiveRun]] = {}
        naive_streams: dict[str, Stream] = {}
        for task in tasks:
            _progress(f"{task.target}: {settings.naive_repeats} naive runs ...")
            naive[task.target] = [run_naive(scripts[task.target], task.target) for _ in range(settings.naive_repeats)]
            _progress(f"{task.target}: naive sharing, {settings.clients} clients ...")
            naive_streams[task.target] = _share_naive(scripts[task.target], task, settings)

        for task in tasks:
            _progress(f"{task.target}: {settings.kaas_repeats} KaaS calls ...")
            for worker in sorted(served[task.target]):
                _checked(task, kaas_call(pool, task, worker))
            times = _time_kaas(pool, task, settings.kaas_repeats)
            record = pool.last_run()
            results.completions.append(Completion(task, record.kind, record.label(), naive[task.target], times))
            _progress(f"{task.target}: KaaS sharing, {settings.clients} clients for {SHARE_SECONDS:.0f} s ...")
            results.sharing.append(Sharing(task, record.kind, settings.clients, naive_streams[task.target],
                                           _share_kaas(pool, task, settings)))
        results.header[1] += f", {os.getloadavg()[0]:.1f} at the end"
        return results
    finally:
        if own:
            pool.close()


def settings_from_args(args: argparse.Namespace) -> Settings:
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    unknown = [t for t in targets if t not in TASKS]
    if unknown:
        raise SystemExit(f"kaas bench paper: unknown target(s) {', '.join(unknown)}; valid: {', '.join(TASKS)}")
    base = Settings.quick() if args.quick else Settings()
    naive = args.repeats or base.naive_repeats
    kaas = args.kaas_repeats or (10 * args.repeats if args.repeats else base.kaas_repeats)
    return replace(base, targets=targets, naive_repeats=naive, kaas_repeats=kaas,
                   clients=args.clients or base.clients)


def main(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    results = reproduce(settings)
    print("\n".join(results.header))
    print()
    print(results.table(args.markdown))
    print()
    print(f"CSV: {write_csv(results, args.out)}")
    print(f"plot: {plot(results, args.plot)}")
    return 0
