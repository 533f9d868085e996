"""Data that stays on the device: keep=True / --keep handles, chaining without copies,
bringing data home, freeing, and stale handles."""

from __future__ import annotations

import time

import numpy as np
import pytest
from IPython.utils.capture import capture_output

from kaas_magic import StaleHandleError
from kaas_magic.handles import DeviceHandle

rng = np.random.default_rng(11)
N = 100_000


def _vectors():
    return rng.random(N, dtype=np.float32), rng.random(N, dtype=np.float32)


def test_kept_results_chain_on_the_device_without_copies(pool):
    a, b = _vectors()
    total = pool.call("vector_add", a, b, target="fpga", fallback=True, keep=True)
    assert isinstance(total, DeviceHandle)
    assert total.shape == (N,) and total.dtype == np.float32 and total.nbytes == 4 * N
    assert pool.last_run().bytes_out < 2_000  # only the handle's description came back

    scaled = pool.call("saxpy", 2.0, total, b, target="fpga", fallback=True, keep=True)
    record = pool.last_run()
    assert scaled.worker == total.worker == record.worker  # the call went to the data
    assert record.bytes_in < b.nbytes + 2_000  # b travelled; the kept sum did not
    np.testing.assert_allclose(scaled.get(), 2.0 * (a + b) + b, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(total), a + b, rtol=1e-6)


def test_handles_are_used_in_place_inside_cells(pool):
    a, b = _vectors()
    kept = pool.put(a, "tpu", fallback=True)
    assert "XLA:CPU" in kept.device
    result = pool.run("y = xp.sum(kept * 2) + 0", "tpu", inputs={"kept": kept}, fallback=True)
    assert result.record.worker == kept.worker and result.record.bytes_in < 2_000
    assert float(result.outputs["y"]) == pytest.approx(float(np.sum(a * 2)), rel=1e-4)


def test_keep_from_the_magic(ip, pool):
    a, b = _vectors()
    ip.user_ns.update(a=a, b=b)
    with capture_output():
        ip.run_cell_magic("kaas", "fpga --fallback --keep --quiet", "c = kernels.vector_add(a, b)\nn = len(a)")
    assert isinstance(ip.user_ns["c"], DeviceHandle)
    assert ip.user_ns["n"] == N  # values that are not arrays come home as usual
    with capture_output():
        ip.run_cell_magic("kaas", "fpga --fallback --quiet", "d = kernels.saxpy(3.0, c, b)")
    np.testing.assert_allclose(ip.user_ns["d"], 3.0 * (a + b) + b, rtol=1e-6)


def test_freed_handle_is_a_clear_error_and_frees_device_memory(pool):
    a, _ = _vectors()
    kept = pool.put(a, "fpga", fallback=True)
    worker = kept.worker

    def kept_bytes():
        return sum(r["kept_bytes"] for r in pool.metrics() if r["worker"] == worker)

    before = kept_bytes()
    assert before >= a.nbytes
    kept.free()
    with pytest.raises(StaleHandleError, match="was freed"):
        kept.get()
    deadline = time.monotonic() + 10
    while kept_bytes() > before - a.nbytes and time.monotonic() < deadline:
        time.sleep(0.1)
    assert kept_bytes() <= before - a.nbytes

    dropped = pool.put(a, "fpga", fallback=True, worker=worker)
    before = kept_bytes()
    del dropped  # dropping the last reference frees the buffer too
    deadline = time.monotonic() + 10
    while kept_bytes() > before - a.nbytes and time.monotonic() < deadline:
        time.sleep(0.1)
    assert kept_bytes() <= before - a.nbytes


def test_handle_of_a_worker_that_left_is_a_clear_error(pool):
    a, _ = _vectors()
    real = pool.put(a, "cpu")
    meta = {"shape": [N], "dtype": "float32", "nbytes": a.nbytes}
    orphan = DeviceHandle(pool, real.id, "tcp://127.0.0.1:1", real.service, real.device, meta)
    with pytest.raises(StaleHandleError, match="has left the pool"):
        pool.call("vector_add", orphan, a, target="fpga", fallback=True)
    orphan.freed = True  # it never owned a buffer


def test_unknown_buffer_on_a_live_worker_says_why(pool):
    a, _ = _vectors()
    real = pool.put(a, "cpu")
    meta = {"shape": [N], "dtype": "float32", "nbytes": a.nbytes}
    forged = DeviceHandle(pool, "0" * 32, real.worker, real.service, real.device, meta)
    with pytest.raises(StaleHandleError, match="not available"):
        forged.get()
    forged.freed = True
    np.testing.assert_array_equal(real.get(), a)  # the worker goes on serving
