"""The Python API under the magics, used without IPython."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest

import kaas_magic
from kaas_magic.record import PHASES


class TimedWrites(io.StringIO):
    """A stdout that remembers when each piece of text arrived."""

    def __init__(self):
        super().__init__()
        self.times: list[tuple[float, str]] = []

    def write(self, text: str) -> int:
        self.times.append((time.perf_counter(), text))
        return super().write(text)


def test_run_returns_outputs_and_a_record(pool):
    x = np.arange(10, dtype=np.float64)
    result = pool.run("y = x * 2\ntotal = float(y.sum())", "cpu", inputs={"x": x}, stdout=io.StringIO())
    np.testing.assert_array_equal(result["y"], x * 2)
    assert result.outputs["total"] == 90.0
    record = result.record
    assert record is pool.last_run()
    assert record.worker in {r.address for r in pool.routes()}
    assert record.ok and not record.cold and record.kind == "device"
    phases = [getattr(record.timings, p) for p in PHASES]
    assert all(p >= 0 for p in phases)
    assert record.timings.total > 0
    # The phases account for the whole call (up to clock granularity).
    assert sum(phases) == pytest.approx(record.timings.total, rel=0.05, abs=5e-4)


def test_print_output_streams_while_the_cell_runs(pool):
    out = TimedWrites()
    code = "import time\nprint('first', flush=True)\ntime.sleep(1.0)\nprint('second')"
    started = time.perf_counter()
    result = pool.run(code, "cpu", stdout=out)
    finished = time.perf_counter()
    first_at = next(t for t, text in out.times if "first" in text)
    assert finished - first_at > 0.7, "the first line only arrived at the end"
    assert first_at - started < finished - started
    assert result.stdout == "first\nsecond\n"


def test_stderr_is_relayed_separately(pool):
    out, err = io.StringIO(), io.StringIO()
    pool.run("import sys\nprint('to out')\nprint('to err', file=sys.stderr)", "cpu", stdout=out, stderr=err)
    assert out.getvalue() == "to out\n" and err.getvalue() == "to err\n"


def test_concurrent_callers_get_their_own_output_and_results(pool):
    results: dict[int, tuple] = {}

    def call(i: int):
        out = io.StringIO()
        r = pool.run(f"import time\nprint('caller {i}')\ntime.sleep(0.2)\nv = k * 10", "cpu",
                     inputs={"k": i}, stdout=out)
        results[i] = (r.outputs["v"], out.getvalue())

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: (i * 10, f"caller {i}\n") for i in range(6)}


def test_run_cell_reads_and_writes_a_namespace(pool):
    ns = {"a": np.ones(4), "unused": np.zeros(10**6)}
    result = pool.run_cell("b = a + 1", "cpu", ns, stdout=io.StringIO())
    np.testing.assert_array_equal(ns["b"], np.full(4, 2.0))
    assert result.record.inputs == ("a",)  # only what the cell reads is sent


def test_explicit_output_that_was_not_assigned_is_reported(pool):
    result = pool.run("a = 1", "cpu", outputs=["a", "nope"], stdout=io.StringIO())
    assert result.outputs == {"a": 1}
    assert "nope" in result.record.skipped


def test_route_prefers_real_devices_and_respects_fallback(pool):
    route, service, _ = pool.route("cpu")
    assert service.backend == "numpy" and service.kind == "device"
    route, service, _ = pool.route("qpu")
    assert service.kind == "simulator"
    with pytest.raises(kaas_magic.TargetUnavailable):
        pool.route("fpga", fallback=False)
    route, service, _ = pool.route("fpga", fallback=True)
    assert service.kind == "fallback" and service.backend == "opencl"


def stand_in_only_target(pool) -> str:
    """A target this pool serves only through a CPU stand-in (which one depends on the machine)."""
    kinds: dict[str, set] = {}
    for route in pool.routes():
        for service in route.services:
            kinds.setdefault(service.target, set()).add(service.kind)
    for target, found in kinds.items():
        if found == {"fallback"}:
            return target
    pytest.skip("every target has a real device here")


def test_fallback_setting_from_dask_config(pool):
    from kaas_magic import config

    target = stand_in_only_target(pool)
    with config.set(fallback=True):
        result = pool.run("r = 1", target, stdout=io.StringIO())
    assert result.record.fallback
    with pytest.raises(kaas_magic.TargetUnavailable):
        pool.run("r = 1", target, stdout=io.StringIO())


def test_worker_option_pins_a_worker(pool):
    target = sorted(r.address for r in pool.routes())[1]
    result = pool.run("r = 1", "cpu", worker=target, stdout=io.StringIO())
    assert result.record.worker == target


def test_transfer_limit_refuses_big_variables(pool):
    from kaas_magic import config

    with config.set(**{"transfer.max-bytes": 1000}):
        with pytest.raises(kaas_magic.VariableNotSendable, match="'big'.*transfer limit"):
            pool.run("r = big.sum()", "cpu", inputs={"big": np.zeros(1000)})


def test_exception_from_the_api_has_the_remote_traceback_as_a_note(pool):
    with pytest.raises(ValueError) as err:
        pool.run("a = 1\nraise ValueError('no good')", "cpu", filename="<script cell>")
    note = "\n".join(getattr(err.value, "__notes__", []))
    assert "raised on kaas worker" in note and "<script cell>" in note and "line 2" in note
    assert pool.last_run().ok is False and pool.last_run().error == "ValueError"


def test_status_lists_workers_services_and_counts(pool):
    pool.run("r = 1", "cpu", stdout=io.StringIO())
    status = pool.status()
    assert len(status.workers) == 2
    for worker in status.workers:
        assert worker["ready"] and worker["host"]
        assert worker["backends"]["numpy"].startswith("ready")
    assert sum(row["calls"] for row in status.rows()) >= 1
    assert "<table>" in status._repr_html_()


def test_the_value_of_a_final_expression_comes_home_under_the_rules_of_outputs(pool):
    x = np.arange(6, dtype=np.float32)
    result = pool.run("y = x * 2\ny.sum()", "cpu", inputs={"x": x}, stdout=io.StringIO())
    assert result.value == float((x * 2).sum()) and "y" in result.outputs
    assert "__kaas_value__" not in result.outputs and result.record.outputs == ("y",)
    assert pool.run("x * 2", "cpu", inputs={"x": x}, value=False).value is None  # asked not to: not sent
    assert pool.run("z = 1", "cpu").value is None  # a statement has no value
    kept = pool.run("x * 3", "cpu", inputs={"x": x}, keep=True).value  # with keep: left on the device
    np.testing.assert_array_equal(kept.get(), x * 3)
    # A value that cannot travel comes back as its repr, made on the worker.
    shown = pool.run("import threading\nthreading.Lock()", "cpu").value
    assert "_thread.lock" in repr(shown) and shown.type_name == "_thread.lock"
    # The expression runs once: a value with side effects is not evaluated twice.
    counted = pool.run("hits = []\nhits.append(1) or len(hits)", "cpu")
    assert counted.value == 1 and counted.outputs["hits"] == [1]
