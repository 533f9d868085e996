"""What a registered kernel is: its source in its own language, and its signature.

A signature reads like a Python function header with numpy dtypes and symbolic shapes::

    scale(a: float32[n], out: out float32[n], k: float32)

Parameters are listed in the kernel's own order. Arrays have a shape in brackets; ``out``
marks an output (allocated by the pool, shape from the inputs' dims), ``inout`` an array
that is read and written; a parameter without brackets is a scalar. A scalar named like a
dim (``n: int32``) is filled with that dim's value when the caller leaves it out. Shapes
may use arithmetic on dims and ``cdiv(a, b)`` (ceil division): ``out float32[cdiv(n, 256)]``.

Library kernels carry the signature and launch geometry in header comments::

    // kaas: signature: vector_add(a: float32[n], b: float32[n], out: out float32[n], n: int32)
    // kaas: targets: fpga, gpu, cpu
    // kaas: grid: n            total work-items per dimension (rounded up to the block)
    // kaas: block: 64          work-group / thread-block size per dimension
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import KaasError

LANGUAGES = {
    # language: (backend, default targets)
    "opencl": ("opencl", ("fpga", "gpu", "cpu")),
    "cuda": ("cupy", ("gpu",)),
    "jax": ("jax", ("tpu", "gpu", "cpu")),
    "qiskit": ("qiskit", ("qpu",)),
}
EXTENSIONS = {".cl": "opencl", ".cu": "cuda", ".py": "jax", ".qasm": "qiskit"}


class KernelError(KaasError):
    """A kernel is unknown, malformed, or could not be built."""


class KernelArgumentError(KaasError, TypeError):
    """A call's arguments do not match the kernel's signature."""


class KernelCompileError(KernelError):
    """The device compiler rejected the source; the message carries its log."""


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

    @functools.cached_property  # asked on every call; a frozen dataclass still has a __dict__
    def digest(self) -> str:
        text = "\0".join([self.language, self.name, self.source, " ".join(self.options)])
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    @functools.cached_property
    def bind_plan(self) -> "_BindPlan":
        """The signature as bind walks it, worked out once (bind runs on every call)."""
        return _bind_plan(self.params or ())

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
    targets = targets or tuple(t.strip() for t in header.get("targets", "").split(",") if t.strip())
    grid = tuple(g.strip() for g in _split_top(header.get("grid", ""))) if header.get("grid") else ()
    if not grid and params:
        first_out = next((p for p in params if p.role in ("out", "inout")), None)
        grid = first_out.shape if first_out else ()
    return KernelSpec(
        name=name, language=language, source=source, params=params,
        targets=targets or LANGUAGES[language][1], grid=grid,
        block=_ints(header.get("block", "")), options=tuple(header.get("options", "").split()),
        post=header.get("post") or None, origin=origin, line_offset=line_offset,
        doc=header.get("doc", ""),
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


_DIM_FUNCTIONS = {"__builtins__": {}, "cdiv": lambda a, b: -(-a // b), "min": min, "max": max}


@functools.lru_cache(maxsize=1024)
def _dim_code(expr: str):
    return compile(expr, "<dim>", "eval")


def _eval_dim(expr: str, dims: dict[str, int], kernel: str) -> int:
    """A size from the signature: a number, a dim (``n``) or an expression (``cdiv(n, 256)``)."""
    if expr in dims:
        return dims[expr]
    if expr.isdigit():
        return int(expr)
    try:
        value = eval(_dim_code(expr), _DIM_FUNCTIONS, dict(dims))
    except NameError as e:
        raise KernelArgumentError(f"kernel {kernel!r}: the size {expr!r} uses an unknown dim ({e})") from None
    return int(value)


@dataclass
class Bound:
    """A call's arguments matched to a signature: what the launch needs."""

    values: dict[str, Any]  # inputs, inout arrays and scalars, by parameter name
    out_shapes: dict[str, tuple[int, ...]]  # outputs to allocate
    dims: dict[str, int] = field(default_factory=dict)

    def grid(self, spec: KernelSpec) -> tuple[int, ...]:
        return tuple(_eval_dim(g, self.dims, spec.name) for g in spec.grid)


@dataclass(frozen=True)
class _ParamPlan:
    """What bind needs to know of one parameter, worked out once per kernel."""

    param: Param
    dtype: np.dtype
    dims: tuple[tuple[str, bool], ...]  # (size expression, is it a plain dim name)
    integer: bool


@dataclass(frozen=True)
class _BindPlan:
    by_name: dict[str, _ParamPlan]
    accepted: tuple[_ParamPlan, ...]  # what a caller passes, in order
    arrays: tuple[_ParamPlan, ...]  # inputs and inout arrays
    scalars: tuple[_ParamPlan, ...]
    outputs: tuple[_ParamPlan, ...]  # allocated by the pool


def _bind_plan(params: tuple[Param, ...]) -> _BindPlan:
    plans = [
        _ParamPlan(p, np.dtype(p.dtype), tuple((d, d.isidentifier()) for d in p.shape or ()),
                   np.issubdtype(np.dtype(p.dtype), np.integer))
        for p in params
    ]
    return _BindPlan(
        by_name={pp.param.name: pp for pp in plans},
        accepted=tuple(pp for pp in plans if pp.param.role != "out"),
        arrays=tuple(pp for pp in plans if pp.param.shape is not None and pp.param.role != "out"),
        scalars=tuple(pp for pp in plans if pp.param.role == "scalar"),
        outputs=tuple(pp for pp in plans if pp.param.role == "out"),
    )


_SCALAR_TYPES = (int, float, complex, bool, np.generic)


def bind(spec: KernelSpec, args: tuple, kwargs: dict) -> Bound:
    """Match ``args``/``kwargs`` to the signature, checking count, dtype and shape.

    Outputs are not passed; inputs, inout arrays and scalars are, positionally in signature
    order or by name. Errors name the argument and what was expected. Values only need
    ``shape`` and ``dtype`` (NumPy and device arrays, handles).
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
    for pp in plan.arrays:
        p = pp.param
        if p.name not in given:
            raise KernelArgumentError(f"kernel {spec.name!r}: missing array argument {p.name!r} ({p})")
        value = given[p.name]
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
        shape = tuple(value.shape)
        if len(shape) != len(pp.dims):
            raise KernelArgumentError(
                f"kernel {spec.name!r}: argument {p.name!r} has shape {shape}, expected "
                f"{len(p.shape)} dimension(s) [{', '.join(p.shape)}]"
            )
        for size, (dim, plain) in zip(shape, pp.dims):
            if plain:
                if dims.setdefault(dim, size) != size:
                    raise KernelArgumentError(
                        f"kernel {spec.name!r}: argument {p.name!r} has {dim}={size} but an earlier "
                        f"argument set {dim}={dims[dim]} (shape {shape}, expected [{', '.join(p.shape)}])"
                    )
            elif _eval_dim(dim, dims, spec.name) != size:
                raise KernelArgumentError(
                    f"kernel {spec.name!r}: argument {p.name!r} has shape {shape}, expected [{', '.join(p.shape)}]"
                )
    for pp in plan.scalars:
        p = pp.param
        if p.name not in given:
            if p.name in dims:
                given[p.name] = dims[p.name]
            else:
                raise KernelArgumentError(f"kernel {spec.name!r}: missing scalar argument {p.name!r} ({p})")
        value = given[p.name]
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
        if pp.integer and p.name not in dims:
            dims[p.name] = int(given[p.name])
    out_shapes = {pp.param.name: tuple(dims[d] if d in dims else _eval_dim(d, dims, spec.name) for d, _ in pp.dims)
                  for pp in plan.outputs}
    return Bound(given, out_shapes, dims)


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
    bound = bind(spec, args, kwargs)
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
