"""Binding a call's arguments to a kernel's signature, and the last look before a launch.

A C kernel trusts what it is given: the sizes it indexes with and the buffers it indexes.
bind makes the two agree before anything is launched, on the client (before anything is
sent) and again on the worker (launch_c_kernel binds what arrived): every dim has one
value, equal to the extent of every array that carries it; a dim the caller passes as a
scalar must equal it too; the pool's outputs and the launch size are worked out from
those dims only. So a kernel that guards its indices with its size arguments (as the
shipped ones do) never reads or writes outside its buffers.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import KernelArgumentError
from .dims import _dims_text, _eval_dim
from .plan import _BindPlan, _ParamPlan
from .spec import KernelSpec


@dataclass
class Bound:
    """A call's arguments matched to a signature: what the launch needs."""

    values: dict[str, Any]  # inputs, inout arrays and scalars, by parameter name
    out_shapes: dict[str, tuple[int, ...]]  # outputs to allocate
    dims: dict[str, int] = field(default_factory=dict)

    def grid(self, spec: KernelSpec) -> tuple[int, ...]:
        """The launch size, per dimension, from the checked dims (never from an argument)."""
        grid = tuple(_eval_dim(g, self.dims, spec.name) for g in spec.grid)
        if grid and min(grid) < 1:
            raise KernelArgumentError(
                f"kernel {spec.name!r}: launch size ({', '.join(spec.grid)}) = {grid} with "
                f"{', '.join(f'{d}={v}' for d, v in self.dims.items())}: every extent must be at least 1"
            )
        return grid


_SCALAR_TYPES = (int, float, complex, bool, np.generic)
_MISSING = object()


def bind(spec: KernelSpec, args: tuple, kwargs: dict) -> Bound:
    """Match ``args``/``kwargs`` to the signature, checking count, dtype and shape.

    Outputs are not passed; inputs, inout arrays and scalars are, positionally in signature
    order or by name. Every dim takes one value, from the arrays that carry it or from the
    scalar of its name, and they must all agree; outputs and the launch size come from the
    dims. Errors name the argument(s) and what was expected. Values only need ``shape`` and
    ``dtype`` (NumPy and device arrays, handles).
    """
    plan = spec.bind_plan
    given = _gather_arguments(spec, plan, args, kwargs)
    dims = _dims_from_arrays(spec, plan, given)
    if plan.dim_scalars:
        _check_size_scalars(spec, plan, given, dims)
    _check_dim_range(spec, plan, given, dims)
    if plan.dim_scalars:
        _fill_size_scalars(spec, plan, given, dims)
    if plan.scalars:
        _convert_scalars(spec, plan, given)
    if plan.exprs:  # sizes such as n * m, now that every dim is known
        _check_size_expressions(spec, plan, given, dims)
    return Bound(given, _output_shapes(spec, plan, dims), dims)


def _gather_arguments(spec: KernelSpec, plan: _BindPlan, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by parameter name: positional ones in signature order, then
    keywords (not outputs, not twice)."""
    accepted, by_name = plan.accepted, plan.by_name
    if len(args) > len(accepted):
        raise KernelArgumentError(
            f"kernel {spec.name!r} takes {len(accepted)} argument(s) "
            f"({', '.join(pp.param.name for pp in accepted)}) but {len(args)} were given; "
            f"signature: {spec.signature()}"
        )
    given = {pp.param.name: value for pp, value in zip(accepted, args)}
    for key, value in kwargs.items():
        pp = by_name.get(key)
        if pp is None:
            raise KernelArgumentError(f"kernel {spec.name!r} has no argument {key!r}; signature: {spec.signature()}")
        if pp.param.role == "out":
            raise KernelArgumentError(f"kernel {spec.name!r}: {key!r} is an output; the pool allocates it")
        if key in given:
            raise KernelArgumentError(f"kernel {spec.name!r} got argument {key!r} twice")
        given[key] = value
    return given


def _dims_from_arrays(spec: KernelSpec, plan: _BindPlan, given: dict[str, Any]) -> dict[str, int]:
    """Check each array argument (there, an array, its dtype, dense, its rank, not too
    large) and take every plain dim from the arrays that carry it, which must agree."""
    dims: dict[str, int] = {}
    limit = plan.limit
    for pp in plan.arrays:
        p = pp.param
        value = given.get(p.name, _MISSING)
        if value is _MISSING:
            raise KernelArgumentError(f"kernel {spec.name!r}: missing array argument {p.name!r} ({p})")
        if not hasattr(value, "shape"):
            raise KernelArgumentError(f"kernel {spec.name!r}: argument {p.name!r} must be an array ({p}), "
                                      f"got {type(value).__name__}")
        dtype = getattr(value, "dtype", None)
        if dtype != pp.dtype:  # a dtype, or something that names one
            dtype = np.asarray(value).dtype if dtype is None else np.dtype(dtype)
            if dtype != pp.dtype:
                raise KernelArgumentError(
                    f"kernel {spec.name!r}: argument {p.name!r} has dtype {dtype}, expected {p.dtype} ({p})"
                )
        if not isinstance(value, np.ndarray):  # a device array is used in place: it must be dense
            flags = getattr(value, "flags", None)
            if flags is not None and not getattr(flags, "c_contiguous", True):
                raise KernelArgumentError(
                    f"kernel {spec.name!r}: argument {p.name!r} is not a contiguous array (a strided view "
                    f"of shape {tuple(value.shape)}); pass a contiguous copy"
                )
        shape = tuple(value.shape)
        if len(shape) != len(pp.dims):
            raise KernelArgumentError(
                f"kernel {spec.name!r}: argument {p.name!r} has shape {shape}, expected "
                f"{len(p.shape)} dimension(s) [{', '.join(p.shape)}]"
            )
        for size, (dim, plain) in zip(shape, pp.dims):
            if plain and dims.setdefault(dim, size) != size:
                raise KernelArgumentError(
                    f"kernel {spec.name!r}: argument {p.name!r} has {dim}={size} but an earlier "
                    f"argument set {dim}={dims[dim]} ({_dim_source(plan, dim, given)}; {p.name!r} has shape "
                    f"{shape}, expected [{', '.join(p.shape)}])"
                )
        if len(shape) > 1 and math.prod(shape) > limit:
            raise KernelArgumentError(
                f"kernel {spec.name!r}: argument {p.name!r} of shape {shape} has more than {limit:,} elements, "
                f"the most a kernel taking 32-bit sizes can index"
            )
    return dims


def _check_size_scalars(spec: KernelSpec, plan: _BindPlan, given: dict[str, Any], dims: dict[str, int]) -> None:
    """A size scalar the caller gives (``n``) is a whole number equal to the dim the arrays
    give, or gives the dim no array carries; one left out must be a dim the arrays give."""
    for pp in plan.dim_scalars:
        p = pp.param
        value = given.get(p.name, _MISSING)
        if value is _MISSING:
            if p.name not in dims:
                raise KernelArgumentError(f"kernel {spec.name!r}: missing scalar argument {p.name!r} ({p})")
            continue  # filled in from the arrays by _fill_size_scalars
        if not isinstance(value, _SCALAR_TYPES) and np.ndim(value) != 0:
            raise KernelArgumentError(
                f"kernel {spec.name!r}: argument {p.name!r} must be a scalar ({p}), got an array of shape "
                f"{tuple(np.shape(value))}"
            )
        if isinstance(value, (bool, np.bool_)):
            raise KernelArgumentError(
                f"kernel {spec.name!r}: argument {p.name!r} must be a {p.dtype} scalar ({p}), got {value!r}: "
                f"{p.name} is a size, and a bool is not one"
            )
        try:
            size = operator.index(value)
        except TypeError:
            raise KernelArgumentError(
                f"kernel {spec.name!r}: argument {p.name!r} must be a {p.dtype} scalar ({p}), got {value!r}: "
                f"{p.name} is a size, a whole number"
            ) from None
        known = dims.setdefault(p.name, size)
        if known != size:
            raise KernelArgumentError(
                f"kernel {spec.name!r}: {p.name}={size} does not match {_dim_source(plan, p.name, given)}: "
                f"argument {p.name!r} is a size of the arrays it goes with (leave it out to have it "
                f"filled in); signature: {spec.signature()}"
            )


def _check_dim_range(spec: KernelSpec, plan: _BindPlan, given: dict[str, Any], dims: dict[str, int]) -> None:
    """Every dim is at least the plan's least (1 for a C kernel) and at most its limit."""
    lowest, limit = plan.min_dim, plan.limit
    for dim, size in dims.items():
        if not lowest <= size <= limit:
            raise KernelArgumentError(
                f"kernel {spec.name!r}: {_dim_source(plan, dim, given) or f'argument {dim}={size}'} "
                + (f"is above {limit:,}, the most a kernel taking 32-bit sizes can index" if size > limit
                   else "is negative" if size < 0 else "is 0: a C kernel cannot be launched on nothing")
            )


def _fill_size_scalars(spec: KernelSpec, plan: _BindPlan, given: dict[str, Any], dims: dict[str, int]) -> None:
    """Each size scalar becomes its dim, in its own dtype (which it must fit)."""
    for pp in plan.dim_scalars:
        p = pp.param
        try:
            given[p.name] = pp.dtype.type(dims[p.name])
        except (OverflowError, ValueError):
            raise KernelArgumentError(
                f"kernel {spec.name!r}: {_dim_source(plan, p.name, given) or f'{p.name}={dims[p.name]}'} "
                f"does not fit the {p.dtype} argument {p.name!r} ({p})"
            ) from None


def _convert_scalars(spec: KernelSpec, plan: _BindPlan, given: dict[str, Any]) -> None:
    """Each other scalar is given, is a scalar, and becomes its dtype."""
    for pp in plan.scalars:
        p = pp.param
        value = given.get(p.name, _MISSING)
        if value is _MISSING:
            raise KernelArgumentError(f"kernel {spec.name!r}: missing scalar argument {p.name!r} ({p})")
        if not isinstance(value, _SCALAR_TYPES) and np.ndim(value) != 0:
            raise KernelArgumentError(
                f"kernel {spec.name!r}: argument {p.name!r} must be a scalar ({p}), got an array of shape "
                f"{tuple(np.shape(value))}"
            )
        try:
            given[p.name] = pp.dtype.type(value)
        except (TypeError, ValueError, OverflowError) as e:
            raise KernelArgumentError(
                f"kernel {spec.name!r}: argument {p.name!r} must be a {p.dtype} scalar ({p}), got {value!r} ({e})"
            ) from None


def _check_size_expressions(spec: KernelSpec, plan: _BindPlan, given: dict[str, Any], dims: dict[str, int]) -> None:
    """An array size that is an expression (``n * m``) equals its value with the dims."""
    for pp in plan.exprs:
        p = pp.param
        shape = tuple(given[p.name].shape)
        for size, (expr, plain) in zip(shape, pp.dims):
            if not plain and _eval_dim(expr, dims, spec.name) != size:
                raise KernelArgumentError(
                    f"kernel {spec.name!r}: argument {p.name!r} has shape {shape}, expected [{', '.join(p.shape)}] "
                    f"with {_dims_text(p.shape, dims)}: {expr} = {_eval_dim(expr, dims, spec.name)}"
                )


def _output_shapes(spec: KernelSpec, plan: _BindPlan, dims: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """The shape of each output the pool allocates, from the dims only."""
    lowest, limit = plan.min_dim, plan.limit
    out_shapes = {}
    for pp in plan.outputs:
        if pp.plain and all(d in dims for d, _ in pp.dims):  # sizes checked above
            shape = tuple([dims[d] for d, _ in pp.dims])
        else:
            shape = tuple(_eval_dim(d, dims, spec.name) for d, _ in pp.dims)
            if shape and min(shape) < lowest:
                raise KernelArgumentError(
                    f"kernel {spec.name!r}: output {pp.param.name!r} would have shape {shape} "
                    f"([{', '.join(pp.param.shape)}] with {_dims_text(pp.param.shape, dims)})"
                )
        if (len(shape) > 1 or not pp.plain) and math.prod(shape) > limit:
            raise KernelArgumentError(
                f"kernel {spec.name!r}: output {pp.param.name!r} would have shape {shape}, more than "
                f"{limit:,} elements, the most a kernel taking 32-bit sizes can index"
            )
        out_shapes[pp.param.name] = shape
    return out_shapes


def _dim_source(plan: _BindPlan, dim: str, given: dict) -> str:
    """Where a dim's value came from, for error messages: the first array carrying it
    ("a.shape[0]=1000"), else the scalar of its name; "" when nothing gave it."""
    for pp in plan.arrays:
        value = given.get(pp.param.name)
        shape = getattr(value, "shape", None)
        if shape is None:
            continue
        for axis, (d, plain) in enumerate(pp.dims):
            if plain and d == dim and axis < len(shape):
                return f"{pp.param.name}.shape[{axis}]={shape[axis]}"
    if dim in given:
        return f"argument {dim}={given[dim]!r}"
    return ""


def check_launch(spec: KernelSpec, bound: Bound) -> None:
    """The last look before a launch, on the worker: every array the kernel gets has the
    shape and dtype its signature gives with the bound dims, every output is allocated at
    that shape, and every size argument is its dim. (bind made it so; this keeps a launch
    from trusting anything else.)"""
    plan, dims, values = spec.bind_plan, bound.dims, bound.values
    for pp in plan.arrays:
        value = values[pp.param.name]
        want = _shape_of(pp, dims, spec.name)
        if tuple(value.shape) != want or value.dtype != pp.dtype:
            raise KernelArgumentError(
                f"kernel {spec.name!r}: refusing to launch: argument {pp.param.name!r} is "
                f"{value.dtype}{list(value.shape)}, expected {pp.dtype}{list(want)} ({pp.param})"
            )
    for pp in plan.outputs:
        want = _shape_of(pp, dims, spec.name)
        if bound.out_shapes[pp.param.name] != want:
            raise KernelArgumentError(f"kernel {spec.name!r}: refusing to launch: output {pp.param.name!r} "
                                      f"would be {bound.out_shapes[pp.param.name]}, expected {want}")
    for pp in plan.dim_scalars:
        if values[pp.param.name] != dims[pp.param.name]:
            raise KernelArgumentError(f"kernel {spec.name!r}: refusing to launch: {pp.param.name}="
                                      f"{values[pp.param.name]!r}, but the arrays give {dims[pp.param.name]}")


def _shape_of(pp: _ParamPlan, dims: dict[str, int], kernel: str) -> tuple[int, ...]:
    if pp.plain and all(d in dims for d, _ in pp.dims):
        return tuple([dims[d] for d, _ in pp.dims])
    return tuple([dims[d] if plain else _eval_dim(d, dims, kernel) for d, plain in pp.dims])


def sample_arguments(spec: KernelSpec, size: int = 64) -> tuple:
    """Small zero arguments that fit the signature (every dim ``size``): what warm-up
    launches a C kernel with, since PoCL and the CUDA driver finish code generation only
    at a kernel's first launch."""
    names = {n for p in spec.params or () if p.shape for d in p.shape
             for n in re.findall(r"[A-Za-z_]\w*", d) if n not in ("cdiv", "min", "max")}
    dims = dict.fromkeys(names, size)
    args = []
    for p in spec.params or ():
        if p.role == "out":
            continue
        if p.shape is None:
            args.append(np.dtype(p.dtype).type(dims.get(p.name, 1)))
        else:
            args.append(np.zeros(tuple(_eval_dim(d, dims, spec.name) for d in p.shape), np.dtype(p.dtype)))
    return tuple(args)
