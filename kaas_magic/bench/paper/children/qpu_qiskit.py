"""Naive qpu task: the library's 5-qubit GHZ circuit (OpenQASM 2) on the Aer simulator."""

from _child import arguments, phase, report, source

from qiskit import qasm2, transpile
from qiskit_aer import AerSimulator

phase("import")
args = arguments()
backend = AerSimulator()
phase("init")
circuit = transpile(qasm2.loads(source(args), custom_instructions=qasm2.LEGACY_CUSTOM_INSTRUCTIONS), backend,
                    optimization_level=1)
phase("compile")
counts = backend.run(circuit, shots=args.shots).result().get_counts()
phase("run")
report("Aer simulator (qiskit-aer)", "simulator",
       set(counts) <= {"00000", "11111"} and sum(counts.values()) == args.shots)
