"""Caches key on everything that can change their result (issue 12, A1).

Real Qiskit Aer sessions, built without a cluster, on a cache folder of their own. The
transpile cache is exercised through the path a call takes (``run`` / ``_transpile`` /
``call_kernel``), with the cache first filled by another circuit: two circuits that differ
only inside custom gates of the same name, in a unitary's matrix, in the amplitudes of a
state preparation, or in parameter values baked into a gate's definition must each get their
own transpiled circuit, in memory and on disk, across a "restart" (a fresh backend object).
"""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("qiskit_aer")

from qiskit import QuantumCircuit  # noqa: E402
from qiskit.circuit import ClassicalRegister, Instruction, Parameter  # noqa: E402
from qiskit.circuit.library import Initialize, StatePreparation, UnitaryGate  # noqa: E402
from qiskit.circuit.random import random_circuit  # noqa: E402
from qiskit.quantum_info import Statevector, random_statevector, random_unitary  # noqa: E402

from kaas_magic import config  # noqa: E402
from kaas_magic.backends import load  # noqa: E402
from kaas_magic.backends.base import compiled_key  # noqa: E402
from kaas_magic.backends.qiskit_backend import circuit_digest  # noqa: E402
from kaas_magic.compile_cache import DiskCache  # noqa: E402
from kaas_magic.kernelspec import spec_from_source  # noqa: E402

# PauliEvolutionGate's synthesis inside Qiskit, not this code.
pytestmark = pytest.mark.filterwarnings("ignore:(splu converted|spsolve is more efficient)")

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SHOTS = 64


def _settings(folder, **qpu) -> dict:
    snapshot = config.snapshot()
    return {**snapshot, "cache": {"dir": str(folder)}, "qpu": {**snapshot.get("qpu", {}), **qpu}}


def open_session(folder, **qpu):
    """A warm Aer session on ``folder``; a new backend object each time, so nothing is
    shared in memory with an earlier one (what a restarted worker sees)."""
    backend = load("qiskit")(_settings(folder, **qpu))
    return backend.open(backend.discover()[0])


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    return open_session(tmp_path_factory.mktemp("qiskit-cache"))


def state(circuit) -> Statevector:
    return Statevector(circuit.remove_final_measurements(inplace=False))


def assert_transpiles_to(session, circuit, how=None):
    """The cached path gives a circuit equivalent to ``circuit`` and to a fresh transpile."""
    transpiled, had = session._transpile(circuit)
    assert transpiled.layout is None  # Aer: no routing, qubits stay where they were
    want = state(circuit)
    assert state(transpiled).equiv(want), f"the cache ({had}) returned another circuit's transpilation"
    assert state(session.pass_manager.run(circuit)).equiv(want)
    if how is not None:
        assert had == how
    return had


def oracle(body: QuantumCircuit, name: str = "Oracle"):
    """``body`` as a custom gate named ``name`` (every oracle shares the name)."""
    body = body.copy()
    body.name = name
    return body.to_gate()


def wrapped(gate, num_qubits: int, measure: bool = True) -> QuantumCircuit:
    qc = QuantumCircuit(num_qubits)
    qc.h(0)
    qc.append(gate, range(gate.num_qubits))
    if measure:
        qc.measure_all()
    return qc


def marks(qubit: int, num_qubits: int = 2) -> QuantumCircuit:
    """An oracle body flipping one qubit: the outcome names which oracle ran."""
    body = QuantumCircuit(num_qubits)
    body.x(qubit)
    return body


# --- the reported bug: custom gates of the same name -------------------------------------


def test_two_oracles_with_one_name_each_get_their_own_counts(session):
    first, second = QuantumCircuit(2), QuantumCircuit(2)
    first.append(oracle(marks(0)), [0, 1])
    second.append(oracle(marks(1)), [0, 1])
    for qc in (first, second):
        qc.measure_all()
    assert session.run(first, shots=SHOTS) == {"01": SHOTS}
    assert session.run(second, shots=SHOTS) == {"10": SHOTS}
    assert session.run(first, shots=SHOTS) == {"01": SHOTS}


@SETTINGS
@given(num_qubits=st.integers(1, 4), depth=st.integers(1, 5), seeds=st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)))
def test_random_oracles_sharing_a_name_transpile_as_themselves(session, num_qubits, depth, seeds):
    first, second = (wrapped(oracle(random_circuit(num_qubits, depth, seed=s)), num_qubits) for s in seeds)
    assert_transpiles_to(session, first)
    assert_transpiles_to(session, second)


@SETTINGS
@given(seeds=st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)), qubits=st.integers(1, 3))
def test_unitary_gates_with_different_matrices(session, seeds, qubits):
    first, second = (wrapped(UnitaryGate(random_unitary(2**qubits, seed=s)), qubits) for s in seeds)
    assert_transpiles_to(session, first)
    assert_transpiles_to(session, second)
    # inside a custom gate of a shared name too
    first, second = (wrapped(oracle(wrapped(UnitaryGate(random_unitary(2**qubits, seed=s)), qubits, measure=False)),
                             qubits) for s in seeds)
    assert_transpiles_to(session, first)
    assert_transpiles_to(session, second)


@SETTINGS
@given(seeds=st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)), kind=st.sampled_from([Initialize, StatePreparation]))
def test_state_preparations_with_different_amplitudes(session, seeds, kind):
    for s in seeds:
        qc = QuantumCircuit(2)
        qc.append(kind(random_statevector(4, seed=s).data), [0, 1])
        qc.measure_all()
        assert_transpiles_to(session, qc)


@pytest.mark.parametrize("kind", [Initialize, StatePreparation])
def test_state_preparation_counts_follow_the_amplitudes(session, kind):
    for index, outcome in ((1, "01"), (2, "10"), (3, "11")):
        qc = QuantumCircuit(2)
        qc.append(kind(np.eye(4)[index]), [0, 1])
        qc.measure_all()
        assert session.run(qc, shots=SHOTS) == {outcome: SHOTS}


@SETTINGS
@given(angles=st.tuples(st.floats(-np.pi, np.pi), st.floats(-np.pi, np.pi)))
def test_parameter_values_inside_a_custom_gate_definition(session, angles):
    for angle in angles:  # baked into the definition: the gate itself has no parameters
        body = QuantumCircuit(1)
        body.rx(angle, 0)
        qc = wrapped(oracle(body), 1)
        assert not qc.data[1].operation.params
        assert_transpiles_to(session, qc)
    theta = Parameter("theta")
    body = QuantumCircuit(1)
    body.ry(theta, 0)
    template = wrapped(oracle(body), 1)
    for angle in angles:  # bound from outside
        assert_transpiles_to(session, template.assign_parameters({theta: angle}))


def test_qasm_programs_defining_a_gate_differently(session):
    program = """OPENQASM 2.0;
include "qelib1.inc";
gate oracle a, b {{ x {}; }}
qreg q[2]; creg c[2];
oracle q[0], q[1];
measure q -> c;
"""
    assert session.run(program.format("a"), shots=SHOTS) == {"01": SHOTS}
    assert session.run(program.format("b"), shots=SHOTS) == {"10": SHOTS}
    assert session.run(program.format("a"), shots=SHOTS) == {"01": SHOTS}
    # as registered kernels of one name: each source is its own kernel
    for body, outcome in (("a", "01"), ("b", "10")):
        spec = spec_from_source(program.format(body), "qiskit", name="marked")
        assert session.call_kernel(spec, (), {"shots": SHOTS})[0] == {outcome: SHOTS}


def test_classical_registers_shape_the_counts(session):
    """One 2-bit register or two 1-bit ones: the same gates, differently reported counts."""
    one = QuantumCircuit(2, 2)
    two = QuantumCircuit(2)
    two.add_register(ClassicalRegister(1, "a"))
    two.add_register(ClassicalRegister(1, "b"))
    for qc in (one, two):
        qc.x(0)
        qc.measure([0, 1], [0, 1])
    assert session.run(one, shots=SHOTS) == {"01": SHOTS}
    assert session.run(two, shots=SHOTS) == {"0 1": SHOTS}


# --- random circuits, and what must (not) change a key -------------------------------------


@SETTINGS
@given(num_qubits=st.integers(1, 5), depth=st.integers(1, 6), seeds=st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)))
def test_random_circuits_through_a_shared_cache(session, num_qubits, depth, seeds):
    first, second = (random_circuit(num_qubits, depth, seed=s, measure=True) for s in seeds)
    assert_transpiles_to(session, first)
    assert_transpiles_to(session, second)
    # the same circuit built again (a new object, a new auto-generated name) is a hit
    assert_transpiles_to(session, random_circuit(num_qubits, depth, seed=seeds[1], measure=True), how="warm")


def test_same_circuit_with_custom_gates_built_twice_is_one_entry(session):
    def grover() -> QuantumCircuit:
        mark = QuantumCircuit(3, name="Oracle")
        mark.ccz(0, 1, 2)
        diffuse = QuantumCircuit(3, name="Diffuser")
        diffuse.h(range(3))
        diffuse.x(range(3))
        diffuse.ccz(0, 1, 2)
        diffuse.x(range(3))
        diffuse.h(range(3))
        qc = QuantumCircuit(3, name="grover", metadata={"try": object()})  # not JSON: ignored
        qc.h(range(3))
        qc.append(mark.to_gate(), range(3))
        qc.append(diffuse.to_gate(), range(3))
        qc.measure_all()
        return qc

    assert circuit_digest(grover()) is not None
    assert circuit_digest(grover()) == circuit_digest(grover())
    assert_transpiles_to(session, grover())
    assert_transpiles_to(session, grover(), how="warm")
    assert session.transpile(grover()).name == "grover"  # its own name, not the cached one's


def _stable_kinds():
    from qiskit.circuit.library import MCMTGate, PauliEvolutionGate, QFTGate, XGate
    from qiskit.quantum_info import SparsePauliOp

    def named(qc):
        body = QuantumCircuit(2, name="Oracle")
        body.cz(0, 1)
        return body.to_gate()

    def if_else(qc):
        block = QuantumCircuit(3, 1)
        block.append(named(qc), [0, 1])
        qc.if_test((qc.clbits[0], 1), block, range(3), [0])

    return {
        "qft": lambda qc: qc.append(QFTGate(3), range(3)),
        "inverse qft": lambda qc: qc.append(QFTGate(3).inverse(), range(3)),
        "controlled custom": lambda qc: qc.append(named(qc).control(1), [2, 0, 1]),
        "pauli evolution": lambda qc: qc.append(PauliEvolutionGate(SparsePauliOp("XZ"), 0.3), [0, 1]),
        "mcmt": lambda qc: qc.append(MCMTGate(XGate(), 1, 2), range(3)),
        "if_else with a custom gate": if_else,
    }


@pytest.mark.parametrize("kind", list(_stable_kinds()))
def test_equal_circuits_built_apart_share_a_key(session, kind):
    """Library gates synthesise their definitions afresh (each a new ``circuit-<n>``), and
    QPY names custom operations after UUIDs: neither may make equal circuits miss."""
    def build():
        qc = QuantumCircuit(3, 1)
        qc.h(0)
        _stable_kinds()[kind](qc)
        qc.measure(0, 0)
        return qc

    assert circuit_digest(build()) is not None
    assert circuit_digest(build()) == circuit_digest(build())
    if kind.startswith("if_else"):  # no statevector of control flow: just the key
        session._transpile(build())
    else:
        assert_transpiles_to(session, build())
    assert session._transpile(build())[1] == "warm"


def test_a_circuit_changed_in_place_is_transpiled_again(session):
    qc = QuantumCircuit(2)
    qc.h(0)
    qc.measure_all()
    assert_transpiles_to(session, qc)
    qc.remove_final_measurements()
    qc.x(1)
    qc.measure_all()
    assert assert_transpiles_to(session, qc) != "warm"
    assert session.run(qc, shots=SHOTS).keys() <= {"10", "11"}


def test_changing_a_transpiled_circuit_leaves_the_cache_alone(session):
    qc = QuantumCircuit(2)
    qc.x(0)
    qc.measure_all()
    mine = session.transpile(qc)
    mine.remove_final_measurements()  # e.g. to take its statevector: the caller's copy only
    assert Statevector(mine).equiv(Statevector.from_label("01"))
    assert session.run(qc, shots=SHOTS) == {"01": SHOTS}
    assert session._transpile(qc)[1] == "warm"


def test_a_circuit_qpy_cannot_write_is_transpiled_without_the_cache(session):
    weird = Instruction("weird", 1, 0, params=[object()])
    definition = QuantumCircuit(1)
    definition.x(0)
    weird.definition = definition
    qc = QuantumCircuit(1)
    qc.append(weird, [0])
    qc.measure_all()
    assert circuit_digest(qc) is None
    before = session.stats["transpile_uncached"]
    assert session.run(qc, shots=SHOTS) == {"1": SHOTS}
    assert session.run(qc, shots=SHOTS) == {"1": SHOTS}
    assert session.stats["transpile_uncached"] == before + 2


# --- on disk: across restarts -----------------------------------------------------------


def _pair():
    first, second = QuantumCircuit(2), QuantumCircuit(2)
    first.append(oracle(marks(0)), [0, 1])
    second.append(oracle(marks(1)), [0, 1])
    for qc in (first, second):
        qc.measure_all()
    return first, second


def test_disk_cache_never_returns_another_circuit_after_a_restart(tmp_path):
    first, second = _pair()
    one = open_session(tmp_path)
    assert one._transpile(first)[1] == "compiled"
    assert one.run(first, shots=SHOTS) == {"01": SHOTS}

    two = open_session(tmp_path)  # a restart: nothing in memory, the same folder
    assert two._transpile(second)[1] == "compiled"
    assert two.run(second, shots=SHOTS) == {"10": SHOTS}

    three = open_session(tmp_path)
    for qc, outcome in ((first, "01"), (second, "10")):
        transpiled, how = three._transpile(qc)
        assert how == "disk"
        assert state(transpiled).equiv(state(qc))
        assert three.run(qc, shots=SHOTS) == {outcome: SHOTS}


@pytest.fixture(scope="module")
def writer_and_reader(tmp_path_factory):
    """Two sessions on one folder, as two workers (or a worker and its restart) would be."""
    folder = tmp_path_factory.mktemp("shared")
    return open_session(folder), open_session(folder)


@SETTINGS
@given(seeds=st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)))
def test_disk_entries_of_random_oracles_stay_their_own(writer_and_reader, seeds):
    writer, reader = writer_and_reader
    circuits = [wrapped(oracle(random_circuit(3, 3, seed=s)), 3) for s in seeds]
    for qc in circuits:
        writer._transpile(qc)
    reader._transpiled.clear()  # what a restart forgets
    for qc in reversed(circuits):
        transpiled, how = reader._transpile(qc)
        assert how in ("disk", "warm")
        assert state(transpiled).equiv(state(qc))


def test_unreadable_or_foreign_disk_entries_are_misses(tmp_path):
    first, second = _pair()
    one = open_session(tmp_path)
    one._transpile(first)
    entry = one._disk.path(one._disk_key(circuit_digest(first)))
    assert entry.is_file()

    good = entry.read_bytes()
    entry.write_bytes(good[:-7])  # cut short
    assert open_session(tmp_path)._transpile(first)[1] == "compiled"
    entry.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # damaged
    assert open_session(tmp_path)._transpile(first)[1] == "compiled"
    entry.write_bytes(pickle.dumps(one.pass_manager.run(second)))  # the old layout: a bare pickle
    transpiled, how = open_session(tmp_path)._transpile(first)
    assert how == "compiled" and state(transpiled).equiv(state(first))

    # another key's (valid) file under this key's name
    reader = open_session(tmp_path)
    other_key = reader._disk_key(circuit_digest(second))
    reader._disk.store(other_key, pickle.dumps(one.pass_manager.run(second)))
    entry.write_bytes(reader._disk.path(other_key).read_bytes())
    transpiled, how = reader._transpile(first)
    assert how == "compiled" and state(transpiled).equiv(state(first))


def test_pass_manager_settings_are_part_of_the_disk_key(tmp_path):
    qc = random_circuit(3, 4, seed=11, measure=True)
    assert open_session(tmp_path)._transpile(qc)[1] == "compiled"
    assert open_session(tmp_path)._transpile(qc)[1] == "disk"
    assert open_session(tmp_path, **{"optimization-level": 0})._transpile(qc)[1] == "compiled"
    assert open_session(tmp_path, **{"seed-transpiler": 5})._transpile(qc)[1] == "compiled"


# --- the other caches this change touched ------------------------------------------------


def test_disk_cache_keys_and_files():
    assert DiskCache.key("a\x1fb") != DiskCache.key("a", "b")
    assert DiskCache.key("ab", "c") != DiskCache.key("a", "bc")
    assert DiskCache.key(b"x") != DiskCache.key("x")
    assert DiskCache.key("a", ("b",)) == DiskCache.key("a", ("b",))


def test_disk_cache_rejects_files_it_did_not_write_for_the_key(tmp_path):
    cache = DiskCache({"cache": {"dir": str(tmp_path)}}, "t")
    k1, k2 = DiskCache.key(1), DiskCache.key(2)
    cache.store(k1, b"one")
    assert cache.load(k1) == b"one" and cache.load(k2) is None
    cache.path(k2).write_bytes(cache.path(k1).read_bytes())  # a file under another's name
    assert cache.load(k2) is None
    cache.path(k1).write_bytes(b"one")  # no header: an older format
    assert cache.load(k1) is None
    assert not [p for p in (tmp_path / "t").iterdir() if p.name.startswith(".tmp-")]


def test_compiled_kernel_key_covers_what_the_compiled_form_depends_on():
    source = "__kernel void k(__global float *a, const float s) { a[get_global_id(0)] *= s; }"
    base = spec_from_source(source, "opencl", signature="k(a: inout float32[n], s: float32)")
    same = spec_from_source(source, "opencl", signature="k(a: inout float32[n], s: float32)")
    assert compiled_key(base) == compiled_key(same)
    for changed in (
        dataclasses.replace(base, source=source + " "),
        dataclasses.replace(base, options=("-DA=1", "-DB=2")),
        dataclasses.replace(base, params=spec_from_source(source, "opencl", signature="k(a: inout float32[n], s: int32)").params),
        dataclasses.replace(base, line_offset=3),
    ):
        assert compiled_key(changed) != compiled_key(base)
    split = dataclasses.replace(base, options=("-DA=1", "-DB=2"))
    joined = dataclasses.replace(base, options=("-DA=1 -DB=2",))
    assert split.digest != joined.digest  # the digest is now a full SHA-256 of a tuple
    assert compiled_key(split) != compiled_key(joined)


def test_cell_analysis_cache_ignores_the_filename_but_errors_name_it():
    from kaas_magic.cellcode import analyse

    source = "y_cache_keys = x_cache_keys + 1\n"
    analyse(source, "<kaas In[1]>", 1)
    hits = analyse.cache_info().hits
    assert analyse(source, "<kaas In[2]>", 1).reads == {"x_cache_keys"}
    assert analyse.cache_info().hits == hits + 1
    for name in ("<kaas In[3]>", "<kaas In[4]>"):
        with pytest.raises(SyntaxError) as err:
            analyse("a = (\n", name, 1)
        assert err.value.filename == name and err.value.lineno == 2


def test_qasm_text_parse_cache_keys_on_the_whole_text(session):
    text = 'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[1]; creg c[1];\n{}measure q -> c;\n'
    assert session.run(text.format(""), shots=SHOTS) == {"0": SHOTS}
    assert session.run(text.format("x q[0];\n"), shots=SHOTS) == {"1": SHOTS}
    assert session.run(text.format(""), shots=SHOTS) == {"0": SHOTS}


# --- OpenCL and CuPy compiled forms: kernel objects, binaries on disk, markers, digest -----

SCALE_CL = ("__kernel void scale(__global const float *a, __global float *out) "
            "{ int i = get_global_id(0); out[i] = %s * a[i]; }")
SCALE_SIG = "scale(a: float32[n], out: out float32[n])"


def open_opencl(folder):
    """A warm PoCL session on ``folder``, built without a cluster (a fresh backend object)."""
    backend = load("opencl")({**config.snapshot(), "cache": {"dir": str(folder)}})
    offers = [o for o in backend.discover() if o.service.target == "cpu"]
    if not offers:
        pytest.skip("no OpenCL CPU device (PoCL)")
    return backend.open(offers[0])


@pytest.fixture
def opencl_session(tmp_path):
    return open_opencl(tmp_path)


def _scaled(session, spec, program, a):
    return session.to_host(session.launch(spec, program, (a,), {}))


def test_opencl_kernel_objects_are_kept_only_for_their_own_program(opencl_session, monkeypatch):
    """A program's id can be another program's once the first is gone (a build whose
    store_cached raised): every program here is given the same id, as a reused one would
    be, and each must still get a kernel object made from itself."""
    import pyopencl as cl

    from kaas_magic.backends import opencl_backend

    monkeypatch.setattr(opencl_backend, "id", lambda obj: 1, raising=False)
    session = opencl_session
    twice = spec_from_source(SCALE_CL % "2.0f", "opencl", signature=SCALE_SIG)
    first, second = session.build(twice), session.build(twice)  # the same spec, two programs
    k1, k2 = session._kernel_object(twice, first), session._kernel_object(twice, second)
    assert k1 is not k2
    assert k2.get_info(cl.kernel_info.PROGRAM).int_ptr == second.int_ptr
    assert session._kernel_object(twice, second) is k2  # and then kept

    # Another source under the same kernel name, in a program with the "same" id.
    thrice = spec_from_source(SCALE_CL % "3.0f", "opencl", signature=SCALE_SIG)
    third = session.build(thrice)
    a = np.arange(16, dtype=np.float32)
    np.testing.assert_array_equal(_scaled(session, thrice, third, a), 3 * a)
    np.testing.assert_array_equal(_scaled(session, twice, second, a), 2 * a)


def test_opencl_kernel_object_after_a_failed_store_is_made_again(opencl_session, monkeypatch):
    """The path the audit named: load_or_build raises in store_cached after the kernel
    object was made; the program is dropped, and the next program (the same id here) gets
    a kernel object of its own."""
    import pyopencl as cl

    from kaas_magic.backends import opencl_backend

    monkeypatch.setattr(opencl_backend, "id", lambda obj: 1, raising=False)
    session = opencl_session
    spec = spec_from_source(SCALE_CL % "2.0f", "opencl", signature=SCALE_SIG)

    def broken(spec, program):
        raise cl.LogicError("clGetProgramInfo failed: OUT_OF_HOST_MEMORY")

    monkeypatch.setattr(session, "store_cached", broken)
    with pytest.raises(cl.LogicError):
        session.kernel(spec)
    monkeypatch.undo()
    monkeypatch.setattr(opencl_backend, "id", lambda obj: 1, raising=False)
    program, how = session.kernel(spec)
    assert how == "compiled"
    kernel = session._kernel_object(spec, program)
    assert kernel.get_info(cl.kernel_info.PROGRAM).int_ptr == program.int_ptr
    a = np.arange(8, dtype=np.float32)
    np.testing.assert_array_equal(_scaled(session, spec, program, a), 2 * a)


def test_opencl_kernel_objects_key_on_the_signature(opencl_session):
    """The same program and name under two signatures (scalar dtypes) are two objects."""
    source = "__kernel void k(__global float *a, const int s) { a[get_global_id(0)] += s; }"
    as_int = spec_from_source(source, "opencl", signature="k(a: inout float32[n], s: int32)")
    program = opencl_session.build(as_int)
    as_float = dataclasses.replace(as_int, params=spec_from_source(
        source, "opencl", signature="k(a: inout float32[n], s: float32)").params)
    assert opencl_session._kernel_object(as_int, program) is not opencl_session._kernel_object(as_float, program)


def _fake_cl_device(**changed):
    from types import SimpleNamespace

    platform = {"vendor": "The pocl project", "name": "Portable Computing Language",
                "version": "OpenCL 3.0 PoCL 3.0-rc2  Linux, Release, RELOC, LLVM 14.0.6, SLEEF, DISTRO"}
    device = {"vendor": "AuthenticAMD", "name": "pthread-AMD EPYC", "driver_version": "3.0-rc2",
              "version": "OpenCL 3.0 PoCL HSTR: pthread-x86_64-unknown-linux-gnu-znver3"}
    for field_name, value in changed.items():
        where, _, attr = field_name.partition("_")
        (platform if where == "platform" else device)[attr] = value
    return SimpleNamespace(platform=SimpleNamespace(**platform), **device)


def test_opencl_binary_key_holds_the_compiler_and_target_cpu():
    pytest.importorskip("pyopencl")
    from kaas_magic.backends.opencl_backend import binary_key

    spec = spec_from_source(SCALE_CL % "2.0f", "opencl", signature=SCALE_SIG)
    base = binary_key(_fake_cl_device(), spec)
    assert base == binary_key(_fake_cl_device(), spec)
    for change in (
        {"device_version": "OpenCL 3.0 PoCL HSTR: pthread-x86_64-unknown-linux-gnu-znver2"},  # another EPYC
        {"platform_version": "OpenCL 3.0 PoCL 5.0  Linux, Release, RELOC, LLVM 17.0.6, SLEEF, DISTRO"},
        {"device_driver_version": "5.0"},
        {"device_name": "pthread-Intel Xeon"},
        {"device_vendor": "GenuineIntel"},
        {"platform_vendor": "Intel(R) Corporation"},
        {"platform_name": "Intel(R) OpenCL"},
    ):
        assert binary_key(_fake_cl_device(**change), spec) != base, change
    device = _fake_cl_device()
    for other in (
        dataclasses.replace(spec, source=spec.source + " "),
        dataclasses.replace(spec, options=("-DA=1",)),
        dataclasses.replace(spec, name="scale2"),
    ):
        assert binary_key(device, other) != base
    split = binary_key(device, dataclasses.replace(spec, options=("-DA=1", "-DB=2")))
    joined = binary_key(device, dataclasses.replace(spec, options=("-DA=1 -DB=2",)))
    assert split != joined
    # The signature is not part of what the binary is built from: no needless miss.
    retyped = dataclasses.replace(spec, params=spec_from_source(
        SCALE_CL % "2.0f", "opencl", signature="scale(a: float32[m], out: out float32[m])").params)
    assert binary_key(device, retyped) == base


def test_opencl_binary_on_disk_is_keyed_on_the_real_device(tmp_path):
    spec = spec_from_source(SCALE_CL % "2.0f", "opencl", signature=SCALE_SIG)
    writer = open_opencl(tmp_path)
    from kaas_magic.backends.opencl_backend import binary_key

    device = writer.context.devices[0]
    assert writer._binary_key(spec) == binary_key(device, spec)
    assert writer.kernel(spec)[1] == "compiled"
    reader = open_opencl(tmp_path)  # a restart
    program, how = reader.kernel(spec)
    assert how == "disk"
    a = np.arange(8, dtype=np.float32)
    np.testing.assert_array_equal(_scaled(reader, spec, program, a), 2 * a)


def test_spec_digest_is_a_full_hash_of_everything_the_compiled_form_depends_on():
    source = "__kernel void k(__global float *a, const float s) { a[get_global_id(0)] *= s; }"
    base = spec_from_source(source, "opencl", signature="k(a: inout float32[n], s: float32)")
    assert len(base.digest) == 64 and int(base.digest, 16) >= 0
    assert base.digest == compiled_key(base)
    assert base.digest == spec_from_source(source, "opencl", signature="k(a: inout float32[n], s: float32)").digest
    changed = [
        dataclasses.replace(base, source=source + " "),
        dataclasses.replace(base, name="k2"),
        dataclasses.replace(base, language="cuda"),
        dataclasses.replace(base, options=("-DA=1", "-DB=2")),
        dataclasses.replace(base, options=("-DA=1 -DB=2",)),
        dataclasses.replace(base, params=spec_from_source(source, "opencl", signature="k(a: inout float32[n], s: int32)").params),
        dataclasses.replace(base, line_offset=3),
    ]
    digests = {c.digest for c in changed}
    assert len(digests) == len(changed) and base.digest not in digests
    for c in changed:
        assert c.digest == compiled_key(c)
    # Ambiguous joins: a NUL in the source no longer moves text between fields.
    assert (dataclasses.replace(base, name="a", source="b\0c").digest
            != dataclasses.replace(base, name="a\0b", source="c").digest)


def _fake_cupy_for_marker(monkeypatch, **versions):
    import sys
    import types

    facts = {"cc": "80", "runtime": 12040, "driver": 12040, "nvrtc": (12, 4), "version": "13.3.0", **versions}

    class Device:
        def __init__(self, index):
            self.compute_capability = facts["cc"]

    cupy = types.ModuleType("cupy")
    cupy.__version__ = facts["version"]
    cupy.cuda = types.SimpleNamespace(
        Device=Device,
        runtime=types.SimpleNamespace(runtimeGetVersion=lambda: facts["runtime"],
                                      driverGetVersion=lambda: facts["driver"]),
        nvrtc=types.SimpleNamespace(getVersion=lambda: facts["nvrtc"]),
    )
    monkeypatch.setitem(sys.modules, "cupy", cupy)


def test_cupy_marker_key_holds_the_arch_and_compiler_versions(monkeypatch):
    from kaas_magic.backends.base import Offer
    from kaas_magic.backends.cupy_backend import CupySession
    from kaas_magic.targets import Service

    session = CupySession(Offer(Service("gpu", "cupy", "device", 0), "fake GPU"), {})
    source = 'extern "C" __global__ void k(float *a) { a[threadIdx.x] *= 2.0f; }'
    spec = spec_from_source(source, "cuda", signature="k(a: inout float32[n])")
    _fake_cupy_for_marker(monkeypatch)
    base = session._marker_key(spec)
    assert base == session._marker_key(spec)
    for change in ({"cc": "90"}, {"runtime": 12060}, {"driver": 12080}, {"nvrtc": (12, 6)}, {"version": "14.0.0"}):
        _fake_cupy_for_marker(monkeypatch, **change)
        assert session._marker_key(spec) != base, change
    _fake_cupy_for_marker(monkeypatch)
    split = session._marker_key(dataclasses.replace(spec, options=("-DA=1", "-DB=2")))
    joined = session._marker_key(dataclasses.replace(spec, options=("-DA=1 -DB=2",)))
    assert len({base, split, joined, session._marker_key(dataclasses.replace(spec, source=source + " "))}) == 4
