"""The fault table: every class of issue 12 caused for real on a shared pool, each with the
outcome it must have and a time bound, each followed by a health probe from another
notebook's client (its normal call returns the right answer, with the process state a cell
starts from, and the pool has all its workers).

Classes B and C are the same table `kaas bench load --faults` injects while other clients
run (kaas_magic.bench.faults); classes A and D are here. Other members of each class are in
test_trust, test_isolation, test_faults, test_bind, test_cache_keys and test_security."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest

from kaas_magic.bench import faults as bench_faults
from kaas_magic.client import Pool
from kaas_magic.errors import KaasError

QUIET = {"stdout": io.StringIO()}
WORKERS = 2
_STATE = bench_faults.CLEAN_STATE_CELL


@pytest.fixture(scope="module")
def owner():
    pool = Pool.start(WORKERS)
    pool.wait_ready(timeout=240)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def bystander(owner):
    """Another notebook's client on the same pool."""
    pool = Pool.connect(owner.scheduler_address, security=owner.client.security)
    pool.wait_ready(timeout=240)
    baseline = pool.run(_STATE, "cpu", **QUIET).outputs["state"]
    yield pool, baseline
    pool.close()


def probe(bystander, bound_s: float = 240) -> None:
    """Within ``bound_s`` (a replaced worker warms up again), the pool has all its workers,
    and each answers right from a clean state."""
    pool, baseline = bystander
    deadline = time.monotonic() + bound_s
    while True:
        try:
            pool.refresh()
            routes = [r for r in pool.routes() if r.ready]
            assert len(routes) == WORKERS, routes
            for route in routes:
                x = np.arange(16.0)
                result = pool.run("y = x * 3\n" + _STATE, "cpu", inputs={"x": x}, worker=route.address,
                                  outputs=["y", "state"], timeout=30, **QUIET)
                np.testing.assert_array_equal(result.outputs["y"], x * 3)
                assert result.outputs["state"] == baseline, (route.address, result.outputs["state"], baseline)
            return
        except (AssertionError, KaasError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.parametrize("fault", bench_faults.faults(), ids=lambda f: f"{f.klass}: {f.name}")
def test_hangs_stalls_and_leaks_between_notebooks(owner, bystander, fault):
    started = time.monotonic()
    raised = None
    try:
        fault.cause(owner)
    except BaseException as e:  # noqa: BLE001 - the outcome is what is checked
        raised = e
    elapsed = time.monotonic() - started
    assert (type(raised).__name__ if raised else None) == fault.expected, repr(raised)
    assert elapsed <= fault.bound_s, f"{fault.name} took {elapsed:.1f} s (bound {fault.bound_s} s)"
    probe(bystander)


# --- A: never a wrong answer without an error ----------------------------------------------

ORACLE = """
from qiskit import QuantumCircuit
def oracle(marked):
    inner = QuantumCircuit(2, name="Oracle")
    for bit, value in enumerate(marked):
        if value == "0":
            inner.x(bit)
    inner.cz(0, 1)
    for bit, value in enumerate(marked):
        if value == "0":
            inner.x(bit)
    return inner.to_gate(label="Oracle")
qc = QuantumCircuit(2)
qc.h([0, 1])
qc.append(oracle(marked), [0, 1])
qc.h([0, 1]); qc.x([0, 1]); qc.cz(0, 1); qc.x([0, 1]); qc.h([0, 1])
qc.measure_all()
counts = run(qc, shots=200)
"""


def test_a1_circuits_differing_only_inside_same_named_gates_get_their_own_answers(owner, bystander):
    worker = sorted(r.address for r in owner.routes())[0]
    for marked in ("11", "01", "10", "01"):  # the second "01" is a cache hit: still its own answer
        counts = owner.run(ORACLE, "qpu", inputs={"marked": marked}, worker=worker, fallback=True,
                           timeout=60, **QUIET).outputs["counts"]
        assert counts == {marked[::-1]: 200}, (marked, counts)  # Grover on 2 qubits: exact
    probe(bystander)


@pytest.mark.parametrize("n", [1, 999, 1001, 10**6])
def test_a2_a_size_that_disagrees_with_the_buffers_is_refused(owner, bystander, n):
    from kaas_magic.kernelspec import KernelArgumentError

    a = np.ones(1000, np.float32)
    started = time.monotonic()
    with pytest.raises(KernelArgumentError, match=r"n=\S+ does not match a\.shape\[0\]=1000"):
        owner.call("vector_add", a, a, n=n, target="fpga", fallback=True)
    assert time.monotonic() - started < 5
    probe(bystander)


def test_a3_a_forked_child_never_answers_for_the_worker(owner, bystander):
    worker = sorted(r.address for r in owner.routes())[0]
    owner.run("import os\nos.fork()", "cpu", worker=worker, outputs=[], timeout=30, **QUIET)
    for i in range(20):
        assert owner.run(f"v = {i}", "cpu", worker=worker, timeout=30, **QUIET).outputs["v"] == i
    probe(bystander)


# --- D: limits and fidelity ----------------------------------------------------------------


def test_d11_an_exception_keeps_its_attributes(owner, bystander):
    with pytest.raises(SystemExit) as caught:
        owner.run("raise SystemExit(4)", "cpu", timeout=30, **QUIET)
    assert caught.value.code == 4
    probe(bystander)


def test_d12_a_cell_defines_a_dataclass(owner, bystander):
    code = "import dataclasses\n@dataclasses.dataclass\nclass P:\n    x: int = 1\np = P(5)"
    assert owner.run(code, "cpu", timeout=30, **QUIET).outputs["p"].x == 5
    probe(bystander)


def test_d14_a_kernel_missing_from_its_source_fails_at_registration_by_name(owner, bystander):
    from kaas_magic.kernelspec import KernelError

    source = "__kernel void double_it(__global float *x, int n) { int i = get_global_id(0); if (i < n) x[i] *= 2; }\n" \
             "void twice(void) {}"
    with pytest.raises(KernelError, match="twice"):
        owner.register(source, "opencl", signature="twice(x: inout float32[n], n: int32)", target="fpga",
                       fallback=True)
    a = np.ones(8, np.float32)
    np.testing.assert_array_equal(owner.call("vector_add", a, a, target="fpga", fallback=True), a + a)
    probe(bystander)
