"""Threads and executor tasks a call starts work for it: ``Thread.start`` hands the starting
call to the new thread, ``ThreadPoolExecutor.submit`` runs the task for the submitting call."""

from __future__ import annotations

import concurrent.futures.thread
import threading

from .calls import _Call, _current


def _patch_threads() -> None:
    thread = threading.Thread
    if getattr(thread.start, "_kaas", False):
        return
    start, bootstrap_inner = thread.start, thread._bootstrap_inner

    def start_for_call(self):
        self._kaas_call = _current.call
        return start(self)

    def bootstrap_for_call(self):
        call = self.__dict__.get("_kaas_call")
        if call is not None:
            _current.call = call
        return bootstrap_inner(self)

    start_for_call._kaas = True
    start_for_call.__wrapped__ = start
    thread.start = start_for_call
    thread._bootstrap_inner = bootstrap_for_call

    executor = concurrent.futures.thread.ThreadPoolExecutor
    submit = executor.submit

    def submit_for_call(self, fn, /, *args, **kwargs):
        call = _current.call
        if call is not None:
            fn = _bound(call, fn)
        return submit(self, fn, *args, **kwargs)

    submit_for_call.__wrapped__ = submit
    submit_for_call.__doc__ = submit.__doc__
    executor.submit = submit_for_call


def _bound(call: _Call, fn):
    def run(*args, **kwargs):
        previous = _current.call
        _current.call = call
        try:
            return fn(*args, **kwargs)
        finally:
            _current.call = previous

    return run
