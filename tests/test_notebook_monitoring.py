"""notebooks/04-monitoring.ipynb runs top to bottom in a real Jupyter kernel (nbclient) and
leaves readable records: the run views' final state, the monitor's last snapshot."""

from __future__ import annotations

import re

import pytest

from test_notebooks import execute, text_of

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def cell_with(nb, source_start: str):
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith(source_start)]
    return cell


def html_of(cell) -> str:
    return "".join(out.get("data", {}).get("text/html", "") for out in cell.get("outputs", []))


@pytest.fixture(scope="module")
def notebook():
    import os

    # Only NumPy workers: the notebook needs cpu and gpu's NumPy stand-in, and warming JAX,
    # OpenCL and Qiskit as well would only slow this 2-core machine down. Worker processes
    # inherit the kernel's environment, which inherits this one.
    os.environ["DASK_KAAS__BACKENDS"] = '["numpy"]'
    try:
        yield execute("04-monitoring.ipynb")
    finally:
        del os.environ["DASK_KAAS__BACKENDS"]


@pytest.mark.timeout(600)
def test_run_view_ends_done_with_phases_and_the_print_below_it(notebook):
    cell = cell_with(notebook, "%%kaas cpu\ns =")
    view, *printed = cell.outputs
    assert view.output_type == "display_data" and WIDGET_MIME not in view.data  # a static record
    assert "kaas-state-done" in view.data["text/html"] and "kaas-phase-execute" in view.data["text/html"]
    assert "| done |" in view.data["text/plain"]
    # the remote print follows the view in the cell's own stdout
    assert printed and all(out.output_type == "stream" and out.name == "stdout" for out in printed)
    assert "".join(out.text for out in printed).startswith("ran on ")


def test_stand_in_is_labelled(notebook):
    assert "FALLBACK" in text_of(cell_with(notebook, "%%kaas gpu"))


def test_quiet_shows_nothing(notebook):
    assert cell_with(notebook, "%%kaas cpu --quiet").outputs == []


def test_monitor_leaves_a_snapshot_with_a_row_per_device(notebook):
    cell = cell_with(notebook, "monitor = kaas.monitor()")
    (snapshot,) = cell.outputs
    assert WIDGET_MIME not in snapshot.data
    assert "monitor stopped at" in snapshot.data["text/html"]
    assert "class='kaas-row kaas-target-cpu'" in snapshot.data["text/html"]
    # taken when stopped, after the 3 s cell: nothing in flight, and that cell's device was busy
    rows = snapshot.data["text/plain"].splitlines()[1:]
    assert rows and all(" 0/4 in flight" in row for row in rows)
    assert any(int(re.search(r"(\d+)% \(60 s\)", row).group(1)) > 0 for row in rows)


def test_long_cell_and_panel_cells_end_cleanly(notebook):
    assert "kaas-state-done" in html_of(cell_with(notebook, "%%kaas cpu\nimport time"))
    assert "kaas pool closed" in text_of(cell_with(notebook, "panel.stop()"))
