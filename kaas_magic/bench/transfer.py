"""``kaas bench transfer``: how fast arrays cross between a notebook and a worker on the
same machine, through shared memory and through the socket, against one warm copy.

For each size (float32 arrays of 1, 16, 64 and 256 MiB by default), on a warm embedded pool
of one NumPy worker:
- **in**: ``s = float(x[-1])`` with ``x`` sent (the bytes go out, a float comes back);
- **out**: ``z = y`` where ``y`` is a kept buffer already on the worker (the bytes come home);
- **round trip**: ``y = x`` (out and home again);
- **copy**: one ``numpy.copyto`` of the same bytes into a warm destination: the floor any
  transfer that copies once must pay.
Each path runs on two pools in turn: one with shared memory (kaas's default) and one with
``kaas.transfer.shared-memory-threshold: null`` (every byte through the Unix socket, as
before). Printed: medians in ms, each path over one warm copy, and the issue's targets.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from .common import header

DIRECTIONS = ("in", "out", "round trip")


def _median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def copy_ms(x, repeats: int) -> float:
    import numpy

    destination = numpy.empty_like(x)
    return _median_ms(lambda: numpy.copyto(destination, x), repeats)


def measure_pool(pool, x, repeats: int) -> dict[str, float]:
    """Median ms of each direction for array ``x`` on ``pool``."""
    import numpy

    kept = pool.run("import numpy\ny = numpy.ones(n, numpy.float32)", "cpu", inputs={"n": x.size}, keep=True)["y"]
    expected_last = float(x[-1])

    def send() -> None:
        assert pool.run("s = float(x[-1])", "cpu", inputs={"x": x})["s"] == expected_last

    def fetch() -> None:
        z = pool.run("z = y", "cpu", inputs={"y": kept}, outputs=["z"])["z"]
        assert z.shape == x.shape and z[-1] == 1.0

    def both() -> None:
        y = pool.run("y = x", "cpu", inputs={"x": x})["y"]
        assert y.shape == x.shape and y[-1] == expected_last

    out = {"in": _median_ms(send, repeats), "out": _median_ms(fetch, repeats), "round trip": _median_ms(both, repeats)}
    kept.free()
    return out


def _repeats(mib: float) -> int:
    return 21 if mib <= 16 else 11 if mib <= 64 else 7


def main(args: argparse.Namespace) -> int:
    import dask
    import numpy

    from ..client import Pool

    sizes = [float(s) if "." in s else int(s) for s in str(args.sizes).split(",")]
    arrays = {mib: numpy.random.default_rng(1).random(int(mib * 2**20) // 4, dtype=numpy.float32) for mib in sizes}
    os.environ["DASK_KAAS__BACKENDS"] = '["numpy"]'  # the worker processes read their backends from it
    figures: dict[tuple[str, int], dict[str, float]] = {}
    for path, threshold in (("shared memory", None), ("socket", "off")):
        settings = {"kaas.backends": ["numpy"], "kaas.widgets.inline": False}
        if threshold == "off":
            settings["kaas.transfer.shared-memory-threshold"] = None
            os.environ["DASK_KAAS__TRANSFER__SHARED_MEMORY_THRESHOLD"] = "None"
        with dask.config.set(settings):
            pool = Pool.start(1)
            try:
                pool.wait_ready(600)
                for mib in sizes:
                    figures[(path, mib)] = measure_pool(pool, arrays[mib], _repeats(mib))
            finally:
                pool.close()
        os.environ.pop("DASK_KAAS__TRANSFER__SHARED_MEMORY_THRESHOLD", None)
    copies = {mib: copy_ms(arrays[mib], _repeats(mib)) for mib in sizes}

    print("\n".join(header(0)[:3]))
    print("float32 arrays to and from one NumPy worker on this machine (embedded pool), medians after 3 "
          "untimed calls; copy = one numpy.copyto of the same bytes into a warm destination")
    rows = [("| MiB | direction | shared memory ms | socket ms | one copy ms | shared memory / copy "
             "| socket / copy | shared memory GiB/s |"),
            "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for mib in sizes:
        for direction in DIRECTIONS:
            shm, sock, copy = figures[("shared memory", mib)][direction], figures[("socket", mib)][direction], copies[mib]
            moved = mib / 1024 * (2 if direction == "round trip" else 1)
            rows.append(f"| {mib} | {direction} | {shm:.2f} | {sock:.2f} | {copy:.2f} | {shm / copy:.1f}x | "
                        f"{sock / copy:.1f}x | {moved / (shm / 1e3):.1f} |")
    print("\n".join(rows))
    if 64 in sizes:
        shm = figures[("shared memory", 64)]
        print(f"64 MiB in: {shm['in'] / copies[64]:.2f}x one warm copy (target <= 2x); round trip "
              f"{shm['round trip'] / copies[64]:.2f}x (target <= 4x)")
    return 0
