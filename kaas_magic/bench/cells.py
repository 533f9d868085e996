"""``kaas bench cells``: what a cell costs where users feel it, in a real Jupyter kernel.

``kaas bench overhead`` times calls in-process; a notebook user waits for the whole cell: the
kernel receiving it, IPython running the magic, the run view's display and widget messages,
the reply. Here a real kernel (nbclient, as a frontend) runs the same one-line cell
(``q = 1``) as a plain cell, as ``%%kaas cpu --quiet`` and as ``%%kaas cpu`` with its run view,
interleaved, ``--cells`` times each, on a warm embedded pool, and the cost of each is read from
nbclient's timing metadata: from the kernel going busy to going idle
(``iopub.status.busy`` to ``iopub.status.idle``). Prints medians and 90th percentiles, and the
differences to the plain cell. Asserts nothing.

``--browser`` adds rows for the same cells run by JupyterLab in headless Chromium (Debian's,
driven by Playwright), the frontend rendering every message the cells send on the same
machine: JupyterLab runs them all ("Run All Cells") with its ``recordTiming`` setting on, so
each cell's metadata gets the same busy and idle timestamps, which are read from the saved
notebook. Those rows differ from the plain cell of the browser's own run.
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


def _notebook(rounds: int):
    """The notebook both runs execute: the setup, the interleaved cells, ``%kaas stop``; and
    for each cell between, its kind and whether it is timed."""
    import nbformat

    setup = ("%load_ext kaas_magic\nimport kaas_magic\nkaas_magic.start(1).wait_ready()")
    cells = [nbformat.v4.new_code_cell(setup)]
    order = []
    for i in range(WARM + rounds):
        for kind, code in KINDS.items():
            cells.append(nbformat.v4.new_code_cell(code))
            order.append((kind, i >= WARM))
    cells.append(nbformat.v4.new_code_cell("%kaas stop"))
    nb = nbformat.v4.new_notebook(
        cells=cells, metadata={"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}})
    return nb, order


def _times(nb, order) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for cell, (kind, timed) in zip(nb.cells[1:-1], order):
        if timed:
            times[kind].append(_seconds(cell.metadata["execution"]))
    return times


def measure(rounds: int) -> dict[str, list[float]]:
    """Seconds per cell of each kind, from one real kernel."""
    import os

    from nbclient import NotebookClient

    nb, order = _notebook(rounds)
    previous = os.environ.get("DASK_KAAS__BACKENDS")
    os.environ["DASK_KAAS__BACKENDS"] = '["numpy"]'  # the kernel, and so its workers, inherit it
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", record_timing=True).execute()
    finally:
        if previous is None:
            os.environ.pop("DASK_KAAS__BACKENDS", None)
        else:
            os.environ["DASK_KAAS__BACKENDS"] = previous
    return _times(nb, order)


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
BROWSER_NEEDS = ("playwright", "jupyterlab", "nbformat")
# JupyterLab settings: the cells' timing recorded in their metadata, every cell in the DOM
# (rendered, as a user scrolling through would have them), no news toast.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"recordTiming": True, "windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
}


def browser_missing() -> list[str]:
    """What the browser rows need and this machine lacks (empty: they can run)."""
    import importlib.util
    from pathlib import Path

    missing = [name for name in BROWSER_NEEDS if importlib.util.find_spec(name) is None]
    if not Path(CHROMIUM).exists():
        missing.append(f"chromium ({CHROMIUM})")
    return missing


def measure_browser(rounds: int, timeout: float = 600) -> dict[str, list[float]]:
    """Seconds per cell of each kind, the cells run by JupyterLab in headless Chromium."""
    import json
    import os
    import re
    import secrets
    import socket
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.request
    from pathlib import Path

    import nbformat
    from playwright.sync_api import expect, sync_playwright

    repo = Path(__file__).resolve().parents[2]
    nb, order = _notebook(rounds)
    with tempfile.TemporaryDirectory(prefix="kaas-bench-cells-") as tmp:
        root = Path(tmp)
        path = root / "bench-cells.ipynb"
        nbformat.write(nb, path)
        for name, values in LAB_SETTINGS.items():
            (root / ".settings" / name).parent.mkdir(parents=True, exist_ok=True)
            (root / ".settings" / name).write_text(json.dumps(values))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        token = secrets.token_hex(16)
        env = {
            **os.environ,
            "JUPYTER_CONFIG_DIR": str(root / ".jupyter"),  # no user config
            "JUPYTER_RUNTIME_DIR": str(root / ".runtime"),
            "DASK_KAAS__BACKENDS": '["numpy"]',
            # The kernel and its workers import kaas_magic from this checkout.
            "PYTHONPATH": os.pathsep.join([str(repo)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
        }
        base = f"http://127.0.0.1:{port}"
        with open(root / "lab.log", "w") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
                 "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
                 f"--LabApp.user_settings_dir={root / '.settings'}", f"--LabApp.workspaces_dir={root / '.workspaces'}"],
                cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while True:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not start:\n{(root / 'lab.log').read_text()[-2000:]}")
                try:
                    with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2):
                        break
                except OSError:
                    time.sleep(0.3)
            expect.set_options(timeout=60_000)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                try:
                    page = browser.new_page(viewport={"width": 1400, "height": 900})
                    page.set_default_timeout(60_000)  # each step of the page; the cells get ``timeout``
                    page.goto(f"{base}/lab/tree/{path.name}?token={token}")
                    cells = page.locator(".jp-Notebook .jp-Cell")
                    cells.nth(len(nb.cells) - 1).wait_for()
                    page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for()
                    cells.first.locator(".jp-InputArea-editor").click()
                    page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
                    page.locator(".lm-Menu-item[data-command='runmenu:run-all']").click()
                    prompt = cells.nth(len(nb.cells) - 1).locator(".jp-InputArea-prompt")
                    expect(prompt).to_have_text(re.compile(r"\[\d+\]"), timeout=timeout * 1000)
                    # Saved (Ctrl+S) until the file holds every cell's timing.
                    deadline = time.monotonic() + 120
                    while True:
                        page.keyboard.press("Control+s")
                        time.sleep(2)
                        saved = nbformat.read(path, as_version=4)
                        if all("iopub.status.idle" in c.metadata.get("execution", {}) for c in saved.cells[1:-1]):
                            break
                        if time.monotonic() > deadline:
                            raise RuntimeError("JupyterLab did not save the cells' timing")
                finally:
                    browser.close()
        finally:
            try:  # shuts its kernel down first
                urllib.request.urlopen(urllib.request.Request(f"{base}/api/shutdown?token={token}", method="POST"),
                                       timeout=10)
                server.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                server.terminate()
                server.wait(timeout=30)
    return _times(saved, order)


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def main(args: argparse.Namespace) -> int:
    rounds = args.cells
    print("\n".join(header(rounds)[:3]))
    print(f"{rounds} cells of each kind, interleaved, after {WARM} untimed rounds; one real kernel (nbclient), "
          f"a warm embedded pool of 1 NumPy worker; cost = kernel busy to idle (nbclient timing metadata)")
    browser = getattr(args, "browser", False)
    if browser:
        missing = browser_missing()
        if missing:
            print(f"--browser needs {', '.join(missing)}")
            return 2
        print("browser attached: the same cells run by JupyterLab (Run All Cells, recordTiming on) in headless "
              "Chromium on this machine; cost = the same kernel timestamps, from the saved notebook")
    rows = [("", measure(rounds))]
    if browser:
        rows.append((", browser attached", measure_browser(rounds)))
    print("| cell | median ms | p90 ms | median over a plain cell |")
    print("|---|---:|---:|---:|")
    for suffix, times in rows:
        plain = statistics.median(times["plain cell"])
        for kind, values in times.items():
            median = statistics.median(values)
            print(f"| {kind}{suffix} | {1e3 * median:.2f} | {1e3 * _p90(values):.2f} | "
                  f"{'' if kind == 'plain cell' else f'{1e3 * (median - plain):+.2f} ms'} |")
    return 0
