"""What every naive child shares: its arguments, the clock of its phases, its inputs and
the JSON line it ends with. Imports only the standard library, so the child's own clock
starts before its framework is imported; NumPy is imported by the inputs' makers, which
the parent process calls too, so both sides compute on the same arrays."""

from __future__ import annotations

import argparse
import json
import time

PHASES = ("import", "init", "compile", "run")

_phases: dict[str, float] = {}
_clock = time.perf_counter()


def phase(name: str) -> None:
    """End the phase ``name``: the time since the previous phase ended (or the start)."""
    global _clock
    now = time.perf_counter()
    _phases[name], _clock = now - _clock, now


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="one naive task in a fresh process")
    parser.add_argument("--n", type=int, required=True, help="matrices are N x N float32")
    parser.add_argument("--shots", type=int, default=0, help="measurements of a circuit")
    parser.add_argument("--source", help="the kernel's source file")
    return parser.parse_args()


def source(args: argparse.Namespace) -> str:
    with open(args.source) as f:
        return f.read()


def matmul_inputs(n: int) -> tuple:
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = (rng.random((n, n), dtype=np.float32) for _ in range(2))
    return a, b


def mlp_inputs(n: int) -> tuple:
    import numpy as np

    rng = np.random.default_rng(0)
    return tuple(rng.random(shape, dtype=np.float32) - 0.5 for shape in ((n, n), (n, n), (n,), (n, n), (n,)))


def report(device: str, kind: str, ok: bool) -> None:
    """The last line of the child's output: its phases, the device it ran on, and whether
    its result was right. ``kind``: device, fallback (a CPU stand-in) or simulator."""
    print(json.dumps({"phases": _phases, "device": device, "kind": kind, "ok": bool(ok)}))
