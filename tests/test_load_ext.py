"""`%load_ext kaas_magic` must be cheap: no Dask, no device framework imported."""

import json
import subprocess
import sys

HEAVY = ["distributed", "dask", "jax", "qiskit", "pyopencl", "cupy", "nbformat", "ipywidgets"]

SCRIPT = f"""
import json, sys
from IPython.testing.globalipapp import start_ipython
ip = start_ipython()
already = {{m for m in {HEAVY!r} if m in sys.modules}}
ip.run_line_magic("load_ext", "kaas_magic")
assert "kaas" in ip.magics_manager.magics["cell"]
print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules and m not in already)))
"""


def test_load_ext_imports_nothing_heavy():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
