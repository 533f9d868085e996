"""Trust: every reply belongs to its call, a slow or odd notebook hurts only itself, limits
hold both ways, exceptions and cells keep the notebook's semantics. Each case is caused for
real on a pool of worker processes and followed by a health probe."""

from __future__ import annotations

import io
import socket
import struct
import threading
import time

import numpy as np
import pytest

from kaas_magic import fastlink
from kaas_magic.client import Pool
from kaas_magic.errors import LinkBroken, RemoteError

QUIET = {"stdout": io.StringIO()}
SMALL_LIMIT = 2**20  # kaas.transfer.max-bytes for this module's pool


@pytest.fixture(scope="module")
def tpool():
    import dask.config

    from kaas_magic import config

    config.get("transfer")  # kaas.yaml merged first, so the override below wins
    with dask.config.set({"kaas.transfer.max-bytes": SMALL_LIMIT, "kaas.transfer.max-message-bytes": 3 * SMALL_LIMIT}):
        pool = Pool.start(2)
        pool.wait_ready(timeout=240)
        yield pool
        pool.close()
    fastlink.set_limits(2**31 + 2**20, 2**32 + 2**24)  # this process's links, as other tests expect


def healthy(pool: Pool, worker: str | None = None) -> None:
    """Another call returns the right answer, and the pool has both its workers."""
    x = np.arange(10.0)
    result = pool.run("y = x * 2", "cpu", inputs={"x": x}, worker=worker, **QUIET)
    np.testing.assert_array_equal(result.outputs["y"], x * 2)
    assert len(pool.routes()) == 2, pool.routes()


def _worker(pool: Pool) -> str:
    return sorted(r.address for r in pool.routes())[0]


# --- A3: every reply belongs to its call --------------------------------------------------


@pytest.mark.parametrize("child", [
    "pass",  # the child runs on, back into the worker's code
    "import time\n    time.sleep(0.3)",  # ... after a while
    "print('from the child')",  # ... having printed
])
def test_a_forked_child_never_answers_a_call(tpool, child):
    worker = _worker(tpool)
    out = io.StringIO()
    code = f"import os\npid = os.fork()\nif pid == 0:\n    {child}\nprint('parent' if pid else 'child here')"
    tpool.run(code, "cpu", worker=worker, stdout=out, outputs=[])
    assert "child" not in out.getvalue() and "parent" in out.getvalue()
    for i in range(30):  # each reply is its own call's, none the previous call's
        assert tpool.run(f"v = {i}", "cpu", worker=worker, **QUIET).outputs["v"] == i
    healthy(tpool, worker)


def test_a_reply_for_another_call_is_a_link_error_not_a_result(tpool, tmp_path):
    def handler(replier, **message):
        replier.call_id = "someone-else"
        return {"kind": "result", "ok": True, "outputs": {}}

    path = tmp_path / "fake.sock"
    server = fastlink.Server("127.0.0.1", handler, None, unix_path=str(path))
    try:
        tpool._endpoints["fake"] = {"host": "127.0.0.1", "port": server.port, "unix": str(path),
                                    "hostname": socket.gethostname()}
        with pytest.raises(LinkBroken, match="not this call's"):
            tpool._exchange("fake", {"call_id": "mine"}, io.StringIO(), io.StringIO(), lambda s: None)
        assert not any(address == "fake" for address, _ in tpool._dead)  # not blamed on a worker
    finally:
        server.close()
        tpool._endpoints.pop("fake", None)
    healthy(tpool)


# --- B7, B8: a slow or odd notebook hurts only itself -------------------------------------


class _BlockedStream(io.StringIO):
    """A notebook output that stops taking text until released."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()

    def write(self, text):
        self.entered.set()
        self.release.wait(60)
        return super().write(text)


def test_a_caller_that_stops_reading_never_freezes_the_worker(tpool):
    worker = _worker(tpool)
    blocked = _BlockedStream()
    code = "for i in range(4000):\n    print('x' * 2000)\ndone = 1"  # 8 MB: more than the link buffers
    caller = threading.Thread(target=lambda: tpool.run(code, "cpu", worker=worker, stdout=blocked, outputs=[]))
    caller.start()
    try:
        assert blocked.entered.wait(30)
        time.sleep(1.5)  # the worker's sends now wait on a full link
        for _ in range(3):  # its event loop answers at once, and other callers are served
            started = time.monotonic()
            info = tpool.client.run(lambda: 1, workers=[worker])
            assert info == {worker: 1}
            assert time.monotonic() - started < 3
            assert tpool.run("z = 3", "cpu", worker=worker, **QUIET).outputs["z"] == 3
        assert worker in tpool.client.scheduler_info()["workers"]
    finally:
        blocked.release.set()
        caller.join(60)
    assert not caller.is_alive()
    healthy(tpool, worker)


@pytest.mark.parametrize("stdout", [
    lambda: io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict"),  # cannot encode
    lambda: io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="strict"),
    lambda: _closed(io.StringIO()),  # closed
])
def test_a_local_output_problem_is_never_blamed_on_the_worker(tpool, stdout):
    worker = _worker(tpool)
    result = tpool.run("print('lone \\ud800 surrogate, caf\\u00e9')\nq = 5", "cpu", worker=worker, stdout=stdout())
    assert result.outputs["q"] == 5
    assert "surrogate" in result.stdout
    assert worker in {r.address for r in tpool.routes()} and not tpool._dead
    healthy(tpool, worker)


def _closed(stream):
    stream.close()
    return stream


# --- D10: limits hold both ways -----------------------------------------------------------


def test_an_output_over_the_limit_stays_on_the_worker_and_is_named(tpool):
    result = tpool.run("import numpy as np\nbig = np.ones(2**18)\nblob = b'x' * (2 * 2**20)\nsmall = 7", "cpu", **QUIET)
    assert result.outputs["small"] == 7
    big = result.outputs["big"]
    assert type(big).__name__ == "DeviceHandle" and big.shape == (2**18,)
    assert "big" in result.record.skipped and f"{2**21:,} bytes" in result.record.skipped["big"]
    assert "blob" not in result.outputs and "not sent" in result.record.skipped["blob"]
    # What a handle holds can come home in pieces under the limit.
    part = tpool.run("p = big[:10]", "cpu", inputs={"big": big}, **QUIET).outputs["p"]
    np.testing.assert_array_equal(part, np.ones(10))
    healthy(tpool)


def test_outputs_together_over_the_message_limit_do_not_all_come_home(tpool):
    code = "import numpy as np\n" + "\n".join(f"a{i} = np.full(2**16, {i}.0)" for i in range(8))  # 8 x 512 KiB, limit 3 MiB
    result = tpool.run(code, "cpu", **QUIET)
    home = [n for n, v in result.outputs.items() if isinstance(v, np.ndarray)]
    assert 0 < len(home) < 8 and sum(result.outputs[n].nbytes for n in home) <= 3 * SMALL_LIMIT
    assert all("max-message-bytes" in result.record.skipped[n] for n in result.outputs if n not in home)
    healthy(tpool)


# One part past max-bytes; parts each under it that together pass max-message-bytes (each
# side allows a little room over the limits for the message's own framing).
@pytest.mark.parametrize("announced", [[2**40], [3 * SMALL_LIMIT], [2 * SMALL_LIMIT] * 12])
def test_a_link_refuses_a_message_larger_than_its_limits_before_reading_it(tpool, announced):
    worker = _worker(tpool)
    endpoint = tpool._endpoint(worker)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(endpoint["unix"])
    sock.sendall(struct.pack(f"<{len(announced) + 1}Q", len(announced), *announced) + b"\0" * 64)
    assert sock.recv(1) == b""  # dropped, nothing allocated or run
    sock.close()
    healthy(tpool, worker)


def test_a_variable_over_the_limit_is_refused_by_name(tpool):
    from kaas_magic import VariableNotSendable

    with pytest.raises(VariableNotSendable, match="'x'.*kaas.transfer.max-bytes"):
        tpool.run("y = 1", "cpu", inputs={"x": np.ones(2**18)}, **QUIET)
    chunks = {f"x{i}": np.ones(2**16) for i in range(8)}  # each under the limit, together over
    with pytest.raises(VariableNotSendable, match="max-message-bytes"):
        tpool.run("y = 1", "cpu", inputs=chunks, **QUIET)
    healthy(tpool)


# --- D11: exceptions keep their attributes ------------------------------------------------


@pytest.mark.parametrize("code, kind, attributes", [
    ("raise SystemExit(3)", SystemExit, {"code": 3}),
    ("raise StopIteration('done')", StopIteration, {"value": "done"}),
    ("raise OSError(13, 'no way', 'f.txt')", PermissionError, {"errno": 13, "strerror": "no way", "filename": "f.txt"}),
    ("b'\\xff'.decode('utf-8')", UnicodeDecodeError, {"reason": "invalid start byte", "start": 0, "end": 1}),
    ("import json\njson.loads('{\"a\": }')", __import__("json").JSONDecodeError, {"pos": 6, "lineno": 1, "colno": 7}),
    ("compile('x = (', 'mine.py', 'exec')", SyntaxError, {"filename": "mine.py", "lineno": 1}),
    ("import importlib\nimportlib.import_module('no_such_module_here')", ModuleNotFoundError,
     {"name": "no_such_module_here"}),
])
def test_a_remote_exception_keeps_its_type_and_attributes(tpool, code, kind, attributes):
    with pytest.raises(kind) as caught:
        tpool.run(code, "cpu", **QUIET)
    for name, value in attributes.items():
        assert getattr(caught.value, name) == value, name


def test_an_exception_class_defined_in_the_cell_comes_back_with_its_attributes(tpool):
    code = ("class Refused(Exception):\n    __slots__ = ('limit',)\n    def __init__(self, limit):\n"
            "        super().__init__(f'over {limit}')\n        self.limit = limit\n"
            "e = Refused(5)\ne.note = 'kept'\nraise e")
    with pytest.raises(RemoteError) as caught:
        tpool.run(code, "cpu", **QUIET)
    assert type(caught.value).__name__ == "Refused" and "over 5" in str(caught.value)
    assert caught.value.limit == 5 and caught.value.note == "kept"


# --- D12: cells compile and run with the notebook's semantics -----------------------------


def test_a_cell_defines_dataclasses_and_typed_classes_as_in_a_notebook(tpool):
    code = """
import dataclasses, enum, pickle, typing
@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    tags: list = dataclasses.field(default_factory=list, compare=False)
class Colour(enum.Enum):
    RED = 1
class Pair(typing.NamedTuple):
    a: int
    b: str
def f(x: int) -> int:
    return x
annotation_is_class = f.__annotations__['x'] is int
hints = str(typing.get_type_hints(Point)['x'])
roundtrip = pickle.loads(pickle.dumps(Point(1))) == Point(1)
p = Point(2)
colour = Colour.RED.name
pair = tuple(Pair(1, 'b'))
"""
    out = tpool.run(code, "cpu", **QUIET).outputs
    assert out["annotation_is_class"] is True  # no __future__ import inherited from kaas's own modules
    assert out["hints"] == "<class 'int'>" and out["roundtrip"] is True
    assert out["p"].x == 2 and out["colour"] == "RED" and out["pair"] == (1, "b")
    # A cell's own __future__ import still applies to that cell.
    own = tpool.run("from __future__ import annotations\ndef g(x: int): pass\nt = g.__annotations__['x']", "cpu",
                    **QUIET).outputs
    assert own["t"] == "int"
    # The cell's module is gone once the call is over: nothing of it outlives the call.
    left = tpool.run("import sys\nn = sorted(m for m in sys.modules if m.startswith('__kaas_cell_'))", "cpu",
                     **QUIET).outputs["n"]
    assert len(left) == 1  # this call's own module, and no earlier one


# --- D13: names IPython hides are sent when the user gave them a value ---------------------


def test_underscore_names_the_user_set_are_sent(ip):
    ip.user_ns["_"] = 41
    ip.run_cell_magic("kaas", "cpu --quiet", "y = _ + 1")
    assert ip.user_ns["y"] == 42
    ip.user_ns["__"] = "two"
    ip.user_ns["_i"] = "earlier input"
    ip.run_cell_magic("kaas", "cpu --quiet", "z = (__, _i)")
    assert ip.user_ns["z"] == ("two", "earlier input")
    # A cell that uses _ as a throwaway does not send the notebook's _, sendable or not.
    ip.user_ns["_"] = threading.Lock()
    ip.run_cell_magic("kaas", "cpu --quiet", "t = 0\nfor _ in range(3):\n    t += _")
    assert ip.user_ns["t"] == 3


def test_a_traceback_quotes_its_own_cell_when_another_cell_has_the_same_name(tpool):
    worker = _worker(tpool)
    mine, theirs = "x = 1\ny = 1 / 0", "a = 2\nb = [][5]"
    for code, line in [(mine, "y = 1 / 0"), (theirs, "b = [][5]"), (mine, "y = 1 / 0")]:  # the last hits the cache
        with pytest.raises((ZeroDivisionError, IndexError)) as caught:
            tpool.run(code, "cpu", worker=worker, filename="<kaas In[3]>", **QUIET)
        assert caught.value.kaas_frames[-1][3] == line
