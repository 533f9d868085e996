"""``kaas bench cells``: what a cell costs where users feel it, in a real Jupyter kernel.

``kaas bench overhead`` times calls in-process; a notebook user waits for the whole cell: the
kernel receiving it, IPython running the magic, the run view's display and widget messages,
the reply. Here a real kernel (nbclient, as a frontend) runs the same one-line cell
(``q = 1``) as a plain cell, as ``%%kaas cpu --quiet`` and as ``%%kaas cpu`` with its run view,
interleaved, ``--cells`` times each, on a warm embedded pool, and the cost of each is read from
nbclient's timing metadata: from the kernel going busy to going idle
(``iopub.status.busy`` to ``iopub.status.idle``). Prints medians and 90th percentiles, and the
differences to the plain cell. Asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
from datetime import datetime

from .common import header

KINDS = {
    "plain cell": "q = 1",
    "%%kaas cpu --quiet": "%%kaas cpu --quiet\nq = 1",
    "%%kaas cpu (run view)": "%%kaas cpu\nq = 1",
}
WARM = 5  # untimed rounds first: imports, links, caches


def _seconds(execution: dict) -> float:
    start = datetime.fromisoformat(execution["iopub.status.busy"].replace("Z", "+00:00"))
    end = datetime.fromisoformat(execution["iopub.status.idle"].replace("Z", "+00:00"))
    return (end - start).total_seconds()


def measure(rounds: int) -> dict[str, list[float]]:
    """Seconds per cell of each kind, from one real kernel."""
    import os

    import nbformat
    from nbclient import NotebookClient

    setup = ("%load_ext kaas_magic\nimport kaas_magic\nkaas_magic.start(1).wait_ready()")
    cells = [nbformat.v4.new_code_cell(setup)]
    order = []
    for i in range(WARM + rounds):
        for kind, code in KINDS.items():
            cells.append(nbformat.v4.new_code_cell(code))
            order.append((kind, i >= WARM))
    cells.append(nbformat.v4.new_code_cell("%kaas stop"))
    nb = nbformat.v4.new_notebook(cells=cells)
    previous = os.environ.get("DASK_KAAS__BACKENDS")
    os.environ["DASK_KAAS__BACKENDS"] = '["numpy"]'  # the kernel, and so its workers, inherit it
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", record_timing=True).execute()
    finally:
        if previous is None:
            os.environ.pop("DASK_KAAS__BACKENDS", None)
        else:
            os.environ["DASK_KAAS__BACKENDS"] = previous
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for cell, (kind, timed) in zip(nb.cells[1:-1], order):
        if timed:
            times[kind].append(_seconds(cell.metadata["execution"]))
    return times


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def main(args: argparse.Namespace) -> int:
    rounds = args.cells
    print("\n".join(header(rounds)[:3]))
    print(f"{rounds} cells of each kind, interleaved, after {WARM} untimed rounds; one real kernel (nbclient), "
          f"a warm embedded pool of 1 NumPy worker; cost = kernel busy to idle (nbclient timing metadata)")
    times = measure(rounds)
    plain = statistics.median(times["plain cell"])
    print("| cell | median ms | p90 ms | median over a plain cell |")
    print("|---|---:|---:|---:|")
    for kind, values in times.items():
        median = statistics.median(values)
        print(f"| {kind} | {1e3 * median:.2f} | {1e3 * _p90(values):.2f} | "
              f"{'' if kind == 'plain cell' else f'+{1e3 * (median - plain):.2f} ms'} |")
    return 0
