"""The wire protocol (see kaas_magic.protocol): each request names its operation, which
the worker runs by a function of its own (put, fetch and compile travel as operations,
never as generated source); an unknown operation is refused; every reply has the typed
keys, whichever way it was built."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest

from kaas_magic import fastlink, protocol
from kaas_magic.errors import KaasUsageError
from kaas_magic.handles import DeviceHandle

SCALE3 = (
    "__kernel void scale3(__global const float *a, __global float *out) {\n"
    "  int i = get_global_id(0); out[i] = 3.0f * a[i]; }\n"
)


@pytest.fixture
def sent(pool, monkeypatch):
    """The requests the pool sends, as they go on the link."""
    requests: list[dict] = []
    exchange = pool._calls.exchange

    def recording(address, message, *rest):
        requests.append(dict(message))
        return exchange(address, message, *rest)

    monkeypatch.setattr(pool._calls, "exchange", recording)
    return requests


_LEFT_OUT = object()


def _raw(pool, worker: str, **fields) -> dict:
    """One request sent on a direct link of our own, as any client could, and its reply
    (a field given as _LEFT_OUT is not sent)."""
    _, service, _ = pool.route("cpu", worker=worker)
    request = {"op": "run", "code": "x = 1", "filename": "<test>", "service": service.resource, "inputs": {},
               "outputs": ["x"], "client": "test-protocol", "call_id": f"raw-{time.monotonic_ns()}",
               "timeout": None, "keep": False, "progress": False, "free": [], **fields}
    request = {k: v for k, v in request.items() if v is not _LEFT_OUT}
    link = fastlink.Link(pool._endpoint(worker), None)
    try:
        link.send(request)
        reply = link.receive(timeout=30)
        while reply.get("kind") == "stream":
            reply = link.receive(timeout=30)
        return reply
    finally:
        link.close()


def test_put_fetch_and_compile_travel_as_operations(pool, sent):
    a = np.arange(1000, dtype=np.float32)
    kept = pool.put(a, "fpga", fallback=True)
    assert isinstance(kept, DeviceHandle) and kept.shape == (1000,) and kept.nbytes == a.nbytes
    put_record = pool.last_run()
    assert put_record.ok and put_record.outputs == (protocol.PUT_KEPT,) and put_record.worker == kept.worker
    np.testing.assert_array_equal(kept.get(), a)
    assert pool.last_run().worker == kept.worker and pool.last_run().bytes_out >= a.nbytes

    spec, record = pool.register(SCALE3, "opencl", signature="scale3(a: float32[n], out: out float32[n])",
                                 fallback=True)
    assert record.ok and record.kernels.get("scale3") and spec.name == "scale3"
    np.testing.assert_allclose(pool.call("scale3", a, fallback=True), 3 * a)

    ops = [m["op"] for m in sent]
    assert ops[:2] == ["put", "fetch"] and "compile" in ops and ops[-1] == "call"
    for message in sent:
        if message["op"] != "run":
            assert "code" not in message  # nothing for the worker to compile or exec
    put, fetch = sent[0], sent[1]
    assert set(put["inputs"]) == {protocol.PUT_VALUE} and put["outputs"] == [protocol.PUT_KEPT] and put["keep"]
    assert set(fetch["inputs"]) == {protocol.FETCH_HANDLE} and fetch["outputs"] == [protocol.FETCH_VALUE]
    compile_ = next(m for m in sent if m["op"] == "compile")
    assert compile_["kernel"] == "scale3" and compile_["outputs"] == [protocol.COMPILE_HOW]
    assert [k["name"] for k in compile_["kernels"]] == ["scale3"]


def test_a_cell_is_the_run_operation(pool, sent):
    result = pool.run("y = 2 * x", "cpu", inputs={"x": 21}, stdout=io.StringIO())
    assert result.outputs == {"y": 42}
    assert sent[-1]["op"] == "run" and sent[-1]["code"] == "y = 2 * x"


def test_an_unknown_operation_is_refused_with_a_clear_error(pool):
    worker = pool.routes()[0].address
    for op in ("exec", "", None, ["run"]):
        reply = _raw(pool, worker, op=op)
        assert reply["kind"] == "result" and not reply["ok"], (op, reply)
        assert reply["error"]["type"].endswith("KaasUsageError")
        assert "unknown operation" in reply["error"]["message"] and repr(op) in reply["error"]["message"]
    # Through the client too: raised in the notebook, naming what a worker runs.
    with pytest.raises(KaasUsageError, match=r"unknown operation \(op\) 'exec'.*compile, fetch, put, run"):
        pool._operation("exec", "cpu", {}, "x", filename="<test>", worker=worker)
    # The worker goes on serving.
    assert pool.run("z = 5", "cpu", worker=worker, stdout=io.StringIO()).outputs["z"] == 5


def test_a_request_naming_no_operation_runs_its_cell(pool):
    from kaas_magic import serial

    reply = _raw(pool, pool.routes()[0].address, op=_LEFT_OUT, code="x = 7")
    assert reply["ok"] and serial.loads(reply["outputs"]["x"]) == 7


def test_every_reply_has_the_typed_keys(pool):
    worker = pool.routes()[0].address
    keys = protocol.Reply.__required_keys__ | protocol.Reply.__optional_keys__
    replies = {
        "ran": _raw(pool, worker, code="x = 1"),
        "failed in the cell": _raw(pool, worker, code="x = 1 / 0"),
        "refused before running": _raw(pool, worker, op="nope"),
        "bad timeout": _raw(pool, worker, timeout=-1.0),
    }
    for how, reply in replies.items():
        assert set(reply) == keys, how
        assert set(reply["timings"]) == protocol.Timings.__required_keys__, how
        assert reply["ok"] == (reply["error"] is None), how
        assert reply["worker"] == worker, how
        assert reply["worker_exiting"] is False and reply["received_at"] <= reply["replied_at"], how
    assert replies["ran"]["ok"] and "x" in replies["ran"]["outputs"] and replies["ran"]["device"]
    error = replies["failed in the cell"]["error"]
    assert set(error) == protocol.ErrorInfo.__required_keys__ and error["type"] == "ZeroDivisionError"


def test_the_reply_builder_is_the_one_place_replies_are_made():
    timings = {"warm_wait": 0.0, "queue": 0.0, "setup": 0.1, "execute": 0.2, "to_host": 0.0}
    ok = protocol.reply(None, timings, {"y": b"packed"}, kernels={"k": "compiled"})
    assert ok["ok"] and ok["kind"] == "result" and ok["outputs"] == {"y": b"packed"} and not ok["worker_exiting"]
    assert set(ok) == protocol.Reply.__required_keys__

    from kaas_magic.worker.execute import failed_reply

    failed = failed_reply(KaasUsageError("no"), execute=2.0, worker_exiting=True)
    assert set(failed) == protocol.Reply.__required_keys__
    assert not failed["ok"] and failed["worker_exiting"] and failed["timings"]["execute"] == 2.0
    assert failed["error"]["message"] == "no" and failed["kept"] == {} and failed["outputs"] == {}
