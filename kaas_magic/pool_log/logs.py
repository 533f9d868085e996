"""The pool logs, one per pool opened in this process: :class:`PoolLog` (its folder, its
``pool.log``, the pool loggers writing there while it is open), :class:`WorkerFile` (a worker
process's file in that folder), :class:`LogView` (what ``%kaas log`` shows); and the registry
of open and recently closed pool logs behind :func:`open_log`, :func:`adopt`, :func:`take`,
:func:`worker_directory_of`, :func:`current`, :func:`show` and :func:`path`.

The registry (``_registry_lock``, ``_open``, ``_history``, ``_adopted``) exists once, here.
"""

from __future__ import annotations

import collections
import html
import logging
import os
import re
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from .. import config as kaas_config  # cheap: Dask's config is read only when asked
from .folders import ENV_DIR, KERNEL_FILE, REMOTE_FOLDER, WORKER_PREFIX, _records_setting, new_pool_directory
from .records import Entry, _store, _swap, mark, note, since

_HEADER = re.compile(r"^==== kaas worker name=(\S*) address=(\S*) pid=(\d+)")
_TAIL_BYTES = 256 * 1024
_HISTORY = 8  # closed pool logs remembered, for show() after a pool closed


class PoolLog:
    """The log of one pool opened in this process: its folder, its ``pool.log``, and while
    it is open, this process's pool loggers writing there instead of to stderr."""

    def __init__(self, embedded: bool, directory: Path | None = None, address: str | None = None):
        self.embedded = embedded
        self.address = address
        self.directory = Path(directory) if directory is not None else new_pool_directory()
        # Whether the workers write their output here (kaas.pool.log.worker-output: file).
        self.worker_output = embedded and str(kaas_config.get("pool.log.worker-output") or "").lower() == "file"
        # Where this pool's workers' files are, when this process can read them: an embedded
        # pool's own folder (or, for a connection to an embedded pool of this process, its).
        self.worker_directory: Path | None = self.directory if self.worker_output else None
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.file_path = self.directory / KERNEL_FILE
        fd = os.open(self.file_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace", buffering=1)
        self.opened_at = time.time()
        self.closed_at: float | None = None
        _store.resize(_records_setting())
        with _store.lock:
            self.first_seq = _store.seq + 1
            self.last_seq: int | None = None
            _store.files.append(self._file)
        _swap.acquire()
        with _registry_lock:
            _open.append(self)
            _history.append(self)

    @property
    def closed(self) -> bool:
        return self.closed_at is not None

    def worker_environment(self) -> dict[str, str]:
        """What the nannies put in their worker processes' environment: this folder."""
        return {ENV_DIR: str(self.directory)}

    def close(self) -> None:
        """Give the pool loggers back their handlers (once no pool is open) and close the file."""
        with _registry_lock:
            if self.closed_at is not None:
                return
            self.closed_at = time.time()
            if self in _open:
                _open.remove(self)
        _swap.release()
        with _store.lock:
            self.last_seq = _store.seq
            if self._file in _store.files:
                _store.files.remove(self._file)
            self._file.close()

    def records(self) -> list[Entry]:
        """This process's records of the pool's lifetime still in memory."""
        with _store.lock:
            last = self.last_seq if self.last_seq is not None else _store.seq
            return [e for e in _store.records if self.first_seq <= e.seq <= last]

    def mark(self) -> int:
        return mark()

    def since(self, mark: int) -> list[str]:
        return since(mark)

    def note(self, mark: int) -> str | None:
        return note(mark)

    def worker_files(self) -> list["WorkerFile"]:
        """The workers' files in this pool's folder, oldest first (embedded pools only: a
        remote pool's workers write on their own hosts)."""
        if self.worker_directory is None:
            return []
        files = []
        for p in self.worker_directory.glob(f"{WORKER_PREFIX}*.log"):
            try:
                files.append((p.stat().st_mtime, p))
            except OSError:
                continue
        return [WorkerFile.read_header(p) for _, p in sorted(files)]

    def show(self, lines: int = 50) -> "LogView":
        return LogView(self, lines)

    def __repr__(self) -> str:
        kind = "embedded" if self.embedded else "connected"
        state = "closed" if self.closed else "open"
        return f"<kaas PoolLog {kind} {state} {self.directory}>"


@dataclass
class WorkerFile:
    path: Path
    pid: int | None
    name: str
    address: str

    @classmethod
    def read_header(cls, path: Path) -> "WorkerFile":
        pid = None
        m = re.match(rf"{WORKER_PREFIX}(\d+)\.log$", path.name)
        if m:
            pid = int(m.group(1))
        name = address = ""
        try:
            with open(path, "rb") as f:
                head = f.read(16384).decode("utf-8", "replace")
            for line in head.splitlines():
                h = _HEADER.match(line)
                if h:
                    name, address = h.group(1), h.group(2)
                    break
        except OSError:
            pass
        return cls(path, pid, name, address)

    def alive(self) -> bool:
        if self.pid is None:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        try:  # exited, not yet reaped by its nanny
            with open(f"/proc/{self.pid}/stat", "rb") as f:
                state = f.read().decode(errors="replace")
            return state[state.rindex(")") + 2:].split()[0] not in ("Z", "X")
        except (OSError, ValueError, IndexError):
            return True

    def tail(self, lines: int) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - _TAIL_BYTES))
                data = f.read().decode("utf-8", "replace")
        except OSError as e:
            return [f"(could not read {self.path}: {e})"]
        found = data.splitlines()
        if size > _TAIL_BYTES and found:
            found = found[1:]  # a partial first line
        return found[-lines:] if lines > 0 else []

    def title(self) -> str:
        who = " ".join(["worker", self.name, self.address]).replace("  ", " ").rstrip()
        state = "running" if self.alive() else "exited"
        return f"{who} (pid {self.pid}, {state}): {self.path.name}"


class LogView:
    """What ``%kaas log`` shows: the last ``lines`` records of this process's pool loggers
    and the last ``lines`` lines of each worker's file, with where the files are."""

    def __init__(self, log: PoolLog | None, lines: int = 50):
        self.log = log
        self.lines = max(0, int(lines))
        self.sections: list[tuple[str, list[str]]] = []
        self.header = ""
        if log is None:
            self.header = "kaas pool log: no pool has been opened in this process"
            return
        kind = "embedded pool" if log.embedded else "connected pool"
        state = "closed" if log.closed else "open"
        self.header = f"kaas pool log of the {kind} {log.address or ''} ({state}): {log.directory}"
        records = log.records()
        shown = records[-self.lines:] if self.lines else []
        warnings = sum(1 for e in records if e.levelno >= logging.WARNING)
        text = [line for e in shown for line in e.text.splitlines()]
        self.sections.append((f"this process (the notebook): last {len(shown)} of {len(records)} records in memory, "
                              f"{warnings} warnings or errors; all in {log.file_path.name}", text))
        if log.worker_directory is not None:
            files = log.worker_files()
            where = "" if log.worker_directory == log.directory else f" in {log.worker_directory}"
            if not files:
                self.sections.append((f"workers: no worker file yet{where}", []))
            for wf in files:
                self.sections.append((wf.title() + where, wf.tail(self.lines)))
        elif log.embedded:
            self.sections.append(("workers: their output is not collected (kaas.pool.log.worker-output is not "
                                  "'file'): it goes where this process's stderr goes", []))
        else:
            self.sections.append((
                "workers: this pool's workers are not this process's; their output (fd 1 and 2, "
                f"their logs) is in files on their own hosts ({REMOTE_FOLDER}/{WORKER_PREFIX}<pid>.log under "
                "kaas.pool.log.dir there, else under the temporary folder). Only this process's records are shown.",
                []))

    def __str__(self) -> str:
        out = [self.header]
        for title, lines in self.sections:
            out.append(f"--- {title} ---")
            out.extend(lines)
        return "\n".join(out)

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(str(self))

    def _repr_html_(self) -> str:
        parts = [f"<div class='kaas-pool-log'><b>{html.escape(self.header)}</b>"]
        for title, lines in self.sections:
            parts.append(f"<div class='kaas-pool-log-title'>{html.escape(title)}</div>")
            if lines:
                parts.append("<pre style='max-height:30em;overflow:auto;font-size:85%'>"
                             + html.escape("\n".join(lines)) + "</pre>")
        parts.append("</div>")
        return "".join(parts)

    def __repr__(self) -> str:
        return str(self)


_registry_lock = threading.Lock()
_open: list[PoolLog] = []
_history: collections.deque[PoolLog] = collections.deque(maxlen=_HISTORY)
_adopted: "weakref.WeakKeyDictionary[object, PoolLog]" = weakref.WeakKeyDictionary()


def open_log(embedded: bool, address: str | None = None) -> PoolLog:
    """A new pool log, open (see PoolLog): before the pool starts, so its first lines are in it."""
    return PoolLog(embedded, address=address)


def adopt(client, log: PoolLog) -> None:
    """Remember that ``client``'s pool logs to ``log`` (see take)."""
    _adopted[client] = log


def take(client, embedded: bool) -> PoolLog:
    """The log opened for ``client``'s pool (cluster.start_cluster, connect_client), or a
    new one for a client made elsewhere."""
    log = _adopted.pop(client, None)
    if log is None or log.closed:
        address = getattr(getattr(client, "scheduler", None), "address", None)
        log = open_log(embedded, address)
    return log


def worker_directory_of(address: str) -> Path | None:
    """The workers' folder of the embedded pool of this process at scheduler ``address``."""
    with _registry_lock:
        for log in reversed(_history):
            if log.embedded and log.address == address and not log.closed:
                return log.worker_directory
    return None


def current() -> PoolLog | None:
    """The default pool's log, else the newest open one, else the newest closed one."""
    import kaas_magic

    pool = getattr(kaas_magic, "_pool", None)
    log = getattr(pool, "pool_log", None)
    if isinstance(log, PoolLog):
        return log
    with _registry_lock:
        if _open:
            return _open[-1]
        return _history[-1] if _history else None


def show(lines: int = 50) -> LogView:
    """The current pool's log (see current): what ``%kaas log`` displays."""
    return LogView(current(), lines)


def path() -> Path | None:
    """The current pool's log folder (see current), or None."""
    log = current()
    return log.directory if log is not None else None
