#!/usr/bin/env python
"""Regenerate the stored outputs of the tour: python scripts/execute_notebooks.py [NAME ...]

The notebooks in notebooks/ are stored executed, with the outputs of a real run, so they read
on GitHub and nbviewer. This script is how those outputs are made: it runs each notebook top to
bottom in a real Jupyter kernel with nbclient, the way tests/test_notebooks.py does (kernel
python3, the notebook's own folder as working directory, a 300 s timeout per cell; each
notebook allows labelled CPU stand-ins itself, in its first cell or with ``--fallback``, and
starts and stops its own pool), then writes it back in place. Volatile noise is stripped: execution timing metadata, and the
ipywidgets state (the run views and the monitor leave static HTML records in the outputs).
Consecutive prints to one stream are merged into one output.
The checks live in the tests, which read the same outputs; the tour itself asserts nothing.

With names (``01-quickstart.ipynb`` or ``01``), only those notebooks are run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
MAX_BYTES = 300_000  # a stored notebook must stay readable on GitHub


def execute(path: Path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", record_timing=False, store_widget_state=False,
                   coalesce_streams=True, resources={"metadata": {"path": str(path.parent)}}).execute()
    return nb


def clean(nb):
    """Drops what changes from run to run without being output: timings and widget state."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        cell.metadata.pop("collapsed", None)
    return nb


def main(argv: list[str] | None = None) -> int:
    import nbformat

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebooks to run (default: all of notebooks/*.ipynb)")
    args = parser.parse_args(argv)
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    if args.names:
        paths = [p for p in paths if any(p.name == n or p.name.startswith(n) for n in args.names)]
        if not paths:
            parser.error(f"no notebook matches {args.names}")
    failed = False
    for path in paths:
        start = time.monotonic()
        print(f"{path.name}: running ...", flush=True)
        nb = clean(execute(path))
        nbformat.validate(nb)
        nbformat.write(nb, path)
        size = path.stat().st_size
        print(f"{path.name}: {time.monotonic() - start:.0f} s, {size / 1000:.0f} kB", flush=True)
        if size > MAX_BYTES:
            print(f"{path.name}: larger than {MAX_BYTES / 1000:.0f} kB", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
