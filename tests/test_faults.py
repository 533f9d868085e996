"""Faults the pool survives, each caused for real on a pool of its own: runaway cells
(timeouts), interrupts, worker death (os._exit, segfault), retries, device out of memory."""

from __future__ import annotations

import concurrent.futures
import io
import os
import signal
import threading
import time

import numpy as np
import pytest
from IPython.utils.capture import capture_output

from kaas_magic import StaleHandleError, WorkerLost
from kaas_magic.client import Pool
from kaas_magic.errors import CallTimeout, DeviceOutOfMemory
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
    previous, kaas_magic._pool = kaas_magic._pool, fpool
    try:
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
        started = time.monotonic()
        with capture_output(), pytest.raises(KeyboardInterrupt, match="stopped in place"):
            shell.run_cell_magic("kaas", f"cpu --quiet --worker {worker}", "n = 0\nwhile True:\n    n += 1")
        assert time.monotonic() - started < 4
    finally:
        kaas_magic._pool = previous
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
