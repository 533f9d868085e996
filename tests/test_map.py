"""kaas.map / Pool.map: many calls at once, in batches (see client/fanout.py and the
"batch" operation in worker/execute.py). No timed assertions: figures are the benchmark's
(`kaas bench fanout`)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kaas_magic.protocol import BATCH_RESULTS


def test_kernel_map_in_order_in_batches(pool):
    a = np.arange(16, dtype=np.float32)
    n = 300
    it = pool.map("vector_add", [(a, np.full(16, i, np.float32)) for i in range(n)], fallback=True, progress=False)
    out = list(it)
    assert len(out) == n
    for i, got in enumerate(out):
        np.testing.assert_array_equal(got, a + i)
    stats = it.stats
    assert stats.items == n and stats.errors == 0
    assert 1 < stats.batches < n
    assert sum(stats.per_device.values()) == n
    record = pool.last_run()
    assert record.ok and record.notes and "batch of" in record.notes[0]


def test_code_map_value_and_assigned_names(pool):
    n = 250
    it = pool.map("x * 2 + k", [{"x": i, "k": 1} for i in range(n)], progress=False)
    assert list(it) == [2 * i + 1 for i in range(n)]
    assert 1 < it.stats.batches < n
    # No final expression: the names it assigns.
    out = list(pool.map("y = x * 3\nz = y + 1", [{"x": i} for i in range(n)], progress=False))
    assert out == [{"y": 3 * i, "z": 3 * i + 1} for i in range(n)]


def test_unordered_gives_the_same_results(pool):
    n = 260
    out = list(pool.map("x - 1", ({"x": i} for i in range(n)), ordered=False, progress=False))
    assert sorted(out) == [i - 1 for i in range(n)]


def test_first_error_raises_with_its_index_and_stops_the_rest(pool, tmp_path):
    marks = tmp_path / "ran.txt"
    code = (
        "import time\n"
        "with open(path, 'a') as f:\n"
        "    f.write('x')\n"
        "time.sleep(0.002)\n"
        "1 / (x - k)\n"
    )
    n, k = 600, 25
    it = pool.map(code, [{"x": i, "k": k, "path": str(marks)} for i in range(n)], batch_size=10, progress=False)
    got = []
    with pytest.raises(ZeroDivisionError) as info:
        for value in it:
            got.append(value)
    assert info.value.kaas_index == k
    assert got == [1 / (i - k) for i in range(k)]
    ran = len(marks.read_text())
    assert k < ran < n  # the rest was cancelled: sending stopped, batches in flight stopped
    assert it.stats.pulled < n


def test_return_exceptions_in_place(pool):
    n = 210
    out = list(pool.map("1 // (x % 7)", [{"x": i} for i in range(n)], return_exceptions=True, progress=False))
    assert len(out) == n
    for i, value in enumerate(out):
        if i % 7 == 0:
            assert isinstance(value, ZeroDivisionError)
            assert value.kaas_index == i
        else:
            assert value == 1 // (i % 7)


def test_bounded_in_flight_on_an_endless_iterable(pool):
    pulled = itertools.count()

    def endless():
        for i in itertools.count():
            next(pulled)
            yield {"x": i}

    it = pool.map("x + 1", endless(), max_in_flight=50, progress=False)
    first = list(itertools.islice(it, 100))
    assert first == list(range(1, 101))
    taken = next(pulled)  # how many the map pulled (this call adds one)
    assert 100 <= taken <= 100 + 50 + 1
    it.close()


def test_bad_item_names_its_index(pool):
    a = np.arange(16, dtype=np.float32)
    items = [(a, a), (a,), (a, a)]
    out = list(pool.map("vector_add", items, fallback=True, return_exceptions=True, progress=False))
    np.testing.assert_array_equal(out[0], a + a)
    np.testing.assert_array_equal(out[2], a + a)
    assert isinstance(out[1], Exception) and out[1].kaas_index == 1
    assert "item 1" in str(out[1])
    with pytest.raises(Exception, match="item 1") as info:
        list(pool.map("vector_add", items, fallback=True, progress=False))
    assert info.value.kaas_index == 1


def test_map_usage_errors(pool):
    from kaas_magic.errors import KaasUsageError

    with pytest.raises(KaasUsageError, match="batch_size"):
        pool.map("y = x", [], batch_size=0)
    with pytest.raises(KaasUsageError, match="no option"):
        pool.map("y = x", [], keep=True)
    assert list(pool.map("y = x", [], progress=False)) == []


def test_worker_batch_op_reports_each_item(pool):
    """The worker's "batch" operation on its own: per-item results and errors in one reply."""
    from kaas_magic import serial

    route, service, _ = pool.route("cpu", "numpy")
    message = {
        "op": "batch", "code": "10 // x", "filename": "<kaas map test>", "line_offset": 0, "value": True,
        "service": service.resource, "inputs": {}, "outputs": [], "client": pool.client_id,
        "call_id": f"{pool.client_id[:16]}-batch-unit", "timeout": 30.0, "keep": False, "progress": False,
        "free": [], "items": [{"x": serial.dumps(v)} for v in (1, 0, 5)],
    }
    reply, _ = pool._exchange(route.address, message, None, None, lambda state: None)
    assert reply["ok"] and reply["error"] is None
    results = reply["outputs"][BATCH_RESULTS]
    assert [r["ok"] for r in results] == [True, False, True]
    assert serial.loads(results[0]["value"]) == 10 and serial.loads(results[2]["value"]) == 2
    assert results[1]["error"]["type"].endswith("ZeroDivisionError")


def test_an_unknown_kernel_name_fails_once_naming_it(pool):
    from kaas_magic.kernelspec import KernelError

    with pytest.raises(KernelError, match="unknown kernel 'no_such_kernel'"):
        list(pool.map("no_such_kernel", [(1,), (2,)]))
