"""A kept handle of one backend used by a call of another backend on the same device: NumPy
<-> JAX on the CPU (XLA:CPU), CuPy <-> JAX on a GPU, converted on the worker through DLPack
(worker/convert.py), each conversion in the run record, no array bytes crossing the link."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kaas_magic import KaasUsageError
from kaas_magic.handles import DeviceHandle
from kaas_magic.widgets import render_text

from conftest import requires_gpu

N = 200_000
SMALL = 2_000  # a reply or request that carries no array: names, handles, a few numbers

# A NumPy cell whose result XLA:CPU can share: NumPy's own allocations are 16-byte aligned,
# XLA:CPU uses only 64-byte aligned buffers in place (others it copies, and says so).
ALIGNED = (
    "raw = np.empty(n * 4 + 64, np.uint8)\n"
    "start = -raw.ctypes.data % 64\n"
    "x = raw[start:start + n * 4].view(np.float32)\n"
    "x[:] = np.arange(n, dtype=np.float32) / n\n"
    "px = x.ctypes.data\n"
)


def _run(pool, code, target, **options):
    options.setdefault("fallback", True)
    code = "import numpy as np\n" + code  # cells have xp (the backend's array module), not np
    return pool.run(code, target, stdout=io.StringIO(), **options)


def _moved(record) -> int:
    return record.bytes_in + record.bytes_out


def test_numpy_jax_numpy_chain_on_kept_handles_is_zero_copy_and_moves_no_array_home(pool):
    made = _run(pool, ALIGNED, "cpu", inputs={"n": N}, outputs=["x", "px"], keep=True)
    x = made["x"]
    assert isinstance(x, DeviceHandle) and made.record.backend == "numpy"
    assert made.record.conversions == [] and _moved(made.record) < SMALL

    # A JAX cell (JAX on XLA:CPU) on the NumPy handle: the same memory, through DLPack.
    jaxed = _run(pool, "seen = x.unsafe_buffer_pointer()\nkind = type(x).__module__\n"
                       "y = jax.numpy.sin(x) * 2\npy = y.unsafe_buffer_pointer()",
                 "cpu", backend="jax", inputs={"x": x}, outputs=["y", "seen", "kind", "py"], keep=True)
    record = jaxed.record
    assert record.backend == "jax" and record.worker == x.worker  # the call went to the data
    assert jaxed["kind"].startswith("jax")
    assert jaxed["seen"] == made["px"]  # zero-copy: the JAX array IS the kept NumPy buffer
    (conversion,) = record.conversions
    assert conversion["name"] == "x" and conversion["from"] == "numpy" and conversion["to"] == "jax"
    assert conversion["device"] == "cpu" and conversion["copied"] is False and conversion["how"] == "dlpack"
    assert any(n.startswith("x: numpy -> jax on cpu, zero-copy") for n in record.notes)
    assert "note: x: numpy -> jax on cpu, zero-copy (dlpack)" in render_text("done", record)  # the run view's text
    assert _moved(record) < SMALL

    # Back to a NumPy cell on the JAX handle: again the same memory.
    back = _run(pool, "seen = y.__array_interface__['data'][0]\nz = y + 1\ntotal = float(z.sum(dtype=np.float64))",
                "cpu", inputs={"y": jaxed["y"]}, outputs=["z", "seen", "total"], keep=True)
    (conversion,) = back.record.conversions
    assert (conversion["from"], conversion["to"], conversion["copied"]) == ("jax", "numpy", False)
    assert back["seen"] == jaxed["py"]
    assert _moved(back.record) < SMALL  # the whole chain: no array crossed the link

    reference = np.sin(np.arange(N, dtype=np.float32) / N) * 2 + 1
    np.testing.assert_allclose(back["z"].get(), reference, rtol=1e-6, atol=1e-6)
    assert back["total"] == pytest.approx(float(reference.sum(dtype=np.float64)), rel=1e-5)


def test_chain_through_a_jax_kernel_and_back_to_a_numpy_cell(pool):
    made = _run(pool, ALIGNED + "x = x.reshape(4, n // 4)", "cpu", inputs={"n": 1024}, outputs=["x", "px"], keep=True)
    soft = pool.call("softmax", made["x"], target="cpu", backend="jax", keep=True)  # a JAX kernel
    record = pool.last_run()
    (conversion,) = record.conversions
    assert conversion["from"] == "numpy" and conversion["to"] == "jax" and conversion["copied"] is False
    assert record.kernels == {"softmax": record.kernels["softmax"]} and _moved(record) < SMALL
    done = _run(pool, "s = p.sum(axis=1, dtype=np.float64).tolist()\nm = p.argmax(axis=1).tolist()", "cpu",
                inputs={"p": soft}, outputs=["s", "m"])
    assert [c["copied"] for c in done.record.conversions] == [False]
    assert done["s"] == pytest.approx([1.0] * 4, abs=1e-5) and done["m"] == [255] * 4
    assert _moved(done.record) < SMALL


def test_xp_generic_cell_runs_on_a_kept_handle_of_either_backend(pool):
    host = np.linspace(-1, 1, 5000, dtype=np.float32)
    kept = pool.put(host, "cpu")
    code = "m = float(xp.mean(xp.abs(h) * 3))\nkind = type(h).__module__"
    on_numpy = _run(pool, code, "cpu", inputs={"h": kept}, outputs=["m", "kind"])
    on_jax = _run(pool, code, "cpu", backend="jax", inputs={"h": kept}, outputs=["m", "kind"])
    assert on_numpy["kind"] == "numpy" and on_numpy.record.conversions == []
    assert on_jax["kind"].startswith("jax") and len(on_jax.record.conversions) == 1
    expected = float(np.mean(np.abs(host) * 3))
    assert on_numpy["m"] == pytest.approx(expected, rel=1e-6) and on_jax["m"] == pytest.approx(expected, rel=1e-5)
    assert on_jax.record.bytes_in < SMALL


def test_copies_are_said_and_values_still_right(pool):
    """What XLA will not share (a NumPy buffer off 64-byte alignment, 64-bit dtypes with
    jax_enable_x64 off, non-compact strides) is copied on the worker and recorded as such."""
    cases = {
        "off-aligned": ("raw = np.empty(4000 + 128, np.uint8)\nstart = -raw.ctypes.data % 64 + 16\n"
                        "x = raw[start:start + 4000].view(np.float32)\nx[:] = 1.5",
                        np.full(1000, 1.5, np.float32), "not 64-byte aligned"),
        "float64": ("x = np.full(1000, 2.5)", np.full(1000, 2.5, np.float32), "float64 became float32"),
        "strided": ("x = np.arange(2000, dtype=np.float32).reshape(40, 50)[:, ::2]",
                    np.arange(2000, dtype=np.float32).reshape(40, 50)[:, ::2], "DLPack refused"),
    }
    for case, (code, expected, why) in cases.items():
        made = _run(pool, code, "cpu", outputs=["x"], keep=True)
        result = _run(pool, "y = x + 0", "cpu", backend="jax", inputs={"x": made["x"]}, outputs=["y"])
        (conversion,) = result.record.conversions
        assert conversion["copied"] is True, case
        assert why in conversion["why"], (case, conversion)
        assert any("copied" in n for n in result.record.notes)
        np.testing.assert_array_equal(result["y"], expected)
        assert result.record.bytes_in < SMALL  # copied on the worker, never through the notebook


DTYPES = ["float32", "float16", "complex64", "int32", "int8", "uint8", "bool", "float64", "int64"]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dtype=st.sampled_from(DTYPES), shape=st.sampled_from([(7,), (64,), (3, 5), (16, 16)]),
       offset=st.sampled_from([0, 16, 32]), transposed=st.booleans())
def test_property_dlpack_shares_what_it_can_and_results_always_equal(pool, dtype, shape, offset, transposed):
    rng = np.random.default_rng(abs(hash((dtype, shape, offset, transposed))) % 2**32)
    host = (rng.integers(0, 100, size=shape) if dtype != "bool" else rng.integers(0, 2, size=shape)).astype(dtype)
    code = ("raw = np.empty(host.nbytes + 128, np.uint8)\n"
            "start = -raw.ctypes.data % 64 + offset\n"
            "x = raw[start:start + host.nbytes].view(host.dtype).reshape(host.shape)\n"
            "x[...] = host\n"
            "x = x.T if transposed else x")
    made = _run(pool, code, "cpu", inputs={"host": host, "offset": offset, "transposed": transposed},
                outputs=["x"], keep=True)
    result = _run(pool, "y = jax.numpy.asarray(x)", "cpu", backend="jax", inputs={"x": made["x"]}, outputs=["y"])
    (conversion,) = result.record.conversions
    narrowed = dtype in ("float64", "int64")  # JAX without jax_enable_x64
    shared = offset == 0 and not narrowed
    assert conversion["copied"] is (not shared), conversion
    expected = host.T if transposed else host
    np.testing.assert_array_equal(result["y"], expected.astype(np.asarray(result["y"]).dtype))
    assert str(np.asarray(result["y"]).dtype) == {"float64": "float32", "int64": "int32"}.get(dtype, dtype)


def test_a_handle_on_another_physical_device_is_refused_naming_both():
    """No second device here: two sessions that say they are on different devices."""
    from kaas_magic.backends.base import Offer, Session
    from kaas_magic.targets import Service
    from kaas_magic.worker.convert import convert

    class On(Session):
        def __init__(self, backend, physical):
            super().__init__(Offer(Service("gpu" if physical != "cpu" else "cpu", backend, "device"),
                                   f"{backend} device"), {})
            self._physical = physical

        @property
        def physical_device(self):
            return self._physical

    with pytest.raises(KaasUsageError) as err:
        convert(np.ones(3, np.float32), "h", On("cupy", "gpu:0"), On("numpy", "cpu"))
    text = str(err.value)
    assert "variable 'h'" in text and "gpu:0" in text and "cpu" in text and "Nothing was run" in text
    with pytest.raises(KaasUsageError, match="kept on gpu:0 .* runs on gpu:1"):
        convert(np.ones(3, np.float32), "h", On("cupy", "gpu:0"), On("jax", "gpu:1"))
    # A buffer in host memory may go to a call on another device: as a host array, as any input.
    host = np.ones(3, np.float32)
    assert convert(host, "h", On("numpy", "cpu"), On("cupy", "gpu:0")) == (host, None)


def test_a_backend_without_dlpack_hands_over_through_host_memory_on_the_worker(pool):
    """OpenCL (PoCL on this CPU) has no __dlpack__: its kept buffer reaches a NumPy cell as a
    copy made on the worker, said so; a NumPy buffer reaches an OpenCL cell as it is."""
    a = np.arange(1000, dtype=np.float32)
    kept = pool.call("vector_add", a, a, target="fpga", fallback=True, keep=True)
    result = _run(pool, "s = float(c.sum())\nkind = type(c).__module__", "cpu", inputs={"c": kept},
                  outputs=["s", "kind"])
    (conversion,) = result.record.conversions
    assert (conversion["from"], conversion["to"], conversion["copied"]) == ("opencl", "numpy", True)
    assert conversion["how"] == "host memory on the worker" and "DLPack refused" in conversion["why"]
    assert result["kind"] == "numpy" and result["s"] == float((2 * a).sum())
    assert result.record.bytes_in < SMALL
    numpy_kept = pool.put(a, "cpu", worker=kept.worker)
    back = _run(pool, "kind = type(c).__module__", "fpga", inputs={"c": numpy_kept}, outputs=["kind"])
    assert back["kind"] == "numpy" and back.record.conversions == []


def test_pool_stays_healthy_after_refused_and_copied_conversions(pool):
    kept = pool.put(np.arange(10, dtype=np.float32), "cpu")
    with pytest.raises(NameError):  # an error in the cell after a conversion: nothing kept, pool fine
        _run(pool, "y = x * 2\nundefined_name", "cpu", backend="jax", inputs={"x": kept}, outputs=["y"], keep=True)
    again = _run(pool, "s = float(x.sum())", "cpu", backend="jax", inputs={"x": kept}, outputs=["s"])
    assert again["s"] == 45.0 and len(again.record.conversions) == 1
    np.testing.assert_array_equal(kept.get(), np.arange(10, dtype=np.float32))


@requires_gpu
def test_cupy_jax_cupy_chain_on_a_gpu_is_zero_copy(pool):
    made = pool.run("x = cupy.arange(n, dtype=cupy.float32) / n\npx = int(x.data.ptr)", "gpu",
                    inputs={"n": N}, outputs=["x", "px"], keep=True, backend="cupy", stdout=io.StringIO())
    jaxed = pool.run("seen = x.unsafe_buffer_pointer()\ny = jax.numpy.sin(x) * 2\npy = y.unsafe_buffer_pointer()",
                     "gpu", backend="jax", inputs={"x": made["x"]}, outputs=["y", "seen", "py"], keep=True,
                     stdout=io.StringIO())
    (conversion,) = jaxed.record.conversions
    assert (conversion["from"], conversion["to"], conversion["device"]) == ("cupy", "jax", "gpu:0")
    assert conversion["copied"] is False and jaxed["seen"] == made["px"]
    back = pool.run("seen = int(y.data.ptr)\nz = y + 1", "gpu", backend="cupy", inputs={"y": jaxed["y"]},
                    outputs=["z", "seen"], keep=True, stdout=io.StringIO())
    (conversion,) = back.record.conversions
    assert conversion["copied"] is False and back["seen"] == jaxed["py"]
    assert _moved(made.record) + _moved(jaxed.record) + _moved(back.record) < 3 * SMALL
    np.testing.assert_allclose(back["z"].get(), np.sin(np.arange(N, dtype=np.float32) / N) * 2 + 1, rtol=1e-5)


@pytest.fixture(scope="module")
def cpu_sessions(cache_dir):
    """NumPy and JAX (XLA:CPU) sessions in this process: the conversions without a pool."""
    from kaas_magic import config
    from kaas_magic.backends import load

    opened = {}
    for name, target in (("numpy", "cpu"), ("jax", "cpu")):
        backend = load(name)(config.snapshot())
        offer = next(o for o in backend.discover() if o.service.target == target and o.service.kind == "device")
        opened[name] = backend.open(offer)
    return opened


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dtype=st.sampled_from(DTYPES), shape=st.sampled_from([(1,), (9,), (4, 6), (2, 3, 5)]),
       offset=st.sampled_from([0, 8, 16, 48]), layout=st.sampled_from(["c", "transposed", "strided", "readonly"]))
def test_property_in_process_numpy_to_jax_and_back(cpu_sessions, dtype, shape, offset, layout):
    from kaas_magic.worker.convert import convert

    numpy_session, jax_session = cpu_sessions["numpy"], cpu_sessions["jax"]
    host = (np.arange(int(np.prod(shape))) % (2 if dtype == "bool" else 100)).astype(dtype).reshape(shape)
    raw = np.empty(host.nbytes + 128, np.uint8)
    start = -raw.ctypes.data % 64 + offset
    x = raw[start:start + host.nbytes].view(host.dtype).reshape(shape)
    x[...] = host
    if layout == "transposed":
        x = x.T
    elif layout == "strided":
        x = x[..., ::2]
    elif layout == "readonly":
        x.flags.writeable = False
    y, record = convert(x, "x", numpy_session, jax_session)
    narrowed = dtype in ("float64", "int64")
    compact = layout != "strided" or x.shape[-1] <= 1
    assert record["copied"] is not (offset == 0 and not narrowed and compact and layout != "readonly"), record
    assert record["how"] == ("dlpack" if compact and layout != "readonly" else "device copy, then dlpack"), record
    np.testing.assert_array_equal(np.asarray(y), x.astype(np.asarray(y).dtype))
    # And back: JAX's buffer seen from NumPy, always the same memory.
    z, back = convert(y, "y", jax_session, numpy_session)
    assert back["copied"] is False and back["how"] == "dlpack" and not z.flags.writeable
    assert z.__array_interface__["data"][0] == y.unsafe_buffer_pointer()
    np.testing.assert_array_equal(z, np.asarray(y))
