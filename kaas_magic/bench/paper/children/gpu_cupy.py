"""Naive gpu task: the library's CUDA C matmul with CuPy on CUDA device 0."""

from _child import arguments, matmul_inputs, phase, report, source

import cupy
import numpy as np

phase("import")
args = arguments()
n = args.n
a, b = matmul_inputs(n)
cupy.cuda.Device(0).use()
cupy.zeros(1)  # creates the CUDA context
cupy.cuda.Device(0).synchronize()
phase("init")
kernel = cupy.RawKernel(source(args), "matmul")
kernel.compile()
phase("compile")
a_dev, b_dev = cupy.asarray(a), cupy.asarray(b)
c_dev = cupy.empty((n, n), dtype=cupy.float32)
kernel((n // 16, n // 16), (16, 16), (a_dev, b_dev, c_dev, np.int32(n), np.int32(n), np.int32(n)))
c = cupy.asnumpy(c_dev)
phase("run")
report(cupy.cuda.runtime.getDeviceProperties(0)["name"].decode() + " (CUDA device 0)", "device",
       np.allclose(c, a @ b, rtol=1e-4))
