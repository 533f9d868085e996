"""What a registered kernel is: its source in its own language, and its signature.

A signature reads like a Python function header with numpy dtypes and symbolic shapes::

    scale(a: float32[n], out: out float32[n], k: float32)

Parameters are listed in the kernel's own order. Arrays have a shape in brackets; ``out``
marks an output (allocated by the pool, shape from the inputs' dims), ``inout`` an array
that is read and written; a parameter without brackets is a scalar. A scalar named like a
dim (``n: int32``) is filled with that dim's value when the caller leaves it out, and when
the caller gives it, it must equal the extent of every array that carries the dim (a C
kernel trusts it as the size of its buffers). Shapes may use arithmetic on dims
(``+ - * / // %``) with ``cdiv(a, b)`` (ceil division), ``min`` and ``max``:
``out float32[cdiv(n, 256)]``. Every size must be worked out from the input arrays' dims
and the integer scalars; outputs and the launch size come from those dims only.

Library kernels carry the signature and launch geometry in header comments::

    // kaas: signature: vector_add(a: float32[n], b: float32[n], out: out float32[n], n: int32)
    // kaas: targets: fpga, gpu, cpu
    // kaas: grid: n            total work-items per dimension (rounded up to the block)
    // kaas: block: 64          work-group / thread-block size per dimension
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import math
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backends import registry
from .errors import KaasError, KernelArgumentError, KernelCompileError, KernelError  # noqa: F401 (re-exported)

# language: (backend, default targets), as the backends declare them (their `languages`
# and `targets`); a read-only view of the backend registry, filled on first use.
LANGUAGES = registry.LANGUAGES
EXTENSIONS = {".cl": "opencl", ".cu": "cuda", ".py": "jax", ".qasm": "qiskit"}


@dataclass(frozen=True)
class Param:
    name: str
    role: str  # in | out | inout | scalar
    dtype: str
    shape: tuple[str, ...] | None = None  # None for scalars

    def __str__(self) -> str:
        if self.shape is None:
            return f"{self.name}: {self.dtype}"
        role = "" if self.role == "in" else f"{self.role} "
        return f"{self.name}: {role}{self.dtype}[{', '.join(self.shape)}]"


@dataclass(frozen=True)
class KernelSpec:
    name: str
    language: str
    source: str
    params: tuple[Param, ...] | None = None  # None: a Python kernel taking any arguments
    targets: tuple[str, ...] = ()
    grid: tuple[str, ...] = ()
    block: tuple[int, ...] = ()
    options: tuple[str, ...] = ()
    post: str | None = None  # "sum": reduce the single output on the device after launch
    origin: str = "user"  # user | library
    line_offset: int = 0  # where the source starts in the cell it was registered from
    doc: str = ""

    @property
    def backend(self) -> str:
        return LANGUAGES[self.language][0]

    @functools.cached_property  # a frozen dataclass still has a __dict__
    def digest(self) -> str:
        """A SHA-256 (hex) of everything the compiled form of this kernel depends on: the
        language, name, source, each build option (a tuple: options joined with spaces
        were ambiguous), the signature's parameters, and the line offset (code compiled from
        Python reports line numbers by it). The same fields, the same way, as
        ``backends.base.compiled_key``, so the two are equal. Not the launch geometry
        (grid, block, post), which the compiled form does not depend on."""
        params = None if self.params is None else tuple(
            (p.name, p.role, p.dtype, None if p.shape is None else tuple(p.shape)) for p in self.params
        )
        described = (self.language, self.name, self.source, tuple(self.options), params, self.line_offset)
        return hashlib.sha256(repr(described).encode("utf-8", "surrogatepass")).hexdigest()

    @functools.cached_property
    def bind_plan(self) -> "_BindPlan":
        """The signature as bind walks it, worked out once (bind runs on every call)."""
        return _bind_plan(self.params or (), self.language, self.grid)

    @property
    def inputs(self) -> list[Param]:
        return [p for p in self.params or () if p.role != "out"]

    @property
    def outputs(self) -> list[Param]:
        return [p for p in self.params or () if p.role in ("out", "inout")]

    def signature(self) -> str:
        if self.params is None:
            return f"{self.name}(...)"
        return f"{self.name}({', '.join(str(p) for p in self.params)})"

    def to_dict(self) -> dict:
        return {
            "name": self.name, "language": self.language, "source": self.source,
            "params": None if self.params is None else [vars(p) | {"shape": p.shape} for p in self.params],
            "targets": list(self.targets), "grid": list(self.grid), "block": list(self.block),
            "options": list(self.options), "post": self.post, "origin": self.origin,
            "line_offset": self.line_offset, "doc": self.doc,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "KernelSpec":
        params = None if d["params"] is None else tuple(
            Param(p["name"], p["role"], p["dtype"], None if p["shape"] is None else tuple(p["shape"]))
            for p in d["params"]
        )
        return cls(d["name"], d["language"], d["source"], params, tuple(d["targets"]),
                   tuple(d["grid"]), tuple(int(b) for b in d["block"]), tuple(d["options"]),
                   d.get("post"), d.get("origin", "user"), int(d.get("line_offset", 0)), d.get("doc", ""))


# --- parsing ----------------------------------------------------------------------------

_SIG = re.compile(r"^\s*(?P<name>[A-Za-z_]\w*)\s*\((?P<params>.*)\)\s*$", re.S)
_PARAM = re.compile(
    r"^\s*(?P<name>[A-Za-z_]\w*)\s*:\s*(?:(?P<role>out|inout|in)\s+)?(?P<dtype>[A-Za-z_]\w*)"
    r"\s*(?:\[(?P<shape>[^\]]*)\])?\s*$"
)


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets and parentheses."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if "".join(current).strip():
        parts.append("".join(current))
    return parts


def parse_signature(text: str) -> tuple[str, tuple[Param, ...]]:
    match = _SIG.match(text)
    if not match:
        raise KernelError(f"malformed kernel signature {text!r}; expected e.g. "
                          f"'scale(a: float32[n], out: out float32[n], k: float32)'")
    params = []
    for raw in _split_top(match["params"]):
        m = _PARAM.match(raw)
        if not m:
            raise KernelError(f"malformed parameter {raw.strip()!r} in signature {text!r}; "
                              f"expected 'name: [out|inout] dtype[dims]' or 'name: dtype'")
        try:
            dtype = np.dtype(m["dtype"]).name
        except TypeError:
            raise KernelError(f"unknown dtype {m['dtype']!r} for parameter {m['name']!r}") from None
        shape = None if m["shape"] is None else tuple(d.strip() for d in _split_top(m["shape"]))
        role = m["role"] or ("in" if shape is not None else "scalar")
        if shape is None and role != "scalar":
            raise KernelError(f"parameter {m['name']!r} is marked {role} but has no shape")
        params.append(Param(m["name"], role, dtype, shape))
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise KernelError(f"duplicate parameter names in signature {text!r}")
    return match["name"], tuple(params)


_HEADER = re.compile(r"^\s*(?://|#)\s*kaas:\s*(?P<key>[\w-]+)\s*:\s*(?P<value>.*?)\s*$")


def parse_header(source: str) -> dict[str, str]:
    return {m["key"]: m["value"] for m in map(_HEADER.match, source.splitlines()) if m}


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def spec_from_source(source: str, language: str, *, name: str | None = None,
                     signature: str | None = None, targets: tuple[str, ...] = (),
                     origin: str = "user", line_offset: int = 0) -> KernelSpec:
    """Build a spec from source text, its ``kaas:`` header, and what the caller states."""
    if language not in LANGUAGES:
        raise KernelError(f"unknown kernel language {language!r}; known: {', '.join(LANGUAGES)}")
    header = parse_header(source)
    signature = signature or header.get("signature")
    params = None
    if signature:
        sig_name, params = parse_signature(signature if "(" in signature else f"{signature}()")
        if "(" not in signature:
            params = None
        name = name or sig_name
    name = name or header.get("name")
    if not name:
        raise KernelError("a kernel needs a name")
    if language in ("opencl", "cuda") and params is None:
        raise KernelError(
            f"{language} kernel {name!r} needs a signature: which arguments are outputs and "
            f"their shapes. For example: {suggest_signature(source, name)}"
        )
    if language in ("opencl", "cuda"):
        check_defines(source, language, name)
    targets = targets or tuple(t.strip() for t in header.get("targets", "").split(",") if t.strip())
    grid = tuple(g.strip() for g in _split_top(header.get("grid", ""))) if header.get("grid") else ()
    if not grid and params:
        first_out = next((p for p in params if p.role in ("out", "inout")), None)
        grid = first_out.shape if first_out else ()
    if params:
        check_sizes(name, params, grid)
    return KernelSpec(
        name=name, language=language, source=source, params=params,
        targets=targets or LANGUAGES[language][1], grid=grid,
        block=_ints(header.get("block", "")), options=tuple(header.get("options", "").split()),
        post=header.get("post") or None, origin=origin, line_offset=line_offset,
        doc=header.get("doc", ""),
    )


def check_sizes(name: str, params: tuple[Param, ...], grid: tuple[str, ...]) -> None:
    """Every size in a signature (and the launch size) is worked out from what a call
    gives: the plain dims of its input arrays and its integer scalars. A size that nothing
    gives could never be checked against the buffers, so the signature is refused."""
    given = {d for p in params if p.shape is not None and p.role != "out" for d in p.shape if d.isidentifier()}
    scalars = {p.name: p for p in params if p.shape is None}
    given.update(n for n, p in scalars.items() if np.issubdtype(np.dtype(p.dtype), np.integer))
    sizes = [(f"the shape of {p.name!r}", d) for p in params if p.shape is not None for d in p.shape]
    sizes += [("the launch size (kaas: grid)", g) for g in grid]
    for where, expr in sizes:
        try:
            used = dim_names(expr)
        except KernelError as e:
            raise KernelError(f"kernel {name!r}, {where}: {e}") from None
        for dim in used:
            if dim in scalars and not np.issubdtype(np.dtype(scalars[dim].dtype), np.integer):
                raise KernelError(f"kernel {name!r}: {dim!r} is a size ({expr!r} in {where}), so its scalar must "
                                  f"have an integer dtype, not {scalars[dim].dtype}")
            if dim in given:
                continue
            raise KernelError(
                f"kernel {name!r}: the size {expr!r} in {where} uses {dim!r}, which neither an input array's "
                f"shape nor an integer scalar gives; add a scalar '{dim}: int32' or use {dim!r} in an input's shape"
            )


_C_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_C_KERNEL = re.compile(r"(?:\b__kernel|\bkernel|\b__global__)\b[^;{}]*?\b(?P<name>[A-Za-z_]\w*)\s*\(")
_C_ATTRIBUTE = re.compile(r"\b(?:__attribute__\s*\(\(.*?\)\)|__launch_bounds__\s*\([^)]*\))", re.S)


def kernels_in_source(source: str) -> list[str]:
    """The kernels C source appears to define (``__kernel``/``__global__`` functions), for
    messages; macros may define others."""
    code = _C_ATTRIBUTE.sub(" ", _C_COMMENT.sub(" ", source))
    return list(dict.fromkeys(m["name"] for m in _C_KERNEL.finditer(code)))


def check_defines(source: str, language: str, name: str) -> None:
    """Refuse a C kernel whose source cannot define ``name``: the name is nowhere in its
    code (comments aside). Source that includes files or pastes tokens (``##``) may define
    it through them, and is left to the device compiler."""
    code = _C_COMMENT.sub(" ", source)
    if re.search(rf"\b{re.escape(name)}\b", code) or "#include" in code or "##" in code:
        return
    found = kernels_in_source(source)
    raise KernelError(
        f"{language} kernel {name!r} is not in its source: the signature names {name!r}, but the source "
        + (f"defines {', '.join(repr(k) for k in found)}" if found else "defines no kernel")
        + ". Name the kernel in the signature as it is in the source."
    )


_C_PARAM = re.compile(r"\b(?P<type>float|double|int|uint|unsigned int|long|short|char)\s*(?P<ptr>\*)?\s*(?:restrict\s+|__restrict__\s+)?(?P<name>\w+)\s*$")
_C_TYPES = {"float": "float32", "double": "float64", "int": "int32", "uint": "uint32",
            "unsigned int": "uint32", "long": "int64", "short": "int16", "char": "int8"}


def suggest_signature(source: str, name: str) -> str:
    """A signature guessed from a C kernel's parameters, for error messages."""
    m = re.search(rf"\b{re.escape(name)}\s*\((?P<params>[^)]*)\)", source)
    if not m:
        return f'--register "{name}(a: float32[n], out: out float32[n], k: float32)"'
    params = []
    for raw in _split_top(m["params"]):
        p = _C_PARAM.search(raw.strip())
        if not p:
            continue
        dtype = _C_TYPES[p["type"]]
        if p["ptr"]:
            const = re.search(r"\bconst\b", raw)
            params.append(f"{p['name']}: {'' if const else 'out '}{dtype}[n]")
        else:
            params.append(f"{p['name']}: {dtype}")
    return f'--register "{name}({", ".join(params)})"'


# --- binding a call's arguments ---------------------------------------------------------
#
# A C kernel trusts what it is given: the sizes it indexes with and the buffers it indexes.
# bind makes the two agree before anything is launched, on the client (before anything is
# sent) and again on the worker (launch_c_kernel binds what arrived): every dim has one
# value, equal to the extent of every array that carries it; a dim the caller passes as a
# scalar must equal it too; the pool's outputs and the launch size are worked out from
# those dims only. So a kernel that guards its indices with its size arguments (as the
# shipped ones do) never reads or writes outside its buffers.

#: The largest dim, and the most elements in one array, of a C kernel that takes its sizes
#: as 32-bit integers (or takes none): its index arithmetic is 32-bit, and past this it
#: wraps round to addresses outside the buffers.
MAX_DIM_32 = 2**31 - 1
_MAX_DIM_64 = 2**63 - 1

_DIM_FUNCTION_NAMES = ("cdiv", "min", "max")
_DIM_FUNCTIONS = {"__builtins__": {}, "cdiv": lambda a, b: -(-a // b), "min": min, "max": max}
_DIM_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Call, ast.Name, ast.Load, ast.Constant,
              ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.USub, ast.UAdd)


@functools.lru_cache(maxsize=1024)
def dim_names(expr: str) -> tuple[str, ...]:
    """The dims a size uses, in order; a KernelError if it is not a size: a whole number, a
    dim, or arithmetic (``+ - * / // %``) on them with ``cdiv``, ``min`` and ``max``."""
    expected = "expected a whole number, a dim (n) or arithmetic on dims such as 'n * m' or 'cdiv(n, 256)'"
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        raise KernelError(f"malformed size {expr!r}: {expected}") from None
    functions, names = set(), []
    for node in ast.walk(tree):
        if not isinstance(node, _DIM_NODES) or (isinstance(node, ast.Constant) and type(node.value) is not int):
            raise KernelError(f"unsupported size {expr!r}: {expected}")
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in _DIM_FUNCTION_NAMES) or node.keywords:
                raise KernelError(f"unsupported size {expr!r}: the only functions are {', '.join(_DIM_FUNCTION_NAMES)}")
            functions.add(id(node.func))
        elif isinstance(node, ast.Name) and id(node) not in functions and node.id not in names:
            names.append(node.id)
    return tuple(names)


@functools.lru_cache(maxsize=1024)
def _dim_code(expr: str):
    dim_names(expr)  # only sizes are evaluated
    return compile(expr.strip(), "<dim>", "eval")


def _eval_dim(expr: str, dims: dict[str, int], kernel: str) -> int:
    """A size from the signature: a number, a dim (``n``) or an expression (``cdiv(n, 256)``)."""
    if expr in dims:
        return dims[expr]
    if expr.isdigit():
        return int(expr)
    try:
        return int(eval(_dim_code(expr), _DIM_FUNCTIONS, dict(dims)))
    except NameError as e:
        raise KernelArgumentError(f"kernel {kernel!r}: the size {expr!r} uses an unknown dim ({e})") from None
    except (ArithmeticError, TypeError, ValueError) as e:
        raise KernelArgumentError(
            f"kernel {kernel!r}: the size {expr!r} cannot be worked out with {_dims_text(expr, dims)} ({e})"
        ) from None


def _dims_text(exprs, dims: dict[str, int]) -> str:
    """``n=3, m=4``: the values of the dims that sizes use."""
    names = dict.fromkeys(n for e in ((exprs,) if isinstance(exprs, str) else exprs) for n in dim_names(e))
    return ", ".join(f"{d}={dims[d]}" for d in names if d in dims) or "no dims"


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
    for pp in plan.dim_scalars:
        p = pp.param
        value = given.get(p.name, _MISSING)
        if value is _MISSING:
            if p.name not in dims:
                raise KernelArgumentError(f"kernel {spec.name!r}: missing scalar argument {p.name!r} ({p})")
            continue  # filled in from the arrays below
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
    lowest = plan.min_dim
    for dim, size in dims.items():
        if not lowest <= size <= limit:
            raise KernelArgumentError(
                f"kernel {spec.name!r}: {_dim_source(plan, dim, given) or f'argument {dim}={size}'} "
                + (f"is above {limit:,}, the most a kernel taking 32-bit sizes can index" if size > limit
                   else "is negative" if size < 0 else "is 0: a C kernel cannot be launched on nothing")
            )
    for pp in plan.dim_scalars:
        p = pp.param
        try:
            given[p.name] = pp.dtype.type(dims[p.name])
        except (OverflowError, ValueError):
            raise KernelArgumentError(
                f"kernel {spec.name!r}: {_dim_source(plan, p.name, given) or f'{p.name}={dims[p.name]}'} "
                f"does not fit the {p.dtype} argument {p.name!r} ({p})"
            ) from None
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
    for pp in plan.exprs:  # sizes such as n * m, now that every dim is known
        p = pp.param
        shape = tuple(given[p.name].shape)
        for size, (expr, plain) in zip(shape, pp.dims):
            if not plain and _eval_dim(expr, dims, spec.name) != size:
                raise KernelArgumentError(
                    f"kernel {spec.name!r}: argument {p.name!r} has shape {shape}, expected [{', '.join(p.shape)}] "
                    f"with {_dims_text(p.shape, dims)}: {expr} = {_eval_dim(expr, dims, spec.name)}"
                )
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
    return Bound(given, out_shapes, dims)


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


def launch_c_kernel(spec: KernelSpec, args: tuple, kwargs: dict, *, allocate, upload, pointer, run,
                    input_pointer=None):
    """The launch both C dialects share (OpenCL C and CUDA C): bind the arguments, allocate
    outputs, upload inputs, run, and for a ``post: sum`` reduction kernel run it again on
    its own partial sums, on the device, until one value is left.

    ``allocate(shape, dtype)`` and ``upload(value)`` make device arrays, ``pointer(array)``
    is what the kernel takes for one, ``run(device_args, grid)`` launches. A backend whose
    read-only inputs need no array object around them (they never leave the launch) gives
    ``input_pointer(value)``: the kernel argument for an input, uploading it if need be.
    """
    # What arrived is bound again here, on the worker: a request that did not come through
    # the client's bind (or a handle whose buffer is not what its metadata said) is refused.
    bound = bind(spec, args, kwargs)
    check_launch(spec, bound)
    device_args, outputs = [], {}
    for pp in spec.bind_plan.by_name.values():  # every parameter, in the kernel's order
        p = pp.param
        if p.role == "scalar":
            device_args.append(bound.values[p.name])
            continue
        if p.role == "out":
            array = outputs[p.name] = allocate(bound.out_shapes[p.name], pp.dtype)
        elif p.role == "in" and input_pointer is not None:
            device_args.append(input_pointer(bound.values[p.name]))
            continue
        else:
            array = upload(bound.values[p.name])
            if p.role == "inout":
                outputs[p.name] = array
        device_args.append(pointer(array))
    run(device_args, bound.grid(spec))
    if spec.post == "sum":
        partial, once = next(iter(outputs.values())), dataclasses.replace(spec, post=None)
        while partial.size > 1:
            partial = launch_c_kernel(once, (partial,), {}, allocate=allocate, upload=upload,
                                      pointer=pointer, run=run, input_pointer=input_pointer)
        return partial[0:1]
    return next(iter(outputs.values())) if len(outputs) == 1 else tuple(outputs.values())


def scalar_arg_dtypes(spec: KernelSpec) -> list:
    """Each parameter's dtype if it is a scalar, else None (what PyOpenCL's
    ``set_scalar_arg_dtypes`` takes)."""
    return [pp.dtype if pp.param.role == "scalar" else None for pp in spec.bind_plan.by_name.values()]


def shift_log_lines(log: str, offset: int) -> str:
    """Compiler logs cite source lines ("input.cl:3:5:", "kernel.cu(3):"); shift them so
    they point into the notebook cell the kernel was registered from."""
    if not offset:
        return log

    def colon(m: re.Match) -> str:
        return f"{m['file']}:{int(m['line']) + offset}:"

    def paren(m: re.Match) -> str:
        return f"{m['file']}({int(m['line']) + offset})"

    log = re.sub(r"(?P<file>[\w.<>/-]+):(?P<line>\d+):(?=\d+:)", colon, log)
    return re.sub(r"(?P<file>[\w.<>/-]+)\((?P<line>\d+)\)", paren, log)


def round_up(size: int, block: int) -> int:
    return int(math.ceil(size / block) * block)


# --- the shipped library ---------------------------------------------------------------


def library_dir() -> Path:
    """The repository's kernels/ folder: installed as ``kaas_magic.library``, or found
    beside the package when running from a source checkout that was not installed."""
    try:
        from . import library

        return Path(library.__file__).parent
    except ImportError:
        return Path(__file__).resolve().parent.parent / "kernels"


def load_library() -> dict[str, list[KernelSpec]]:
    """Every shipped kernel by name; a name may have one implementation per language."""
    specs: dict[str, list[KernelSpec]] = {}
    for path in sorted(library_dir().iterdir()):
        language = EXTENSIONS.get(path.suffix)
        if language is None or path.name.startswith("_"):
            continue
        source = path.read_text()
        language = parse_header(source).get("language", language)
        spec = spec_from_source(source, language, name=parse_header(source).get("name") or path.stem.split(".")[0],
                                origin="library")
        if any(s.language == language for s in specs.get(spec.name, [])):
            raise KernelError(f"two {language} library kernels named {spec.name!r}")
        specs.setdefault(spec.name, []).append(spec)
    return specs
