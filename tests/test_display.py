"""Rich output from remote cells (issue 14): ``display()``, ``IPython.display`` and
matplotlib figures made in a ``%%kaas`` cell appear in the calling cell, in order with its
prints; through the API they are in ``RunResult.displays``."""

from __future__ import annotations

import base64
import contextlib
import io
import sys

import pytest
from IPython.core.displaypub import DisplayPublisher

import kaas_magic

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class _Text(io.TextIOBase):
    def __init__(self, events: list):
        self.events = events

    def write(self, text: str) -> int:
        if self.events and self.events[-1][0] == "text":
            self.events[-1] = ("text", self.events[-1][1] + text)
        else:
            self.events.append(("text", text))
        return len(text)

    def writable(self) -> bool:
        return True


class _Publisher(DisplayPublisher):
    def __init__(self, events: list):
        super().__init__()
        self.events = events

    def publish(self, data, metadata=None, source=None, *, transient=None, update=False):
        self.events.append(("display", data, metadata or {}, transient or {}, update))

    def clear_output(self, wait=False):
        self.events.append(("clear", wait))


@contextlib.contextmanager
def recorded(ip):
    """What a cell shows, in the order it is shown: ("text", printed), ("display", data,
    metadata, transient, update), ("clear", wait)."""
    events: list = []
    saved = sys.stdout, ip.display_pub
    sys.stdout, ip.display_pub = _Text(events), _Publisher(events)
    try:
        yield events
    finally:
        sys.stdout, ip.display_pub = saved


def run(ip, cell: str) -> list:
    with recorded(ip) as events:
        result = ip.run_cell(cell)
    assert result.success, (result.error_in_exec, events)
    return events


def displays(events: list) -> list[dict]:
    return [e[1] for e in events if e[0] == "display"]


def pngs(events: list) -> list[bytes]:
    return [base64.b64decode(d["image/png"]) for d in displays(events) if "image/png" in d]


def one_worker(pool) -> str:
    return sorted(r.address for r in pool.routes())[0]


# --- (a) display() and IPython.display, in an in-process IPython shell -------------------


def test_display_html_markdown_and_a_dict_in_order_with_prints(ip):
    events = run(ip, (
        "%%kaas cpu --quiet\n"
        "from IPython.display import HTML\n"
        "print('one')\n"
        "display(HTML('<b>x</b>'))\n"  # the display the cell's namespace has
        "print('two')\n"
        "from IPython.display import Markdown, display\n"  # IPython's own, routed on the worker
        "display(Markdown('# hi'))\n"
        "print('three')\n"
        "display({'a': 1})\n"
    ))
    kinds = [(e[0], e[1] if e[0] == "text" else sorted(e[1])) for e in events]
    assert kinds == [
        ("text", "one\n"), ("display", ["text/html", "text/plain"]),
        ("text", "two\n"), ("display", ["text/markdown", "text/plain"]),
        ("text", "three\n"), ("display", ["text/plain"]),
    ], events
    html, markdown, plain = displays(events)
    assert html["text/html"] == "<b>x</b>" and markdown["text/markdown"] == "# hi"
    assert plain["text/plain"] == "{'a': 1}"


def test_display_id_updates_and_clear_output(ip):
    events = run(ip, (
        "%%kaas cpu --quiet\n"
        "from IPython.display import HTML, update_display, clear_output\n"
        "display(HTML('<i>first</i>'), display_id='kaas-test')\n"
        "update_display(HTML('<i>second</i>'), display_id='kaas-test')\n"
        "clear_output(wait=True)\n"
    ))
    first, second, clear = events
    assert first[0] == "display" and first[1]["text/html"] == "<i>first</i>"
    assert first[3] == {"display_id": "kaas-test"} and not first[4]
    assert second[1]["text/html"] == "<i>second</i>" and second[3] == {"display_id": "kaas-test"} and second[4]
    assert clear == ("clear", True)


def test_the_notebooks_own_display_sent_to_the_worker_still_displays(ip):
    from IPython.display import display

    ip.user_ns["display"] = display  # `from IPython.display import display` in the notebook
    events = run(ip, "%%kaas cpu --quiet\nprint('x')\ndisplay({'b': 2})\n")
    assert events == [("text", "x\n"), ("display", {"text/plain": "{'b': 2}"}, {}, {}, False)], events


def test_threads_the_cell_starts_display_in_its_cell(ip):
    events = run(ip, (
        "%%kaas cpu --quiet\n"
        "import threading\n"
        "t = threading.Thread(target=lambda: display({'from': 'thread'}))\n"
        "t.start(); t.join()\n"
        "del t\n"
    ))
    assert [d["text/plain"] for d in displays(events)] == ["{'from': 'thread'}"]


# --- (b) matplotlib ----------------------------------------------------------------------


def test_a_figure_left_open_is_shown_as_one_png_and_closed(ip, pool):
    pytest.importorskip("matplotlib")
    worker = one_worker(pool)
    events = run(ip, (
        f"%%kaas cpu --quiet --worker {worker}\n"
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3], [1, 4, 9]);\n"
    ))
    (png,) = pngs(events)
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1024
    (shown,) = displays(events)
    assert shown["text/plain"].startswith("<Figure size")
    events = run(ip, (
        f"%%kaas cpu --quiet --worker {worker}\n"
        "import matplotlib.pyplot as plt\n"
        "plt.figure(); plt.plot([1, 2]); plt.show()\n"
        "plt.figure(); plt.plot([2, 1]); plt.show()\n"
        "print(__import__('matplotlib').get_backend())\n"
    ))
    assert len(pngs(events)) == 2 and all(p.startswith(PNG_SIGNATURE) and len(p) > 1024 for p in pngs(events))
    assert events[-1][0] == "text" and events[-1][1].lower() == "agg\n", events  # the worker's backend
    run(ip, f"%%kaas cpu --quiet --worker {worker}\n"
            "import matplotlib.pyplot as plt\nopen_figures = len(plt.get_fignums())\n")
    assert ip.user_ns["open_figures"] == 0  # nothing left open on the worker


def test_a_figure_shown_with_display_is_not_shown_again(ip):
    pytest.importorskip("matplotlib")
    events = run(ip, (
        "%%kaas cpu --quiet\n"
        "import matplotlib.pyplot as plt\n"
        "fig, ax = plt.subplots()\n"
        "ax.plot([3, 1, 2])\n"
        "display(fig)\n"
        "del fig, ax\n"
    ))
    (png,) = pngs(events)
    assert png.startswith(PNG_SIGNATURE)


def test_concurrent_calls_on_one_worker_keep_their_own_figures(pool):
    pytest.importorskip("matplotlib")
    from concurrent.futures import ThreadPoolExecutor

    worker = one_worker(pool)
    code = (
        "import time\nimport matplotlib.pyplot as plt\n"
        "plt.figure(figsize=(size, size))\n"
        "time.sleep(0.5)\n"
        "plt.plot([1, 2, 3])\n"  # pyplot's current figure: this call's own
        "time.sleep(0.5)\n"
    )

    def call(size):
        return pool.run(code, "cpu", inputs={"size": size}, worker=worker, stdout=io.StringIO())

    with ThreadPoolExecutor(2) as ex:
        small, large = ex.map(call, (2, 4))
    for result, size in ((small, 2), (large, 4)):
        (shown,) = result.displays
        assert shown["data"]["text/plain"].startswith(f"<Figure size {size * 100}x{size * 100} with 1 Axes>"), shown


def test_the_hooks_import_nothing_and_choose_agg_when_matplotlib_is_imported():
    """A worker's hooks cost a cell that does not use them nothing: neither IPython nor
    matplotlib is imported for it; matplotlib, once imported, draws with Agg even where a
    display is set; outside a call, IPython's display does what it did (prints)."""
    pytest.importorskip("matplotlib")
    import os
    import subprocess

    code = (
        "import sys\n"
        "from kaas_magic.worker import display as d\n"
        "d.install()\n"
        "assert 'matplotlib' not in sys.modules and 'IPython' not in sys.modules\n"
        "import matplotlib.pyplot as plt\n"
        "print(plt.get_backend().lower())\n"
        "from IPython.display import display\n"
        "display('outside')\n"
    )
    env = {**os.environ, "DISPLAY": ":0"}
    env.pop("MPLBACKEND", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["agg", "outside"]


# --- (c) a real kernel -------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernel():
    from test_cell import kernel_with_kaas

    with kernel_with_kaas() as k:
        yield k


@pytest.mark.timeout(400)
def test_a_real_kernel_gets_display_data_with_the_right_mime_types(kernel):
    pytest.importorskip("matplotlib")
    cell = kernel.run(
        "%%kaas cpu --quiet\n"
        "from IPython.display import HTML, Markdown\n"
        "print('before')\n"
        "display(HTML('<b>bold</b>'))\n"
        "display(Markdown('*md*'))\n"
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3]);\n",
        timeout=300,
    )
    assert cell.status == "ok", cell.text()
    shown: list = []
    for o in cell.outputs:
        if o["type"] == "stream" and shown and shown[-1][0] == "stream":  # a print may come in pieces
            shown[-1] = ("stream", shown[-1][1] + o["text"])
        else:
            shown.append((o["type"], sorted(o["data"])) if "data" in o else (o["type"], o.get("text")))
    assert shown == [
        ("stream", "before\n"),
        ("display_data", ["text/html", "text/plain"]),
        ("display_data", ["text/markdown", "text/plain"]),
        ("display_data", ["image/png", "text/plain"]),
    ], shown
    png = base64.b64decode(cell.of("display_data")[-1]["data"]["image/png"])
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1024


# --- (d) the API -------------------------------------------------------------------------


def test_run_result_displays(pool):
    out = io.StringIO()
    result = pool.run("display(1)", "cpu", stdout=out)
    assert result.displays == [{"data": {"text/plain": "1"}, "metadata": {}}]
    assert out.getvalue() == "1\n"  # outside IPython's cell: its text, so a script sees it
    assert result.value is None


def test_an_oversized_display_becomes_a_note(pool):
    from kaas_magic.call_stream import CallStream

    code = f"display({{'text/html': 'x' * {CallStream.MAX_DISPLAY + 1}}}, raw=True)"
    result = pool.run(code, "cpu", stdout=io.StringIO())
    (shown,) = result.displays
    assert list(shown["data"]) == ["text/plain"]
    assert "was not sent" in shown["data"]["text/plain"] and "text/html" in shown["data"]["text/plain"]


def test_display_outside_ipython_prints_the_text(pool):
    """Pool.run from a script (no shell): the displays are collected, their text printed."""
    out = io.StringIO()
    result = pool.run("from IPython.display import HTML\ndisplay(HTML('<p>p</p>'))\nh = 1", "cpu", stdout=out)
    (shown,) = result.displays
    assert shown["data"]["text/html"] == "<p>p</p>"
    assert "HTML object" in out.getvalue()
    assert kaas_magic.last_run().ok
