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


def test_each_client_has_its_own_namespace_on_shared_workers(pool):
    import numpy as np
    import pytest

    from kaas_magic import StaleHandleError
    from kaas_magic.handles import DeviceHandle
    from kaas_magic.kernelspec import KernelError

    stranger = Pool.connect(pool.scheduler_address)
    try:
        owner_source = "__kernel void owners_only(__global float *a) { a[get_global_id(0)] *= 2.0f; }"
        pool.register(owner_source, "opencl", signature="owners_only(a: inout float32[n])", target="fpga",
                      fallback=True)
        secret = pool.put(np.arange(4, dtype=np.float32), "cpu")
        pool.run("secret_value = 42", "cpu", worker=secret.worker, stdout=io.StringIO())

        # Another notebook cannot call the owner's kernel, by name or from a cell ...
        with pytest.raises(KernelError, match="unknown kernel 'owners_only'"):
            stranger.call("owners_only", np.ones(4, np.float32), target="fpga", fallback=True)
        with pytest.raises(KernelError, match="unknown kernel 'owners_only'"):
            stranger.run("kernels.owners_only(x)", "fpga", inputs={"x": np.ones(4, np.float32)}, fallback=True,
                         stdout=io.StringIO())
        # ... nor use the owner's buffer, even knowing its id and worker ...
        meta = {"shape": [4], "dtype": "float32", "nbytes": 16}
        forged = DeviceHandle(stranger, secret.id, secret.worker, secret.service, secret.device, meta)
        with pytest.raises(StaleHandleError, match="not available"):
            forged.get()
        forged.freed = True
        # ... nor see the owner's variables: every call starts from a clean namespace.
        with pytest.raises(NameError, match="secret_value"):
            stranger.run("y = secret_value", "cpu", worker=secret.worker, stdout=io.StringIO())
        # The shipped library is shared by all.
        np.testing.assert_allclose(stranger.call("vector_add", np.ones(3, np.float32), np.ones(3, np.float32)), 2.0)
        np.testing.assert_array_equal(secret.get(), np.arange(4, dtype=np.float32))
    finally:
        stranger.close()


def test_concurrent_kernel_calls_on_one_device_each_get_their_own_result(pool):
    """Buffers are recycled per thread: a buffer must never be reused while another
    call's kernel still reads it (this once gave wrong matmul results under load)."""
    import numpy as np

    worker = pool.routes()[0].address
    rng = np.random.default_rng(5)
    inputs = [(rng.random((64, 64), dtype=np.float32), rng.random((64, 64), dtype=np.float32)) for _ in range(8)]

    def one(i: int) -> bool:
        a, b = inputs[i % len(inputs)]
        out = pool.run("c = kernels.matmul(a, b)", "fpga", inputs={"a": a, "b": b}, fallback=True, worker=worker,
                       stdout=io.StringIO()).outputs["c"]
        return bool(np.allclose(out, a @ b, rtol=1e-4))

    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        results = list(ex.map(one, range(200)))
    assert all(results), f"{results.count(False)} of {len(results)} results were wrong"
