"""What every ``kaas bench`` benchmark shares: the header that names the command, the
machine and the versions a run's figures come from, and the warm-up before timing."""

from __future__ import annotations

import os
import platform
import shlex
import sys

WARMUP = 20  # untimed calls before a measurement: connections, caches and code paths warm


def header(n: int) -> list[str]:
    """Command, machine, versions, and how many calls each figure is over."""
    import dask
    import distributed

    argv = getattr(sys, "orig_argv", sys.argv)
    return [
        f"command: {shlex.join(argv)}",
        f"machine: {os.cpu_count()} CPUs, {platform.platform()}, {platform.processor() or platform.machine()}",
        f"python {platform.python_version()}, dask {dask.__version__}, distributed {distributed.__version__}",
        f"{n} timed calls per row after {WARMUP} warm-up calls; times in ms (time.perf_counter)",
    ]
