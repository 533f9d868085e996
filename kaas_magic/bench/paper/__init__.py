"""``kaas bench paper``: the seed paper's headline measured on this machine, in one command.

The paper (Kernel-as-a-Service, Middleware '23) reports that against a naive implementation
KaaS cut the completion time of fine-grained tasks by up to 96.0 % (GPU), 68.4 % (FPGA),
98.6 % (TPU) and 34.9 % (QPU). Here each target the pool serves runs one small task two ways:

- **naive**, the paper's baseline: a fresh Python process per task running the task's
  program in ``children/``, which imports the framework, initialises the device, compiles,
  runs, checks and exits, with every disk cache a fresh empty folder so nothing is warm. The child times its own phases; what the
  parent sees beyond them is interpreter start-up and exit.
- **KaaS**: the same task through the warm pool with ``Pool.call`` / ``Pool.run``, as a
  notebook calls it, after one untimed call on each worker (a kernel compiles on its first
  call per shape, as JAX does, or on its first launch, as PoCL does).

Then **sharing**: several clients each send a stream of the same task. Naive, each task
holds the one device exclusively for its fresh process (one lock per device, so tasks
queue); KaaS, the clients share the warm devices. Throughput, latency and how busy the
device was. Stand-ins are named as such: a row on a CPU stand-in says FALLBACK, one on
Aer says SIMULATOR, and a target the machine lacks is skipped, saying so.

Modules: ``tasks`` (the tasks and their checks), ``children/`` (the naive programs),
``naive`` (running them cold), ``warm`` (the same tasks through the pool), ``results``,
``report`` (CSV and tables), ``plot``, and ``experiment`` (settings, sharing, the order of
the measurements, the command's entry point).
"""

from .children._child import PHASES
from .experiment import SHARE_SECONDS, Settings, header, main, reproduce, settings_from_args
from .naive import NaiveRun, child_command, cold_env, run_naive
from .plot import plot
from .report import CSV_COLUMNS, csv_rows, tables, write_csv
from .results import Completion, Results, Sharing, Stream, percentile, reduction_pct
from .tasks import ALL_TARGETS, KIND_LABEL, N, PAPER_REDUCTION, SHOTS, TASKS, Task, kernel_source
from .warm import kaas_call, serving

__all__ = [
    "ALL_TARGETS", "CSV_COLUMNS", "KIND_LABEL", "N", "PAPER_REDUCTION", "PHASES", "SHARE_SECONDS", "SHOTS", "TASKS",
    "Completion", "NaiveRun", "Results", "Settings", "Sharing", "Stream", "Task", "child_command", "cold_env",
    "csv_rows", "header", "kaas_call", "kernel_source", "main", "percentile", "plot", "reduction_pct", "reproduce",
    "run_naive", "serving", "settings_from_args", "tables", "write_csv",
]
