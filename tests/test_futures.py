"""Calls that do not block: futures of ``run``/``call`` with ``block=False``, on the shared
real pool. Cancelling stops the remote call, queued or running."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import numpy as np
import pytest

import kaas_magic
from kaas_magic.client.futures import Background, KaasFuture
from kaas_magic.record import RunRecord

LONG = "import time\nfor _ in range(400):\n    time.sleep(0.05)\nfinished = True"  # 20 s unless stopped


def wait_for(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        time.sleep(0.02)


def sent(future: KaasFuture) -> bool:
    return future.state == "sent" or future.done()


def test_a_future_gives_what_the_blocking_call_gives_and_its_record(pool):
    x = np.arange(8, dtype=np.float32)
    future = pool.run("y = x + 1", "cpu", inputs={"x": x}, block=False)
    assert isinstance(future, concurrent.futures.Future)
    result = future.result(timeout=60)
    np.testing.assert_array_equal(result.outputs["y"], x + 1)
    assert future.record is result.record and future.record.ok and future.record.worker
    called = pool.call("vector_add", x, x, block=False)
    np.testing.assert_array_equal(called.result(timeout=60), 2 * x)


def test_a_futures_error_is_the_remote_error_with_its_cell_lines(pool):
    future = pool.run("a = 1\nb = a / 0", "cpu", block=False, filename="<kaas In[7]>")
    with pytest.raises(ZeroDivisionError) as caught:
        future.result(timeout=60)
    assert isinstance(future.exception(), ZeroDivisionError)
    assert '"<kaas In[7]>", line 2' in "\n".join(caught.value._render_traceback_())
    assert not future.record.ok and future.state == "error"


def test_wait_and_as_completed_work_on_futures(pool):
    futures = [pool.run(f"v = {i} * 2", "cpu", block=False) for i in range(12)]
    done, not_done = kaas_magic.wait(futures, timeout=120)
    assert not not_done and len(done) == 12
    assert sorted(f.result().outputs["v"] for f in kaas_magic.as_completed(futures)) == [2 * i for i in range(12)]


def test_cancelling_a_running_call_stops_it_on_the_worker(pool):
    started = time.monotonic()
    future = pool.run(LONG, "cpu", block=False)
    wait_for(lambda: sent(future), 30, "the call was sent")
    time.sleep(0.5)  # running on the worker now
    assert future.cancel()
    with pytest.raises(concurrent.futures.CancelledError):
        future.result(timeout=15)
    assert future.cancelled() and time.monotonic() - started < 15  # stopped, not run for 20 s
    assert pool.run("ok = 1", "cpu", worker=future.record.worker).outputs["ok"] == 1  # the worker serves on


def test_cancelling_a_call_queued_on_a_busy_worker_stops_it_before_it_runs(pool):
    worker = pool.routes()[0].address
    # The worker's own figure (set when it loaded kaas), not this process's setting now.
    concurrency = next(int(i["concurrency"]) for i in pool.status().workers if i["address"] == worker)
    busy = [pool.run(LONG, "cpu", worker=worker, block=False) for _ in range(concurrency)]
    queued = None
    try:
        wait_for(lambda: all(sent(f) for f in busy), 30, "the long calls were sent")
        time.sleep(0.5)  # and are running there, every place on the device taken
        queued = pool.run("ran = True", "cpu", worker=worker, block=False)
        wait_for(lambda: sent(queued), 30, "the last call was sent")
        time.sleep(0.3)
        assert not queued.done()  # waiting for a place on the device
        assert queued.cancel()
        with pytest.raises(concurrent.futures.CancelledError):
            queued.result(timeout=15)
    finally:
        for f in busy:
            f.cancel()
    done, _ = concurrent.futures.wait(busy, timeout=30)
    assert len(done) == concurrency and all(f.cancelled() for f in busy)


def test_a_future_cancelled_before_it_is_sent_never_reaches_a_worker():
    gate, reached = threading.Event(), []
    record = RunRecord(call_id="c-1", target="cpu")

    def call(watch):
        gate.wait(10)
        watch("queued", record)  # the call path's first state before sending
        reached.append(True)  # would send now
        return "sent"

    background = Background(lambda r: True)
    try:
        future = background.submit(call)
        wait_for(lambda: future.running(), 5, "the call started")
        assert future.cancel()
        gate.set()
        with pytest.raises(concurrent.futures.CancelledError):
            future.result(timeout=5)
        assert not reached and future.cancelled()
    finally:
        background.close()


def test_a_finished_future_cannot_be_cancelled(pool):
    future = pool.run("z = 3", "cpu", block=False)
    future.result(timeout=60)
    assert not future.cancel() and not future.cancelled()
