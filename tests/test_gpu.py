"""The CuPy path on a real CUDA GPU. Skipped, with the reason, where there is none."""

from __future__ import annotations

import io

import numpy as np
import pytest

from kaas_magic import config

from conftest import mandelbrot_reference, requires_gpu

pytestmark = [pytest.mark.gpu, requires_gpu]


def test_cupy_backend_discovers_and_warms_every_cuda_device():
    from kaas_magic.backends import load

    backend = load("cupy")(config.snapshot())
    offers = backend.discover()
    import cupy

    assert len(offers) == cupy.cuda.runtime.getDeviceCount()
    session = backend.open(offers[0])
    assert "CUDA device 0" in session.device
    with session.activate():
        namespace = session.namespace()
        a = namespace["xp"].arange(8, dtype=np.float32) * 2
        session.synchronize([a])
        host = session.to_host({"a": a, "n": 1})
    assert isinstance(host["a"], np.ndarray) and host["n"] == 1
    np.testing.assert_array_equal(host["a"], np.arange(8, dtype=np.float32) * 2)


def test_gpu_cell_runs_on_cupy_without_fallback(pool):
    x = np.linspace(0, 1, 1_000_000, dtype=np.float32)
    result = pool.run(
        "v = xp.asarray(x) * 3\nmodule = type(xp.asarray(x)).__module__", "gpu",
        inputs={"x": x}, stdout=io.StringIO(),
    )
    record = result.record
    assert record.backend == "cupy" and record.kind == "device" and "CUDA" in record.device
    assert result["module"].startswith("cupy")
    assert isinstance(result["v"], np.ndarray)
    np.testing.assert_allclose(result["v"], x * 3)


def test_gpu_cell_error_keeps_its_type(pool):
    with pytest.raises(ValueError) as err:
        pool.run("a = xp.ones(3) + xp.ones(4)", "gpu", stdout=io.StringIO())
    first = err.value.kaas_frames[0]
    assert first[0].startswith("<kaas-cell") and first[1] == 1  # the traceback starts in the cell


def test_raw_cuda_kernel_through_cupy(pool):
    code = (
        "k = cupy.RawKernel(r'''extern \"C\" __global__ void sq(const float* a, float* o, int n)"
        "{int i = blockDim.x * blockIdx.x + threadIdx.x; if (i < n) o[i] = a[i] * a[i];}''', 'sq')\n"
        "a = xp.asarray(x)\nout = xp.empty_like(a)\nk(((x.size + 255) // 256,), (256,), (a, out, np.int32(x.size)))\n"
    )
    x = np.arange(1000, dtype=np.float32)
    result = pool.run(code, "gpu", inputs={"x": x, "np": np}, stdout=io.StringIO())
    np.testing.assert_array_equal(result["out"], x * x)


@pytest.mark.parametrize("name", ["vector_add", "saxpy", "matmul", "reduce_sum", "mandelbrot"])
def test_cuda_library_kernels_match_numpy(pool, name):
    rng = np.random.default_rng(3)
    a, b = rng.random(5000, dtype=np.float32), rng.random(5000, dtype=np.float32)
    if name == "vector_add":
        got, want = pool.call(name, a, b, target="gpu"), a + b
    elif name == "saxpy":
        got, want = pool.call(name, 1.5, a, b, target="gpu"), 1.5 * a + b
    elif name == "matmul":
        m, n = rng.random((33, 20), dtype=np.float32), rng.random((20, 17), dtype=np.float32)
        got, want = pool.call(name, m, n, target="gpu"), m @ n
    elif name == "reduce_sum":
        got, want = float(pool.call(name, a, target="gpu")), float(a.astype(np.float64).sum())
    else:
        got = pool.call(name, width=64, height=48, x0=-2.0, x1=1.0, y0=-1.2, y1=1.2, max_iter=60, target="gpu")
        assert pool.last_run().backend == "cupy"
        want = mandelbrot_reference(64, 48, -2.0, 1.0, -1.2, 1.2, 60)
        assert got.shape == want.shape and np.mean(got == want) > 0.99  # rounding may flip edge points
        return
    assert pool.last_run().backend == "cupy"
    np.testing.assert_allclose(got, want, rtol=1e-4)



def test_kept_buffers_chain_on_the_gpu_and_its_memory_is_reported(pool):
    from kaas_magic.handles import DeviceHandle

    a = np.random.default_rng(3).random(1_000_000, dtype=np.float32)
    x = pool.put(a, "gpu")
    assert isinstance(x, DeviceHandle) and "CUDA device" in x.device and x.array_type.startswith("cupy")
    y = pool.call("vector_add", x, x, target="gpu", keep=True)
    z = pool.call("saxpy", 2.0, y, x, target="gpu", keep=True)
    assert pool.last_run().bytes_in < 4_000 and pool.last_run().kernels == {"saxpy": "warm"}
    np.testing.assert_allclose(z.get(), 5.0 * a, rtol=1e-5)
    rows = [r for r in pool.metrics() if r["backend"] == "cupy"]
    assert rows and all(r["memory_total"] and r["memory_used"] for r in rows)
    assert all(r["kept_bytes"] >= 0 for r in rows)


def test_cuda_kernel_registered_once_is_loaded_from_disk_by_a_new_session(cache_dir):
    """The CuPy compile-cache marker: a second session on the same cache folder loads."""
    from kaas_magic.backends import load
    from kaas_magic.kernelspec import spec_from_source

    source = ('extern "C" __global__ void twice(const float *a, float *out, int n) {\n'
              '  int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) out[i] = 2 * a[i]; }')
    spec = spec_from_source(source, "cuda", signature="twice(a: float32[n], out: out float32[n], n: int32)")
    settings = {**config.snapshot(), "cache": {"dir": str(cache_dir / "gpu-marker")}}
    first = load("cupy")(settings)
    session = first.open(first.discover()[0])
    assert session.kernel(spec)[1] == "compiled"
    second = load("cupy")(settings)
    again = second.open(second.discover()[0])
    assert again.kernel(spec)[1] == "disk"
    result, how = again.call_kernel(spec, (np.arange(4, dtype=np.float32),), {})
    np.testing.assert_array_equal(again.to_host(result), np.arange(4, dtype=np.float32) * 2)


def test_kernel_inputs_from_shared_memory_are_uploaded_pinned(pool):
    """Large inputs come through shared memory; from a segment's second upload on it is
    registered with CUDA (page-locked), and results stay right throughout."""
    rng = np.random.default_rng(5)
    for _ in range(4):
        a, b = rng.random(2**21, dtype=np.float32), rng.random(2**21, dtype=np.float32)  # 8 MiB each
        np.testing.assert_allclose(pool.call("vector_add", a, b, target="gpu"), a + b, rtol=1e-6)
    probe = ("from kaas_magic import shared_frames as sf\n"
             "pinned = sum(s.pinned for f in list(sf._all) for s in f._peer.values())")
    worker = pool.last_run().worker
    assert pool.run(probe, "gpu", worker=worker, stdout=io.StringIO())["pinned"] >= 1


def test_a_chain_without_keep_comes_home_and_goes_back_through_shared_memory(pool):
    """CUDA results come home copied from the GPU straight into shared memory of the link
    (no second copy), and sent back to the next kernel they go as a reference; every value
    right, results held across later calls included."""
    rng = np.random.default_rng(8)
    probe = ("from kaas_magic import shared_frames as sf\n"
             "n = {k: sum(getattr(f, k) for f in list(sf._all)) for k in ('sent_in_place', 'received_back')}")
    held = []
    for round_ in range(6):
        a, b = rng.random(2**20, dtype=np.float32), rng.random(2**20, dtype=np.float32)  # 4 MiB each
        total = pool.call("vector_add", a, b, target="gpu")
        scaled = pool.call("saxpy", 2.0, total, b, target="gpu")
        np.testing.assert_allclose(total, a + b, rtol=1e-6)
        np.testing.assert_allclose(scaled, 2.0 * (a + b) + b, rtol=1e-5)
        if round_ % 3 == 0:
            held.append((total, a + b))
        del total, scaled
    for total, expected in held:
        np.testing.assert_allclose(total, expected, rtol=1e-6)
    worker = pool.last_run().worker
    counts = pool.run(probe, "gpu", worker=worker, stdout=io.StringIO())["n"]
    assert counts["sent_in_place"] >= 4 and counts["received_back"] >= 2
