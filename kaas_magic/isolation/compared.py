"""Settings compared at the start and end of each call: those changed by mutating a list or
an attribute elsewhere (``sys.path``, the root logger, ``threading.excepthook``, and the
working directory where unshare is unavailable). One found changed is put back to the
worker's value once no call that may have changed it is running."""

from __future__ import annotations

import logging
import os
import sys
import threading

from . import fs as _fs
from .calls import _Call, logger
from .tracked import _lock


_sysdict = sys.__dict__
_root = logging.getLogger()


def _snapshot(d=_sysdict, t=threading.__dict__, root=_root, manager=_root.manager, tuple=tuple,
              fs=_fs) -> tuple:
    path = d["path"]
    return (path, tuple(path), t["excepthook"], root.level, tuple(root.handlers), manager.disable,
            None if fs._fs_private_ok else os.getcwd())


def _set_handlers(handlers) -> None:
    _root.handlers[:] = handlers


# How to put back each entry of _snapshot(), in its order.
_RESTORE = (
    lambda v: _sysdict.__setitem__("path", v), lambda v: _sysdict["path"].__setitem__(slice(None), v),
    lambda v: setattr(threading, "excepthook", v), _root.setLevel, _set_handlers, logging.disable,
    lambda v: os.chdir(v),
)
_NAMES = ("sys.path", "sys.path", "threading.excepthook", "root logger level", "root logger handlers",
          "logging.disable", "working directory")

_baseline: tuple = ()
_in_flight: set = set()
_dirty: dict[int, set] = {}  # entry of _snapshot() -> running calls that may have changed it


def _start_compared(call: _Call) -> None:
    global _baseline
    snap = _snapshot()
    with _lock:
        if not _in_flight:  # what changed while no call ran is the worker's own doing
            _baseline = snap
        call.snap = snap
        _in_flight.add(call)


def _end_compared(call: _Call) -> None:
    now = _snapshot()
    restore = []
    with _lock:
        _in_flight.discard(call)
        if now == call.snap and not _dirty:
            return
        for i, (value, before) in enumerate(zip(now, call.snap)):
            suspects = _dirty.get(i)
            if value != before and value != _baseline[i]:  # changed while this call ran
                if suspects is None:
                    suspects = _dirty[i] = set()
                # Calls that started before the change may have made it too: it stays until
                # they end. Calls that started after it saw it already and did not.
                suspects.update(c for c in _in_flight if c.snap[i] != value)
            if suspects is not None:
                suspects.discard(call)
                if not suspects:
                    del _dirty[i]
                    if value != _baseline[i]:
                        restore.append(i)
        baseline = _baseline
    for i in restore:
        try:
            _RESTORE[i](baseline[i])
        except Exception:
            logger.exception("kaas could not restore the %s after a call", _NAMES[i])
