"""``%%kaas --background`` in a real kernel: the cell returns at once, its output lands in its
own cell (by display id) while other cells run, and ``%kaas wait`` gives its variables."""

from __future__ import annotations

import pytest

from test_cell import _plain, kernel_with_kaas


@pytest.fixture(scope="module")
def kernel():
    with kernel_with_kaas() as k:
        k.run("%kaas start\nimport kaas_magic; kaas_magic.pool().wait_ready()")
        yield k


def display_ids(cell) -> set[str]:
    return {o["transient"]["display_id"] for o in cell.outputs
            if o["type"] == "display_data" and o.get("transient", {}).get("display_id")}


def final_text(kernel, ids: set[str], mime: str = "text/plain") -> str:
    """What each display ends up showing (its last update), joined."""
    last: dict[str, str] = {}
    for msg in kernel.messages:
        content = msg["content"]
        display_id = content.get("transient", {}).get("display_id")
        if msg["msg_type"] in ("display_data", "update_display_data") and display_id in ids:
            last[display_id] = content["data"].get(mime, "")
    return _plain("\n".join(last.values()))


@pytest.mark.timeout(300)
def test_a_background_cell_lands_in_its_own_cell_while_another_runs(kernel):
    background = kernel.run("%%kaas cpu -B\nimport time\nprint('a-start', flush=True)\ntime.sleep(2)\n"
                            "print('a-end')\nbg = 41 + 1\nbg * 10")
    assert background.status == "ok"
    early = kernel.value("'bg' in globals()")  # it returned before the call finished
    other = kernel.run("%%kaas cpu\nprint('b-out')\nq = 3")
    assert other.status == "ok" and "b-out" in other.text() and "a-end" not in other.text()
    assert early is False
    done = kernel.run("%kaas wait")
    assert f"In[{background.execution_count}] done" in done.text()
    assert kernel.value("bg") == 42  # assigned when it finished
    shown = final_text(kernel, display_ids(background))
    assert "a-start" in shown and "a-end" in shown and "420" in shown
    for cell in kernel.cells:  # no other cell's own outputs carry its text
        if cell is not background:
            own = [o for o in cell.outputs if o.get("transient", {}).get("display_id") not in display_ids(background)]
            assert not any("a-end" in _plain(str(o)) for o in own)


@pytest.mark.timeout(300)
def test_a_failing_background_cell_shows_its_error_there_and_wait_raises_it(kernel):
    failing = kernel.run("%%kaas cpu -B\nimport time\ntime.sleep(0.5)\nraise ValueError('late trouble')")
    assert failing.status == "ok"
    waited = kernel.run(f"%kaas wait {failing.execution_count}")
    assert waited.status == "error" and waited.error["ename"] == "ValueError"
    shown = final_text(kernel, display_ids(failing))
    assert "late trouble" in shown and f"<kaas In[{failing.execution_count}]>" in shown


@pytest.mark.timeout(300)
def test_a_background_cell_can_be_cancelled(kernel):
    long = kernel.run("%%kaas cpu -B\nimport time\nfor _ in range(400):\n    time.sleep(0.05)\nnever = 1")
    kernel.run("import time; time.sleep(0.5)")
    cancelled = kernel.run(f"%kaas cancel {long.execution_count}")
    assert f"In[{long.execution_count}] cancelled" in cancelled.text()
    kernel.run(f"%kaas wait {long.execution_count} --timeout 20")
    assert kernel.value("'never' in globals()") is False
    assert "cancelled" in final_text(kernel, display_ids(long))


@pytest.mark.timeout(300)
def test_a_background_cells_displays_land_in_its_own_cell(kernel):
    cell = kernel.run("%%kaas cpu -B\nimport time\ntime.sleep(0.5)\nfrom IPython.display import HTML\n"
                      "display(HTML('<b>bg-html</b>'))\nprint('after')")
    kernel.run("%%kaas cpu\nq = 4")  # another cell runs meanwhile
    kernel.run(f"%kaas wait {cell.execution_count}")
    assert "<b>bg-html</b>" in final_text(kernel, display_ids(cell), "text/html")
    assert "after" in final_text(kernel, display_ids(cell))
