"""One notebook's cell never reaches another notebook (issue 12, C9): process-wide state.

Two clients ("notebooks") share one worker. For each kind of process-wide state, one client's
cell changes it for real, once on its own (then the other client's next call must see the
default) and once while the other client's call runs (overlapping, by sleeping). State that
is isolated per call is never seen by the other call; state that is restored after the call
that changed it may be seen by an overlapping call, but never after the change's call ended.
Each case checks that the culprit sees its own change for its whole call, and that both
clients still get right answers afterwards. docs/isolation.md lists these cases.
"""

from __future__ import annotations

import concurrent.futures
import io
import time

import pytest

from kaas_magic.client import Pool

HOLD = 1.2  # seconds the culprit's cell holds its change while the other call runs
LEAD = 0.4  # seconds the culprit's cell has to make its change before the other call starts


@pytest.fixture(scope="module")
def other(pool):
    """A second notebook: a client of its own on the same pool."""
    other = Pool.connect(pool.scheduler_address)
    other.run("x = 1", "cpu", stdout=io.StringIO())
    yield other
    other.close()


@pytest.fixture(scope="module")
def worker(pool, other):
    """The one worker both notebooks use here."""
    return sorted(r.address for r in pool.routes())[0]


def run(client, code, worker, target="cpu", **kwargs):
    kwargs.setdefault("fallback", target != "cpu" or None)
    return client.run(code, target, worker=worker, stdout=io.StringIO(), stderr=io.StringIO(), **kwargs)


def healthy(pool, other, worker):
    """Both notebooks' calls on the worker still work and give right answers."""
    for client in (pool, other):
        result = run(client, "import sys\nprint('ok')\ny = x * 6", worker, inputs={"x": 7})
        assert result.outputs["y"] == 42 and result.stdout == "ok\n" and result.record.ok


def overlapped(culprit, victim):
    """culprit() in a thread and, once it had LEAD seconds to change something, victim() in
    this one: its whole call falls within the culprit's."""
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        culprit_result = ex.submit(culprit)
        time.sleep(LEAD)
        victim_result = victim()
        return culprit_result.result(), victim_result


def culprit_code(change: str, probe: str, setup: str = "") -> str:
    """A cell that makes a change, then probes it at once and again after HOLD seconds."""
    return (f"import time\n{setup}\n{change}\nchanged_at = time.time()\nbefore = {probe}\n"
            f"time.sleep({HOLD})\nafter = {probe}\nended_at = time.time()")


def victim_code(probe: str, setup: str = "") -> str:
    return f"import time\n{setup}\nseen_at = time.time()\nseen = {probe}"


def check_overlap(culprit, victim):
    c, v = culprit.outputs, victim.outputs
    assert c["changed_at"] < v["seen_at"] < c["ended_at"], "the two calls did not overlap"


def isolated_case(pool, other, worker, change, probe, changed, default, setup=""):
    """State isolated per call: the other notebook never sees it, overlapping or after."""
    alone = run(pool, culprit_code(change, probe, setup).replace(f"time.sleep({HOLD})", ""), worker)
    assert alone.outputs["before"] == alone.outputs["after"] == changed
    assert run(other, victim_code(probe, setup), worker).outputs["seen"] == default
    culprit, victim = overlapped(lambda: run(pool, culprit_code(change, probe, setup), worker),
                                 lambda: run(other, victim_code(probe, setup), worker))
    check_overlap(culprit, victim)
    assert culprit.outputs["before"] == culprit.outputs["after"] == changed
    assert victim.outputs["seen"] == default
    for client in (pool, other):  # and no later call of either notebook sees it
        assert run(client, victim_code(probe, setup), worker).outputs["seen"] == default
    healthy(pool, other, worker)


def restored_case(pool, other, worker, change, probe, changed, default, setup="", target="cpu"):
    """State restored after the call that changed it: an overlapping call may see it; the
    culprit keeps it for its whole call, though the other call ends meanwhile; later calls
    see the default."""
    alone = run(pool, culprit_code(change, probe, setup).replace(f"time.sleep({HOLD})", ""), worker, target)
    assert alone.outputs["before"] == alone.outputs["after"] == changed
    assert run(other, victim_code(probe, setup), worker, target).outputs["seen"] == default
    culprit, victim = overlapped(lambda: run(pool, culprit_code(change, probe, setup), worker, target),
                                 lambda: run(other, victim_code(probe, setup), worker, target))
    check_overlap(culprit, victim)
    assert culprit.outputs["before"] == culprit.outputs["after"] == changed
    assert victim.outputs["seen"] in (changed, default)  # visible while it lasts: documented
    for client in (pool, other):
        assert run(client, victim_code(probe, setup), worker, target).outputs["seen"] == default
    healthy(pool, other, worker)


# --- print output and the standard streams: isolated ----------------------------------


def test_replacing_sys_stdout_is_the_cells_own(pool, other, worker):
    change = "import io, sys\nsys.stdout = io.StringIO()\nprint('hidden')"
    isolated_case(pool, other, worker, change, "type(sys.stdout).__name__", "StringIO", "_RoutedStream",
                  setup="import sys")
    culprit, victim = overlapped(
        lambda: run(pool, change + f"\nimport time\ntime.sleep({HOLD})\nprint('also hidden')\n"
                    "captured = sys.stdout.getvalue()", worker),
        lambda: run(other, "print('victim prints')", worker))
    assert culprit.outputs["captured"] == "hidden\nalso hidden\n" and culprit.stdout == ""
    assert victim.stdout == "victim prints\n"
    healthy(pool, other, worker)


def test_closing_sys_stdout_closes_nothing_for_anyone(pool, other, worker):
    culprit, victim = overlapped(
        lambda: run(pool, f"import sys, time\nsys.stdout.close()\nprint('still here')\ntime.sleep({HOLD})\n"
                    "print('and here')", worker),
        lambda: run(other, "print('victim prints')", worker))
    assert culprit.stdout == "still here\nand here\n"
    assert victim.stdout == "victim prints\n"
    for client in (pool, other):
        assert run(client, "print('later')", worker).stdout == "later\n"
    healthy(pool, other, worker)


def test_sys_stderr_none_is_the_cells_own(pool, other, worker):
    err = "import sys\nprint('to err', file=sys.stderr)"
    culprit, victim = overlapped(
        lambda: run(pool, f"import sys, time, warnings\nsys.stderr = None\nwarnings.warn('lost')\n"
                    f"time.sleep({HOLD})\nnone = sys.stderr is None", worker),
        lambda: run(other, err, worker))
    assert culprit.outputs["none"] and culprit.stderr == ""
    assert victim.stderr == "to err\n"
    for client in (pool, other):
        assert run(client, err, worker).stderr == "to err\n"
    healthy(pool, other, worker)


def test_concurrent_redirect_stdout_captures_only_its_own_cell(pool, other, worker):
    def cell(tag):
        return (f"import contextlib, io, time\nbuf = io.StringIO()\nwith contextlib.redirect_stdout(buf):\n"
                f"    print('inside {tag}')\n    time.sleep({HOLD})\n    print('inside again {tag}')\n"
                f"print('outside {tag}')\ncaptured = buf.getvalue()")

    a, b = overlapped(lambda: run(pool, cell("a"), worker), lambda: run(other, cell("b"), worker))
    for tag, result in (("a", a), ("b", b)):
        assert result.outputs["captured"] == f"inside {tag}\ninside again {tag}\n"
        assert result.stdout == f"outside {tag}\n"
    healthy(pool, other, worker)


def test_prints_from_threads_and_executors_a_cell_starts_are_its_own(pool, other, worker):
    # One write per line: print() writes its pieces apart, which threads printing at once interleave.
    cell = (f"import concurrent.futures, sys, threading, time\n"
            f"t = threading.Thread(target=lambda: print('from a thread {{}}'.format(tag)))\nt.start()\nt.join()\n"
            f"with concurrent.futures.ThreadPoolExecutor(2) as ex:\n"
            f"    list(ex.map(lambda i: (time.sleep({HOLD} / 2), sys.stdout.write(f'from a pool {{i}} {{tag}}\\n')),"
            f" range(2)))\n")
    a, b = overlapped(lambda: run(pool, cell, worker, inputs={"tag": "a"}),
                      lambda: run(other, cell, worker, inputs={"tag": "b"}))
    for tag, result in (("a", a), ("b", b)):
        lines = sorted(result.stdout.splitlines())
        assert lines == [f"from a pool 0 {tag}", f"from a pool 1 {tag}", f"from a thread {tag}"]
    healthy(pool, other, worker)


def test_a_thread_left_running_never_prints_into_another_call(pool, other, worker):
    leave = "import threading, time\nthreading.Thread(target=lambda: (time.sleep(0.4), print('late'))).start()"
    first = run(pool, leave, worker)
    assert first.stdout == ""
    later = [run(client, "import time\ntime.sleep(0.8)\nprint('mine')", worker) for client in (other, pool)]
    assert [r.stdout for r in later] == ["mine\n", "mine\n"]
    healthy(pool, other, worker)


# --- working directory, context variables, warnings: isolated ------------------------


def test_each_cell_has_its_own_working_directory(pool, other, worker):
    probe = "import os, tempfile\nfrom kaas_magic import isolation\nown = isolation.fs_isolated()\nbase = os.getcwd()"
    start = run(pool, probe, worker).outputs
    if not start["own"]:
        pytest.skip("unshare(CLONE_FS) is not available here: the directory is restored after calls instead")

    def cell(tag):
        return (f"import os, tempfile, time\nd = tempfile.mkdtemp()\nos.chdir(d)\nos.umask(0o077)\n"
                f"open('f.txt', 'w').write('{tag}')\ntime.sleep({HOLD})\ncwd = os.getcwd()\n"
                f"content = open('f.txt').read()\nlanded = os.path.exists(os.path.join(d, 'f.txt'))")

    a, b = overlapped(lambda: run(pool, cell("a"), worker), lambda: run(other, cell("b"), worker))
    assert a.outputs["d"] != b.outputs["d"]
    for tag, result in (("a", a), ("b", b)):
        out = result.outputs
        assert out["cwd"] == out["d"] and out["content"] == tag and out["landed"]
    for client in (pool, other):
        after = run(client, probe + "\nmask = os.umask(0o022)\nos.umask(mask)", worker).outputs
        assert after["base"] == start["base"] and after["mask"] != 0o077
    healthy(pool, other, worker)


def test_numpy_error_state_is_the_cells_own(pool, other, worker):
    isolated_case(pool, other, worker, "np.seterr(all='raise')", "np.geterr()['divide']", "raise", "warn",
                  setup="import numpy as np")
    result = run(other, "import numpy as np\ny = float(np.float64(1.0) / np.float64(0.0))", worker)
    assert result.outputs["y"] == float("inf")


def test_decimal_context_is_the_cells_own(pool, other, worker):
    isolated_case(pool, other, worker, "decimal.getcontext().prec = 5", "decimal.getcontext().prec", 5, 28,
                  setup="import decimal")


def test_warnings_filters_are_the_cells_own(pool, other, worker):
    setup = ("import warnings\ndef warns():\n    try:\n        warnings.warn('careful')\n"
             "    except UserWarning:\n        return 'raised'\n    return 'passed'")
    isolated_case(pool, other, worker, "warnings.simplefilter('error')", "warns()", "raised", "passed", setup=setup)
    # catch_warnings(record=True) in one cell records only that cell's warnings
    recorder = (f"import time, warnings\nwith warnings.catch_warnings(record=True) as log:\n"
                f"    warnings.simplefilter('always')\n    time.sleep({HOLD})\n    warnings.warn('mine')\n"
                f"messages = [str(w.message) for w in log]")
    warner = "import warnings\nwarnings.warn('not yours')\ndone = True"
    culprit, victim = overlapped(lambda: run(pool, recorder, worker), lambda: run(other, warner, worker))
    assert culprit.outputs["messages"] == ["mine"]
    assert victim.outputs["done"]
    healthy(pool, other, worker)


def test_signal_handlers_cannot_be_set_from_a_cell(pool, other, worker):
    code = ("import signal\ntry:\n    signal.signal(signal.SIGUSR1, lambda *a: None)\n    outcome = 'set'\n"
            "except ValueError as e:\n    outcome = str(e)")
    assert "main thread" in run(pool, code, worker).outputs["outcome"]
    healthy(pool, other, worker)


# --- process-wide settings: restored after the call that changed them -------------------


def test_environment_variables_are_the_cells_own(pool, other, worker):
    # One variable set, one removed, as Python code sees them (os.environ, os.getenv, copies).
    isolated_case(pool, other, worker, "os.environ['KAAS_ISOLATION_TEST'] = 'set'; del os.environ['HOME']",
                  "(os.environ.get('KAAS_ISOLATION_TEST'), 'HOME' in os.environ, os.getenv('KAAS_ISOLATION_TEST'), "
                  "'KAAS_ISOLATION_TEST' in dict(os.environ))", ("set", False, "set", True), (None, True, None, False),
                  setup="import os")


def test_the_process_environment_takes_a_cells_variable_for_its_call_only(pool, other, worker):
    # What C code and child processes read (the process's environment) sees the change during
    # the call that made it, and has its value back after.
    probe = "subprocess.run(['sh', '-c', 'echo ${KAAS_ISOLATION_TEST:-unset}'], capture_output=True, text=True).stdout"
    restored_case(pool, other, worker, "os.environ['KAAS_ISOLATION_TEST'] = 'set'", probe, "set\n", "unset\n",
                  setup="import os, subprocess")


def test_logging_root_level_and_handlers_are_restored(pool, other, worker):
    probe = "(logging.getLogger().level, len(logging.getLogger().handlers))"
    default = run(other, f"import logging\nlevel = {probe}", worker).outputs["level"]
    changed = (10, default[1] + 1)
    restored_case(pool, other, worker, "logging.getLogger().setLevel(logging.DEBUG)\n"
                  "logging.getLogger().addHandler(logging.StreamHandler())", probe, changed, default,
                  setup="import logging")


def test_interpreter_settings_are_restored(pool, other, worker):
    probe = ("(sys.getrecursionlimit(), sys.path[-1], socket.getdefaulttimeout(), gc.isenabled(), "
             "sys.excepthook is sys.__excepthook__, locale.setlocale(locale.LC_NUMERIC))")
    setup = "import gc, locale, socket, sys"
    default = run(other, f"{setup}\nv = {probe}", worker).outputs["v"]
    change = ("sys.setrecursionlimit(4321); sys.path.append('/kaas/nowhere'); socket.setdefaulttimeout(3.0); "
              "gc.disable(); sys.excepthook = print; locale.setlocale(locale.LC_NUMERIC, 'C.UTF-8')")
    assert default[-1] != "C.UTF-8"
    restored_case(pool, other, worker, change, probe, (4321, "/kaas/nowhere", 3.0, False, False, "C.UTF-8"),
                  default, setup=setup)


def test_jax_enable_x64_is_restored(pool, other, worker):
    setup = "import jax\nimport jax.numpy as jnp"
    probe = "str(jnp.ones(1).dtype)"
    restored_case(pool, other, worker, "jax.config.update('jax_enable_x64', True)", probe, "float64", "float32",
                  setup=setup, target="tpu")
    assert run(other, f"{setup}\ny = float(jnp.arange(4.0).sum())", worker, "tpu").outputs["y"] == 6.0


def test_functions_using_sys_and_warnings_still_leave_the_worker(pool, other, worker):
    """sys and warnings have a class of their own on workers: still pickled by name."""
    code = "import sys, warnings\ndef f():\n    return sys.maxsize, isinstance(warnings.filters, list)"
    f = run(pool, code, worker).outputs["f"]
    import sys

    assert f() == (sys.maxsize, True)
