"""``kaas demo``: start the embedded pool and run one real task on every target it serves.

Targets the machine has no device for run on their labelled CPU stand-in, and the table
at the end says which ran where.
"""

from __future__ import annotations

import io
import time

import numpy as np

DEMOS: dict[str, tuple[str, str]] = {
    # target: (what it shows, the cell)
    "cpu": ("sqrt of 1M floats with NumPy", "y = xp.sqrt(x) + 1\ncheck = float(y.sum())"),
    "gpu": ("elementwise x*3 with CuPy", "v = xp.asarray(x) * 3\ncheck = float(v.sum())"),
    "tpu": ("tanh-sum of 1M floats, jitted by JAX", "check = float(jax.jit(lambda a: xp.tanh(a).sum())(x))"),
    "fpga": (
        "OpenCL kernel doubling 1024 floats",
        'prg = cl.Program(ctx, "__kernel void twice(__global float *a)'
        '{int i=get_global_id(0); a[i]*=2;}").build()\n'
        "buf = cl_array.to_device(queue, x[:1024].copy())\n"
        "prg.twice(queue, (1024,), (64,), buf.data)\n"
        "w = buf.get()\ncheck = float(w.sum())",
    ),
    "qpu": (
        "3-qubit GHZ state, 1000 shots",
        "from qiskit import QuantumCircuit\n"
        "qc = QuantumCircuit(3); qc.h(0); qc.cx(0, 1); qc.cx(1, 2); qc.measure_all()\n"
        "counts = run(qc, shots=1000)\ncheck = counts",
    ),
}


def expected(target: str, x: np.ndarray):
    """What each demo must return, computed here with NumPy (qpu: only 000 and 111)."""
    return {
        "cpu": float((np.sqrt(x) + 1).sum()),
        "gpu": float((x * 3).sum()),
        "tpu": float(np.tanh(x).sum()),
        "fpga": float((x[:1024] * 2).sum()),
    }.get(target)


def main(args) -> int:
    import kaas_magic as kaas
    from kaas_magic.client import Pool

    print(f"Starting the embedded pool ({args.workers} workers on 127.0.0.1) ...")
    t = time.perf_counter()
    pool = Pool.start(args.workers)
    kaas.use_pool(pool)  # make it the default pool, as %load_ext + %%kaas would
    pool.wait_ready()
    print(f"Pool warm in {time.perf_counter() - t:.1f} s\n")
    print(pool.status(), "\n")
    x = np.linspace(0, 1, 1_000_000, dtype=np.float32)
    rows, failures = [], 0
    for target, (what, cell) in DEMOS.items():
        print(f"--- %%kaas {target} --fallback : {what}")
        try:
            cold = pool.run(cell, target, inputs={"x": x}, fallback=True, stdout=io.StringIO())
            warm = pool.run(cell, target, inputs={"x": x}, fallback=True, stdout=io.StringIO())
        except kaas.TargetUnavailable as e:
            print(f"    skipped: {e}\n")
            continue
        got = warm.outputs["check"]
        want = expected(target, x)
        if target == "qpu":
            good = set(got) <= {"000", "111"} and sum(got.values()) == 1000
        else:
            good = abs(got - want) <= 1e-3 * max(1.0, abs(want))
        failures += not good
        shown = got if target == "qpu" else f"{got:.4f} (NumPy says {want:.4f})"
        print(f"    result: {shown} -> {'correct' if good else 'WRONG'}")
        print(f"    first call: {cold.record}")
        print(f"    warm call : {warm.record}\n")
        rows.append((target, warm.record, cold.record, good))
    print(f"{'target':<6} {'ran on':<72} {'first ms':>9} {'warm ms':>8}  result")
    for target, warm, cold, good in rows:
        print(
            f"{target:<6} {warm.label()[:72]:<72} {cold.timings.total * 1e3:9.1f} "
            f"{warm.timings.total * 1e3:8.1f}  {'correct' if good else 'WRONG'}"
        )
    pool.close()
    kaas.use_pool(None)
    return 1 if failures else 0
