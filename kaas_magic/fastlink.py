"""The hot path's wire: a direct TCP link from the calling thread to a worker.

Dask's comms serve everything else (status, metrics, freeing buffers, cancelling), but a
warm call is the product, and going through the client's event loop costs two thread hops
and the GIL contention of that loop. Here the calling thread itself writes the request and
reads the reply on a blocking socket (with TLS when the pool uses it), and the worker
serves the link on its own event loop, with the same ``kaas_run`` handler as before.

Messages are Dask's own message frames (``distributed.protocol.dumps``: msgpack plus
out-of-band buffers, so arrays are not copied into the header), prefixed by the frame
count and lengths.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import threading
from typing import Any, Awaitable, Callable

from distributed.protocol import dumps, loads

_COUNT = struct.Struct("<Q")


def _encode(message: Any) -> list:
    frames = dumps(message)
    header = _COUNT.pack(len(frames)) + struct.pack(f"<{len(frames)}Q", *(memoryview(f).nbytes for f in frames))
    return [header, *frames]


# --- the worker side -------------------------------------------------------------------


class _Reply:
    """What the run handler writes its streamed output to: ``await comm.write(msg)``."""

    def __init__(self, transport: asyncio.Transport):
        self._transport = transport

    async def write(self, message: Any, **_) -> None:
        if self._transport.is_closing():
            raise ConnectionResetError("the client closed the link")
        self._transport.writelines(_encode(message))


class _LinkProtocol(asyncio.BufferedProtocol):
    """Reads messages straight into their final buffers (no copies: a message's frames may
    be large arrays), then runs the handler; one message at a time per link, as a client
    sends its next call only after the reply to the last."""

    def __init__(self, handler: Callable[..., Awaitable[dict]]):
        self._handler = handler
        self._start_message()

    def _start_message(self) -> None:
        self._stage = "count"
        self._buffer = bytearray(8)
        self._got = 0
        self._lengths: tuple[int, ...] = ()
        self._frames: list[bytearray] = []

    def connection_made(self, transport) -> None:
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._buffer)[self._got:]

    def buffer_updated(self, nbytes: int) -> None:
        self._got += nbytes
        while self._got == len(self._buffer):
            if self._stage == "count":
                (count,) = _COUNT.unpack(self._buffer)
                self._stage, self._buffer, self._got = "lengths", bytearray(8 * count), 0
            elif self._stage == "lengths":
                self._lengths = struct.unpack(f"<{len(self._buffer) // 8}Q", self._buffer)
                self._next_frame()
            else:
                self._frames.append(self._buffer)
                self._next_frame()
            if self._stage == "done":
                frames = self._frames
                self._start_message()
                self._transport.pause_reading()  # the next message waits for this reply
                asyncio.ensure_future(self._answer(frames))
                return

    def _next_frame(self) -> None:
        if len(self._frames) == len(self._lengths):
            self._stage = "done"
            return
        self._stage, self._buffer, self._got = "frame", bytearray(self._lengths[len(self._frames)]), 0
        if not self._buffer:  # an empty frame: nothing to read
            self._frames.append(self._buffer)
            self._next_frame()

    async def _answer(self, frames: list[bytearray]) -> None:
        reply = _Reply(self._transport)
        try:
            try:
                message = loads(frames, deserialize=True)
            except Exception as e:  # e.g. an input whose class does not exist here
                await reply.write({"kind": "refused", "text": f"{type(e).__name__}: {e}"})
                return
            message.pop("op", None)
            await reply.write(await self._handler(reply, **message))
        except ConnectionError:
            return
        finally:
            if not self._transport.is_closing():
                self._transport.resume_reading()


async def serve(host: str, handler: Callable[..., Awaitable[dict]], ssl_context: ssl.SSLContext | None):
    """Listen on ``host`` (a free port); each message is ``handler(comm, **message)``."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _LinkProtocol(handler), host=host, port=0, ssl=ssl_context)


# --- the client side -------------------------------------------------------------------


class Link:
    """One blocking connection to one worker, used by one thread at a time."""

    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext | None, timeout: float = 5):
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ssl_context is not None:
            sock = ssl_context.wrap_socket(sock, server_hostname=host)
        sock.settimeout(None)  # a call may run for as long as it needs
        self.sock = sock

    def send(self, message: Any) -> None:
        parts = _encode(message)
        total = sum(memoryview(p).nbytes for p in parts)
        if total <= 65536 and not isinstance(self.sock, ssl.SSLSocket):  # one syscall (no sendmsg on TLS)
            sent = self.sock.sendmsg(parts)
            if sent < total:
                self.sock.sendall(b"".join(bytes(memoryview(p)) for p in parts)[sent:])
            return
        for part in parts:
            self.sock.sendall(part)

    def receive(self, timeout: float | None = None) -> Any:
        self.sock.settimeout(timeout)
        try:
            (count,) = _COUNT.unpack(self._exactly(8))
            lengths = struct.unpack(f"<{count}Q", self._exactly(8 * count))
            frames = [self._exactly(n) for n in lengths]
        finally:
            self.sock.settimeout(None)
        return loads(frames, deserialize=False)

    def _exactly(self, size: int) -> bytearray:
        buffer = bytearray(size)
        view, got = memoryview(buffer), 0
        while got < size:
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise ConnectionResetError("the worker closed the connection")
            got += n
        return buffer

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Links:
    """Idle links per worker address, shared by threads: a thread takes one for a call and
    gives it back after, so concurrent calls use separate connections."""

    def __init__(self, ssl_context: ssl.SSLContext | None):
        self._ssl = ssl_context
        self._idle: dict[tuple[str, int], list[Link]] = {}
        self._lock = threading.Lock()

    def take(self, host: str, port: int) -> Link:
        with self._lock:
            idle = self._idle.get((host, port))
            if idle:
                return idle.pop()
        return Link(host, port, self._ssl)

    def give_back(self, host: str, port: int, link: Link) -> None:
        with self._lock:
            self._idle.setdefault((host, port), []).append(link)

    def close(self) -> None:
        with self._lock:
            links = [link for idle in self._idle.values() for link in idle]
            self._idle.clear()
        for link in links:
            link.close()
