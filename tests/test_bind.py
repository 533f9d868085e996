"""A kernel never reads or writes outside its buffers: ``bind`` makes every dim agree with
every array that carries it and with the scalar of its name, and works the outputs and the
launch size out of those dims only. Property tests over random signatures and arguments,
then the cases the issue names, on the client and on a worker (PoCL)."""

from __future__ import annotations

import io
import math
import types

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kaas_magic.handles import DeviceHandle
from kaas_magic.kernelspec import (
    MAX_DIM_32,
    KernelArgumentError,
    KernelError,
    bind,
    check_launch,
    dim_names,
    load_library,
    spec_from_source,
)

QUIET = {"stdout": io.StringIO()}
DIMS = ("n", "m", "k")
OUT_EXPRS = ("cdiv(n, 2)", "n * m", "n + 1", "max(n, k)")
rng = np.random.default_rng(3)


def library(name: str, language: str = "opencl"):
    return next(s for s in load_library()[name] if s.language == language)


# --- random signatures --------------------------------------------------------------------


@st.composite
def signatures(draw):
    """A C kernel signature: input/inout arrays over the dims (a size may be ``n * m``),
    outputs whose sizes may be expressions, integer scalars for some dims (for every dim no
    input shape gives), and maybe a float scalar."""
    arrays, used_plain = [], set()
    for i in range(draw(st.integers(1, 3))):
        ndim = draw(st.integers(1, 2))
        shape = [draw(st.sampled_from(DIMS)) for _ in range(ndim)]
        if i > 0 and draw(st.integers(0, 4)) == 0:
            shape[-1] = "n * m"
        role = "inout" if draw(st.integers(0, 4)) == 0 else "in"
        arrays.append((f"x{i}", role, shape))
        used_plain.update(d for d in shape if d in DIMS)
    outputs = []
    for i in range(draw(st.integers(0 if any(r == "inout" for _, r, _ in arrays) else 1, 2))):
        ndim = draw(st.integers(1, 2))
        outputs.append((f"out{i}", [draw(st.sampled_from(DIMS + OUT_EXPRS)) for _ in range(ndim)]))
    needed = {n for _, _, shape in arrays for d in shape for n in dim_names(d)}
    needed |= {n for _, shape in outputs for d in shape for n in dim_names(d)}
    scalars = [d for d in DIMS if d in needed and (d not in used_plain or draw(st.booleans()))]
    params = [f"{name}: {'inout ' if role == 'inout' else ''}float32[{', '.join(shape)}]" for name, role, shape in arrays]
    params += [f"{name}: out float32[{', '.join(shape)}]" for name, shape in outputs]
    params += [f"{d}: int32" for d in scalars]
    if draw(st.booleans()):
        params.append("alpha: float32")
    order = draw(st.permutations(params))
    signature = f"k({', '.join(order)})"
    source = "__kernel void k(__global float *x0) { }"
    return spec_from_source(source, "opencl", signature=signature)


class _Pool:  # what a DeviceHandle needs of its pool
    closed = False

    def release(self, worker, id):
        pass


_POOL = _Pool()


def handle(shape, dtype):
    dtype = np.dtype(dtype)
    return DeviceHandle(_POOL, "h", "w", "fpga/opencl/fallback/0", "PoCL",
                        {"shape": list(shape), "dtype": dtype.str, "nbytes": math.prod(shape) * dtype.itemsize})


BAD_SCALARS = (True, 2.5, "4", 2**40, -1, 0, np.float64(3.0))


@st.composite
def calls(draw, spec):
    """Arguments for ``spec``: mostly consistent with one choice of dims, with some array
    extents, dtypes, ranks and explicit size scalars off; positionally or by name."""
    truth = {d: draw(st.integers(1, 5)) for d in DIMS}
    values = {}
    for p in spec.params:
        if p.role == "out":
            continue
        if p.shape is None:
            if p.dtype != "int32":
                values[p.name] = np.float32(1.5)
                continue
            choice = draw(st.integers(0, 5))
            if choice == 0:
                continue  # left out: filled in from the arrays, if any carries it
            values[p.name] = (draw(st.sampled_from(BAD_SCALARS)) if choice == 1
                              else draw(st.integers(-1, 6)) if choice == 2 else truth[p.name])
            continue
        shape = [eval(d, {"cdiv": lambda a, b: -(-a // b)}, dict(truth)) for d in p.shape]
        shape = [draw(st.integers(0, 6)) if draw(st.integers(0, 6)) == 0 else s for s in shape]
        if draw(st.integers(0, 15)) == 0:
            shape.append(2)
        dtype = np.float64 if draw(st.integers(0, 15)) == 0 else np.float32
        values[p.name] = handle(shape, dtype) if draw(st.integers(0, 3)) == 0 else np.zeros(shape, dtype)
    accepted = [p.name for p in spec.params if p.role != "out"]
    cut = draw(st.integers(0, len(accepted)))
    if any(name not in values for name in accepted[:cut]):  # a left-out scalar ends the positional part
        cut = next(i for i, name in enumerate(accepted) if name not in values)
    args = tuple(values[name] for name in accepted[:cut])
    kwargs = {name: values[name] for name in accepted[cut:] if name in values}
    return args, kwargs


def oracle(spec, args, kwargs):
    """What a call should give, worked out independently of bind: (dims, None) when the
    arguments agree, else (None, names of the arguments in some disagreement)."""
    accepted = [p for p in spec.params if p.role != "out"]
    given = dict(zip((p.name for p in accepted), args)) | kwargs
    bad, seen = set(), {}  # seen: dim -> {value: names that gave it}
    for p in accepted:
        if p.shape is None or p.name not in given:
            continue
        value = given[p.name]
        if np.dtype(value.dtype) != np.float32 or len(value.shape) != len(p.shape):
            bad.add(p.name)
            continue
        for size, d in zip(value.shape, p.shape):
            if d in DIMS:
                seen.setdefault(d, {}).setdefault(size, set()).add(p.name)
    for p in accepted:
        if p.shape is not None or p.dtype != "int32" or p.name not in given:
            continue
        value = given[p.name]
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            bad.add(p.name)
        else:
            seen.setdefault(p.name, {}).setdefault(int(value), set()).add(p.name)
    dims = {}
    for d, values in seen.items():
        if len(values) > 1:
            bad.update(*values.values())
        elif not 1 <= next(iter(values)) <= MAX_DIM_32:
            bad.update(*values.values())
        else:
            dims[d] = next(iter(values))
    for p in accepted:
        if p.shape is None and p.dtype == "int32" and p.name not in given and p.name not in seen:
            bad.add(p.name)  # a size nothing gives
    if bad:
        return None, bad
    for p in accepted:  # sizes such as n * m
        if p.shape is not None:
            want = [eval(d, {"cdiv": None}, dict(dims)) for d in p.shape]
            if list(given[p.name].shape) != want:
                bad.add(p.name)
                bad.update(n for d in p.shape for n in dim_names(d))
    return (None, bad) if bad else (dims, None)


def named(message: str, names) -> bool:
    return any(f"'{n}'" in message or f"{n}.shape" in message or f"{n}=" in message for n in names)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_bind_either_names_the_offender_or_every_buffer_fits(data):
    spec = data.draw(signatures())
    args, kwargs = data.draw(calls(spec))
    dims, offenders = oracle(spec, args, kwargs)
    try:
        bound = bind(spec, args, kwargs)
    except KernelArgumentError as e:
        event("refused")
        assert offenders, f"bind refused arguments that agree: {e}"
        assert named(str(e), offenders), f"{e!s} names none of {sorted(offenders)}"
        return
    event("accepted")
    assert offenders is None, f"bind accepted arguments that disagree ({sorted(offenders)}): {bound.dims}"
    assert bound.dims == dims
    check_launch(spec, bound)  # the worker's last look agrees
    ev = {"cdiv": lambda a, b: -(-a // b), "max": max}
    for p in spec.params:
        if p.shape is None:
            if p.name in dims:  # a size argument is exactly its dim
                assert bound.values[p.name] == dims[p.name] and bound.values[p.name].dtype == np.int32
            continue
        want = tuple(eval(d, ev, dict(dims)) for d in p.shape)
        if p.role == "out":
            assert bound.out_shapes[p.name] == want and min(want) >= 1
        else:
            assert tuple(bound.values[p.name].shape) == want
    # The launch size is the first output's shape: never past its end.
    first = next(p for p in spec.params if p.role in ("out", "inout"))
    grid = bound.grid(spec)
    assert grid == (bound.out_shapes[first.name] if first.role == "out" else tuple(bound.values[first.name].shape))


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_explicit_sizes_must_equal_every_array_carrying_them(data):
    """The issue's case in general: a correct array set, one explicit size off by anything."""
    spec = library("matmul")
    m, k, n = (data.draw(st.integers(1, 40)) for _ in range(3))
    a, b = np.zeros((m, k), np.float32), np.zeros((k, n), np.float32)
    which = data.draw(st.sampled_from("mnk"))
    true = {"m": m, "n": n, "k": k}[which]
    value = data.draw(st.integers(-5, 2**33).filter(lambda v: v != true))
    holder = {"m": "a.shape[0]", "k": "a.shape[1]", "n": "b.shape[1]"}[which]
    with pytest.raises(KernelArgumentError) as err:
        bind(spec, (a, b), {which: value})
    assert f"{which}={value} does not match {holder}={true}" in str(err.value)
    bound = bind(spec, (a, b), {which: true})  # the right one is accepted
    assert bound.out_shapes == {"c": (m, n)} and bound.grid(spec) == (n, m)


# --- the cases the issue names, without a pool --------------------------------------------


A = np.zeros(1000, np.float32)


@pytest.mark.parametrize("n", [1, 999, 1001, 10**6])
def test_vector_add_with_a_wrong_n_names_n_and_a(n):
    with pytest.raises(KernelArgumentError, match=rf"n={n} does not match a\.shape\[0\]=1000"):
        bind(library("vector_add"), (A, A), {"n": n})
    with pytest.raises(KernelArgumentError, match=rf"n={n} does not match a\.shape\[0\]=1000"):
        bind(library("vector_add"), (A, A, n), {})  # positionally too


@pytest.mark.parametrize("n, why", [
    (True, "a bool is not one"), (1000.0, "a whole number"), ("1000", "a whole number"),
    (np.float32(1000), "a whole number"), (np.ones(1), "must be a scalar"),
])
def test_a_size_must_be_a_whole_number(n, why):
    with pytest.raises(KernelArgumentError, match=rf"argument 'n' .*{why}"):
        bind(library("vector_add"), (A, A), {"n": n})


@pytest.mark.parametrize("n", [1000, np.int64(1000), np.int32(1000), np.array(1000)])
def test_a_right_size_in_any_integer_type_is_accepted(n):
    bound = bind(library("vector_add"), (A, A), {"n": n})
    assert bound.values["n"] == 1000 and type(bound.values["n"]) is np.int32
    assert bound.out_shapes == {"out": (1000,)} and bound.grid(library("vector_add")) == (1000,)


@pytest.mark.parametrize("kwargs, match", [
    ({"width": 0, "height": 8}, r"width=0 is 0"),
    ({"width": -4, "height": 8}, r"width=-4 is negative"),
    ({"width": 8, "height": 2**31}, r"height=2147483648 is above 2,147,483,647"),
    ({"width": 2**16, "height": 2**16}, r"output 'out' would have shape \(65536, 65536\), more than 2,147,483,647"),
    ({"width": 8, "height": True}, r"argument 'height' .*bool"),
])
def test_sizes_given_only_as_scalars_are_range_checked(kwargs, match):
    """mandelbrot's output comes from width and height alone: nothing to compare them with,
    so they must at least be sizes a launch can have."""
    rest = dict(x0=-2.0, x1=1.0, y0=-1.0, y1=1.0, max_iter=10)
    with pytest.raises(KernelArgumentError, match=match):
        bind(library("mandelbrot"), (), kwargs | rest)


def test_empty_arrays_are_refused_for_c_kernels():
    empty = np.zeros(0, np.float32)
    with pytest.raises(KernelArgumentError, match=r"a\.shape\[0\]=0 is 0"):
        bind(library("vector_add"), (empty, empty), {})


def test_matmul_with_a_mismatched_k():
    a, b = np.zeros((3, 4), np.float32), np.zeros((5, 6), np.float32)
    with pytest.raises(KernelArgumentError, match=r"argument 'b' has k=5 but an earlier argument set k=4 \(a\.shape\[1\]=4"):
        bind(library("matmul"), (a, b), {})
    good_b = np.zeros((4, 6), np.float32)
    with pytest.raises(KernelArgumentError, match=r"k=5 does not match a\.shape\[1\]=4"):
        bind(library("matmul"), (a, good_b), {"k": 5})
    assert bind(library("matmul"), (a, good_b), {"m": 3, "n": 6, "k": 4}).out_shapes == {"c": (3, 6)}


def test_handles_are_checked_by_their_metadata():
    spec = library("vector_add")
    h = handle((1000,), np.float32)
    with pytest.raises(KernelArgumentError, match=r"n=10 does not match a\.shape\[0\]=1000"):
        bind(spec, (h, A), {"n": 10})
    with pytest.raises(KernelArgumentError, match=r"argument 'b' has n=1000 but an earlier argument set n=7"):
        bind(spec, (handle((7,), np.float32), h), {})
    with pytest.raises(KernelArgumentError, match=r"argument 'a' has dtype float64"):
        bind(spec, (handle((1000,), np.float64), A), {})
    assert bind(spec, (h, A), {"n": 1000}).dims == {"n": 1000}


def test_a_strided_device_array_is_refused():
    class DeviceArray:  # what cl_array.Array and cupy.ndarray look like to bind
        def __init__(self, shape, contiguous):
            self.shape, self.dtype = shape, np.dtype(np.float32)
            self.flags = types.SimpleNamespace(c_contiguous=contiguous)

    spec = library("vector_add")
    with pytest.raises(KernelArgumentError, match=r"argument 'a' is not a contiguous array"):
        bind(spec, (DeviceArray((1000,), False), A), {})
    assert bind(spec, (DeviceArray((1000,), True), A), {}).dims == {"n": 1000}
    # A strided NumPy array is fine: it is copied into a dense buffer on the way.
    assert bind(spec, (np.zeros(2000, np.float32)[::2], A), {}).dims == {"n": 1000}


def test_sizes_that_are_expressions_of_scalar_dims():
    spec = spec_from_source("__kernel void f(__global float *a) {}", "opencl",
                            signature="f(a: float32[n * m], out: out float32[n, m], n: int32, m: int32)")
    assert bind(spec, (np.zeros(12, np.float32),), {"n": 3, "m": 4}).out_shapes == {"out": (3, 4)}
    with pytest.raises(KernelArgumentError, match=r"argument 'a' has shape \(12,\), expected \[n \* m\] with n=3, m=5"):
        bind(spec, (np.zeros(12, np.float32),), {"n": 3, "m": 5})


def test_the_worker_refuses_a_bound_call_that_was_tampered_with():
    """check_launch, the last look launch_c_kernel takes, trusts nothing bind did not derive."""
    spec = library("vector_add")
    bound = bind(spec, (A, A), {})
    bound.values["n"] = np.int32(10**6)
    with pytest.raises(KernelArgumentError, match=r"refusing to launch: n=.*1000000.*the arrays give 1000"):
        check_launch(spec, bound)
    bound = bind(spec, (A, A), {})
    bound.values["b"] = np.zeros(10, np.float32)
    with pytest.raises(KernelArgumentError, match=r"refusing to launch: argument 'b' is float32\[10\], expected float32\[1000\]"):
        check_launch(spec, bound)
    bound = bind(spec, (A, A), {})
    bound.out_shapes["out"] = (10**6,)
    with pytest.raises(KernelArgumentError, match=r"refusing to launch: output 'out'"):
        check_launch(spec, bound)


@pytest.mark.parametrize("signature, match", [
    ("f(a: float32[n], out: out float32[m])", r"the size 'm' in the shape of 'out' uses 'm', which neither"),
    ("f(a: float32[n], out: out float32[n], n: float32)", r"'n' is a size .* integer dtype, not float32"),
    ("f(a: float32[n], out: out float32[n.bit_length()])", r"unsupported size"),
    ("f(a: float32[n], out: out float32[n ** 9])", r"unsupported size"),
    ("f(a: float32[n], out: out float32[open(n)])", r"the only functions are cdiv, min, max"),
])
def test_signatures_whose_sizes_nothing_gives_are_refused(signature, match):
    with pytest.raises(KernelError, match=match):
        spec_from_source("__kernel void f(__global float *a) {}", "opencl", signature=signature)


# --- on a worker (PoCL) ---------------------------------------------------------------------


def test_wrong_explicit_sizes_are_refused_before_anything_is_sent(pool):
    a, b = rng.random(1000, dtype=np.float32), rng.random(1000, dtype=np.float32)
    before = pool.last_run()
    for n in (1, 10**6):
        with pytest.raises(KernelArgumentError, match=rf"n={n} does not match a\.shape\[0\]=1000"):
            pool.call("vector_add", a, b, n=n)
    with pytest.raises(KernelArgumentError, match=r"k=5 does not match a\.shape\[1\]=4"):
        pool.call("matmul", np.zeros((3, 4), np.float32), np.zeros((4, 2), np.float32), k=5)
    assert pool.last_run() is before
    # The right explicit n runs, and gives the right answer, on PoCL.
    np.testing.assert_allclose(pool.call("vector_add", a, b, n=1000, target="fpga", fallback=True), a + b, rtol=1e-6)
    assert pool.last_run().inputs == ("a", "b", "n")
    np.testing.assert_allclose(pool.call("vector_add", a, b, 1000, target="cpu", fallback=True), a + b, rtol=1e-6)
    m = rng.random((33, 20), dtype=np.float32), rng.random((20, 17), dtype=np.float32)
    np.testing.assert_allclose(pool.call("matmul", *m, m=33, n=17, k=20), m[0] @ m[1], rtol=1e-5)


def test_a_kept_handle_with_a_wrong_n_is_refused(pool):
    a = rng.random(1000, dtype=np.float32)
    kept = pool.call("vector_add", a, a, target="fpga", fallback=True, keep=True)
    with pytest.raises(KernelArgumentError, match=r"n=10 does not match a\.shape\[0\]=1000"):
        pool.call("vector_add", kept, a, n=10, target="fpga", fallback=True)
    np.testing.assert_allclose(pool.call("vector_add", kept, a, n=1000, target="fpga", fallback=True), 3 * a, rtol=1e-6)


def test_the_worker_checks_what_did_not_come_through_the_client(pool):
    """A cell calls kernels on the worker directly: no client-side bind there, and the
    worker's own refuses the same way, before any launch."""
    a = rng.random(1000, dtype=np.float32)
    for n in (1, 10**6):
        with pytest.raises(KernelArgumentError, match=rf"n={n} does not match a\.shape\[0\]=1000"):
            pool.run(f"r = kernels.vector_add(a, a, n={n})", "fpga", inputs={"a": a}, fallback=True, **QUIET)
    # A device array made in the cell (a view into the middle of another) is checked too.
    with pytest.raises(KernelArgumentError, match=r"n=1000 does not match a\.shape\[0\]=500"):
        pool.run("d = cl_array.to_device(queue, a)\nr = kernels.vector_add(d[:500], d[:500], n=1000)",
                 "fpga", inputs={"a": a}, fallback=True, **QUIET)
    result = pool.run("r = kernels.vector_add(a, a, n=1000)", "fpga", inputs={"a": a}, fallback=True, **QUIET)
    np.testing.assert_allclose(result["r"], 2 * a, rtol=1e-6)
