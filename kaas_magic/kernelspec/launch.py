"""The launch both C dialects share (OpenCL C and CUDA C), on the worker."""

from __future__ import annotations

import dataclasses

from .binding import bind, check_launch
from .spec import KernelSpec


def launch_c_kernel(spec: KernelSpec, args: tuple, kwargs: dict, *, allocate, upload, pointer, run,
                    input_pointer=None):
    """The launch both C dialects share (OpenCL C and CUDA C): bind the arguments, allocate
    outputs, upload inputs, run, and for a ``post: sum`` reduction kernel run it again on
    its own partial sums, on the device, until one value is left.

    ``allocate(shape, dtype)`` and ``upload(value)`` make device arrays, ``pointer(array)``
    is what the kernel takes for one, ``run(device_args, grid)`` launches. A backend whose
    read-only inputs need no array object around them (they never leave the launch) gives
    ``input_pointer(value)``: the kernel argument for an input, uploading it if need be.
    """
    # What arrived is bound again here, on the worker: a request that did not come through
    # the client's bind (or a handle whose buffer is not what its metadata said) is refused.
    bound = bind(spec, args, kwargs)
    check_launch(spec, bound)
    device_args, outputs = [], {}
    for pp in spec.bind_plan.by_name.values():  # every parameter, in the kernel's order
        p = pp.param
        if p.role == "scalar":
            device_args.append(bound.values[p.name])
            continue
        if p.role == "out":
            array = outputs[p.name] = allocate(bound.out_shapes[p.name], pp.dtype)
        elif p.role == "in" and input_pointer is not None:
            device_args.append(input_pointer(bound.values[p.name]))
            continue
        else:
            array = upload(bound.values[p.name])
            if p.role == "inout":
                outputs[p.name] = array
        device_args.append(pointer(array))
    run(device_args, bound.grid(spec))
    if spec.post == "sum":
        partial, once = next(iter(outputs.values())), dataclasses.replace(spec, post=None)
        while partial.size > 1:
            partial = launch_c_kernel(once, (partial,), {}, allocate=allocate, upload=upload,
                                      pointer=pointer, run=run, input_pointer=input_pointer)
        return partial[0:1]
    return next(iter(outputs.values())) if len(outputs) == 1 else tuple(outputs.values())


def scalar_arg_dtypes(spec: KernelSpec) -> list:
    """Each parameter's dtype if it is a scalar, else None (what PyOpenCL's
    ``set_scalar_arg_dtypes`` takes)."""
    return [pp.dtype if pp.param.role == "scalar" else None for pp in spec.bind_plan.by_name.values()]
