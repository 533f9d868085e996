"""Large parts of a message, between two processes on one machine, through shared memory.

Over a same-host link (the worker's Unix socket) a frame above a threshold (an array's
bytes) does not go through the socket, which copies it twice (into the kernel, out again)
in many small hand-offs. The sender copies it once into a *segment*: a ``memfd`` (anonymous
shared memory) that it passes along with the message as a file descriptor (``SCM_RIGHTS``).
The receiver maps the segment and hands the bytes out in place: its arrays are views of it.

Nothing can leak. A memfd has no name (nothing in ``/dev/shm``); the kernel frees its memory
when the last descriptor and the last mapping of it close, and a killed process closes
both. Descriptors still in a socket's queue are freed with the socket.

Ownership: the side that made a segment writes into it only while it is *free*. Sending it
*lends* it to the peer, which gives it back (a notice in the header of a later message on
the same link) once the last array viewing it is gone; only then is it reused. Both sides
keep their mappings, so a reused segment costs neither fresh pages nor a fresh mapping.
Fresh shared pages are expensive (on the 2-core VM, 64 MiB takes ~40 ms to allocate and map,
several times the copy itself), so a frame that finds no free segment of its size goes
through the socket this once while a background thread makes one for the next time.

A segment is sealed against shrinking before it is sent, and a receiver maps only a sealed
memfd at least as large as announced: a peer cannot make the other side's reads fault by
truncating the file under them.

Two more ways save the copy, both for arrays that already lie in a segment of the link:
- *Sent back*: an array the peer lent (a result that came home) goes back to that peer as a
  reference (the segment's inode and an offset), not as bytes. The owner gets a read-only
  view of its own segment, which stays taken until that view is gone, whatever the peer
  gives back meanwhile. A consumer that may write its input or keep it (a cell) copies it.
- *Borrowed*: the side that will send a result may first take a free segment for it
  (``borrow``; a CPU OpenCL device then writes the kernel's output straight into it); lending
  an array that starts a borrowed segment lends that segment as it is.
An own segment is free again only when the peer has given it back and no local view of it is
left.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import queue
import stat
import threading
import time
import weakref
from dataclasses import dataclass, field

import numpy

# Settings (kaas.transfer.shared-memory-*), set on both sides from the pool's config.
_settings = {"threshold": 1 << 20, "keep": 1 << 30, "idle": 60.0}


def configure(threshold: int | None, keep: int, idle: float) -> None:
    """``threshold``: the smallest frame that goes through shared memory (None or 0: none
    does); ``keep``: bytes of free segments one link keeps for reuse; ``idle``: seconds an
    unused segment is kept."""
    _settings.update(threshold=int(threshold) if threshold else 0, keep=int(keep), idle=float(idle))


def available() -> bool:
    return hasattr(os, "memfd_create") and hasattr(fcntl, "F_ADD_SEALS")


def threshold() -> int:
    return _settings["threshold"]


def size_class(nbytes: int) -> int:
    """The segment size made for ``nbytes``: the next of four steps per power of two, so a
    segment wastes at most a fifth of itself and fits nearby sizes for reuse."""
    if nbytes <= 1 << 20:
        return 1 << 20
    top = 1 << (nbytes - 1).bit_length()  # the power of two at or above
    step = top // 8  # the four classes between top/2 and top
    return -(-nbytes // step) * step


@dataclass(eq=False)
class Segment:
    """One memfd and this process's mapping of it."""

    inode: int
    size: int
    mapping: mmap.mmap
    fd: int | None = None  # kept by the side that made it, to send it
    close_fd: weakref.finalize | None = None  # closes ``fd`` once: on unmap, or when dropped
    last_used: float = field(default_factory=time.monotonic)
    in_use: int = 0  # (received segments) arrays handed out and not yet released
    address: int = 0  # where this process maps it
    lent: bool = False  # (own segments) the peer may view it
    local: int = 0  # (own segments) views of it in this process: borrowed, or sent back by the peer
    borrowed: bool = False  # (own segments) taken by ``borrow``, until free again
    on_unmap: list = field(default_factory=list)  # callbacks before the mapping goes (GPU pinning)
    uploads: int = 0  # (received segments) uploads to a GPU from it, and whether it is pinned
    pinned: bool = False

    def unmap(self) -> None:
        for callback in self.on_unmap:
            with contextlib.suppress(Exception):
                callback()
        self.on_unmap.clear()
        with contextlib.suppress(BufferError, ValueError):  # still viewed: freed with its last view
            self.mapping.close()
        if self.close_fd is not None:
            self.close_fd()


def _make(size: int) -> Segment:
    """A fresh segment of ``size`` bytes, its pages allocated and mapped (the expensive part)."""
    fd = os.memfd_create("kaas-frame", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        with contextlib.suppress(OSError):  # allocate in the kernel, without a fault per page
            os.posix_fallocate(fd, 0, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    except BaseException:
        os.close(fd)
        raise
    segment = Segment(os.fstat(fd).st_ino, size, mapping, fd, address=_mapped_at(mapping))
    segment.close_fd = weakref.finalize(segment, os.close, fd)
    return segment


def _mapped_at(mapping: mmap.mmap) -> int:
    return numpy.frombuffer(mapping, numpy.uint8, count=1).ctypes.data


def _address(frame) -> int:
    return numpy.frombuffer(frame, numpy.uint8).ctypes.data if frame.nbytes else 0


class Warmer:
    """One background thread that makes segments for links that had none free of a size."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def request(self, frames: "SharedFrames", size: int) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="kaas-shared-memory", daemon=True)
                self._thread.start()
        self._queue.put((weakref.ref(frames), size))

    def _run(self) -> None:
        while True:
            self._make_one(*self._queue.get())

    @staticmethod
    def _make_one(ref: "weakref.ref[SharedFrames]", size: int) -> None:
        # A function of its own, so that nothing it made stays referenced by the thread
        # while it waits for the next request: a segment must go with its last user.
        frames = ref()
        if frames is None or frames.closed:
            return
        try:
            segment = _make(size)
        except OSError:  # out of memory or descriptors: the socket carries on
            frames.warm_failed(size)
            return
        frames.add_free(segment)


_warmer = Warmer()
_all: "weakref.WeakSet[SharedFrames]" = weakref.WeakSet()


class SharedFrames:
    """The shared-memory state of one link, on one side: the segments this side made (free
    or lent to the peer), the peer's segments it has mapped, and the notices owed to the
    peer. Thread-safe: arrays are released by whichever thread drops them last."""

    MAX_PER_MESSAGE = 64  # descriptors one message may carry (the kernel's limit is 253)

    def __init__(self) -> None:
        # Reentrant: an array's release runs from the garbage collector, which can run
        # in this very thread while it holds the lock.
        self._lock = threading.RLock()
        self._own: dict[int, Segment] = {}
        self._free: list[Segment] = []
        self._warming: set[int] = set()
        self._peer: dict[int, Segment] = {}
        self._returns: list[int] = []
        self.closed = False
        # Frames that went through shared memory (tests and benchmarks): all of them, and of
        # those the ones lent without a copy (borrowed) and the ones sent back by reference.
        self.sent = self.received = 0
        self.sent_in_place = self.sent_back = self.received_back = 0
        _all.add(self)
        _start_trimmer()

    # -- sending --

    def lend(self, frame: memoryview) -> int | None:
        """Copy ``frame`` into a free segment, lend it to the peer and return its descriptor
        to send; None when none is free (the frame goes through the socket, and one is made
        for next time)."""
        size = frame.nbytes
        address = _address(frame)
        with self._lock:
            if self.closed:
                return None
            borrowed = next((s for s in self._own.values() if s.borrowed and s.address == address and not s.lent), None)
            if borrowed is not None and size <= borrowed.size:  # already in place: lent as it is
                borrowed.lent = True
                borrowed.last_used = time.monotonic()
                self.sent += 1
                self.sent_in_place += 1
                return borrowed.fd
            segment = self._take_free_locked(size)
            if segment is None:
                return None
            segment.lent = True
        destination = numpy.frombuffer(segment.mapping, numpy.uint8, count=size)
        numpy.copyto(destination, numpy.frombuffer(frame, numpy.uint8))
        self.sent += 1
        return segment.fd

    def borrow(self, nbytes: int) -> numpy.ndarray | None:
        """A free segment's first ``nbytes``, writable, for a result about to be sent on this
        link (lending an array that starts there then copies nothing); the segment is taken
        until the array and every view of it are gone, and until the peer gives it back if
        it was lent. None when none is free (one is made for next time)."""
        with self._lock:
            if self.closed:
                return None
            segment = self._take_free_locked(nbytes)
            if segment is None:
                return None
            segment.borrowed = True
            return self._local_view_locked(segment, 0, nbytes)

    def _take_free_locked(self, size: int) -> Segment | None:
        largest = max(2 * size, size_class(size))  # no huge segment for a small frame
        fits = [s for s in self._free if size <= s.size <= largest]
        if not fits:
            wanted = size_class(size)
            if wanted not in self._warming:
                self._warming.add(wanted)
                _warmer.request(self, wanted)
            return None
        segment = min(fits, key=lambda s: s.size)
        self._free.remove(segment)
        segment.last_used = time.monotonic()
        return segment

    def _local_view_locked(self, segment: Segment, offset: int, nbytes: int) -> numpy.ndarray:
        segment.local += 1
        owner = numpy.frombuffer(segment.mapping, numpy.uint8, count=nbytes, offset=offset)
        weakref.finalize(owner, self._local_released, segment)
        return owner

    def _local_released(self, segment: Segment) -> None:
        with self._lock:
            segment.local -= 1
            self._free_if_unused_locked(segment)

    def _free_if_unused_locked(self, segment: Segment) -> None:
        if (not self.closed and not segment.lent and segment.local == 0 and segment not in self._free
                and self._own.get(segment.inode) is segment):
            segment.borrowed = False
            segment.last_used = time.monotonic()
            self._free.append(segment)

    def reference(self, frame: memoryview) -> tuple[int, int] | None:
        """(inode, offset) when ``frame`` lies in a segment the peer lent this side: it can go
        back as a reference, without its bytes."""
        address, size = _address(frame), frame.nbytes
        with self._lock:
            for segment in self._peer.values():
                if segment.in_use and segment.address <= address and address + size <= segment.address + segment.size:
                    self.sent_back += 1
                    return segment.inode, address - segment.address
        return None

    def add_free(self, segment: Segment) -> None:
        with self._lock:
            self._warming.discard(segment.size)
            if self.closed:
                segment.unmap()
                return
            self._own[segment.inode] = segment
            self._free.append(segment)
            self._trim_locked(time.monotonic())

    def warm_failed(self, size: int) -> None:
        with self._lock:
            self._warming.discard(size)

    def take_returns(self) -> list[int]:
        """Segments of the peer's that this side no longer views: owed back to it."""
        if not self._returns:
            return []
        with self._lock:
            returns, self._returns = self._returns, []
        return returns

    def returned(self, inodes) -> None:
        """The peer gave these segments back: free to reuse."""
        with self._lock:
            for inode in inodes:
                segment = self._own.get(inode)
                if segment is not None:
                    segment.lent = False
                    self._free_if_unused_locked(segment)
            self._trim_locked(time.monotonic())

    # -- receiving --

    def accept(self, fd: int, length: int) -> numpy.ndarray:
        """The ``length`` bytes at the start of the segment the peer sent as ``fd``, in
        place: a uint8 array whose release (the last view of it gone) gives the segment back."""
        try:
            info = os.fstat(fd)
            with self._lock:
                segment = self._peer.get(info.st_ino)
            if segment is None:
                segment = self._map(fd, info, length)
        finally:
            os.close(fd)
        if length > segment.size:
            raise ValueError(f"a shared-memory frame of {length:,} bytes announced in a segment of {segment.size:,}")
        with self._lock:
            segment.in_use += 1
            segment.last_used = time.monotonic()
        owner = numpy.frombuffer(segment.mapping, numpy.uint8, count=length)
        weakref.finalize(owner, self._released, segment)
        self.received += 1
        return owner

    def sent_back_view(self, inode: int, offset: int, length: int) -> numpy.ndarray:
        """The peer sent back ``length`` bytes at ``offset`` of a segment this side lent it:
        a read-only view of them, in place; the segment stays taken while the view lives."""
        with self._lock:
            segment = self._own.get(inode)
            if segment is None or not segment.lent or offset < 0 or offset + length > segment.size:
                raise ValueError("the peer sent back memory this side did not lend it")
            view = self._local_view_locked(segment, offset, length)
        view.flags.writeable = False
        self.received_back += 1
        return view

    def _map(self, fd: int, info: os.stat_result, length: int) -> Segment:
        if not stat.S_ISREG(info.st_mode) or info.st_size < length:
            raise ValueError("the peer passed a descriptor that is not a shared-memory segment of the announced size")
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        if not seals & fcntl.F_SEAL_SHRINK:
            raise ValueError("the peer passed a shared-memory segment that can shrink under this side's reads")
        mapping = mmap.mmap(fd, info.st_size, flags=mmap.MAP_SHARED)
        segment = Segment(info.st_ino, info.st_size, mapping, address=_mapped_at(mapping))
        with self._lock:
            if self.closed:  # still handed out; unmapped when its last view goes
                return segment
            self._peer[segment.inode] = segment
        return segment

    def _released(self, segment: Segment) -> None:
        with self._lock:
            segment.in_use -= 1
            if segment.in_use == 0 and not self.closed and self._peer.get(segment.inode) is segment:
                self._returns.append(segment.inode)

    # -- upkeep --

    def _trim_locked(self, now: float) -> None:
        """Free segments past the keep budget or idle too long go (the least recently used
        first); so do mappings of the peer's segments that nothing views and that sat idle."""
        idle, keep = _settings["idle"], _settings["keep"]
        self._free.sort(key=lambda s: s.last_used)
        kept = sum(s.size for s in self._free)
        while self._free and (kept > keep or now - self._free[0].last_used > idle):
            segment = self._free.pop(0)
            kept -= segment.size
            del self._own[segment.inode]
            segment.unmap()
        for inode, segment in list(self._peer.items()):
            if segment.in_use == 0 and now - segment.last_used > idle:
                del self._peer[inode]
                segment.unmap()

    def trim(self) -> None:
        with self._lock:
            if not self.closed:
                self._trim_locked(time.monotonic())

    def close(self) -> None:
        """The link is gone: every mapping and descriptor goes. Lent segments are never
        reused (the peer may still view them); memory the peer or this side's arrays still
        view stays until they are dropped."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            segments = [*self._own.values(), *self._peer.values()]
            self._own.clear()
            self._free.clear()
            self._peer.clear()
            self._returns.clear()
        for segment in segments:
            if segment.in_use == 0 and segment.local == 0:
                segment.unmap()
            elif segment.close_fd is not None:
                segment.close_fd()


def segment_holding(address: int) -> Segment | None:
    """The segment, viewed in this process (received, sent back or borrowed), whose mapping
    holds ``address`` (for a backend that reads in place or pins the memory it uploads
    from), or None."""
    for frames in list(_all):
        with frames._lock:
            viewed = [s for s in frames._peer.values() if s.in_use] + [s for s in frames._own.values() if s.local]
            for segment in viewed:
                if segment.address <= address < segment.address + segment.size:
                    return segment
    return None


# The link whose call this thread is serving, and whether that call's results are on their
# way home over it (set by fastlink's server and the worker's executor).
_serving = threading.local()


def serving(frames: "SharedFrames | None") -> None:
    _serving.frames = frames
    _serving.home = False


@contextlib.contextmanager
def results_go_home():
    """While a call whose results all go home runs: a large result may be made in a
    borrowed segment of the caller's link (see ``borrow_for_result``)."""
    _serving.home = True
    try:
        yield
    finally:
        _serving.home = False


def borrow_for_result(nbytes: int) -> numpy.ndarray | None:
    """Memory for a result of ``nbytes`` that will be sent home on this thread's link, in a
    borrowed segment of it (see ``SharedFrames.borrow``); None outside such a call, for a
    small result, or when no segment is free."""
    frames = getattr(_serving, "frames", None)
    if frames is None or not _serving.home or nbytes < max(threshold(), 1):
        return None
    return frames.borrow(nbytes)


_trimmer_started = threading.Event()


def _start_trimmer() -> None:
    """One daemon thread per process gives idle segments back to the system, so a notebook
    that stops sending large arrays does not hold their memory."""
    if _trimmer_started.is_set():
        return
    _trimmer_started.set()

    def trim_forever() -> None:
        while True:
            time.sleep(max(1.0, min(10.0, _settings["idle"] / 4)))
            for frames in list(_all):
                frames.trim()

    threading.Thread(target=trim_forever, name="kaas-shared-memory-trim", daemon=True).start()
