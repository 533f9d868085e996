"""What one call runs within (``call_scope``: the hot path, a few microseconds per call),
and the per-thread state it resets: the link thread's ``contextvars`` context, trace and
profile functions, and the error state of NumPy < 2."""

from __future__ import annotations

import contextvars
import ctypes
import sys

from .calls import _Call, _current, logger
from .compared import _end_compared, _start_compared, _sysdict
from .fs import _own_working_directory
from .tracked import _put_back, _track_jax

# --- contextvars: a fresh context per call ----------------------------------------------
# A link thread runs its calls in a context of its own, entered once, and replaced by a
# fresh one only when a call left a variable set in it (len() says): entering a context
# from outside Context.run takes the C API, through ctypes.

_context_enter = ctypes.pythonapi.PyContext_Enter
_context_enter.argtypes, _context_enter.restype = [ctypes.py_object], ctypes.c_int
_context_exit = ctypes.pythonapi.PyContext_Exit
_context_exit.argtypes, _context_exit.restype = [ctypes.py_object], ctypes.c_int


def _fresh_context() -> None:
    context = _current.context
    if context is not None:
        _current.context = None
        _context_exit(context)
    context = contextvars.Context()
    _context_enter(context)
    _current.context = context


# NumPy < 2 keeps its error state per thread, not in a context variable: the link thread's
# is put back after each call instead.
def _numpy_thread_errstate():
    numpy = sys.modules.get("numpy")
    if numpy is None:
        return None
    config = sys.modules.get("numpy._core._ufunc_config") or sys.modules.get("numpy.core._ufunc_config")
    if config is not None and hasattr(config, "_extobj_contextvar"):
        return None
    return numpy


_old_numpy = None  # NumPy < 2, when the worker has it (set by install())
_jax_tracked = False  # JAX's flags are tracked (see tracked._track_jax)


# --- the call scope ---------------------------------------------------------------------


class call_scope(_Call):
    """What one call runs within: ``with call_scope(sink, progress): ...`` or, where a
    ``with`` does not fit, ``scope.enter()`` ... ``scope.exit()`` (in a ``finally``).
    ``sink(name, text)`` takes the call's print output ("stdout", "stderr") and, when
    ``progress``, its states ("state"; see report_state)."""

    __slots__ = ()

    def enter(self) -> "call_scope":
        global _jax_tracked
        if not _jax_tracked and _track_jax():
            _jax_tracked = True
        _start_compared(self)
        try:
            self.fs = _own_working_directory()
        except OSError:
            logger.exception("kaas could not give a call its own working directory")
        context = _current.context
        if context is None or len(context):  # the first call in this thread, or something set
            _fresh_context()
        self.trace, self.profile = sys.gettrace(), sys.getprofile()
        if _old_numpy is not None:
            self.errstate = _old_numpy.geterr()
        self.previous = _current.call
        _current.call = self
        return self

    def exit(self) -> None:
        global _jax_tracked
        self.done = True
        _current.call = self.previous
        self.previous = None
        context = _current.context
        if context is not None and len(context):  # the call set a context variable: not the next one
            try:
                _fresh_context()
            except Exception:  # the cell left a context of its own entered (it cannot, from Python)
                logger.exception("kaas could not leave a call's context")
        if sys.gettrace() is not self.trace:  # per thread: the link thread's next call starts clean
            sys.settrace(self.trace)
        if sys.getprofile() is not self.profile:
            sys.setprofile(self.profile)
        if _old_numpy is not None and _old_numpy.geterr() != self.errstate:
            _old_numpy.seterr(**self.errstate)
        if self.changed:
            _put_back(self)
        if not _jax_tracked and _track_jax():
            _jax_tracked = True
        _end_compared(self)
        try:
            _sysdict["stdout"].flush()
        except Exception:
            pass

    __enter__ = enter

    def __exit__(self, *exc_info) -> None:
        self.exit()
