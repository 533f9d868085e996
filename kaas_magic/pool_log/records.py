"""The records of this process: while any pool is open, the records of the pool loggers
(``distributed``, ``dask``, ``tornado``, ``kaas_magic``) go to a bounded store in memory and
to each open pool log's file instead of to stderr (:class:`PoolLogHandler`,
:class:`HandlerSwap`); :func:`mark`, :func:`since` and :func:`note` tell the call path which
warnings were logged during a call.

The store, its handler and the swap (``_store``, ``_handler``, ``_swap``) exist once, here:
every other module uses these very objects.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
from dataclasses import dataclass
from typing import Iterable

# The loggers whose records are the pool's, not the user's.
LOGGERS = ("distributed", "dask", "tornado", "kaas_magic")
# Dask's own format (distributed.admin.log-format), so lines read as they used to.
FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"
_SUMMARY_CHARS = 160
_DEFAULT_RECORDS = 2000


@dataclass(frozen=True)
class Entry:
    """One record of this process's pool loggers."""

    seq: int  # 1, 2, ... in this process
    warning_seq: int  # its number among warnings and errors (0: below WARNING)
    created: float
    levelno: int
    name: str
    text: str  # formatted as Dask formats it (several lines with a traceback)
    summary: str  # one line: "logger: first line of the message"


class _Store:
    """The records of this process: a bounded buffer, the warnings among them, counters."""

    def __init__(self, maxlen: int = _DEFAULT_RECORDS):
        self.lock = threading.RLock()
        self.records: collections.deque[Entry] = collections.deque(maxlen=maxlen)
        self.warnings: collections.deque[Entry] = collections.deque(maxlen=maxlen)
        self.seq = 0
        self.warning_count = 0
        self.files: list = []  # open pool logs' files: each record is written to each

    def resize(self, maxlen: int) -> None:
        with self.lock:
            if maxlen != self.records.maxlen:
                self.records = collections.deque(self.records, maxlen=maxlen)
                self.warnings = collections.deque(self.warnings, maxlen=maxlen)

    def add(self, record: logging.LogRecord, text: str) -> Entry:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is still a record
            message = str(record.msg)
        first = (message.strip().splitlines() or [""])[0]
        summary = f"{record.name}: {first}"
        if len(summary) > _SUMMARY_CHARS:
            summary = summary[:_SUMMARY_CHARS - 1] + "…"
        with self.lock:
            self.seq += 1
            warning_seq = 0
            if record.levelno >= logging.WARNING:
                self.warning_count += 1
                warning_seq = self.warning_count
            entry = Entry(self.seq, warning_seq, record.created, record.levelno, record.name, text, summary)
            self.records.append(entry)
            if warning_seq:
                self.warnings.append(entry)
            for f in self.files:
                try:
                    f.write(text + "\n")
                    f.flush()
                except (OSError, ValueError):  # a full disk, a closed file: memory still has it
                    pass
        return entry


_store = _Store()


class PoolLogHandler(logging.Handler):
    """Hands each record to the store (memory and the open pool logs' files). Never writes
    to a stream, and never raises: a failing record is dropped, not printed to stderr."""

    def __init__(self, store: _Store | None = None):
        super().__init__()
        self.store = store if store is not None else _store
        self.setFormatter(logging.Formatter(FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001
            text = f"{record.name} - {record.levelname} - {record.msg!r} (could not be formatted)"
        try:
            self.store.add(record, text)
        except Exception:  # noqa: BLE001
            pass

    def handleError(self, record: logging.LogRecord) -> None:  # never to sys.stderr
        pass


def _std_streams() -> list:
    found = []
    for name in ("stdout", "stderr", "__stdout__", "__stderr__"):
        value = sys.__dict__.get(name)  # sys.__dict__: past any isolation property
        if value is not None:
            found.append(value)
    return found


def writes_to_std_stream(handler: logging.Handler) -> bool:
    """Whether ``handler`` writes to this process's stdout or stderr (a Python stream object
    such as ipykernel's, or one on file descriptor 1 or 2): distributed's own handlers do."""
    if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
        return False
    stream = getattr(handler, "stream", None)
    if stream is None:
        return False
    if any(stream is s for s in _std_streams()):
        return True
    if type(stream).__name__ == "OutStream":  # ipykernel's stdout/stderr
        return True
    try:
        return stream.fileno() in (1, 2)
    except Exception:  # noqa: BLE001 - no descriptor (a StringIO): not stderr
        return False


def _hierarchy(names: Iterable[str]) -> list[logging.Logger]:
    """The loggers ``names`` and every existing logger below them."""
    names = tuple(names)
    found = [logging.getLogger(n) for n in names]
    for key, value in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(value, logging.Logger) and any(key.startswith(n + ".") for n in names):
            found.append(value)
    return found


class HandlerSwap:
    """While held (refcounted: one hold per open pool), the loggers ``names`` and those
    below them lose their handlers that write to stdout/stderr, and ``handler`` takes
    records instead: on each of ``names``, and on each logger below them that does not
    propagate (``tornado.application``). The last release puts everything back."""

    def __init__(self, handler: logging.Handler, names: Iterable[str] = LOGGERS):
        self.handler = handler
        self.names = tuple(names)
        self.count = 0
        self.detached: list[tuple[logging.Logger, int, logging.Handler]] = []  # and where it was
        self.added: list[logging.Logger] = []
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            self.count += 1
            if self.count == 1:
                self._swap()

    def release(self) -> None:
        with self._lock:
            if self.count == 0:
                return
            self.count -= 1
            if self.count == 0:
                self._restore()

    def _swap(self) -> None:
        tops = {logging.getLogger(n) for n in self.names}
        for logger in _hierarchy(self.names):
            for index, h in enumerate(list(logger.handlers)):
                if h is not self.handler and writes_to_std_stream(h):
                    logger.removeHandler(h)
                    self.detached.append((logger, index, h))
            if (logger in tops or not logger.propagate) and self.handler not in logger.handlers:
                logger.addHandler(self.handler)
                self.added.append(logger)

    def _restore(self) -> None:
        for logger in self.added:
            logger.removeHandler(self.handler)
        back: dict[logging.Logger, list[tuple[int, logging.Handler]]] = {}
        for logger, index, h in self.detached:
            back.setdefault(logger, []).append((index, h))
        for logger, handlers in back.items():  # each where it was (handlers added since: kept)
            order = [h for h in logger.handlers]
            for index, h in sorted(handlers, key=lambda pair: pair[0]):
                if h not in order:
                    order.insert(min(index, len(order)), h)
            for h in list(logger.handlers):
                logger.removeHandler(h)
            for h in order:
                logger.addHandler(h)
        self.added, self.detached = [], []


_handler = PoolLogHandler(_store)
_swap = HandlerSwap(_handler)


def mark() -> int:
    """A mark: how many warnings and errors this process's pool loggers have logged so far
    (process-wide: the records of every pool open here count; they cannot be told apart)."""
    with _store.lock:
        return _store.warning_count


def since(mark: int) -> list[str]:
    """One line per warning or error logged after ``mark`` (oldest first; at most the last
    ``kaas.pool.log.records`` of them), e.g. ``"distributed.nanny: Restarting worker"``."""
    with _store.lock:
        return [e.summary for e in _store.warnings if e.warning_seq > mark]


def note(mark: int) -> str | None:
    """The line a run view shows for warnings logged since ``mark``, or None: e.g.
    ``1 pool warning: distributed.nanny: Restarting worker (see %kaas log)``."""
    with _store.lock:
        count = _store.warning_count - mark
        if count <= 0:
            return None
        found = since(mark)
    last = found[-1] if found else "(no longer in memory)"
    return f"{count} pool warning{'s' if count != 1 else ''}: {last} (see %kaas log)"
