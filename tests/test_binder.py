"""binder/: what mybinder.org reads launches a working tour. Binder itself cannot run here, so
a fresh virtual environment (no system site-packages) is built from exactly those files, the
way repo2docker does (``pip install -r binder/requirements.txt`` from the repository root,
then ``binder/postBuild`` if there is one), and the tour's notebooks run in a kernel of that
environment. Slow (a few minutes: pip installs JAX, PoCL, Qiskit ...), and in the default
suite: nothing is cached between runs but pip's own cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BINDER = ROOT / "binder"

# Runs inside the venv: executes each notebook in the venv's kernel and reports its text.
RUNNER = r"""
import json, os, sys
import nbformat
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell

kernel, paths = sys.argv[1], sys.argv[2:]
shown = {}
for path in paths:
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, new_code_cell("import sys; print('kernel python:', sys.executable)"))
    NotebookClient(nb, timeout=300, kernel_name=kernel, resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    shown[os.path.basename(path)] = "\n".join(
        out.get("text", "") + out.get("data", {}).get("text/plain", "")
        for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", []))
print(json.dumps(shown))
"""


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, command))} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def _python_version_binder_asks_for() -> str:
    runtime = (BINDER / "runtime.txt").read_text().strip()
    assert runtime.startswith("python-3."), runtime
    return runtime.removeprefix("python-")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_binder_files_build_an_environment_that_runs_the_tour(tmp_path):
    version = _python_version_binder_asks_for()
    assert f"{sys.version_info.major}.{sys.version_info.minor}" == version, (
        f"binder/runtime.txt asks for Python {version}; this test builds its venv with {sys.version.split()[0]}")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "JUPYTER_PATH")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv))

    # What repo2docker does, from the repository root.
    _run([str(python), "-m", "pip", "install", "--quiet", "-r", "binder/requirements.txt"], cwd=ROOT, env=env)
    if (BINDER / "postBuild").exists():
        _run(["bash", "binder/postBuild"], cwd=ROOT, env=env)
    # Binder's image brings Jupyter; here nbclient stands in for it, with a kernelspec of the
    # venv's own Python in a folder of this test's.
    _run([str(python), "-m", "pip", "install", "--quiet", "nbclient", "nbformat"], env=env)
    jupyter = tmp_path / "jupyter"
    _run([str(python), "-m", "ipykernel", "install", "--prefix", str(jupyter), "--name", "binder-venv"], env=env)

    # Nothing warm from this machine: kaas's, PoCL's and JAX's caches start empty, as on Binder.
    run_env = {**env, "JUPYTER_PATH": str(jupyter / "share" / "jupyter"), "XDG_CACHE_HOME": str(tmp_path / "cache"),
               "DASK_KAAS__CACHE__DIR": str(tmp_path / "kaas-cache"), "HOME": str(tmp_path)}
    notebooks = [str(ROOT / "notebooks" / name) for name in ("01-quickstart.ipynb", "03-quantum.ipynb")]
    proc = _run([str(python), "-c", RUNNER, "binder-venv", *notebooks], cwd=tmp_path, env=run_env, timeout=600)
    shown = json.loads(proc.stdout.strip().splitlines()[-1])

    for text in shown.values():
        assert f"kernel python: {python}" in text  # the venv's kernel ran it, not this machine's
    quickstart, quantum = shown["01-quickstart.ipynb"], shown["03-quantum.ipynb"]
    for line in ("cpu ok", "tpu ok", "qpu ok", "fpga ok", "gpu ok on FALLBACK"):
        assert line in quickstart  # every CPU target works in the Binder environment
    for line in ("bell ok on SIMULATOR", "rotation sweep ok", "qft ok on SIMULATOR", "registered sweep ok"):
        assert line in quantum
