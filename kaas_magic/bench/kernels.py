"""``kaas bench kernels``: registered kernels through the warm pool against the same
kernels called in this process, measured in one run on one machine.

1. A warm ``kaas.call("vector_add", a, b)`` on 1e5 float32 values against the floor: the
   same OpenCL kernel on the same OpenCL device, called in this process by hand with
   PyOpenCL (upload the way kaas's backend does, launch, download), plus the cost of moving
   its arguments between two processes (a, b there and the result back) over a bare socket
   of the transport kaas used: a Unix socket for a worker on this machine, TCP otherwise.
   Both are printed.
2. A chain of three kernels on 16 MiB arrays (vector_add, saxpy, then reduce_sum to one
   number), starting from data already on the device: with ``keep`` (handles, nothing
   copied between the calls), in-process by hand, and without ``keep`` (every
   intermediate comes home and goes back).

The device is the ``fpga`` target; on a machine without an FPGA that is PoCL's CPU device
(the stand-in, marked as such in the output).
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import time
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

from ..fastlink import tune
from .common import WARMUP, header

SMALL_N = 100_000
CHAIN_N = 4 * 2**20  # 16 MiB of float32


def _interleaved_ms(calls: list[Callable[[], Any]], n: int) -> list[list[float]]:
    """The ms of each call in each of ``n`` rounds (each call once per round), so that a
    machine whose load drifts during the run weighs on every variant alike, and variants
    can be compared round by round."""
    for call in calls:
        for _ in range(min(WARMUP, n)):
            call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(n):
        for call, spent in zip(calls, times):
            t = time.perf_counter()
            call()
            spent.append((time.perf_counter() - t) * 1e3)
    return times


def _interleaved_medians_ms(calls: list[Callable[[], Any]], n: int) -> list[float]:
    return [statistics.median(spent) for spent in _interleaved_ms(calls, n)]


class InProcess:
    """The library's OpenCL kernels on PoCL's CPU device, in this process, by hand."""

    def __init__(self):
        import pyopencl as cl

        from ..kernelspec import load_library, scalar_arg_dtypes

        platform = next(p for p in cl.get_platforms() if "Portable" in p.name)
        self.ctx = cl.Context(platform.get_devices(cl.device_type.CPU)[:1])
        self.queue = cl.CommandQueue(self.ctx)
        library = load_library()
        specs = {k: next(s for s in library[k] if s.language == "opencl") for k in ("vector_add", "saxpy", "reduce_sum")}
        self.program = cl.Program(self.ctx, "\n".join(spec.source for spec in specs.values())).build()
        self.kernels = {k: cl.Kernel(self.program, k) for k in specs}
        # As kaas's backend does (and PyOpenCL advises): scalars packed by a declared dtype.
        for name, kernel in self.kernels.items():
            kernel.set_scalar_arg_dtypes(scalar_arg_dtypes(specs[name]))

    def upload(self, a: np.ndarray):
        """The way kaas's OpenCL backend uploads (the copy made as the buffer is), so the
        floor compares the same technique."""
        import pyopencl as cl
        import pyopencl.array as cl_array

        flags = cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR
        return cl_array.Array(self.queue, a.shape, a.dtype, data=cl.Buffer(self.ctx, flags, hostbuf=a))

    def vector_add(self, a, b):
        import pyopencl.array as cl_array

        out = cl_array.empty_like(a)
        self.kernels["vector_add"](self.queue, (_round(a.size, 64),), (64,), a.data, b.data, out.data, np.int32(a.size))
        return out

    def saxpy(self, alpha: float, x, y):
        import pyopencl.array as cl_array

        out = cl_array.empty_like(x)
        self.kernels["saxpy"](self.queue, (_round(x.size, 64),), (64,), np.float32(alpha), x.data, y.data,
                              out.data, np.int32(x.size))
        return out

    def reduce_sum(self, a) -> float:
        import pyopencl.array as cl_array

        while a.size > 1:
            groups = -(-a.size // 256)
            partial = cl_array.empty(self.queue, groups, np.float32)
            self.kernels["reduce_sum"](self.queue, (groups * 256,), (256,), a.data, partial.data, np.int32(a.size))
            a = partial
        return float(a.get()[0])


def _round(n: int, block: int) -> int:
    return -(-n // block) * block


def _echo_server(family: str, address_out) -> None:
    """Child process: read a length-prefixed message, answer with ``reply`` bytes."""
    if family == "unix":
        folder = tempfile.mkdtemp(prefix="kaas-bench-")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(os.path.join(folder, "echo.sock"))
        listener.listen()
    else:
        listener = socket.create_server(("127.0.0.1", 0))
    address_out.send(listener.getsockname())
    conn, _ = listener.accept()
    tune(conn)  # the settings kaas's own links use
    buffer = bytearray(64 * 2**20)
    while True:
        header = _recv_exactly(conn, memoryview(bytearray(16)))
        size, reply = struct.unpack("<QQ", header)
        if size == 0:
            return
        _recv_exactly(conn, memoryview(buffer)[:size])
        conn.sendall(memoryview(buffer)[:reply])


def _recv_exactly(conn, view: memoryview) -> memoryview:
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("echo peer closed")
        got += n
    return view


class MoveFloor:
    """The cost of moving bytes to another process and back, with no framework in the way:
    the transfer part of any remote call's floor. ``family`` is the transport: "unix" (what
    kaas uses to reach a worker on the same machine) or "tcp" (loopback)."""

    def __init__(self, family: str = "unix"):
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_echo_server, args=(family, child), daemon=True)
        self.proc.start()
        address = parent.recv()
        if family == "unix":
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(address)
        else:
            self.sock = socket.create_connection(tuple(address))
        tune(self.sock)
        self.path = address if family == "unix" else None
        self.reply = memoryview(bytearray(64 * 2**20))

    def round_trip(self, send: list[np.ndarray], reply_bytes: int) -> None:
        size = sum(a.nbytes for a in send)
        self.sock.sendall(struct.pack("<QQ", size, reply_bytes))
        for a in send:
            self.sock.sendall(memoryview(a).cast("B"))
        _recv_exactly(self.sock, self.reply[:reply_bytes])

    def close(self) -> None:
        self.sock.sendall(struct.pack("<QQ", 0, 0))
        self.proc.join(10)
        if self.path:
            shutil.rmtree(os.path.dirname(self.path), ignore_errors=True)


def _met(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def _measure_vector_add(pool, call: Callable, local: InProcess, a: np.ndarray, b: np.ndarray,
                        n: int) -> dict[str, Any]:
    """A warm vector_add against the in-process floor plus moving its arguments, then the
    same call on inputs kept on the device."""
    # The floor moves the bytes over the transport kaas used for these calls; the other
    # transport is measured too, for reference.
    transport = pool.transport(pool.last_run().worker)
    other = "tcp" if transport == "unix" else "unix"
    links = {family: MoveFloor(family) for family in (transport, other)}
    try:
        print("  measuring vector_add ...", file=sys.stderr, flush=True)
        floor_ms, move_ms, warm_ms, other_ms = _interleaved_ms([
            lambda: local.vector_add(local.upload(a), local.upload(b)).get(),
            lambda: links[transport].round_trip([a, b], a.nbytes),
            lambda: call("vector_add", a, b),
            lambda: links[other].round_trip([a, b], a.nbytes),
        ], n)
    finally:
        for link in links.values():
            link.close()
    floor, move, warm, move_other = (statistics.median(t) for t in (floor_ms, move_ms, warm_ms, other_ms))
    # Paired round by round: the overhead of each round's call over that round's floor.
    over = statistics.median(w - f - m for w, f, m in zip(warm_ms, floor_ms, move_ms))
    ka, kb = pool.put(a, "fpga", fallback=True), pool.put(b, "fpga", fallback=True)
    da, db = local.upload(a), local.upload(b)
    kept, kept_floor = _interleaved_medians_ms(
        [lambda: call("vector_add", ka, kb, keep=True), lambda: (local.vector_add(da, db), local.queue.finish())], n)
    return dict(transport=transport, other=other, floor=floor, move=move, warm=warm, move_other=move_other,
                over=over, kept=kept, kept_floor=kept_floor)


def _measure_chain(pool, call: Callable, local: InProcess, ca: np.ndarray, cb: np.ndarray,
                   n: int) -> dict[str, Any]:
    """vector_add -> saxpy -> reduce_sum from data on the device: with keep, in one cell,
    in-process by hand and without keep; each checked, then timed in rounds."""
    print("  measuring the 3-kernel chain on 16 MiB ...", file=sys.stderr, flush=True)
    expected = float(np.sum(2.0 * (ca.astype(np.float64) + cb) + cb))
    kca, kcb = pool.put(ca, "fpga", fallback=True), pool.put(cb, "fpga", fallback=True)
    dca, dcb = local.upload(ca), local.upload(cb)
    sink = io.StringIO()

    def chain_keep():
        total = call("vector_add", kca, kcb, keep=True)
        scaled = call("saxpy", 2.0, total, kcb, keep=True)
        return call("reduce_sum", scaled)

    def chain_in_one_cell():
        cell = "s = kernels.reduce_sum(kernels.saxpy(2.0, kernels.vector_add(a, b), b))"
        return pool.run(cell, "fpga", inputs={"a": kca, "b": kcb}, fallback=True, stdout=sink).outputs["s"]

    def chain_local():
        return local.reduce_sum(local.saxpy(2.0, local.vector_add(dca, dcb), dcb))

    def chain_no_keep():
        total = call("vector_add", ca, cb)
        scaled = call("saxpy", 2.0, total, cb)
        return call("reduce_sum", scaled)

    for chain in (chain_keep, chain_in_one_cell, chain_local, chain_no_keep):
        got = float(chain())
        if abs(got - expected) > 1e-3 * abs(expected):
            raise RuntimeError(f"{chain.__name__} gave {got}, expected {expected}")
    chains = _interleaved_ms([chain_keep, chain_in_one_cell, chain_local, chain_no_keep], n)
    t_keep, t_cell, t_local, t_no_keep = (statistics.median(t) for t in chains)
    # Ratios paired round by round, like the overhead of vector_add.
    r_keep, r_cell, r_no_keep = (statistics.median(x / local for x, local in zip(t, chains[2]))
                                 for t in (chains[0], chains[1], chains[3]))
    return dict(t_keep=t_keep, t_cell=t_cell, t_local=t_local, t_no_keep=t_no_keep,
                r_keep=r_keep, r_cell=r_cell, r_no_keep=r_no_keep)


def _lines(f: SimpleNamespace) -> list[str]:
    return [
        f"device: {f.device}",
        "",
        f"vector_add, 1e5 float32 ({f.n} calls each, interleaved in rounds, median ms)",
        f"  in-process by hand (PyOpenCL: upload, launch, download)   {f.floor:8.3f}",
        f"  moving its arguments between processes (bare {f.transport} socket, as kaas) {f.move:8.3f}"
        f"  (over {f.other}: {f.move_other:.3f})",
        f"  kaas.call, warm                                           {f.warm:8.3f}",
        f"  kaas overhead beyond floor + moving the arguments        {f.over:8.3f}"
        f"  (median of the rounds' differences)"
        f"  -> target (<= 1 ms) {_met(f.over <= 1.0)}",
        f"  inputs kept on the device: kaas.call with handles, keep  {f.kept:8.3f}"
        f"  (in-process launch alone {f.kept_floor:.3f})",
        "",
        f"chain vector_add -> saxpy -> reduce_sum on 16 MiB float32, inputs on the device "
        f"({f.chain_n} runs each, interleaved in rounds, median ms)",
        f"  in-process by hand                                        {f.t_local:8.3f}",
        f"  kaas with keep (handles between the calls)                {f.t_keep:8.3f}"
        f"  = {f.r_keep:.2f}x in-process -> target (<= 1.3x) {_met(f.r_keep <= 1.3)}",
        f"  kaas, the three kernels in one %%kaas cell on the handles {f.t_cell:8.3f}  = {f.r_cell:.2f}x in-process",
        f"  kaas without keep (every intermediate comes home)         {f.t_no_keep:8.3f}"
        f"  = {f.r_no_keep:.2f}x in-process, {f.t_no_keep / f.t_keep:.1f}x with keep -> target (<= 1.5x) "
        f"{_met(f.r_no_keep <= 1.5)}",
        "  (ratios: median of the rounds' ratios to that round's in-process chain)",
    ]


def _markdown(f: SimpleNamespace) -> list[str]:
    return [
        "",
        "| measurement | median ms | ratio / verdict |",
        "|---|---:|---|",
        f"| vector_add 1e5, in-process by hand (floor) | {f.floor:.3f} | |",
        f"| moving its arguments (bare {f.transport} socket round trip, the transport kaas used) | {f.move:.3f} | |",
        f"| vector_add 1e5, warm `kaas.call` | {f.warm:.3f} | overhead {f.over:.3f} ms: "
        f"{_met(f.over <= 1.0)} (<= 1 ms) |",
        f"| vector_add 1e5, inputs kept on the device | {f.kept:.3f} | |",
        f"| 3-kernel chain 16 MiB, in-process | {f.t_local:.3f} | 1.00x |",
        f"| 3-kernel chain 16 MiB, kaas with keep | {f.t_keep:.3f} | {f.r_keep:.2f}x: "
        f"{_met(f.r_keep <= 1.3)} (<= 1.3x) |",
        f"| 3-kernel chain 16 MiB, one `%%kaas` cell on the handles | {f.t_cell:.3f} | {f.r_cell:.2f}x |",
        f"| 3-kernel chain 16 MiB, kaas without keep | {f.t_no_keep:.3f} | {f.r_no_keep:.2f}x: "
        f"{_met(f.r_no_keep <= 1.5)} (<= 1.5x) |",
    ]


def run(args: argparse.Namespace) -> list[str]:
    from ..client import Pool

    rng = np.random.default_rng(0)
    a, b = rng.random(SMALL_N, dtype=np.float32), rng.random(SMALL_N, dtype=np.float32)
    ca, cb = rng.random(CHAIN_N, dtype=np.float32), rng.random(CHAIN_N, dtype=np.float32)
    n, chain_n = args.calls, max(10, args.calls // 5)

    print("starting the kaas pool (1 worker) ...", file=sys.stderr, flush=True)
    pool = Pool.start(1)
    try:
        pool.wait_ready()
        call = lambda name, *xs, **kw: pool.call(name, *xs, target="fpga", fallback=True, **kw)  # noqa: E731
        np.testing.assert_allclose(call("vector_add", a, b), a + b, rtol=1e-6)
        figures = SimpleNamespace(device=pool.last_run().label(), n=n, chain_n=chain_n)
        local = InProcess()
        np.testing.assert_allclose(local.vector_add(local.upload(a), local.upload(b)).get(), a + b, rtol=1e-6)
        vars(figures).update(_measure_vector_add(pool, call, local, a, b, n))
        vars(figures).update(_measure_chain(pool, call, local, ca, cb, chain_n))
    finally:
        pool.close()
    return _lines(figures) + (_markdown(figures) if args.markdown else [])


def main(args: argparse.Namespace) -> int:
    print("\n".join(header(args.calls)), flush=True)
    print("\n".join(run(args)))
    return 0
