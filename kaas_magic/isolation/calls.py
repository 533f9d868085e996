"""The call context: which call the calling thread works for, and what that call sees.

A thread's call is a ``threading.local`` attribute (``_current.call``), set by
``call_scope`` (see scope) in the link thread and handed to the threads and executor tasks
the call starts (see threads). Every other module of this package reads it from here.
"""

from __future__ import annotations

import contextvars
import logging
import threading

logger = logging.getLogger("kaas_magic.isolation")

_NO = object()  # no override / a variable not set


class _Local(threading.local):
    call: "_Call | None" = None  # the call this thread works for
    # A link thread's own working directory (unshare): [moved since the last call started].
    fs: "list[bool] | None" = None
    context: "contextvars.Context | None" = None  # the fresh context a link thread's calls run in


_current = _Local()


class _Call:
    """What one call sees of the process: where its print output goes, and the values it
    gave to isolated attributes (``over``: module attribute name -> value)."""

    __slots__ = ("sink", "progress", "over", "done", "changed", "snap", "fs", "previous", "trace", "profile",
                 "errstate", "env")

    def __init__(self, sink, progress: bool = False):
        self.sink = sink
        self.progress = progress
        self.over: dict = {}
        self.done = False  # ended: its leftover threads write to the worker's own streams
        self.changed: set | None = None  # keys of tracked settings this call changed
        self.snap: tuple = ()
        self.fs = None  # the link thread's working directory, which the call's threads share
        self.previous = None
        self.trace = self.profile = self.errstate = None
        self.env: dict | None = None  # variables this call set (or removed: _NO), seen by it alone


def current_call() -> _Call | None:
    return _current.call


def report_state(state: str) -> None:
    """Tell the calling notebook what its call is doing now ("running", "compiling"), when
    it asked to be told (a live view is showing the call)."""
    call = _current.call
    if call is not None and call.progress and not call.done:
        call.sink("state", state)
