"""PyOpenCL: the ``fpga`` target on OpenCL accelerator devices, OpenCL GPUs and CPUs for
``--backend opencl``, and PoCL's CPU device as the stand-in for ``fpga``."""

from __future__ import annotations

import re
import threading
from typing import Any

from .. import config as kaas_config
from .. import shared_frames
from ..compile_cache import DiskCache
from ..kernelspec import launch_c_kernel, round_up, scalar_arg_dtypes
from ..targets import Service
from .base import Backend, Offer, Session, compiled_key, map_containers, try_convert

_WARM_UP_SOURCE = "__kernel void kaas_warm(__global float *a) { a[get_global_id(0)] += 1.0f; }"


class OpenCLSession(Session):
    launch_only_reads_inputs = True  # inputs are uploaded, or read in place read-only (_buffer)

    def warm_up(self) -> None:
        import numpy
        import pyopencl as cl
        import pyopencl.array as cl_array

        platform_index, device_index = self.offer.detail["path"]
        cl_device = cl.get_platforms()[platform_index].get_devices()[device_index]
        self.context = cl.Context([cl_device])
        # A command queue per worker thread: cells run concurrently, and one in-order
        # queue shared by threads would serialise them (and clFinish would wait for all).
        self._local = threading.local()
        self._disk = DiskCache(self.config, "opencl")
        program = cl.Program(self.context, _WARM_UP_SOURCE).build()
        buf = cl_array.to_device(self.queue, numpy.zeros(64, dtype=numpy.float32))
        # PoCL compiles very slowly when the runtime picks the work-group size: pass it.
        program.kaas_warm(self.queue, (64,), (64,), buf.data)
        buf.get()

    @property
    def physical_device(self) -> str:
        """"cpu" for a CPU device (PoCL's, also fpga's stand-in); "gpu:N" or "fpga:N"
        for the N-th OpenCL GPU or accelerator (for GPUs, in the platform's order, which on
        a one-GPU machine is the CUDA device)."""
        service = self.offer.service
        if service.target == "cpu" or service.kind == "fallback":
            return "cpu"
        return f"{service.target}:{service.index}"

    @property
    def queue(self):
        import pyopencl as cl

        queue = getattr(self._local, "queue", None)
        if queue is None:
            queue = self._local.queue = cl.CommandQueue(self.context)
        return queue

    def namespace(self) -> dict[str, Any]:
        import numpy
        import pyopencl as cl
        import pyopencl.array as cl_array

        return {
            "xp": numpy,
            "device": self.device,
            "cl": cl,
            "cl_array": cl_array,
            "ctx": self.context,
            "queue": self.queue,
        }

    def synchronize(self, values: list[Any]) -> None:
        self.queue.finish()

    def _binary_key(self, spec) -> str:
        return binary_key(self.context.devices[0], spec)

    def load_cached(self, spec):
        """A program binary saved by an earlier worker on this device, if any."""
        import pyopencl as cl

        binary = self._disk.load(self._binary_key(spec))
        if binary is None:
            return None
        try:
            program = cl.Program(self.context, self.context.devices, [binary]).build(options=list(spec.options))
        except cl.Error:  # stale or foreign binary: rebuild from source
            return None
        self._kernel_object(spec, program)
        return program

    def store_cached(self, spec, program) -> None:
        import pyopencl as cl

        binaries = program.get_info(cl.program_info.BINARIES)
        if binaries and binaries[0]:
            self._disk.store(self._binary_key(spec), bytes(binaries[0]))

    def build(self, spec):
        import pyopencl as cl

        from ..kernelspec import KernelCompileError, shift_log_lines

        try:
            program = cl.Program(self.context, spec.source).build(options=list(spec.options))
        except cl.RuntimeError as e:
            # Keep the compiler's diagnostics, naming the kernel instead of a temp file.
            lines = [
                re.sub(r"\S*tempfile_\w+\.cl", f"<kernel {spec.name}>", line)
                for line in str(e).splitlines()
                if re.match(r"\s*(error|warning|note)\b|.*\.cl:\d+:\d+:", line)
            ]
            raise KernelCompileError(
                f"OpenCL kernel {spec.name!r} failed to build on {self.device}:\n"
                + shift_log_lines("\n".join(lines) or str(e), spec.line_offset)
            ) from None
        # The kernel object is made now, at registration: a signature naming a function the
        # source does not define fails here, naming it, not at every call.
        self._kernel_object(spec, program)
        return program

    def _kernel_object(self, spec, program):
        """This thread's kernel object for ``spec`` in ``program``, made on first use.
        Kernel objects hold their arguments, so each thread needs its own; making one costs
        ~0.2 ms on PoCL, so they are kept."""
        # Keyed on the program's id and everything a kernel object is made from (the name,
        # and the signature that sets its scalar dtypes: compiled_key). The entry keeps its
        # program, and is used only for that very program: a program dropped after its
        # kernel object was made (a build whose store_cached then failed) may leave its id
        # to another program, and that one must get its own kernel object.
        kernels = self._local.__dict__.setdefault("kernels", {})
        key = (id(program), compiled_key(spec))
        entry = kernels.get(key)
        kernel = entry[1] if entry is not None and entry[0] is program else None
        if kernel is None:
            import pyopencl as cl

            from ..kernelspec import KernelError

            try:
                kernel = cl.Kernel(program, spec.name)
            except cl.Error as e:
                try:
                    defined = sorted(k for k in program.get_info(cl.program_info.KERNEL_NAMES).split(";") if k)
                except cl.Error:
                    defined = []
                raise KernelError(
                    f"OpenCL kernel {spec.name!r} is not defined by its source: it "
                    + (f"defines {', '.join(repr(k) for k in defined)}" if defined else "defines no kernel")
                    + f" (PyOpenCL: {str(e).strip() or type(e).__name__}). Name the kernel in the signature "
                    f"as it is in the source."
                ) from None
            # Scalars packed by their declared dtype: otherwise PyOpenCL inspects each
            # NumPy scalar on every call, which cost more than setting all the other arguments.
            kernel.set_scalar_arg_dtypes(scalar_arg_dtypes(spec))
            kernels[key] = (program, kernel)
        return kernel

    def launch(self, spec, program, args: tuple, kwargs: dict):
        import pyopencl.array as cl_array

        queue = self.queue
        block = spec.block or None
        kernel = self._kernel_object(spec, program)

        def run(device_args, grid):
            global_size = tuple(round_up(g, b) for g, b in zip(grid, block)) if block else grid
            kernel(queue, global_size, block, *device_args)

        result = launch_c_kernel(
            spec, args, kwargs,
            # Plain buffers, no memory pool: on PoCL a pool makes uploads slower than letting
            # the runtime allocate (whose memory the worker's malloc settings keep warm).
            allocate=self._output,
            upload=lambda v: v if isinstance(v, cl_array.Array) else self.to_device(v),
            pointer=lambda array: array.data,
            run=run,
            # An input is only read by this launch: a bare buffer will do, without the
            # Python array object around it (whose making cost more than the copy here).
            input_pointer=lambda v: v.data if isinstance(v, cl_array.Array) else self._buffer(v, read_only=True),
        )
        return result.get()[0] if spec.post == "sum" else result

    def _output(self, shape: tuple[int, ...], dtype) -> Any:
        """A kernel's output. On a CPU device, a large one that will go home is made in
        shared memory of the caller's link (see shared_frames.borrow_for_result): the kernel
        writes it where the notebook will read it, and sending it copies nothing."""
        if self.physical_device == "cpu":
            import math

            import numpy

            dtype = numpy.dtype(dtype)
            host = shared_frames.borrow_for_result(math.prod(shape) * dtype.itemsize)
            if host is not None:
                import pyopencl as cl
                import pyopencl.array as cl_array

                buffer = cl.Buffer(self.context, cl.mem_flags.READ_WRITE | cl.mem_flags.USE_HOST_PTR, hostbuf=host)
                return cl_array.Array(self.queue, shape, dtype, data=buffer)
        return self._empty(shape, dtype)

    def _empty(self, shape: tuple[int, ...], dtype) -> Any:
        """A new device array, made like a cached template of its shape and dtype:
        ``cl_array.empty`` derives strides and flags with NumPy on every call, which costs
        several times what ``empty_like`` does."""
        import pyopencl as cl
        import pyopencl.array as cl_array

        if 0 in shape:
            return cl_array.empty(self.queue, shape, dtype)
        templates = self._local.__dict__.setdefault("templates", {})
        template = templates.get((shape, dtype))
        if template is None:
            if len(templates) >= 64:
                templates.clear()
            # A template never holds data of its own: its buffer is a one-byte placeholder.
            placeholder = self._local.__dict__.get("placeholder") or cl.Buffer(self.context, cl.mem_flags.READ_WRITE, 1)
            self._local.placeholder = placeholder
            try:
                template = cl_array.Array(self.queue, shape, dtype, data=placeholder)
            except Exception:  # noqa: BLE001 - a PyOpenCL that checks the buffer's size
                return cl_array.empty(self.queue, shape, dtype)
            templates[(shape, dtype)] = template
        return cl_array.empty_like(template)

    def memory(self) -> tuple[int | None, int | None]:
        # OpenCL cannot say how much of a device is in use (and buffers cannot be counted:
        # PyOpenCL's cannot be weakly referenced); the monitor shows the kept bytes instead.
        return None, self.offer.detail.get("memory_total")

    def to_device(self, value: Any) -> Any:
        """A device copy of a host array, copied as the buffer is made (COPY_HOST_PTR): no
        command goes through the queue, which made uploads quicker on PoCL."""
        import numpy
        import pyopencl.array as cl_array

        host = numpy.ascontiguousarray(value)
        if host.nbytes == 0:  # OpenCL has no empty buffers
            return cl_array.to_device(self.queue, host)
        return cl_array.Array(self.queue, host.shape, host.dtype, data=self._buffer(host))

    def _buffer(self, value: Any, read_only: bool = False):
        """A device buffer holding a copy of a host array, or None for an empty one."""
        import numpy
        import pyopencl as cl

        host = numpy.ascontiguousarray(value)
        if host.nbytes == 0:  # OpenCL has no empty buffers; a kernel takes None for one
            return None
        if read_only and self._in_place_ok(host):
            # The input came through shared memory and is this call's own: a CPU device
            # reads it where it lies (the buffer holds a reference to it), with no copy.
            return cl.Buffer(self.context, cl.mem_flags.READ_ONLY | cl.mem_flags.USE_HOST_PTR, hostbuf=host)
        return cl.Buffer(self.context, cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR, hostbuf=host)

    def _in_place_ok(self, host: Any) -> bool:
        """A launch input the device may read in place: on a CPU device (its memory is the
        host's), a large array that arrived in a shared-memory segment for this call, so no
        one else's data is reachable through it."""
        if self.physical_device != "cpu" or host.nbytes < max(shared_frames.threshold(), 1):
            return False
        return shared_frames.segment_holding(host.ctypes.data) is not None

    def download(self, values: list[Any]) -> list[Any]:
        """The copies home are queued behind the kernels and waited for once: a separate
        wait for the kernels first cost one more hand-off with PoCL's threads, each way."""
        import pyopencl.array as cl_array

        # Only large ones: a small map costs PoCL more than the copy (kaas bench kernels).
        in_place = self.physical_device == "cpu" and shared_frames.threshold() > 0
        smallest = shared_frames.threshold()

        in_host_memory: dict[int, Any] = {}  # id(mapped) -> the host memory it maps

        def start(v: Any) -> Any:
            if not isinstance(v, cl_array.Array):
                return v
            if in_place and v.flags.c_contiguous and v.nbytes >= smallest:
                # A CPU device's buffer is host memory: map it rather than copy it out. The
                # mapped array holds the buffer, which is unmapped and freed when it goes.
                import pyopencl as cl

                mapped, _ = cl.enqueue_map_buffer(self.queue, v.base_data, cl.map_flags.READ, v.offset,
                                                  v.shape, v.dtype, is_blocking=False)
                host = getattr(v.base_data, "hostbuf", None)
                if host is not None and v.offset == 0:  # made in memory of ours (see _output)
                    in_host_memory[id(mapped)] = (mapped, host)
                return mapped
            return v.get_async(queue=self.queue)[0]

        def own_memory(v: Any) -> Any:
            """A mapped output made in host memory of ours, once the map is done: that
            memory itself, which keeps it taken (the mapped array does not hold the
            buffer's host memory; a shared-memory segment would count as free)."""
            mapped, host = in_host_memory.get(id(v), (None, None))
            if mapped is not v or mapped.ctypes.data != host.ctypes.data:
                return v
            return host.view(mapped.dtype)[:mapped.size].reshape(mapped.shape)

        hosts = [try_convert(lambda value: map_containers(value, start), v) for v in values]
        self.queue.finish()
        if in_host_memory:
            hosts = [map_containers(h, own_memory) for h in hosts]
        return hosts

    def to_host(self, value: Any) -> Any:
        import pyopencl.array as cl_array

        def convert(v: Any) -> Any:
            return v.get(queue=self.queue) if isinstance(v, cl_array.Array) else v

        return map_containers(value, convert)


BINARY_KEY_FORMAT = "opencl-binary/2"


def binary_key(device, spec) -> str:
    """The on-disk name of ``spec``'s program binary for ``device`` (a ``cl.Device``, or
    anything with its attributes). A binary is native code for one compiler and one CPU:
    the key holds PyOpenCL's own device cache id (PyOpenCL's version; the platform's
    vendor, name and version; the device's vendor, name, version and driver version) and,
    named again in case a PyOpenCL leaves any out, the platform version (PoCL's build and
    LLVM version), the device version (PoCL's target CPU, e.g. ``…-znver3``: its device
    name, ``pthread-AMD EPYC``, is the same on every EPYC generation) and the driver
    version; then what the program is built from: the source and each build option, as a
    tuple (options joined with spaces would be ambiguous). The language and kernel name
    cost only a miss. Not ``spec.digest``: it holds the signature, which the binary does
    not depend on."""
    import pyopencl as cl
    from pyopencl.cache import get_device_cache_id

    platform = device.platform
    return DiskCache.key(
        BINARY_KEY_FORMAT, cl.VERSION_TEXT, repr(get_device_cache_id(device)),
        platform.version, device.version, device.driver_version,
        spec.language, spec.name, spec.source, repr(tuple(spec.options)),
    )


class OpenCLBackend(Backend):
    name = "opencl"
    session_class = OpenCLSession
    languages = ("opencl",)
    targets = {"fpga": ("device", "fallback"), "gpu": ("device",), "cpu": ("device",)}
    default_for = ("fpga",)
    injected = ("xp", "device", "cl", "cl_array", "ctx", "queue")

    def discover(self) -> list[Offer]:
        try:
            import pyopencl as cl
        except ImportError:
            return []
        try:
            platforms = cl.get_platforms()
        except cl.Error:  # no ICD / no platform installed
            return []
        fpga_types = {
            getattr(cl.device_type, t.upper())
            for t in kaas_config.get("opencl.fpga-device-types", self.config)
        }
        offers: list[Offer] = []
        counters = {"fpga": 0, "gpu": 0, "cpu": 0}
        first_cpu: tuple[str, dict] | None = None
        for p_index, platform in enumerate(platforms):
            for d_index, dev in enumerate(platform.get_devices()):
                name = f"{dev.name.strip()} (OpenCL, {platform.name.strip()})"
                detail = {"path": (p_index, d_index), "memory_total": int(dev.global_mem_size)}
                if dev.type & sum(fpga_types):
                    target = "fpga"
                elif dev.type & cl.device_type.GPU:
                    target = "gpu"
                elif dev.type & cl.device_type.CPU:
                    target = "cpu"
                    first_cpu = first_cpu or (name, detail)
                else:
                    continue
                offers.append(Offer(Service(target, "opencl", "device", counters[target]), name, detail))
                counters[target] += 1
        if first_cpu is not None:
            name, detail = first_cpu
            offers.append(
                Offer(Service("fpga", "opencl", "fallback"), f"CPU stand-in for fpga: {name}", detail)
            )
        return offers


BACKEND = OpenCLBackend
