"""Sharing devices: several calls at once per device, queueing past the concurrency limit
(none rejected), and least-loaded routing across notebook clients."""

from __future__ import annotations

import concurrent.futures
import io
import time

from kaas_magic.client import Pool

SLEEPY = "import time\nstarted = time.time()\ntime.sleep(pause)\nended = time.time()"


def _run_sleepy(pool, worker: str, pause: float):
    return pool.run(SLEEPY, "cpu", inputs={"pause": pause}, worker=worker, stdout=io.StringIO())


def _max_overlap(intervals) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def test_a_device_runs_calls_concurrently_and_queues_the_rest(pool):
    worker = pool.routes()[0].address
    concurrency = next(r["concurrency"] for r in pool.metrics() if r["worker"] == worker and r["target"] == "cpu")
    calls = concurrency + 3
    with concurrent.futures.ThreadPoolExecutor(calls) as ex:
        results = list(ex.map(lambda _: _run_sleepy(pool, worker, 0.5), range(calls)))
    assert all(r.record.ok and r.record.worker == worker for r in results)
    spans = [(r.outputs["started"], r.outputs["ended"]) for r in results]
    assert 2 <= _max_overlap(spans) <= concurrency
    assert max(r.record.timings.queue for r in results) >= 0.3  # the extra calls waited their turn


def test_calls_go_to_the_least_loaded_worker_across_clients(pool):
    other_client = Pool.connect(pool.scheduler_address)
    try:
        busy, idle = (r.address for r in sorted(pool.routes(), key=lambda r: r.address)[:2])
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            long_calls = [ex.submit(_run_sleepy, pool, busy, 4.0) for _ in range(4)]
            # The other notebook learns how busy each worker is from the workers themselves.
            deadline = time.monotonic() + 3.5
            while time.monotonic() < deadline:
                if other_client._load.get(busy, ({}, 0))[0].get("kaas/cpu/numpy/device/0", 0) >= 4:
                    break
                time.sleep(0.05)
            placed = [other_client.run("x = 1", "cpu", stdout=io.StringIO()).record.worker for _ in range(6)]
            assert all(f.result().record.ok for f in long_calls)
        assert placed == [idle] * 6
    finally:
        other_client.close()
