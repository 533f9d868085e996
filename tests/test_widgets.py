"""The run view and the pool monitor without a browser or a pool: state transitions,
formatting, aggregation of utilisation, monitor rows from fake metrics."""

from __future__ import annotations

import gc
import re
import sys
import threading
import time
import weakref
from html.parser import HTMLParser
from types import SimpleNamespace

import pytest

from kaas_magic import config
from kaas_magic.pool_monitor import (
    KERNEL_EXIT,
    Monitor,
    Roster,
    _stop_all,
    History,
    Sample,
    device_tags,
    format_memory,
    format_memory_short,
    group_devices,
    median_over_calls,
    occupancy,
    physical_device,
    render_monitor,
    render_monitor_text,
    sparkline_svg,
    target_loads,
)
from kaas_magic import widgets
from kaas_magic.record import RunRecord, Timings
from kaas_magic.widgets import (
    STATES,
    DisplaySurface,
    RunView,
    display_data,
    format_duration,
    format_elapsed,
    inline_view,
    phase_segments,
    render_html,
    render_text,
    warmth,
)

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


@pytest.fixture(autouse=True)
def every_state_shown(monkeypatch):
    """The tests below follow every state; SHOW_AFTER_SECONDS has tests of its own."""
    monkeypatch.setattr(widgets, "SHOW_AFTER_SECONDS", 0.0)


class FakeWidget:
    """Records what the view writes; wakes waiters on every write."""

    def __init__(self):
        self.values: list[str] = []
        self.closed = False
        self.written = threading.Condition()

    @property
    def value(self) -> str:
        return self.values[-1]

    @value.setter
    def value(self, html: str) -> None:
        with self.written:
            self.values.append(html)
            self.written.notify_all()

    def wait_for(self, predicate, timeout: float = 30) -> bool:
        with self.written:
            return self.written.wait_for(lambda: predicate(self.values), timeout)

    def close(self) -> None:
        self.closed = True

    def _repr_mimebundle_(self):
        return {WIDGET_MIME: {"version_major": 2, "version_minor": 0, "model_id": "fake"}, "text/plain": "w"}


class FakeHandle:
    def __init__(self):
        self.updates: list[dict] = []

    def update(self, obj, *, raw=False):
        assert raw
        self.updates.append(obj)


def make_record(**changes) -> RunRecord:
    fields = dict(
        call_id="c1", target="cpu", backend="numpy", kind="device", device="CPU x86_64 (2 cores)",
        worker="tcp://127.0.0.1:40001", host="box",
        timings=Timings(queue=0.0004, transfer_in=0.001, setup=0.002, execute=0.25, transfer_out=0.0006, total=0.254),
    )
    fields.update(changes)
    return RunRecord(**fields)


# -- formatting --

@pytest.mark.parametrize("seconds, shown", [(0.00042, "0.42 ms"), (0.0123, "12.3 ms"), (1.25, "1.25 s"), (0.0, "0.00 ms")])
def test_format_duration(seconds, shown):
    assert format_duration(seconds) == shown


def test_phase_segments_follow_the_call_and_split_the_bar():
    segments = phase_segments(make_record().timings)
    assert [s.phase for s in segments] == ["queue", "transfer_in", "setup", "execute", "transfer_out"]
    assert [s.label for s in segments] == ["queue", "transfer in", "compile", "execute", "transfer out"]
    assert sum(s.fraction for s in segments) == pytest.approx(1.0)
    assert max(segments, key=lambda s: s.fraction).phase == "execute"
    assert all(s.fraction == 0 for s in phase_segments(Timings()))


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({}, "warm"),
        ({"kernels": {"saxpy": "warm"}}, "warm"),
        ({"kernels": {"saxpy": "disk", "scale": "warm"}}, "disk-cached"),
        ({"kernels": {"saxpy": "disk", "scale": "compiled"}}, "cold"),
        ({"cold": True}, "cold"),
    ],
)
def test_warmth_is_the_coldest_thing_the_call_paid_for(changes, expected):
    assert warmth(make_record(**changes))[0] == expected


def test_warmth_names_the_kernels_that_were_compiled():
    assert "scale" in warmth(make_record(kernels={"scale": "compiled"}))[1]


def test_run_view_html_shows_where_and_the_phases_in_numbers():
    html = render_html("done", make_record(kernels={"k": "disk"}))
    assert "kaas-state-done" in html
    assert "CPU x86_64 (2 cores)" in html and "tcp://127.0.0.1:40001" in html and "[numpy]" in html
    assert "disk-cached" in html
    assert "execute <b>250.0 ms</b>" in html and "transfer in <b>1.00 ms</b>" in html
    assert "total <b>254.0 ms</b>" in html
    assert "FALLBACK" not in html and "SIMULATOR" not in html


@pytest.mark.parametrize("kind, shown", [("fallback", "FALLBACK"), ("simulator", "SIMULATOR")])
def test_stand_ins_carry_a_badge(kind, shown):
    assert f">{shown}</span>" in render_html("running", make_record(kind=kind))


def test_run_view_before_routing_shows_only_the_state():
    html = render_html("queued", None)
    assert "kaas-state-queued" in html and "kaas-phase" not in html
    assert render_text("queued", None) == "kaas queued"


def test_a_call_cut_short_before_the_reply_names_no_device():
    record = make_record(device="", timings=Timings())
    assert "] @ tcp://127.0.0.1:40001" in render_text("cancelled", record)
    assert "[numpy] @ tcp://127.0.0.1:40001" in render_html("cancelled", record)


def test_text_form_is_a_one_line_record():
    text = render_text("error", make_record(ok=False, error="ZeroDivisionError"), "ZeroDivisionError")
    assert text.startswith("kaas cpu [numpy] on CPU x86_64 (2 cores) @ tcp://127.0.0.1:40001 | warm | error ZeroDivisionError")
    assert "execute 250.0 ms" in text


@pytest.mark.parametrize("seconds, shown", [(0.04, "0.0 s"), (3.24, "3.2 s"), (59.9, "59.9 s"), (65.4, "1 min 05 s")])
def test_format_elapsed(seconds, shown):
    assert format_elapsed(seconds) == shown


def startup_record(**changes) -> RunRecord:
    """A call that waited 2 s for the pool to start: the first call of a session."""
    timings = Timings(startup=2.0, queue=0.0004, transfer_in=0.001, setup=0.002, execute=0.25, transfer_out=0.0006,
                      total=2.254)
    return make_record(cold=True, timings=timings, **changes)


def test_a_wait_for_startup_is_a_phase_of_its_own_in_the_bar_and_the_text():
    record = startup_record()
    assert [s.phase for s in phase_segments(record.timings)][:2] == ["startup", "queue"]
    assert sum(s.fraction for s in phase_segments(record.timings)) == pytest.approx(1.0)
    html = render_html("done", record)
    assert "class='kaas-phase kaas-phase-startup'" in html  # a segment of the bar
    assert "startup <b>2.00 s</b>" in html and "total <b>2.25 s</b>" in html
    assert "(startup 2.00 s queue 0.40 ms transfer in" in render_text("done", record)
    assert warmth(record)[0] == "cold" and "2.00 s" in warmth(record)[1]


def test_a_call_that_did_not_wait_for_startup_shows_no_startup_phase():
    # What the browser tests read off the legend: the five phases of a warm call.
    record = make_record()
    assert "startup" not in render_html("done", record) and "startup" not in render_text("done", record)


@pytest.mark.parametrize("state, shown", [("starting", True), ("queued", True), ("running", False), ("done", False)])
def test_a_waiting_call_says_what_it_waits_for(state, shown):
    record = RunRecord(call_id="", target="jax-cpu", waiting_for="warming jax on worker 1")
    html, text = render_html(state, record), render_text(state, record)
    assert (">warming jax on worker 1\u2026</span>" in html) is shown
    assert ("kaas-waiting" in html) is shown
    assert text == "kaas jax-cpu | " + (f"{state}: warming jax on worker 1" if shown else state)
    assert f"kaas-state-{state}" in html


def test_the_starting_state_has_a_colour_and_comes_before_queued():
    assert STATES.index("starting") < STATES.index("queued")
    assert "kaas-state-starting" in render_html("starting", None)


@pytest.mark.parametrize("state", ["running", "done", "error", "cancelled"])
def test_notes_are_muted_info_lines_in_every_state(state):
    record = make_record(notes=["prog not returned: a pyopencl Program cannot travel"])
    html = render_html(state, record)
    assert "<div class='kaas-note' style='color:var(--jp-ui-font-color2, #6b7280)'>" \
           "note: prog not returned: a pyopencl Program cannot travel</div>" in html
    line, note = render_text(state, record).split("\n")
    assert f"| {state}" in line and note == "  note: prog not returned: a pyopencl Program cannot travel"


def test_notes_stay_in_the_static_record_a_finished_view_leaves():
    widget, handle = FakeWidget(), FakeHandle()
    view = RunView(widget, handle)
    record = make_record()
    view.update("running", record)
    record.notes.append("worker 1 was replaced meanwhile")
    view.update("done", record)
    (final,) = handle.updates
    assert "class='kaas-note'" in final["text/html"] and "worker 1 was replaced meanwhile" in final["text/html"]
    assert final["text/plain"].endswith("\n  note: worker 1 was replaced meanwhile")


@pytest.mark.parametrize("state", STATES)
def test_the_device_is_shown_in_every_state_once_routed(state):
    record = make_record(timings=Timings())
    assert "on <b>CPU x86_64 (2 cores)</b>" in render_html(state, record)
    assert "on CPU x86_64 (2 cores) @ tcp://127.0.0.1:40001" in render_text(state, record)


def test_a_cancelled_view_keeps_the_device():
    widget, handle = FakeWidget(), FakeHandle()
    view = RunView(widget, handle)
    view.update("running", make_record(timings=Timings()))
    view.finish_if_unfinished(KeyboardInterrupt())
    (final,) = handle.updates
    assert "kaas-state-cancelled" in final["text/html"] and "on <b>CPU x86_64 (2 cores)</b>" in final["text/html"]
    assert "on CPU x86_64 (2 cores) @" in final["text/plain"]


def test_a_report_without_a_record_does_not_forget_the_device():
    widget, handle = FakeWidget(), FakeHandle()
    view = RunView(widget, handle)
    view.update("running", make_record(timings=Timings()))
    view.update("cancelled", None)
    assert "CPU x86_64 (2 cores)" in handle.updates[0]["text/html"]


def test_the_summary_reads_like_the_text_form():
    record = startup_record(notes=["a note"])
    assert record.summary() == render_text("done", record).split("\n")[0]  # one line: notes are the view's
    failed = make_record(ok=False, error="ZeroDivisionError")
    assert failed.summary() == render_text("error", failed, "ZeroDivisionError")
    assert "| cold | done | total 2.25 s (startup 2.00 s queue" in record.summary()


class Styles(HTMLParser):
    """Every element's classes and inline style declarations."""

    def __init__(self, html: str):
        super().__init__()
        self.elements: list[tuple[set[str], dict[str, str]]] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        declarations = (d.split(":", 1) for d in (attrs.get("style") or "").split(";") if ":" in d)
        self.elements.append((set((attrs.get("class") or "").split()), {k.strip(): v.strip() for k, v in declarations}))

    def of(self, cls: str) -> list[dict[str, str]]:
        return [style for classes, style in self.elements if cls in classes]


def test_text_and_track_colours_follow_the_jupyterlab_theme():
    record = startup_record(ok=False, error="ZeroDivisionError", notes=["a note"], waiting_for="starting the pool")
    views = [render_html("error", record), render_html("starting", record, elapsed=1.5)]
    for html in views:
        styles = Styles(html)
        for classes, style in styles.elements:
            # Text colours are the theme's, but for a badge's white on a saturated colour.
            assert style.get("color", "var(--jp-").startswith("var(--jp-") or style["color"] == "#fff", (classes, style)
        (run,) = styles.of("kaas-run")
        assert run["color"] == "var(--jp-ui-font-color1, inherit)"
        for cls in ("kaas-note", "kaas-waiting", "kaas-elapsed"):
            assert all(s["color"] == "var(--jp-ui-font-color2, #6b7280)" for s in styles.of(cls))
    error, starting = (Styles(html) for html in views)
    (track,) = error.of("kaas-track")
    assert track["background"] == "var(--jp-layout-color2, #e5e7eb)"  # not a white bar in the dark theme
    assert [s["color"] for s in error.of("kaas-error")] == ["var(--jp-error-color1, #b91c1c)"]
    assert starting.of("kaas-waiting") and starting.of("kaas-elapsed")  # the loop above had something to check
    assert not re.search(r"background:\s*#(e5e7eb|fff)", views[0])


# -- the run view's states --

def test_run_view_follows_the_call_then_leaves_a_static_record():
    widget, handle = FakeWidget(), FakeHandle()
    view = RunView(widget, handle)
    record = make_record(timings=Timings())
    for state in ("queued", "sending", "running", "compiling", "running", "receiving"):
        view.update(state, record)
        assert f"kaas-state-{state}" in widget.value
    assert not widget.closed and handle.updates == []

    record.timings = make_record().timings
    view.update("done", record)
    (final,) = handle.updates
    assert WIDGET_MIME not in final  # nothing left that needs the widget's model
    assert "kaas-state-done" in final["text/html"] and "execute <b>250.0 ms</b>" in final["text/html"]
    assert "| done |" in final["text/plain"]
    assert widget.closed

    view.update("error", record)  # late updates change nothing
    assert view.state == "done" and len(handle.updates) == 1


def test_run_view_rejects_an_unknown_state():
    with pytest.raises(ValueError, match="unknown run state 'flying'"):
        RunView(FakeWidget(), FakeHandle()).update("flying", None)


@pytest.mark.parametrize(
    "error, state, shown",
    [(KeyboardInterrupt(), "cancelled", "kaas-state-cancelled"),
     (LookupError("no gpu"), "error", "LookupError"),
     (None, "error", "ended without a result")],
)
def test_a_view_the_call_never_ended_ends_with_its_cell(error, state, shown):
    widget, handle = FakeWidget(), FakeHandle()
    view = RunView(widget, handle)
    view.finish_if_unfinished(error)
    assert view.state == state and shown in handle.updates[0]["text/html"] and widget.closed


def test_live_display_data_carries_the_widget_and_readable_fallbacks():
    data = display_data("running", make_record(), widget=FakeWidget())
    assert data[WIDGET_MIME]["model_id"] == "fake"
    assert "kaas-state-running" in data["text/html"] and "| running" in data["text/plain"]


# -- the elapsed counter --

ELAPSED = re.compile(r"class='kaas-elapsed'[^>]*>([\d.]+) s<")


def elapsed_shown(values: list[str]) -> list[float]:
    return [float(m.group(1)) for m in map(ELAPSED.search, values) if m]


@pytest.fixture
def ticker(monkeypatch):
    """A ticker of the test's own (no view of another test keeps it running), ticking fast."""
    ticker = widgets._Ticker()
    monkeypatch.setattr(widgets, "_ticker", ticker)
    monkeypatch.setattr(widgets, "TICK_SECONDS", 0.02)
    monkeypatch.setattr(widgets, "TICK_AFTER_SECONDS", 0.05)
    monkeypatch.setattr(widgets, "TICKER_LINGER_SECONDS", 0.1)
    return ticker


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_the_ticker_counts_while_the_call_runs_then_stops_with_it(ticker):
    widget, handle = FakeWidget(), FakeHandle()
    view = RunView(widget, handle)
    view.update("running", make_record(timings=Timings()))
    assert widget.wait_for(lambda values: len(set(elapsed_shown(values))) >= 3, timeout=5)
    shown = elapsed_shown(widget.values)
    assert shown == sorted(shown) and shown[-1] > shown[0]
    assert all("kaas-state-running" in value for value in widget.values)

    view.update("done", make_record())
    assert "kaas-elapsed" not in handle.updates[0]["text/html"]  # the record shows the total instead
    written = len(widget.values)
    assert wait_until(lambda: not ticker.running)  # no live view: the thread ends
    time.sleep(0.1)  # five ticks' worth
    assert len(widget.values) == written


def test_the_count_starts_when_the_view_is_made_so_it_includes_the_wait_for_the_pool(ticker, monkeypatch):
    monkeypatch.setattr(widgets, "TICK_AFTER_SECONDS", 60.0)  # only the update writes
    widget = FakeWidget()
    view = RunView(widget, FakeHandle())
    time.sleep(0.35)  # the pool takes its time to start before the first report
    view.update("starting", RunRecord(call_id="", target="cpu", waiting_for="starting the pool"))
    (shown,) = elapsed_shown(widget.values)
    assert 0.3 <= shown < 30


def test_the_ticker_thread_outlives_its_views_a_while_so_cells_in_a_row_share_it(ticker, monkeypatch):
    monkeypatch.setattr(widgets, "TICKER_LINGER_SECONDS", 60.0)
    first = RunView(FakeWidget(), FakeHandle())
    thread = ticker._thread
    first.update("done", make_record())
    time.sleep(0.1)  # five ticks without a live view
    assert ticker.running
    second = RunView(FakeWidget(), FakeHandle())  # the next cell's: no new thread
    assert ticker._thread is thread
    second.update("done", make_record())


def test_a_view_is_not_ticked_in_its_first_moments(ticker, monkeypatch):
    monkeypatch.setattr(widgets, "TICK_AFTER_SECONDS", 60.0)
    widget = FakeWidget()
    view = RunView(widget, FakeHandle())
    view.update("running", make_record(timings=Timings()))
    assert ticker.running
    time.sleep(0.2)  # ten ticks, all too early
    assert len(widget.values) == 1


def test_one_ticker_thread_serves_every_live_view(ticker):
    def tickers() -> int:
        return sum(t.name == "kaas-run-view-ticker" for t in threading.enumerate())

    before = tickers()
    views = [(RunView(w, FakeHandle()), w) for w in (FakeWidget(), FakeWidget(), FakeWidget())]
    for view, _ in views:
        view.update("queued", make_record(timings=Timings()))
    for _, widget in views:
        assert widget.wait_for(lambda values: len(values) >= 3, timeout=5)
    assert tickers() - before <= 1
    for view, _ in views:
        view.update("cancelled", None)
    assert wait_until(lambda: not ticker.running)

    again = FakeWidget()  # started again on demand
    view = RunView(again, FakeHandle())  # held: the ticker holds views weakly
    view.update("running", make_record(timings=Timings()))
    assert again.wait_for(lambda values: len(values) >= 2, timeout=5)
    view.update("done", make_record())


def test_the_ticker_keeps_no_finished_or_abandoned_view_alive(ticker):
    finished = RunView(FakeWidget(), FakeHandle())
    finished.update("running", make_record(timings=Timings()))
    finished.update("done", make_record())
    abandoned = RunView(FakeWidget(), FakeHandle())
    abandoned.update("running", make_record(timings=Timings()))
    refs = [weakref.ref(finished), weakref.ref(abandoned)]
    del finished, abandoned
    gc.collect()
    assert [ref() for ref in refs] == [None, None]
    assert wait_until(lambda: not ticker.running)


class BrokenWidget(FakeWidget):
    """A widget whose comm fails, but only for the ticker's writes."""

    @property
    def value(self) -> str:
        return self.values[-1]

    @value.setter
    def value(self, html: str) -> None:
        if threading.current_thread().name == "kaas-run-view-ticker":
            raise RuntimeError("comm closed")
        FakeWidget.value.fset(self, html)


def test_a_failing_view_never_raises_from_the_ticker_nor_stops_it(ticker, monkeypatch):
    escaped = []
    monkeypatch.setattr(threading, "excepthook", escaped.append)
    broken, widget = BrokenWidget(), FakeWidget()
    views = [RunView(broken, FakeHandle()), RunView(widget, FakeHandle())]  # held: the ticker holds views weakly
    for view in views:
        view.update("running", make_record(timings=Timings()))
    assert widget.wait_for(lambda values: len(set(elapsed_shown(values))) >= 3, timeout=5)
    assert escaped == [] and ticker.running and len(broken.values) == 1
    for view in views:
        view.update("done", make_record())


# -- when there is an inline view at all --

class FakeShell:
    """What inline_view needs of IPython: events, and a kernel when a frontend is there."""

    def __init__(self, with_kernel: bool):
        from IPython.core.events import EventManager, available_events

        self.events = EventManager(self, available_events)
        if with_kernel:
            self.kernel = object()

    def end_cell(self, error: BaseException | None) -> None:
        from IPython.core.interactiveshell import ExecutionResult

        result = ExecutionResult(None)
        result.error_in_exec = error
        self.events.trigger("post_run_cell", result)


@pytest.fixture
def shown(monkeypatch):
    """Install a fake kernel shell; collect what is displayed and how it is updated."""
    import IPython
    import IPython.display

    shell = FakeShell(with_kernel=True)
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    calls: list[dict] = []
    handle = FakeHandle()
    handle.updates = calls

    def display(data, raw=False, display_id=False):
        assert raw and display_id
        calls.append(data)
        return handle

    monkeypatch.setattr(IPython.display, "display", display)
    return shell, calls


def test_inline_view_is_displayed_live_and_ended_by_its_cell(shown):
    shell, calls = shown
    view = inline_view()
    # A display updated by id, no widget: no comm, and nothing left that needs a model.
    assert WIDGET_MIME not in calls[0] and "kaas-state-queued" in calls[0]["text/html"]
    shell.end_cell(LookupError("failed before routing"))
    assert view.state == "error" and "LookupError" in calls[-1]["text/html"] and WIDGET_MIME not in calls[-1]
    assert shell.events.callbacks["post_run_cell"] == []  # the hook went with its cell


def test_inline_view_ended_by_the_call_is_left_alone_by_its_cell(shown):
    shell, calls = shown
    view = inline_view()
    view.update("done", make_record())
    shell.end_cell(None)
    assert view.state == "done" and len(calls) == 2


def test_setting_turns_the_inline_view_off(shown):
    with config.set(widgets={"inline": False, "monitor-interval": 1.0}):
        assert inline_view() is None
    assert shown[1] == []


def test_the_inline_view_needs_no_ipywidgets(shown, monkeypatch):
    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    assert inline_view() is not None


def test_a_fast_call_sends_its_final_record_only(shown, monkeypatch):
    """States reported within SHOW_AFTER_SECONDS are not sent: a quick cell costs the kernel
    two messages, the display and its final update."""
    monkeypatch.setattr(widgets, "SHOW_AFTER_SECONDS", 60.0)
    shell, calls = shown
    view = inline_view()
    record = make_record(timings=Timings())
    for state in ("queued", "sending", "running", "receiving"):
        view.update(state, record)
    assert len(calls) == 1  # the display only
    view.update("done", make_record())
    assert len(calls) == 2 and "kaas-state-done" in calls[-1]["text/html"]


def test_a_state_reported_after_the_first_moments_is_sent_at_once(shown, monkeypatch):
    monkeypatch.setattr(widgets, "SHOW_AFTER_SECONDS", 0.05)
    monkeypatch.setattr(widgets, "TICK_AFTER_SECONDS", 60.0)  # only the update writes
    shell, calls = shown
    view = inline_view()
    time.sleep(0.1)
    view.update("running", make_record(timings=Timings()))
    assert len(calls) == 2 and "kaas-state-running" in calls[-1]["text/html"]


class DeferredHandle(FakeHandle):
    """A display not shown until its first update (ViewDisplay.open with defer)."""

    shown = False

    def update(self, obj, *, raw=False):
        super().update(obj, raw=raw)
        self.shown = True


def test_a_deferred_view_of_a_quick_call_is_one_message_its_final_record(monkeypatch):
    monkeypatch.setattr(widgets, "SHOW_AFTER_SECONDS", 60.0)
    handle = DeferredHandle()
    view = RunView(DisplaySurface(handle), handle)
    for state in ("queued", "sending", "receiving"):  # the caller's own states: not shown
        view.update(state, make_record(timings=Timings()))
    assert handle.updates == []
    view.update("done", make_record())
    assert len(handle.updates) == 1 and "kaas-state-done" in handle.updates[0]["text/html"]


def test_a_deferred_view_is_shown_at_the_workers_first_state_before_the_calls_output(monkeypatch):
    """The worker's first state comes before anything the call prints (call_stream): the
    view shows itself then, so it stays above the cell's output."""
    monkeypatch.setattr(widgets, "SHOW_AFTER_SECONDS", 60.0)
    handle = DeferredHandle()
    view = RunView(DisplaySurface(handle), handle)
    view.update("sending", make_record(timings=Timings()))
    assert handle.updates == []
    view.update("running", make_record(timings=Timings()))
    assert len(handle.updates) == 1 and "kaas-state-running" in handle.updates[0]["text/html"]
    view.update("running", make_record(timings=Timings()))  # shown: no more before SHOW_AFTER_SECONDS
    view.update("done", make_record())
    assert len(handle.updates) == 2 and "kaas-state-done" in handle.updates[-1]["text/html"]


def test_view_display_ids_are_unique_and_fall_back_to_ipythons_display(shown):
    """Outside ipykernel's own publisher (here a fake shell), the view goes through
    IPython's display() with an id of kaas's own, shown at once even when deferred."""
    from kaas_magic.widgets import ViewDisplay

    shell, calls = shown
    first, second = ViewDisplay(shell), ViewDisplay(shell)
    assert first.display_id != second.display_id and first.display_id.startswith("kaas-")
    first.open(lambda: {"text/plain": "x"}, defer=True)
    assert calls == [{"text/plain": "x"}] and first.shown


def test_no_inline_view_in_a_terminal_shell(monkeypatch):
    import IPython

    monkeypatch.setattr(IPython, "get_ipython", lambda: FakeShell(with_kernel=False))
    assert inline_view() is None


# -- the monitor --

def device(worker="tcp://127.0.0.1:40001", name="0", target="cpu", **changes) -> dict:
    """A metrics row as a worker sends it (WorkerRuntime._device_metrics)."""
    metric = dict(
        worker=worker, worker_name=name, host="box", target=target, backend="numpy", kind="device",
        device="CPU x86_64", physical_device="cpu", concurrency=4, in_flight=0, queued=0, busy_10s=0.0,
        busy_60s=0.0, calls=0, errors=0, median_latency_s=None, memory_used=None, memory_total=None, warm_kernels=[],
    )
    metric.update(changes)
    return metric


def cpu_backends(worker="tcp://127.0.0.1:40001", name="0", **changes) -> list[dict]:
    """One worker's CPU as a 2-core VM reports it: four backends, each a row of its own."""
    return [
        device(worker, name, backend="numpy", device="EPYC (2 cores), NumPy",
               services=("kaas/cpu/numpy/device/0", "kaas/gpu/numpy/fallback/0"), **changes),
        device(worker, name, backend="jax", device="EPYC (2 cores), JAX on XLA:CPU",
               services=("kaas/cpu/jax/device/0", "kaas/tpu/jax/fallback/0"), **changes),
        device(worker, name, backend="opencl", device="pthread-EPYC (OpenCL, PoCL)",
               services=("kaas/cpu/opencl/device/0", "kaas/fpga/opencl/fallback/0"), **changes),
        device(worker, name, target="qpu", backend="qiskit", kind="simulator", device="Aer simulator",
               services=("kaas/qpu/qiskit/simulator/0",), **changes),
    ]


@pytest.mark.parametrize("in_flight, concurrency, expected", [(0, 4, 0.0), (2, 4, 0.5), (6, 4, 1.0), (1, 0, 0.0)])
def test_occupancy_is_calls_in_flight_over_concurrency(in_flight, concurrency, expected):
    assert occupancy(device(in_flight=in_flight, concurrency=concurrency)) == expected


def test_memory_shows_what_the_backend_could_tell():
    assert format_memory(None, None) == "\u2014"
    assert format_memory(3 * 2**30, 80 * 2**30) == "3.0 GiB / 80.0 GiB"
    assert format_memory(None, 512 * 2**20) == "? / 512.0 MiB"
    assert format_memory_short(3 * 2**30, 80 * 2**30) == "3.0/80.0 GiB"
    assert format_memory_short(512 * 2**20, 80 * 2**30) == "512.0 MiB / 80.0 GiB"


def test_backends_on_one_cpu_are_one_device_with_summed_load():
    rows = cpu_backends()
    rows[0].update(in_flight=2, busy_10s=0.5, calls=30, errors=1, median_latency_s=0.002)
    rows[1].update(in_flight=1, busy_10s=0.25, calls=10, median_latency_s=0.050)
    rows[3].update(concurrency=2, busy_60s=0.75, calls=1, median_latency_s=1.0)
    rows.append(device(backend="cupy", target="gpu", device="H100", physical_device="gpu:0", concurrency=8,
                       services=("kaas/gpu/cupy/device/0",)))
    cpu, gpu = group_devices(rows)
    assert (cpu.physical, gpu.physical) == ("cpu", "gpu:0")
    assert (cpu.in_flight, cpu.capacity, cpu.calls, cpu.errors) == (3, 4, 41, 1)  # capacity: the most, not 16
    assert (cpu.busy_10s, cpu.busy_60s) == (0.5, 0.75)  # the busiest backend
    assert cpu.median_latency_s == 0.002  # 30 of 41 calls took about 2 ms
    assert cpu.backends == ["numpy", "jax", "opencl", "qiskit"]
    assert cpu.targets() == {"gpu": "fallback", "tpu": "fallback", "fpga": "fallback", "qpu": "simulator", "cpu": "device"}
    assert cpu.kind == "device" and cpu.description == "EPYC (2 cores), NumPy"
    assert (gpu.backends, gpu.capacity, gpu.targets()) == (["cupy"], 8, {"gpu": "device"})


def test_rows_of_workers_that_do_not_name_their_device_stay_apart():
    old = [device(backend="numpy", device_id="numpy:0:CPU"), device(backend="jax", device_id="jax:0:CPU")]
    for row in old:
        del row["physical_device"]
    assert [physical_device(r) for r in old] == ["numpy:0:CPU", "jax:0:CPU"]
    assert len(group_devices(old)) == 2


@pytest.mark.parametrize("pairs, expected", [
    ([(0.002, 30), (0.05, 10), (1.0, 1)], 0.002),
    ([(0.002, 1), (0.05, 10), (1.0, 1)], 0.05),
    ([(None, 5)], None),
])
def test_latency_is_the_median_over_calls(pairs, expected):
    assert median_over_calls([device(median_latency_s=v, calls=c) for v, c in pairs]) == expected


def test_utilisation_is_aggregated_per_target_over_physical_devices():
    metrics = cpu_backends(in_flight=1, busy_10s=0.5, busy_60s=0.2, calls=10) + cpu_backends(
        "tcp://127.0.0.1:40002", "1", busy_10s=0.0, busy_60s=0.1, calls=5)
    loads = {t.target: t for t in target_loads(metrics)}
    assert list(loads) == ["gpu", "tpu", "fpga", "qpu", "cpu"]
    cpu = loads["cpu"]  # two CPUs, not six backend rows: "2 devices, 4/8", not "6 devices, 4/24"
    assert (cpu.devices, cpu.kind, cpu.in_flight, cpu.capacity, cpu.calls) == (2, "device", 4, 8, 60)
    assert cpu.busy_10s == pytest.approx(0.25) and cpu.busy_60s == pytest.approx(0.15)
    assert (loads["gpu"].devices, loads["gpu"].kind) == (2, "fallback")
    assert loads["qpu"].kind == "simulator"


def test_monitor_rows_one_per_physical_device():
    metrics = cpu_backends(busy_10s=0.42, busy_60s=0.07)
    metrics[0].update(in_flight=1, calls=12, median_latency_s=0.0021, memory_used=2**30, memory_total=8 * 2**30,
                      warm_kernels=["saxpy", "vector_add"])
    metrics.append(device(target="gpu", backend="cupy", device="H100", physical_device="gpu:0"))
    html = render_monitor(metrics, [], now=0.0)
    assert html.count("class='kaas-row") == 2
    assert "1 worker, 2 devices" in html
    cpu_row = html[html.index("data-device='cpu'"):html.index("data-device='gpu:0'")]
    for shown in ("<span class='kaas-in-flight'>1/4</span>", "42%", "7%", ">12<", "2.10 ms",
                  "1.0/8.0 GiB", "warm kernels: saxpy, vector_add", "kaas-serves-cpu", "kaas-serves-qpu", ">opencl</span>",
                  ">qiskit</span>"):
        assert shown in cpu_row, shown
    assert "<tr class='kaas-row kaas-target-cpu' data-device='cpu'>" in html  # named by its primary target
    assert "<tr class='kaas-row kaas-target-gpu' data-device='gpu:0'>" in html
    assert "<b>cpu</b> 1 device, 1/4 in flight, busy 42% (10 s) 7% (60 s), 12 calls" in html
    assert "<b>gpu</b> 1 device, 0/4 in flight" in html  # the H100: the CPU stands in only without one
    assert "<b>qpu</b> 1 device (simulator)" in html
    assert "white-space:nowrap" in cpu_row and "<th style='text-align:left;padding:1px 8px 1px 0;white-space:nowrap" in html


def test_stand_in_targets_have_dashed_tags_and_a_stand_in_only_device_a_badge():
    (cpu,) = group_devices(cpu_backends())
    tags = device_tags(cpu)
    assert "kaas-serves-cpu' title='cpu: device, through numpy, jax, opencl'" in tags
    gpu_tag = tags[tags.index("kaas-serves-gpu"):]
    assert "border:1px dashed #b45309" in gpu_tag[:gpu_tag.index("</span>")]
    html = render_monitor([device(target="qpu", backend="qiskit", kind="simulator", device="Aer")], [], now=0.0)
    assert ">SIMULATOR</span>" in html


def test_a_device_shows_kept_data_and_failed_calls_in_the_error_colour():
    html = render_monitor([device(kept_bytes=3 * 2**20, calls=4, errors=2)], [], now=0.0)
    assert "kept 3.0 MiB" in html
    assert "<span class='kaas-failed' style='color:var(--jp-error-color1, #b91c1c)'>(2 failed)</span>" in html


def test_colours_follow_the_jupyterlab_theme():
    html = render_monitor(cpu_backends(in_flight=1), ["12:00:00 worker 1 (tcp://x) joined"], now=0.0,
                          note="pool unreachable", stale_after=5.0)
    assert "background:var(--jp-layout-color2, #e5e7eb)" in html  # the bars' track
    assert "background:#e5e7eb" not in html and "#d1d5db" not in html  # no fixed light track or border
    assert "color:var(--jp-content-font-color1, inherit)" in html and "color:var(--jp-ui-font-color2, #6b7280)" in html
    assert "border-bottom:1px solid var(--jp-border-color2, #ddd)" in html
    assert "color:var(--jp-error-color1, #b91c1c);font-weight:600" in html  # "not updating since"
    assert "color:var(--jp-warn-color1, #b45309)" in html  # the note
    compact = render_monitor(cpu_backends(), [], now=0.0, compact=True)
    assert "border-top:1px solid var(--jp-border-color2, #ddd)" in compact


def test_side_panel_layout_has_narrow_cards():
    metrics = cpu_backends(in_flight=1, calls=3)
    html = render_monitor(metrics, [], now=0.0, compact=True)
    assert "<table" not in html and html.count("class='kaas-row") == 1
    assert "<span class='kaas-in-flight'>4/4</span>" in html and "gpu fallback</span>" in html  # one each
    assert "<span class='kaas-calls'>12</span>" in html and "median latency</span> <span class='kaas-latency'>\u2014" in html
    assert "<svg class='kaas-history' width='100%' preserveAspectRatio='none' height='28'" in html  # fills the card
    assert "<b>cpu</b> 1 device, 4/4 in flight, busy 0%</div>" in html  # the summary, short


def test_history_keeps_a_window_of_samples_per_device():
    history = History(window=60.0)
    (cpu,) = group_devices(cpu_backends(in_flight=1, busy_10s=0.5))
    for t in (0.0, 30.0, 61.0):
        history.add([cpu], t)
    assert [s.t for s in history.of(cpu.key)] == [30.0, 61.0]  # older than 60 s: dropped
    assert history.of(cpu.key)[-1] == Sample(61.0, 0.5, 4, 4, None)
    history.add([], 200.0)
    assert history.of(cpu.key) == [] and history.series == {}  # a device gone a whole window


def test_sparkline_draws_busy_in_flight_latency_and_marks_joins_and_departures():
    samples = [Sample(40.0, 0.0, 0, 4, None), Sample(70.0, 0.5, 2, 4, 0.01), Sample(100.0, 1.0, 4, 4, 0.02)]
    marks = [(10.0, "joined", "old"), (55.0, "joined", "w2"), (85.0, "left", "w1")]
    svg = sparkline_svg(samples, marks, now=100.0, window=60.0, width=120, height=20)
    assert svg.startswith("<svg class='kaas-history' width='120' height='20' viewBox='0 0 120 20'")
    assert "points='0.0,18.5 60.0,10.0 120.0,1.5'" in svg  # busy: 0, 50%, 100% across the window
    assert "class='kaas-history-in-flight' points='0.0,18.5 60.0,10.0 120.0,1.5'" in svg
    assert "class='kaas-history-latency' points='60.0,10.0 120.0,1.5'" in svg and "stroke-dasharray:2 2" in svg
    assert "<line class='kaas-mark-joined' x1='30.0' x2='30.0'" in svg
    assert "<line class='kaas-mark-left' x1='90.0' x2='90.0'" in svg
    assert svg.count("<line") == 2  # the join 90 s ago is out of the window
    assert "<script" not in svg and "on" not in svg.replace("polyline", "").replace("kaas-", "").split("style")[0]


def test_sparkline_of_a_monitor_younger_than_the_window_spans_what_it_saw():
    samples = [Sample(70.0, 0.0, 0, 4, None), Sample(100.0, 1.0, 4, 4, None)]
    svg = sparkline_svg(samples, [(85.0, "left", "w1")], now=100.0, window=60.0, width=120, since=70.0)
    assert "class='kaas-history-busy' points='0.0,18.5 120.0,1.5'" in svg  # 30 s across the whole width
    assert "<line class='kaas-mark-left' x1='60.0'" in svg
    old = sparkline_svg(samples, [], now=100.0, window=60.0, width=120, since=0.0)  # watched longer: 60 s
    assert "class='kaas-history-busy' points='60.0,18.5 120.0,1.5'" in old


def test_sparkline_of_one_sample_still_shows_and_of_none_is_an_empty_track():
    assert "points='118.0,1.5 120.0,1.5'" in sparkline_svg([Sample(100.0, 1.0, 0, 4, None)], [], now=100.0)
    empty = sparkline_svg([], [], now=100.0)
    assert "<polyline" not in empty and "background:var(--jp-layout-color2" in empty


def test_live_monitor_marks_itself_stale_when_redraws_stop():
    live = render_monitor([device()], [], now=0.0, stale_after=5.0)
    assert "class='kaas-stale' style='max-height:0" in live and "animation:kaas-stale 0s 5s forwards" in live
    assert "kaas-stale" not in render_monitor([device()], [], now=0.0)  # a snapshot never goes stale


def test_empty_pool_says_so():
    assert "no worker serves anything yet" in render_monitor([], [], now=0.0)
    assert "no worker serves anything yet" in render_monitor([], [], now=0.0, compact=True)


def test_text_snapshot_has_one_line_per_physical_device():
    text = render_monitor_text(cpu_backends(calls=2) + cpu_backends("tcp://127.0.0.1:40002", "1"))
    lines = text.splitlines()
    assert lines[0] == "kaas pool: 2 devices" and len(lines) == 3
    assert lines[1] == ("  cpu    @ 0 (gpu (fallback), tpu (fallback), fpga (fallback), qpu (simulator), cpu through "
                        "numpy, jax, opencl, qiskit): 0/4 in flight, busy 0% (10 s) 0% (60 s), 8 calls")


def test_roster_logs_workers_joining_and_leaving():
    roster = Roster()
    roster.observe([device()], now=0.0)
    assert list(roster.events) == [] and list(roster.marks) == []  # the first look is the starting point
    roster.observe([device(), device(worker="tcp://127.0.0.1:40002", name="w2")], now=1.0)
    roster.observe([device(worker="tcp://127.0.0.1:40002", name="w2")], now=2.0)
    joined, left = roster.events
    assert joined.endswith("worker w2 (tcp://127.0.0.1:40002) joined")
    assert left.endswith("worker 0 (tcp://127.0.0.1:40001) left")
    assert list(roster.marks) == [(1.0, "joined", "w2"), (2.0, "left", "0")]


# -- what the monitor and %kaas status share: physical devices, call totals, warming --

def test_sessions_name_the_physical_device_they_run_on():
    from kaas_magic.backends.base import Offer, Session
    from kaas_magic.backends.cupy_backend import CupySession
    from kaas_magic.backends.jax_backend import JaxSession
    from kaas_magic.backends.numpy_backend import NumpySession
    from kaas_magic.backends.opencl_backend import OpenCLSession
    from kaas_magic.backends.qiskit_backend import QiskitSession
    from kaas_magic.targets import Service

    def name(cls, target, backend, kind="device", index=0, **detail):
        return cls(Offer(Service(target, backend, kind, index), "dev", detail), {}).physical_device

    assert name(NumpySession, "cpu", "numpy") == name(NumpySession, "gpu", "numpy", "fallback") == "cpu"
    assert name(JaxSession, "cpu", "jax", platform="cpu") == name(JaxSession, "tpu", "jax", "fallback", platform="cpu") == "cpu"
    assert name(JaxSession, "gpu", "jax", index=1, platform="cuda", platform_index=1) == "gpu:1"
    assert name(JaxSession, "tpu", "jax", platform="tpu", platform_index=0) == "tpu:0"
    assert name(OpenCLSession, "cpu", "opencl") == name(OpenCLSession, "fpga", "opencl", "fallback") == "cpu"
    assert name(OpenCLSession, "gpu", "opencl", index=1) == "gpu:1" and name(OpenCLSession, "fpga", "opencl") == "fpga:0"
    assert name(CupySession, "gpu", "cupy", index=2) == "gpu:2"
    assert name(QiskitSession, "qpu", "qiskit", "simulator") == "cpu"
    assert name(QiskitSession, "qpu", "qiskit", ibm_backend="ibm_kyiv") == "qpu:ibm_kyiv"
    assert name(Session, "cpu", "other") == "other:0:dev"  # unknown: a device of its own


def test_call_counts_survive_a_workers_replacement():
    from kaas_magic.client.control import CallTotals, with_calls_before

    totals = CallTotals()

    def poll(address, numpy_calls, jax_calls, errors=0):
        rows = [device(address, "w0", backend="numpy", device_id="numpy:0:CPU", calls=numpy_calls, errors=errors),
                device(address, "w0", backend="jax", device_id="jax:0:CPU", calls=jax_calls)]
        return {r["backend"]: (r["calls"], r["errors"]) for r in with_calls_before(rows, totals)}

    assert poll("tcp://127.0.0.1:40001", 5, 2, errors=1) == {"numpy": (5, 1), "jax": (2, 0)}
    assert poll("tcp://127.0.0.1:40001", 7, 2, errors=1) == {"numpy": (7, 1), "jax": (2, 0)}
    # replaced: a new address under the same name, counting from zero
    assert poll("tcp://127.0.0.1:40009", 1, 0) == {"numpy": (8, 1), "jax": (2, 0)}
    assert poll("tcp://127.0.0.1:40009", 3, 1) == {"numpy": (10, 1), "jax": (3, 0)}
    # restarted in place: the same address, counts that went down
    assert poll("tcp://127.0.0.1:40009", 0, 0) == {"numpy": (10, 1), "jax": (3, 0)}
    # another worker's counts are its own
    other = with_calls_before([device("tcp://127.0.0.1:40002", "w1", device_id="numpy:0:CPU", calls=4)], totals)
    assert other[0]["calls"] == 4


def pool_status(workers, metrics=()):
    from kaas_magic.pool_status import PoolStatus

    return PoolStatus(scheduler="tcp://127.0.0.1:8786", embedded=True, workers=workers, metrics=list(metrics))


def worker_info(address="tcp://127.0.0.1:40001", name="0", ready=True, backends=None, services=None):
    return {"address": address, "name": name, "host": "box", "ready": ready, "concurrency": 4, "in_flight": 0,
            "backends": backends or {"numpy": "ready in 0.1 s"},
            "services": services if services is not None else [
                {"resource": "kaas/cpu/numpy/device/0", "target": "cpu", "backend": "numpy", "kind": "device",
                 "device": "EPYC (2 cores), NumPy", "physical_device": "cpu", "calls": 3}]}


def test_status_has_a_line_per_physical_device_in_the_monitors_words():
    rows = cpu_backends(calls=2)
    rows[0].update(in_flight=1, busy_10s=0.5, median_latency_s=0.0021)
    text = str(pool_status([worker_info()], rows))
    lines = text.splitlines()
    assert lines[0] == "kaas pool (embedded LocalCluster) at tcp://127.0.0.1:8786: 1 worker, 1 device, 1 in flight"
    assert "warming up" not in text
    (cpu,) = [line for line in lines if line.startswith("    cpu")]
    assert cpu.endswith("serves gpu (fallback), tpu (fallback), fpga (fallback), qpu (simulator), cpu through numpy, "
                        "jax, opencl, qiskit; 1/4 in flight, busy 50% (10 s) 0% (60 s), 8 calls, median latency 2.10 ms")
    status = pool_status([worker_info()], rows)
    assert "<table>" in status._repr_html_() and "1/4" in status._repr_html_()
    assert [r["physical_device"] for r in status.rows()] == ["cpu"]


def test_status_without_metrics_still_groups_services_by_device():
    text = str(pool_status([worker_info()]))
    assert "    cpu    EPYC (2 cores), NumPy: serves cpu through numpy; 3 calls" in text


def test_status_says_what_is_still_warming_up():
    warming = worker_info("tcp://127.0.0.1:40002", "1", ready=False,
                          backends={"numpy": "ready in 0.1 s", "jax": "warming", "opencl": "pending", "qiskit": "no device"})
    kernels = worker_info("tcp://127.0.0.1:40003", "2", ready=False)
    lines = str(pool_status([worker_info(), warming, kernels])).splitlines()
    assert lines[1] == "warming up: worker 1 (jax, opencl); worker 2 (kernel library)"
    assert "    backend jax: warming" in lines
    assert "warming up: worker 1" in pool_status([warming])._repr_html_()


class FakePool:
    def __init__(self, metrics):
        self.rows = metrics
        self.client = SimpleNamespace(status="running")
        self.fail_with: Exception | None = None

    def metrics(self):
        if self.fail_with is not None:
            raise self.fail_with
        return list(self.rows)


def make_monitor(pool, interval=0.01):
    finals: list[tuple[dict, str]] = []
    widget = FakeWidget()
    return Monitor(pool, widget, interval, lambda data, reason: finals.append((data, reason))), widget, finals


def test_monitor_thread_redraws_shows_joins_and_stops_when_the_pool_closes():
    pool = FakePool([device(in_flight=3)])
    mon, widget, finals = make_monitor(pool)
    mon.start()
    assert widget.wait_for(lambda v: "3/4" in v[-1])
    pool.rows = [device(), device(worker="tcp://127.0.0.1:40002", name="w2")]
    assert widget.wait_for(lambda v: "w2 (tcp://127.0.0.1:40002) joined" in v[-1])
    assert widget.wait_for(lambda v: "<line class='kaas-mark-joined'" in v[-1])  # on the history, too

    pool.client.status = "closed"
    mon._thread.join(timeout=30)
    assert not mon.running and mon.stopped_because == "pool closed" and widget.closed
    assert "kaas-stale" in widget.values[0] and "kaas-stale" not in finals[0][0]["text/html"]
    (data, reason), = finals
    assert reason == "pool closed" and WIDGET_MIME not in data
    assert "monitor pool closed at" in data["text/html"] and data["text/html"].count("class='kaas-row") == 2
    assert "w2" in data["text/plain"]


def test_monitor_keeps_the_last_rows_while_the_pool_is_unreachable():
    pool = FakePool([device(in_flight=2)])
    mon, widget, _ = make_monitor(pool)
    mon.refresh()
    pool.fail_with = OSError("scheduler gone")
    mon.refresh()
    assert "pool unreachable: OSError: scheduler gone" in widget.value and "2/4" in widget.value
    (samples,) = mon.history.series.values()
    assert len(samples) == 1  # the rows kept while unreachable are no new sample


def test_monitor_samples_every_refresh_into_its_history():
    pool = FakePool([device(in_flight=1, busy_10s=0.25)])
    mon, widget, _ = make_monitor(pool)
    mon.refresh()
    pool.rows = [device(in_flight=3, busy_10s=0.75)]
    mon.refresh()
    (key, samples), = mon.history.series.items()
    assert key == ("tcp://127.0.0.1:40001", "cpu")
    assert [(s.in_flight, s.busy) for s in samples] == [(1, 0.25), (3, 0.75)]
    assert widget.value.count("<polyline class='kaas-history-busy'") == 1


def test_a_second_view_of_a_pool_carries_on_from_the_first_ones_history():
    pool = FakePool([device(in_flight=1)])
    first, _, _ = make_monitor(pool, interval=60)
    first.refresh()
    first.start()
    first.roster.marks.append((1.0, "joined", "w2"))
    try:
        second, widget, _ = make_monitor(pool, interval=60)
        assert second.history.since == first.history.since is not None
        assert second.history.of(("tcp://127.0.0.1:40001", "cpu")) == first.history.of(("tcp://127.0.0.1:40001", "cpu"))
        assert list(second.roster.marks) == [(1.0, "joined", "w2")]
        other, _, _ = make_monitor(FakePool([device()]), interval=60)  # another pool: its own
        assert other.history.since is None and not other.roster.marks
    finally:
        first.stop()


def test_kaas_monitor_stays_a_function_once_the_module_behind_it_is_loaded():
    import kaas_magic
    import kaas_magic.pool_monitor  # noqa: F401  (what kaas.monitor() imports)

    assert callable(kaas_magic.monitor) and callable(kaas_magic.panel)


def test_interpreter_exit_stops_every_running_monitor_once():
    mon, widget, finals = make_monitor(FakePool([device()]), interval=60)
    mon.start()
    _stop_all()
    assert not mon.running and [reason for _, reason in finals] == [KERNEL_EXIT]
    mon.stop()
    assert len(finals) == 1 and mon.stopped_because == KERNEL_EXIT
