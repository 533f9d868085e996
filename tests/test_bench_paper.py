"""``kaas bench paper``: its arithmetic, tables, CSV and plot on made-up figures, the naive
child's protocol, and one small real run of the command."""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from kaas_magic.bench import paper as bench_paper
from kaas_magic.bench.paper import (
    CSV_COLUMNS, PHASES, TASKS, Completion, NaiveRun, Results, Settings, Sharing, Stream,
    child_command, cold_env, reduction_pct, run_naive, settings_from_args, write_csv,
)


def _naive(seconds: float, kind: str = "fallback") -> NaiveRun:
    return NaiveRun(seconds, {"import": 0.5, "init": 0.1, "compile": 0.2, "run": 0.05}, "pthread CPU (OpenCL, PoCL)", kind)


@pytest.fixture
def results() -> Results:
    """Made-up figures: fpga on a stand-in, qpu on a simulator, cpu on the device, no GPU."""
    r = Results(["command: test", "machine: test box"])
    r.completions = [
        Completion(TASKS["fpga"], "fallback", "FALLBACK CPU stand-in for fpga: pthread CPU",
                   [_naive(2.0), _naive(2.0), _naive(3.0)], [0.25, 0.5, 0.75]),
        Completion(TASKS["qpu"], "simulator", "SIMULATOR Aer simulator", [_naive(1.0, "simulator")] * 3, [0.5] * 3),
        Completion(TASKS["cpu"], "device", "the CPU, NumPy", [_naive(0.2, "device")] * 3, [0.3] * 3),
    ]
    r.sharing = [Sharing(TASKS["fpga"], "fallback", 4, Stream([4.0, 8.0], 8.0, 0.015), Stream([0.01] * 100, 10.0, 0.5))]
    r.skipped = {"gpu": "no CUDA GPU here"}
    return r


def test_reduction_is_one_minus_the_ratio_of_medians(results):
    assert reduction_pct(2.0, 0.5) == 75.0
    assert reduction_pct(1.0, 1.5) == -50.0  # slower than naive shows as a negative reduction
    fpga, qpu, cpu = results.completions
    assert fpga.naive_median == 2.0 and fpga.kaas_median == 0.5
    assert fpga.reduction == 75.0
    assert cpu.reduction == pytest.approx(-50.0)


def test_breakdown_puts_what_the_child_cannot_see_under_process(results):
    parts = results.completions[0].breakdown()
    assert list(parts) == ["process", *PHASES]
    assert parts["process"] == pytest.approx(2.0 - 0.85)  # the median run: 2.0 s minus its phases
    assert parts["compile"] == pytest.approx(0.2)


def test_csv_marks_stand_ins_and_skips_and_carries_the_papers_figures(results, tmp_path):
    path = write_csv(results, tmp_path / "sub" / "paper.csv")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS
        rows = {(row["experiment"], row["target"]): row for row in reader}
    assert set(rows) == {("completion", t) for t in ("gpu", "fpga", "qpu", "cpu")} | {("sharing", "fpga")}
    gpu, fpga = rows[("completion", "gpu")], rows[("completion", "fpga")]
    assert gpu["kind"] == "skipped" and gpu["note"] == "no CUDA GPU here" and gpu["reduction_pct"] == ""
    assert gpu["paper_reduction_pct"] == "96.0"
    assert fpga["kind"] == "FALLBACK" and fpga["device"].startswith("FALLBACK")
    assert fpga["naive_device"].startswith("FALLBACK")  # the naive child's stand-in says so too
    assert float(fpga["reduction_pct"]) == 75.0 and fpga["paper_reduction_pct"] == "68.4"
    assert float(fpga["naive_median_ms"]) == 2000.0 and float(fpga["kaas_median_ms"]) == 500.0
    assert rows[("completion", "qpu")]["kind"] == "SIMULATOR"
    assert rows[("completion", "cpu")]["kind"] == "device" and rows[("completion", "cpu")]["paper_reduction_pct"] == ""
    sharing = rows[("sharing", "fpga")]
    assert float(sharing["naive_tasks_per_s"]) == 0.25 and float(sharing["kaas_tasks_per_s"]) == 10.0
    assert float(sharing["naive_busy_pct"]) == 1.5 and float(sharing["kaas_busy_pct"]) == 50.0
    assert sharing["clients"] == "4"


def test_tables_never_present_a_stand_in_as_the_device(results):
    text = results.table()
    completion = text.split("Where the naive time goes")[0]
    rows = {line.split()[0]: line for line in completion.splitlines() if "%" in line}
    assert "FALLBACK" in rows["fpga"] and "68.4 %" in rows["fpga"] and "75.0 %" in rows["fpga"]
    assert "SIMULATOR" in rows["qpu"]
    assert "not run" in rows["gpu"] and "gpu: skipped: no CUDA GPU here" in text
    assert "KaaS on FALLBACK CPU stand-in for fpga" in text
    sharing = text.split("Sharing:")[1]
    assert "FALLBACK" in next(line for line in sharing.splitlines() if line.startswith("fpga"))
    markdown = results.table(markdown=True)
    assert "| fpga | FALLBACK | 2000 | " in markdown and "|---|---|---:|" in markdown


def test_plot_writes_a_png(results, tmp_path):
    path = bench_paper.plot(results, tmp_path / "paper.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


@pytest.mark.parametrize("target", list(TASKS))
def test_every_child_program_compiles_and_gets_its_kernel_as_a_file(target, tmp_path):
    task = TASKS[target]
    program = task.child_path.read_text()
    compile(program, str(task.child_path), "exec")
    assert all(f'phase("{p}")' in program for p in PHASES) and "report(" in program
    command = child_command(task, str(tmp_path))
    assert command[:2] == [sys.executable, str(task.child_path)]
    if task.kernel is None:
        assert "--source" not in command
    else:
        source = command[command.index("--source") + 1]
        assert source.startswith(str(tmp_path))
        if task.kernel == "matmul":
            assert "void matmul" in open(source).read()


def test_naive_child_runs_cold_and_reports_its_phases(tmp_path):
    env = cold_env(str(tmp_path))
    assert env["POCL_CACHE_DIR"].startswith(str(tmp_path)) and env["XDG_CACHE_HOME"] == str(tmp_path)
    assert env["JAX_ENABLE_COMPILATION_CACHE"] == "false" and "JAX_COMPILATION_CACHE_DIR" not in env
    run = run_naive(TASKS["cpu"])
    assert set(run.phases) == set(PHASES) and run.kind == "device"
    assert run.seconds > sum(run.phases.values())  # interpreter start-up and exit are on top


def test_settings_from_the_command_line():
    def parse(**kw) -> Settings:
        args = dict(targets="gpu,fpga,tpu,qpu,cpu", quick=False, repeats=None, kaas_repeats=None, clients=None)
        return settings_from_args(argparse.Namespace(**{**args, **kw}))

    assert parse() == Settings()
    quick = parse(quick=True, targets="cpu, qpu")
    assert quick.targets == ("cpu", "qpu") and quick.naive_repeats == 3 and quick.clients == 2
    assert parse(repeats=5).kaas_repeats == 50
    with pytest.raises(SystemExit, match="unknown target"):
        parse(targets="cpu,abacus")


@pytest.mark.timeout(600)
def test_kaas_bench_paper_end_to_end(tmp_path):
    out, png = tmp_path / "paper.csv", tmp_path / "paper.png"
    proc = subprocess.run(
        [sys.executable, "-m", "kaas_magic.cli", "bench", "paper", "--quick", "--targets", "cpu,qpu",
         "--repeats", "2", "--kaas-repeats", "10", "--out", str(out), "--plot", str(png)],
        capture_output=True, text=True, timeout=540, cwd=tmp_path,
        env={**os.environ, "DASK_KAAS__CACHE__DIR": str(tmp_path / "cache")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "command: " in proc.stdout and "machine: " in proc.stdout and "qiskit-aer" in proc.stdout
    with open(out, newline="") as f:
        rows = {(r["experiment"], r["target"]): r for r in csv.DictReader(f)}
    assert set(rows) == {(e, t) for e in ("completion", "sharing") for t in ("cpu", "qpu")}
    for row in rows.values():
        float(row["reduction_pct"])  # a number, whatever its value on this machine
        assert int(row["kaas_n"]) >= 10 and int(row["naive_n"]) == 2
    assert rows[("completion", "qpu")]["kind"] == "SIMULATOR" and rows[("completion", "cpu")]["kind"] == "device"
    assert rows[("completion", "qpu")]["paper_reduction_pct"] == "34.9"
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("target", ["fpga", "tpu", "qpu", "cpu"])
def test_a_wrong_result_is_caught_so_a_broken_path_cannot_pass_as_fast(target):
    task = TASKS[target]
    if target == "qpu":
        right, wrong = {"00000": 130, "11111": 126}, {"00000": 130, "01111": 126}
    elif target == "tpu":
        x, w1, b1, w2, b2 = task.args
        right = np.maximum(x @ w1 + b1, 0) @ w2 + b2
        wrong = right + 0.1
    else:
        a, b = task.args
        right, wrong = a @ b, (a @ b).T
    assert task.check(right) and not task.check(wrong)
