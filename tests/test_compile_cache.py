"""The kaas cache folder: a restarted worker loads its kernels from disk instead of
compiling them; and kept buffers past the device's budget are evicted least recently used."""

from __future__ import annotations

import io

import dask.config
import numpy as np
import pytest

from kaas_magic import StaleHandleError
from kaas_magic.client import Pool

SCALE = """\
__kernel void scale_by(__global const float *a, __global float *out, const float k) {
  int i = get_global_id(0); out[i] = a[i] * k; }
"""


def _library_stats(pool: Pool, language: str) -> dict[str, dict]:
    worker = pool.status().workers[0]
    return {row["name"]: row for row in worker["kernels"] if row["language"] == language}


@pytest.fixture(scope="module")
def fresh_pool(tmp_path_factory):
    """A one-worker pool of its own, with an empty cache folder and a small keep budget."""
    settings = {"kaas.cache.dir": str(tmp_path_factory.mktemp("restart-cache")),
                "kaas.keep.max-bytes": 1_000_000}
    with dask.config.set(settings):
        pool = Pool.start(1)
    pool.wait_ready(timeout=240)
    yield pool
    pool.close()


@pytest.mark.timeout(400)
def test_restarted_worker_loads_kernels_from_disk(fresh_pool):
    pool = fresh_pool
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    first = {
        "opencl": _library_stats(pool, "opencl"),
        "qiskit": _library_stats(pool, "qiskit"),
    }
    assert first["opencl"]["vector_add"]["compiles"] == 1 and first["opencl"]["vector_add"]["disk_loads"] == 0
    assert first["qiskit"]["ghz"]["compiles"] == 1
    pool.register(SCALE, "opencl", signature="scale_by(a: float32[n], out: out float32[n], k: float32)",
                  target="fpga", fallback=True)
    assert pool.last_run().kernels == {"scale_by": "compiled"}
    pool.call("softmax", x, target="tpu", fallback=True)
    assert pool.last_run().kernels == {"softmax": "compiled"}
    old_worker = pool.routes()[0].address
    kept = pool.put(x, "cpu")

    pool.client.restart_workers([old_worker])  # a new worker process, same cache folder
    pool.refresh()
    pool.wait_ready(timeout=240)
    assert pool.routes()[0].address != old_worker

    opencl = _library_stats(pool, "opencl")
    for name in ("vector_add", "saxpy", "matmul", "reduce_sum", "mandelbrot"):
        assert opencl[name]["compiles"] == 0 and opencl[name]["disk_loads"] == 1, name
    assert _library_stats(pool, "qiskit")["ghz"] == {**_library_stats(pool, "qiskit")["ghz"], "compiles": 0, "disk_loads": 1}
    pool.register(SCALE, "opencl", signature="scale_by(a: float32[n], out: out float32[n], k: float32)",
                  target="fpga", fallback=True)
    assert pool.last_run().kernels == {"scale_by": "disk"}
    np.testing.assert_allclose(pool.call("scale_by", x.ravel(), k=3.0, fallback=True), 3.0 * x.ravel(), rtol=1e-6)
    assert pool.last_run().kernels == {"scale_by": "warm"}
    result = pool.call("softmax", x, target="tpu", fallback=True)
    assert pool.last_run().kernels == {"softmax": "disk"}
    np.testing.assert_allclose(result, np.exp(x) / np.exp(x).sum(axis=-1, keepdims=True), rtol=1e-5)

    with pytest.raises(StaleHandleError, match="left the pool"):
        kept.get()  # its worker died with the restart


def test_least_recently_used_buffers_are_evicted_past_the_budget(fresh_pool):
    pool = fresh_pool
    arrays = [np.full(100_000, i, dtype=np.float32) for i in range(3)]  # 400 KB each, budget 1 MB
    handles = [pool.put(a, "cpu") for a in arrays[:2]]
    handles[0].get()  # handles[1] is now the least recently used
    handles.append(pool.put(arrays[2], "cpu"))
    with pytest.raises(StaleHandleError, match="evicted under memory pressure"):
        handles[1].get()
    for i in (0, 2):  # used recently: still there
        np.testing.assert_array_equal(handles[i].get(), arrays[i])
    assert pool.run("ok = 1", "cpu", stdout=io.StringIO()).outputs["ok"] == 1
