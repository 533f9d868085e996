"""``kaas bench overhead``: the per-call cost of a warm kaas call, measured against the
alternatives in the same run on the same machine, so the figures can be compared honestly.

Paths, each with a tiny message and a 1 MiB float32 array sent in and returned:
``%%kaas`` through an in-process IPython shell, ``Pool.run``, a Dask actor call, a plain
``client.submit``, ipyparallel ``apply_sync`` and a ``multiprocessing.Pipe`` round trip
(the floor for small messages: one pickle each way between two local processes; for
1 MiB it need not be one, as it pickles the array in band and copies it several times,
where Dask sends array buffers out of band).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .common import WARMUP, header

SMALL, LARGE = "small", "1 MiB"
Call = Callable[[], Any]


# --- what the remote side runs: module level, so workers and children can import it ----

def echo(x: Any) -> Any:
    return x


class Echo:
    """Dask actor: method calls go straight to the worker holding it (no scheduler)."""

    def echo(self, x: Any) -> Any:
        return x


def _pipe_child(conn) -> None:
    while (x := conn.recv()) is not None:
        conn.send(x)


# --- measurement ----------------------------------------------------------------------

@dataclass
class Row:
    path: str
    payload: str
    times: list[float]  # seconds, one per call

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times) * 1e3

    @property
    def p99_ms(self) -> float:
        return float(np.percentile(self.times, 99)) * 1e3


def _measure(call: Call, calls: int) -> list[float]:
    for _ in range(WARMUP):  # connections, caches and code paths warm before timing
        call()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return times


def _bench_path(path: str, calls: dict[str, Call], arr: np.ndarray, n: int) -> list[Row]:
    # Check the 1 MiB round trip once, so a broken path cannot pass as a fast one.
    returned = calls[LARGE]()
    if not (isinstance(returned, np.ndarray) and np.array_equal(returned, arr)):
        raise RuntimeError(f"{path}: the 1 MiB array did not come back intact ({type(returned).__name__})")
    print(f"  measuring {path} ...", file=sys.stderr, flush=True)
    return [Row(path, payload, _measure(call, n)) for payload, call in calls.items()]


# --- the paths ------------------------------------------------------------------------

def _magic_calls(shell, arr: np.ndarray) -> dict[str, Call]:
    shell.user_ns["x"] = arr  # the magic sends the names the cell reads from user_ns

    def small() -> None:
        shell.run_cell_magic("kaas", "cpu --quiet", "pass")  # raises if the cell fails

    def large() -> Any:
        shell.user_ns.pop("y", None)  # so a stale y cannot pass the check
        shell.run_cell_magic("kaas", "cpu --quiet", "y = x")
        return shell.user_ns["y"]

    return {SMALL: small, LARGE: large}


def _api_calls(pool, arr: np.ndarray) -> dict[str, Call]:
    sink = io.StringIO()
    return {
        SMALL: lambda: pool.run("pass", "cpu", stdout=sink),
        LARGE: lambda: pool.run("y = x", "cpu", inputs={"x": arr}, outputs=["y"], stdout=sink)["y"],
    }


def _actor_calls(actor, arr: np.ndarray) -> dict[str, Call]:
    return {SMALL: lambda: actor.echo(1).result(), LARGE: lambda: actor.echo(arr).result()}


def _submit_calls(client, worker: str, arr: np.ndarray) -> dict[str, Call]:
    # pure=False: a fresh task every call, as a notebook user re-running a cell would get.
    def call(x: Any) -> Any:
        return client.submit(echo, x, pure=False, workers=[worker]).result()

    return {SMALL: lambda: call(1), LARGE: lambda: call(arr)}


def _bench_ipyparallel(arr: np.ndarray, n: int) -> list[Row]:
    """ipyparallel is optional: a row when it starts, else a line saying why not."""
    try:
        import ipyparallel
    except ImportError as e:
        print(f"ipyparallel: skipped, not importable ({e})")
        return []
    cluster = ipyparallel.Cluster(n=1, log_level=40)
    rc = None
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its start-up progress bar
            rc = cluster.start_and_connect_sync()
    except Exception as e:
        print(f"ipyparallel: skipped, it did not start: {type(e).__name__}: {e}")
    try:
        if rc is None:
            return []
        view = rc[0]
        calls = {SMALL: lambda: view.apply_sync(echo, 1), LARGE: lambda: view.apply_sync(echo, arr)}
        return _bench_path("ipyparallel", calls, arr, n)
    finally:  # stopped at once, so its processes do not load the CPUs for later rows
        try:
            if rc is not None:
                rc.close()
            cluster.stop_cluster_sync()
        except Exception as e:
            print(f"ipyparallel: stopping failed: {e}", file=sys.stderr)


def _pipe_calls(conn, arr: np.ndarray) -> dict[str, Call]:
    def call(x: Any) -> Any:
        conn.send(x)
        return conn.recv()

    return {SMALL: lambda: call(1), LARGE: lambda: call(arr)}


# --- report ---------------------------------------------------------------------------

def _table(rows: list[Row], markdown: bool) -> list[str]:
    base = {(r.path, r.payload): r.median_ms for r in rows}
    head = ["path", "payload", "median ms", "p99 ms", "vs Dask actor", "vs Pipe"]
    body = [
        [r.path, r.payload, f"{r.median_ms:.3f}", f"{r.p99_ms:.3f}",
         f"{r.median_ms / base[('Dask actor', r.payload)]:.2f}x",
         f"{r.median_ms / base[('Pipe', r.payload)]:.1f}x"]
        for r in rows
    ]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * 4) + "|"]
        return lines + ["| " + " | ".join(cells) + " |" for cells in body]
    widths = [max(len(c) for c in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return [fmt(head), fmt(["-" * w for w in widths])] + [fmt(cells) for cells in body]


def _verdicts(rows: list[Row]) -> list[str]:
    m = {(r.path, r.payload): r.median_ms for r in rows}
    api, actor, pipe = m[("kaas API", SMALL)], m[("Dask actor", SMALL)], m[("Pipe", SMALL)]
    api_l, actor_l = m[("kaas API", LARGE)], m[("Dask actor", LARGE)]

    def line(what: str, value: str, ok: bool, target: str) -> str:
        return f"{what}: {value} -> target ({target}) {'MET' if ok else 'NOT MET'}"

    lines = [
        line("warm API call vs Dask actor (small)", f"{api / actor:.2f}x", api <= actor, "<= 1.0x"),
        line("warm API call vs Dask actor (1 MiB)", f"{api_l / actor_l:.2f}x", api_l <= actor_l, "<= 1.0x"),
        line("warm API call under 1 ms (small)", f"{api:.3f} ms", api < 1.0, "< 1 ms"),
        line("warm API call within 10x of Pipe (small)", f"{api / pipe:.1f}x", api <= 10 * pipe, "<= 10x"),
    ]
    if any(r.median_ms < m[("Pipe", LARGE)] for r in rows if r.payload == LARGE):
        lines.append("note: for 1 MiB the Pipe is no floor (it pickles the array in band and copies it; Dask does not)")
    return lines


# --- the command ----------------------------------------------------------------------

def _run_all(args: argparse.Namespace, arr: np.ndarray, cleanup: list[Callable[[], None]]) -> list[Row]:
    import kaas_magic
    from IPython.core.interactiveshell import InteractiveShell

    from ..client import Pool

    n = args.calls
    print("starting the kaas pool (2 workers) ...", file=sys.stderr, flush=True)
    pool = Pool.start(2)
    kaas_magic.use_pool(pool)  # the magic and the API share this very pool
    cleanup.append(kaas_magic.shutdown)
    pool.wait_ready()
    shell = InteractiveShell.instance()
    shell.extension_manager.load_extension("kaas_magic")
    rows = _bench_path("%%kaas cell", _magic_calls(shell, arr), arr, n)
    rows += _bench_path("kaas API", _api_calls(pool, arr), arr, n)

    client = pool.client
    worker = sorted(client.scheduler_info()["workers"])[0]
    with client.as_current():  # the pool's client is not the global default: bind the actor to it
        actor = client.submit(Echo, actor=True, workers=[worker]).result()
        rows += _bench_path("Dask actor", _actor_calls(actor, arr), arr, n)
    rows += _bench_path("Dask submit", _submit_calls(client, worker, arr), arr, n)

    if args.no_ipyparallel:
        print("ipyparallel: skipped (--no-ipyparallel)")
    else:
        rows += _bench_ipyparallel(arr, n)

    ctx = multiprocessing.get_context("spawn")  # no fork of a process with Dask threads
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_pipe_child, args=(child,), daemon=True)
    proc.start()
    cleanup.append(lambda: (parent.send(None), proc.join(10)))
    rows += _bench_path("Pipe", _pipe_calls(parent, arr), arr, n)
    return rows


def main(args: argparse.Namespace) -> int:
    if args.which != "overhead":
        raise SystemExit(f"kaas bench: unknown benchmark {args.which!r}")
    arr = np.random.default_rng(0).random(2**18, dtype=np.float32)  # 2**18 * 4 B = 1 MiB
    cleanup: list[Callable[[], None]] = []
    print("\n".join(header(args.calls)), flush=True)
    try:
        rows = _run_all(args, arr, cleanup)
    finally:
        for close in reversed(cleanup):
            try:
                close()
            except Exception as e:  # one failed close must not leave the others open
                print(f"closing: {type(e).__name__}: {e}", file=sys.stderr)
    print()
    print("\n".join(_table(rows, args.markdown)))
    print()
    print("\n".join(_verdicts(rows)))
    return 0
