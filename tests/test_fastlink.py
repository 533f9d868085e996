"""The hot path's parts on their own: the direct link (Unix socket and TCP), the device
slot's queue, and the timeout watchdog. Real sockets and threads; no Dask needed except in
the last tests, which use the shared pool."""

from __future__ import annotations

import socket
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from kaas_magic import fastlink, serial
from kaas_magic.device_slot import DeviceSlot, LeftQueue
from kaas_magic.errors import KaasError
from kaas_magic.stopping import Watchdog


def _echo(replier, **message):
    """A handler that answers with what it got, and streams one message first."""
    replier.write({"kind": "stream", "chunks": [("stdout", "working\n")]})
    if message.get("answered_already"):
        replier.write({"kind": "result", "echo": "sent by the handler"})
        return None
    return {"kind": "result", "echo": {k: serial.loads(v) if isinstance(v, tuple) else v
                                       for k, v in message.items()}}


@pytest.fixture(params=["unix", "tcp"])
def endpoint(request, tmp_path):
    server = fastlink.Server("127.0.0.1", _echo, None, unix_path=str(tmp_path / "link.sock"))
    endpoint = {"host": "127.0.0.1", "port": server.port, "unix": server.unix_path, "hostname": socket.gethostname()}
    if request.param == "tcp":
        endpoint["unix"] = None
    yield endpoint
    server.close()


def _round_trip(link, message):
    link.send(message)
    streamed = link.receive()
    assert streamed == {"kind": "stream", "chunks": [("stdout", "working\n")], "call_id": message.get("call_id")}
    return link.receive()


def test_link_carries_small_and_large_messages_in_order(endpoint):
    link = fastlink.Link(endpoint, None)
    expected_family = socket.AF_UNIX if endpoint["unix"] else socket.AF_INET
    assert link.sock.family == expected_family
    rng = np.random.default_rng(1)
    try:
        # Sizes around the read-ahead buffer, so that frames split across reads both ways.
        for n in (0, 1, 1000, fastlink._Reader.AHEAD // 4 - 3, fastlink._Reader.AHEAD // 4 + 5, 300_000):
            a = rng.random(n, dtype=np.float32)
            reply = _round_trip(link, {"n": n, "a": serial.dumps(a), "pair": serial.dumps((a, a[::-1].copy()))})
            got = reply["echo"]
            assert got["n"] == n
            np.testing.assert_array_equal(got["a"], a)
            np.testing.assert_array_equal(got["pair"][1], a[::-1])
            assert got["a"].flags.writeable
    finally:
        link.close()


@pytest.mark.parametrize("value", [
    np.arange(12, dtype=">i4").reshape(3, 4),  # big-endian, 2-d
    np.array(2.5, dtype=np.float64),  # 0-d
    np.zeros((0, 3), dtype=np.complex64),  # empty
    np.array(["2026-11-28", "NaT"], dtype="datetime64[s]"),
    np.array([True, False]),
    np.arange(10.0)[::2],  # not contiguous: goes by pickle
    np.ma.masked_array([1.0, 2.0], mask=[0, 1]),  # a subclass: goes by pickle
    np.array([{"a": 1}, None], dtype=object),  # objects: go by pickle
], ids=["big-endian-2d", "0-d", "empty", "datetime", "bool", "strided", "masked", "object"])
def test_arrays_arrive_equal_in_value_type_and_dtype(endpoint, value):
    link = fastlink.Link(endpoint, None)
    try:
        got = _round_trip(link, {"v": serial.dumps(value)})["echo"]["v"]
    finally:
        link.close()
    assert type(got) is type(value)
    assert got.dtype == value.dtype and got.shape == value.shape
    if value.dtype != object:
        np.testing.assert_array_equal(got, value)
        assert got.flags.writeable
    else:
        assert list(got) == list(value)


def test_a_plain_array_travels_as_its_bytes_and_reads_back_writeable():
    a = np.arange(6, dtype=np.int16).reshape(2, 3)
    header, frames = serial.dumps(a)
    assert header["serializer"] == "kaas-array" and serial.nbytes((header, frames)) == a.nbytes
    assert np.shares_memory(np.frombuffer(frames[0], np.uint8), a)  # sent without a copy
    # Frames the receiver cannot write to (bytes) still give it an array it may change.
    got = serial.loads((header, [bytes(frames[0])]))
    got[0, 0] = 7
    np.testing.assert_array_equal(got[1], a[1])


def test_a_handler_that_answered_itself_is_not_answered_twice(endpoint):
    link = fastlink.Link(endpoint, None)
    try:
        assert _round_trip(link, {"answered_already": True})["echo"] == "sent by the handler"
        # The next exchange on the same link lines up: no stray second reply in between.
        assert _round_trip(link, {"x": 1})["echo"] == {"x": 1}
    finally:
        link.close()


def test_garbage_is_refused_and_the_link_goes_on(endpoint):
    link = fastlink.Link(endpoint, None)
    try:
        frames = [b"not a pickle"]
        header = fastlink._COUNT.pack(1) + fastlink._COUNT.pack(len(frames[0]))
        link.sock.sendall(header + frames[0])
        refused = link.receive()
        assert refused["kind"] == "refused" and "UnpicklingError" in refused["text"]
        assert _round_trip(link, {"x": 2})["echo"] == {"x": 2}
    finally:
        link.close()


def test_a_worker_on_another_machine_is_reached_over_tcp(endpoint):
    if not endpoint["unix"]:
        pytest.skip("the Unix-socket case is the one under test")
    elsewhere = dict(endpoint, hostname="some-other-host")
    assert fastlink._connect_unix(elsewhere) is None
    link = fastlink.Link(elsewhere, None)
    try:
        assert link.sock.family == socket.AF_INET
        assert _round_trip(link, {"x": 3})["echo"] == {"x": 3}
    finally:
        link.close()


def test_device_slot_runs_calls_in_arrival_order_and_lets_queued_ones_leave():
    slot = DeviceSlot("dev", concurrency=1)
    order: list[int] = []
    cancelled = threading.Event()
    left: list[str] = []
    first_in = threading.Event()
    release_first = threading.Event()

    def first():
        with slot.turn():
            first_in.set()
            release_first.wait(10)
            order.append(0)

    def queued(i):
        with slot.turn():
            order.append(i)

    def leaver():
        try:
            with slot.turn(give_up=cancelled.is_set):
                left.append("ran")
        except LeftQueue:
            left.append("left")

    threads = [threading.Thread(target=first)]
    threads[0].start()
    assert first_in.wait(10)
    threads.append(threading.Thread(target=leaver))
    threads[-1].start()
    for i in range(1, 5):
        threads.append(threading.Thread(target=queued, args=(i,)))
        threads[-1].start()
        deadline = time.monotonic() + 5
        while slot.queued < i + 1 and time.monotonic() < deadline:  # arrive one after the other
            time.sleep(0.001)
    assert slot.load() == 1 + 5
    cancelled.set()
    slot.wake()
    deadline = time.monotonic() + 5
    while not left and time.monotonic() < deadline:
        time.sleep(0.001)
    assert left == ["left"]  # gone from the queue while the device was still busy
    release_first.set()
    for t in threads:
        t.join(10)
    assert order == [0, 1, 2, 3, 4]
    assert slot.load() == 0 and slot.in_flight == 0


def test_watchdog_expires_calls_at_their_deadlines_and_not_disarmed_ones():
    expired: list[tuple[str, float]] = []
    started = time.monotonic()
    dog = Watchdog(lambda call_id: expired.append((call_id, time.monotonic() - started)))
    dog.arm("late", 0.4)
    dog.arm("early", 0.1)
    dog.arm("cancelled", 0.2)
    dog.disarm("cancelled")
    for i in range(200):  # many short calls armed and disarmed, as every call with a timeout does
        dog.arm(f"quick-{i}", 60)
        dog.disarm(f"quick-{i}")
    time.sleep(0.8)
    assert [call_id for call_id, _ in expired] == ["early", "late"]
    assert expired[0][1] >= 0.1 and expired[1][1] >= 0.4
    assert len(dog._heap) < 100  # disarmed entries do not pile up


def test_local_workers_are_reached_over_a_unix_socket(pool):
    worker = pool.routes()[0].address
    assert pool.transport(worker) == "unix"
    assert pool.run("x = 6 * 7", "cpu").outputs["x"] == 42


# A lambda travels by value: the workers need not import this test module.
_profiler_enabled = lambda: __import__("dask").config.get("distributed.worker.profile.enabled")  # noqa: E731


def test_embedded_workers_run_without_dasks_sampling_profiler(pool):
    # kaas.pool.worker-profiler (default false): it sampled every thread every 10 ms.
    assert set(pool.client.run(_profiler_enabled).values()) == {False}


def test_an_input_the_worker_cannot_rebuild_is_named(pool, tmp_path, monkeypatch):
    # A module only this process can import: the value pickles here but not on the worker.
    (tmp_path / "only_here_kaas.py").write_text(textwrap.dedent("""
        class Thing:
            pass
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import only_here_kaas

    try:
        with pytest.raises(KaasError, match="variable 'thing' could not be rebuilt on worker .*only_here_kaas"):
            pool.run("y = thing", "cpu", inputs={"thing": only_here_kaas.Thing()})
        assert pool.run("z = 1", "cpu").outputs["z"] == 1  # the worker goes on
    finally:
        sys.modules.pop("only_here_kaas", None)
