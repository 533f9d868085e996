"""Settings tracked as they change, at no cost until one does: the call that changed one is
known, and the value from before is put back when the last call that changed it ends.
The environment (``os.environ``: also an overlay per call), the locale, JAX's global flags,
``sys`` hooks and limits, the default socket timeout, the garbage collector, faulthandler,
``threading`` trace and profile functions."""

from __future__ import annotations

import faulthandler
import gc
import locale
import os
import socket
import sys
import threading
import types

from .calls import _NO, _Call, _current, logger


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
    fh_restore = lambda on: fh_enable(file=sys.__dict__["__stderr__"]) if on else fh_disable()  # noqa: E731
    for name in ("enable", "disable"):
        _tracked_function(faulthandler, name, ("faulthandler", "enabled"), faulthandler.is_enabled, fh_restore)
    for name, hook in (("settrace", "_trace_hook"), ("setprofile", "_profile_hook")):
        if hook in threading.__dict__:
            _tracked_function(threading, name, ("threading", name), lambda hook=hook: threading.__dict__[hook],
                              getattr(threading, name))


def _track_jax() -> bool:
    """JAX's global flags (``jax.config.update``), once JAX is imported; never imports it.
    Whether they are tracked (from now on)."""
    config_module = sys.modules.get("jax._src.config")
    if config_module is None:
        return False
    config_class = getattr(config_module, "Config", None)
    update = getattr(config_class, "update", None)
    if update is None:  # still being imported (by another thread), or a JAX this does not know
        return False
    if getattr(update, "_kaas", False):
        return True

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
    return True
