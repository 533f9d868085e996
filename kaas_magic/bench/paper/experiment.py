"""The reproduction itself: its settings, the header naming what it ran on, the sharing
streams, the order of the measurements, and ``kaas bench paper``'s entry point."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

from .naive import NaiveRun, run_naive
from .plot import plot
from .report import write_csv
from .results import Completion, Results, Sharing, Stream
from .tasks import ALL_TARGETS, TASKS, Task
from .warm import checked, kaas_call, serving, time_kaas

if TYPE_CHECKING:
    from ...client import Pool

# KaaS sharing streams last exactly the window of the workers' busy_10s metric, so the
# figure read at the end covers the stream and nothing before it.
SHARE_SECONDS = 10.0


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
        f"naive: {settings.naive_repeats} fresh `python` processes per target running the task's child program, "
        f"one at a time, disk caches in a fresh empty folder each (XDG_CACHE_HOME, POCL_CACHE_DIR, CUPY_CACHE_DIR), "
        f"JAX's persistent cache off",
        f"KaaS: {settings.kaas_repeats} calls per target on the warm embedded pool, after one untimed call per "
        f"worker; sharing: {settings.clients} client threads, naive {settings.naive_per_client} task(s) each, "
        f"KaaS {SHARE_SECONDS:.0f} s of back-to-back calls each",
    ]


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _run_threads(work: Callable[[], None], count: int) -> None:
    """``work`` in ``count`` threads at once; the first error any raised, once all are done."""
    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            work()
        except BaseException as e:  # reported after the other clients finish
            errors.append(e)

    threads = [threading.Thread(target=guarded, daemon=True) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def share_naive(task: Task, settings: Settings) -> Stream:
    device = threading.Lock()  # one device, held by one fresh process at a time
    latencies: list[float] = []
    run_time: list[float] = []

    def client() -> None:
        for _ in range(settings.naive_per_client):
            asked = time.perf_counter()
            with device:
                run = run_naive(task)
            latencies.append(time.perf_counter() - asked)
            run_time.append(run.phases["run"])

    started = time.perf_counter()
    _run_threads(client, settings.clients)
    seconds = time.perf_counter() - started
    return Stream(latencies, seconds, sum(run_time) / seconds)


def share_kaas(pool: "Pool", task: Task, settings: Settings) -> Stream:
    latencies: list[float] = []
    started = time.perf_counter()
    deadline = started + SHARE_SECONDS

    def client() -> None:
        while time.perf_counter() < deadline:
            asked = time.perf_counter()
            output = kaas_call(pool, task)
            latencies.append(time.perf_counter() - asked)
            checked(task, output)

    _run_threads(client, settings.clients)
    seconds = time.perf_counter() - started
    prefix = f"kaas/{task.target}/{task.backend}/"
    busy = [row["busy_10s"] for row in pool.metrics() if any(s.startswith(prefix) for s in row["services"])]
    return Stream(latencies, seconds, statistics.fmean(busy) if busy else 0.0)


def _why_skipped(pool: "Pool", task: Task) -> str:
    if task.target == "gpu":
        return "no CUDA GPU: the pool serves gpu only through a CPU stand-in, and the paper's figure is about a GPU"
    return f"the pool does not serve {task.target} with {task.backend}: {', '.join(pool.served())}"


def _measure(pool: "Pool", tasks: list[Task], served: dict[str, dict[str, str]], settings: Settings,
             results: Results) -> None:
    # Naive first, while the pool sits idle: the fresh processes have the CPUs to themselves.
    naive: dict[str, list[NaiveRun]] = {}
    naive_streams: dict[str, Stream] = {}
    for task in tasks:
        _progress(f"{task.target}: {settings.naive_repeats} naive runs ...")
        naive[task.target] = [run_naive(task) for _ in range(settings.naive_repeats)]
        _progress(f"{task.target}: naive sharing, {settings.clients} clients ...")
        naive_streams[task.target] = share_naive(task, settings)

    for task in tasks:
        _progress(f"{task.target}: {settings.kaas_repeats} KaaS calls ...")
        for worker in sorted(served[task.target]):
            checked(task, kaas_call(pool, task, worker))
        times = time_kaas(pool, task, settings.kaas_repeats)
        record = pool.last_run()
        results.completions.append(Completion(task, record.kind, record.label(), naive[task.target], times))
        _progress(f"{task.target}: KaaS sharing, {settings.clients} clients for {SHARE_SECONDS:.0f} s ...")
        results.sharing.append(Sharing(task, record.kind, settings.clients, naive_streams[task.target],
                                       share_kaas(pool, task, settings)))


def reproduce(settings: Settings = Settings(), pool: "Pool | None" = None) -> Results:
    """Run the whole reproduction; starts (and closes) its own pool unless given one."""
    from ...client import Pool

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
                results.skipped[task.target] = _why_skipped(pool, task)
                _progress(f"{task.target}: skipped: {results.skipped[task.target]}")
        _measure(pool, [t for t in wanted if served[t.target]], served, settings, results)
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
