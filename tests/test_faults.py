"""Faults the pool survives, each caused for real on a pool of its own: runaway cells
(timeouts), interrupts, worker death (os._exit, segfault), retries, device out of memory."""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from IPython.utils.capture import capture_output

from kaas_magic import StaleHandleError, WorkerLost
from kaas_magic.client import Pool
from kaas_magic import fastlink
from kaas_magic.errors import CallTimeout, DeviceOutOfMemory, KaasUsageError, LinkBroken
from kaas_magic.stopping import Watchdog
from kaas_magic.supervisor import MARGIN_S
from kaas_magic.worker import WorkerRuntime

QUIET = {"stdout": io.StringIO()}


@pytest.fixture(scope="module")
def fpool():
    pool = Pool.start(2)
    pool.wait_ready(timeout=240)
    yield pool
    pool.close()


def _two_workers(pool: Pool) -> tuple[str, str]:
    pool.wait_ready(timeout=240)
    deadline = time.monotonic() + 240  # a busy machine warms a replacement slowly
    while len(pool.routes()) < 2 and time.monotonic() < deadline:  # a replacement is starting
        time.sleep(0.2)
        pool.wait_ready(timeout=240)
    addresses = sorted(r.address for r in pool.routes())
    assert len(addresses) >= 2, (f"the pool did not get back to two workers: {addresses}; scheduler sees "
                                 f"{list(pool.client.scheduler_info()['workers'])}, dead {list(pool._dead)}")
    return addresses[0], addresses[1]


def test_timeout_stops_a_runaway_loop_in_place(fpool):
    worker, _ = _two_workers(fpool)
    started = time.monotonic()
    with pytest.raises(CallTimeout, match="timeout of 1 s: it was stopped in place"):
        fpool.run("while True:\n    pass", "cpu", timeout=1, worker=worker, **QUIET)
    assert time.monotonic() - started < 1 + WorkerRuntime.GRACE + 2
    assert fpool.run("x = 6 * 7", "cpu", worker=worker, **QUIET).outputs["x"] == 42  # same worker, healthy


def test_timeout_replaces_a_worker_stuck_in_native_code_and_others_go_on(fpool):
    stuck, other = _two_workers(fpool)
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        bystander = ex.submit(fpool.run, "import time\ntime.sleep(3)\ny = 1", "cpu", worker=other, **QUIET)
        with pytest.raises(CallTimeout, match="is being replaced by a fresh one"):
            fpool.run("import time\ntime.sleep(60)", "cpu", timeout=1, worker=stuck, **QUIET)
        assert bystander.result().outputs["y"] == 1  # the other worker's call was untouched
    assert stuck not in {r.address for r in fpool.routes()}
    replacement, survivor = _two_workers(fpool)
    assert stuck not in (replacement, survivor)
    assert fpool.run("z = 2", "cpu", **QUIET).outputs["z"] == 2


def test_interrupting_the_notebook_stops_the_remote_cell(fpool, shell):
    import kaas_magic

    worker, _ = _two_workers(fpool)
    previous = kaas_magic.use_pool(fpool)
    try:
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
        started = time.monotonic()
        with capture_output(), pytest.raises(KeyboardInterrupt, match="stopped in place"):
            shell.run_cell_magic("kaas", f"cpu --quiet --worker {worker}", "n = 0\nwhile True:\n    n += 1")
        assert time.monotonic() - started < 4
    finally:
        kaas_magic.use_pool(previous)
    busy = [r["in_flight"] for r in fpool.metrics() if r["worker"] == worker]
    assert busy and not any(busy)  # nothing is left running there
    assert fpool.run("ok = True", "cpu", worker=worker, **QUIET).outputs["ok"]


@pytest.mark.parametrize("death", ["import os\nos._exit(3)", "import ctypes\nctypes.string_at(0)"],
                         ids=["os._exit", "segfault"])
def test_worker_death_fails_the_call_clearly_and_the_pool_recovers(fpool, death):
    doomed, other = _two_workers(fpool)
    kept = fpool.put(np.arange(10.0), "cpu", worker=doomed)
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        bystander = ex.submit(fpool.run, "import time\ntime.sleep(2)\ny = 1", "cpu", worker=other, **QUIET)
        with pytest.raises(WorkerLost, match=f"worker {doomed} died .* while running this call"):
            fpool.run(death, "cpu", worker=doomed, **QUIET)
        assert bystander.result().outputs["y"] == 1
    with pytest.raises(StaleHandleError, match="left the pool"):
        kept.get()
    replacement, _ = _two_workers(fpool)
    assert doomed not in {r.address for r in fpool.routes()}
    assert fpool.run("z = 3", "cpu", **QUIET).outputs["z"] == 3


def test_retries_run_the_call_again_only_when_asked(fpool, tmp_path):
    marker = tmp_path / "died-once"
    cell = ("import os, pathlib\nmarker = pathlib.Path(path)\n"
            "if not marker.exists():\n    marker.touch()\n    os._exit(3)\nanswer = 42")
    _two_workers(fpool)
    with pytest.raises(WorkerLost):
        fpool.run(cell, "cpu", inputs={"path": str(marker)}, **QUIET)
    marker.unlink()
    _two_workers(fpool)
    result = fpool.run(cell, "cpu", inputs={"path": str(marker)}, retries=1, **QUIET)
    assert result.outputs["answer"] == 42


def test_device_out_of_memory_is_clear_and_the_worker_survives(fpool):
    worker, _ = _two_workers(fpool)
    with pytest.raises(DeviceOutOfMemory, match=r"NumPy ran out of memory.*8\.00 PiB"):
        fpool.run("a = xp.empty(2**50)", "cpu", worker=worker, **QUIET)
    with pytest.raises(DeviceOutOfMemory, match=r"XLA:CPU.* ran out of memory: .*4503599627370496 bytes"):
        fpool.run("a = xp.ones((2**25, 2**25))", "tpu", fallback=True, worker=worker, **QUIET)
    assert fpool.run("b = xp.ones(3).sum()", "cpu", worker=worker, **QUIET).outputs["b"] == 3


def test_interrupt_cancels_a_call_still_waiting_for_its_turn(fpool, tmp_path):
    worker, _ = _two_workers(fpool)
    concurrency = next(r["concurrency"] for r in fpool.metrics() if r["worker"] == worker and r["target"] == "cpu")
    blockers = "import time\ntime.sleep(2)"
    with concurrent.futures.ThreadPoolExecutor(concurrency) as ex:
        busy = [ex.submit(fpool.run, blockers, "cpu", worker=worker, **QUIET) for _ in range(concurrency)]
        time.sleep(0.5)  # the device is full: the next call queues
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            fpool.run("import pathlib\npathlib.Path(path).touch()", "cpu", worker=worker,
                      inputs={"path": str(tmp_path / "ran")}, **QUIET)
        assert all(f.result().record.ok for f in busy)
    time.sleep(0.5)
    assert not (tmp_path / "ran").exists()  # the queued call never ran


@pytest.mark.timeout(300)
def test_worker_killed_for_memory_fails_the_call_clearly_and_is_replaced():
    """Dask's nanny kills a worker past 95 % of its memory limit, as the OS would: the call
    says its worker died, and the pool comes back."""
    import dask.config

    with dask.config.set({"kaas.backends": ["numpy"]}):
        small = Pool.start(1, memory_limit="800MB")
    try:
        small.wait_ready(timeout=120)
        doomed = small.routes()[0].address
        grow = ("import time\nhog = []\nfor _ in range(60):\n"
                "    hog.append(xp.ones(100 * 2**20 // 8))  # 100 MiB, touched\n    time.sleep(0.05)")
        with pytest.raises(WorkerLost, match=f"worker {doomed} died"):
            small.run(grow, "cpu", **QUIET)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not [r for r in small.routes() if r.ready]:
            time.sleep(0.5)
            small.refresh()
        assert small.run("ok = 1", "cpu", **QUIET).outputs["ok"] == 1
        assert small.last_run().worker != doomed
    finally:
        small.close()


# --- timeouts that hold against C code, options that cannot switch them off, callers that
# --- go away: each followed by a probe that the pool is whole and answers right.


def _healthy(pool: Pool, gone: str | None = None) -> None:
    """The pool has two workers again (``gone`` not among them) and another client's call
    returns the right answer."""
    addresses = _two_workers(pool)
    assert gone not in addresses
    other = Pool.connect(pool.scheduler_address)
    try:
        assert other.run("z = 6 * 7", "cpu", **QUIET).outputs["z"] == 42
    finally:
        other.close()


def test_a_worker_lost_while_its_name_is_briefly_unregistered_keeps_its_nanny(fpool):
    """Dask closes a lost worker's nanny ``lost-worker-timeout`` after the worker left unless
    a worker of that name is registered at that moment: a worker killed twice within the
    timeout (15 s) lost its nanny while the second replacement started, and the pool a worker
    for good. Here the timeout is made shorter than a worker's start, so the check falls in
    that window at once; the embedded pool's nannies restart their workers whatever it says."""
    import dask.config

    with dask.config.set({"distributed.deploy.lost-worker-timeout": "0.1s"}):
        victim, _ = _two_workers(fpool)
        pid = _pid_of(fpool, victim)
        os.kill(pid, signal.SIGKILL)
        _wait_until(lambda: not _running(pid), 10, f"worker process {pid} ending")
        time.sleep(1.5)  # past the timeout, while the replacement starts
        nannies = dict(fpool.cluster.workers)
        assert len(nannies) == 2 and all(n.status.name not in ("closing", "closed") for n in nannies.values()), \
            {name: n.status.name for name, n in nannies.items()}
    _healthy(fpool, gone=victim)


def _pid_of(pool: Pool, address: str) -> int:
    return next(w["pid"] for w in pool.status().workers if w.get("address") == address)


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, exited but not reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _wait_until(condition, seconds: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < seconds, f"{what} did not happen within {seconds} s"
        time.sleep(0.1)
    return time.monotonic() - started


# Code that stays in C holding the GIL: the worker's own threads (its watchdog included)
# cannot run until it ends, which is never.
_HOLDS_THE_GIL = {
    "sum": "sum(range(10**13))",
    "regex": "import re\nre.match('(a*)*b', 'a' * 40)",  # catastrophic backtracking in _sre
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("cell", list(_HOLDS_THE_GIL.values()), ids=list(_HOLDS_THE_GIL))
def test_timeout_holds_against_code_that_holds_the_interpreter(fpool, cell):
    stuck, _ = _two_workers(fpool)
    pid = _pid_of(fpool, stuck)
    bystander_pool = Pool.connect(fpool.scheduler_address)  # another notebook on the same worker
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            def bystander():
                time.sleep(0.7)  # once the worker is frozen
                started = time.monotonic()
                try:
                    return bystander_pool.run("y = 1", "cpu", worker=stuck, **QUIET).outputs["y"], started
                except (WorkerLost, LinkBroken) as e:
                    return e, started

            other = ex.submit(bystander)
            started = time.monotonic()
            with pytest.raises(CallTimeout) as raised:
                fpool.run(cell, "cpu", timeout=2, worker=stuck, **QUIET)
            elapsed = time.monotonic() - started
            # 2 s, the worker's grace, the supervisor's margin, a busy machine's slack
            assert elapsed < 2 + WorkerRuntime.GRACE + MARGIN_S + 6, elapsed
            assert "being replaced by a fresh one" in raised.value.args[0]
            outcome, bystander_started = other.result(timeout=30)  # never hangs
            assert outcome == 1 or isinstance(outcome, (WorkerLost, LinkBroken)), outcome
            assert time.monotonic() - bystander_started < 15
    finally:
        bystander_pool.close()
    _wait_until(lambda: not _running(pid), 10, f"worker process {pid} ending")
    _healthy(fpool, gone=stuck)


_BAD_TIMEOUTS = [float("inf"), 1e10, float("nan"), -1, 0, "x", True]


@pytest.mark.parametrize("bad", _BAD_TIMEOUTS, ids=repr)
def test_a_bad_timeout_is_refused_before_anything_is_sent(fpool, bad):
    with pytest.raises(KaasUsageError, match=r"^timeout "):
        fpool.run("x = 1", "cpu", timeout=bad, **QUIET)


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True, 10**6])
def test_bad_retries_are_refused(fpool, bad):
    with pytest.raises(KaasUsageError, match=r"^retries must be"):
        fpool.run("x = 1", "cpu", retries=bad, **QUIET)


@pytest.mark.parametrize("bad", [0, -5, 2.5, "many", 10**12])
def test_bad_shots_are_refused(fpool, bad):
    with pytest.raises(KaasUsageError, match=r"^shots must be"):
        fpool.call("bell", shots=bad, fallback=True)


def test_a_bad_timeout_setting_is_refused_naming_it(fpool):
    import dask.config

    with dask.config.set({"kaas.timeout": float("inf")}), pytest.raises(KaasUsageError, match=r"kaas\.timeout"):
        fpool.run("x = 1", "cpu", **QUIET)
    with dask.config.set({"kaas.limits.max-timeout": -3}), pytest.raises(KaasUsageError,
                                                                         match=r"kaas\.limits\.max-timeout"):
        fpool.run("x = 1", "cpu", **QUIET)


def test_the_watchdog_survives_bad_timeouts_and_a_failing_stop():
    expired = []

    def on_expire(call_id):
        if call_id == "boom":
            raise RuntimeError("a stop that fails")
        expired.append(call_id)

    dog = Watchdog(on_expire)
    for bad in (float("inf"), float("nan"), -1.0, 0.0):
        with pytest.raises(ValueError):
            dog.arm("bad", bad)
    dog.arm("far", 1e10)  # further than threading can sleep at once: the thread sleeps less
    dog.arm("boom", 0.05)
    dog.arm("after", 0.2)
    time.sleep(0.6)
    assert expired == ["after"] and dog._thread.is_alive()
    dog.arm("later", 0.05)
    time.sleep(0.3)
    assert expired == ["after", "later"]


def _request(service: str, code: str, **fields) -> dict:
    """A call as kaas's client sends it on a direct link."""
    return {"code": code, "filename": "<test>", "line_offset": 0, "outputs_explicit": True, "kernels": [],
            "service": service, "inputs": {}, "outputs": [], "client": "test", "call_id": f"raw-{time.monotonic_ns()}",
            "timeout": None, "keep": False, "progress": False, "free": [], **fields}


@pytest.mark.timeout(120)
def test_a_request_that_bypasses_the_client_cannot_switch_the_watchdog_off(fpool):
    worker, _ = _two_workers(fpool)
    _, service, _ = fpool.route("cpu", worker=worker)
    link = fastlink.Link(fpool._endpoint(worker), None)
    try:
        for bad in [*_BAD_TIMEOUTS, [1], {"s": 1}]:
            link.send(_request(service.resource, "x = 1", timeout=bad))
            reply = link.receive(timeout=10)
            assert reply["kind"] == "result" and not reply["ok"], (bad, reply)
            assert reply["error"]["type"].endswith("KaasUsageError") and "timeout" in reply["error"]["message"]
        link.send(_request(service.resource, "x = 1", line_offset=10**12))
        reply = link.receive(timeout=10)
        assert not reply["ok"] and "line_offset" in reply["error"]["message"]
    finally:
        link.close()
    # The worker's watchdog is alive: a runaway loop is still stopped in place at 1 s.
    started = time.monotonic()
    with pytest.raises(CallTimeout) as raised:
        fpool.run("while True:\n    pass", "cpu", timeout=1, worker=worker, **QUIET)
    assert "stopped in place" in raised.value.args[0]
    assert time.monotonic() - started < 1 + WorkerRuntime.GRACE + 3
    assert worker in {r.address for r in fpool.routes()}
    _healthy(fpool)


# A caller in a process of its own: it sends calls on direct links to a worker, as kaas's
# client does, says so, and waits for answers that never come until it is killed.
_ORPHAN = textwrap.dedent("""
    import json, sys, time
    from kaas_magic.fastlink import Link
    endpoint, request, cells = json.loads(sys.argv[1])
    links = []
    for i, (cell, pause) in enumerate(cells):
        link = Link(endpoint, None)
        link.send({**request, "code": cell, "call_id": f"orphan-{time.monotonic_ns()}-{i}"})
        links.append(link)
        time.sleep(pause)
    print("sent", flush=True)
    time.sleep(600)
""")


def _start_orphans(pool: Pool, worker: str, cells: list[tuple[str, float]]) -> subprocess.Popen:
    _, service, _ = pool.route("cpu", worker=worker)
    request = _request(service.resource, "")
    proc = subprocess.Popen([sys.executable, "-c", _ORPHAN, json.dumps([pool._endpoint(worker), request, cells])],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "sent"
    return proc


def _device_row(pool: Pool, worker: str) -> dict | None:
    """The monitor's row of the device that cpu calls to ``worker`` run on."""
    _, service, _ = pool.route("cpu", worker=worker)
    return next((r for r in pool.metrics() if r["worker"] == worker and service.resource in r["services"]), None)


def _cpu_in_flight(pool: Pool, worker: str) -> int | None:
    row = _device_row(pool, worker)
    return row["in_flight"] if row else None


@pytest.mark.timeout(180)
def test_a_caller_that_goes_away_frees_its_places_on_the_device(fpool):
    """Calls stoppable in place (Python loops, here ones that sleep in short steps so as to
    leave the busy test machine's cores alone): the worker goes on, and the places they
    held are free within a few seconds of their caller's death."""
    worker, _ = _two_workers(fpool)
    concurrency = _device_row(fpool, worker)["concurrency"]
    orphans = _start_orphans(fpool, worker, [("import time\nwhile True:\n    time.sleep(0.05)", 0.0)] * concurrency)
    try:
        _wait_until(lambda: _cpu_in_flight(fpool, worker) == concurrency, 20, "the orphan calls taking every place")
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            queued = ex.submit(fpool.run, "w = 7", "cpu", worker=worker, **QUIET)
            time.sleep(0.5)
            assert not queued.done()  # it waits for a place
            orphans.kill()
            killed = time.monotonic()
            assert queued.result(timeout=15).outputs["w"] == 7
            assert time.monotonic() - killed < 5
    finally:
        orphans.kill()
        orphans.wait()
    _wait_until(lambda: _cpu_in_flight(fpool, worker) == 0, 5, "the orphan calls ending")
    assert worker in {r.address for r in fpool.routes()}  # stopped in place: the worker goes on
    _healthy(fpool)


@pytest.mark.timeout(240)
def test_a_caller_that_goes_away_from_code_stuck_in_c_gets_its_worker_replaced(fpool):
    """A sleep (C code that lets go of the GIL) and a C loop that holds it: neither can be
    stopped in place, so the worker is replaced within seconds of the caller's death, and
    another notebook's call waiting there fails promptly rather than hanging."""
    worker, _ = _two_workers(fpool)
    pid = _pid_of(fpool, worker)
    orphans = _start_orphans(fpool, worker, [("import time\ntime.sleep(60)", 0.0)] * 2
                             + [("import time\ntime.sleep(60)", 1.5), ("sum(range(10**13))", 1.0)])
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            waiting = ex.submit(fpool.run, "w = 7", "cpu", worker=worker, **QUIET)
            time.sleep(0.5)
            orphans.kill()
            killed = time.monotonic()
            _wait_until(lambda: not _running(pid), 10, f"worker process {pid} ending")
            try:
                assert waiting.result(timeout=15).outputs["w"] == 7
            except (WorkerLost, LinkBroken):  # failed promptly: never hangs
                pass
            assert time.monotonic() - killed < 15
    finally:
        orphans.kill()
        orphans.wait()
    _healthy(fpool, gone=worker)


_OWNER = textwrap.dedent("""
    import io, os, threading, time
    import dask.config
    from kaas_magic.client import Pool

    if __name__ == "__main__":
        with dask.config.set({"kaas.backends": ["numpy"]}):
            pool = Pool.start(2)
        pool.wait_ready(timeout=120)
        workers = pool.status().workers
        print(" ".join(str(w["pid"]) for w in workers), flush=True)
        stuck = workers[0]["address"]
        threading.Thread(target=pool.run, args=("sum(range(10**13))", "cpu"),
                         kwargs={"worker": stuck, "stdout": io.StringIO()}, daemon=True).start()
        time.sleep(1.5)
        os._exit(0)  # the notebook's kernel dies: no cleanup runs
""")


@pytest.mark.timeout(240)
def test_an_embedded_pool_ends_with_its_notebook(tmp_path):
    """The notebook's process dies (kernel restart, crash): its embedded pool's workers end
    with it, the one stuck in C code too."""
    script = tmp_path / "owner.py"
    script.write_text(_OWNER)
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in owner.stdout.readline().split()]
        assert len(pids) == 2 and all(_running(p) for p in pids)
        owner.wait(timeout=60)
        _wait_until(lambda: not any(_running(p) for p in pids), 10, f"worker processes {pids} ending")
    finally:
        owner.kill()
        owner.wait()
