"""A worker's supervisor: a small process of its own that ends the worker when the worker
cannot end a call itself.

A worker stops a call that runs too long, or whose caller went away, from inside its own
interpreter (see stopping): that needs the interpreter to run. Code that stays in C holding
the GIL (``sum(range(10**13))``, a regular expression that backtracks for ever) freezes
every thread of the worker, its watchdog included. So each worker starts this process
(standard library only: started as ``python -I -S supervisor.py``, it imports nothing of
kaas, Dask or any framework), which it tells, cheaply, what it must enforce:

* **deadlines**: a shared memory map of fixed slots, one per call queued or running, each
  the call's deadline on ``time.monotonic()`` (CLOCK_MONOTONIC: the same clock in every
  process of the machine) and, while it runs, the id of the link its caller waits on.
  Arming and disarming a call are stores into that map: no system call on the hot path.
* **links**: the first call on each link sends the link's socket over a Unix socket to the
  supervisor (SCM_RIGHTS), which watches it for a hang-up (POLLRDHUP) from then on.

Every POLL_S it looks, and kills the worker (SIGKILL; its nanny then starts a fresh,
re-warmed one) when

* a running call's deadline passed ``allowance`` seconds ago (the worker's own grace to stop
  it in place, and MARGIN_S more), or
* a running call's caller hung up ``hangup_allowance`` seconds ago and the call is still
  there (the worker's own watcher stops such a call in place within about a second), or
* the worker's owner is gone: an embedded pool's workers end with the notebook that
  started them (its pid, and its start time against reuse of the pid, come from the
  nanny's environment as KAAS_OWNER_PID / KAAS_OWNER_START; ``kaas worker`` has none).

It exits when the worker does (its end of the channel closes, or its parent changes).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import mmap
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

POLL_S = 0.1  # how often the supervisor looks at the deadlines, links and owner
MARGIN_S = 1.5  # past a deadline and the worker's grace, before the supervisor kills
OWNER_POLL_S = 0.5
SLOTS = 1024  # calls queued or running at once that the supervisor covers, per worker
OWNER_ENV = ("KAAS_OWNER_PID", "KAAS_OWNER_START")

# The board: one header slot (the number of slots ever used: the supervisor reads no
# further), then per call two doubles: its deadline (0.0: a free slot) and, once it runs,
# the id of the link its caller waits on (-1.0: running, its link unknown; 0.0: queued).
# Only running calls are enforced: a queued call leaves its queue in place when its time
# is up, and if the worker is frozen its caller's own deadline ends the wait; a call that
# holds the device and the interpreter past its deadline is what ends a worker.
_DOUBLES_PER_SLOT = 2
_LINK = struct.Struct("<q")
_HANGUP = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR  # not POLLIN: see _read_channel

logger = logging.getLogger("kaas_magic.supervisor")


# --- the worker's side ------------------------------------------------------------------


class DeadlineBoard:
    """The shared map of deadlines, written by the worker (a store per change)."""

    def __init__(self, slots: int = SLOTS):
        self.slots = slots
        size = (1 + slots) * _DOUBLES_PER_SLOT * 8
        if hasattr(os, "memfd_create"):
            self.fd = os.memfd_create("kaas-deadlines", os.MFD_CLOEXEC)
            self._file = None
        else:  # an unlinked temporary file serves as well
            self._file = tempfile.TemporaryFile()
            self.fd = self._file.fileno()
        os.ftruncate(self.fd, size)
        self._map = mmap.mmap(self.fd, size)
        self._view = memoryview(self._map).cast("d")
        self._free = list(range(slots - 1, -1, -1))  # pop() takes the lowest: slots in use stay few
        self._used = 0
        self._grow = threading.Lock()
        # A cell that forks: its child (a copy of the call's thread) must not write on the
        # worker's board, whose slots the worker meanwhile gives to other calls.
        os.register_at_fork(after_in_child=self._detach)

    def _detach(self) -> None:
        self._view = memoryview(bytearray(len(self._view) * 8)).cast("d")

    def take(self, deadline: float) -> int:
        """A slot for a new call, holding ``deadline``; -1 when all are taken."""
        try:
            slot = self._free.pop()  # atomic under the GIL
        except IndexError:
            return -1
        base = (1 + slot) * _DOUBLES_PER_SLOT
        self._view[base + 1] = 0.0
        self._view[base] = deadline
        if slot >= self._used:  # a new high: rare, as freed slots are taken again first
            with self._grow:
                if slot >= self._used:
                    self._used = slot + 1
                    self._view[0] = float(self._used)
        return slot

    def set_deadline(self, slot: int, deadline: float) -> None:
        self._view[(1 + slot) * _DOUBLES_PER_SLOT] = deadline

    def set_running(self, slot: int, link: int) -> None:
        """The call got its turn; its caller waits on ``link`` (0: not known)."""
        self._view[(1 + slot) * _DOUBLES_PER_SLOT + 1] = float(link) if link > 0 else -1.0

    def release(self, slot: int) -> None:
        base = (1 + slot) * _DOUBLES_PER_SLOT
        self._view[base] = 0.0
        self._view[base + 1] = 0.0
        self._free.append(slot)


class Supervisor:
    """The worker's handle on its supervisor process: starts it (and starts it again should
    it die), and shares with it the board and the links of calls."""

    def __init__(self, allowance: float, hangup_allowance: float, owner: tuple[int, str] | None = None):
        self.board = DeadlineBoard()
        self.allowance = allowance
        self.hangup_allowance = hangup_allowance
        self.owner = owner
        self.process: subprocess.Popen | None = None
        self._channel: socket.socket | None = None
        self._epoch = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._closed = False
        self._start()

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)  # a supervisor that stopped reading never holds a call up
        command = [sys.executable, "-I", "-S", os.path.abspath(__file__),
                   "--worker", str(os.getpid()), "--board", str(self.board.fd), "--slots", str(self.board.slots),
                   "--channel", str(theirs.fileno()), "--allowance", repr(self.allowance),
                   "--hangup-allowance", repr(self.hangup_allowance)]
        if self.owner is not None:
            command += ["--owner", f"{self.owner[0]}:{self.owner[1]}"]
        try:
            self.process = subprocess.Popen(command, pass_fds=(self.board.fd, theirs.fileno()),
                                            stdin=subprocess.DEVNULL, close_fds=True)
        finally:
            theirs.close()
        self._channel = ours
        self._epoch += 1

    def link(self, replier) -> int:
        """The id under which the supervisor watches this caller's link: sent on the first
        call over it (one message), known after. 0 when it could not be sent."""
        known = getattr(replier, "_kaas_supervised", None)
        if known is not None and known[0] == self._epoch:
            return known[1]
        sock = getattr(replier, "sock", None) or getattr(replier, "_sock", None)
        link = next(self._ids)
        try:
            socket.send_fds(self._channel, [_LINK.pack(link)], [sock.fileno()])
        except (OSError, AttributeError, ValueError):  # full, gone, or no socket: not watched
            link = 0
        try:
            replier._kaas_supervised = (self._epoch, link)
        except AttributeError:
            pass
        return link

    def check(self) -> None:
        """Start the supervisor again if it died (called now and then by the worker)."""
        if self._closed or self.process is None or self.process.poll() is None:
            return
        with self._lock:
            if self._closed or self.process.poll() is None:
                return
            logger.error("kaas supervisor of worker process %d exited (%s); starting it again",
                         os.getpid(), self.process.returncode)
            old = self._channel
            self._start()
            if old is not None:
                old.close()

    def close(self) -> None:
        self._closed = True
        if self._channel is not None:
            self._channel.close()  # the supervisor sees the end and exits
        if self.process is not None:
            try:
                self.process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass


def process_start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat field 22): with
    the pid, names one process for good, even once the pid is reused. None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        return stat[stat.rindex(")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        return None


def owner_from_environment() -> tuple[int, str] | None:
    """The process whose end this worker ends with (an embedded pool's notebook), if any."""
    pid = os.environ.get(OWNER_ENV[0], "")
    if not pid.isdigit() or int(pid) == os.getpid():
        return None
    return int(pid), os.environ.get(OWNER_ENV[1], "")


def owner_environment() -> dict[str, str]:
    """What a nanny passes to the worker processes it starts: this process is their owner."""
    pid = os.getpid()
    return {OWNER_ENV[0]: str(pid), OWNER_ENV[1]: process_start_time(pid) or ""}


# --- the supervisor process -------------------------------------------------------------


def _alive(pid: int, start: str) -> bool:
    """Whether process ``pid`` (started at ``start``, when known) still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process has the pid now
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        fields = stat[stat.rindex(")") + 2:].split()
    except (OSError, ValueError):
        return True  # no /proc: the pid answers, that is all we can tell
    if fields[0] in ("Z", "X"):  # exited, not yet reaped by its parent
        return False
    return not start or fields[19] == start


class _Watch:
    def __init__(self, args: argparse.Namespace):
        self.worker = args.worker
        self.allowance = args.allowance
        self.hangup_allowance = args.hangup_allowance
        size = (1 + args.slots) * _DOUBLES_PER_SLOT * 8
        self.slots = args.slots
        self.view = memoryview(mmap.mmap(args.board, size, prot=mmap.PROT_READ)).cast("d")
        os.close(args.board)
        self.channel = socket.socket(fileno=args.channel)
        self.channel.setblocking(False)
        self.owner: tuple[int, str] | None = None
        if args.owner:
            pid, _, start = args.owner.partition(":")
            self.owner = (int(pid), start)
        self.poller = select.poll()
        self.poller.register(self.channel.fileno(), select.POLLIN)
        self.links: dict[int, int] = {}  # link id -> our copy of its socket's descriptor, until it hangs up
        self.by_fd: dict[int, int] = {}  # descriptor -> link id
        self.hung: dict[int, float] = {}  # link id -> when its caller was seen gone
        self.overdue: dict[int, float] = {}  # slot -> the deadline it was past on the last look
        self.hung_calls: dict[tuple[int, float, float], float] = {}  # (slot, deadline, link) -> since
        self.next_owner_look = 0.0

    def run(self) -> None:
        while True:
            for fd, events in self.poller.poll(POLL_S * 1000):
                if fd == self.channel.fileno():
                    self._read_channel(events)
                else:
                    self._hung_up(fd)
            if os.getppid() != self.worker:  # the worker is gone; we were handed to another parent
                return
            now = time.monotonic()
            if self.owner is not None and now >= self.next_owner_look:
                self.next_owner_look = now + OWNER_POLL_S
                if not _alive(*self.owner):
                    self._kill(f"its owner, the notebook process {self.owner[0]}, is gone", replaced=False)
            self._look(now)

    def _read_channel(self, events: int) -> None:
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.channel, 64, 4)
            except BlockingIOError:
                return
            except OSError:
                sys.exit(0)
            if not data:  # the worker closed its end: it is exiting
                sys.exit(0)
            if len(data) != _LINK.size:
                for fd in fds:
                    os.close(fd)
                continue
            (link,) = _LINK.unpack(data)
            for fd in fds:
                self.links[link] = fd
                self.by_fd[fd] = link
                # Hang-ups only: a caller's next request (readable data) is the worker's to read.
                self.poller.register(fd, _HANGUP)

    def _hung_up(self, fd: int) -> None:
        """A caller closed its link (or its process died): what runs for it must end."""
        try:
            self.poller.unregister(fd)
        except KeyError:
            pass
        link = self.by_fd.pop(fd, None)
        if link is not None:
            self.hung.setdefault(link, time.monotonic())
            self.links.pop(link, None)
        os.close(fd)

    def _look(self, now: float) -> None:
        view = self.view
        used = min(int(view[0]), self.slots)
        overdue: dict[int, float] = {}
        hung_calls: dict[tuple[int, float, float], float] = {}
        running_links = set()
        for slot in range(used):
            base = (1 + slot) * _DOUBLES_PER_SLOT
            deadline = view[base]
            link = view[base + 1]
            if deadline == 0.0 or link == 0.0:  # free, or a call still queued
                continue
            if link > 0:
                running_links.add(int(link))
            if now > deadline + self.allowance:
                # Seen past it twice: a torn read of a slot being rewritten never kills.
                if self.overdue.get(slot) == deadline:
                    self._kill(f"a call passed its deadline {now - deadline:.1f} s ago and did not stop "
                               f"(code that holds the interpreter, e.g. a C loop)")
                overdue[slot] = deadline
            if link > 0 and int(link) in self.hung:
                key = (slot, deadline, link)
                since = self.hung_calls.get(key, now)
                hung_calls[key] = since
                if now - since > self.hangup_allowance:
                    self._kill(f"the caller of a running call went away {now - since:.1f} s ago and the "
                               f"call did not stop")
        self.overdue, self.hung_calls = overdue, hung_calls
        for link, since in list(self.hung.items()):  # links whose callers left long ago: forgotten
            if link not in running_links and now - since > 60:
                del self.hung[link]

    def _kill(self, why: str, replaced: bool = True) -> None:
        if os.getppid() == self.worker:  # still our parent, so still the worker (its pid not reused)
            then = " (its nanny starts a fresh one)" if replaced else ""
            print(f"kaas supervisor: {why}; killing worker process {self.worker}{then}", file=sys.stderr, flush=True)
            os.kill(self.worker, signal.SIGKILL)
        sys.exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kaas-supervisor")
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--board", type=int, required=True)
    parser.add_argument("--slots", type=int, required=True)
    parser.add_argument("--channel", type=int, required=True)
    parser.add_argument("--allowance", type=float, required=True)
    parser.add_argument("--hangup-allowance", type=float, required=True)
    parser.add_argument("--owner", default="")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the notebook's interrupt reaches its whole group
    try:
        _Watch(args).run()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
