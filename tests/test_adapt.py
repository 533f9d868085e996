"""Autoscaling (client.adapt): the policy as a pure function, and a real embedded pool
growing under load, shrinking when idle, to zero and back, losing no call on the way."""

from __future__ import annotations

import io
import math
import threading
import time
from collections import Counter

import pytest

from kaas_magic.client.adapt import (
    DeviceLoad,
    Policy,
    Sample,
    WorkerLoad,
    adapt_command,
    decide,
    queueing_for,
)
from kaas_magic.errors import KaasUsageError

FAST = dict(interval=0.2, scale_up_after=1.0, idle_after=3.0, settle=0.2)
QUIET = {"stdout": io.StringIO()}


# -- the policy, without a cluster --


def worker(name: str, running: int = 0, queued: int = 0, idle_s: float = 0.0, kept: int = 0,
           concurrency: int = 4, target: str = "cpu") -> WorkerLoad:
    return WorkerLoad(name, f"tcp://w{name}", (DeviceLoad(target, running, queued, concurrency),),
                      active=running + queued, kept=kept, idle_s=idle_s)


def window(seconds: float, step: float, *workers: WorkerLoad, pending: dict | None = None) -> list[Sample]:
    return [Sample(t * step, tuple(workers), dict(pending or {})) for t in range(round(seconds / step) + 1)]


POLICY = Policy(interval=0.2, scale_up_after=1.0, idle_after=3.0, target_occupancy=0.8)


def test_sustained_queue_scales_up_to_the_demand():
    samples = window(1.2, 0.2, worker("0", running=4, queued=8))
    assert queueing_for(samples) == pytest.approx(1.2)
    d = decide(samples, 1, POLICY, minimum=1, maximum=10)
    assert d.desired == math.ceil(12 / (4 * 0.8)) == 4
    assert "queue of 8" in d.reason and "1 -> 4 workers" in d.reason
    # bounded by the maximum
    assert decide(samples, 1, POLICY, minimum=1, maximum=3).desired == 3


def test_a_short_queue_does_not_scale_up():
    samples = window(0.6, 0.2, worker("0", running=4, queued=8))
    d = decide(samples, 1, POLICY, minimum=1, maximum=10)
    assert d.desired == 1 and d.reason == ""
    # a break in the queue restarts the count
    broken = window(2.0, 0.2, worker("0", running=4, queued=8))
    broken[-4] = Sample(broken[-4].t, (worker("0", running=2),))
    assert queueing_for(broken) == pytest.approx(0.4)
    assert decide(broken, 1, POLICY, minimum=1, maximum=10).desired == 1


def test_busy_without_queue_keeps_the_workers():
    samples = window(5, 0.2, worker("0", running=4), worker("1", running=3))
    assert decide(samples, 2, POLICY, minimum=0, maximum=10) == decide(samples, 2, POLICY, 0, 10)
    assert decide(samples, 2, POLICY, minimum=0, maximum=10).desired == 2


def test_idle_workers_go_but_not_those_keeping_buffers_or_below_the_minimum():
    samples = window(1, 0.2, worker("0", running=1), worker("1", idle_s=4), worker("2", idle_s=10),
                     worker("3", idle_s=10, kept=2), worker("4", idle_s=1))
    d = decide(samples, 5, POLICY, minimum=1, maximum=10)
    assert d.desired == 3 and d.idle == ("2", "1")  # most idle first; 3 keeps buffers, 4 not idle long
    assert "workers 2, 1 idle" in d.reason and "5 -> 3" in d.reason
    d = decide(samples, 5, POLICY, minimum=4, maximum=10)
    assert d.desired == 4 and d.idle == ("2",)


def test_no_worker_and_calls_waiting_scales_up_at_once():
    samples = [Sample(0.0, (), {"cpu": 2})]
    d = decide(samples, 0, POLICY, minimum=0, maximum=5)
    assert d.desired == 1 and "2 calls waiting with no worker: 0 -> 1 worker" == d.reason
    # nothing waiting: zero stays zero
    assert decide([Sample(0.0)], 0, POLICY, minimum=0, maximum=5).desired == 0
    # all idle: down to zero when allowed
    d = decide(window(1, 0.2, worker("0", idle_s=5)), 1, POLICY, minimum=0, maximum=5)
    assert d.desired == 0 and d.idle == ("0",)


def test_policy_options_are_checked():
    assert Policy.configured() == Policy(1.0, 5.0, 60.0, 0.8, 0.5)  # kaas.adapt.* defaults
    assert Policy.configured(idle_after="3").idle_after == 3.0
    for bad in (dict(interval=0), dict(target_occupancy=1.5), dict(idle_after=-1), dict(scale_up_after="x"),
                dict(idle_after=math.inf)):
        with pytest.raises(KaasUsageError):
            Policy.configured(**bad)
    with pytest.raises(KaasUsageError, match="unknown autoscaling option"):
        Policy.configured(speed=3)


# -- a real embedded pool --


@pytest.fixture
def small_pool(cache_dir):
    import dask.config

    from kaas_magic.client import Pool

    with dask.config.set({"kaas.backends": ["numpy"], "kaas.kernels.warm-library": False}):
        pool = Pool.start(1)
    try:
        pool.wait_ready(timeout=240)
        yield pool
    finally:
        pool.close()


def ready_workers(pool) -> int:
    pool.refresh()
    return sum(1 for r in pool.routes() if r.ready)


def wait_for(condition, timeout: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


def test_adapt_needs_a_cluster_manager(small_pool):
    from kaas_magic.client import Pool

    other = Pool.connect(small_pool.scheduler_address, security=small_pool.client.security)
    try:
        with pytest.raises(KaasUsageError, match="cluster=cluster"):
            other.adapt(1, 3)
    finally:
        other.close()
    with pytest.raises(KaasUsageError):
        small_pool.adapt(3, 1)
    with pytest.raises(KaasUsageError):
        adapt_command(small_pool, "1 2 3")


def test_grows_under_load_and_shrinks_back(small_pool):
    pool = small_pool
    adaptive = pool.adapt(1, 3, **FAST)
    assert adaptive.minimum == 1 and adaptive.maximum == 3
    stop = threading.Event()
    results: Counter = Counter()
    errors: list = []

    def load(k: int):
        i = 0
        while not stop.is_set():
            token = f"{k}-{i}"
            try:
                out = pool.run("import time; time.sleep(0.2); y = x", "cpu", inputs={"x": token}, **QUIET)
                results[out["y"]] += 1
                assert out["y"] == token
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
            i += 1

    threads = [threading.Thread(target=load, args=(k,), daemon=True) for k in range(8)]
    for t in threads:
        t.start()
    try:
        grew = wait_for(lambda: ready_workers(pool) > 1, timeout=60)
        most = max(ready_workers(pool), 1)
        time.sleep(2)  # under load for a while with more workers
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors[:3]
    assert grew, f"the pool did not grow; events: {pool.adapt_log()}"
    assert most <= 3
    assert any("queue of" in line and "-> " in line for line in pool.adapt_log()), pool.adapt_log()
    assert all(n == 1 for n in results.values())
    # Idle now: back to the minimum within idle_after and a margin (a worker's retirement included).
    assert wait_for(lambda: ready_workers(pool) == 1 and len(adaptive.plan) == 1, timeout=FAST["idle_after"] + 60), \
        (pool.routes(), pool.adapt_log())
    assert any("idle" in line for line in pool.adapt_log()), pool.adapt_log()
    assert pool.adapt_reason()
    # and it still serves
    assert pool.run("y = 41 + 1", "cpu", **QUIET)["y"] == 42
    adaptive.stop()
    assert adaptive.state == "stopped"


def test_a_map_grows_the_pool_and_it_shrinks_back_after(small_pool):
    """A map's batches wait for a free place instead of queueing on workers: its backlog is
    the demand autoscaling sees (ControlPlane.set_demand)."""
    pool = small_pool
    adaptive = pool.adapt(1, 3, **FAST)
    sizes: list[int] = []
    watching = threading.Event()

    def watch():
        while not watching.is_set():
            sizes.append(ready_workers(pool))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        results = list(pool.map("import time\ntime.sleep(0.05)\nx * 2", ({"x": i} for i in range(300)),
                                progress=False))
    finally:
        watching.set()
        watcher.join(5)
    assert results == [2 * i for i in range(300)]  # in order, none lost or repeated
    assert max(sizes) > 1, f"the pool did not grow under the map; events: {pool.adapt_log()}"
    assert wait_for(lambda: ready_workers(pool) == 1 and len(adaptive.plan) == 1, timeout=FAST["idle_after"] + 60), \
        (pool.routes(), pool.adapt_log())


def test_no_call_lost_or_duplicated_across_scale_downs(small_pool, tmp_path):
    """Calls keep coming while idle workers are retired under them: each runs once (a file
    of runs, written by the workers, counts them) and returns its own input."""
    pool = small_pool
    pool.cluster.scale(3)
    assert wait_for(lambda: ready_workers(pool) == 3, timeout=120)
    ran = tmp_path / "runs.txt"
    adaptive = pool.adapt(1, 3, interval=0.1, scale_up_after=1000, idle_after=0.4, settle=0.1)
    stop = threading.Event()
    returned: Counter = Counter()
    errors: list = []
    code = f"with open({str(ran)!r}, 'a') as f:\n    f.write(x + '\\n')\ny = x"

    def caller(k: int):
        i = 0
        while not stop.is_set():
            token = f"{k}-{i}"
            try:
                out = pool.run(code, "cpu", inputs={"x": token}, **QUIET)
                assert out["y"] == token
                returned[token] += 1
            except BaseException as e:  # noqa: BLE001
                errors.append((token, e))
            i += 1
            time.sleep(0.15)

    threads = [threading.Thread(target=caller, args=(k,), daemon=True) for k in range(3)]
    for t in threads:
        t.start()
    try:
        # Busy workers stay: at least one goes (usually both) while the calls go on.
        wait_for(lambda: len(adaptive.plan) == 1 and ready_workers(pool) == 1, timeout=45)
        shrank = len(adaptive.plan) < 3
        time.sleep(1)  # calls on after the last retirement
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        adaptive.stop()
    assert shrank, (pool.routes(), pool.adapt_log())
    assert not errors, errors[:3]
    runs = Counter(ran.read_text().split())
    assert runs == returned, "a call ran a different number of times than it returned"
    assert all(n == 1 for n in runs.values())
    assert sum(1 for line in pool.adapt_log() if "idle" in line) >= 1
    assert returned and adaptive.retirements["tried"] >= 1


def test_scales_to_zero_and_back_for_a_cold_call(small_pool):
    pool = small_pool
    adaptive = pool.adapt(0, 1, interval=0.2, scale_up_after=1.0, idle_after=1.0, settle=0.1)
    try:
        assert wait_for(lambda: len(adaptive.plan) == 0 and ready_workers(pool) == 0, timeout=60), pool.adapt_log()
        result = pool.run("y = x * 2", "cpu", inputs={"x": 21}, **QUIET)
        assert result["y"] == 42
        assert result.record.cold
        assert any("waiting with no worker" in line for line in pool.adapt_log()), pool.adapt_log()
    finally:
        adaptive.stop()


def test_adapt_command(small_pool):
    assert "off" in adapt_command(small_pool, "")
    message = adapt_command(small_pool, "1 2 idle-after=30 interval=0.5")
    assert "between 1 and 2 workers" in message and "30 s idle" in message
    assert "autoscaling between 1 and 2" in adapt_command(small_pool, "")
    assert "stopped" in adapt_command(small_pool, "off")


def test_a_retiring_worker_refuses_calls_unrun(small_pool, tmp_path):
    """Past kaas_retire, a call that still reaches the worker is refused before anything
    runs (a client routing elsewhere never sends it; one that did gets a clear error)."""
    pool = small_pool
    address = pool.routes()[0].address
    control = pool._control
    assert control.sync(control.call(address, "kaas_retire", quiet=0.0))["ok"]
    ran = tmp_path / "ran"
    with pytest.raises(Exception, match="retiring"):
        pool.run(f"open({str(ran)!r}, 'w').close()", "cpu", worker=address, **QUIET)
    assert not ran.exists()
    assert control.sync(control.call(address, "kaas_retire", cancel=True))["ok"]
    assert pool.run("y = 7", "cpu", worker=address, **QUIET)["y"] == 7
    # a worker keeping a buffer does not retire
    handle = pool.put(__import__("numpy").arange(3), "cpu")
    reply = control.sync(control.call(address, "kaas_retire", quiet=0.0))
    assert not reply["ok"] and reply["kept"] >= 1
    handle.free()
