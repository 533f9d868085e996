"""The results as a CSV file and as text tables (plain or Markdown)."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Any

from .children._child import PHASES
from .results import Results, percentile, reduction_pct
from .tasks import KIND_LABEL, PAPER_REDUCTION, TASKS

CSV_COLUMNS = [
    "experiment", "target", "backend", "kind", "device", "naive_device", "task", "clients",
    "naive_n", "naive_median_ms", "naive_p95_ms", "kaas_n", "kaas_median_ms", "kaas_p95_ms",
    "reduction_pct", "paper_reduction_pct", "naive_tasks_per_s", "kaas_tasks_per_s",
    "naive_busy_pct", "kaas_busy_pct", "naive_process_ms", "naive_import_ms", "naive_init_ms",
    "naive_compile_ms", "naive_run_ms", "note",
]


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def csv_rows(results: Results) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for target, why in results.skipped.items():
        rows.append({"experiment": "completion", "target": target, "backend": TASKS[target].backend,
                     "kind": "skipped", "task": TASKS[target].summary,
                     "paper_reduction_pct": PAPER_REDUCTION.get(target, ""), "note": why})
    for c in results.completions:
        parts = c.breakdown()
        rows.append({
            "experiment": "completion", "target": c.task.target, "backend": c.task.backend,
            "kind": KIND_LABEL[c.kind], "device": c.device, "naive_device": c.naive_device,
            "task": c.task.summary, "clients": 1,
            "naive_n": len(c.naive), "naive_median_ms": _ms(c.naive_median),
            "naive_p95_ms": _ms(percentile([r.seconds for r in c.naive], 95)),
            "kaas_n": len(c.kaas), "kaas_median_ms": _ms(c.kaas_median),
            "kaas_p95_ms": _ms(percentile(c.kaas, 95)),
            "reduction_pct": round(c.reduction, 2), "paper_reduction_pct": PAPER_REDUCTION.get(c.task.target, ""),
            **{f"naive_{p}_ms": _ms(v) for p, v in parts.items()},
        })
    for s in results.sharing:
        rows.append({
            "experiment": "sharing", "target": s.task.target, "backend": s.task.backend,
            "kind": KIND_LABEL[s.kind], "task": s.task.summary, "clients": s.clients,
            "naive_n": len(s.naive.latencies), "naive_median_ms": _ms(statistics.median(s.naive.latencies)),
            "naive_p95_ms": _ms(percentile(s.naive.latencies, 95)),
            "kaas_n": len(s.kaas.latencies), "kaas_median_ms": _ms(statistics.median(s.kaas.latencies)),
            "kaas_p95_ms": _ms(percentile(s.kaas.latencies, 95)),
            "reduction_pct": round(reduction_pct(statistics.median(s.naive.latencies),
                                                 statistics.median(s.kaas.latencies)), 2),
            "naive_tasks_per_s": round(s.naive.throughput, 3), "kaas_tasks_per_s": round(s.kaas.throughput, 3),
            "naive_busy_pct": round(100 * s.naive.busy, 1), "kaas_busy_pct": round(100 * s.kaas.busy, 1),
        })
    return rows


def write_csv(results: Results, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(results.csv_rows())
    return path


def _fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def _render(head: list[str], body: list[list[str]], markdown: bool, left: int) -> list[str]:
    """A table: the first ``left`` columns left-aligned, the rest right-aligned."""
    if markdown:
        rule = "|" + "|".join(["---"] * left + ["---:"] * (len(head) - left)) + "|"
        return ["| " + " | ".join(head) + " |", rule] + ["| " + " | ".join(r) + " |" for r in body]
    widths = [max(len(c) for c in col) for col in zip(head, *body)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(head), line(["-" * w for w in widths])] + [line(r) for r in body]


def tables(results: Results, markdown: bool) -> list[str]:
    lines = ["Completion time of one fine-grained task: naive (fresh process) vs KaaS (warm pool)", ""]
    head = ["target", "runs on", "naive median ms", "naive p95 ms", "KaaS median ms", "KaaS p95 ms",
            "reduction", "paper"]
    body = []
    for c in results.completions:
        paper = PAPER_REDUCTION.get(c.task.target)
        body.append([c.task.target, KIND_LABEL[c.kind], _fmt_ms(c.naive_median),
                     _fmt_ms(percentile([r.seconds for r in c.naive], 95)), _fmt_ms(c.kaas_median),
                     _fmt_ms(percentile(c.kaas, 95)), f"{c.reduction:.1f} %",
                     f"{paper:.1f} %" if paper is not None else "-"])
    for target, why in results.skipped.items():
        body.append([target, "not run", "-", "-", "-", "-", "-", f"{PAPER_REDUCTION[target]:.1f} %"
                     if target in PAPER_REDUCTION else "-"])
    lines += _render(head, body, markdown, 2)
    lines.append("")
    for c in results.completions:
        lines.append(f"{c.task.target}: {c.task.summary}; KaaS on {c.device}; naive on {c.naive_device}")
    for target, why in results.skipped.items():
        lines.append(f"{target}: skipped: {why}")

    lines += ["", "Where the naive time goes (median ms of each phase; process = interpreter start-up and exit)", ""]
    head = ["target", "naive median ms", "process", "import", "device init", "compile", "run"]
    body = []
    for c in results.completions:
        parts = c.breakdown()
        body.append([c.task.target, _fmt_ms(c.naive_median)] + [_fmt_ms(parts[p]) for p in ("process",) + PHASES])
    lines += _render(head, body, markdown, 1)
    if any("Portable Computing Language" in c.naive_device for c in results.completions):
        lines += ["", "PoCL generates a kernel's machine code at its first launch, so on PoCL the naive run "
                      "phase holds code generation too"]

    if results.sharing:
        s0 = results.sharing[0]
        lines += ["", f"Sharing: {s0.clients} clients, each a stream of tasks; naive holds the one device per "
                      f"task (tasks queue), KaaS shares the warm devices", ""]
        head = ["target", "runs on", "naive tasks/s", "KaaS tasks/s", "naive p50 / p95 ms", "KaaS p50 / p95 ms",
                "naive device busy", "KaaS device busy"]
        body = []
        for s in results.sharing:
            body.append([
                s.task.target, KIND_LABEL[s.kind], f"{s.naive.throughput:.2f}", f"{s.kaas.throughput:.1f}",
                f"{_fmt_ms(statistics.median(s.naive.latencies))} / {_fmt_ms(percentile(s.naive.latencies, 95))}",
                f"{_fmt_ms(statistics.median(s.kaas.latencies))} / {_fmt_ms(percentile(s.kaas.latencies, 95))}",
                f"{100 * s.naive.busy:.1f} %", f"{100 * s.kaas.busy:.1f} %",
            ])
        lines += _render(head, body, markdown, 2)
        lines += ["", "device busy: naive, the share of the time the device ran a task's kernel (its run phase); "
                      "KaaS, the share of the last 10 s in which a call ran on the device (pool.metrics busy_10s, "
                      "mean over the workers' devices)"]
    return lines
