"""Bad input, as a table: each case is a clear error that names the problem, and the pool
is healthy after the whole table."""

from __future__ import annotations

import io
import threading

import dask.config
import numpy as np
import pytest
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output

from kaas_magic import TargetUnavailable, VariableNotSendable
from kaas_magic.errors import CellSyntaxError
from kaas_magic.kernelspec import KernelArgumentError, KernelCompileError, KernelError

QUIET = {"stdout": io.StringIO()}
BAD_OPENCL = "__kernel void broken(__global float *a) {\n  a[get_global_id(0)] = undefined_name;\n}"


def magic(ip, line: str, cell: str):
    with capture_output():
        return ip.run_cell_magic("kaas", line, cell)


CASES = {
    "unknown target": (lambda ip, pool: magic(ip, "gpx", "x = 1"), UsageError, r"invalid choice: 'gpx'"),
    "unknown backend": (lambda ip, pool: magic(ip, "cpu --backend torch", "x = 1"), UsageError,
                        r"invalid choice: 'torch'"),
    "unknown option": (lambda ip, pool: magic(ip, "cpu --fast", "x = 1"), UsageError, r"unrecognized arguments: --fast"),
    "target not served": (lambda ip, pool: pool.run("x = 1", "gpu", fallback=False, **QUIET), TargetUnavailable,
                          r"(?s)no worker in the pool serves gpu.*Add --fallback"),
    "unsendable variable": (lambda ip, pool: pool.run("y = lock", "cpu", inputs={"lock": threading.Lock()}, **QUIET),
                            VariableNotSendable, r"variable 'lock' of type _thread.lock cannot be sent"),
    "variable over the transfer limit": (
        lambda ip, pool: _with_limit(1000, lambda: pool.run("y = big", "cpu", inputs={"big": np.zeros(10_000)}, **QUIET)),
        VariableNotSendable, r"variable 'big'.*80,\d+ bytes, over the transfer limit of 1,000 bytes"),
    "kernel that does not compile": (
        lambda ip, pool: magic(ip, 'fpga --fallback --register "broken(a: inout float32[n])"', BAD_OPENCL),
        KernelCompileError, r"(?s)'broken' failed to build.*<kernel broken>:3:\d+: use of undeclared identifier 'undefined_name'"),
    "unknown kernel": (lambda ip, pool: pool.call("vectr_add", np.ones(3, np.float32)), KernelError,
                       r"unknown kernel 'vectr_add'; known kernels: .*vector_add"),
    "wrong argument count": (lambda ip, pool: pool.call("vector_add", *[np.ones(3, np.float32)] * 4), KernelArgumentError,
                             r"takes 3 argument\(s\) \(a, b, n\) but 4 were given"),
    "array for a scalar": (lambda ip, pool: pool.call("vector_add", *[np.ones(3, np.float32)] * 3), KernelArgumentError,
                           r"argument 'n' must be a scalar \(n: int32\), got an array of shape \(3,\)"),
    "wrong dtype": (lambda ip, pool: pool.call("vector_add", np.ones(3), np.ones(3, np.float32)), KernelArgumentError,
                    r"argument 'a' has dtype float64, expected float32"),
    "wrong shape": (lambda ip, pool: pool.call("vector_add", np.ones(3, np.float32), np.ones(4, np.float32)),
                    KernelArgumentError, r"argument 'b' has n=4 but an earlier argument set n=3"),
    "empty cell": (lambda ip, pool: magic(ip, "cpu", "   \n"), UsageError, r"the cell is empty"),
    "syntax error": (lambda ip, pool: magic(ip, "cpu", "x = 1\ny = (2 +\n"), CellSyntaxError, r"never closed"),
    "malformed OpenQASM": (lambda ip, pool: pool.run("c = run(text)", "qpu", inputs={"text": "OPENQASM 2.0;\nqreg q[2;"},
                                                     **QUIET), ValueError, r"malformed OpenQASM program"),
    "circuit wider than the simulator": (
        lambda ip, pool: pool.run("from qiskit import QuantumCircuit\nqc = QuantumCircuit(64)\nqc.h(range(64))\n"
                                  "qc.measure_all()\nc = run(qc)", "qpu", **QUIET),
        ValueError, r"has 64 qubits but Aer simulator .* supports at most \d+"),
}


def _with_limit(limit: int, action):
    with dask.config.set({"kaas.transfer.max-bytes": limit}):
        return action()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_a_clear_error(ip, pool, case):
    action, error, pattern = CASES[case]
    with pytest.raises(error, match=pattern) as caught:
        action(ip, pool)
    if case == "syntax error":
        assert caught.value.error.lineno == 3  # the notebook cell's line, counting the %%kaas line


def test_the_pool_is_healthy_after_the_whole_table(ip, pool):
    for action, error, pattern in CASES.values():
        with pytest.raises(error):
            action(ip, pool)
    a = np.arange(5, dtype=np.float32)
    np.testing.assert_allclose(pool.call("vector_add", a, a), 2 * a)
    assert pool.run("y = x * 3", "cpu", inputs={"x": 14}, **QUIET).outputs["y"] == 42
    assert all(r.ready for r in pool.routes()) and len(pool.routes()) == 2
