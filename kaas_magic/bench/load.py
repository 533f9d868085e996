"""``kaas bench load``: several notebook clients (separate processes) run mixed targets on
one pool at once, for a bounded time; then a soak of many small calls from one client.

Every call carries a tag unique to its client and sequence number, and its result must
carry the same tag back: so a result that is wrong, lost, duplicated or delivered to the
wrong client is counted, not only errors. Memory of the client and of every worker is read
before and after the soak. Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import statistics
import sys
import time
from collections import Counter

import numpy as np

from .common import header
from .faults import CLEAN_STATE_CELL

# Task kinds: (name, how to run it on a pool, how to check the result).
KINDS = ("cpu numpy", "fpga kernel", "tpu jax", "qpu circuit")
SOAK_BOUND_MIB = 64  # what the soak may add to a process's resident memory


# A cpu task also prints its tag and reports the process state a cell could have changed:
# output reaching the wrong caller, or one cell's state reaching another's, counts as wrong.
_CPU_TASK = "print('tag', tag)\ny = x * 2 + tag\n" + CLEAN_STATE_CELL


def _one_call(pool, kind: str, tag: int, baseline: dict | None = None):
    """Run one tagged task of ``kind``; return True when the result is right for ``tag``.
    Calls are safe to run twice, so a worker lost under one (a fault elsewhere) retries it."""
    quiet = io.StringIO()
    if kind == "cpu numpy":
        x = np.arange(32, dtype=np.int64)
        result = pool.run(_CPU_TASK, "cpu", inputs={"x": x, "tag": tag}, stdout=quiet, retries=2,
                          outputs=["y", "state"])
        state = result.outputs["state"]
        if baseline is not None:
            baseline.setdefault("state", state)
        clean = baseline is None or state == baseline["state"]
        return bool(np.array_equal(result.outputs["y"], x * 2 + tag)) and quiet.getvalue() == f"tag {tag}\n" and clean
    if kind == "fpga kernel":
        a = np.full(256, tag % 100_000, dtype=np.float32)
        out = pool.call("vector_add", a, a, target="fpga", fallback=True, retries=2)
        return bool(np.array_equal(out, a + a))
    if kind == "tpu jax":
        x = np.arange(8, dtype=np.float32)
        y = pool.run("y = xp.sum(x) + tag", "tpu", inputs={"x": x, "tag": float(tag % 1000)}, fallback=True,
                     stdout=quiet, retries=2).outputs["y"]
        return float(y) == float(x.sum()) + float(tag % 1000)
    counts = pool.call("bell", shots=32, retries=2)
    return sum(counts.values()) == 32 and set(counts) <= {"00", "11"}


def _client(address: str, security, client_index: int, seconds: float, results) -> None:
    """One notebook client in its own process: mixed tasks until time is up."""
    from ..client import Pool

    pool = Pool.connect(address, security=security)
    baseline: dict = {}
    latencies: list[float] = []
    errors: Counter = Counter()
    wrong = 0
    per_kind: Counter = Counter()
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        kind = KINDS[sent % len(KINDS)]
        tag = client_index * 1_000_000 + sent
        sent += 1
        started = time.perf_counter()
        try:
            ok = _one_call(pool, kind, tag, baseline)
        except Exception as e:
            errors[f"{kind}: {type(e).__name__}"] += 1
            continue
        latencies.append(time.perf_counter() - started)
        per_kind[kind] += 1
        wrong += 0 if ok else 1
    pool.close()
    results.put({"client": client_index, "sent": sent, "answered": len(latencies) + sum(errors.values()),
                 "latencies": latencies, "errors": dict(errors), "wrong": wrong, "per_kind": dict(per_kind)})


def run_load(address: str, clients: int, seconds: float, security=None,
             faults: bool = False) -> tuple[list[str], dict]:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_client, args=(address, security, i, seconds, results)) for i in range(clients)]
    injector = None
    if faults:
        from .faults import inject

        fault_results = ctx.Queue()
        injector = ctx.Process(target=inject, args=(address, security, seconds, fault_results))
    started = time.monotonic()
    for p in procs:
        p.start()
    if injector is not None:
        injector.start()
    reports = [results.get(timeout=seconds + 300) for _ in procs]
    fault_report = fault_results.get(timeout=300) if injector is not None else None
    for p in procs:
        p.join(30)
    wall = time.monotonic() - started
    latencies = sorted(t for r in reports for t in r["latencies"])
    errors = Counter()
    for r in reports:
        errors.update(r["errors"])
    kinds = Counter()
    for r in reports:
        kinds.update(r["per_kind"])
    totals = {
        "clients": clients, "calls": len(latencies), "sent": sum(r["sent"] for r in reports),
        "answered": sum(r["answered"] for r in reports), "wrong": sum(r["wrong"] for r in reports),
        "errors": sum(errors.values()), "reported_clients": len(reports),
    }
    totals["lost"] = totals["sent"] - totals["answered"]
    p50 = statistics.median(latencies) * 1e3 if latencies else float("nan")
    p99 = float(np.percentile(latencies, 99)) * 1e3 if latencies else float("nan")
    lines = [
        f"load: {clients} client processes x {seconds:g} s, mixed targets ({', '.join(KINDS)})",
        f"  calls {totals['calls']}, throughput {totals['calls'] / seconds:.1f} calls/s "
        f"(wall {wall:.1f} s incl. process start), p50 {p50:.2f} ms, p99 {p99:.2f} ms",
        "  per kind: " + ", ".join(f"{k} {kinds[k]}" for k in KINDS),
        f"  wrong results {totals['wrong']}, lost {totals['lost']}, errors {totals['errors']}"
        + (f" ({dict(errors)})" if errors else ""),
        f"  every client reported: {totals['reported_clients'] == clients}",
    ]
    if fault_report is not None:
        from .faults import summary

        fault_lines, totals["faults_unexpected"] = summary(fault_report)
        lines += fault_lines
    return lines, totals


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _worker_rss(pool) -> dict[str, float]:
    quiet = io.StringIO()
    return {
        route.address: pool.run("import psutil\nrss = psutil.Process().memory_info().rss", "cpu", worker=route.address,
                                stdout=quiet).outputs["rss"] / 2**20
        for route in pool.routes()
    }


def settle(pool, workers: int, seconds: float = 240) -> None:
    """Wait until the pool has ``workers`` ready workers that each answer a call, the same
    ones twice, 3 s apart: a worker that is being replaced answers for a moment before it
    exits (its last call's caller is told first)."""
    deadline = time.monotonic() + seconds
    seen: frozenset | None = None
    while True:
        try:
            pool.refresh()
            routes = [r for r in pool.routes() if r.ready]
            if len(routes) == workers:
                for route in routes:
                    pool.run("ok = 1", "cpu", worker=route.address, stdout=io.StringIO(), timeout=30)
                now = frozenset((r.address, r.incarnation) for r in routes)
                if now == seen:
                    return
                seen = now
                time.sleep(3)
                continue
        except Exception:  # noqa: BLE001 - a worker still dying or warming: look again
            seen = None
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise TimeoutError(f"the pool did not get back to {workers} workers in {seconds:g} s")
        time.sleep(0.5)


def run_soak(pool, calls: int) -> tuple[list[str], dict]:
    quiet = io.StringIO()
    for i in range(min(500, calls)):  # caches, connections and allocators settle first
        pool.run("y = x + 1", "cpu", inputs={"x": i}, stdout=quiet)
    client_before, workers_before = _rss_mib(), _worker_rss(pool)
    started = time.monotonic()
    for i in range(calls):
        assert pool.run("y = x + 1", "cpu", inputs={"x": i}, stdout=quiet).outputs["y"] == i + 1
    seconds = time.monotonic() - started
    client_growth = _rss_mib() - client_before
    workers_after = _worker_rss(pool)
    worker_growth = {w: workers_after[w] - workers_before.get(w, workers_after[w]) for w in workers_after}
    worst = max([client_growth, *worker_growth.values()])
    lines = [
        f"soak: {calls} small calls from one client in {seconds:.1f} s ({calls / seconds:.0f} calls/s)",
        f"  client memory growth {client_growth:+.1f} MiB; workers: "
        + ", ".join(f"{w} {g:+.1f} MiB" for w, g in worker_growth.items()),
        f"  largest growth {worst:+.1f} MiB -> bound ({SOAK_BOUND_MIB} MiB per process) "
        f"{'MET' if worst <= SOAK_BOUND_MIB else 'NOT MET'}",
    ]
    return lines, {"client_growth_mib": client_growth, "worker_growth_mib": worker_growth, "worst_mib": worst}


def main(args: argparse.Namespace) -> int:
    from ..client import Pool

    print("\n".join(header(args.calls)[:3]), flush=True)  # command, machine, versions
    print("starting the kaas pool (2 workers) ...", file=sys.stderr, flush=True)
    pool = Pool.start(2)
    try:
        pool.wait_ready()
        lines, totals = run_load(pool.scheduler_address, args.clients, args.seconds,
                                 security=pool.client.security, faults=args.faults)
        print("\n".join(lines), flush=True)
        if args.faults:  # a worker the faults had replaced must be back before the soak
            settle(pool, workers=2)
        soak_lines, _ = run_soak(pool, args.soak)
        print("\n".join(soak_lines), flush=True)
    finally:
        pool.close()
    healthy = (totals["wrong"] == 0 and totals["lost"] == 0 and totals["errors"] == 0
               and not totals.get("faults_unexpected"))
    return 0 if healthy else 1
