"""Notebooks in notebooks/ run top to bottom in a real Jupyter kernel (nbclient)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def execute(name: str):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


def text_of(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if "text" in out:
            parts.append(out["text"])
        parts.append(out.get("data", {}).get("text/plain", ""))
    return "".join(parts)


@pytest.mark.timeout(600)
def test_quickstart_runs_and_shows_real_results():
    nb = execute("01-quickstart.ipynb")
    shown = "\n".join(text_of(c) for c in nb.cells if c.cell_type == "code")
    for line in ("cpu ok", "tpu ok", "qpu ok", "fpga ok", "gpu ok on"):
        assert line in shown
    assert "ran on" in shown  # remote print landed in the cell
    assert "FALLBACK" in shown and "SIMULATOR" in shown
    assert "caught ZeroDivisionError from tls://127.0.0.1:" in shown and "at cell line 3" in shown
    assert "kaas pool (embedded LocalCluster)" in shown


@pytest.mark.timeout(600)
def test_kernels_notebook_registers_calls_and_chains():
    nb = execute("02-kernels.ipynb")
    shown = "\n".join(text_of(c) for c in nb.cells if c.cell_type == "code")
    for line in ("scale ok", "gelu ok", "ghz ok", "chain ok", "cell chain ok"):
        assert line in shown
    assert "kernel state: {'scale': 'warm'}" in shown  # registration compiled it already
    assert "KernelArgumentError - kernel 'vector_add': argument 'a' has dtype float64, expected float32" in shown
    assert "<kaas handle float32[1000000] on CPU stand-in for fpga" in shown
    assert "registered gelu(...) [jax]" in shown and "registered scale(a: float32[n], out: out float32[n], k: float32)" in shown


@pytest.mark.timeout(600)
def test_quantum_notebook_sweeps_and_registers_circuits_on_the_simulator():
    nb = execute("03-quantum.ipynb")
    shown = "\n".join(text_of(c) for c in nb.cells if c.cell_type == "code")
    for line in ("bell ok on SIMULATOR", "rotation sweep ok", "qft ok on SIMULATOR", "registered sweep ok"):
        assert line in shown
    assert "theta = 3.14   P(1) measured 1.000" in shown  # the sweep's table, printed from its results
    assert "7 {'111': 100}" in shown  # the QFT sweep gave every value back
    assert "registered rotated_bell(...) [qiskit]" in shown and "kernel state: {'rotated_bell': 'warm'}" in shown


@pytest.mark.timeout(900)
def test_paper_notebook_reproduces_the_table_and_shows_its_plot():
    import re

    nb = execute("05-paper.ipynb")
    cells = [c for c in nb.cells if c.cell_type == "code"]
    shown = "\n".join(text_of(c) for c in cells)
    assert "command: bench_paper.reproduce(Settings.quick())" in shown and "machine: " in shown
    assert "Where the naive time goes" in shown and "Sharing: 2 clients" in shown
    # Each row a number beside the paper's figure; stand-ins and the simulator say so.
    for target, kind, paper in (("fpga", "FALLBACK|device", "68.4 %"), ("tpu", "FALLBACK|device", "98.6 %"),
                                ("qpu", "SIMULATOR", "34.9 %"), ("cpu", "device", "-")):
        assert re.search(rf"^{target} +({kind}) +reduction +-?\d+\.\d % +paper {re.escape(paper)}", shown, re.M), target
    assert "gpu: skipped: no CUDA GPU" in shown or re.search(r"^gpu +device +reduction", shown, re.M)
    assert re.search(r"paper reproduction ok: [45] targets measured", shown)
    assert any("image/png" in out.get("data", {}) for c in cells for out in c.get("outputs", []))
