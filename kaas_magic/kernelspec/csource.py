"""C source (OpenCL C and CUDA C) as the messages see it: the kernels it defines, a
signature guessed from it, compiler logs shifted into the notebook cell."""

from __future__ import annotations

import re

from ..errors import KernelError


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

