"""A signature as bind walks it: what each parameter is, worked out once per kernel
(``KernelSpec.bind_plan``), since bind runs on every call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .dims import _MAX_DIM_64, MAX_DIM_32, dim_names

if TYPE_CHECKING:
    from .spec import Param


@dataclass(frozen=True)
class _ParamPlan:
    """What bind needs to know of one parameter, worked out once per kernel."""

    param: Param
    dtype: np.dtype
    dims: tuple[tuple[str, bool], ...]  # (size expression, is it a plain dim name)
    integer: bool
    dim: bool = False  # an integer scalar named like a dim: the dim's value, checked against the arrays
    plain: bool = True  # an array whose sizes are all plain dim names


@dataclass(frozen=True)
class _BindPlan:
    by_name: dict[str, _ParamPlan]
    accepted: tuple[_ParamPlan, ...]  # what a caller passes, in order
    arrays: tuple[_ParamPlan, ...]  # inputs and inout arrays
    scalars: tuple[_ParamPlan, ...]  # scalars that are not dims
    outputs: tuple[_ParamPlan, ...]  # allocated by the pool
    dim_scalars: tuple[_ParamPlan, ...] = ()
    exprs: tuple[_ParamPlan, ...] = ()  # arrays with a size that is an expression, checked once all dims are known
    min_dim: int = 0  # 1 for a C kernel: no launch on nothing
    limit: int = _MAX_DIM_64  # the largest dim, and the most elements in one array


def _bind_plan(params: tuple[Param, ...], language: str = "", grid: tuple[str, ...] = ()) -> _BindPlan:
    named = {n for p in params for d in p.shape or () for n in dim_names(d)}
    named.update(n for g in grid for n in dim_names(g))
    plans = []
    for p in params:
        dtype = np.dtype(p.dtype)
        integer = np.issubdtype(dtype, np.integer)
        dims = tuple((d, d.isidentifier()) for d in p.shape or ())
        plans.append(_ParamPlan(p, dtype, dims, integer, dim=p.shape is None and integer and p.name in named,
                                plain=all(plain for _, plain in dims)))
    c_kernel = language in ("opencl", "cuda")
    dim_scalars = tuple(pp for pp in plans if pp.dim)
    narrow = not dim_scalars or any(pp.dtype.itemsize <= 4 for pp in dim_scalars)
    return _BindPlan(
        by_name={pp.param.name: pp for pp in plans},
        accepted=tuple(pp for pp in plans if pp.param.role != "out"),
        arrays=tuple(pp for pp in plans if pp.param.shape is not None and pp.param.role != "out"),
        scalars=tuple(pp for pp in plans if pp.param.role == "scalar" and not pp.dim),
        outputs=tuple(pp for pp in plans if pp.param.role == "out"),
        dim_scalars=dim_scalars,
        exprs=tuple(pp for pp in plans if pp.param.shape is not None and pp.param.role != "out" and not pp.plain),
        min_dim=1 if c_kernel else 0,
        limit=MAX_DIM_32 if c_kernel and narrow else _MAX_DIM_64,
    )
