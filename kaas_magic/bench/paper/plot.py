"""The plot of ``kaas bench paper``: the reduction beside the paper's, and sharing
throughput, as a PNG drawn without pyplot (a notebook's own backend is left alone)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .results import Completion, Results
from .tasks import ALL_TARGETS, KIND_LABEL, PAPER_REDUCTION


def plot(results: Results, path: str | Path) -> Path:
    """Two panels: the reduction beside the paper's, and sharing throughput (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)  # no pyplot: a notebook's own backend is left alone
    left, right = fig.subplots(1, 2)

    measured = {c.task.target: c for c in results.completions}
    _reduction_panel(left, results, measured)
    if results.sharing:
        _sharing_panel(right, results, measured)
    else:
        right.set_axis_off()
    fig.suptitle("kaas bench paper: " + results.header[1].removeprefix("machine: "), fontsize=9)
    fig.savefig(path, dpi=110)
    return path


def _reduction_panel(left, results: Results, measured: dict[str, Completion]) -> None:
    """Each target's completion-time reduction beside the paper's; stand-ins hatched."""
    from matplotlib.patches import Patch

    targets = [t for t in ALL_TARGETS if t in measured or t in results.skipped]
    xs = np.arange(len(targets))
    paper = [PAPER_REDUCTION.get(t, np.nan) for t in targets]
    ours = [measured[t].reduction if t in measured else np.nan for t in targets]
    left.bar(xs - 0.2, paper, 0.4, color="#9ca3af")
    bars = left.bar(xs + 0.2, ours, 0.4, color="#2563eb")
    for bar, t in zip(bars, targets):
        if t in measured and measured[t].kind != "device":
            bar.set_hatch("//")
            bar.set_edgecolor("white")
    for x, value in zip(xs, ours):
        if not np.isnan(value):
            left.annotate(f"{value:.1f}", (x + 0.2, max(value, 0)), ha="center", va="bottom", fontsize=8)
    for x, value in zip(xs, paper):
        if not np.isnan(value):
            left.annotate(f"{value:.1f}", (x - 0.2, value), ha="center", va="bottom", fontsize=8)
    left.set_xticks(xs, [_tick(t, measured, results.skipped) for t in targets], fontsize=8)
    left.set_ylabel("completion-time reduction vs naive (%)")
    lowest = float(np.nanmin([*ours, 0.0]))  # KaaS slower than naive shows below zero
    left.set_ylim(lowest - 10 if lowest < 0 else 0, 135)
    left.set_yticks([t for t in range(-100, 101, 20) if t >= min(lowest - 10, 0)])
    left.set_title("One fine-grained task: naive (fresh process) vs KaaS (warm)", fontsize=10)
    left.legend(handles=[Patch(color="#9ca3af", label="paper (Middleware '23)"),
                         Patch(color="#2563eb", label="this run, on the device"),
                         Patch(facecolor="#2563eb", edgecolor="white", hatch="//",
                               label="this run, on a stand-in (FALLBACK / SIMULATOR)")],
                loc="upper center", ncols=2, fontsize=7.5)


def _sharing_panel(right, results: Results, measured: dict[str, Completion]) -> None:
    """Throughput of the sharing streams, naive against KaaS, with how busy the device was."""
    names = [s.task.target for s in results.sharing]
    xs = np.arange(len(names))
    naive = right.bar(xs - 0.2, [s.naive.throughput for s in results.sharing], 0.4,
                      label="naive (exclusive device per task)", color="#f59e0b")
    kaas = right.bar(xs + 0.2, [s.kaas.throughput for s in results.sharing], 0.4,
                     label="KaaS (shared warm devices)", color="#2563eb")
    for group, streams in ((naive, [s.naive for s in results.sharing]), (kaas, [s.kaas for s in results.sharing])):
        for bar, stream in zip(group, streams):
            right.annotate(f"busy {100 * stream.busy:.0f}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                           ha="center", va="bottom", fontsize=7)
    right.set_yscale("log")
    right.set_ylim(top=30 * max(s.kaas.throughput for s in results.sharing))
    right.set_xticks(xs, [_tick(t, measured, {}) for t in names], fontsize=8)
    right.set_ylabel("throughput (tasks/s, log scale)")
    right.set_title(f"Sharing: {results.sharing[0].clients} clients, streams of tasks", fontsize=10)
    right.legend(loc="upper center", ncols=2, fontsize=8)


def _tick(target: str, measured: dict[str, Completion], skipped: dict[str, str]) -> str:
    if target in skipped:
        return f"{target}\nnot run here"
    kind = measured[target].kind if target in measured else "device"
    return target if kind == "device" else f"{target}\n{KIND_LABEL[kind]}"
