"""The ``warnings`` module, per call: its filters, ``showwarning`` and ``_showwarnmsg_impl``
are the calling thread's call's own (``catch_warnings`` included)."""

from __future__ import annotations

import types
import warnings

from .calls import logger
from .modules import _IsolatedModule, _isolated_property


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
