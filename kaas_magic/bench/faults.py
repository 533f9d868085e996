"""The fault client of ``kaas bench load --faults``: while other clients run their checked
tasks, this one keeps causing faults of the classes a shared pool must contain (a runaway
cell in native code or Python, a bad option, a caller that vanishes mid-call, a caller that
stops reading, output the notebook cannot print, a cell that changes process-wide state,
a cell that forks). Each fault has the outcome it must have and a time bound; the other
clients count any result of theirs that is wrong, lost or carries another call's output or
state. Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import collections
import io
import random
import time
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Fault:
    name: str
    klass: str  # the class: B (hangs, stalls) or C (state reaching others)
    cause: Callable  # (pool) -> None; raises what the fault raises
    expected: str | None  # the exception type name it must raise, None: it must succeed
    bound_s: float  # it must be over within this long
    once: bool = False  # costly (a worker is replaced): at most once a run


def _run(code: str, **options) -> Callable:
    return lambda pool: pool.run(code, "cpu", stdout=io.StringIO(), outputs=[], **options)


class _Blocked(io.StringIO):
    """A notebook output that takes no text for a while (its reader is stuck)."""

    def __init__(self, seconds: float):
        super().__init__()
        self._until = time.monotonic() + seconds

    def write(self, text):
        time.sleep(max(0.0, self._until - time.monotonic()))
        return super().write(text)


def _slow_reader(pool) -> None:
    pool.run("for i in range(3000):\n    print('x' * 2000)", "cpu", stdout=_Blocked(2.0), outputs=[])


def _unencodable(pool) -> None:
    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="strict")
    pool.run("print('lone \\ud800 surrogate')", "cpu", stdout=out, outputs=[])


def _bad_timeout(pool) -> None:
    pool.run("x = 1", "cpu", timeout=random.choice([float("inf"), float("nan"), 1e10, -1.0]), outputs=[])


def _vanishing_caller(pool) -> None:
    """Another notebook process starts a long call and is killed in the middle of it."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_caller_that_is_killed, args=(pool.scheduler_address, pool.client.security), daemon=True)
    child.start()
    time.sleep(3.0)  # connected and mid-call
    child.kill()
    child.join(10)


def _caller_that_is_killed(address: str, security) -> None:
    from ..client import Pool

    pool = Pool.connect(address, security=security)
    pool.run("import time\ntime.sleep(120)", "cpu", stdout=io.StringIO(), outputs=[])


def _thread_prints(pool) -> None:
    out = io.StringIO()
    pool.run("import threading\nt = threading.Thread(target=print, args=('from my thread',))\nt.start()\nt.join()",
             "cpu", stdout=out, outputs=[])
    if "from my thread" not in out.getvalue():
        raise AssertionError("a thread's print did not reach its own cell")


def faults() -> list[Fault]:
    return [
        Fault("native code past its timeout", "B", _run("sum(range(10**13))", timeout=1), "CallTimeout", 30, once=True),
        Fault("Python loop past its timeout", "B", _run("while True:\n    pass", timeout=1), "CallTimeout", 10),
        Fault("timeout that would switch the limit off", "B", _bad_timeout, "KaasUsageError", 1),
        Fault("caller killed mid-call", "B", _vanishing_caller, None, 30),
        Fault("caller that stops reading", "B", _slow_reader, None, 60),
        Fault("output the notebook cannot encode", "B", _unencodable, None, 10),
        Fault("sys.stdout replaced", "C", _run("import sys, io\nsys.stdout = io.StringIO()\nprint('gone')"), None, 10),
        Fault("sys.stdout closed", "C", _run("import sys\nsys.stdout.close()"), None, 10),
        Fault("redirect_stdout held", "C", _run(
            "import contextlib, io, time\nwith contextlib.redirect_stdout(io.StringIO()):\n    time.sleep(0.3)"), None, 10),
        Fault("working directory changed", "C", _run("import os\nos.chdir('/')\nimport time\ntime.sleep(0.2)"), None, 10),
        Fault("environment variable set", "C", _run("import os, time\nos.environ['KAAS_FAULT'] = '1'\ntime.sleep(0.2)"),
              None, 10),
        Fault("warnings turned into errors", "C", _run("import warnings, time\nwarnings.simplefilter('error')\n"
                                                       "time.sleep(0.2)"), None, 10),
        Fault("NumPy error state changed", "C", _run("import numpy, time\nnumpy.seterr(divide='raise')\ntime.sleep(0.2)"),
              None, 10),
        Fault("cell forks a child that does not exit", "C", _run("import os\nos.fork()"), None, 10),
        Fault("cell prints from its own thread", "C", _thread_prints, None, 10),
    ]


# What a cell sees of the process state other cells could change: the same in every call,
# whatever another notebook's cells did before or do at the same time.
CLEAN_STATE_CELL = """
import os as _os, sys as _sys, warnings as _warnings, numpy as _numpy
state = (_os.getcwd(), _os.environ.get('KAAS_FAULT'), type(_sys.stdout).__name__,
         any(f[0] == 'error' for f in _warnings.filters), _numpy.geterr()['divide'])
"""


def inject(address: str, security, seconds: float, results) -> None:
    """The fault client, in its own process: a random fault at a time until time is up."""
    from ..client import Pool

    pool = Pool.connect(address, security=security)
    table = faults()
    done: list[dict] = []
    used: set[str] = set()
    rng = random.Random(12)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        fault = rng.choice([f for f in table if not (f.once and f.name in used)])
        used.add(fault.name)
        started = time.monotonic()
        raised = None
        try:
            fault.cause(pool)
        except BaseException as e:  # noqa: BLE001 - what a fault raises is what is measured
            raised = type(e).__name__
        elapsed = time.monotonic() - started
        done.append({"fault": fault.name, "class": fault.klass, "raised": raised, "expected": fault.expected,
                     "seconds": elapsed, "bound": fault.bound_s,
                     "as_expected": raised == fault.expected and elapsed <= fault.bound_s})
        time.sleep(0.2)
    pool.close()
    results.put(done)


def summary(report: list[dict]) -> tuple[list[str], int]:
    """Lines for the bench's output, and how many faults did not end as they must."""
    by_fault: dict[str, list[dict]] = collections.defaultdict(list)
    for row in report:
        by_fault[row["fault"]].append(row)
    unexpected = sum(not row["as_expected"] for row in report)
    lines = [f"faults: {len(report)} injected by one more client, {len(by_fault)} kinds; "
             f"{unexpected} did not end as they must"]
    for name, rows in sorted(by_fault.items(), key=lambda item: (item[1][0]["class"], item[0])):
        worst = max(r["seconds"] for r in rows)
        bad = [r for r in rows if not r["as_expected"]]
        outcome = rows[0]["expected"] or "succeeds"
        note = "" if not bad else f"  UNEXPECTED: {', '.join(sorted({str(r['raised']) for r in bad}))}"
        lines.append(f"  [{rows[0]['class']}] {name}: x{len(rows)}, {outcome}, slowest {worst:.1f} s "
                     f"(bound {rows[0]['bound']:g} s){note}")
    return lines, unexpected

