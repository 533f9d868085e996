"""``kaas bench control``: the control plane's cost and its routing quality as the pool and
the number of notebooks grow.

Least-loaded routing needs each client to know how busy workers are. Asking every worker
every second (``kaas.pool.load-poll: all``, how kaas worked before) costs clients x workers
messages a second. Now every reply carries its worker's load, and a refresh asks only the
few workers a client has not heard from lately (``sample``, the default).

For each pool size (NumPy workers, one call at a time each, so that imbalance shows as
queueing) and each number of clients, under both policies, the clients keep about one call
per worker in flight (sleeps of ``--task-ms``) for ``--seconds``. Printed per run:
- control messages a second: load requests plus routing-table refreshes, all clients;
- calls a second;
- routing quality: the spread of calls over workers (coefficient of variation, 0 is even)
  and the median and 90th percentile of the time calls waited for their worker.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import threading
import time

from .common import header

POLICIES = ("all", "sample")


def _config(load_poll: str) -> dict:
    return {"kaas.backends": ["numpy"], "kaas.pool.concurrency": 1, "kaas.pool.load-poll": load_poll,
            "kaas.widgets.inline": False}


def _drive(clients: list, threads_per_client: int, seconds: float, task_s: float) -> tuple[int, list[float]]:
    """Every client's threads call until time is up; (calls, queue waits in seconds)."""
    stop = time.monotonic() + seconds
    waits: list[float] = []
    lock = threading.Lock()
    code = f"import time\ntime.sleep({task_s})"

    def loop(pool) -> None:
        mine: list[float] = []
        while time.monotonic() < stop:
            record = pool.run(code, "cpu").record
            mine.append(record.timings.queue)
        with lock:
            waits.extend(mine)

    threads = [threading.Thread(target=loop, args=(p,), daemon=True)
               for p in clients for _ in range(threads_per_client)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(waits), waits


def _worker_calls(pool) -> dict[str, int]:
    """Calls each worker has served (its info's per-service counts)."""
    return {i["name"]: sum(int(s.get("calls", 0)) for s in i.get("services", ()))
            for i in pool.status().workers}


def _control_messages(clients: list) -> int:
    return sum(p._control.load_requests + p._control.route_refreshes for p in clients)


def run_one(pool, n_clients: int, load_poll: str, seconds: float, task_s: float) -> dict:
    import dask

    from ..client import Pool

    with dask.config.set(_config(load_poll)):
        clients = [pool] + [Pool.connect(pool.scheduler_address, security=pool.client.security)
                            for _ in range(n_clients - 1)]
        try:
            workers = len(pool.routes())
            per_client = max(1, math.ceil(workers / n_clients))  # about one call per worker in flight
            _drive(clients, per_client, 1.0, task_s)  # warm: links open, loads heard
            calls_before, messages_before = _worker_calls(pool), _control_messages(clients)
            t0 = time.perf_counter()
            calls, waits = _drive(clients, per_client, seconds, task_s)
            elapsed = time.perf_counter() - t0
            messages = _control_messages(clients) - messages_before
            served = [n - calls_before.get(name, 0) for name, n in _worker_calls(pool).items()]
        finally:
            for c in clients[1:]:
                c.close()
    waits.sort()
    mean = statistics.mean(served) if served else 0.0
    return {
        "workers": workers, "clients": n_clients, "policy": load_poll,
        "messages_per_s": messages / elapsed, "calls_per_s": calls / elapsed,
        "spread": statistics.pstdev(served) / mean if mean else 0.0,
        "wait_p50_ms": 1e3 * waits[len(waits) // 2] if waits else 0.0,
        "wait_p90_ms": 1e3 * waits[int(len(waits) * 0.9)] if waits else 0.0,
    }


def main(args: argparse.Namespace) -> int:
    import dask

    from ..client import Pool

    sizes = [int(n) for n in str(args.workers_list).split(",")]
    client_counts = [int(n) for n in str(args.clients_list).split(",")]
    task_s = args.task_ms / 1e3
    print("\n".join(header(0)[:3]))
    print(f"each run: {args.control_seconds:g} s of sleeps of {args.task_ms:g} ms, about one call per worker in flight; "
          f"workers serve one call at a time (NumPy backend only)")
    print(f"{'workers':>7} {'clients':>7} {'policy':>7} {'control msg/s':>13} {'calls/s':>8} "
          f"{'spread (CV)':>11} {'wait p50 ms':>11} {'wait p90 ms':>11}")
    rows = []
    os.environ["DASK_KAAS__BACKENDS"] = '["numpy"]'  # worker processes read their backends from it
    for size in sizes:
        with dask.config.set(_config("sample")):
            pool = Pool.start(size)
        try:
            pool.wait_ready(600)
            for n_clients in client_counts:
                for policy in POLICIES:
                    row = {**run_one(pool, n_clients, policy, args.control_seconds, task_s), "size": size}
                    rows.append(row)
                    print(f"{row['workers']:>7} {row['clients']:>7} {policy:>7} {row['messages_per_s']:>13.1f} "
                          f"{row['calls_per_s']:>8.0f} {row['spread']:>11.3f} {row['wait_p50_ms']:>11.2f} "
                          f"{row['wait_p90_ms']:>11.2f}", flush=True)
        finally:
            pool.close()
    for size in sizes:
        for n_clients in client_counts:
            by_policy = {r["policy"]: r for r in rows if r["size"] == size and r["clients"] == n_clients}
            every, sampled = by_policy["all"], by_policy["sample"]
            print(f"{size} workers x {n_clients} clients: sample sends "
                  f"{every['messages_per_s'] / max(sampled['messages_per_s'], 1e-9):.1f}x fewer control messages "
                  f"than all; spread {sampled['spread']:.3f} vs {every['spread']:.3f}, wait p90 "
                  f"{sampled['wait_p90_ms']:.2f} vs {every['wait_p90_ms']:.2f} ms")
    return 0
