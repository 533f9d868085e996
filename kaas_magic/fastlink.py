"""The hot path's wire: a direct link (Unix socket or TCP) from the calling thread to a worker.

Dask's comms serve everything else (status, metrics, freeing buffers, cancelling), but a
warm call is the product, and going through the client's event loop costs two thread hops
and the GIL contention of that loop. Here the calling thread itself writes the request and
reads the reply on a blocking socket, and on the worker a thread per link reads the request
and runs the call itself: no event loop on either side.

Who may talk: over TCP, TLS with client certificates whenever the pool uses TLS (the
embedded pool always does); over the Unix socket, only this user (a 0700 folder, and each
side checks the other's uid), with no TLS, so the hot path pays nothing for it.

What a link trusts of its peer: nothing it announces. Every reply carries the id of the
call it answers and the client refuses any other (a forked child of a cell cannot answer
for the worker); a message announced past the transfer limits is refused before a byte of
it is read; a send that stalls (a caller that stopped reading) drops the link.

A message is a pickle (protocol 5) with its buffers out of band, so arrays are never
copied into it, sent as frames prefixed by their count and lengths. Values inside it were
serialised beforehand, one by one (see serial), so that a value that cannot travel is
named. Pickle, not Dask's msgpack framing, because Dask's ``loads`` took several times
longer to decode a call; the trust model is the same (Dask unpickles too).
"""

from __future__ import annotations

import array
import contextlib
import os
import pickle
import socket
import ssl
import struct
import threading
from typing import TYPE_CHECKING, Any, Callable

import numpy

from . import shared_frames
from .shared_frames import SharedFrames

if TYPE_CHECKING:
    from .protocol import Refused, Reply

_COUNT = struct.Struct("<Q")
_TWO = struct.Struct("<QQ")  # the header of a one-frame message: count and length


SHARED = 1 << 63  # a frame length with this bit set: the frame is in the next passed segment
BACK = 1 << 62  # with SHARED: the frame is in a segment the receiver lent; 16 bytes follow (inode, offset)
FLAGS = SHARED | BACK
NOTICES = 32  # the header's first word: frame count in the low 32 bits, notices above


def _encode(message: Any, shared: SharedFrames | None = None) -> tuple[list, list[int]]:
    """The message as the parts to send, and the descriptors to pass with them.

    Parts: the header (the first word: the frame count, and above bit 32 the number of
    notices; then each frame's length; then the notices: ids of the peer's shared-memory
    segments this side gives back), then the pickle, then each out-of-band buffer that
    travels in the socket. A buffer over the shared-memory threshold on a same-host link
    is copied into a segment instead (see shared_frames): its length has the SHARED bit,
    and the segment's descriptor goes with the message. One that lies in a segment the
    peer lent goes back as a reference: the SHARED and BACK bits, and in the socket only
    the segment's inode and the offset."""
    buffers: list = []
    head = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    returns = shared.take_returns() if shared is not None else ()
    if not buffers and not returns:  # the usual small message: one piece, one system call
        return [_TWO.pack(1, len(head)) + head], []
    lengths, parts, fds = [len(head)], [head], []
    smallest = shared_frames.threshold() if shared is not None else 0
    for buffer in buffers:
        frame = buffer.raw()
        if smallest and frame.nbytes >= smallest:
            back = shared.reference(frame)
            if back is not None:  # the peer's own memory: sent back by reference
                lengths.append(frame.nbytes | FLAGS)
                parts.append(_TWO.pack(*back))
                continue
            fd = shared.lend(frame) if len(fds) < shared.MAX_PER_MESSAGE else None
            if fd is not None:
                lengths.append(frame.nbytes | SHARED)
                fds.append(fd)
                continue
        lengths.append(frame.nbytes)
        parts.append(frame)
    header = struct.pack(f"<{1 + len(lengths) + len(returns)}Q", len(lengths) | len(returns) << NOTICES,
                         *lengths, *returns)
    return [header, *parts], fds


UNIX_BUFFER = 4 * 2**20


def tune(sock: socket.socket) -> None:
    """TCP: no Nagle delay on small messages. Unix sockets: 4 MiB buffers, because with the
    default buffer a megabyte crosses in many sender/receiver hand-offs, which can make a
    Unix socket slower than TCP."""
    if sock.family == getattr(socket, "AF_UNIX", None):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UNIX_BUFFER)
    else:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _decode(frames: list[bytearray]) -> Any:
    return pickle.loads(frames[0], buffers=frames[1:])


def _send(sock: socket.socket, message: Any, shared: SharedFrames | None = None) -> None:
    parts, fds = _encode(message, shared)
    if len(parts) == 1 or isinstance(sock, ssl.SSLSocket):  # (no sendmsg on TLS; no descriptors there either)
        for part in parts:
            sock.sendall(part)
        return
    parts = [memoryview(p).cast("B") for p in parts]
    # The descriptors ride on the first system call, so they arrive with the header's bytes.
    passed = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    while parts:  # all parts in as few system calls as the socket takes
        sent = sock.sendmsg(parts, passed)
        passed = []
        while parts and sent >= parts[0].nbytes:
            sent -= parts[0].nbytes
            parts.pop(0)
        if parts and sent:
            parts[0] = parts[0][sent:]


class FrameTooLarge(ValueError):
    """A peer announced a message larger than this side accepts: the link is dropped
    before any of it is read, so no peer can make this process allocate what it names."""


# What one message may carry, set from kaas.transfer (see set_limits): the largest frame
# (one value's bytes, plus the pickle's own frame) and all frames together.
_limits = {"frame": 2**31 + 2**20, "message": 2**32}


def set_limits(max_frame: int, max_message: int) -> None:
    """Bound what a link reads (from kaas.transfer.max-bytes and max-message-bytes)."""
    _limits["frame"], _limits["message"] = int(max_frame), int(max_message)


class _Reader:
    """Reads messages from a socket. A small message (a call's request, most replies)
    arrives whole in one system call into a read-ahead buffer and is cut from there; a
    large frame (an array) is read straight into its own buffer, never copied, or, on a
    same-host link, handed out in place from the shared-memory segment it came in. A
    header that names more than the limits is refused before anything is allocated."""

    AHEAD = 65536
    MAX_FRAMES = 4096  # a header longer than this is not one of ours

    def __init__(self, sock: socket.socket, shared: SharedFrames | None = None):
        self.sock = sock
        self.shared = shared
        self._ahead = bytearray(self.AHEAD)
        self._start = self._end = 0
        # Descriptors passed with the bytes read so far and not yet claimed by a frame.
        self._passed: list[int] = []
        self._ancillary = socket.CMSG_SPACE(SharedFrames.MAX_PER_MESSAGE * 4) if shared is not None else 0

    def message(self) -> list:
        self._have(8)
        (first,) = _COUNT.unpack_from(self._ahead, self._start)
        count, notices = first & 0xFFFFFFFF, first >> NOTICES
        if not 0 < count <= self.MAX_FRAMES or count + notices >= self.AHEAD // 8:
            raise ValueError(f"not a kaas message (a header of {count} frames, {notices} notices)")
        self._have(8 + 8 * (count + notices))
        words = struct.unpack_from(f"<{count + notices}Q", self._ahead, self._start + 8)
        lengths = [n & ~FLAGS for n in words[:count]]
        if max(lengths) > _limits["frame"] or sum(lengths) > _limits["message"]:
            raise FrameTooLarge(
                f"the peer announced a message of {sum(lengths):,} bytes (largest part {max(lengths):,}), over "
                f"this side's limits of {_limits['frame']:,} per part and {_limits['message']:,} in all "
                f"(kaas.transfer.max-bytes, kaas.transfer.max-message-bytes)")
        self._start += 8 + 8 * (count + notices)
        if notices:
            if self.shared is None:
                raise ValueError("the peer gave back shared memory on a link that has none")
            self.shared.returned(words[count:])
        return [self._sent_back(n & ~FLAGS) if n & BACK else self._in_place(n & ~FLAGS) if n & SHARED
                else self._frame(n) for n in words[:count]]

    def _in_place(self, size: int):
        """A frame that came in a shared-memory segment: its bytes, not copied."""
        if self.shared is None or not self._passed:
            raise ValueError("the peer announced a shared-memory frame without passing its segment")
        return self.shared.accept(self._passed.pop(0), size)

    def _sent_back(self, size: int):
        """A frame in a segment this side lent the peer: a read-only view of it, not copied."""
        if self.shared is None:
            raise ValueError("the peer sent back shared memory on a link that has none")
        inode, offset = _TWO.unpack(bytes(self._frame(_TWO.size)))
        return self.shared.sent_back_view(inode, offset, size)

    def _receive(self, view: memoryview) -> int:
        if not self._ancillary:
            n = self.sock.recv_into(view)
        else:  # a same-host link: collect descriptors passed with these bytes
            n, ancillary, flags, _ = self.sock.recvmsg_into([view], self._ancillary)
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
                    self._passed.extend(fds)
            if flags & socket.MSG_CTRUNC:
                raise ValueError("the peer passed more descriptors than a message may carry")
        if n == 0:
            raise ConnectionResetError("the other side closed the connection")
        return n

    def close(self) -> None:
        """Descriptors received and never claimed are closed (a link that broke mid-message)."""
        passed, self._passed = self._passed, []
        for fd in passed:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _have(self, size: int) -> None:
        """At least ``size`` (at most AHEAD) unread bytes in the read-ahead buffer."""
        while self._end - self._start < size:
            if self._start:  # move what is left to the front
                left = self._end - self._start
                self._ahead[:left] = self._ahead[self._start:self._end]
                self._start, self._end = 0, left
            self._end += self._receive(memoryview(self._ahead)[self._end:])

    def _frame(self, size: int):
        start = self._start
        if size <= self._end - start:  # already here: one copy out of the buffer
            self._start = start + size
            return self._ahead[start:start + size]
        # A large frame goes into uninitialised memory: a bytearray would zero-fill bytes
        # that are overwritten at once.
        out = bytearray(size) if size < self.AHEAD else numpy.empty(size, numpy.uint8)
        view = memoryview(out)
        got = self._end - start
        view[:got] = memoryview(self._ahead)[start:self._end]
        self._start = self._end = 0
        while got < size:  # straight into place, never past this frame
            got += self._receive(view[got:])
        return out


# --- the worker side -------------------------------------------------------------------


class Replier:
    """How a call answers its caller: ``write(message)`` sends one message on the link.
    Thread-safe, because a call's own thread streams its output while, rarely, another
    thread answers for a call that cannot be stopped."""

    # A caller that stops reading (its notebook's output blocks) holds a send at most this
    # long; then its link is dropped, and the call's thread is free again.
    SEND_TIMEOUT = 30.0

    def __init__(self, sock: socket.socket, shared: SharedFrames | None = None):
        self._sock = sock
        self._shared = shared
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.broken = False
        self.call_id: str | None = None  # the call being answered (set by the handler)
        with contextlib.suppress(OSError, AttributeError):  # a blocking send, bounded in the kernel
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                            struct.pack("ll", int(self.SEND_TIMEOUT), 0))

    @property
    def sock(self) -> socket.socket:
        """The link's socket: the worker watches it for a caller that goes away (read-only
        use; only this object writes on it)."""
        return self._sock

    def write(self, message: Any, timeout: float | None = None) -> bool:
        """Send ``message``; False when the lock was not had within ``timeout`` seconds.

        A send that fails or times out part-way leaves the link mid-message: it is shut
        down, so the caller sees a broken link, never half a reply, and later writes fail."""
        if os.getpid() != self._pid:
            self._in_forked_child(message)
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            return False
        try:
            if self.broken:
                raise ConnectionAbortedError("this link was dropped after a failed send")
            if type(message) is dict:  # every reply names the call it answers
                message["call_id"] = self.call_id
                if message.get("kind") != "stream":
                    self.call_id = None  # answered: a second answer would not match
            try:
                _send(self._sock, message, self._shared)
            except OSError:
                self.broken = True
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)
                raise
            return True
        finally:
            self._lock.release()

    @staticmethod
    def _in_forked_child(message: Any) -> None:
        """A cell forked, and its child (a copy of the call's thread) is writing on the
        worker's link. It must never answer a call: its output is dropped, and when it gets
        back to answering the call (the cell's code ended without exiting), it exits."""
        if isinstance(message, dict) and message.get("kind") in ("result", "refused"):
            os._exit(0)
        raise ConnectionAbortedError("a forked child of a cell cannot write on the worker's link")


class Server:
    """Serves direct links, one thread per connection, and runs each message's handler in
    that thread: a warm call wakes no event loop and hops no thread. A client sends its
    next message on a link only after the reply to the last, so a connection's thread has
    one call at a time.

    It listens on TCP (``host``, a free port) and, for clients on the same machine, on a
    Unix socket at ``unix_path``, which is cheaper than loopback TCP for small and large
    messages alike (``kaas bench kernels`` prints the bare cost of both).

    Who may connect: over TCP, when the pool uses TLS (the embedded pool does), only a
    client with a certificate the pool's CA signed (``ssl_context`` must require client
    certificates). The Unix socket carries no TLS, so that the hot path pays nothing for
    it: only this OS user reaches it (its folder is private, mode 0700, and the socket
    itself 0600), and each connection's peer is checked with SO_PEERCRED besides (the
    same user id as this process, or the connection is closed before anything is read)."""

    def __init__(self, host: str, handler: Callable[..., Reply | Refused | None], ssl_context: ssl.SSLContext | None,
                 unix_path: str | None = None):
        self._handler = handler
        self._ssl = ssl_context
        if ssl_context is not None and ssl_context.verify_mode != ssl.CERT_REQUIRED:
            raise ValueError("a TLS direct link must require client certificates (CERT_REQUIRED)")
        self._uid = os.getuid() if hasattr(os, "getuid") else None
        self._closed = False
        self._listeners = [socket.create_server((host, 0))]
        self.port = self._listeners[0].getsockname()[1]
        self.unix_path = None
        if unix_path is not None and hasattr(socket, "AF_UNIX"):
            try:
                unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                unix.bind(unix_path)
                os.chmod(unix_path, 0o600)  # the folder is private already; this is belt and braces
                unix.listen()
                self._listeners.append(unix)
                self.unix_path = unix_path
            except OSError:  # e.g. a path over the length limit: TCP only
                pass
        for listener in self._listeners:
            threading.Thread(target=self._accept, args=(listener,), name="kaas-link-accept", daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while not self._closed:
            try:
                sock, _ = listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(sock,), name="kaas-link", daemon=True).start()

    def _peer_is_me(self, sock: socket.socket) -> bool:
        """A Unix-socket peer runs as this process's user (SO_PEERCRED, where the system has
        it; elsewhere the private folder alone keeps others out)."""
        option = getattr(socket, "SO_PEERCRED", None)
        if option is None or self._uid is None:
            return True
        try:
            _pid, uid, _gid = struct.unpack("iII", sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("iII")))
        except OSError:
            return False
        return uid == self._uid

    def _serve(self, sock: socket.socket) -> None:
        shared = reader = None
        try:
            unix = sock.family == getattr(socket, "AF_UNIX", None)
            if unix and not self._peer_is_me(sock):
                return  # another user: closed before a byte is read
            tune(sock)
            if self._ssl is not None and not unix:  # TLS on TCP only: the Unix socket is private
                sock.settimeout(10)  # a handshake that never comes must not hold the thread
                sock = self._ssl.wrap_socket(sock, server_side=True)
                sock.settimeout(None)
            shared = SharedFrames() if unix and shared_frames.threshold() and shared_frames.available() else None
            shared_frames.serving(shared)  # this thread serves this link's calls
            replier = Replier(sock, shared)
            reader = _Reader(sock, shared)
            while not self._closed:
                try:
                    frames = reader.message()
                except (ConnectionError, OSError, ValueError):  # closed, or not a message of ours: drop it
                    return
                try:
                    message = _decode(frames)
                except Exception as e:  # noqa: BLE001 - not a message of ours
                    replier.write({"kind": "refused", "text": f"{type(e).__name__}: {e}"})
                    continue
                try:
                    reply = self._handler(replier, **message)
                except BaseException as e:  # noqa: BLE001 - e.g. a stop that landed late
                    reply = {"kind": "refused", "text": f"{type(e).__name__}: {e}"}
                if reply is not None:  # None: the handler has answered already
                    replier.write(reply)
        except (ConnectionError, OSError):  # the client went away mid-reply
            pass
        finally:
            shared_frames.serving(None)
            if reader is not None:
                reader.close()
            if shared is not None:
                shared.close()
            # shutdown, not only close: the supervisor holds a copy of the socket, and the
            # client must see the link end now, not at its deadline.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            try:
                sock.close()
            except OSError:
                pass

    def close(self) -> None:
        self._closed = True
        for listener in self._listeners:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
                listener.close()
            except OSError:
                pass
        if self.unix_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.unix_path)


# --- the client side -------------------------------------------------------------------


class Link:
    """One blocking connection to one worker, used by one thread at a time: over the
    worker's Unix socket when it runs on this machine, else over TCP."""

    def __init__(self, endpoint: dict, ssl_context: ssl.SSLContext | None, timeout: float = 5):
        host = endpoint["host"]
        sock = _connect_unix(endpoint)
        if sock is None:
            sock = socket.create_connection((host, endpoint["port"]), timeout=timeout)
        tune(sock)
        # TLS (when the pool uses it) over TCP only: the Unix socket is reachable by this
        # user alone, and the worker on it checked to be this user (see _connect_unix).
        if ssl_context is not None and sock.family != getattr(socket, "AF_UNIX", None):
            sock.settimeout(timeout)
            sock = ssl_context.wrap_socket(sock, server_hostname=host)
        sock.settimeout(None)  # a call may run for as long as it needs
        self.sock = sock
        unix = sock.family == getattr(socket, "AF_UNIX", None)
        # Large arrays to and from a worker on this machine go through shared memory.
        self.shared = SharedFrames() if unix and shared_frames.threshold() and shared_frames.available() else None
        self._reader = _Reader(sock, self.shared)

    def send(self, message: Any) -> None:
        _send(self.sock, message, self.shared)

    def receive(self, timeout: float | None = None) -> Any:
        if timeout is None:
            return _decode(self._reader.message())
        self.sock.settimeout(timeout)
        try:
            return _decode(self._reader.message())
        finally:
            self.sock.settimeout(None)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
        if self.shared is not None:
            self._reader.close()
            self.shared.close()


def _connect_unix(endpoint: dict) -> socket.socket | None:
    """A connection to the worker's Unix socket, when the worker runs on this machine (same
    host name and the socket is there: not a look-alike container) as this same user
    (SO_PEERCRED, where the system has it: a socket that someone else put in its place is
    not used); None otherwise, and the caller goes over TCP (with TLS when the pool uses it)."""
    path = endpoint.get("unix")
    if not path or endpoint.get("hostname") != socket.gethostname() or not os.path.exists(path):
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(5)
        sock.connect(path)
        option = getattr(socket, "SO_PEERCRED", None)
        if option is not None and hasattr(os, "getuid"):
            _pid, uid, _gid = struct.unpack("iII", sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("iII")))
            if uid != os.getuid():
                sock.close()
                return None
        return sock
    except OSError:
        sock.close()
        return None


class Links:
    """Idle links per worker address, shared by threads: a thread takes one for a call and
    gives it back after, so concurrent calls use separate connections."""

    def __init__(self, ssl_context: ssl.SSLContext | None):
        self._ssl = ssl_context
        self._idle: dict[tuple[str, int], list[Link]] = {}
        self._lock = threading.Lock()

    def take(self, endpoint: dict) -> Link:
        with self._lock:
            idle = self._idle.get((endpoint["host"], endpoint["port"]))
            if idle:
                return idle.pop()
        return Link(endpoint, self._ssl)

    def probe(self, endpoint: dict, timeout: float = 2) -> None:
        """Open a fresh link and close it; raises when the worker cannot be reached."""
        Link(endpoint, self._ssl, timeout=timeout).close()

    def give_back(self, endpoint: dict, link: Link) -> None:
        with self._lock:
            self._idle.setdefault((endpoint["host"], endpoint["port"]), []).append(link)

    def close(self) -> None:
        with self._lock:
            links = [link for idle in self._idle.values() for link in idle]
            self._idle.clear()
        for link in links:
            link.close()
