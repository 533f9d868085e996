"""Naive fpga task: the library's OpenCL C matmul on an accelerator OpenCL device, or on
an OpenCL CPU device as the stand-in (reported as fallback)."""

from _child import arguments, matmul_inputs, phase, report, source

import numpy as np
import pyopencl as cl

phase("import")
args = arguments()
n = args.n
a, b = matmul_inputs(n)
devices = [d for p in cl.get_platforms() for d in p.get_devices()]
fpgas = [d for d in devices if d.type & (cl.device_type.ACCELERATOR | cl.device_type.CUSTOM)]
dev = (fpgas or [d for d in devices if d.type & cl.device_type.CPU])[0]
ctx = cl.Context([dev])
queue = cl.CommandQueue(ctx)
phase("init")
kernel = cl.Kernel(cl.Program(ctx, source(args)).build(), "matmul")
phase("compile")
mf = cl.mem_flags
a_dev = cl.Buffer(ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=a)
b_dev = cl.Buffer(ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=b)
c_dev = cl.Buffer(ctx, mf.WRITE_ONLY, a.nbytes)
kernel(queue, (n, n), (16, 16), a_dev, b_dev, c_dev, np.int32(n), np.int32(n), np.int32(n))
c = np.empty_like(a)
cl.enqueue_copy(queue, c, c_dev)
queue.finish()
phase("run")
report(f"{dev.name.strip()} (OpenCL, {dev.platform.name.strip()})", "device" if fpgas else "fallback",
       np.allclose(c, a @ b, rtol=1e-4))
