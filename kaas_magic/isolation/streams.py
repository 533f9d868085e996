"""Print output routed by call: the standard streams in ``sys.__dict__`` (what C code such as
``print`` writes to) and the ``sys`` module's own class, whose ``stdout``/``stderr``
properties answer the calling thread's call's value."""

from __future__ import annotations

import io
import os
import sys
import types

from .calls import _NO, _current
from .modules import _IsolatedModule, _isolated_property
from .tracked import _tracked_property


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
