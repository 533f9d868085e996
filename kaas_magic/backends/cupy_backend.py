"""CuPy on CUDA GPUs: the ``gpu`` target. Serves nothing on a machine without CUDA."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from ..compile_cache import DiskCache
from ..targets import Service
from .base import Backend, Offer, Session, map_containers


class CupySession(Session):
    injected = ("xp", "device", "cupy")

    @property
    def index(self) -> int:
        return self.offer.service.index

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

    languages = ("cuda",)

    # CuPy keeps compiled kernels in CUPY_CACHE_DIR (inside the kaas cache folder); a
    # marker beside them says this kernel was compiled for this device before, so the
    # next worker's build is a load from that cache.
    def _marker_key(self, spec) -> str:
        import cupy

        return DiskCache.key(self.device, cupy.__version__, spec.digest, spec.options)

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
                kernel.compile()
        except cupy.cuda.compiler.CompileException as e:
            raise KernelCompileError(
                f"CUDA kernel {spec.name!r} failed to compile for {self.device}:\n"
                + shift_log_lines(str(e), spec.line_offset)
            ) from None
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
            upload=lambda v: cupy.ascontiguousarray(cupy.asarray(v)),
            pointer=lambda array: array,
            run=run,
        )
        return result[0] if spec.post == "sum" else result

    def to_device(self, value: Any) -> Any:
        import cupy

        with cupy.cuda.Device(self.index):
            return cupy.asarray(value)

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
        import cupy

        def convert(v: Any) -> Any:
            return cupy.asnumpy(v) if isinstance(v, cupy.ndarray) else v

        return map_containers(value, convert)


class CupyBackend(Backend):
    name = "cupy"
    session_class = CupySession

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
