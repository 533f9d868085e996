"""Qiskit: the ``qpu`` target. Aer's simulator by default (labelled as a simulator), or an
IBM Quantum backend when ``kaas.qpu.provider`` is ``ibm``.

``transpile(qc, backend)`` rebuilds its pass manager on every call; a session
builds one pass manager once and also caches transpiled circuits, in memory and on disk.

The cache key is a digest of the circuit's complete QPY serialisation (every instruction
with its parameters, custom gates with their full definitions, registers, layout, global
phase), so two circuits that differ only inside a custom gate never share an entry. The
names and metadata of the circuit and of the circuits it nests (gate definitions, control
flow blocks) are left out: they do not change what it transpiles to. Gate names stay in
(a target matches operations by name). On disk the key also names everything else the
transpiled circuit depends on: the backend and its target, the pass manager's settings,
and the versions of qiskit, its provider, numpy and Python. A circuit QPY cannot serialise
is transpiled afresh, never cached; a circuit handed to ``transpile`` gets a copy, so
changing it leaves the cache alone. See docs/caches.md.
"""

from __future__ import annotations

import copy
import hashlib
import io
import itertools
import pickle
import sys
import threading
import uuid
from typing import Any

import cachetools

from .. import config as kaas_config
from ..compile_cache import DiskCache
from ..targets import Service
from .base import Backend, Offer, Session

# Bump when what a key covers, or how an entry is stored, changes: older entries then miss.
KEY_FORMAT = "kaas-qiskit-transpiled-v2"


class _Prepared:
    """A fixed circuit (an OpenQASM kernel) with its cache key worked out once. The circuit
    is the session's own, never handed to user code, so it cannot change under its key."""

    __slots__ = ("circuit", "digest")

    def __init__(self, circuit, digest: bytes | None):
        self.circuit = circuit
        self.digest = digest


class QiskitSession(Session):
    _CACHE_SIZE = 256

    @property
    def physical_device(self) -> str:
        """Aer simulates on the host CPU; an IBM backend is a remote QPU of its own."""
        if self.offer.service.kind == "simulator":
            return "cpu"
        return f"qpu:{self.offer.detail.get('ibm_backend', self.offer.service.index)}"

    def warm_up(self) -> None:
        from qiskit import QuantumCircuit
        from qiskit.transpiler import generate_preset_pass_manager

        self.default_shots = int(kaas_config.get("qpu.default-shots", self.config))
        if self.offer.service.kind == "simulator":
            from qiskit_aer import AerSimulator

            self.backend = AerSimulator()
            self._sampler = None
        else:
            from qiskit_ibm_runtime import QiskitRuntimeService, SamplerV2

            self.backend = QiskitRuntimeService().backend(self.offer.detail["ibm_backend"])
            self._sampler = SamplerV2(mode=self.backend)
        optimization_level = int(kaas_config.get("qpu.optimization-level", self.config))
        seed = kaas_config.get("qpu.seed-transpiler", self.config)
        seed = None if seed is None else int(seed)
        self.pass_manager = generate_preset_pass_manager(
            optimization_level=optimization_level, backend=self.backend, seed_transpiler=seed
        )
        self._lock = threading.Lock()
        # Transpiled circuits survive a worker restart: on disk under a key naming the
        # circuit and everything else the transpiled form depends on (see _identity).
        self._disk = DiskCache(self.config, "qiskit")
        self._backend_identity = _identity(self.backend, optimization_level, seed)
        # LRU caches, read and written only under self._lock.
        self._transpiled: cachetools.LRUCache = cachetools.LRUCache(self._CACHE_SIZE)
        self._parsed: cachetools.LRUCache = cachetools.LRUCache(self._CACHE_SIZE)  # OpenQASM text -> _Prepared
        self.stats = {"transpile_hits": 0, "transpile_misses": 0, "transpile_uncached": 0}
        if self._sampler is None:  # never spend real QPU time on a warm-up
            bell = QuantumCircuit(2)
            bell.h(0)
            bell.cx(0, 1)
            bell.measure_all()
            self.run(bell, shots=16)

    def _as_circuit(self, circuit):
        from qiskit import QuantumCircuit

        if isinstance(circuit, QuantumCircuit):
            return circuit
        if isinstance(circuit, str):
            from qiskit import qasm2, qasm3

            text = circuit.lstrip()
            try:
                if text.startswith("OPENQASM 3"):
                    return qasm3.loads(circuit)
                return qasm2.loads(circuit, custom_instructions=qasm2.LEGACY_CUSTOM_INSTRUCTIONS)
            except Exception as e:
                raise ValueError(f"malformed OpenQASM program: {e}") from e
        raise TypeError(
            f"run() takes a qiskit QuantumCircuit or an OpenQASM string, not {type(circuit).__name__}"
        )

    def _prepare(self, circuit) -> _Prepared:
        """The circuit and its cache key. OpenQASM text is parsed once per distinct text: the
        parsed circuit is the session's own, so its key can be kept with it."""
        if isinstance(circuit, _Prepared):
            return circuit
        if isinstance(circuit, str):
            with self._lock:
                prepared = self._parsed.get(circuit)
                if prepared is not None:
                    return prepared
            parsed = self._as_circuit(circuit)
            prepared = _Prepared(parsed, circuit_digest(parsed))
            with self._lock:
                self._parsed[circuit] = prepared
            return prepared
        circuit = self._as_circuit(circuit)
        # Circuits are mutable: the key is worked out from the circuit as it is now, every
        # time (an id() or a key remembered from an earlier call could name a changed circuit).
        return _Prepared(circuit, circuit_digest(circuit))

    def transpile(self, circuit):
        """Transpile for this session's backend, reusing one pass manager and a cache.
        The caller gets a copy of its own: changing it leaves the cached one as it was."""
        prepared = self._prepare(circuit)
        transpiled = self._transpile(prepared)[0]
        mine = transpiled.copy(name=prepared.circuit.name)
        mine.metadata = copy.copy(prepared.circuit.metadata)
        return mine

    def _transpile(self, circuit) -> tuple[Any, str]:
        """(transpiled circuit, how it was had: "warm", "disk" or "compiled"). The circuit
        returned is the cached one: only for running, never for handing to user code."""
        prepared = self._prepare(circuit)
        circuit, key = prepared.circuit, prepared.digest
        limit = self.backend.num_qubits
        if limit is not None and circuit.num_qubits > limit:
            raise ValueError(
                f"circuit {circuit.name!r} has {circuit.num_qubits} qubits but {self.device} "
                f"supports at most {limit}"
            )
        if key is None:  # QPY cannot serialise it: no key is complete enough, so no cache
            transpiled = self.pass_manager.run(circuit)
            with self._lock:
                self.stats["transpile_uncached"] += 1
            return transpiled, "compiled"
        with self._lock:
            cached = self._transpiled.get(key)
            if cached is not None:
                self.stats["transpile_hits"] += 1
                return cached, "warm"
        disk_key = self._disk_key(key)
        transpiled, how = self._load_transpiled(disk_key), "disk"
        if transpiled is None:
            transpiled, how = self.pass_manager.run(circuit), "compiled"
            try:
                self._disk.store(disk_key, pickle.dumps(transpiled))
            except Exception:  # noqa: BLE001 - a circuit pickle cannot take stays in memory only
                pass
        with self._lock:
            self.stats["transpile_misses"] += 1
            self._transpiled[key] = transpiled
        return transpiled, how

    def _disk_key(self, digest: bytes) -> str:
        return DiskCache.key(KEY_FORMAT, self._backend_identity, digest.hex())

    def _load_transpiled(self, disk_key: str):
        from qiskit import QuantumCircuit

        data = self._disk.load(disk_key)
        if data is None:
            return None
        try:
            transpiled = pickle.loads(data)
        except Exception:  # noqa: BLE001 - unreadable (another qiskit wrote it): a miss
            return None
        return transpiled if isinstance(transpiled, QuantumCircuit) else None

    def run(self, circuit, shots: int | None = None) -> dict[str, int]:
        """Run a circuit (or OpenQASM text) and return its measurement counts."""
        shots = self.default_shots if shots is None else int(shots)
        if shots <= 0:
            raise ValueError(f"shots must be positive, got {shots}")
        prepared = self._prepare(circuit)
        transpiled = self._transpile(prepared)[0]
        if transpiled.num_clbits == 0:  # named as the caller named it, not as the cached one is
            raise ValueError(
                f"circuit {prepared.circuit.name!r} measures nothing: add measure_all() or measure()"
            )
        if self._sampler is not None:
            result = self._sampler.run([transpiled], shots=shots).result()
            return dict(result[0].join_data().get_counts())
        return dict(self.backend.run(transpiled, shots=shots).result().get_counts())

    def load_or_build(self, spec) -> tuple[Any, str]:
        """OpenQASM: the circuit, transpiled now (or loaded transpiled from the disk cache).
        Python: the circuit-building function; its circuits are transpiled per call."""
        if "OPENQASM" in spec.source and "def " not in spec.source:
            circuit = self._as_circuit(spec.source)
            prepared = _Prepared(circuit, circuit_digest(circuit))
            return prepared, self._transpile(prepared)[1]
        return self.build(spec), "compiled"

    def build(self, spec):
        from ..cellcode import padded
        from ..kernelspec import KernelError

        namespace: dict[str, Any] = {"__name__": f"kaas_kernel_{spec.name}"}
        exec(compile(padded(spec.source, spec.line_offset), f"<kernel {spec.name}>", "exec"), namespace)
        builder = namespace.get(spec.name)
        if not callable(builder):
            raise KernelError(f"Qiskit kernel source defines no function named {spec.name!r}")
        return builder

    def launch(self, spec, compiled, args: tuple, kwargs: dict):
        shots = kwargs.pop("shots", None)
        circuit = compiled(*args, **kwargs) if callable(compiled) else compiled
        if not callable(compiled) and (args or kwargs):
            from ..kernelspec import KernelArgumentError

            raise KernelArgumentError(f"kernel {spec.name!r} is a fixed circuit: it takes only shots=")
        return self.run(circuit, shots=shots)

    def namespace(self) -> dict[str, Any]:
        import numpy

        return {
            "xp": numpy,
            "device": self.device,
            "run": self.run,
            "backend": self.backend,
            "transpile": self.transpile,
        }


# --- cache keys ----------------------------------------------------------------------------

# Operations QPY writes without an entry in a circuit's table of custom operations. Qiskit's
# Rust QPY writer emits that table in hash-map order, which varies from run to run; a
# circuit made only of these has the same bytes every time, so the fast writer keys it.
_PLAIN_OPERATIONS: frozenset[str] | None = None


def _plain_operations() -> frozenset[str]:
    global _PLAIN_OPERATIONS
    if _PLAIN_OPERATIONS is None:
        from qiskit.circuit.library import get_standard_gate_name_mapping

        _PLAIN_OPERATIONS = frozenset(get_standard_gate_name_mapping()) | {
            "barrier", "measure", "reset", "delay", "unitary", "initialize", "state_preparation",
        }
    return _PLAIN_OPERATIONS


# Two things in the Python QPY writer vary between equal circuits: it names each custom
# operation after uuid.uuid4(), and it writes the name (and metadata) of every circuit it
# nests: a gate's definition, a control-flow block, each a new ``circuit-<n>`` when a library
# gate synthesises its definition afresh. During a keyed dump in this thread the UUIDs are
# numbered and nested circuits written nameless; every other caller (other threads, user
# code) gets the writer as Qiskit made it.
_keyed_dump = threading.local()


class _NumberedUuids:
    def __getattr__(self, name: str) -> Any:
        return getattr(uuid, name)

    @staticmethod
    def uuid4() -> uuid.UUID:
        counter = getattr(_keyed_dump, "counter", None)
        return uuid.uuid4() if counter is None else uuid.UUID(int=next(counter))


def _nameless(circuit):
    """A view of ``circuit`` without its name and metadata, which do not change what it
    transpiles to (a new ``QuantumCircuit()`` is named ``circuit-<n>``, n counting up)."""
    if getattr(circuit, "_is_built", True) is False:  # a BlueprintCircuit builds on first use:
        circuit.data  # build the original now, not a copy that shares its instruction list
    view = copy.copy(circuit)  # shares the instructions; only the name and metadata are new
    view.name = "kaas"
    view.metadata = {}
    return view


def _keyed_writer(write_circuit):
    def write(file_obj, circuit, *args, **kwargs):
        if getattr(_keyed_dump, "counter", None) is not None:
            circuit = _nameless(circuit)
        return write_circuit(file_obj, circuit, *args, **kwargs)

    write.kaas_keyed = True
    return write


_writer_keyed: bool | None = None
_writer_lock = threading.Lock()


def _key_python_qpy_writer() -> bool:
    """Make the Python QPY writer give equal circuits equal bytes (see above); False if
    this Qiskit's writer is not laid out as expected (then keys are only less stable)."""
    global _writer_keyed
    if _writer_keyed is not None:
        return _writer_keyed
    with _writer_lock:
        if _writer_keyed is not None:
            return _writer_keyed
        try:
            from qiskit.qpy.binary_io import circuits

            if getattr(circuits, "uuid", None) is uuid:
                circuits.uuid = _NumberedUuids()
            if callable(circuits.write_circuit) and not getattr(circuits.write_circuit, "kaas_keyed", False):
                circuits.write_circuit = _keyed_writer(circuits.write_circuit)
            _writer_keyed = isinstance(circuits.uuid, _NumberedUuids) and circuits.write_circuit.kaas_keyed
        except Exception:  # noqa: BLE001 - another layout: keep Qiskit's writer as it is
            _writer_keyed = False
    return _writer_keyed


# The last QPY version the Python writer produces (later versions are written in Rust).
_PYTHON_QPY_VERSION = 16


def qpy_bytes(circuit) -> bytes:
    """The circuit's complete QPY serialisation, the same bytes for equal circuits where
    Qiskit allows. Circuits of plain operations go through the fast (Rust) writer. Others
    nest circuits (gate definitions, control flow) and keep a table of custom operations,
    which the Rust writer emits in hash-map order, different from run to run: they go
    through the Python writer, with numbered UUIDs and nameless nested circuits (see
    _key_python_qpy_writer); what that writer's QPY version cannot express, through the
    Rust writer again (only a less stable key). Raises what ``qpy.dump`` raises for a
    circuit it cannot serialise."""
    from qiskit import qpy

    if not set(circuit.count_ops()) <= _plain_operations() and _key_python_qpy_writer():
        buffer = io.BytesIO()
        _keyed_dump.counter = itertools.count(1)
        try:
            qpy.dump(circuit, buffer, version=_PYTHON_QPY_VERSION)
            return buffer.getvalue()
        except Exception:  # noqa: BLE001 - a feature that version lacks: the default writer
            pass
        finally:
            _keyed_dump.counter = None
    buffer = io.BytesIO()
    qpy.dump(circuit, buffer)
    return buffer.getvalue()


def circuit_digest(circuit) -> bytes | None:
    """The transpile-cache key of ``circuit``: a BLAKE2b-256 digest of its QPY serialisation,
    with the names and metadata of the circuit and of the circuits it nests left out (they do
    not change what it transpiles to; gate names, which do, stay in). None when QPY cannot
    serialise it: then no key would be complete, and the circuit is transpiled uncached."""
    try:
        return hashlib.blake2b(qpy_bytes(_nameless(circuit)), digest_size=32).digest()
    except Exception:  # noqa: BLE001 - anything QPY cannot write is simply not cached
        return None


def _identity(backend, optimization_level: int, seed: int | None) -> str:
    """Everything besides the circuit that the transpiled circuit depends on: the backend,
    its target (basis, coupling map, gate properties), the pass manager's settings, and the
    versions of the software that transpiles and pickles."""
    import numpy
    import qiskit

    try:
        import qiskit_aer

        aer = qiskit_aer.__version__
    except ImportError:
        aer = None
    try:
        import qiskit_ibm_runtime

        runtime = qiskit_ibm_runtime.__version__
    except ImportError:
        runtime = None
    parts = [
        KEY_FORMAT, f"{type(backend).__module__}.{type(backend).__qualname__}", backend.name,
        getattr(backend, "num_qubits", None), f"optimization_level={optimization_level}", f"seed={seed}",
        f"qiskit={qiskit.__version__}", f"qiskit_aer={aer}", f"qiskit_ibm_runtime={runtime}",
        f"numpy={numpy.__version__}", f"python={sys.version_info[:3]}", _target_fingerprint(backend),
    ]
    return "\x1f".join(map(str, parts))


def _target_fingerprint(backend) -> str:
    """A digest of the backend's transpiler target: its operations, where each is allowed,
    and their properties (durations and errors steer layout at higher levels)."""
    target = getattr(backend, "target", None)
    digest = hashlib.blake2b(digest_size=32)

    def put(*parts: object) -> None:
        text = repr(parts).encode()
        digest.update(len(text).to_bytes(8, "little") + text)

    if target is None:
        put("no target", repr(getattr(backend, "configuration", lambda: None)()))
        return digest.hexdigest()
    put(target.num_qubits, target.dt, target.granularity, target.min_length, target.pulse_alignment,
        target.acquire_alignment, getattr(target, "concurrent_measurements", None))
    for name in sorted(target.operation_names):
        operation = target.operation_from_name(name)
        if isinstance(operation, type):  # a variadic operation (control flow): any width
            put(name, f"{operation.__module__}.{operation.__qualname__}")
        else:
            put(name, f"{type(operation).__module__}.{type(operation).__qualname__}",
                operation.num_qubits, operation.num_clbits, [repr(p) for p in operation.params])
        properties = target[name]
        for qargs in sorted(properties, key=repr):
            prop = properties[qargs]
            put(qargs, None if prop is None else (prop.duration, prop.error))
    return digest.hexdigest()


class QiskitBackend(Backend):
    name = "qiskit"
    session_class = QiskitSession
    languages = ("qiskit",)
    targets = {"qpu": ("device", "simulator")}
    default_for = ("qpu",)
    injected = ("xp", "device", "run", "backend", "transpile")

    def discover(self) -> list[Offer]:
        if kaas_config.get("qpu.provider", self.config) == "ibm":
            name = kaas_config.get("qpu.ibm-backend", self.config)
            if not name:
                raise ValueError("kaas.qpu.provider is 'ibm' but kaas.qpu.ibm-backend is not set")
            return [Offer(Service("qpu", "qiskit", "device"), f"IBM Quantum {name}", {"ibm_backend": name})]
        try:
            import qiskit  # noqa: F401
            import qiskit_aer
        except ImportError:
            return []
        return [
            Offer(
                Service("qpu", "qiskit", "simulator"),
                f"Aer simulator (qiskit-aer {qiskit_aer.__version__}, a simulator, not a QPU)",
            )
        ]


BACKEND = QiskitBackend
