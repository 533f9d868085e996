"""The progress view of a map (``Pool.map(..., progress=True)``): an ipywidgets bar with
done/total, the rate, the ETA and the split over devices in a Jupyter kernel; elsewhere one
tqdm-style line on stderr, rewritten in place. Updated from a thread of its own at most
four times a second; ipywidgets is imported only when a bar is shown."""

from __future__ import annotations

import html
import sys
import threading

_INTERVAL_S = 0.25


def in_jupyter() -> bool:
    """True inside a Jupyter kernel whose frontend can show widgets (and ipywidgets is
    installed): a map shows its bar there by default."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None or getattr(shell, "kernel", None) is None:
        return False
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def describe(done: int, total: int | None, rate: float, per_device: dict[str, int], ended: bool) -> tuple[str, str]:
    """(counts, details): '1,234/2,000' and '5,321/s, ETA 0.1 s | 0: 617, 1: 617'."""
    counts = f"{done:,}/{total:,}" if total is not None else f"{done:,}"
    parts = [f"{rate:,.0f}/s"]
    if total is not None and not ended and rate > 0:
        parts.append(f"ETA {max(total - done, 0) / rate:,.1f} s")
    elif ended:
        parts.append("done")
    split = ", ".join(f"{d}: {n:,}" for d, n in sorted(per_device.items()))
    return counts, ", ".join(parts) + (f" | {split}" if split else "")


class MapView:
    """Follows a map (anything with ``snapshot()``: done, total, rate, per-device, ended)."""

    def __init__(self, run, stream=None):
        self._run = run
        self._stop = threading.Event()
        self._widgets = None
        self._stream = stream
        self._last_width = 0
        if stream is None and in_jupyter():
            import ipywidgets
            from IPython.display import display

            bar = ipywidgets.IntProgress(value=0, min=0, max=1, description="kaas map",
                                         layout=ipywidgets.Layout(width="40%"))
            label = ipywidgets.HTML(value="starting")
            self._widgets = (bar, label)
            self._box = ipywidgets.HBox([bar, label])
            # Live, the widgets; once the map ends, a static copy (as the run view does): the
            # notebook keeps a record that needs no widget state.
            self._handle = display(self._box, display_id=True)
        elif stream is None:
            self._stream = sys.stderr

    def start(self) -> None:
        threading.Thread(target=self._follow, name="kaas-map-view", daemon=True).start()

    def _follow(self) -> None:
        while not self._stop.wait(_INTERVAL_S):
            self.update()

    def update(self) -> None:
        try:
            done, total, rate, per_device, ended = self._run.snapshot()
            counts, details = describe(done, total, rate, per_device, ended)
            if self._widgets is not None:
                bar, label = self._widgets
                bar.max = max(total if total is not None else done, 1)
                bar.value = min(done, bar.max)
                bar.bar_style = "success" if ended else ""
                label.value = f"<code>{html.escape(counts)}</code> {html.escape(details)}"
            else:
                line = f"kaas map: {_text_bar(done, total)} {counts} [{details}]"
                pad = " " * max(self._last_width - len(line), 0)
                self._last_width = len(line)
                self._stream.write("\r" + line + pad)
                self._stream.flush()
        except Exception:  # noqa: BLE001 - a view's trouble is not the map's
            pass

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self.update()
        if self._widgets is not None:
            try:
                self._handle.update(self._static(), raw=True)
                self._box.close()
            except Exception:  # noqa: BLE001
                pass
        if self._widgets is None and self._stream is not None:
            try:
                self._stream.write("\n")
                self._stream.flush()
            except Exception:  # noqa: BLE001
                pass


    def _static(self) -> dict:
        done, total, rate, per_device, ended = self._run.snapshot()
        counts, details = describe(done, total, rate, per_device, ended)
        share = 100 * min(done / total, 1.0) if total else 100.0
        return {
            "text/plain": f"kaas map: {_text_bar(done, total)} {counts} [{details}]",
            "text/html": (
                "<div class='kaas-map' style='font-size:12px;display:flex;align-items:center;gap:8px'>"
                "<span>kaas map</span><div style='width:30%;height:10px;background:var(--jp-layout-color2, #e5e7eb);"
                f"border-radius:2px'><div style='width:{share:.1f}%;height:100%;background:#059669'></div></div>"
                f"<code>{html.escape(counts)}</code> <span>{html.escape(details)}</span></div>"),
        }


def _text_bar(done: int, total: int | None, width: int = 24) -> str:
    if not total:
        return ""
    filled = int(width * min(done / total, 1.0))
    return f"{100 * done / total:3.0f}%|" + "#" * filled + " " * (width - filled) + "|"
