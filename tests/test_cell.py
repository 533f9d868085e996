"""A ``%%kaas`` cell behaves like a cell, in a real Jupyter kernel (jupyter_client, as a
frontend talks to it): its value is the cell's ``execute_result``; its errors are a few
lines that point at the user's code (an interrupt, a syntax error, a timeout); no Dask log
line lands in any cell; remote tracebacks name the prompt's number; the record's phases add
up to its total for every ending; the first cell after ``%load_ext`` is recorded as cold,
with the wait for the pool counted."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DASK_LOG_LINE = re.compile(r"- (distributed|dask|tornado|kaas_magic)[.\w]* - (DEBUG|INFO|WARNING|ERROR|CRITICAL) -")


@dataclass
class Cell:
    """What a frontend got for one execute request."""

    code: str
    execution_count: int | None = None
    status: str = ""
    outputs: list[dict] = field(default_factory=list)  # {"type": msg_type, **content}
    messages: list[dict] = field(default_factory=list)  # every iopub message of the cell, busy to idle
    seconds: float = 0.0  # from sending the request to its reply

    def of(self, kind: str) -> list[dict]:
        return [o for o in self.outputs if o["type"] == kind]

    @property
    def error(self) -> dict:
        (error,) = self.of("error")
        return error

    def text(self) -> str:
        """Everything the cell shows as text: streams, text/plain, tracebacks."""
        parts = []
        for o in self.outputs:
            if o["type"] == "stream":
                parts.append(o["text"])
            elif o["type"] == "error":
                parts += o["traceback"]
            elif "data" in o:
                parts.append(o["data"].get("text/plain", ""))
        return _plain("\n".join(parts))


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)  # IPython colours tracebacks


class Kernel:
    """A real kernel, started in the repository (so it imports this checkout's kaas_magic)."""

    def __init__(self):
        from jupyter_client import KernelManager

        env = {**os.environ, "DASK_KAAS__BACKENDS": '["numpy"]'}  # the cells need only NumPy workers
        self.manager = KernelManager(kernel_name="python3")
        self.manager.start_kernel(cwd=str(ROOT), env=env)
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=120)
        self.cells: list[Cell] = []
        self.messages: list[dict] = []  # every iopub message, of any cell (display updates)

    def run(self, code: str, timeout: float = 180, interrupt_on: str | None = None) -> Cell:
        """Execute ``code``; with ``interrupt_on``, interrupt the kernel once the cell has
        printed that text (so the interrupt reaches a call that is running)."""
        cell = Cell(code)
        started = time.monotonic()
        msg_id = self.client.execute(code)
        deadline = started + timeout
        interrupted = False
        while True:
            try:
                msg = self.client.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"cell did not finish within {timeout} s: {code!r}") from None
            self.messages.append(msg)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            cell.messages.append(msg)
            kind, content = msg["msg_type"], msg["content"]
            if kind == "status" and content["execution_state"] == "idle":
                break
            if kind in ("stream", "display_data", "update_display_data", "execute_result", "error"):
                cell.outputs.append({"type": kind, **content})
            if interrupt_on and not interrupted and kind == "stream" and interrupt_on in content.get("text", ""):
                self.manager.interrupt_kernel()
                interrupted = True
        reply = self.client.get_shell_msg(timeout=30)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = self.client.get_shell_msg(timeout=30)
        cell.seconds = time.monotonic() - started
        cell.execution_count = reply["content"].get("execution_count")
        cell.status = reply["content"]["status"]
        for payload in reply["content"].get("payload", []):  # the pager's text (``%kaas?``)
            cell.outputs.append({"type": "payload", **payload})
        self.cells.append(cell)
        return cell

    def value(self, expression: str):
        """An expression evaluated in the kernel, as JSON."""
        cell = self.run(f"import json as _json; print(_json.dumps({expression}))")
        assert cell.status == "ok", cell.text()
        return json.loads(cell.of("stream")[-1]["text"].strip().splitlines()[-1])

    def last_record(self) -> dict:
        return self.value("(lambda r: {**r.to_dict(), 'timings': r.timings.__dict__})(__import__('kaas_magic').last_run())")

    def close(self):
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


@contextlib.contextmanager
def kernel_with_kaas():
    """A real kernel with ``%load_ext kaas_magic`` run; its pool stopped and the kernel shut
    down after (the module fixtures of the real-kernel tests)."""
    k = Kernel()
    k.run("%load_ext kaas_magic")
    try:
        yield k
    finally:
        try:
            k.run("%kaas stop", timeout=60)
        finally:
            k.close()


@pytest.fixture(scope="module")
def kernel():
    with kernel_with_kaas() as k:
        k.first = k.run("%%kaas cpu\nq = 1")  # the first cell: it waits for the pool to start
        k.first_record = k.last_record()
        yield k


def phases_sum_to_total(record: dict) -> bool:
    t = record["timings"]
    return abs(sum(v for k, v in t.items() if k != "total") - t["total"]) <= 1e-9 * max(1.0, t["total"])


@pytest.mark.timeout(300)
def test_the_first_cell_after_load_ext_is_cold_and_counts_its_wait_for_the_pool(kernel):
    record = kernel.first_record
    assert kernel.first.status == "ok" and record["ok"]
    assert record["cold"]
    t = record["timings"]
    # The record explains the cell's wait: most of it was the pool starting.
    assert t["total"] >= 0.5 * kernel.first.seconds
    assert t["startup"] >= 0.5 * t["total"]
    assert phases_sum_to_total(record)
    warm = kernel.run("%%kaas cpu\nq = 2")
    assert warm.status == "ok"
    again = kernel.last_record()
    assert not again["cold"] and again["timings"]["startup"] == 0


@pytest.mark.timeout(300)
def test_a_quick_cell_sends_no_more_iopub_messages_than_it_must(kernel):
    """Each iopub message costs the kernel time on every cell (serialising, the IOPub
    thread, ZMQ) and the frontend a render. A quick ``%%kaas --quiet`` cell sends exactly what
    a plain cell sends (busy, its input, idle); with its run view, one more: the view, shown
    once with its final record. No state before it (a quick call shows none), no update, no
    stream (nothing was printed), no comm."""
    plain_kinds = ["status", "execute_input", "status"]
    view_kinds = ["status", "execute_input", "display_data", "status"]

    def kinds(cell: Cell) -> list[str]:
        return [m["msg_type"] for m in cell.messages]

    for _ in range(3):  # warm: links, caches
        kernel.run("%%kaas cpu\nq = 1")
    assert kinds(kernel.run("q = 1")) == plain_kinds
    quiet = [kernel.run("%%kaas cpu --quiet\nq = 1") for _ in range(3)]
    assert all(c.status == "ok" and kinds(c) == plain_kinds for c in quiet), [kinds(c) for c in quiet]
    # A machine busy enough to take widgets.SHOW_AFTER_SECONDS over one of them would show a
    # state meanwhile: one quick cell of three is enough.
    views = [kernel.run("%%kaas cpu\nq = 1") for _ in range(3)]
    assert any(kinds(c) == view_kinds for c in views), [kinds(c) for c in views]
    view = next(c for c in views if kinds(c) == view_kinds)
    final = view.messages[2]["content"]
    assert "kaas-state-done" in final["data"]["text/html"] and "kaas cpu [numpy]" in final["data"]["text/plain"]
    assert final["transient"]["display_id"]  # updated by id while a slow call runs
    # Ids are unique per cell (and per kernel process: a restarted kernel's cannot repeat them).
    assert len({c.messages[2]["content"]["transient"]["display_id"] for c in views}) == 3


@pytest.mark.timeout(300)
def test_the_run_view_comes_after_text_printed_before_it_and_before_the_cells_print(kernel):
    """The view is published without IPython's flush of stdout and stderr unless they hold
    text: text printed before the view still comes first. A quick call's view is shown at
    its end, or at the worker's first word when the call prints or displays: before that,
    and updated to its final record after."""
    def shown(cell: Cell) -> list[str]:
        return [m["msg_type"] if m["msg_type"] != "stream" else m["content"]["text"].strip()
                for m in cell.messages if m["msg_type"] in ("display_data", "update_display_data", "stream")]

    printed = kernel.run("%%kaas cpu\nprint('from the worker')")
    assert shown(printed) == ["display_data", "from the worker", "update_display_data"], shown(printed)
    assert "kaas-state-running" in printed.messages[2]["content"]["data"]["text/html"]
    displayed = kernel.run("%%kaas cpu\ndisplay({'text/plain': 'a display'}, raw=True)")
    assert shown(displayed)[0] == "display_data" and "kaas-run" in displayed.messages[2]["content"]["data"]["text/html"]
    assert [m["content"]["data"]["text/plain"] for m in displayed.messages if m["msg_type"] == "display_data"][1:] \
        == ["a display"]
    before = kernel.run("print('before the view')\nget_ipython().run_cell_magic('kaas', 'cpu', 'q = 1')")
    assert shown(before) == ["before the view", "display_data"], shown(before)


@pytest.mark.timeout(300)
def test_the_last_expression_is_the_cells_value(kernel):
    remote = kernel.run("%%kaas cpu\nxp.arange(5).sum()")
    local = kernel.run("import numpy as np\nnp.arange(5).sum()")
    (result,) = remote.of("execute_result")
    assert result["data"]["text/plain"] == local.of("execute_result")[0]["data"]["text/plain"]
    assert result["execution_count"] == remote.execution_count
    # Stored as a cell's value is: in Out and _ (the local cell above has since replaced _).
    assert kernel.value(f"int(Out[{remote.execution_count}]) * 2") == 20
    quiet = kernel.run("%%kaas cpu\nxp.arange(5).sum();")
    assert quiet.status == "ok" and not quiet.of("execute_result")
    assert kernel.value(f"{quiet.execution_count} in Out") is False


@pytest.mark.timeout(300)
def test_a_value_that_cannot_travel_shows_its_repr_and_a_statement_shows_nothing(kernel):
    lock = kernel.run("%%kaas cpu\nimport threading\nthreading.Lock()")
    (result,) = lock.of("execute_result")
    assert "_thread.lock" in result["data"]["text/plain"]
    statement = kernel.run("%%kaas cpu\nv = 3")
    assert statement.status == "ok" and not statement.of("execute_result")
    printed = kernel.run("%%kaas cpu\nprint('hi')")  # print returns None: nothing shown, as in a normal cell
    assert not printed.of("execute_result") and "hi" in printed.text()


@pytest.mark.timeout(300)
def test_a_kept_value_comes_back_as_a_handle(kernel):
    kept = kernel.run("%%kaas cpu --keep\nxp.ones(1000)")
    (result,) = kept.of("execute_result")
    assert result["data"]["text/plain"].startswith("<kaas handle float64[1000]")
    assert kernel.value(f"float(Out[{kept.execution_count}].get().sum())") == 1000.0


@pytest.mark.timeout(300)
def test_a_syntax_error_shows_the_line_and_the_caret_only(kernel):
    cell = kernel.run("%%kaas cpu\nx = 1\ny = (x +\n")
    assert cell.status == "error"
    shown = _plain("\n".join(cell.error["traceback"])).splitlines()
    assert len(shown) <= 8, shown
    assert any("y = (x +" in line for line in shown) and any(line.strip() == "^" or "^" in line for line in shown)
    assert any(f"<kaas In[{cell.execution_count}]>" in line and "line 3" in line for line in shown)
    assert not any("magics.py" in line or "interactiveshell" in line or "ast.py" in line for line in shown)


@pytest.mark.timeout(300)
def test_an_interrupted_cell_says_where_it_stopped_in_a_few_lines(kernel):
    code = "%%kaas cpu\nimport time\nprint('started', flush=True)\nfor i in range(600):\n    time.sleep(0.05)\n"
    cell = kernel.run(code, interrupt_on="started")
    assert cell.status == "error"
    error = cell.error
    assert error["ename"] == "KeyboardInterrupt"
    shown = _plain("\n".join(error["traceback"])).splitlines()
    assert len(shown) <= 15, shown
    assert any("time.sleep(0.05)" in line for line in shown), shown  # the user's line
    assert any(f"<kaas In[{cell.execution_count}]>" in line for line in shown)
    assert any("stopped in place" in line or "replaced" in line for line in shown)
    assert not any("calls.py" in line or "magics.py" in line for line in shown)
    record = kernel.last_record()
    assert record["error"] == "KeyboardInterrupt" and phases_sum_to_total(record)
    assert record["device"]  # the cancelled record still names its device
    assert kernel.run("%%kaas cpu\nafter = 1").status == "ok"  # the pool goes on


@pytest.mark.timeout(300)
def test_a_timeout_names_itself_once_with_the_users_line(kernel):
    cell = kernel.run("%%kaas cpu --timeout 1\nimport time\nfor i in range(100):\n    time.sleep(0.05)\n")
    error = cell.error
    assert error["ename"] == "CallTimeout"
    shown = _plain("\n".join(error["traceback"]))
    assert shown.count("timeout") == 1 and "kaas_magic.errors" not in shown, shown
    assert f"<kaas In[{cell.execution_count}]>, line 4" in shown
    assert not cell.of("stream"), cell.of("stream")  # no log line about it in the cell
    record = kernel.last_record()
    assert record["error"] == "CallTimeout" and phases_sum_to_total(record)
    assert record["timings"]["execute"] <= record["timings"]["total"]


@pytest.mark.timeout(400)
def test_phases_add_up_to_the_total_for_every_ending(kernel):
    endings = {
        "ok": "%%kaas cpu\nz = 2",
        "error": "%%kaas cpu\nz = 1 / 0",
        # time.sleep in C outlives the stop: the worker is replaced.
        "timeout, worker replaced": "%%kaas cpu --timeout 1\nimport time\ntime.sleep(4)",
        "worker lost": "%%kaas cpu\nimport os\nos._exit(3)",
        "refused before sending": "import threading\nlk = threading.Lock()\n",
    }
    for ending, code in endings.items():
        if ending == "refused before sending":
            kernel.run(code)
            code = "%%kaas cpu\nwith lk:\n    pass"
        cell = kernel.run(code)
        assert (cell.status == "ok") == (ending == "ok"), (ending, cell.text())
        record = kernel.last_record()
        assert phases_sum_to_total(record), (ending, record["timings"])
        assert all(v >= 0 for v in record["timings"].values()), (ending, record["timings"])
        assert record["ok"] == (ending == "ok")
    assert kernel.run("%%kaas cpu\nafter = 2", timeout=120).status == "ok"


@pytest.mark.timeout(300)
def test_remote_traceback_labels_match_the_prompt_after_any_kind_of_cell(kernel):
    kernel.run("%kaas?")
    kernel.run("%%kaas cpu\n(")  # a syntax error
    kernel.run("1 / 0")  # a local error
    for _ in range(2):
        cell = kernel.run("%%kaas cpu\nw = 1\nraise ValueError('labelled')")
        shown = _plain("\n".join(cell.error["traceback"]))
        assert f'File "<kaas In[{cell.execution_count}]>", line 3' in shown, shown


@pytest.mark.timeout(300)
def test_help_shows_every_option_command_and_examples(kernel):
    cell = kernel.run("%kaas?")
    text = cell.text()  # the pager's text: the execute reply's payload
    for option in ("--timeout", "--keep", "--in", "--out", "--fallback", "--worker", "--retries", "--register"):
        assert option in text
    for command in ("start", "connect", "status", "last", "kernels", "monitor", "panel", "log", "stop"):
        assert f"%kaas {command}" in text
    assert "Examples" in text and "_cell_parser" not in text and "::" not in text
    unknown = kernel.run("%%kaas nosuch\nq = 1")
    shown = unknown.text()
    assert "usage: %%kaas" in shown and "nosuch" in shown
    assert "_cell_parser" not in shown and "::" not in shown


@pytest.mark.timeout(120)
def test_no_dask_log_line_appears_in_any_cell(kernel):
    """Runs last in this module: every cell above (a worker replaced, one lost, a timeout)
    has had its chance to leak one."""
    assert len(kernel.cells) > 20
    leaked = [(c.code, line) for c in kernel.cells for line in c.text().splitlines() if DASK_LOG_LINE.search(line)]
    assert not leaked, leaked
