"""The hot path's wire: a direct TCP link from the calling thread to a worker.

Dask's comms serve everything else (status, metrics, freeing buffers, cancelling), but a
warm call is the product, and going through the client's event loop costs two thread hops
and the GIL contention of that loop. Here the calling thread itself writes the request and
reads the reply on a blocking socket (with TLS when the pool uses it), and on the worker a
thread per link reads the request and runs the call itself: no event loop on either side.

Messages are Dask's own message frames (``distributed.protocol.dumps``: msgpack plus
out-of-band buffers, so arrays are not copied into the header), prefixed by the frame
count and lengths.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
from typing import Any, Callable

from distributed.protocol import dumps, loads

_COUNT = struct.Struct("<Q")


def _encode(message: Any) -> list:
    frames = dumps(message)
    header = _COUNT.pack(len(frames)) + struct.pack(f"<{len(frames)}Q", *(memoryview(f).nbytes for f in frames))
    return [header, *frames]


def _send(sock: socket.socket, message: Any) -> None:
    parts = _encode(message)
    total = sum(memoryview(p).nbytes for p in parts)
    if total <= 65536 and not isinstance(sock, ssl.SSLSocket):  # one syscall (no sendmsg on TLS)
        sent = sock.sendmsg(parts)
        if sent < total:
            sock.sendall(b"".join(bytes(memoryview(p)) for p in parts)[sent:])
        return
    for part in parts:
        sock.sendall(part)


def _receive_frames(sock: socket.socket) -> list[bytearray]:
    """One message's frames, each read straight into its own buffer (frames may be large
    arrays: no copies)."""
    (count,) = _COUNT.unpack(_exactly(sock, 8))
    lengths = struct.unpack(f"<{count}Q", _exactly(sock, 8 * count))
    return [_exactly(sock, n) for n in lengths]


def _exactly(sock: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionResetError("the other side closed the connection")
        got += n
    return buffer


# --- the worker side -------------------------------------------------------------------


class Replier:
    """How a call answers its caller: ``write(message)`` sends one message on the link.
    Thread-safe, because a call's own thread streams its output while, rarely, another
    thread answers for a call that cannot be stopped."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._lock = threading.Lock()

    def write(self, message: Any, timeout: float | None = None) -> bool:
        """Send ``message``; False when the lock was not had within ``timeout`` seconds."""
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            return False
        try:
            _send(self._sock, message)
            return True
        finally:
            self._lock.release()


class Server:
    """Serves direct links on a blocking socket, one thread per connection, and runs each
    message's handler in that thread: a warm call wakes no event loop and hops no thread.
    A client sends its next message on a link only after the reply to the last, so a
    connection's thread has one call at a time."""

    def __init__(self, host: str, handler: Callable[..., dict], ssl_context: ssl.SSLContext | None):
        self._handler = handler
        self._ssl = ssl_context
        self._listener = socket.create_server((host, 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, name="kaas-link-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                sock, _ = self._listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(sock,), name="kaas-link", daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ssl is not None:
                sock.settimeout(10)  # a handshake that never comes must not hold the thread
                sock = self._ssl.wrap_socket(sock, server_side=True)
                sock.settimeout(None)
            replier = Replier(sock)
            while not self._closed:
                try:
                    frames = _receive_frames(sock)
                except (ConnectionError, OSError):  # the client closed the link
                    return
                try:
                    message = loads(frames, deserialize=True)
                except Exception as e:  # e.g. an input whose class does not exist here
                    replier.write({"kind": "refused", "text": f"{type(e).__name__}: {e}"})
                    continue
                message.pop("op", None)
                try:
                    reply = self._handler(replier, **message)
                except BaseException as e:  # noqa: BLE001 - e.g. a stop that landed late
                    reply = {"kind": "refused", "text": f"{type(e).__name__}: {e}"}
                replier.write(reply)
        except (ConnectionError, OSError):  # the client went away mid-reply
            pass
        finally:
            try:
                sock.close()
            except OSError:
                pass

    def close(self) -> None:
        self._closed = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            self._listener.close()
        except OSError:
            pass


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
        _send(self.sock, message)

    def receive(self, timeout: float | None = None) -> Any:
        self.sock.settimeout(timeout)
        try:
            frames = _receive_frames(self.sock)
        finally:
            self.sock.settimeout(None)
        return loads(frames, deserialize=False)

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
