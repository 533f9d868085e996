"""Background cells: ``%%kaas TARGET --background`` (``-B``) returns at once; the call's
printed output, run view, value or error land in *that* cell's output area as they arrive,
while other cells run; its variables are assigned when it finishes. ``%kaas wait`` waits.

Everything a background cell shows goes through display handles made while its cell runs
(``display(..., display_id=True)``) and updated from the call's thread afterwards: an
update names its display, so the frontend puts it where the handle was made whichever cell
is running then. Nothing is printed from the thread (a thread's prints reach whichever cell
the kernel is running; ipywidgets' ``Output`` capture has the same trap).
"""

from __future__ import annotations

import concurrent.futures
import html
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

# How often a background cell's printed text is redrawn at most (each redraw resends it).
FLUSH_S = 0.2
# The most printed text a background cell keeps on show (the head is dropped past it).
MAX_TEXT = 200_000


class CellArea:
    """Everything a background cell shows below its run view, in ONE display made while
    its cell ran: printed text (stdout, stderr in the error colour), what its code
    displays, then its value or error. Redrawn at most every FLUSH_S, from any thread."""

    def __init__(self, handle):
        self._handle = handle
        self._parts: list[tuple[str, Any]] = []  # ("stdout" | "stderr", text) or ("display", bundle)
        self._size = 0
        self._outcome: dict | None = None  # the value's or the error's bundle
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def add(self, kind: str, item: Any) -> None:
        with self._lock:
            if kind != "display" and self._parts and self._parts[-1][0] == kind:
                self._parts[-1] = (kind, self._parts[-1][1] + item)
            else:
                self._parts.append((kind, item))
            self._size += len(item) if isinstance(item, str) else len(str(item))
            while len(self._parts) > 1 and self._size > 8 * MAX_TEXT:
                dropped = self._parts.pop(0)
                self._size -= len(str(dropped[1]))
            if self._timer is None:
                self._timer = threading.Timer(FLUSH_S, self.flush)
                self._timer.daemon = True
                self._timer.start()

    def end(self, outcome: dict | None) -> None:
        with self._lock:
            self._outcome = outcome
        self.flush()

    def flush(self) -> None:
        with self._lock:
            self._timer = None
            parts, outcome = list(self._parts), self._outcome
        if not parts and outcome is None:
            return
        plain = [item if kind != "display" else item.get("text/plain", "") for kind, item in parts]
        rich = [_as_html(kind, item) for kind, item in parts]
        if outcome is not None:
            plain.append(outcome.get("text/plain", ""))
            rich.append(_as_html("display", outcome))
        self._handle.update({"text/plain": "".join(p if p.endswith("\n") else p + "\n" for p in plain).rstrip("\n"),
                             "text/html": "".join(rich)}, raw=True)


class CellText:
    """A background cell's stdout or stderr, written into its CellArea; also how its
    code's displays reach it (``kaas_display``: see client.calls._OutputRelay)."""

    def __init__(self, area: CellArea, name: str):
        self._area = area
        self._name = name
        self.encoding = "utf-8"

    def write(self, text: str) -> int:
        if text:
            self._area.add(self._name, text)
        return len(text)

    def flush(self) -> None:
        pass

    def kaas_display(self, payload: dict) -> None:
        data = payload.get("data") or {}
        if data:
            self._area.add("display", data)


def _as_html(kind: str, item: Any) -> str:
    if kind in ("stdout", "stderr"):
        colour = "var(--jp-error-color1, #b91c1c)" if kind == "stderr" else "inherit"
        return f"<pre class='kaas-background-{kind}' style='margin:0;color:{colour}'>{html.escape(item)}</pre>"
    if "text/html" in item:
        return f"<div>{item['text/html']}</div>"
    for mime in ("image/png", "image/jpeg"):
        if mime in item:
            return f"<div><img src='data:{mime};base64,{item[mime]}'/></div>"
    if "image/svg+xml" in item:
        return f"<div>{item['image/svg+xml']}</div>"
    text = item.get("text/markdown") or item.get("text/plain", "")
    return f"<pre style='margin:0'>{html.escape(text)}</pre>"


@dataclass
class BackgroundCell:
    """One ``%%kaas --background`` cell: its prompt number, its call and where it shows."""

    number: int
    future: Any  # KaasFuture
    area: CellArea
    started: float = field(default_factory=time.monotonic)

    def finished(self, future) -> None:
        """The call ended (in its thread): show its value or its error, in its own cell."""
        try:
            if future.cancelled():
                self.area.end({"text/plain": f"kaas: background cell In[{self.number}] was cancelled"})
                return
            error = future.exception()
            if error is not None:
                lines = "\n".join(_error_lines(error))
                self.area.end({"text/plain": lines, "text/html": f"<pre style='margin:0;color:"
                               f"var(--jp-error-color1, #b91c1c)'>{html.escape(lines)}</pre>"})
                return
            value = future.result().value
            if value is None:
                self.area.end(None)
                return
            from IPython import get_ipython

            shell = get_ipython()
            data, _ = shell.display_formatter.format(value) if shell else ({"text/plain": repr(value)}, {})
            self.area.end(data)
        except Exception:  # noqa: BLE001 - showing the outcome must never break the call's thread
            pass

    @property
    def state(self) -> str:
        f = self.future
        if not f.done():
            return "running"
        if f.cancelled():
            return "cancelled"
        return "error" if f.exception() is not None else "done"


def _error_lines(error: BaseException) -> list[str]:
    render = getattr(error, "_render_traceback_", None)
    if render is not None:
        try:
            return list(render())
        except Exception:  # noqa: BLE001
            pass
    return [line.rstrip("\n") for line in traceback.format_exception_only(type(error), error)]


class BackgroundCells:
    """This notebook's background cells, by prompt number."""

    def __init__(self) -> None:
        self._cells: dict[int, BackgroundCell] = {}
        self._lock = threading.Lock()

    def start(self, number: int, submit) -> BackgroundCell:
        """Make the cell's displays (now, in its cell), then start its call: ``submit(stdout,
        stderr)`` returns the call's future."""
        from IPython.display import display

        area = CellArea(display({"text/plain": ""}, raw=True, display_id=True))
        cell = BackgroundCell(number, submit(CellText(area, "stdout"), CellText(area, "stderr")), area)
        with self._lock:
            self._cells[number] = cell
        cell.future.add_done_callback(cell.finished)
        return cell

    def pending(self) -> list[BackgroundCell]:
        with self._lock:
            return [c for c in self._cells.values() if not c.future.done()]

    def get(self, numbers: list[int] | None) -> list[BackgroundCell]:
        with self._lock:
            if not numbers:
                return list(self._cells.values())
            missing = [n for n in numbers if n not in self._cells]
            if missing:
                from .errors import KaasUsageError

                known = ", ".join(f"In[{n}]" for n in sorted(self._cells)) or "none"
                raise KaasUsageError(f"no background cell In[{missing[0]}]; background cells: {known}")
            return [self._cells[n] for n in numbers]

    def wait(self, numbers: list[int] | None = None, timeout: float | None = None) -> list[BackgroundCell]:
        """Wait for these background cells (default: all), then raise the first error among
        them; returns them. Their variables are assigned by then."""
        cells = self.get(numbers)
        done, not_done = concurrent.futures.wait([c.future for c in cells], timeout=timeout)
        if not_done:
            from .errors import CallTimeout

            late = ", ".join(f"In[{c.number}]" for c in cells if c.future in not_done)
            raise CallTimeout(f"background cells still running after {timeout:g} s: {late}")
        for c in cells:
            if not c.future.cancelled():
                c.future.result()  # the first error raises here, with its own type
        return cells

    def forget_finished(self) -> None:
        with self._lock:
            self._cells = {n: c for n, c in self._cells.items() if not c.future.done()}


CELLS = BackgroundCells()
