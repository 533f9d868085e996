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

import functools
import hashlib
import re
from dataclasses import dataclass

import numpy as np

from ..backends import registry
from ..errors import KernelError
from .csource import _split_top, check_defines, suggest_signature
from .dims import dim_names
from .plan import _bind_plan, _BindPlan

# language: (backend, default targets), as the backends declare them (their `languages`
# and `targets`); a read-only view of the backend registry, filled on first use.
LANGUAGES = registry.LANGUAGES


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
    def bind_plan(self) -> _BindPlan:
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

