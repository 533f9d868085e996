"""Large arrays through shared memory on same-host links (shared_frames + fastlink): the
bytes arrive intact and in place, segments are reused only once given back, a peer cannot
pass memory that can be pulled from under the reader, and nothing is left behind when a
notebook or a worker is killed in the middle of a transfer."""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import StandInCudaDevice
from kaas_magic import fastlink, serial, shared_frames
from kaas_magic.client import Pool
from kaas_magic.errors import KaasError
from kaas_magic.shared_frames import SharedFrames

MiB = 2**20


def memfds(pid: int | str = "self") -> tuple[int, int]:
    """kaas's shared-memory segments a process holds: (open descriptors, mappings)."""
    fds = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds += "memfd:kaas-frame" in os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:  # closed while listing
            pass
    with open(f"/proc/{pid}/maps") as maps:
        mappings = sum("memfd:kaas-frame" in line for line in maps)
    return fds, mappings


def dev_shm() -> set[str]:
    """Named shared memory. (Semaphores, ``sem.*``, are left out: a worker Dask's nanny
    restarts makes multiprocessing locks there, which are not memory.)"""
    return {name for name in os.listdir("/dev/shm") if not name.startswith("sem.")}


class Pair:
    """Two ends of a same-host link, each with its shared-memory state, as fastlink sets them up."""

    def __init__(self) -> None:
        self.a, self.b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for s in (self.a, self.b):
            fastlink.tune(s)
            s.settimeout(30)  # a test that goes wrong fails, never hangs
        self.shared_a, self.shared_b = SharedFrames(), SharedFrames()
        self.reader_a, self.reader_b = fastlink._Reader(self.a, self.shared_a), fastlink._Reader(self.b, self.shared_b)

    def a_to_b(self, message):
        return self._across(self.a, self.shared_a, self.reader_b, message)

    def b_to_a(self, message):
        return self._across(self.b, self.shared_b, self.reader_a, message)

    @staticmethod
    def _across(sock, shared, reader, message):
        # The send in a thread of its own: a message larger than the socket's buffers
        # blocks its sender until the other end reads.
        sender = threading.Thread(target=fastlink._send, args=(sock, message, shared))
        sender.start()
        try:
            return fastlink._decode(reader.message())
        finally:
            sender.join(30)

    def close(self) -> None:
        for reader in (self.reader_a, self.reader_b):
            reader.close()
        self.shared_a.close()
        self.shared_b.close()
        self.a.close()
        self.b.close()


@pytest.fixture
def pair():
    p = Pair()
    yield p
    p.close()


def _warm(shared: SharedFrames, nbytes: int, timeout: float = 10) -> None:
    """Wait until ``shared`` has a free segment for ``nbytes`` (made in the background)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with shared._lock:
            if any(nbytes <= s.size for s in shared._free):
                return
        time.sleep(0.01)
    raise AssertionError("no segment was made in the background")


def test_a_large_array_arrives_in_place_and_its_segment_is_reused_only_after_release(pair):
    x = np.random.default_rng(0).random(2 * MiB // 8)
    first = pair.a_to_b({"x": serial.dumps(x)})  # no segment yet: the socket, and one is made
    assert pair.shared_a.sent == 0 and np.array_equal(serial.loads(first["x"]), x)
    _warm(pair.shared_a, x.nbytes)
    got = serial.loads(pair.a_to_b({"x": serial.dumps(x)})["x"])
    assert pair.shared_a.sent == 1 and pair.shared_b.received == 1
    assert np.array_equal(got, x)
    (segment,) = pair.shared_b._peer.values()
    start = np.frombuffer(segment.mapping, np.uint8, count=1).ctypes.data
    assert got.ctypes.data == start  # a view of the segment, not a copy
    view = got[10:20]
    del got
    gc.collect()
    # Still viewed through a slice: not given back, and the sender has nothing free.
    assert pair.shared_b.take_returns() == [] and not pair.shared_a._free
    y = x * 2
    pair.a_to_b({"y": serial.dumps(y)})  # the segment is lent: this goes through the socket
    assert pair.shared_a.sent == 1 and np.array_equal(view, x[10:20])  # the view was not overwritten
    del view
    gc.collect()
    pair.b_to_a({"ack": 1})  # the notice of release rides on the next message back
    assert len(pair.shared_a._free) >= 1
    again = serial.loads(pair.a_to_b({"y": serial.dumps(y)})["y"])
    assert pair.shared_a.sent == 2 and np.array_equal(again, y)


def test_results_come_home_through_shared_memory_too(pair):
    x = np.arange(3 * MiB // 4, dtype=np.float32)
    pair.b_to_a({"r": serial.dumps(x)})
    _warm(pair.shared_b, x.nbytes)
    home = serial.loads(pair.b_to_a({"r": serial.dumps(x)})["r"])
    assert pair.shared_b.sent == 1 and pair.shared_a.received == 1 and np.array_equal(home, x)
    home[0] = -1  # writable, and this side's own: the sender's array is untouched
    assert x[0] == 0


def _mapped_at(segment) -> int:
    return np.frombuffer(segment.mapping, np.uint8, count=1).ctypes.data


def test_a_result_sent_back_goes_as_a_reference_and_its_segment_stays_taken_while_viewed(pair):
    x = np.random.default_rng(5).random(2 * MiB // 8)
    pair.b_to_a({"r": serial.dumps(x)})
    _warm(pair.shared_b, x.nbytes)
    home = serial.loads(pair.b_to_a({"r": serial.dumps(x)})["r"])  # a view of b's segment, on a
    (segment,) = [s for s in pair.shared_b._own.values() if s.lent]
    for part, offset in ((home, 0), (home[1000:1000 + MiB // 8 + 10], 8000)):  # the whole, and a large slice
        back = pair.a_to_b({"r": serial.dumps(part)})["r"]
        assert pair.shared_a.sent == 0  # nothing copied into a segment of a's
        in_place = serial.loads(back, read_only_ok=True)
        assert in_place.ctypes.data == _mapped_at(segment) + offset and not in_place.flags.writeable
        assert np.array_equal(in_place, part)
        own = serial.loads(back)  # a consumer that may write gets a copy of its own
        assert own.flags.writeable and own.ctypes.data != in_place.ctypes.data and np.array_equal(own, part)
    assert pair.shared_a.sent_back == 2 and pair.shared_b.received_back == 2
    del home, part, back, own
    gc.collect()
    pair.a_to_b({"ack": 1})  # a gives the segment back ...
    assert not segment.lent and segment not in pair.shared_b._free  # ... but b still views it
    y = x + 1
    pair.b_to_a({"r": serial.dumps(y)})  # none free: the socket, and one is made
    _warm(pair.shared_b, y.nbytes)
    pair.b_to_a({"r": serial.dumps(y)})  # another segment carries this one
    assert pair.shared_b.sent == 2
    assert np.array_equal(in_place, x[1000:1000 + MiB // 8 + 10])  # the view was not overwritten
    del in_place
    gc.collect()
    assert segment in pair.shared_b._free


def test_a_borrowed_segment_is_lent_as_it_is(pair):
    assert pair.shared_b.borrow(2 * MiB) is None  # none free yet: one is made
    _warm(pair.shared_b, 2 * MiB)
    made = pair.shared_b.borrow(2 * MiB)
    result = made.view(np.float64)
    result[:] = np.arange(result.size)  # e.g. a kernel's output, written in place
    (segment,) = [s for s in pair.shared_b._own.values() if s.borrowed]
    home = serial.loads(pair.b_to_a({"r": serial.dumps(result)})["r"])
    assert pair.shared_b.sent_in_place == 1 and pair.shared_b.sent == 1
    assert np.array_equal(home, np.arange(result.size)) and segment.lent
    del made, result
    gc.collect()
    assert segment not in pair.shared_b._free  # a still views it
    del home
    gc.collect()
    pair.a_to_b({"ack": 1})
    assert segment in pair.shared_b._free and not segment.borrowed
    # Lent again, the copy path is used for an array that is not borrowed.
    x = np.ones(2 * MiB // 8)
    assert np.array_equal(serial.loads(pair.b_to_a({"x": serial.dumps(x)})["x"]), x)
    assert pair.shared_b.sent_in_place == 1 and pair.shared_b.sent == 2


def test_a_segment_viewed_when_its_link_closes_goes_with_its_last_view():
    """Nothing else may hold a segment: not the thread that made it in the background (it
    did, until its next request), not a closed link."""
    before = memfds()
    p = Pair()
    p.shared_b.borrow(2 * MiB)  # none free: made in the background
    _warm(p.shared_b, 2 * MiB)
    made = p.shared_b.borrow(2 * MiB)
    made[:] = 1
    home = serial.loads(p.b_to_a({"r": serial.dumps(made)})["r"])  # lent as it is, and viewed on a
    p.close()
    gc.collect()
    assert np.all(home == 1) and np.all(made == 1)  # the data outlives the link while it is viewed
    del made, home
    gc.collect()
    assert memfds() == before


@pytest.mark.parametrize("case", ["unknown segment", "not lent", "past its end", "no shared memory"])
def test_a_peer_cannot_send_back_memory_it_was_not_lent(pair, case):
    import struct

    head = b"\x80\x05N."  # pickle of None
    segment = shared_frames._make(2 * MiB)
    pair.shared_b.add_free(segment)  # b's own, free: never lent
    size, offset, inode = MiB, 0, segment.inode
    if case == "unknown segment":
        inode += 12345
    elif case == "past its end":
        segment.lent = True
        offset = segment.size - MiB + 1
    reader = pair.reader_b if case != "no shared memory" else fastlink._Reader(pair.b)
    _send_raw(pair.a, [2, len(head), size | fastlink.FLAGS], [], head + struct.pack("<QQ", inode, offset))
    with pytest.raises(ValueError, match="did not lend|has none"):
        reader.message()
    assert segment.local == 0


def test_small_frames_and_remote_links_stay_on_the_socket(pair):
    small = np.ones(1000)
    for _ in range(3):
        assert np.array_equal(serial.loads(pair.a_to_b({"s": serial.dumps(small)})["s"]), small)
    assert pair.shared_a.sent == 0 and not pair.shared_a._own
    tcp = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(tcp.getsockname())
    try:
        server, _ = tcp.accept()
        x = np.ones(2 * MiB // 8)
        fastlink._send(client, {"x": serial.dumps(x)})  # TCP: no shared state at all
        assert np.array_equal(serial.loads(fastlink._decode(fastlink._Reader(server).message())["x"]), x)
        server.close()
    finally:
        client.close()
        tcp.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.sampled_from([0, 1, 1000, MiB - 1, MiB, MiB + 1, 2 * MiB + 3, 5 * MiB]), min_size=1, max_size=6),
       dtype=st.sampled_from(["uint8", "float32", "complex128", "int16"]))
def test_any_mix_of_arrays_arrives_intact_in_order(pair, sizes, dtype):
    itemsize = np.dtype(dtype).itemsize
    arrays = [np.frombuffer(np.random.default_rng(n).bytes(n - n % itemsize), dtype) for n in sizes]
    message = {f"v{i}": serial.dumps(a) for i, a in enumerate(arrays)}
    for _ in range(2):  # the second time, warm segments carry the large ones
        got = pair.a_to_b(message)
        assert [serial.loads(got[f"v{i}"]).tobytes() for i in range(len(arrays))] == [a.tobytes() for a in arrays]
        back = pair.b_to_a({k: serial.dumps(serial.loads(v)) for k, v in got.items()})
        assert [serial.loads(back[f"v{i}"]).tobytes() for i in range(len(arrays))] == [a.tobytes() for a in arrays]
        del got, back
        gc.collect()


def _unsealed_memfd(size: int) -> int:
    fd = os.memfd_create("kaas-frame", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def _send_raw(sock: socket.socket, words: list[int], fds: list[int], payload: bytes = b"") -> None:
    import array
    import struct

    header = struct.pack(f"<{len(words)}Q", *words)
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([header + payload], ancillary)


@pytest.mark.parametrize("case", ["unsealed", "too small", "not a file", "no descriptor"])
def test_a_peer_cannot_pass_memory_that_can_fail_under_the_reader(pair, case):
    head = b"\x80\x05N."  # pickle of None
    size = 2 * MiB
    keep = None
    if case == "unsealed":
        fds = [_unsealed_memfd(size)]
    elif case == "too small":
        keep = shared_frames._make(MiB)
        fds = [keep.fd]
    elif case == "not a file":
        r, w = os.pipe()
        os.close(w)
        fds = [r]
    else:
        fds = []
    _send_raw(pair.a, [2, len(head), size | fastlink.SHARED], fds, head)
    try:
        with pytest.raises(ValueError, match="descriptor|segment|shrink"):
            pair.reader_b.message()
        assert memfds()[1] == 0 or keep is not None  # nothing of the peer's was mapped
    finally:
        if keep is not None:
            keep.unmap()
        else:
            for fd in fds:
                os.close(fd)


def test_segments_go_when_the_link_closes_and_after_their_last_view():
    before = memfds()
    p = Pair()
    x = np.ones(4 * MiB // 8)
    p.a_to_b({"x": serial.dumps(x)})
    _warm(p.shared_a, x.nbytes)
    kept = serial.loads(p.a_to_b({"x": serial.dumps(x)})["x"])
    assert memfds()[1] > before[1]
    p.close()
    gc.collect()
    assert np.array_equal(kept, x)  # the data outlives the link while it is viewed
    del kept
    gc.collect()
    assert memfds() == before


def test_idle_segments_are_given_back_to_the_system(pair, monkeypatch):
    x = np.ones(2 * MiB // 8)
    pair.a_to_b({"x": serial.dumps(x)})
    _warm(pair.shared_a, x.nbytes)
    home = serial.loads(pair.a_to_b({"x": serial.dumps(x)})["x"])
    del home
    gc.collect()
    pair.b_to_a({"ack": 1})  # gives the segment back
    assert pair.shared_a._free and pair.shared_b._peer
    monkeypatch.setitem(shared_frames._settings, "idle", 0.0)
    time.sleep(0.01)
    for shared in (pair.shared_a, pair.shared_b):
        shared.trim()
    assert not pair.shared_a._own and not pair.shared_b._peer
    assert memfds() == (0, 0)


# --- a real pool: kill -9 in the middle of transfers ---


@pytest.fixture(scope="module")
def spool():
    pool = Pool.start(1)
    pool.wait_ready(timeout=240)
    yield pool
    pool.close()


def _worker_pid(pool: Pool) -> int:
    return next(iter(pool.client.run(os.getpid).values()))


def _eventually(check, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        gc.collect()
        time.sleep(0.1)


def _shared_frames_moved(pool: Pool) -> tuple[int, int]:
    """Frames this client sent and received through shared memory, over its idle links."""
    links = [link for idle in pool._links._idle.values() for link in idle if link.shared is not None]
    return sum(link.shared.sent for link in links), sum(link.shared.received for link in links)


def test_a_pool_call_moves_large_arrays_through_shared_memory(spool):
    x = np.random.default_rng(1).random(8 * MiB // 8)
    for _ in range(3):  # the first call warms a segment on each side
        y = spool.run("y = x * 1", "cpu", inputs={"x": x}, stdout=None)["y"]
        assert np.array_equal(y, x)
    sent, received = _shared_frames_moved(spool)
    assert sent >= 1 and received >= 1


def _kill_notebook_midway(pid: int, before: tuple[int, int], shm_before: set[str], delay: float, script: str,
                          argument: str) -> None:
    """Run ``script`` (a notebook on a raw link, printing "warm" once its transfers go
    through shared memory), kill -9 it ``delay`` s later, and wait until worker ``pid``
    holds no more segments than ``before``, with nothing new in /dev/shm either."""
    notebook = subprocess.Popen([sys.executable, "-c", script, argument], stdout=subprocess.PIPE, text=True)
    try:
        assert notebook.stdout.readline().strip() == "warm"
        assert memfds(pid)[1] > before[1]  # the transfers use shared memory
        time.sleep(delay)
        notebook.send_signal(signal.SIGKILL)
        notebook.wait()
    finally:
        notebook.kill()
    _eventually(lambda: memfds(pid) == before, 20, f"the worker still holds segments: {memfds(pid)}, before {before}")
    assert dev_shm() == shm_before


_NOTEBOOK = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from kaas_magic import fastlink, serial
    endpoint, request = json.loads(sys.argv[1])
    x = np.random.default_rng(2).random(32 * 2**20 // 8)
    link = fastlink.Link(endpoint, None)
    for i in range(10_000):
        link.send({**request, "call_id": f"doomed-{i}", "inputs": {"x": serial.dumps(x)}})
        reply = link.receive()
        assert serial.loads(reply["outputs"]["y"])[-1] == x[-1]
        if i == 2:
            print("warm", flush=True)
""")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("delay", [0.0, 0.013, 0.05, 0.21])
def test_killing_the_notebook_mid_transfer_leaves_nothing_on_the_worker(spool, delay):
    pid = _worker_pid(spool)
    before, shm_before = memfds(pid), dev_shm()  # (this test's own pool client has segments there too)
    _, service, _ = spool.route("cpu")
    worker = spool.routes()[0].address
    request = {"code": "y = x", "filename": "<t>", "line_offset": 0, "outputs_explicit": True, "kernels": [],
               "service": service.resource, "outputs": ["y"], "client": "doomed", "timeout": None, "keep": False,
               "progress": False, "free": []}
    _kill_notebook_midway(pid, before, shm_before, delay, _NOTEBOOK, json.dumps([spool._endpoint(worker), request]))
    assert spool.run("z = 1", "cpu", stdout=None)["z"] == 1  # and it goes on


_KERNEL_NOTEBOOK = textwrap.dedent("""
    import base64, pickle, sys
    import numpy as np
    from kaas_magic import fastlink, protocol, serial
    endpoint, request = pickle.loads(base64.b64decode(sys.argv[1]))
    x = np.random.default_rng(7).random(2**20, dtype=np.float32)
    link = fastlink.Link(endpoint, None)
    result = None
    for i in range(10_000):
        a = x if result is None or i % 2 == 0 else result  # every other call sends a result back
        link.send({**request, "call_id": f"doomed-{i}", "inputs": {"a": serial.dumps(a), "b": serial.dumps(x)}})
        result = serial.loads(link.receive()["outputs"][protocol.CALL_RESULT])
        assert result[-1] == a[-1] + x[-1]
        if i == 6:
            print("warm", flush=True)
""")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("delay", [0.0, 0.02, 0.11])
def test_killing_the_notebook_mid_kernel_chain_leaves_nothing_on_the_worker(spool, delay):
    """The same for kernel calls, whose results are made in borrowed segments and come back
    by reference: a link that goes mid-call leaves none of them taken."""
    import base64
    import pickle

    a = np.ones(2**20, dtype=np.float32)
    sent = []
    real_send = fastlink.Link.send
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fastlink.Link, "send", lambda link, message: (sent.append(message), real_send(link, message))[1])
        spool.call("vector_add", a, a, target="fpga", fallback=True)
    (request,) = [m for m in sent if m.get("op") == "call"]
    request = {k: v for k, v in request.items() if k != "inputs"} | {"client": "doomed", "free": []}
    pid = _worker_pid(spool)
    gc.collect()
    before, shm_before = memfds(pid), dev_shm()
    worker = spool.routes()[0].address
    argument = base64.b64encode(pickle.dumps([spool._endpoint(worker), request])).decode()
    _kill_notebook_midway(pid, before, shm_before, delay, _KERNEL_NOTEBOOK, argument)
    np.testing.assert_array_equal(spool.call("vector_add", a, a, target="fpga", fallback=True), 2 * a)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("delay", [0.0, 0.03, 0.2])
def test_killing_the_worker_mid_transfer_leaves_nothing_in_the_notebook(spool, delay):
    spool.wait_ready(timeout=240)
    x = np.random.default_rng(3).random(32 * MiB // 8)
    for _ in range(2):
        spool.run("y = x", "cpu", inputs={"x": x}, stdout=None)
    gc.collect()
    before, shm_before = memfds(), dev_shm()
    pid = _worker_pid(spool)
    failed = threading.Event()

    def transfers() -> None:
        try:
            while True:
                spool.run("y = x", "cpu", inputs={"x": x}, stdout=None)
        except KaasError:
            failed.set()

    caller = threading.Thread(target=transfers, daemon=True)
    caller.start()
    time.sleep(0.3 + delay)
    os.kill(pid, signal.SIGKILL)
    assert failed.wait(60), "the call did not fail when its worker was killed"
    caller.join(5)
    spool.wait_ready(timeout=240)
    _eventually(lambda: memfds()[0] <= before[0] and memfds()[1] <= before[1], 20,
                f"the notebook holds segments of the killed worker: {memfds()} (before {before})")
    assert dev_shm() == shm_before
    assert np.array_equal(spool.run("y = x", "cpu", inputs={"x": x}, stdout=None)["y"], x)


def test_kernel_calls_on_large_arrays_read_inputs_in_place_and_stay_correct(spool):
    """OpenCL on a CPU device reads inputs that came through shared memory where they lie,
    and maps its outputs instead of copying them: fresh data every call, never a stale one."""
    rng = np.random.default_rng(4)
    held = []
    for round_ in range(4):
        a, b = rng.random(MiB, dtype=np.float32), rng.random(MiB, dtype=np.float32)  # 4 MiB each
        total = spool.call("vector_add", a, b, target="fpga", fallback=True)
        scaled = spool.call("saxpy", 2.0, total, b, target="fpga", fallback=True)
        np.testing.assert_allclose(total, a + b, rtol=1e-6)
        np.testing.assert_allclose(scaled, 2.0 * (a + b) + b, rtol=1e-5)
        held.append((total, a + b))  # results held across later calls keep their values
    for total, expected in held:
        np.testing.assert_allclose(total, expected, rtol=1e-6)
    sent, received = _shared_frames_moved(spool)
    assert sent >= 4 and received >= 4


def _worker_shared_counts(pool: Pool) -> dict:
    """The worker's shared-memory counters, summed over its links (read by a cell there)."""
    cell = ("from kaas_magic import shared_frames as sf\n"
            "n = {k: sum(getattr(f, k) for f in list(sf._all)) for k in ('sent', 'sent_in_place', 'received_back')}")
    return pool.run(cell, "cpu", stdout=None)["n"]


def test_a_chain_without_keep_sends_results_back_by_reference_and_makes_outputs_in_place(spool):
    """Results of a kernel on a CPU OpenCL device are made in shared memory of the link and
    go home without a copy; sent back to the next kernel they go as a reference. Every
    value stays right, results held across later calls included."""
    rng = np.random.default_rng(6)
    held = []
    before = _worker_shared_counts(spool)
    back_before = sum(link.shared.sent_back for idle in spool._links._idle.values() for link in idle
                      if link.shared is not None)
    for round_ in range(6):
        a, b = rng.random(MiB, dtype=np.float32), rng.random(MiB, dtype=np.float32)
        total = spool.call("vector_add", a, b, target="fpga", fallback=True)
        scaled = spool.call("saxpy", 2.0, total, b, target="fpga", fallback=True)
        s = spool.call("reduce_sum", scaled, target="fpga", fallback=True)
        np.testing.assert_allclose(total, a + b, rtol=1e-6)
        np.testing.assert_allclose(scaled, 2.0 * (a + b) + b, rtol=1e-5)
        np.testing.assert_allclose(s, np.sum((2.0 * (a + b) + b).astype(np.float64)), rtol=1e-4)
        if round_ % 3 == 0:  # some held (their segments stay taken), the others dropped
            held.append((total, scaled, a + b))
        del total, scaled
    for total, scaled, expected in held:
        np.testing.assert_allclose(total, expected, rtol=1e-6)
    del held
    after = _worker_shared_counts(spool)
    back = sum(link.shared.sent_back for idle in spool._links._idle.values() for link in idle
               if link.shared is not None) - back_before
    assert back >= 6  # total and scaled, sent back in most rounds (the first ones warm segments)
    assert after["received_back"] - before["received_back"] >= 6
    assert after["sent_in_place"] - before["sent_in_place"] >= 6


def test_a_result_sent_back_to_a_cell_or_kept_is_the_receivers_own(spool):
    """A cell may write its inputs, a JAX kernel may keep a view of its host input, and a kept
    buffer must not change with the notebook's array: none gets the read-only in-place view
    of a result sent back."""
    a = np.ones(MiB, dtype=np.float32)
    for _ in range(3):
        total = spool.call("vector_add", a, a, target="fpga", fallback=True)
        out = spool.run("x[0] = -1.0\ny = float(x[0]) + float(x[1])", "cpu", inputs={"x": total}, stdout=None)
        assert out["y"] == 1.0 and total[0] == 2.0  # the cell wrote its own copy
        soft = spool.call("softmax", total.reshape(1024, -1), target="tpu", fallback=True)  # a JAX kernel
        np.testing.assert_allclose(soft, np.full((1024, MiB // 1024), 1024 / MiB), rtol=1e-5)
        kept = spool.put(total, "fpga", fallback=True)
        total[:] = 7.0  # the notebook changes its array after the put
        assert np.all(spool.fetch(kept) == 2.0)


def test_gpu_results_are_copied_from_the_device_straight_into_a_borrowed_segment(pair, monkeypatch):
    """CupySession's results home, on a stand-in ``cupy`` (no GPU here; tests/test_gpu.py runs
    the real one): a large contiguous result is copied from the device into a free segment of
    the link and lent as it is; a small one, or one outside a call whose results go home,
    is copied as before."""
    import types

    from kaas_magic.backends.cupy_backend import CupySession

    class FakeDeviceArray:  # what the stand-in's GPU holds: a host array behind the API
        def __init__(self, data: np.ndarray):
            self._data, self.dtype, self.shape = data, data.dtype, data.shape
            self.nbytes, self.size, self.flags = data.nbytes, data.size, data.flags

        def get(self, out=None):
            assert out is not None and out.shape == self.shape and out.dtype == self.dtype
            np.copyto(out, self._data)
            return out

    cupy = types.ModuleType("cupy")
    cupy.ndarray = FakeDeviceArray
    cupy.asnumpy = lambda v: v._data.copy()
    cupy.cuda = types.SimpleNamespace(Device=StandInCudaDevice)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    session = CupySession.__new__(CupySession)  # only its downloads are used
    session.synchronize = lambda values: None
    monkeypatch.setattr(CupySession, "index", 0)
    big = FakeDeviceArray(np.arange(MiB // 2, dtype=np.float64).reshape(512, -1))  # 4 MiB
    small = FakeDeviceArray(np.arange(10, dtype=np.float32))
    shared_frames.serving(pair.shared_b)
    try:
        (outside,) = session.download([big])  # not in a call whose results go home
        assert segment_of(outside) is None
        with shared_frames.results_go_home():
            assert pair.shared_b.borrow(big.nbytes) is None  # none free yet: one is made
            _warm(pair.shared_b, big.nbytes)
            home, tiny = session.download([big, small])
    finally:
        shared_frames.serving(None)
    assert segment_of(home) is not None and segment_of(tiny) is None
    np.testing.assert_array_equal(home, big._data)
    got = serial.loads(pair.b_to_a({"r": serial.dumps(home)})["r"])
    assert pair.shared_b.sent_in_place == 1 and np.array_equal(got, big._data)


def segment_of(array: np.ndarray):
    return shared_frames.segment_holding(array.ctypes.data)
