"""Qiskit: the ``qpu`` target. Aer's simulator by default (labelled as a simulator), or an
IBM Quantum backend when ``kaas.qpu.provider`` is ``ibm``.

``transpile(qc, backend)`` rebuilds its pass manager on every call (~0.2 s); a session
builds one pass manager once and also caches transpiled circuits by their structure.
"""

from __future__ import annotations

import collections
import pickle
import threading
from typing import Any

from ..compile_cache import DiskCache
from ..targets import Service
from .base import Backend, Offer, Session


class QiskitSession(Session):
    injected = ("xp", "device", "run", "backend", "transpile")

    _CACHE_SIZE = 256

    def warm_up(self) -> None:
        from qiskit import QuantumCircuit
        from qiskit.transpiler import generate_preset_pass_manager

        qpu = self.config.get("qpu", {})
        self.default_shots = int(qpu.get("default-shots", 1024))
        if self.offer.service.kind == "simulator":
            from qiskit_aer import AerSimulator

            self.backend = AerSimulator()
            self._sampler = None
        else:
            from qiskit_ibm_runtime import QiskitRuntimeService, SamplerV2

            self.backend = QiskitRuntimeService().backend(self.offer.detail["ibm_backend"])
            self._sampler = SamplerV2(mode=self.backend)
        self.pass_manager = generate_preset_pass_manager(
            optimization_level=int(qpu.get("optimization-level", 1)), backend=self.backend
        )
        self._lock = threading.Lock()
        # Transpiled circuits survive a worker restart: pickled, keyed by the backend, the
        # pass manager's settings and qiskit's version.
        import qiskit

        self._disk = DiskCache(self.config, "qiskit")
        self._backend_identity = (self.backend.name, qpu.get("optimization-level", 1), qiskit.__version__)
        self._transpiled: collections.OrderedDict = collections.OrderedDict()
        self.stats = {"transpile_hits": 0, "transpile_misses": 0}
        if self._sampler is None:  # never spend real QPU time on a warm-up
            bell = QuantumCircuit(2)
            bell.h(0)
            bell.cx(0, 1)
            bell.measure_all()
            self.run(bell, shots=16)

    @staticmethod
    def _fingerprint(circuit) -> tuple:
        return (
            circuit.num_qubits,
            circuit.num_clbits,
            tuple(
                (
                    inst.operation.name,
                    tuple(circuit.find_bit(q).index for q in inst.qubits),
                    tuple(circuit.find_bit(c).index for c in inst.clbits),
                    tuple(float(p) if _is_number(p) else str(p) for p in inst.operation.params),
                )
                for inst in circuit.data
            ),
        )

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

    def transpile(self, circuit):
        """Transpile for this session's backend, reusing one pass manager and a cache."""
        return self._transpile(circuit)[0]

    def _transpile(self, circuit) -> tuple[Any, str]:
        """(transpiled circuit, how it was had: "warm", "disk" or "compiled")."""
        circuit = self._as_circuit(circuit)
        limit = self.backend.num_qubits
        if limit is not None and circuit.num_qubits > limit:
            raise ValueError(
                f"circuit {circuit.name!r} has {circuit.num_qubits} qubits but {self.device} "
                f"supports at most {limit}"
            )
        key = self._fingerprint(circuit)
        with self._lock:
            cached = self._transpiled.get(key)
            if cached is not None:
                self._transpiled.move_to_end(key)
                self.stats["transpile_hits"] += 1
                return cached, "warm"
        disk_key = DiskCache.key(self._backend_identity, repr(key))
        transpiled, how = self._load_transpiled(disk_key), "disk"
        if transpiled is None:
            transpiled, how = self.pass_manager.run(circuit), "compiled"
            self._disk.store(disk_key, pickle.dumps(transpiled))
        with self._lock:
            self.stats["transpile_misses"] += 1
            self._transpiled[key] = transpiled
            if len(self._transpiled) > self._CACHE_SIZE:
                self._transpiled.popitem(last=False)
        return transpiled, how

    def _load_transpiled(self, disk_key: str):
        data = self._disk.load(disk_key)
        if data is None:
            return None
        try:
            return pickle.loads(data)
        except Exception:  # written by another qiskit: transpile again
            return None

    def run(self, circuit, shots: int | None = None) -> dict[str, int]:
        """Run a circuit (or OpenQASM text) and return its measurement counts."""
        shots = self.default_shots if shots is None else int(shots)
        if shots <= 0:
            raise ValueError(f"shots must be positive, got {shots}")
        transpiled = self.transpile(circuit)
        if transpiled.num_clbits == 0:
            raise ValueError(
                f"circuit {transpiled.name!r} measures nothing: add measure_all() or measure()"
            )
        if self._sampler is not None:
            result = self._sampler.run([transpiled], shots=shots).result()
            return dict(result[0].join_data().get_counts())
        return dict(self.backend.run(transpiled, shots=shots).result().get_counts())

    languages = ("qiskit",)

    def load_or_build(self, spec) -> tuple[Any, str]:
        """OpenQASM: the circuit, transpiled now (or loaded transpiled from the disk cache).
        Python: the circuit-building function; its circuits are transpiled per call."""
        if "OPENQASM" in spec.source and "def " not in spec.source:
            circuit = self._as_circuit(spec.source)
            return circuit, self._transpile(circuit)[1]
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


def _is_number(p) -> bool:
    try:
        float(p)
        return True
    except (TypeError, ValueError):
        return False


class QiskitBackend(Backend):
    name = "qiskit"
    session_class = QiskitSession

    def discover(self) -> list[Offer]:
        qpu = self.config.get("qpu", {})
        if qpu.get("provider", "aer") == "ibm":
            name = qpu.get("ibm-backend")
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
