"""The pool's log (kaas_magic.pool_log): Dask's and kaas's own log lines, and whatever a
pool's processes write to fd 1 and 2, go to the pool's log and never into a cell.

A real Jupyter kernel (nbclient) runs cells that make every kind of pool noise, the notebook
process's own loggers, a worker's loggers, a worker's fd 1 and 2 from C, a worker that does
not stop (its own log line), one stuck in C (its supervisor's line), one killed; and a plain
owner process whose fd 2 is a file measures that nothing from the workers reaches it. Then
the parts: the refcounted handler swap, the bounded buffer, mark/since, show, redirect."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import dask.config
import pytest

from kaas_magic import pool_log

ROOT = Path(__file__).resolve().parent.parent

KERNEL_NOISE = ["kernel-side nanny noise", "kernel-side kaas noise", "kernel-side tornado noise",
                "kernel-side dask noise"]
WORKER_NOISE = ["native noise fd2", "native noise fd1", "libc noise fd2", "worker log noise", "worker kaas noise"]
# Dask's log format: "2026-11-30 17:31:58,520 - distributed.nanny - WARNING - x"
DASK_LINE = re.compile(r" - (distributed|dask|tornado|kaas_magic)[\w.]* - (DEBUG|INFO|WARNING|ERROR|CRITICAL) - ")


def _noise_in(text: str) -> list[str]:
    """Lines of ``text`` that are pool noise; the run view's one-line note may name a warning."""
    found = []
    for line in text.splitlines():
        if "(see %kaas log)" in line:
            continue
        if (any(n in line for n in KERNEL_NOISE + WORKER_NOISE) or DASK_LINE.search(line)
                or "- distributed." in line or "- WARNING -" in line or "of its timeout; replacing worker" in line
                or "kaas supervisor:" in line):
            found.append(line)
    return found


def _cell_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        for value in out.get("data", {}).values():
            parts.append(value if isinstance(value, str) else json.dumps(value))
        parts.append(out.get("evalue", ""))
        parts.extend(out.get("traceback", []))
    return "\n".join(parts)


# --- a real kernel ------------------------------------------------------------------------

_CELLS = [
    ("setup", "import logging, os, time, json\nimport kaas_magic\n%load_ext kaas_magic\n"
              "kaas_magic.start().wait_ready(timeout=240)"),
    ("warm", "%%kaas cpu\nwarm = 1"),
    ("kernel-noise",
     "logging.getLogger('distributed.nanny').warning('kernel-side nanny noise')\n"
     "logging.getLogger('kaas_magic.client').error('kernel-side kaas noise')\n"
     "logging.getLogger('tornado.application').error('kernel-side tornado noise')\n"
     "logging.getLogger('dask').warning('kernel-side dask noise')\n"
     "marked = kaas_magic.pool_log.mark()"),
    ("worker-noise",
     "%%kaas cpu\nimport os, logging, ctypes, psutil\n"
     "os.write(2, b'native noise fd2\\n')\n"
     "os.write(1, b'native noise fd1\\n')\n"
     "ctypes.CDLL(None).dprintf(2, b'libc noise fd2\\n')\n"
     "logging.getLogger('distributed.worker').warning('worker log noise')\n"
     "logging.getLogger('kaas_magic.worker.stops').warning('worker kaas noise')\n"
     "fd2 = os.readlink('/proc/self/fd/2')\n"
     "fd1 = os.readlink('/proc/self/fd/1')\n"
     "supervisor_fds = [os.readlink(f'/proc/{c.pid}/fd/2') for c in psutil.Process().children()]\n"
     "print('clean print')"),
    ("no-stop", "%%kaas cpu --timeout 1\nimport time\ntime.sleep(30)"),
    ("stuck-in-c", "%%kaas cpu --timeout 1\nsum(range(10**13))"),
    ("ready", "deadline = time.monotonic() + 240  # both replacements are up\n"
              "while len(kaas_magic.pool().routes()) < 2 and time.monotonic() < deadline:\n"
              "    time.sleep(0.2)\n"
              "kaas_magic.pool().wait_ready(timeout=240)"),
    ("killed", "%%kaas cpu\nimport os\nos.kill(os.getpid(), 9)"),
    ("recover", "kaas_magic.pool().wait_ready(timeout=240)\ntime.sleep(1)"),
    ("after", "%%kaas cpu\nafter = 2\nprint('after', after)"),
    ("late", "time.sleep(2)"),
    ("reveal",
     "view = kaas_magic.pool_log.show(400)\n"
     "print(json.dumps({'path': str(kaas_magic.pool_log.path()), 'shown': str(view), 'html': view._repr_html_(),\n"
     "                  'since': kaas_magic.pool_log.since(marked), 'note': kaas_magic.pool_log.note(marked),\n"
     "                  'fd1': fd1, 'fd2': fd2, 'supervisor_fds': supervisor_fds}))"),
]
_RAISES = {"no-stop", "stuck-in-c", "killed"}


@pytest.fixture(scope="module")
def notebook(tmp_path_factory):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    for key, source in _CELLS:
        tags = [key] + (["raises-exception"] if key in _RAISES else [])
        nb.cells.append(nbformat.v4.new_code_cell(source, metadata={"tags": tags}))
    # Only NumPy workers (fast to warm again after each replacement); kernels inherit this.
    old = os.environ.get("DASK_KAAS__BACKENDS")
    os.environ["DASK_KAAS__BACKENDS"] = '["numpy"]'
    kernel_stderr = tmp_path_factory.mktemp("kernel") / "stderr"
    try:
        with open(kernel_stderr, "wb") as err:  # the kernel process's own fd 2, outside any cell
            NotebookClient(nb, timeout=300, kernel_name="python3",
                           resources={"metadata": {"path": str(ROOT)}}).execute(stderr=err)
    finally:
        if old is None:
            del os.environ["DASK_KAAS__BACKENDS"]
        else:
            os.environ["DASK_KAAS__BACKENDS"] = old
    cells = {cell.metadata["tags"][0]: cell for cell in nb.cells}
    return cells, kernel_stderr.read_text(errors="replace")


def _revealed(notebook) -> dict:
    (out,) = [o for o in notebook[0]["reveal"].outputs if o.output_type == "stream"]
    return json.loads(out.text)


@pytest.mark.timeout(400)
def test_no_cell_shows_pool_noise(notebook):
    notebook, kernel_stderr = notebook
    for key, cell in notebook.items():
        if key == "reveal":  # shows the pool log itself
            continue
        noise = _noise_in(_cell_text(cell))
        assert not noise, f"cell {key!r} shows pool noise: {noise}"
    # nor what the kernel passes on to its own stderr (output it cannot place in a cell)
    noise = _noise_in(kernel_stderr)
    assert not noise, f"the kernel's stderr got pool noise: {noise}"
    # the cells did what they were meant to: the noise was made, the faults happened
    assert "clean print" in _cell_text(notebook["worker-noise"])
    assert "CallTimeout" in _cell_text(notebook["no-stop"])
    assert "CallTimeout" in _cell_text(notebook["stuck-in-c"])
    assert "WorkerLost" in _cell_text(notebook["killed"])
    assert "after 2" in _cell_text(notebook["after"])


def test_the_pool_log_has_all_of_it(notebook):
    revealed = _revealed(notebook)
    folder = Path(revealed["path"])
    shown = revealed["shown"]
    for line in KERNEL_NOISE + WORKER_NOISE + ["Restarting worker", "did not stop within 1.0 s of its timeout",
                                               "kaas supervisor: a call passed its deadline"]:
        assert line in shown, f"{line!r} not in the pool log shown:\n{shown[-4000:]}"
    assert "- distributed.nanny - WARNING - kernel-side nanny noise" in shown
    assert "kernel-side nanny noise" in revealed["html"] and "<pre" in revealed["html"]
    # on disk: the notebook's records in pool.log, each worker process's output in its file
    kernel_file = (folder / "pool.log").read_text()
    assert all(n in kernel_file for n in KERNEL_NOISE) and "Restarting worker" in kernel_file
    workers = "".join(p.read_text() for p in folder.glob("worker-*.log"))
    assert all(n in workers for n in WORKER_NOISE)
    assert len(list(folder.glob("worker-*.log"))) >= 5  # 2 first, 3 replacements
    # the worker's fd 1 and 2, and its supervisor's fd 2, are that worker's file
    assert Path(revealed["fd2"]).parent == folder and revealed["fd1"] == revealed["fd2"]
    assert revealed["supervisor_fds"] and all(fd == revealed["fd2"] for fd in revealed["supervisor_fds"])


def test_warnings_since_a_mark_make_a_one_line_note(notebook):
    revealed = _revealed(notebook)
    assert any("distributed.nanny: Restarting worker" in line for line in revealed["since"])
    assert not any("kernel-side" in line for line in revealed["since"])  # logged before the mark
    assert re.fullmatch(r"\d+ pool warnings?: .* \(see %kaas log\)", revealed["note"])


# --- the owner process's fd 2 -------------------------------------------------------------

_OWNER = textwrap.dedent("""
    import io, json, logging, os, sys, time
    import dask.config
    from kaas_magic.client import Pool
    from kaas_magic import pool_log

    if __name__ == "__main__":  # the workers are spawned: they import this file too
        out = io.StringIO()
        with dask.config.set({"kaas.backends": ["numpy"]}):
            # a preload of the user's own that is noisy as the worker starts
            pool = Pool.start(1, preload=["import os\\nos.write(2, b'early preload noise\\\\n')"])
        pool.wait_ready(timeout=240)
        pool.run("import os, ctypes\\nos.write(2, b'native noise fd2\\\\n')\\nos.write(1, b'native noise fd1\\\\n')\\n"
                 "ctypes.CDLL(None).dprintf(2, b'libc noise fd2\\\\n')", "cpu", stdout=out, stderr=out)
        try:
            pool.run("import os\\nos.kill(os.getpid(), 9)", "cpu", stdout=out, stderr=out)
        except Exception as e:
            print("failed:", type(e).__name__, flush=True)
        pool.wait_ready(timeout=240)
        pool.run("import os\\nos.write(2, b'replacement noise\\\\n')", "cpu", stdout=out, stderr=out)
        folder = str(pool.pool_log.directory)
        pool.close()
        time.sleep(1)
        # no pool open: distributed's own handler writes to stderr again (a control)
        logging.getLogger("distributed.nanny").warning("after close: stderr again")
        print(json.dumps({"folder": folder, "cell_output": out.getvalue()}), flush=True)
""")


@pytest.mark.timeout(300)
def test_nothing_from_the_workers_reaches_the_owner_processs_fd2(tmp_path):
    script = tmp_path / "owner.py"
    script.write_text(_OWNER)
    stderr_file = tmp_path / "owner.err"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(stderr_file, "wb") as err:
        done = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=err, text=True, timeout=280)
    stderr = stderr_file.read_text()
    assert done.returncode == 0, stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert "failed: WorkerLost" in lines
    result = json.loads(lines[-1])
    assert result["cell_output"] == ""
    assert "after close: stderr again" in stderr  # the measurement sees this process's fd 2
    leaked = [line for line in stderr.splitlines() if "after close" not in line]
    assert not leaked, f"reached the owner's fd 2: {leaked}"
    workers = "".join(p.read_text() for p in Path(result["folder"]).glob("worker-*.log"))
    for line in ["early preload noise", "native noise fd2", "native noise fd1", "libc noise fd2", "replacement noise"]:
        assert line in workers


# --- the parts ----------------------------------------------------------------------------


def test_the_handler_swap_is_refcounted_and_puts_everything_back(capsys):
    top, below = logging.getLogger("kaastest_swap"), logging.getLogger("kaastest_swap.app")
    to_stderr, below_stderr = logging.StreamHandler(sys.stderr), logging.StreamHandler(sys.stderr)
    to_file = logging.StreamHandler(io.StringIO())  # not stderr: stays
    top.addHandler(to_stderr)
    top.addHandler(to_file)
    top.propagate = False
    below.addHandler(below_stderr)
    below.propagate = False
    top.setLevel(logging.INFO)
    got: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            got.append(record.getMessage())

    catch = Catch()
    swap = pool_log.HandlerSwap(catch, names=("kaastest_swap",))
    try:
        swap.acquire()
        swap.acquire()  # a second pool
        assert top.handlers == [to_file, catch] and below.handlers == [catch]
        top.warning("one")
        below.error("two")
        swap.release()  # one pool still open: still swapped
        assert top.handlers == [to_file, catch] and below.handlers == [catch]
        top.warning("three")
        assert got == ["one", "two", "three"]
        assert capsys.readouterr().err == ""
        swap.release()
        swap.release()  # one too many: nothing happens
        assert top.handlers == [to_stderr, to_file] and below.handlers == [below_stderr]
        top.warning("four")
        assert got == ["one", "two", "three"] and "four" in capsys.readouterr().err
    finally:
        for h in list(top.handlers):
            top.removeHandler(h)
        for h in list(below.handlers):
            below.removeHandler(h)


def test_distributeds_own_handlers_are_detached_while_a_log_is_open(tmp_path, capsys):
    import distributed  # noqa: F401  (installs its stream handler on "distributed")

    dist = logging.getLogger("distributed")
    before = list(dist.handlers)
    log = pool_log.PoolLog(embedded=False, directory=tmp_path / "a")
    try:
        assert not any(pool_log.writes_to_std_stream(h) for h in dist.handlers)
        assert any(isinstance(h, pool_log.PoolLogHandler) for h in dist.handlers)
        logging.getLogger("distributed.kaastest").warning("swapped out")
        assert "swapped out" not in capsys.readouterr().err
    finally:
        log.close()
    assert dist.handlers == before
    log.close()  # twice: nothing more
    assert dist.handlers == before


def test_the_buffer_is_bounded_and_the_file_keeps_everything(tmp_path):
    with dask.config.set({"kaas.pool.log.records": 5}):
        log = pool_log.PoolLog(embedded=False, directory=tmp_path / "b")
    try:
        logger = logging.getLogger("distributed.kaastest")
        for i in range(20):
            logger.warning("record %d", i)
        texts = [e.text for e in log.records()]
        assert len(texts) == 5 and texts[-1].endswith("- distributed.kaastest - WARNING - record 19")
        assert texts[0].endswith("record 15")
        on_disk = (tmp_path / "b" / "pool.log").read_text().splitlines()
        assert len(on_disk) == 20 and on_disk[0].endswith("record 0")
    finally:
        log.close()
    logging.getLogger("distributed.kaastest").warning("after its close")
    assert "after its close" not in (tmp_path / "b" / "pool.log").read_text()
    assert all("after its close" not in e.text for e in log.records())  # its lifetime only


def test_mark_and_since_count_warnings_and_errors(tmp_path):
    log = pool_log.PoolLog(embedded=False, directory=tmp_path / "c")
    try:
        logger = logging.getLogger("distributed.kaastest")
        logger.setLevel(logging.INFO)
        logger.warning("before the mark")
        m = pool_log.mark()
        assert pool_log.since(m) == [] and pool_log.note(m) is None
        logger.info("not a warning")
        logger.warning("worker %s replaced", "tls://x")
        logging.getLogger("kaas_magic.kaastest").error("broken\nsecond line")
        assert pool_log.mark() == m + 2
        assert pool_log.since(m) == ["distributed.kaastest: worker tls://x replaced", "kaas_magic.kaastest: broken"]
        assert pool_log.note(m) == "2 pool warnings: kaas_magic.kaastest: broken (see %kaas log)"
        assert log.note(m + 1) == "1 pool warning: kaas_magic.kaastest: broken (see %kaas log)"
        assert pool_log.since(pool_log.mark()) == []
    finally:
        logging.getLogger("distributed.kaastest").setLevel(logging.NOTSET)
        log.close()


def test_show_lists_the_workers_files_and_says_where_remote_ones_are(tmp_path):
    folder = tmp_path / "d"
    log = pool_log.PoolLog(embedded=True, directory=folder)
    try:
        assert log.worker_directory == folder
        (folder / "worker-999999999.log").write_text(
            "==== kaas worker name=0 address=tls://127.0.0.1:1 pid=999999999 (x) ====\n"
            "old line\n<b>second-to-last</b>\nlast line\n")
        logging.getLogger("distributed.kaastest").warning("kernel line")
        view = log.show(2)
        text = str(view)
        import kaas_magic

        if getattr(kaas_magic, "_pool", None) is None:  # the newest open log is the current one
            assert pool_log.path() == folder and str(pool_log.show(2)) == text
        assert str(folder) in text and "kernel line" in text
        assert "worker 0 tls://127.0.0.1:1 (pid 999999999, exited): worker-999999999.log" in text
        assert "<b>second-to-last</b>\nlast line" in text and "old line" not in text
        assert "&lt;b&gt;second-to-last" in view._repr_html_()
        printed = []
        view._repr_pretty_(type("P", (), {"text": lambda self, t: printed.append(t)})(), False)
        assert printed == [text]
    finally:
        log.close()
    remote = pool_log.PoolLog(embedded=False, directory=tmp_path / "e")
    try:
        text = str(remote.show())
        assert "on their own hosts" in text and "Only this process's records are shown" in text
    finally:
        remote.close()
    assert "no pool has been opened" in str(pool_log.LogView(None))


_REDIRECT = textwrap.dedent("""
    import logging, os, subprocess, sys
    from kaas_magic import pool_log

    class Worker:  # what the plugin sees
        name, address, nanny = sys.argv[2], "tls://127.0.0.1:9", sys.argv[3] or None

    dist = logging.getLogger("distributed")
    dist.addHandler(logging.StreamHandler(sys.stderr))
    dist.propagate = False
    path = pool_log.worker_started(Worker(), {"pool": {"log": {"dir": sys.argv[1]}}})
    print("to stdout")
    os.write(2, b"fd 2 direct\\n")
    dist.warning("distributed record")
    logging.getLogger("kaas_magic.worker").warning("kaas record")
    subprocess.run(["sh", "-c", "echo child process >&2"])
    sys.__stdout__.flush()
    os.write(int(sys.argv[4]), f"{path}\\n".encode())
""")


@pytest.mark.parametrize("nanny", ["tls://127.0.0.1:8", ""])
def test_a_worker_points_its_fd1_and_fd2_at_its_file(tmp_path, nanny):
    """A nanny's worker (a process of its own) is redirected, its children (the supervisor)
    inherit it; a worker without a nanny (maybe inside the notebook's process) is not."""
    script = tmp_path / "w.py"
    script.write_text(_REDIRECT)
    read, write = os.pipe()
    env = {k: v for k, v in os.environ.items() if k not in (pool_log.ENV_DIR, "KAAS_OWNER_PID")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "logs"), "7", nanny, str(write)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60, pass_fds=(write,))
    os.close(write)
    reported = os.read(read, 4096).decode().strip()
    os.close(read)
    assert done.returncode == 0, done.stderr
    if not nanny:
        assert reported == "None"
        assert "to stdout" in done.stdout and "fd 2 direct" in done.stderr and "child process" in done.stderr
        return
    target = tmp_path / "logs" / pool_log.REMOTE_FOLDER / Path(reported).name
    assert Path(reported) == target and target.name.startswith("worker-")
    assert done.stdout == ""
    assert done.stderr.strip() == f"kaas: this worker's output (fd 1 and 2) now goes to {target}"
    text = target.read_text()
    assert text.startswith("==== kaas worker name=7 address=tls://127.0.0.1:9 pid=")
    for line in ["to stdout", "fd 2 direct", "distributed record", "kaas_magic.worker - WARNING - kaas record",
                 "child process"]:
        assert line in text
    assert (target.stat().st_mode & 0o777) == 0o600
