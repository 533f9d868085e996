"""CuPy on CUDA GPUs: the ``gpu`` target. Serves nothing on a machine without CUDA."""

from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator

from ..compile_cache import DiskCache
from ..targets import Service
from .base import Backend, Offer, Session, map_containers


def _pin_if_shared(value: Any, device: int) -> Any:
    """An input that arrived through shared memory (see shared_frames) is uploaded from its
    segment. Segments are reused call after call, so from a segment's second upload on it is
    registered with CUDA (page-locked): copies from it then go by DMA at full speed, where
    pageable memory is staged through a bounce buffer. Unregistered before it is unmapped."""
    import numpy

    from .. import shared_frames

    if type(value) is not numpy.ndarray or value.nbytes < max(shared_frames.threshold(), 1):
        return value
    segment = shared_frames.segment_holding(value.ctypes.data)
    if segment is None or segment.pinned:
        return value
    segment.uploads += 1
    if segment.uploads < 2:
        return value
    import cupy

    address = segment.address
    try:
        with cupy.cuda.Device(device):
            cupy.cuda.runtime.hostRegister(address, segment.size, 0)
    except Exception:  # noqa: BLE001 - e.g. the locked-memory limit: upload from pageable memory
        segment.pinned = True  # (do not try again)
        return value
    segment.pinned = True

    def unpin() -> None:
        with cupy.cuda.Device(device):
            cupy.cuda.runtime.hostUnregister(address)

    segment.on_unmap.append(unpin)
    return value


class CupySession(Session):
    launch_only_reads_inputs = True  # inputs are uploaded (copied to the GPU)

    @property
    def index(self) -> int:
        return self.offer.service.index

    @property
    def physical_device(self) -> str:
        return f"gpu:{self.index}"  # the CUDA device ordinal

    def warm_up(self) -> None:
        import cupy

        with cupy.cuda.Device(self.index):
            # Creates the context, the memory pool and loads an elementwise kernel.
            (cupy.arange(1024, dtype=cupy.float32) * 2).sum().get()
        self._disk = DiskCache(self.config, "cupy-kernels")

    def namespace(self) -> dict[str, Any]:
        import cupy

        return {"xp": cupy, "cupy": cupy, "device": self.device}

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        import cupy

        with cupy.cuda.Device(self.index):
            yield

    def synchronize(self, values: list[Any]) -> None:
        import cupy

        cupy.cuda.get_current_stream().synchronize()

    # CuPy keeps compiled kernels in CUPY_CACHE_DIR (inside the kaas cache folder); a
    # marker beside them says this kernel was compiled for this device before, so the
    # next worker's build is a load from that cache. The marker only sets the label
    # ("disk" or "compiled"): build always goes through CuPy, whose own caches key on the
    # source, options, arch and compiler versions (on disk), and on the code, options and
    # device (RawKernel and _get_raw_module in memory).
    def _marker_key(self, spec) -> str:
        """Everything CuPy's disk cache keys on, so that "disk" is said only when CuPy will
        find the module there: the device, its compute capability (the arch compiled
        for), the CUDA runtime, driver and NVRTC versions, CuPy's version, and the source
        and each option (a tuple). Not ``spec.digest``: it holds the signature, which the
        module does not depend on."""
        import cupy

        cuda = cupy.cuda
        return DiskCache.key(
            "cupy-marker/2", self.device, cupy.__version__,
            cuda.Device(self.index).compute_capability,
            cuda.runtime.runtimeGetVersion(), cuda.runtime.driverGetVersion(),
            repr(tuple(cuda.nvrtc.getVersion())),
            spec.language, spec.name, spec.source, repr(tuple(spec.options)),
        )

    def load_cached(self, spec):
        if self._disk.load(self._marker_key(spec)) is None:
            return None
        return self.build(spec)

    def store_cached(self, spec, kernel) -> None:
        self._disk.store(self._marker_key(spec), b"compiled")

    def build(self, spec):
        import cupy

        from ..kernelspec import KernelCompileError, shift_log_lines

        kernel = cupy.RawKernel(spec.source, spec.name, options=tuple(spec.options))
        try:
            with cupy.cuda.Device(self.index):
                # Compiles, loads the module and looks the function up in it (get_function):
                # a signature naming a function the module lacks fails here, at registration.
                kernel.compile()
                getattr(kernel, "kernel", None)  # the lookup, where compile() does not do it
        except cupy.cuda.compiler.CompileException as e:
            raise KernelCompileError(
                f"CUDA kernel {spec.name!r} failed to compile for {self.device}:\n"
                + shift_log_lines(str(e), spec.line_offset)
            ) from None
        except cupy.cuda.driver.CUDADriverError as e:
            if "NOT_FOUND" not in str(e):
                raise
            raise missing_kernel_error(spec, str(e)) from None
        return kernel

    def launch(self, spec, kernel, args: tuple, kwargs: dict):
        import cupy

        from ..kernelspec import launch_c_kernel

        block = spec.block or (256,)

        def run(device_args, grid):
            kernel(tuple(-(-g // b) for g, b in zip(grid, block)), block, tuple(device_args))

        result = launch_c_kernel(
            spec, args, kwargs,
            allocate=lambda shape, dtype: cupy.empty(shape, dtype=dtype),
            upload=lambda v: cupy.ascontiguousarray(cupy.asarray(_pin_if_shared(v, self.index))),
            pointer=lambda array: array,
            run=run,
        )
        return result[0] if spec.post == "sum" else result

    def to_device(self, value: Any) -> Any:
        import cupy

        with cupy.cuda.Device(self.index):
            return cupy.asarray(_pin_if_shared(value, self.index))

    def is_own_array(self, value: Any) -> bool:
        import cupy

        return isinstance(value, cupy.ndarray)

    def from_dlpack(self, value: Any) -> Any:
        # Zero-copy from another framework's CUDA buffer on this device (JAX on the GPU);
        # CuPy hands its current stream to the producer, which orders its work before ours.
        import cupy

        with cupy.cuda.Device(self.index):
            return cupy.from_dlpack(value)

    def device_copy(self, value: Any) -> Any:
        import cupy

        if not isinstance(value, cupy.ndarray):
            return None
        with cupy.cuda.Device(self.index):
            return cupy.ascontiguousarray(value).copy()

    def data_pointer(self, value: Any) -> int | None:
        import cupy

        return int(value.data.ptr) if isinstance(value, cupy.ndarray) else None

    def release_cached_memory(self) -> None:
        import cupy

        with cupy.cuda.Device(self.index):
            cupy.get_default_memory_pool().free_all_blocks()

    def memory(self) -> tuple[int | None, int | None]:
        import cupy

        with cupy.cuda.Device(self.index):
            free, total = cupy.cuda.runtime.memGetInfo()
        return total - free, total

    def to_host(self, value: Any) -> Any:
        """Host copies of CuPy arrays. In a kernel call whose results go home, a large
        contiguous one is copied from the GPU straight into a borrowed shared-memory segment
        of the caller's link (see shared_frames.borrow_for_result; pinned from the segment's
        second use), which then goes home without another copy."""
        import cupy

        from .. import shared_frames

        def convert(v: Any) -> Any:
            if not isinstance(v, cupy.ndarray):
                return v
            host = shared_frames.borrow_for_result(v.nbytes) if v.flags.c_contiguous else None
            if host is not None:
                out = host.view(v.dtype).reshape(v.shape)
                _pin_if_shared(out, self.index)
                try:
                    with cupy.cuda.Device(self.index):
                        v.get(out=out)
                    return out
                except (TypeError, ValueError):  # a CuPy without get(out=): the copy below
                    pass
            return cupy.asnumpy(v)

        return map_containers(value, convert)


def missing_kernel_error(spec, detail: str = ""):
    """The error for a CUDA module without the function a signature names: the kernels its
    source defines, and, where the function is there but compiled as C++ (its symbol
    mangled), the ``extern "C"`` that makes it findable by name."""
    from ..kernelspec import KernelError, kernels_in_source

    code = re.sub(r"//[^\n]*|/\*.*?\*/", " ", spec.source, flags=re.S)
    defined = kernels_in_source(spec.source)
    c_block = re.search(r'extern\s+"C"\s*\{', code)

    def c_linkage(kernel: str) -> bool:
        return bool(c_block or re.search(rf'extern\s+"C"[^;{{}}]*\b{re.escape(kernel)}\s*\(', code))

    if spec.name in defined and not c_linkage(spec.name):
        hint = (f" It is there, but compiled as C++ its symbol name is mangled: declare it "
                f'extern "C" __global__ void {spec.name}(...) so that it can be found by name.')
    else:
        hint = (" The source defines " + (", ".join(repr(k) for k in defined) if defined else "no __global__ kernel")
                + "; name the kernel in the signature as it is in the source"
                + (' (and declare it extern "C")' if not all(map(c_linkage, defined)) else "") + ".")
    return KernelError(f"CUDA kernel {spec.name!r} is not in the compiled module"
                       + (f" ({detail.strip()})" if detail.strip() else "") + "." + hint)


class CupyBackend(Backend):
    name = "cupy"
    session_class = CupySession
    languages = ("cuda",)
    targets = {"gpu": ("device",)}
    default_for = ("gpu",)
    injected = ("xp", "device", "cupy")

    def discover(self) -> list[Offer]:
        try:
            import cupy
        except ImportError:
            return []
        if not cupy.cuda.is_available():
            return []
        offers = []
        for i in range(cupy.cuda.runtime.getDeviceCount()):
            props = cupy.cuda.runtime.getDeviceProperties(i)
            name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
            memory = int(props["totalGlobalMem"])
            offers.append(
                Offer(
                    Service("gpu", "cupy", "device", i),
                    f"{name} (CUDA device {i}, {memory / 2**30:.0f} GiB)",
                    {"memory_total": memory},
                )
            )
        return offers


BACKEND = CupyBackend
