"""Registered kernels: the shipped library on the CPU stand-ins (PoCL, XLA:CPU, Aer),
registration from cells, calling from the API and from cells, and every error case."""

from __future__ import annotations

import io

import numpy as np
import pytest
from IPython.utils.capture import capture_output

import kaas_magic
from conftest import StandInCudaDevice, mandelbrot_reference
from kaas_magic.kernelspec import KernelArgumentError, KernelCompileError, KernelError, load_library

rng = np.random.default_rng(7)


def test_library_has_every_kernel_the_issue_names():
    lib = load_library()
    languages = {name: {s.language for s in specs} for name, specs in lib.items()}
    for name in ("vector_add", "saxpy", "matmul", "reduce_sum", "mandelbrot"):
        assert languages[name] == {"opencl", "cuda"}
    assert languages["mlp_forward"] == languages["softmax"] == {"jax"}
    assert languages["ghz"] == languages["qft"] == languages["bell"] == {"qiskit"}


def test_vector_add_and_saxpy(pool):
    a, b = rng.random(1000, dtype=np.float32), rng.random(1000, dtype=np.float32)
    np.testing.assert_allclose(pool.call("vector_add", a, b), a + b, rtol=1e-6)
    np.testing.assert_allclose(pool.call("saxpy", 2.5, a, b), 2.5 * a + b, rtol=1e-6)
    # The arguments travelled by parameter name, the dim scalar filled in from the shapes.
    assert pool.last_run().inputs == ("alpha", "x", "y", "n")


@pytest.mark.parametrize("shape", [(16, 16, 16), (33, 20, 17)])
def test_tiled_matmul(pool, shape):
    m, k, n = shape
    a, b = rng.random((m, k), dtype=np.float32), rng.random((k, n), dtype=np.float32)
    np.testing.assert_allclose(pool.call("matmul", a, b), a @ b, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 255, 256, 100_000])
def test_parallel_reduce_sum(pool, n):
    a = rng.random(n, dtype=np.float32)
    assert float(pool.call("reduce_sum", a)) == pytest.approx(float(a.astype(np.float64).sum()), rel=1e-5)


def test_mandelbrot_matches_numpy(pool):
    width, height, max_iter = 64, 48, 60
    got = pool.call("mandelbrot", width=width, height=height, x0=-2.0, x1=1.0, y0=-1.2, y1=1.2, max_iter=max_iter)
    want = mandelbrot_reference(width, height, -2.0, 1.0, -1.2, 1.2, max_iter)
    assert got.shape == (height, width) and got.dtype == np.int32
    assert np.mean(got == want) > 0.99  # float rounding may flip a few boundary points


def test_jax_mlp_forward_and_softmax(pool):
    x = rng.random((8, 5), dtype=np.float32)
    w1, b1 = rng.random((5, 16), dtype=np.float32), rng.random(16, dtype=np.float32)
    w2, b2 = rng.random((16, 3), dtype=np.float32), rng.random(3, dtype=np.float32)
    got = pool.call("mlp_forward", x, w1, b1, w2, b2, fallback=True)
    np.testing.assert_allclose(got, np.maximum(x @ w1 + b1, 0) @ w2 + b2, rtol=1e-5)
    s = pool.call("softmax", x, fallback=True)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    np.testing.assert_allclose(s, e / e.sum(axis=1, keepdims=True), rtol=1e-6)


def test_qiskit_ghz_bell_and_qft(pool):
    ghz = pool.call("ghz", shots=500)
    assert set(ghz) <= {"00000", "11111"} and sum(ghz.values()) == 500
    bell = pool.call("bell", shots=400)
    assert set(bell) <= {"00", "11"} and sum(bell.values()) == 400
    for value in (0, 5, 6):
        assert pool.call("qft", 3, value, shots=64) == {format(value, "03b"): 64}


def test_library_kernels_are_warm_on_first_call(pool):
    a = rng.random(64, dtype=np.float32)
    pool.call("vector_add", a, a)
    assert pool.last_run().kernels == {"vector_add": "warm"}


def test_chaining_kernels_inside_a_cell_stays_on_the_device(pool):
    a = rng.random(4096, dtype=np.float32)
    result = pool.run(
        "t = kernels.saxpy(2.0, a, a)\nu = kernels.vector_add(t, a)\ntotal = kernels.reduce_sum(u)\n"
        "kinds = [type(t).__module__, type(u).__module__]",
        "fpga", inputs={"a": a}, fallback=True, stdout=io.StringIO(),
    )
    assert all(k.startswith("pyopencl") for k in result["kinds"])  # device arrays between kernels
    np.testing.assert_allclose(result["u"], 4 * a, rtol=1e-6)  # (2a + a) + a
    assert float(result["total"]) == pytest.approx(float((4 * a).astype(np.float64).sum()), rel=1e-5)


# --- registering from a notebook ------------------------------------------------------

SCALE = (
    "__kernel void scale(__global const float *a, __global float *out, const float k) {\n"
    "  int i = get_global_id(0); out[i] = a[i] * k; }\n"
)


def test_register_opencl_from_a_cell_then_call_it(ip):
    with capture_output() as out:
        ip.run_cell_magic("kaas", 'fpga --register "scale(a: float32[n], out: out float32[n], k: float32)" --fallback', SCALE)
    assert "registered scale(" in out.stdout
    a = np.arange(8, dtype=np.float32)
    np.testing.assert_array_equal(kaas_magic.call("scale", a, k=2.0, fallback=True), a * 2)
    ip.user_ns["a"] = a
    ip.run_cell_magic("kaas", "fpga --fallback --quiet", "b = kernels.scale(a, k=3.0)")
    np.testing.assert_array_equal(ip.user_ns["b"], a * 3)
    table = kaas_magic.kernels()
    row = next(r for r in table.rows() if r["name"] == "scale")
    assert row["origin"] == "user" and row["compiles"] >= 1 and row["compiled_on"]
    assert "scale" in str(ip.run_line_magic("kaas", "kernels"))


def test_register_jax_def_on_tpu(ip):
    ip.run_cell_magic("kaas", "tpu --register cube --fallback --quiet", "def cube(x):\n    return x * x * x\n")
    x = np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(kaas_magic.call("cube", x, fallback=True), x**3)


def test_register_qasm_on_qpu(ip):
    qasm = 'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[2];\ncreg c[2];\nx q[1];\nmeasure q -> c;\n'
    ip.run_cell_magic("kaas", "qpu --register flip --quiet", qasm)
    assert kaas_magic.call("flip", shots=50) == {"10": 50}


def test_compile_error_shows_the_log_with_cell_lines_and_registers_nothing(ip, pool):
    bad = "__kernel void broken(__global float *a) {\n  a[0] = nope;\n}\n"
    with pytest.raises(KernelCompileError) as err:
        ip.run_cell_magic("kaas", 'fpga --register "broken(a: inout float32[n])" --fallback', bad)
    message = str(err.value)
    assert "nope" in message and "<kernel broken>:3:" in message  # line 3 of the notebook cell
    with pytest.raises(KernelError, match="unknown kernel 'broken'"):
        pool.call("broken", np.zeros(4, np.float32), fallback=True)


def test_c_kernel_without_signature_gets_a_suggestion(ip):
    with pytest.raises(KernelError) as err:
        ip.run_cell_magic("kaas", "fpga --register scale2 --fallback", SCALE.replace("scale", "scale2"))
    assert "scale2(a: float32[n], out: out float32[n], k: float32)" in str(err.value)


def test_bad_signature_is_rejected():
    from kaas_magic.kernelspec import parse_signature

    with pytest.raises(KernelError, match="malformed parameter"):
        parse_signature("f(a float32[n])")
    with pytest.raises(KernelError, match="unknown dtype"):
        parse_signature("f(a: floaty[n])")


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((np.zeros(4, np.float64), np.zeros(4, np.float32)), {}, "argument 'a' has dtype float64, expected float32"),
        ((np.zeros(4, np.float32), np.zeros(5, np.float32)), {}, "argument 'b' has n=5 but an earlier argument set n=4"),
        ((np.zeros((2, 2), np.float32), np.zeros(4, np.float32)), {}, "argument 'a' has shape \\(2, 2\\), expected 1 dimension"),
        ((np.zeros(4, np.float32),), {}, "missing array argument 'b'"),
        ((np.zeros(4, np.float32),) * 4, {}, "takes 3 argument\\(s\\)"),
        ((np.zeros(4, np.float32),) * 2, {"out": 1}, "'out' is an output"),
        ((np.zeros(4, np.float32),) * 2, {"nope": 1}, "has no argument 'nope'"),
        ((np.zeros(4, np.float32),) * 2, {"n": "four"}, "argument 'n' must be a int32 scalar .*'four'"),
    ],
)
def test_argument_checks_name_the_argument(pool, args, kwargs, match):
    before = pool.last_run()
    with pytest.raises(KernelArgumentError, match=match):
        pool.call("vector_add", *args, **kwargs)
    assert pool.last_run() is before  # refused before anything was sent


def test_unknown_kernel(pool):
    with pytest.raises(KernelError, match="unknown kernel 'nosuch'.*vector_add"):
        pool.call("nosuch")


# --- a signature naming a function the source does not define ---------------------------

HELPER = (
    "float twice(float x) { return 2.0f * x; }\n"
    "__kernel void double_it(__global const float *a, __global float *out) {\n"
    "  int i = get_global_id(0); out[i] = twice(a[i]); }\n"
)


def test_registering_a_kernel_the_source_lacks_fails_before_anything_is_sent(pool):
    before = pool.last_run()
    with pytest.raises(KernelError, match=r"opencl kernel 'duble_it' is not in its source.*defines 'double_it'"):
        pool.register(HELPER, "opencl", signature="duble_it(a: float32[n], out: out float32[n])", fallback=True)
    assert pool.last_run() is before


def test_registering_a_function_that_is_not_a_kernel_fails_at_register_naming_it(pool):
    """The name is in the source (a helper), so only the device compiler can tell: the
    kernel object is made at registration, and the error names it and what is defined."""
    with pytest.raises(KernelError, match=r"OpenCL kernel 'twice' is not defined by its source: it defines 'double_it'"):
        pool.register(HELPER, "opencl", signature="twice(a: float32[n], out: out float32[n])", fallback=True)
    with pytest.raises(KernelError, match="unknown kernel 'twice'"):  # nothing was registered
        pool.call("twice", np.zeros(4, np.float32), fallback=True)
    # The pool is healthy: library kernels and the source's real kernel work.
    a = rng.random(100, dtype=np.float32)
    np.testing.assert_allclose(pool.call("vector_add", a, a), 2 * a, rtol=1e-6)
    pool.register(HELPER, "opencl", signature="double_it(a: float32[n], out: out float32[n])", fallback=True)
    np.testing.assert_allclose(pool.call("double_it", a, fallback=True), 2 * a, rtol=1e-6)


def _fake_cupy(monkeypatch, missing: bool):
    """Just enough of CuPy for CupySession.build: compile() fails the way CuPy does when
    the module has no function of that name."""
    import sys
    import types

    class CUDADriverError(RuntimeError):
        pass

    class CompileException(Exception):
        pass

    class RawKernel:
        def __init__(self, source, name, options=()):
            self.name = name

        def compile(self):
            if missing:
                raise CUDADriverError("CUDA_ERROR_NOT_FOUND: named symbol not found")

    cupy = types.ModuleType("cupy")
    cupy.RawKernel = RawKernel
    cupy.cuda = types.SimpleNamespace(Device=StandInCudaDevice, compiler=types.SimpleNamespace(CompileException=CompileException),
                                      driver=types.SimpleNamespace(CUDADriverError=CUDADriverError))
    monkeypatch.setitem(sys.modules, "cupy", cupy)


@pytest.mark.parametrize("source, name, match", [
    ('extern "C" __global__ void twice(float *a) { }', "twise",
     r"CUDA kernel 'twise' is not in the compiled module.*NOT_FOUND.*defines 'twice'"),
    ("__global__ void twice(float *a) { }", "twice",
     r"CUDA kernel 'twice' is not in the compiled module.*mangled: declare it extern \"C\" __global__ void twice"),
])
def test_a_cuda_kernel_missing_from_its_module_is_named_at_build(monkeypatch, source, name, match):
    from kaas_magic.backends.base import Offer
    from kaas_magic.backends.cupy_backend import CupySession
    from kaas_magic.kernelspec import KernelSpec, parse_signature
    from kaas_magic.targets import Service

    _fake_cupy(monkeypatch, missing=True)
    session = CupySession(Offer(Service("gpu", "cupy", "device", 0), "fake GPU"), {})
    spec = KernelSpec(name, "cuda", source, parse_signature(f"{name}(a: inout float32[n])")[1])
    with pytest.raises(KernelError, match=match):
        session.build(spec)
    _fake_cupy(monkeypatch, missing=False)
    assert session.build(spec).name == name


def test_cuda_spec_names_a_function_its_source_lacks():
    with pytest.raises(KernelError, match=r"cuda kernel 'thrice' is not in its source.*defines 'twice'"):
        from kaas_magic.kernelspec import spec_from_source

        spec_from_source('extern "C" __global__ void twice(float *a) { }', "cuda", signature="thrice(a: inout float32[n])")


# --- PyOpenCL's own array functions (reductions and scans need Mako) ---------------------


def test_pyopencl_reductions_work_in_an_fpga_cell(pool):
    a = rng.random(10_000, dtype=np.float32)
    result = pool.run(
        "d = cl_array.to_device(queue, a)\n"
        "total = float(cl_array.sum(d).get())\n"
        "dot = float(cl_array.dot(d, d).get())\n"
        "top = float(cl_array.max(d).get())\n"
        "running = cl_array.cumsum(d).get()\n",
        "fpga", inputs={"a": a}, fallback=True, stdout=io.StringIO(),
    )
    assert result["total"] == pytest.approx(float(a.astype(np.float64).sum()), rel=1e-4)
    assert result["dot"] == pytest.approx(float((a.astype(np.float64) ** 2).sum()), rel=1e-4)
    assert result["top"] == float(a.max())
    np.testing.assert_allclose(result["running"], np.cumsum(a, dtype=np.float64), rtol=1e-3)
