"""``kaas bench fanout``: many tiny tasks from one notebook, measured in one run on one
pool of 2 workers: ``kaas.map`` against a serial ``kaas.call`` loop, Dask ``client.map`` of
the same function on the same cluster, and Ray (tasks, and two actors) when it is installed.
Then tasks of 5 ms on the device, serial against map.

The tiny task: ``x + 1`` on 16 float32, a registered JAX kernel on the workers' CPU (XLA:CPU);
the pool's backends are limited to NumPy and JAX (no OpenCL, Qiskit). The 5 ms task: the
same kernel, its body a ``time.sleep(0.005)`` in a host callback (``jax.pure_callback``),
standing in for 5 ms of device time.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable

import numpy as np

from .common import WARMUP, header

ADD_ONE = """
def add_one(x):
    return x + 1
"""

SLEEP_ADD_ONE = """
import time
import numpy as np

def _host(a):
    time.sleep(0.005)
    return np.asarray(a) + np.float32(1)

def sleep_add_one(x):
    return jax.pure_callback(_host, jax.ShapeDtypeStruct(x.shape, x.dtype), x)
"""

TARGETS = {"serial": 3.0, "Ray best": 5.0, "Dask client.map": 20.0}
SLOW_TARGET = 1.8


def add_one_np(x: np.ndarray) -> np.ndarray:
    """What Dask and Ray run: the same ``x + 1``, in NumPy."""
    return x + np.float32(1)


def _rate(n: int, run: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = run()
    return n / (time.perf_counter() - t), out


def _check(name: str, out, x: np.ndarray, n: int) -> None:
    out = list(out)
    if len(out) != n or not all(np.array_equal(np.asarray(o), x + 1) for o in out):
        raise RuntimeError(f"{name}: wrong results")


def _ray_rates(x: np.ndarray, n: int) -> dict[str, float]:
    try:
        import ray
    except ImportError:
        print("Ray: not installed (pip install kaas-magic[ray])")
        return {}
    rates = {}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(add_one_np)
        ray.get([remote.remote(x) for _ in range(WARMUP)])
        rates["Ray tasks"], out = _rate(n, lambda: ray.get([remote.remote(x) for _ in range(n)]))
        _check("Ray tasks", out, x, n)

        @ray.remote
        class Adder:
            def add(self, a):
                return add_one_np(a)

        actors = [Adder.remote(), Adder.remote()]
        ray.get([actors[i % 2].add.remote(x) for i in range(WARMUP)])
        rates["Ray 2 actors"], out = _rate(n, lambda: ray.get([actors[i % 2].add.remote(x) for i in range(n)]))
        _check("Ray 2 actors", out, x, n)
    finally:
        ray.shutdown()
    return rates


def _run(args: argparse.Namespace) -> tuple[dict[str, float], dict[str, float], dict]:
    import dask.config

    from .. import config as kaas_config
    from ..client import Pool

    kaas_config.get("backends")  # kaas.yaml merged first
    dask.config.set({"kaas.backends": ["numpy", "jax"]})
    n, n_slow = args.tasks, args.slow_tasks
    x = np.arange(16, dtype=np.float32)
    print("starting the kaas pool (2 workers, backends numpy and jax) ...", file=sys.stderr, flush=True)
    pool = Pool.start(2)
    rates: dict[str, float] = {}
    slow: dict[str, float] = {}
    try:
        pool.wait_ready()
        pool.register(ADD_ONE, "jax", signature="add_one(x: float32[n])", target="cpu")
        pool.register(SLEEP_ADD_ONE, "jax", signature="sleep_add_one(x: float32[n])", target="cpu")
        items = [(x,)] * n

        for _ in range(WARMUP):
            pool.call("add_one", x)
        print("  measuring the serial kaas.call loop ...", file=sys.stderr, flush=True)
        rates["kaas serial call loop"], out = _rate(n, lambda: [pool.call("add_one", x) for _ in range(n)])
        _check("serial", out, x, n)

        list(pool.map("add_one", items[:200], progress=False))  # warm: links, threads
        print("  measuring kaas.map ...", file=sys.stderr, flush=True)
        it = None

        def run_map():
            nonlocal it
            it = pool.map("add_one", items, progress=False)
            return list(it)

        rates["kaas.map"], out = _rate(n, run_map)
        _check("kaas.map", out, x, n)
        stats = it.stats

        client = pool.client
        client.gather(client.map(add_one_np, [x] * WARMUP, pure=False))
        print("  measuring Dask client.map ...", file=sys.stderr, flush=True)
        rates["Dask client.map"], out = _rate(n, lambda: client.gather(client.map(add_one_np, [x] * n, pure=False)))
        _check("Dask client.map", out, x, n)

        rates.update(_ray_rates(x, n))

        print("  measuring 5 ms tasks ...", file=sys.stderr, flush=True)
        for _ in range(5):
            pool.call("sleep_add_one", x)
        slow["kaas serial call loop"], out = _rate(n_slow, lambda: [pool.call("sleep_add_one", x) for _ in range(n_slow)])
        _check("serial 5 ms", out, x, n_slow)
        slow_it = None

        def run_slow_map():
            nonlocal slow_it
            slow_it = pool.map("sleep_add_one", [(x,)] * n_slow, progress=False)
            return list(slow_it)

        slow["kaas.map"], out = _rate(n_slow, run_slow_map)
        _check("map 5 ms", out, x, n_slow)
        return rates, slow, {"tiny": stats, "slow": slow_it.stats}
    finally:
        pool.close()


def _verdict(what: str, ratio: float, target: float) -> str:
    return f"{what}: {ratio:.1f}x -> target (>= {target:g}x) {'MET' if ratio >= target else 'NOT MET'}"


def main(args: argparse.Namespace) -> int:
    print("\n".join(header(args.tasks)[:3]))
    print(f"{args.tasks} tiny tasks (x + 1 on 16 float32) per row, {args.slow_tasks} tasks of 5 ms; "
          f"rates in tasks/s (time.perf_counter, after {WARMUP} warm-up calls per path)")
    rates, slow, stats = _run(args)
    print()
    print("| path | tasks/s | kaas.map is |")
    print("|---|---:|---:|")
    for path, rate in rates.items():
        print(f"| {path} | {rate:,.0f} | {rates['kaas.map'] / rate:.1f}x |")
    print()
    print(f"5 ms tasks ({args.slow_tasks}):")
    print("| path | tasks/s | kaas.map is |")
    print("|---|---:|---:|")
    for path, rate in slow.items():
        print(f"| {path} | {rate:,.1f} | {slow['kaas.map'] / rate:.1f}x |")
    print()
    for name, s in stats.items():
        sizes = s.batch_sizes
        print(f"map stats ({name}): {s.batches} batches, sizes {min(sizes)}..{max(sizes)}, "
              f"per device {dict(sorted(s.per_device.items()))}")
    print()
    m = rates["kaas.map"]
    print(_verdict("kaas.map vs serial kaas.call loop", m / rates["kaas serial call loop"], TARGETS["serial"]))
    print(_verdict("kaas.map vs Dask client.map", m / rates["Dask client.map"], TARGETS["Dask client.map"]))
    ray = [r for p, r in rates.items() if p.startswith("Ray")]
    if ray:
        print(_verdict("kaas.map vs Ray's best", m / max(ray), TARGETS["Ray best"]))
    else:
        print("kaas.map vs Ray's best: not measured (Ray is not installed)")
    print(_verdict("5 ms tasks: kaas.map vs serial loop", slow["kaas.map"] / slow["kaas serial call loop"],
                   SLOW_TARGET))
    return 0
