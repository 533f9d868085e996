"""The dims language: sizes in a signature (``n``, ``n * m``, ``cdiv(n, 256)``), checked
once and evaluated against a call's dims."""

from __future__ import annotations

import ast
import functools

from ..errors import KernelArgumentError, KernelError

#: The largest dim, and the most elements in one array, of a C kernel that takes its sizes
#: as 32-bit integers (or takes none): its index arithmetic is 32-bit, and past this it
#: wraps round to addresses outside the buffers.
MAX_DIM_32 = 2**31 - 1
_MAX_DIM_64 = 2**63 - 1


def cdiv(a: int, b: int) -> int:
    """Ceiling division of whole numbers (exact, no floats): the one spelling of it."""
    return -(-a // b)


def round_up(size: int, block: int) -> int:
    """``size`` rounded up to a whole number of ``block``."""
    return int(cdiv(size, block) * block)


_DIM_FUNCTION_NAMES = ("cdiv", "min", "max")
_DIM_FUNCTIONS = {"__builtins__": {}, "cdiv": cdiv, "min": min, "max": max}
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
