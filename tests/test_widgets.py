"""The run view and the pool monitor without a browser or a pool: state transitions,
formatting, aggregation of utilisation, monitor rows from fake metrics."""

from __future__ import annotations

import sys
import threading
from types import SimpleNamespace

import pytest

from kaas_magic import config
from kaas_magic.pool_monitor import (
    KERNEL_EXIT,
    Monitor,
    Roster,
    _stop_all,
    format_memory,
    occupancy,
    render_monitor,
    target_loads,
)
from kaas_magic.record import RunRecord, Timings
from kaas_magic.widgets import (
    RunView,
    display_data,
    format_duration,
    inline_view,
    phase_segments,
    render_html,
    render_text,
    warmth,
)

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


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
    assert WIDGET_MIME in calls[0] and "kaas-state-queued" in calls[0]["text/html"]
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


def test_no_inline_view_without_ipywidgets(shown, monkeypatch):
    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    assert inline_view() is None


def test_no_inline_view_in_a_terminal_shell(monkeypatch):
    import IPython

    monkeypatch.setattr(IPython, "get_ipython", lambda: FakeShell(with_kernel=False))
    assert inline_view() is None


# -- the monitor --

def device(worker="tcp://127.0.0.1:40001", name="0", target="cpu", **changes) -> dict:
    metric = dict(
        worker=worker, worker_name=name, host="box", target=target, backend="numpy", kind="device",
        device="CPU x86_64", concurrency=4, in_flight=0, queued=0, busy_10s=0.0, busy_60s=0.0,
        calls=0, errors=0, median_latency_s=None, memory_used=None, memory_total=None, warm_kernels=[],
    )
    metric.update(changes)
    return metric


@pytest.mark.parametrize("in_flight, concurrency, expected", [(0, 4, 0.0), (2, 4, 0.5), (6, 4, 1.0), (1, 0, 0.0)])
def test_occupancy_is_calls_in_flight_over_concurrency(in_flight, concurrency, expected):
    assert occupancy(device(in_flight=in_flight, concurrency=concurrency)) == expected


def test_memory_shows_what_the_backend_could_tell():
    assert format_memory(None, None) == "\u2014"
    assert format_memory(3 * 2**30, 80 * 2**30) == "3.0 GiB / 80.0 GiB"
    assert format_memory(None, 512 * 2**20) == "? / 512.0 MiB"


def test_utilisation_is_aggregated_per_target():
    metrics = [
        device(in_flight=2, busy_10s=0.5, busy_60s=0.2, calls=10),
        device(worker="tcp://127.0.0.1:40002", name="1", busy_10s=0.0, busy_60s=0.1, calls=5),
        device(target="gpu", kind="fallback", in_flight=1, concurrency=2, busy_10s=1.0),
    ]
    cpu, gpu = target_loads(metrics)
    assert (cpu.target, cpu.devices, cpu.in_flight, cpu.capacity, cpu.calls) == ("cpu", 2, 2, 8, 15)
    assert cpu.busy_10s == pytest.approx(0.25) and cpu.busy_60s == pytest.approx(0.15)
    assert (gpu.target, gpu.devices, gpu.busy_10s) == ("gpu", 1, 1.0)


def test_monitor_rows_from_metrics():
    metrics = [
        device(in_flight=1, busy_10s=0.42, busy_60s=0.07, calls=12, median_latency_s=0.0021,
               memory_used=2**30, memory_total=8 * 2**30, warm_kernels=["saxpy", "vector_add"]),
        device(target="gpu", kind="fallback", device="CPU stand-in for gpu: NumPy"),
    ]
    html = render_monitor(metrics, [], now=0.0)
    assert html.count("class='kaas-row") == 2
    assert html.index("kaas-target-cpu") < html.index("kaas-target-gpu")  # sorted by target
    cpu_row = html[html.index("kaas-target-cpu"):html.index("kaas-target-gpu")]
    for shown in ("<span class='kaas-in-flight'>1/4</span>", "42%", "7%", "12", "2.10 ms",
                  "1.0 GiB / 8.0 GiB", "saxpy, vector_add"):
        assert shown in cpu_row
    assert ">FALLBACK</span>CPU stand-in for gpu: NumPy" in html
    assert "also" not in html
    assert "1 worker, 2 devices" in html
    assert "<b>cpu</b> 1 device, 1/4 in flight, busy 42% (10 s) 7% (60 s), 12 calls" in html


def test_a_device_serving_several_targets_says_so_and_shows_kept_data():
    metric = device(services=("kaas/cpu/numpy/device/0", "kaas/gpu/numpy/fallback/0"), kept_bytes=3 * 2**20)
    html = render_monitor([metric], [], now=0.0)
    assert "also gpu:numpy (fallback)" in html and "kept 3.0 MiB" in html


def test_side_panel_layout_has_the_same_fields_in_narrow_cards():
    metrics = [device(in_flight=1, calls=3), device(target="qpu", kind="simulator", device="Aer")]
    html = render_monitor(metrics, [], now=0.0, compact=True)
    assert "<table" not in html and html.count("class='kaas-row") == 2
    assert "<span class='kaas-in-flight'>1/4</span>" in html and ">SIMULATOR</span>Aer" in html
    assert "median latency</span> \u2014" in html


def test_live_monitor_marks_itself_stale_when_redraws_stop():
    live = render_monitor([device()], [], now=0.0, stale_after=5.0)
    assert "class='kaas-stale' style='max-height:0" in live and "animation:kaas-stale 0s 5s forwards" in live
    assert "kaas-stale" not in render_monitor([device()], [], now=0.0)  # a snapshot never goes stale


def test_empty_pool_says_so():
    assert "no worker serves anything yet" in render_monitor([], [], now=0.0)
    assert "no worker serves anything yet" in render_monitor([], [], now=0.0, compact=True)


def test_roster_logs_workers_joining_and_leaving():
    roster = Roster()
    roster.observe([device()], now=0.0)
    assert list(roster.events) == []  # the first look is the starting point, not a join
    roster.observe([device(), device(worker="tcp://127.0.0.1:40002", name="w2")], now=1.0)
    roster.observe([device(worker="tcp://127.0.0.1:40002", name="w2")], now=2.0)
    joined, left = roster.events
    assert joined.endswith("worker w2 (tcp://127.0.0.1:40002) joined")
    assert left.endswith("worker 0 (tcp://127.0.0.1:40001) left")


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
