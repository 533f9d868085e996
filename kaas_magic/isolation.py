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
  the process's environment (what C code and child processes read), JAX's global flags, the locale, ``sys.path``, the root logger, hooks
  (``sys.excepthook`` ...), limits (recursion, switch interval, integer digits), the default
  socket timeout, the garbage collector's switch and thresholds, faulthandler's switch,
  trace and profile functions.

``docs/isolation.md`` lists what is handled how, and what is not, with the tests that show it.

How, cheaply (a warm call costs about 0.15 ms; this adds a few microseconds):

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
"""

from __future__ import annotations

import concurrent.futures.thread
import contextvars
import ctypes
import faulthandler
import gc
import importlib
import io
import locale
import logging
import os
import socket
import sys
import threading
import types
import warnings

logger = logging.getLogger("kaas_magic.isolation")

CLONE_FS = 0x00000200

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


# --- print output: routed by call ------------------------------------------------------


class _RoutedStream(io.TextIOBase):
    """Text written by a thread working for a call goes to that call's sink; anything else
    to the worker's original stream. Two per stream: the one in ``sys.__dict__`` (what C
    code such as ``print`` writes to) follows the call's own ``sys.stdout`` when the cell
    assigned one; the one cells get from ``sys.stdout`` does not (so a cell's replacement
    that writes on to the stream it replaced does not write to itself)."""

    def __init__(self, original, name: str, follow: bool):
        self.original = original
        self.name = name
        self.follow = follow

    def write(self, text: str) -> int:
        call = _current.call
        if call is None:
            return self.original.write(text)
        if self.follow and call.over:
            target = call.over.get(self.name, _NO)
            if target is not _NO:
                if target is None:  # as print does when sys.stdout is None
                    return len(text)
                return target.write(text)
        if call.done:  # a thread the call left running: never another call's output
            return self.original.write(text)
        call.sink(self.name, text)
        return len(text)

    def flush(self) -> None:
        call = _current.call
        if call is None or call.done:
            self.original.flush()
        elif self.follow and call.over:
            target = call.over.get(self.name)
            if target is not None and hasattr(target, "flush"):
                target.flush()

    def close(self) -> None:  # a cell's sys.stdout.close() closes nothing for anyone
        pass

    @property
    def closed(self) -> bool:  # type: ignore[override]
        return False

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self):  # type: ignore[override]
        return getattr(self.original, "encoding", "utf-8")

    @property
    def errors(self):  # type: ignore[override]
        return getattr(self.original, "errors", "strict")


# --- modules whose attributes are per call ---------------------------------------------


def _isolated_property(module: types.ModuleType, name: str, in_call=None, plain=None, copy=None):
    """A property for ``module.name``: inside a call, the value the call assigned, else
    ``in_call`` (when given), else the module's; outside calls, the module's. Assigning
    inside a call changes the call's value only. ``plain`` maps the module's value to what
    Python code gets (the routed stream without override-following); ``copy`` makes the
    call's own value on first use (so that mutating it stays in the call)."""
    namespace = module.__dict__

    def get(_module):
        call = _current.call
        if call is not None:
            value = call.over.get(name, _NO)
            if value is not _NO:
                return value
            if copy is not None:
                value = call.over[name] = copy(namespace[name])
                return value
            if in_call is not None:
                return in_call
        value = namespace[name]
        if plain is not None and value is plain[0]:
            return plain[1]
        return value

    def set_(_module, value):
        call = _current.call
        if call is None:
            namespace[name] = plain[0] if plain is not None and value is plain[1] else value
        elif (plain is not None and (value is plain[0] or value is plain[1])) or (
                in_call is not None and value is in_call):
            call.over.pop(name, None)  # back to the call's routed stream
        else:
            call.over[name] = value

    def delete(_module):
        call = _current.call
        if call is None:
            del namespace[name]
        else:
            call.over[name] = None

    return property(get, set_, delete)


def _tracked_property(module: types.ModuleType, name: str):
    """A property for ``module.name`` that a call may assign (for everyone), put back when
    the call ends (see _call_changes)."""
    namespace = module.__dict__
    key = (module.__name__, name)
    read, restore = (lambda: namespace[name]), (lambda value: namespace.__setitem__(name, value))

    def set_(_module, value):
        if _call_changes(key, read, restore):
            namespace[name] = value
        else:
            namespace[name] = value
            _changed_outside(key, read)

    return property(lambda _module: namespace[name], set_)


class _IsolatedModule(types.ModuleType):
    """A module with per-call attributes. Pickled by name as modules are (cloudpickle
    looks modules up by their exact type, which this is not)."""

    def __reduce__(self):
        return importlib.import_module, (self.__name__,)


def _isolate_sys() -> None:
    if type(sys) is not types.ModuleType:  # done already, or someone else's class
        return
    attrs = {}
    for name in ("stdout", "stderr"):
        original = sys.__dict__[name]
        if isinstance(original, _RoutedStream):  # routed by an older runtime in this process
            original = original.original
        if original is None:  # no stream (pythonw): output outside calls is dropped
            original = open(os.devnull, "w")
        routed = _RoutedStream(original, name, follow=True)
        plain = _RoutedStream(original, name, follow=False)
        sys.__dict__[name] = routed
        attrs[name] = _isolated_property(sys, name, plain=(routed, plain))
        # Inside a call, sys.__stdout__ is the call's stream too: `sys.stdout = sys.__stdout__`
        # sends output back to the notebook, and closing it closes nothing.
        attrs[f"__{name}__"] = _isolated_property(sys, f"__{name}__", in_call=plain)
    for name in ("excepthook", "displayhook", "breakpointhook", "unraisablehook", "stdin"):
        if name in sys.__dict__:
            attrs[name] = _tracked_property(sys, name)
    sys.__class__ = type("_IsolatedSys", (_IsolatedModule,), attrs)


def _isolate_warnings() -> None:
    w = warnings
    if type(w) is not types.ModuleType:
        return
    namespace = w.__dict__
    if getattr(namespace.get("_add_filter"), "__module__", None) != "warnings" or "_showwarning_orig" not in namespace:
        logger.info("kaas: this Python's warnings module is not the one isolated here; filters are shared")
        return
    original_show = namespace["_showwarning_orig"]

    # warnings.py's own functions read these names from its globals: they get versions
    # that read them as attributes, which the call's values answer.
    def _add_filter(*item, append):
        filters = w.filters
        if not append:
            try:
                filters.remove(item)
            except ValueError:
                pass
            filters.insert(0, item)
        elif item not in filters:
            filters.append(item)
        w._filters_mutated()

    def resetwarnings():
        """Clear the list of warning filters, so that no filters are active."""
        w.filters[:] = []
        w._filters_mutated()

    def showwarning(message, category, filename, lineno, file=None, line=None):
        """Hook to write a warning to a file; replace if you like."""
        w._showwarnmsg_impl(w.WarningMessage(message, category, filename, lineno, file, line))

    def _showwarnmsg(msg):
        """Hook to write a warning to a file; replace if you like."""
        show = w.showwarning
        if show is not showwarning and show is not original_show:
            if not callable(show):
                raise TypeError("warnings.showwarning() must be set to a function or method")
            show(msg.message, msg.category, msg.filename, msg.lineno, msg.file, msg.line)
            return
        w._showwarnmsg_impl(msg)

    if namespace["showwarning"] is original_show:
        namespace["showwarning"] = showwarning
    namespace["_showwarning_orig"] = showwarning
    namespace.update(_add_filter=_add_filter, resetwarnings=resetwarnings, _showwarnmsg=_showwarnmsg)
    attrs = {
        "filters": _isolated_property(w, "filters", copy=list),
        "showwarning": _isolated_property(w, "showwarning"),
        "_showwarnmsg_impl": _isolated_property(w, "_showwarnmsg_impl"),
    }
    w.__class__ = type("_IsolatedWarnings", (_IsolatedModule,), attrs)


# --- threads and executors a call starts work for it -----------------------------------


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


# --- settings changed through a function: tracked as they change ------------------------

_lock = threading.Lock()
# key -> [value before the first call changed it, calls that changed it, restore(value)]
_changed: dict = {}


def _call_changes(key, read, restore) -> bool:
    """Before a tracked setting changes: True when a call is changing it (noted, to be put
    back when it ends); False outside calls."""
    call = _current.call
    if call is None or call.done:
        return False
    with _lock:
        entry = _changed.get(key)
        if entry is None:
            _changed[key] = entry = [read(), set(), restore]
        entry[1].add(call)
    if call.changed is None:
        call.changed = set()
    call.changed.add(key)
    return True


def _changed_outside(key, read) -> None:
    """After a tracked setting changed outside calls (the worker's own code): that value is
    the one to put back."""
    if _changed:
        with _lock:
            entry = _changed.get(key)
            if entry is not None:
                entry[0] = read()


def _put_back(call: _Call) -> None:
    for key in call.changed or ():
        with _lock:
            entry = _changed.get(key)
            if entry is None:
                continue
            entry[1].discard(call)
            if entry[1]:
                continue
            del _changed[key]
        try:
            entry[2](entry[0])
        except Exception:
            logger.exception("kaas could not restore %r after a call", key)


class _TrackedEnviron(os._Environ):  # type: ignore[name-defined]
    """os.environ, of which each call sees its own version: what a cell sets or removes is
    seen, from Python, by that call (and the threads it starts) alone, through an overlay
    of its own. The process's environment, which C code and child processes read, takes the
    change too while the call runs (so a library the cell loads sees it), and gets its value
    from before back when the last call that changed it ends."""

    def _overlay(self) -> dict | None:
        call = _current.call
        return call.env if call is not None and not call.done else None

    def _process_value(self, key):
        return os._Environ.get(self, key, _NO)  # the worker's own view: the process's value

    def _call_sets(self, key, value) -> bool:
        """Inside a call: ``value`` (or _NO: removed) in the call's overlay and, until the
        call ends, in the process's environment. False outside calls."""
        call = _current.call
        if call is None or call.done:
            return False
        read = lambda: self._process_value(key)  # noqa: E731

        def restore(old):
            if old is _NO:
                os.unsetenv(key)
            else:
                os.putenv(key, old)

        _call_changes(("env", key), read, restore)
        if call.env is None:
            call.env = {}
        call.env[key] = value
        if value is _NO:
            os.unsetenv(key)
        else:
            os.putenv(key, value)
        return True

    def __getitem__(self, key):
        overlay = self._overlay()
        if overlay and key in overlay:
            value = overlay[key]
            if value is _NO:
                raise KeyError(key)
            return value
        return os._Environ.__getitem__(self, key)

    def __iter__(self):
        overlay = self._overlay()
        if not overlay:
            yield from os._Environ.__iter__(self)
            return
        for key in os._Environ.__iter__(self):
            if key not in overlay:
                yield key
        yield from (key for key, value in overlay.items() if value is not _NO)

    def __len__(self):
        return sum(1 for _ in self) if self._overlay() else os._Environ.__len__(self)

    def copy(self):
        return dict(self)

    def __setitem__(self, key, value):
        self.encodekey(key), self.encodevalue(value)  # a str, or the TypeError os.environ raises
        if not self._call_sets(key, value):
            os._Environ.__setitem__(self, key, value)
            _changed_outside(("env", key), lambda: self._process_value(key))

    def __delitem__(self, key):
        if self._overlay() is not None or (_current.call is not None and not _current.call.done):
            if key not in self:
                raise KeyError(key)
            self._call_sets(key, _NO)
            return
        os._Environ.__delitem__(self, key)
        _changed_outside(("env", key), lambda: self._process_value(key))


def _track_environ() -> None:
    if type(os.environ) is os._Environ:
        os.environ.__class__ = _TrackedEnviron


def _track_locale() -> None:
    setlocale = locale.setlocale
    if getattr(setlocale, "_kaas", False):
        return

    def tracked_setlocale(category, locale_=None):
        if locale_ is None:  # a query
            return setlocale(category)
        key = ("locale", category)
        read, restore = lambda: setlocale(category), lambda v: setlocale(category, v)
        if _call_changes(key, read, restore):
            return setlocale(category, locale_)
        result = setlocale(category, locale_)
        _changed_outside(key, read)
        return result

    tracked_setlocale._kaas = True
    tracked_setlocale.__wrapped__ = setlocale
    tracked_setlocale.__doc__ = setlocale.__doc__
    locale.setlocale = tracked_setlocale


def _tracked_function(module: types.ModuleType, name: str, key, read, restore) -> None:
    """Replace ``module.name``, a function that changes a process-wide setting, with one
    that notes a call's change, to be put back with ``restore(value)`` when the call ends."""
    function = module.__dict__.get(name)
    if function is None or getattr(function, "_kaas", False):
        return

    def tracked(*args, **kwargs):
        if _call_changes(key, read, restore):
            return function(*args, **kwargs)
        result = function(*args, **kwargs)
        _changed_outside(key, read)
        return result

    tracked._kaas = True
    tracked.__wrapped__ = function
    tracked.__name__, tracked.__qualname__, tracked.__doc__ = name, name, function.__doc__
    module.__dict__[name] = tracked


def _track_functions() -> None:
    for name, get in (("setrecursionlimit", "getrecursionlimit"), ("setswitchinterval", "getswitchinterval"),
                      ("set_int_max_str_digits", "get_int_max_str_digits")):
        if hasattr(sys, get):
            _tracked_function(sys, name, ("sys", name), getattr(sys, get), getattr(sys, name))
    _tracked_function(socket, "setdefaulttimeout", ("socket", "timeout"), socket.getdefaulttimeout,
                      socket.setdefaulttimeout)
    gc_enable, gc_disable = gc.enable, gc.disable
    gc_restore = lambda on: gc_enable() if on else gc_disable()  # noqa: E731
    for name in ("enable", "disable"):
        _tracked_function(gc, name, ("gc", "enabled"), gc.isenabled, gc_restore)
    _tracked_function(gc, "set_threshold", ("gc", "threshold"), gc.get_threshold,
                      lambda v, f=gc.set_threshold: f(*v))
    fh_enable, fh_disable = faulthandler.enable, faulthandler.disable
    fh_restore = lambda on: fh_enable(file=_sysdict["__stderr__"]) if on else fh_disable()  # noqa: E731
    for name in ("enable", "disable"):
        _tracked_function(faulthandler, name, ("faulthandler", "enabled"), faulthandler.is_enabled, fh_restore)
    for name, hook in (("settrace", "_trace_hook"), ("setprofile", "_profile_hook")):
        if hook in threading.__dict__:
            _tracked_function(threading, name, ("threading", name), lambda hook=hook: threading.__dict__[hook],
                              getattr(threading, name))


_jax_tracked = False


def _track_jax() -> None:
    """JAX's global flags (``jax.config.update``), once JAX is imported; never imports it."""
    global _jax_tracked
    config_module = sys.modules.get("jax._src.config")
    if config_module is None:
        return
    config_class = getattr(config_module, "Config", None)
    update = getattr(config_class, "update", None)
    if update is None:  # still being imported (by another thread), or a JAX this does not know
        return
    _jax_tracked = True
    if getattr(update, "_kaas", False):
        return

    def tracked_update(self, name, val):
        holder = getattr(self, "_value_holders", {}).get(name)
        if holder is None or not hasattr(holder, "get_global"):
            return update(self, name, val)
        key = ("jax", name)
        read, restore = holder.get_global, lambda v: update(self, name, v)
        if _call_changes(key, read, restore):
            return update(self, name, val)
        result = update(self, name, val)
        _changed_outside(key, read)
        return result

    tracked_update._kaas = True
    tracked_update.__wrapped__ = update
    config_class.update = tracked_update


# --- settings compared at the start and end of each call --------------------------------

_sysdict = sys.__dict__
_root = logging.getLogger()


def _snapshot(d=_sysdict, t=threading.__dict__, root=_root, manager=_root.manager, tuple=tuple) -> tuple:
    path = d["path"]
    return (path, tuple(path), t["excepthook"], root.level, tuple(root.handlers), manager.disable,
            None if _fs_private_ok else os.getcwd())


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


# --- the working directory: the link thread's own ---------------------------------------

_fs_private_ok = False
_base_fd: int | None = None
_base_umask = 0o022
_unshare = None


def _probe_unshare() -> bool:
    """Whether unshare(CLONE_FS) works here, tried in a throwaway thread."""
    global _unshare
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        _unshare = libc.unshare
    except (OSError, AttributeError):
        return False
    result = []
    probe = threading.Thread(target=lambda: result.append(_unshare(CLONE_FS) == 0), name="kaas-unshare-probe")
    probe.start()
    probe.join()
    return bool(result and result[0])


def _own_working_directory() -> list:
    """The calling link thread's own working directory, at the worker's and with its umask.
    Moved back only when a cell moved it (chdir and umask are watched): two system calls
    less per call."""
    fs = _current.fs
    if fs is None:
        if _unshare(CLONE_FS) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_FS) failed")
        fs = _current.fs = [True]
    if fs[0]:
        os.fchdir(_base_fd)
        os.umask(_base_umask)
        fs[0] = False
    return fs


def _watch_working_directory() -> None:
    """os.chdir, os.fchdir and os.umask inside a call mark its link thread's directory moved."""
    for name in ("chdir", "fchdir", "umask"):
        function = getattr(os, name, None)
        if function is None or getattr(function, "_kaas", False):
            continue

        def watched(*args, _function=function, **kwargs):
            call = _current.call
            if call is not None and call.fs is not None:
                call.fs[0] = True
            return _function(*args, **kwargs)

        watched._kaas = True
        watched.__wrapped__ = function
        watched.__name__, watched.__doc__ = function.__name__, function.__doc__
        setattr(os, name, watched)


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


_old_numpy = None


# --- the interface ----------------------------------------------------------------------

_installed = False


def install() -> None:
    """Once per worker process, at start: route the standard streams, make ``sys`` and
    ``warnings`` per call, and track the settings that are restored after calls."""
    global _installed, _fs_private_ok, _base_fd, _base_umask, _baseline, _old_numpy
    if _installed:
        return
    _installed = True
    _isolate_sys()
    _isolate_warnings()
    _patch_threads()
    _track_environ()
    _track_locale()
    _track_functions()
    _track_jax()
    _old_numpy = _numpy_thread_errstate()
    _fs_private_ok = _probe_unshare()
    if _fs_private_ok:
        _base_fd = os.open(os.getcwd(), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        os.set_inheritable(_base_fd, False)
        _base_umask = os.umask(0o022)
        os.umask(_base_umask)
        _watch_working_directory()
    else:
        logger.info("kaas: unshare(CLONE_FS) is unavailable; the working directory is restored after calls")
    _baseline = _snapshot()


def fs_isolated() -> bool:
    """Whether each call has its own working directory (else it is restored after calls)."""
    return _fs_private_ok


class call_scope(_Call):
    """What one call runs within: ``with call_scope(sink, progress): ...`` or, where a
    ``with`` does not fit, ``scope.enter()`` ... ``scope.exit()`` (in a ``finally``).
    ``sink(name, text)`` takes the call's print output ("stdout", "stderr") and, when
    ``progress``, its states ("state"; see report_state)."""

    __slots__ = ()

    def enter(self) -> "call_scope":
        if not _jax_tracked:
            _track_jax()
        _start_compared(self)
        if _fs_private_ok:
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
        if not _jax_tracked:
            _track_jax()
        _end_compared(self)
        try:
            _sysdict["stdout"].flush()
        except Exception:
            pass

    __enter__ = enter

    def __exit__(self, *exc_info) -> None:
        self.exit()
