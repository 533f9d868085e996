"""Naive cpu task: an N x N float32 matmul with NumPy."""

from _child import arguments, matmul_inputs, phase, report

import numpy as np

phase("import")
args = arguments()
a, b = matmul_inputs(args.n)
phase("init")
phase("compile")
c = a @ b
phase("run")
ok = np.isclose(c[1, 2], np.dot(a[1].astype(np.float64), b[:, 2]), rtol=1e-4)
report("CPU (NumPy)", "device", ok)
