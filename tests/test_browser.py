"""What a user sees in JupyterLab, in headless Chromium: the run view counting its elapsed
time while it runs and reaching "done" with its phases in numbers, the monitor's occupancy
rising during a long cell and falling after, its history, and the panel in the right side
area; in JupyterLab's light theme and in its dark one (where an idle bar's track must be
dark). Screenshots of both themes go to docs/screenshots/ (see docs/views.md).

JupyterLab runs on 127.0.0.1 with a random port and token, in a temporary folder holding a
notebook written here; its kernel starts a one-worker NumPy pool so the one cpu device is
the one the long cell occupies. One server per theme: every test runs once per theme, the
light theme's first. Chromium is Debian's, driven by Playwright (never
``playwright install``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
NOTEBOOK = "kaas-browser.ipynb"

missing = [name for name in ("playwright", "jupyterlab", "ipywidgets", "sidecar") if importlib.util.find_spec(name) is None]
if not Path(CHROMIUM).exists():
    missing.append(f"chromium ({CHROMIUM}; apt-get install chromium)")
pytestmark = [
    pytest.mark.skipif(bool(missing), reason=f"browser tests need {', '.join(missing)}"),
    pytest.mark.timeout(600),
]

# One cell per step; the tests run them by index.
SETUP, RUN_VIEW, MONITOR, LONG, SCALE_UP, SCALE_DOWN, PANEL, INTERRUPTED, SLEEPS, BACKGROUND, MEANWHILE = range(11)
CELLS = [
    "import kaas_magic as kaas\n"
    "import kaas_magic.config\n"
    "kaas.config.set(fallback=True)\n"
    "%load_ext kaas_magic\n"
    "kaas.pool().wait_ready(timeout=240)",
    "%%kaas cpu\n"
    "import time\n"
    "time.sleep(0.2)\n"
    "print('hello from the worker')",
    "%kaas monitor",
    "%%kaas cpu\n"
    "import time\n"
    "time.sleep(6)  # long enough to be seen in the monitor\n"
    "slept = True",
    "kaas.pool().cluster.scale(2)",
    "kaas.pool().cluster.scale(1)",
    "%kaas panel",
    "%%kaas cpu\n"
    "import time\n"
    "for _ in range(600):  # interrupted by the test, between two short sleeps\n"
    "    time.sleep(0.1)",
    "%%kaas cpu\n"
    "import time\n"
    "time.sleep(6)  # the run view counts the seconds meanwhile\n"
    "slept = 6",
    "%%kaas cpu --background\n"
    "import time\n"
    "print('background started', flush=True)\n"
    "time.sleep(4)\n"
    "print('background done')\n"
    "'the value ' * 2",
    "%%kaas cpu\n"
    "import time\n"
    "time.sleep(1)\n"
    "print('meanwhile out')",
]

# JupyterLab settings for a quiet, predictable page: every cell in the DOM, no news toast.
SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
}
THEMES = {"light": "JupyterLab Light", "dark": "JupyterLab Dark"}
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_notebook(path: Path) -> None:
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(cells=[new_code_cell(source) for source in CELLS],
                      metadata={"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}})
    nbformat.write(nb, path)


def wait_for_server(url: str, server: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"JupyterLab exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"JupyterLab did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module", params=list(THEMES))
def theme(request) -> str:
    """"light" or "dark": the module's tests run once in each, one JupyterLab each."""
    return request.param


def luminance(css_colour: str) -> float:
    """Relative luminance (0 black .. 1 white) of a computed "rgb(r, g, b)" / "rgba(...)"."""
    r, g, b = (int(v) / 255 for v in re.findall(r"[\d.]+", css_colour)[:3])
    linear = [v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4 for v in (r, g, b)]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def shot(name: str, theme: str) -> Path:
    return SCREENSHOTS / f"{name}-{theme}.png"


@pytest.fixture(scope="module")
def lab(tmp_path_factory, theme):
    """A JupyterLab server of this test's own, in ``theme``; yields its notebook URL."""
    root = tmp_path_factory.mktemp(f"lab-{theme}")
    write_notebook(root / NOTEBOOK)
    settings = root / ".settings"
    themed = {**SETTINGS, "@jupyterlab/apputils-extension/themes.jupyterlab-settings": {"theme": THEMES[theme]}}
    for name, values in themed.items():
        (settings / name).parent.mkdir(parents=True, exist_ok=True)
        (settings / name).write_text(json.dumps(values))
    port, token = free_port(), secrets.token_hex(16)
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(root / ".jupyter"),  # no user config
        "JUPYTER_RUNTIME_DIR": str(root / ".runtime"),
        "DASK_KAAS__BACKENDS": '["numpy"]',  # the kernel's pool: one NumPy worker
        "DASK_KAAS__POOL__N_WORKERS": "1",
        # The kernel and its workers import kaas_magic from this checkout.
        "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
    }
    log = root / "lab.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
             "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
             f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={root / '.workspaces'}"],
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(f"{base}/api/status?token={token}", server, log)
        yield f"{base}/lab/tree/{NOTEBOOK}?token={token}"
    finally:
        try:  # shuts its kernels down first, so the kernel's pool closes cleanly
            urllib.request.urlopen(urllib.request.Request(f"{base}/api/shutdown?token={token}", method="POST"), timeout=10)
            server.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            server.terminate()
            server.wait(timeout=30)


@pytest.fixture(scope="module")
def page(lab, theme):
    """The notebook open in headless Chromium, with its pool started by the first cell."""
    from playwright.sync_api import expect, sync_playwright

    # Waits, not timing assertions: generous, since a 2-core machine may be busy.
    expect.set_options(timeout=120_000)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 950})
        page.set_default_timeout(120_000)
        page.goto(lab)
        page.locator(".jp-Notebook .jp-Cell").nth(len(CELLS) - 1).wait_for()
        page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for()
        page.locator(f"body[data-jp-theme-name='{THEMES[theme]}']").wait_for(state="attached")
        # the file browser off, so the screenshots show the notebook and the panel
        page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current").click()
        run_cell(page, SETUP)
        wait_until_executed(page, SETUP, timeout_s=300)
        yield page
        browser.close()


def cell(page, index: int):
    return page.locator(".jp-Notebook .jp-Cell").nth(index)


def run_cell(page, index: int) -> None:
    """Click into the cell and press Shift+Enter, as a user does; again if the page was
    not ready for it yet (the prompt still reads "[ ]:", so the cell did not start)."""
    from playwright.sync_api import expect

    prompt = cell(page, index).locator(".jp-InputArea-prompt")
    for attempt in range(3):
        cell(page, index).locator(".jp-InputArea-editor").click()
        page.keyboard.press("Shift+Enter")
        try:
            expect(prompt).not_to_have_text("[ ]:", timeout=5000)
            return
        except AssertionError:
            if attempt == 2:
                raise


def wait_until_executed(page, index: int, timeout_s: float = 120) -> None:
    """The prompt shows an execution count ("[3]:") once the cell has run, "[*]:" before."""
    from playwright.sync_api import expect

    expect(cell(page, index).locator(".jp-InputArea-prompt")).to_have_text(re.compile(r"\[\d+\]"), timeout=timeout_s * 1000)
    errors = cell(page, index).locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    assert not any("Traceback" in text for text in errors.all_inner_texts())


def phase_milliseconds(view) -> dict[str, float]:
    """{"queue": 0.42, ...} read off the view's legend ("execute 250.0 ms")."""
    values = {}
    for text in view.locator(".kaas-phase-value").all_inner_texts():
        label, number, unit = re.fullmatch(r"(.+?) ([\d.]+) (ms|s)", text.strip()).groups()
        values[label] = float(number) * (1000 if unit == "s" else 1)
    return values


def test_run_view_reaches_done_with_phase_numbers_and_the_print_below(page, theme):
    from playwright.sync_api import expect

    run_cell(page, RUN_VIEW)
    view = cell(page, RUN_VIEW).locator(".kaas-run")
    expect(view).to_have_class(re.compile(r"\bkaas-state-done\b"))
    assert "[numpy]" in view.inner_text() and "warm" in view.inner_text()
    phases = phase_milliseconds(view)
    assert list(phases) == ["queue", "transfer in", "compile", "execute", "transfer out"]
    assert phases["execute"] >= 200  # the cell's 0.2 s sleep, on the worker
    assert all(value > 0 for value in phases.values())
    total = view.locator(".kaas-total").inner_text()
    assert re.fullmatch(r"total [\d.]+ m?s", total.strip()) and not total.strip().startswith("total 0.00")

    outputs = cell(page, RUN_VIEW).locator(".jp-OutputArea-output")
    texts = outputs.all_inner_texts()
    assert "hello from the worker" in texts[-1] and "hello" not in texts[0]  # under the view
    cell(page, RUN_VIEW).screenshot(path=shot("run-view-done", theme))


def test_run_view_counts_elapsed_seconds_while_the_cell_runs(page, theme):
    from playwright.sync_api import expect

    run_cell(page, SLEEPS)
    view = cell(page, SLEEPS).locator(".kaas-run")
    expect(view).to_have_class(re.compile(r"\bkaas-state-running\b"))
    time.sleep(1.2)
    cell(page, SLEEPS).screenshot(path=shot("run-view", theme))  # running, its counter showing
    elapsed = view.locator(".kaas-elapsed")
    expect(elapsed).to_be_visible(timeout=5000)
    first = elapsed.inner_text()
    expect(elapsed).not_to_have_text(first, timeout=5000)  # it moves on while the cell sleeps
    expect(view).to_have_class(re.compile(r"\bkaas-state-done\b"), timeout=30_000)


def test_monitor_occupancy_rises_during_a_long_cell_and_drops_after(page, theme):
    from playwright.sync_api import expect

    run_cell(page, MONITOR)
    row = cell(page, MONITOR).locator(".kaas-monitor .kaas-row.kaas-target-cpu")
    in_flight = row.locator(".kaas-in-flight")
    expect(in_flight).to_have_text(re.compile(r"^0/\d+$"))

    run_cell(page, LONG)
    expect(cell(page, LONG).locator(".kaas-run")).to_have_class(re.compile(r"\bkaas-state-running\b"))
    expect(in_flight).to_have_text(re.compile(r"^[1-9]\d*/\d+$"))  # while the 6 s cell sleeps

    expect(cell(page, LONG).locator(".kaas-run")).to_have_class(re.compile(r"\bkaas-state-done\b"))
    expect(in_flight).to_have_text(re.compile(r"^0/\d+$"))
    busy = row.locator(".kaas-busy-10s").inner_text()
    assert re.fullmatch(r"\d+%", busy.strip()) and busy.strip() != "0%"
    # the last 60 s drawn on the row: the busy line has left the floor
    busy_line = row.locator("svg.kaas-history polyline.kaas-history-busy")
    expect(busy_line).to_have_count(1)
    heights = [float(p.split(",")[1]) for p in busy_line.get_attribute("points").split()]
    assert min(heights) < max(heights)


def test_monitor_rows_are_one_line_and_fit_900px(page):
    table = cell(page, MONITOR).locator(".kaas-monitor .kaas-table")
    header, row = table.locator("th").first.bounding_box(), table.locator(".kaas-row").first.bounding_box()
    assert row["height"] < 2 * header["height"]  # one line: no cell wraps
    assert all(th.bounding_box()["height"] <= header["height"] + 1 for th in table.locator("th").all())
    width = table.evaluate("t => t.getBoundingClientRect().width")
    assert width <= 900, f"the monitor's table is {width:.0f} px wide"


def test_monitor_shows_workers_joining_and_leaving(page, theme):
    from playwright.sync_api import expect

    monitor = cell(page, MONITOR).locator(".kaas-monitor")
    run_cell(page, SCALE_UP)
    expect(monitor.locator(".kaas-row")).to_have_count(2)
    expect(monitor.locator(".kaas-event").last).to_contain_text("joined")
    run_cell(page, SCALE_DOWN)
    expect(monitor.locator(".kaas-row")).to_have_count(1)
    expect(monitor.locator(".kaas-event").last).to_contain_text("left")
    # both marked on the history of the device that stayed
    expect(monitor.locator(".kaas-row svg.kaas-history line.kaas-mark-joined")).to_have_count(1)
    expect(monitor.locator(".kaas-row svg.kaas-history line.kaas-mark-left")).to_have_count(1)
    cell(page, MONITOR).screenshot(path=shot("monitor", theme))


def test_an_idle_bar_track_follows_the_theme(page, theme):
    """An idle device's 0% bar is an empty track: dark in the dark theme, light in the
    light one (a hard-coded light track would read as a full white bar in the dark)."""
    text = cell(page, MONITOR).locator(".kaas-monitor .kaas-row .kaas-calls").first
    bar = cell(page, MONITOR).locator(".kaas-monitor .kaas-row .kaas-occupancy .kaas-bar").first
    track_colour = bar.evaluate("b => getComputedStyle(b).backgroundColor")
    page_colour = page.locator(".jp-Notebook").first.evaluate("n => getComputedStyle(n).backgroundColor")
    text_colour = text.evaluate("t => getComputedStyle(t).color")
    if theme == "dark":
        assert luminance(track_colour) < 0.1, track_colour
        assert luminance(text_colour) > 0.5, text_colour
    else:
        assert luminance(track_colour) > 0.6, track_colour
        assert luminance(text_colour) < 0.2, text_colour
    assert abs(luminance(track_colour) - luminance(page_colour)) < 0.5  # a track, not a filled bar


def test_panel_opens_in_the_right_side_area(page, theme):
    from playwright.sync_api import expect

    run_cell(page, PANEL)
    docked = page.locator("#jp-right-stack .kaas-monitor")
    expect(docked).to_be_visible()
    expect(docked.locator(".kaas-row.kaas-target-cpu")).to_have_count(1)
    expect(page.locator(".jp-SideBar.jp-mod-right .lm-TabBar-tab", has_text="kaas pool")).to_be_visible()
    expect(docked.locator(".kaas-row svg.kaas-history polyline.kaas-history-busy")).to_have_count(1)
    card, chart = docked.locator(".kaas-row").first.bounding_box(), docked.locator("svg.kaas-history").first.bounding_box()
    assert chart["x"] + chart["width"] <= card["x"] + card["width"] + 1  # the chart fits the card
    run_cell(page, SLEEPS)  # the panel follows a call while the notebook shows the run view
    expect(docked.locator(".kaas-in-flight")).to_have_text(re.compile(r"^[1-9]\d*/\d+$"))
    time.sleep(1.5)
    page.screenshot(path=shot("panel", theme))
    expect(cell(page, SLEEPS).locator(".kaas-run")).to_have_class(re.compile(r"\bkaas-state-done\b"), timeout=30_000)


def test_interrupted_cell_leaves_a_cancelled_view(page):
    from playwright.sync_api import expect

    run_cell(page, INTERRUPTED)
    view = cell(page, INTERRUPTED).locator(".kaas-run")
    expect(view).to_have_class(re.compile(r"\bkaas-state-running\b"))
    page.get_by_title("Interrupt the kernel").click()  # the toolbar's stop button
    expect(view).to_have_class(re.compile(r"\bkaas-state-cancelled\b"))
    expect(cell(page, INTERRUPTED).locator(".jp-OutputArea-output").last).to_contain_text("KeyboardInterrupt")


def test_a_background_cell_fills_its_own_output_while_another_cell_runs(page):
    from playwright.sync_api import expect

    run_cell(page, BACKGROUND)
    wait_until_executed(page, BACKGROUND, 30)  # it returned at once
    run_cell(page, MEANWHILE)
    background, meanwhile = cell(page, BACKGROUND), cell(page, MEANWHILE)
    expect(meanwhile.locator(".jp-OutputArea-output").last).to_contain_text("meanwhile out", timeout=60_000)
    expect(background.locator(".jp-OutputArea")).to_contain_text("background done", timeout=60_000)
    expect(background.locator(".jp-OutputArea")).to_contain_text("the value the value")
    expect(background.locator(".kaas-run")).to_have_class(re.compile(r"\bkaas-state-done\b"))
    assert "background" not in meanwhile.locator(".jp-OutputArea").inner_text()


def test_kernel_restart_leaves_no_live_looking_view(page):
    """A restarting kernel cannot reach the page, so the live monitor says by itself, in
    the cell and in the panel, that it stopped updating; run views are static already."""
    from playwright.sync_api import expect

    page.get_by_text("Kernel", exact=True).click()
    page.get_by_text("Restart Kernel\u2026").click()
    page.locator(".jp-Dialog button.jp-mod-accept").click()
    expect(cell(page, MONITOR).locator(".kaas-stale")).to_be_visible()
    expect(cell(page, MONITOR).locator(".kaas-stale")).to_contain_text("not updating since")
    expect(page.locator("#jp-right-stack .kaas-stale")).to_be_visible()
    expect(cell(page, RUN_VIEW).locator(".jupyter-widgets")).to_have_count(0)  # plain HTML, no widget
