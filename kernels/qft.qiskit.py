# kaas: name: qft
# kaas: language: qiskit
# kaas: doc: prepare the basis state |value> on n qubits, apply the QFT then its inverse, measure: returns value with certainty
from qiskit import QuantumCircuit
from qiskit.circuit.library import QFTGate


def qft(n, value):
    qc = QuantumCircuit(n)
    for bit in range(n):
        if (value >> bit) & 1:
            qc.x(bit)
    qc.append(QFTGate(n), range(n))
    qc.append(QFTGate(n).inverse(), range(n))
    qc.measure_all()
    return qc
