"""Rich output from a cell on a worker: ``display(obj)``, ``IPython.display`` and matplotlib
figures, sent to the calling notebook as they happen.

A displayed object becomes a MIME bundle here, on the worker (IPython's formatters when
IPython is installed on the worker, else the object's ``_repr_*_`` methods and its repr),
and goes home as a stream chunk ``("display", payload)`` through the call's sink, the very
path its prints take (see isolation.streams): routed by call, threads the cell starts
included, in order with its prints. The payload is plain data (see protocol.DisplayChunk):
``{"data": {mime: str | JSON}, "metadata": {...}}``, binary data as base64 text as Jupyter
keeps it, ``transient``/``update`` for ``display_id``, or ``{"clear": wait}`` for
``clear_output``. A bundle over ``CallStream.MAX_DISPLAY`` characters becomes a text note.

Hooks, all process-wide, each acting only for the thread's current call (outside a call
they do what they did before), installed once by :func:`install` at a worker's first call,
and applied when the module is imported (an import hook: nothing here imports IPython or
matplotlib for a cell that does not):

* ``IPython.core.display_functions`` (``IPython.display``): its ``display``,
  ``clear_output``, ``update_display`` and ``publish_display_data`` are replaced, right
  after the module runs and before anything binds them, by functions that send to the call
  during a call, and call IPython's own otherwise (which, with no shell on a worker, prints
  the repr). ``from IPython.display import display`` in a cell gets the routed one.
  ``IPython.core.formatters.format_display_data`` likewise formats without a shell.
* ``matplotlib``: the Agg backend, unless ``MPLBACKEND`` names one (no window, any thread).
* ``matplotlib.pyplot``: a figure made by pyplot during a call belongs to that call
  (``Gcf._set_new_active_manager``); during a call, pyplot's current figure is the call's
  own latest (``Gcf.get_active``: ``plt.plot`` never draws on another notebook's figure),
  ``plt.close("all")`` closes the call's figures only, and ``plt.show()`` displays the
  call's open figures and closes them. When the cell ends, :func:`end_call` displays the
  figures it left open (not those it showed with ``display(fig)``) and closes them all.

Limits: pyplot's figure numbers are the process's (``plt.get_fignums()`` lists every call's
figures; ``plt.figure(1)`` in two concurrent calls is one figure); figures made outside
pyplot (``Figure()``) are shown only by ``display(fig)``; a ``display_id`` handle updates the
output in the calling cell only while that cell's call runs.
"""

from __future__ import annotations

import base64
import functools
import importlib.abc
import io
import json
import logging
import os
import sys
import threading
import uuid
from typing import Any

from ..call_stream import CallStream, display_size
from ..isolation.calls import _current

logger = logging.getLogger("kaas_magic.worker.display")

_TEXT = "text/plain"


# --- display, on the worker -------------------------------------------------------------


def _live_call():
    call = _current.call
    if call is None or call.done:
        return None
    return call


def display(*objs, include=None, exclude=None, metadata=None, transient=None, display_id=None, raw=False,
            clear=False, update=False, **kwargs):
    """IPython's ``display``, for a cell on a worker: each object shown in the calling
    notebook cell (see the module's docstring). Outside a call it prints, as IPython does
    without a shell."""
    call = _live_call()
    if call is None:
        print(*objs)
        return None
    transient = dict(transient or {})
    if display_id:
        if display_id is True:
            display_id = uuid.uuid4().hex
        transient["display_id"] = str(display_id)
    if update and "display_id" not in transient:
        raise TypeError("display_id required for update_display")
    if not objs and display_id:  # an empty output, to be updated later
        objs, raw = ({},), True
    if clear:
        clear_output(wait=True)
    for obj in objs:
        if raw:
            data, md = obj, {}
        else:
            data, md = format_bundle(obj, include, exclude)
            if not data:  # nothing to show (its _ipython_display_ showed it)
                continue
        if metadata:
            md = {**md, **metadata}
        if not raw:
            _mark_shown(obj)
        _send(call, data, md, transient, update)
    if display_id:
        return DisplayHandle(str(display_id))
    return None


def update_display(obj, *, display_id, **kwargs):
    kwargs["update"] = True
    display(obj, display_id=display_id, **kwargs)


def publish_display_data(data, metadata=None, source=None, *, transient=None, **kwargs):
    call = _live_call()
    if call is None:
        print(data.get(_TEXT, "") if isinstance(data, dict) else data)
        return
    _send(call, data, metadata or {}, dict(transient or {}), bool(kwargs.get("update")))


def clear_output(wait: bool = False) -> None:
    """Clear the calling cell's output (``wait``: when the next output arrives)."""
    call = _live_call()
    if call is None:
        return
    call.sink("display", {"clear": bool(wait)})


class DisplayHandle:
    """What ``display(..., display_id=True)`` returns: ``update(obj)`` replaces that output."""

    def __init__(self, display_id: str | None = None):
        self.display_id = display_id or uuid.uuid4().hex

    def __repr__(self) -> str:
        return f"<{type(self).__name__} display_id={self.display_id}>"

    def display(self, obj, **kwargs):
        display(obj, display_id=self.display_id, **kwargs)

    def update(self, obj, **kwargs):
        update_display(obj, display_id=self.display_id, **kwargs)


def _send(call, data, metadata, transient: dict, update: bool) -> None:
    payload: dict[str, Any] = {"data": _clean_data(data), "metadata": _jsonable(metadata) or {}}
    size = display_size(payload)
    if size > CallStream.MAX_DISPLAY:
        kinds = ", ".join(sorted(payload["data"])) or "nothing"
        payload = {"data": {_TEXT: f"[kaas: a display of {size:,} characters ({kinds}) was not sent: over the "
                                   f"limit of {CallStream.MAX_DISPLAY:,} for one display]"}, "metadata": {}}
    if transient:
        payload["transient"] = _jsonable(transient) or {}
    if update:
        payload["update"] = True
    call.sink("display", payload)


def _clean_data(data) -> dict:
    """A bundle as JSON-safe data: bytes as base64 text (as Jupyter keeps images), other
    values kept when JSON can carry them."""
    if not isinstance(data, dict):
        data = {_TEXT: repr(data)}
    clean = {}
    for mime, value in data.items():
        mime = str(mime)
        if isinstance(value, (bytes, bytearray, memoryview)):
            value = base64.b64encode(bytes(value)).decode("ascii")
        elif not isinstance(value, str):
            value = _jsonable(value)
            if value is None:
                continue
        clean[mime] = value
    return clean


def _jsonable(value):
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    try:
        return json.loads(json.dumps(value, default=_b64_or_fail))
    except (TypeError, ValueError):
        return None


def _b64_or_fail(value):
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(bytes(value)).decode("ascii")
    raise TypeError(type(value).__name__)


# --- formatting ---------------------------------------------------------------------------

_formatter = None
_formatter_lock = threading.Lock()


def format_bundle(obj, include=None, exclude=None) -> tuple[dict, dict]:
    """``obj`` as (data, metadata): IPython's display formatter (one of our own, no shell
    needed) where IPython is installed, else the object's ``_repr_*_`` methods."""
    formatter = _get_formatter()
    if formatter is False:
        return _fallback_format(obj, include, exclude)
    return formatter.format(obj, include=include, exclude=exclude)


def _get_formatter():
    global _formatter
    if _formatter is None:
        with _formatter_lock:
            if _formatter is None:
                try:
                    from IPython.core.formatters import DisplayFormatter
                except ImportError:
                    _formatter = False
                else:
                    formatter = DisplayFormatter()
                    formatter.formatters["image/png"].for_type_by_name("matplotlib.figure", "Figure", _figure_png)
                    _formatter = formatter
    return _formatter


_REPRS = (("_repr_html_", "text/html"), ("_repr_markdown_", "text/markdown"), ("_repr_svg_", "image/svg+xml"),
          ("_repr_png_", "image/png"), ("_repr_jpeg_", "image/jpeg"), ("_repr_latex_", "text/latex"),
          ("_repr_json_", "application/json"), ("_repr_javascript_", "application/javascript"))


def _fallback_format(obj, include=None, exclude=None) -> tuple[dict, dict]:
    data: dict = {}
    md: dict = {}
    method = getattr(obj, "_repr_mimebundle_", None)
    if callable(method):
        try:
            got = method(include=include, exclude=exclude)
        except TypeError:
            got = method()
        if isinstance(got, tuple):
            got, extra = got
            md.update(extra or {})
        data.update(got or {})
    for name, mime in _REPRS:
        if mime in data:
            continue
        method = getattr(obj, name, None)
        if callable(method):
            got = method()
            if isinstance(got, tuple):
                got, extra = got
                md[mime] = extra
            if got is not None:
                data[mime] = got
    if type(obj).__name__ == "Figure" and type(obj).__module__.startswith("matplotlib"):
        data["image/png"] = _figure_png(obj)
    data.setdefault(_TEXT, repr(obj))
    if include:
        data = {k: v for k, v in data.items() if k in include}
    if exclude:
        data = {k: v for k, v in data.items() if k not in exclude}
    return data, md


def _figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def _mark_shown(obj) -> None:
    """A pyplot figure shown with display(fig) is not shown again when the cell ends."""
    if type(obj).__name__ == "Figure" and type(obj).__module__.startswith("matplotlib"):
        try:
            obj._kaas_shown = True
        except Exception:  # noqa: BLE001
            pass


# --- matplotlib -----------------------------------------------------------------------------


def _owned(call, gcf) -> list:
    return [m for m in list(gcf.figs.values()) if getattr(m, "_kaas_call", None) is call]


def _show_figures(call, render: bool = True) -> None:
    """Display the call's open pyplot figures (``render``) and close them."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    helpers = sys.modules.get("matplotlib._pylab_helpers")
    if pyplot is None or helpers is None:
        return
    gcf = helpers.Gcf
    for manager in _owned(call, gcf):
        fig = manager.canvas.figure
        try:
            if render and not getattr(fig, "_kaas_shown", False):
                _send(call, {_TEXT: repr(fig), "image/png": _figure_png(fig)}, {}, {}, False)
        except Exception as e:  # noqa: BLE001 - one figure's trouble is shown, not raised
            call.sink("stderr", f"[kaas: a matplotlib figure could not be shown: {type(e).__name__}: {e}]\n")
        finally:
            try:
                gcf.destroy(manager)
            except Exception:  # noqa: BLE001
                logger.exception("kaas could not close a figure")


def end_call(render: bool = True) -> None:
    """The cell ended: the pyplot figures it left open are displayed (``render``: it was not
    stopped) and closed. Never raises."""
    call = _current.call
    if call is None or "matplotlib._pylab_helpers" not in sys.modules:
        return
    try:
        _show_figures(call, render)
    except Exception:  # noqa: BLE001
        logger.exception("kaas could not show a cell's figures")


def _use_agg(matplotlib) -> None:
    if os.environ.get("MPLBACKEND"):
        return
    try:
        if "matplotlib.pyplot" not in sys.modules:
            matplotlib.use("Agg")
    except Exception:  # noqa: BLE001
        logger.exception("kaas could not choose matplotlib's Agg backend")


def _patch_pyplot(pyplot) -> None:
    if getattr(pyplot.show, "_kaas", False):
        return
    from matplotlib._pylab_helpers import Gcf

    new_active = Gcf.__dict__["_set_new_active_manager"].__func__
    get_active = Gcf.__dict__["get_active"].__func__
    destroy_all = Gcf.__dict__["destroy_all"].__func__

    def _set_new_active_manager(cls, manager):
        call = _live_call()
        if call is not None:
            manager._kaas_call = call
        return new_active(cls, manager)

    def _get_active(cls):
        call = _live_call()
        if call is None:
            return get_active(cls)
        for manager in reversed(list(cls.figs.values())):
            if getattr(manager, "_kaas_call", None) is call:
                return manager
        return None

    def _destroy_all(cls):
        call = _live_call()
        if call is None:
            return destroy_all(cls)
        for manager in _owned(call, cls):
            cls.destroy(manager)

    Gcf._set_new_active_manager = classmethod(_set_new_active_manager)
    Gcf.get_active = classmethod(_get_active)
    Gcf.destroy_all = classmethod(_destroy_all)

    original_show = pyplot.show

    @functools.wraps(original_show)
    def show(*args, **kwargs):
        call = _live_call()
        if call is None:
            return original_show(*args, **kwargs)
        _show_figures(call)
        return None

    show._kaas = True
    pyplot.show = show


# --- IPython.display ------------------------------------------------------------------------

_ROUTED = {"display": display, "clear_output": clear_output, "update_display": update_display,
           "publish_display_data": publish_display_data}


def _routed(original, ours):
    @functools.wraps(original)
    def routed(*args, **kwargs):
        if _live_call() is None:
            return original(*args, **kwargs)
        return ours(*args, **kwargs)

    routed._kaas = True
    return routed


def _patch_ipython_display(module) -> None:
    for name, ours in _ROUTED.items():
        original = module.__dict__.get(name)
        if callable(original) and not getattr(original, "_kaas", False) and \
                getattr(original, "__module__", None) == module.__name__:
            setattr(module, name, _routed(original, ours))


def _patch_formatters(module) -> None:
    """``format_display_data`` makes IPython's shell to format with: during a call, ours."""
    original = module.__dict__.get("format_display_data")
    if callable(original) and not getattr(original, "_kaas", False):
        module.format_display_data = _routed(original, format_bundle)


# --- the import hook ------------------------------------------------------------------------

_AFTER_IMPORT = {
    "matplotlib": _use_agg,
    "matplotlib.pyplot": _patch_pyplot,
    "IPython.core.display_functions": _patch_ipython_display,
    "IPython.core.display": _patch_ipython_display,  # IPython < 7.23 defines display here
    "IPython.core.formatters": _patch_formatters,
}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a patch right after one of the modules above is executed, before the importer
    (or anyone) reads its names."""

    _busy = threading.local()

    def find_spec(self, fullname, path, target=None):
        patch = _AFTER_IMPORT.get(fullname)
        if patch is None or getattr(self._busy, "on", False):
            return None
        self._busy.on = True
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._busy.on = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            try:
                patch(module)
            except Exception:  # noqa: BLE001 - the import itself succeeded
                logger.exception("kaas could not adapt %s for cells", fullname)

        try:
            spec.loader.exec_module = exec_then_patch
        except (AttributeError, TypeError):  # a loader that takes no attributes: left as it is
            pass
        return spec


_installed = False
_install_lock = threading.Lock()


def install() -> None:
    """Once per worker process (its first call): the import hook, and the patches for what
    is imported already."""
    global _installed
    if _installed:
        return
    with _install_lock:
        if _installed:
            return
        sys.meta_path.insert(0, _AfterImport())
        for name, patch in _AFTER_IMPORT.items():
            module = sys.modules.get(name)
            if module is not None:
                try:
                    patch(module)
                except Exception:  # noqa: BLE001
                    logger.exception("kaas could not adapt %s for cells", name)
        _installed = True


def names() -> dict:
    """What a cell's namespace gets."""
    return {"display": display, "clear_output": clear_output}
