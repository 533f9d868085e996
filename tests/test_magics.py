"""The issue's cells, as written, on an in-process IPython shell against a real pool."""

from __future__ import annotations

import numpy as np
import pytest
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output

import kaas_magic


class Shown:
    """What the user sees: printed text and displayed objects (as text)."""

    def __init__(self, captured):
        displayed = "".join(o.data.get("text/plain", "") + "\n" for o in captured.outputs)
        self.stdout = captured.stdout + displayed
        self.stderr = captured.stderr


def run(ip, cell: str):
    """Run a notebook cell; return (ExecutionResult, what was shown)."""
    with capture_output() as out:
        result = ip.run_cell(cell)
    return result, Shown(out)


@pytest.fixture
def x(ip):
    ip.user_ns["x"] = np.linspace(0, 1, 1_000_000, dtype=np.float32)
    return ip.user_ns["x"]


def test_load_ext_registers_the_magic(ip):
    assert "kaas" in ip.magics_manager.magics["cell"]
    assert "kaas" in ip.magics_manager.magics["line"]


def test_cpu_cell_sends_x_returns_y_and_streams_print(ip, x):
    result, out = run(ip, "%%kaas cpu\ny = xp.sqrt(x) + 1\nprint('ran on', device)\n")
    assert result.success, out.stdout
    y = ip.user_ns["y"]
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    np.testing.assert_allclose(y, np.sqrt(x) + 1)
    assert "ran on" in out.stdout and "NumPy" in out.stdout
    record = kaas_magic.last_run()
    assert record.target == "cpu" and record.backend == "numpy" and record.kind == "device"
    assert record.inputs == ("x",) and record.outputs == ("y",)
    assert record.bytes_in >= x.nbytes and record.bytes_out >= x.nbytes


def test_tpu_fallback_runs_jax_on_xla_cpu_and_says_so(ip, x):
    result, out = run(ip, "%%kaas tpu --fallback\nz = float(xp.tanh(x).sum())\n")
    assert result.success, out.stdout
    assert ip.user_ns["z"] == pytest.approx(float(np.tanh(x.astype(np.float64)).sum()), rel=1e-4)
    record = kaas_magic.last_run()
    assert record.backend == "jax" and record.fallback
    assert "FALLBACK" in out.stdout and "XLA:CPU" in out.stdout


def test_tpu_without_fallback_fails_and_lists_what_the_pool_serves(ip, x):
    result, out = run(ip, "%%kaas tpu\nz = float(xp.tanh(x).sum())\n")
    assert isinstance(result.error_in_exec, kaas_magic.TargetUnavailable)
    message = str(result.error_in_exec)
    assert "tpu" in message and "cpu numpy" in message and "--fallback" in message


def test_qpu_ghz_on_the_warm_aer_simulator(ip):
    cell = (
        "%%kaas qpu\n"
        "from qiskit import QuantumCircuit\n"
        "qc = QuantumCircuit(3); qc.h(0); qc.cx(0, 1); qc.cx(1, 2); qc.measure_all()\n"
        "counts = run(qc, shots=1000)\n"
    )
    result, out = run(ip, cell)
    assert result.success, out.stdout
    counts = ip.user_ns["counts"]
    assert set(counts) <= {"000", "111"} and sum(counts.values()) == 1000
    assert min(counts.values()) > 350  # both outcomes appear, roughly half each
    record = kaas_magic.last_run()
    assert record.simulator and "Aer" in record.device
    assert "SIMULATOR" in out.stdout
    assert "QuantumCircuit" not in ip.user_ns  # imports stay on the worker
    assert ip.user_ns["qc"].num_qubits == 3


def test_fpga_fallback_runs_opencl_on_pocl(ip, x):
    cell = (
        "%%kaas fpga --fallback\n"
        'prg = cl.Program(ctx, "__kernel void twice(__global float *a){int i=get_global_id(0); a[i]*=2;}").build()\n'
        "buf = cl_array.to_device(queue, x[:1024].copy()); prg.twice(queue, (1024,), (64,), buf.data)\n"
        "w = buf.get()\n"
    )
    result, out = run(ip, cell)
    assert result.success, out.stdout
    np.testing.assert_array_equal(ip.user_ns["w"], x[:1024] * 2)
    np.testing.assert_array_equal(ip.user_ns["buf"], x[:1024] * 2)  # device array came home
    assert "prg" not in ip.user_ns
    # A name the user did not ask for that cannot travel is a note in the record, not an error line.
    assert "not returned" not in out.stderr
    record = kaas_magic.last_run()
    assert record.fallback and record.backend == "opencl" and "prg" in record.skipped
    assert any(note.startswith("'prg' not returned") and "pyopencl" in note for note in record.notes)


def test_a_name_asked_for_with_out_that_cannot_travel_is_an_error_naming_it(ip):
    result, out = run(ip, "%%kaas cpu --out lock,n\nimport threading\nlock = threading.Lock()\nn = 3\n")
    assert not result.success
    assert type(result.error_in_exec).__name__ == "OutputNotReturned"
    assert "'lock' not returned" in str(result.error_in_exec) and "_thread.lock" in str(result.error_in_exec)
    assert ip.user_ns["n"] == 3  # what did come back is assigned



def test_gpu_fallback_is_a_labelled_cpu_stand_in(ip, x):
    result, out = run(ip, "%%kaas gpu --fallback\nv = xp.asarray(x) * 3\n")
    assert result.success, out.stdout
    np.testing.assert_allclose(ip.user_ns["v"], x * 3)
    record = kaas_magic.last_run()
    if record.kind == "fallback":
        assert "stand-in" in record.device and "FALLBACK" in out.stdout
    else:  # a real CUDA GPU in the pool
        assert record.backend == "cupy"


def test_scalars_strings_and_containers_round_trip(ip):
    ip.user_ns.update(n=41, s="kaas", d={"a": [1, 2]}, arr=np.arange(6).reshape(2, 3))
    result, out = run(ip, "%%kaas cpu\nn2 = n + 1\ns2 = s.upper()\nd2 = {**d, 'b': 3}\nt = arr.T.copy()\n")
    assert result.success, out.stdout
    assert ip.user_ns["n2"] == 42 and ip.user_ns["s2"] == "KAAS"
    assert ip.user_ns["d2"] == {"a": [1, 2], "b": 3}
    np.testing.assert_array_equal(ip.user_ns["t"], np.arange(6).reshape(2, 3).T)


def test_in_and_out_override_the_detected_names(ip):
    ip.user_ns.update(a=np.ones(3), b=np.ones(3))
    result, out = run(ip, "%%kaas cpu --in a --out c\nc = a * 2\nunused = 5\n")
    assert result.success, out.stdout
    np.testing.assert_array_equal(ip.user_ns["c"], np.full(3, 2.0))
    assert "unused" not in ip.user_ns
    assert kaas_magic.last_run().inputs == ("a",)


def test_injected_names_are_not_sent_from_the_notebook(ip):
    ip.user_ns["device"] = "my own variable"
    result, out = run(ip, "%%kaas cpu\nwhere = device\n")
    assert result.success
    assert ip.user_ns["where"] != "my own variable"
    assert kaas_magic.last_run().inputs == ()


def test_functions_defined_in_the_notebook_travel(ip):
    run(ip, "def double(v):\n    return v * 2\n")
    result, out = run(ip, "%%kaas cpu\nr = double(21)\n")
    assert result.success, out.stdout
    assert ip.user_ns["r"] == 42


def test_backend_override(ip):
    ip.user_ns["m"] = np.eye(4, dtype=np.float32)
    result, out = run(ip, "%%kaas cpu --backend jax\nq = xp.sum(m @ m)\n")
    assert result.success, out.stdout
    assert float(ip.user_ns["q"]) == 4.0
    assert isinstance(ip.user_ns["q"], np.ndarray)  # a JAX array came back as NumPy
    assert kaas_magic.last_run().backend == "jax"


def test_quiet_hides_the_summary(ip):
    result, out = run(ip, "%%kaas cpu --quiet\nq = 1\n")
    assert result.success and "kaas cpu" not in out.stdout
    result, out = run(ip, "%%kaas cpu\nq = 1\n")
    assert "kaas cpu [numpy]" in out.stdout


# --- errors ---------------------------------------------------------------------------


def test_exception_keeps_type_message_cell_line_and_worker(ip):
    result, out = run(ip, "%%kaas cpu\na = 1\nb = a / 0\n")
    err = result.error_in_exec
    assert isinstance(err, ZeroDivisionError) and "division by zero" in str(err)
    assert err.kaas_worker.startswith("tls://127.0.0.1:")  # the embedded pool: mutual TLS
    frames = err.kaas_frames
    assert frames[-1][1] == 3  # the cell's own line: %%kaas is line 1
    assert "line 3" in out.stdout and "b = a / 0" in out.stdout
    assert err.kaas_worker in out.stdout
    assert "kaas_magic" not in out.stdout  # no frames of our machinery


def test_exception_raised_deeper_shows_the_call_chain(ip):
    cell = "%%kaas cpu\ndef inner(v):\n    raise KeyError(v)\n\ninner('missing')\n"
    result, out = run(ip, cell)
    assert isinstance(result.error_in_exec, KeyError)
    lines = [f[1] for f in result.error_in_exec.kaas_frames]
    assert lines == [5, 3]


def test_custom_exception_class_from_the_cell(ip):
    result, out = run(ip, "%%kaas cpu\nclass Boom(Exception):\n    pass\nraise Boom('bad thing')\n")
    err = result.error_in_exec
    assert type(err).__name__ == "Boom" and str(err) == "bad thing"


def test_syntax_error_is_reported_before_anything_runs(ip, pool):
    before = kaas_magic.last_run()
    result, out = run(ip, "%%kaas cpu\na = 1\nb = (\n")
    err = result.error_in_exec
    assert isinstance(err, kaas_magic.errors.CellSyntaxError) and isinstance(err.error, SyntaxError)
    assert err.error.lineno == 3 and err.error.filename.startswith("<kaas In[")
    # Shown like a normal cell's syntax error: the cell's line and the caret, no frames.
    shown = "\n".join(err._render_traceback_())
    assert "b = (" in shown and "^" in shown and "magics.py" not in shown and len(shown.splitlines()) <= 8
    assert kaas_magic.last_run() is before  # nothing was sent


def test_unsendable_variable_is_refused_by_name_and_type(ip):
    import threading

    ip.user_ns["lock"] = threading.Lock()
    before = kaas_magic.last_run()
    result, out = run(ip, "%%kaas cpu\nwith lock:\n    pass\n")
    err = result.error_in_exec
    assert isinstance(err, kaas_magic.VariableNotSendable)
    assert "'lock'" in str(err) and "lock" in err.type_name.lower()
    record = kaas_magic.last_run()  # refused before sending: its record says so
    assert record is not before and not record.ok and record.error == "VariableNotSendable"
    assert record.bytes_in == 0 and record.timings.execute == 0


def test_unknown_target_lists_valid_targets(ip):
    with pytest.raises(UsageError) as err:
        ip.run_cell_magic("kaas", "xpu", "a = 1")
    for target in ("gpu", "tpu", "fpga", "qpu", "cpu"):
        assert target in str(err.value)


def test_unknown_option_lists_valid_options(ip):
    with pytest.raises(UsageError) as err:
        ip.run_cell_magic("kaas", "cpu --turbo", "a = 1")
    assert "--turbo" in str(err.value) and "--fallback" in str(err.value)


def test_unknown_backend_lists_valid_backends(ip):
    with pytest.raises(UsageError) as err:
        ip.run_cell_magic("kaas", "cpu --backend torch", "a = 1")
    assert "numpy" in str(err.value) and "qiskit" in str(err.value)


def test_empty_cell_is_a_usage_error(ip):
    with pytest.raises(UsageError, match="empty"):
        ip.run_cell_magic("kaas", "cpu", "\n   \n")


def test_pool_is_healthy_after_errors(ip, x):
    run(ip, "%%kaas cpu\nraise RuntimeError('first')\n")
    result, out = run(ip, "%%kaas cpu\ny = float(x.sum())\n")
    assert result.success
    assert ip.user_ns["y"] == pytest.approx(float(x.astype(np.float64).sum()), rel=1e-5)


def test_status_and_last_line_magics(ip, pool):
    result, out = run(ip, "%kaas status")
    assert result.success
    status = result.result
    targets = {row["target"] for row in status.rows()}
    assert {"cpu", "qpu"} <= targets
    assert len(status.workers) == 2
    assert "kaas pool (embedded LocalCluster)" in str(status)
    run(ip, "%%kaas cpu --quiet\nq = 1\n")
    result, out = run(ip, "%kaas last")
    assert result.result is kaas_magic.last_run()


def test_unknown_command(ip):
    with pytest.raises(UsageError):
        ip.run_line_magic("kaas", "explode")


def test_a_magic_line_is_parsed_once_and_each_cell_gets_its_own_options():
    from kaas_magic.magics import _parse_cell_line, _parsed_cell_line

    first = _parse_cell_line("fpga --fallback --register scale")
    first.register = "changed by the first cell"
    again = _parse_cell_line("fpga --fallback --register scale")
    assert again.register == "scale" and again.fallback is True and again.target == "fpga"
    assert _parsed_cell_line.cache_info().hits >= 1
    for _ in range(2):  # a bad line fails every time: errors are not cached
        with pytest.raises(UsageError, match="nosuch"):
            _parse_cell_line("nosuch")


@pytest.mark.parametrize("state, worker, waiting, expected", [
    ("starting", "", "starting the pool", "stopped while waiting: starting the pool"),
    ("queued", "tls://w:1", "", "stopped while queued, before the call reached worker tls://w:1: nothing ran"),
    ("sending", "", "", "before the call reached a worker"),
    ("receiving", "tls://w:1", "", "the cell ran, its variables were not all assigned"),
])
def test_an_interrupt_outside_the_worker_says_what_it_stopped(state, worker, waiting, expected):
    from types import SimpleNamespace

    from kaas_magic.magics import _interrupted_where
    from kaas_magic.record import RunRecord

    view = SimpleNamespace(state=state, record=RunRecord(call_id="c", target="cpu", worker=worker, waiting_for=waiting))
    assert expected in _interrupted_where(view)
    assert "nothing more is known" in _interrupted_where(None)


def test_an_interrupt_during_the_call_is_a_short_keyboard_interrupt(ip, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt()

    monkeypatch.setattr(kaas_magic, "run_cell", interrupted)
    result, out = run(ip, "%%kaas cpu\nq = 1\n")
    err = result.error_in_exec
    assert isinstance(err, KeyboardInterrupt) and isinstance(err, kaas_magic.errors.CellInterrupted)
    assert err._render_traceback_() == [f"KeyboardInterrupt: {err}"]


def test_help_lists_every_option_and_command_in_plain_text():
    from kaas_magic.magics import _COMMANDS, KaasMagics, _cell_parser

    text = KaasMagics.kaas.__doc__
    for action in _cell_parser.parser._actions:
        assert any(flag in text for flag in action.option_strings or [action.metavar])
    for command in _COMMANDS._subparsers._group_actions[0].choices:
        assert f"%kaas {command}" in text
    assert "::" not in text and "_cell_parser" not in text and "Examples:" in text
