"""A running call's print output, rich displays and state changes, sent to its caller as they
happen: chunks ``(name, text)``, ``name`` "stdout", "stderr" or "state", and
``("display", payload)`` for a displayed object (see worker.display, protocol.DisplayChunk).

The rules that keep one slow notebook from hurting anyone else:
- Nothing here runs on the worker's event loop: a send that blocks there would stop the
  worker's heartbeats, and the scheduler would drop the worker for everyone.
- The call's own thread sends when its text is due (back-pressure falls on that call only);
  text written within FLUSH_S of the last message waits for one shared flusher thread, which
  never blocks on a caller: it sends only to a link that can take data now and whose lock is
  free, and otherwise looks again a little later.
- What waits is bounded (MAX_PENDING characters per call); past that, text is dropped and
  counted, and the caller is told how much at the end. A display is sent at once, by the
  call's own thread (after the text before it, in order), never dropped; one display is at
  most MAX_DISPLAY characters (worker.display turns a larger one into a text note).
- A send that fails or stalls past the link's send timeout drops the link (see
  fastlink.Replier): the call goes on, its output is discarded.
"""

from __future__ import annotations

import heapq
import itertools
import json
import select
import threading
import time


class CallStream:
    FLUSH_S = 0.02
    # A call's state ("running", "compiling") waits this long from the call's start before it
    # is sent on a message of its own: a call answering sooner sends none (its reply says it
    # all), so a quick cell's link carries one message back, and its notebook handles one.
    # Text never waits longer for it: a state held counts as sent for the text after it (which
    # is coalesced for FLUSH_S, as after a state sent at once, so one print travels whole),
    # and goes with that text, before it.
    STATE_AFTER_S = 0.2
    MAX_PENDING = 8 * 2**20  # characters waiting to be sent, per call
    MAX_DISPLAY = 8 * 2**20  # characters of one display's bundle (base64 images included)

    def __init__(self, replier):
        self.replier = replier
        self._chunks: list[tuple[str, str]] = []
        self._pending = 0
        self.dropped = 0
        self._lock = threading.Lock()  # guards the chunks; never held while sending
        self._send_lock = threading.Lock()  # one sender at a time, so messages keep their order
        self._last_sent = 0.0
        self._scheduled = False
        self._started = time.monotonic()
        self._state_scheduled = False  # a flush for states waiting, on a timer of its own
        self.closed = False  # answered (or the link broke): later writes are dropped

    def write(self, name: str, text) -> None:
        if name == "display":  # ``text`` is the display's payload (a dict)
            with self._lock:
                if self.closed:
                    return
                self._chunks.append((name, text))
            self.flush()
            return
        with self._lock:
            if self.closed:
                return
            if name != "state" and self._pending + len(text) > self.MAX_PENDING:
                self.dropped += len(text)
                return
            self._chunks.append((name, text))
            if name == "state":
                now = time.monotonic()
                due = self._started + self.STATE_AFTER_S - now
                if due > 0:
                    self._last_sent = now  # as if sent: the text after it is coalesced as it would be
                    if not self._state_scheduled:
                        self._state_scheduled = True
                        _flusher.schedule(self, due)
                    return
                self._state_scheduled = False
            self._pending += len(text)
            if name != "state" and time.monotonic() - self._last_sent < self.FLUSH_S:
                if not self._scheduled:
                    self._scheduled = True
                    _flusher.schedule(self, self.FLUSH_S)
                return
        self.flush()

    def flush(self, blocking: bool = True) -> bool:
        """Send what is waiting. With ``blocking`` false (the flusher), give up at once,
        returning False, when another send is under way or the link cannot take data now."""
        if not self._send_lock.acquire(blocking):
            return False
        try:
            if not blocking and not _writable(self.replier):
                return False
            with self._lock:
                self._scheduled = False
                chunks, self._chunks, self._pending = self._chunks, [], 0
                if not chunks or self.closed:
                    return True
                self._last_sent = time.monotonic()
            try:
                self.replier.write({"kind": "stream", "chunks": chunks})
            except OSError:  # the caller went away or stopped reading: drop its output
                with self._lock:
                    self.closed = True
            return True
        finally:
            self._send_lock.release()

    def finish(self) -> None:
        """The call is answering: send the rest (and what was dropped, if any), then close.
        States not sent yet and followed by no text are dropped: the reply supersedes them. A
        state before text still goes before it (the caller's run view shows itself at the
        worker's first state, so that it comes before the call's output)."""
        with self._lock:
            last = len(self._chunks)
            while last and self._chunks[last - 1][0] == "state":
                last -= 1
            del self._chunks[last:]
        if self.dropped:
            with self._lock:
                self._chunks.append(("stderr", f"\n[kaas: {self.dropped:,} characters of output were dropped: "
                                               f"more than {self.MAX_PENDING:,} waited for the notebook to read them]\n"))
        self.flush()
        with self._lock:
            self.closed = True


def display_size(payload: dict) -> int:
    """The characters a display's payload carries (its data's text; a JSON value's by its
    length as JSON)."""
    size = 0
    for value in (payload.get("data") or {}).values():
        if isinstance(value, str):
            size += len(value)
        else:
            try:
                size += len(json.dumps(value))
            except (TypeError, ValueError):
                size += 64
    return size


def _writable(replier) -> bool:
    sock = getattr(replier, "_sock", None)
    if sock is None:
        return True
    try:
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLOUT)
        return bool(poller.poll(0))
    except (OSError, ValueError):  # closed: let the send report it
        return True


class _Flusher:
    """One thread for all of a worker's calls: sends text that waited FLUSH_S, without ever
    blocking on a slow caller (see CallStream.flush)."""

    RETRY_S = 0.05

    def __init__(self):
        self._changed = threading.Condition()
        self._heap: list[tuple[float, int, CallStream]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def schedule(self, stream: CallStream, delay: float) -> None:
        with self._changed:
            entry = (time.monotonic() + delay, next(self._order), stream)
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kaas-stream-flush", daemon=True)
                self._thread.start()
            elif self._heap[0] is entry:  # due before anything the thread waits for: wake it
                self._changed.notify()

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._changed.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                _, _, stream = heapq.heappop(self._heap)
            try:
                if not stream.flush(blocking=False) and not stream.closed:
                    self.schedule(stream, self.RETRY_S)
            except Exception:  # noqa: BLE001 - one stream's trouble must not stop the others'
                pass


_flusher = _Flusher()
