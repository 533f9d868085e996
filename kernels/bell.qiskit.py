# kaas: name: bell
# kaas: language: qiskit
# kaas: doc: the Bell state (|00> + |11>)/sqrt(2), measured
from qiskit import QuantumCircuit


def bell():
    qc = QuantumCircuit(2)
    qc.h(0)
    qc.cx(0, 1)
    qc.measure_all()
    return qc
