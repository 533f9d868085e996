"""Naive tpu task: the library's JAX 2-layer MLP, jit-compiled for the first non-CPU JAX
device, or for the CPU as the stand-in (reported as fallback)."""

from _child import arguments, mlp_inputs, phase, report

import runpy

import jax
import numpy as np

phase("import")
args = arguments()
inputs = mlp_inputs(args.n)
accelerators = [d for d in jax.devices() if d.platform != "cpu"]
dev = (accelerators or jax.devices("cpu"))[0]
phase("init")
mlp_forward = runpy.run_path(args.source)["mlp_forward"]
with jax.default_device(dev):
    compiled = jax.jit(mlp_forward).lower(*inputs).compile()
phase("compile")
out = np.asarray(compiled(*[jax.device_put(v, dev) for v in inputs]))
phase("run")
x, w1, b1, w2, b2 = inputs
report(f"{dev.device_kind} (JAX/XLA {dev.platform})", "device" if accelerators else "fallback",
       np.allclose(out, np.maximum(x @ w1 + b1, 0) @ w2 + b2, rtol=1e-4, atol=1e-4))
