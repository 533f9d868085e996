"""One notebook's cell never reaches another notebook: process-wide state, per call.

A worker runs the cells of many notebooks at once, each call in the thread of its caller's
link (see fastlink), all in one process. Python keeps much state per process: the standard
streams, the working directory, warning filters, the environment, framework flags. Left
alone, one cell that changes any of it changes it for every other notebook's calls on that
worker (``sys.stdout = None`` there and every later call fails). Here each call gets its own
view where that is possible, and its changes are undone after it where it is not:

* **Isolated** (concurrent calls cannot see it): ``sys.stdout`` / ``sys.stderr`` (assigned,
  closed, ``contextlib.redirect_stdout``), print output (routed to the call that printed,
  from the threads and executors it starts too), the working directory and umask (the link
  thread gets its own with ``unshare(CLONE_FS)``), context variables (each call runs in a
  fresh ``contextvars.Context``: NumPy's error state and print options, ``decimal``
  contexts), ``warnings`` filters and ``showwarning`` (``catch_warnings`` included), the
  environment as Python code sees it (``os.environ``: an overlay per call).
* **Restored** after the call that changed it (overlapping calls can see it meanwhile):
  the process's environment (what C code and child processes read), JAX's global flags, the
  locale, ``sys.path``, the root logger, hooks (``sys.excepthook`` ...), limits
  (recursion, switch interval, integer digits), the default socket timeout, the garbage
  collector's switch and thresholds, faulthandler's switch, trace and profile functions.

``docs/isolation.md`` lists what is handled how, and what is not, with the tests that show it.

How, at little cost to a warm call:

* The ``sys`` and ``warnings`` modules get a ``ModuleType`` subclass as their class (allowed
  since Python 3.5) whose properties answer the calling thread's call's own value; what a
  cell assigns inside a call is kept in its call. C code (``print``, tracebacks, the C
  warnings machinery) reads ``sys.stdout`` from the module dictionary, where a routed stream
  sends the text where the call's view says, and the warning filters as attributes.
* A thread's call is a ``threading.local`` attribute, handed to the threads a call starts
  (``Thread.start``) and to the tasks it submits to executors (``ThreadPoolExecutor.submit``).
* Settings changed through a function or an attribute of ``sys`` (``os.environ[...] =``,
  ``jax.config.update``, ``locale.setlocale``, ``sys.setrecursionlimit``, ``gc.disable``,
  ``sys.excepthook =`` ...) are tracked as they change, at no cost until one does: the call
  that changed one is known, and the value from before is put back when the last call that
  changed it ends. The few changed by mutating a list or an attribute elsewhere (``sys.path``,
  the root logger, ``threading.excepthook``) are compared at the start and end of each call:
  one found changed is put back to the worker's value once no call that may have changed it
  is running.
* A link thread enters a context of its own once and replaces it only when a call left a
  context variable set; it moves back to the worker's directory only when a cell called
  ``os.chdir``/``fchdir``/``umask``.

The modules, one job each (``install()`` here puts them in place):

* ``calls``: the call context (``_Call``, the calling thread's call ``_current.call``,
  ``current_call``, ``report_state``).
* ``scope``: ``call_scope``, what each call runs within (the hot path), with the link
  thread's ``contextvars`` context, trace/profile functions and NumPy < 2 error state.
* ``modules``: per-call attributes of a module (the properties of ``sys``'s and
  ``warnings``'s class, pickled by name).
* ``streams``: print output routed by call; the ``sys`` module's class.
* ``warnings_``: the ``warnings`` module's class and functions.
* ``threads``: ``Thread.start`` and ``ThreadPoolExecutor.submit`` hand the call on.
* ``tracked``: settings tracked as they change (environment overlay, locale, JAX flags,
  ``sys`` hooks and limits, ...).
* ``compared``: settings compared at the start and end of each call.
* ``fs``: the link thread's own working directory and umask (``unshare(CLONE_FS)``).
"""

from __future__ import annotations

from . import compared, fs, scope

# Re-exported (noqa: F401): kaas_magic.isolation.X is the very object its module defines, never a copy.
from .calls import _NO, _Call, _current, _Local, current_call, logger, report_state  # noqa: F401
from .compared import _NAMES, _RESTORE, _dirty, _end_compared, _in_flight, _root, _set_handlers  # noqa: F401
from .compared import _snapshot, _start_compared, _sysdict  # noqa: F401
from .fs import CLONE_FS, _own_working_directory, _probe_unshare, _watch_working_directory, fs_isolated  # noqa: F401
from .modules import _isolated_property, _IsolatedModule  # noqa: F401
from .scope import _context_enter, _context_exit, _fresh_context, _numpy_thread_errstate, call_scope  # noqa: F401
from .streams import _isolate_sys, _RoutedStream  # noqa: F401
from .threads import _bound, _patch_threads  # noqa: F401
from .tracked import _call_changes, _changed, _changed_outside, _lock, _put_back, _TrackedEnviron  # noqa: F401
from .tracked import _track_environ, _track_functions, _track_jax, _track_locale  # noqa: F401
from .tracked import _tracked_function, _tracked_property  # noqa: F401
from .warnings_ import _isolate_warnings  # noqa: F401

_installed = False


def install() -> None:
    """Once per worker process, at start: route the standard streams, make ``sys`` and
    ``warnings`` per call, and track the settings that are restored after calls."""
    global _installed
    if _installed:
        return
    _installed = True
    _isolate_sys()
    _isolate_warnings()
    _patch_threads()
    _track_environ()
    _track_locale()
    _track_functions()
    scope._jax_tracked = _track_jax()
    scope._old_numpy = _numpy_thread_errstate()
    fs._setup()
    compared._baseline = _snapshot()


# State rebound after import lives in its own module alone: read here, it is that module's
# current value (never a copy taken at import).
_REBOUND = {"_fs_private_ok": fs, "_base_fd": fs, "_base_umask": fs, "_unshare": fs, "_jax_tracked": scope,
            "_baseline": compared, "_old_numpy": scope}


def __getattr__(name: str):
    module = _REBOUND.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(module, name)
