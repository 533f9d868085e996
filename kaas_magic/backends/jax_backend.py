"""JAX through XLA: the ``tpu`` target (a TPU, or with ``jax.accelerators-serve-tpu`` any
XLA accelerator), JAX on the CPU for ``cpu --backend jax``, and the stand-in for ``tpu``."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Any, Iterator

from .. import config as kaas_config
from ..compile_cache import cache_root
from ..targets import Service
from .base import Backend, Offer, Session, cpu_name, map_containers


def _import_jax():
    # JAX grabs most of a GPU's memory at import unless told not to: fatal on a device
    # shared by many callers. Must be set before the first import in this process.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    return jax


# Which XLA compiles the calling thread's jit calls were served from the persistent cache:
# JAX tells through its monitoring events, in the thread that compiles.
_disk_hits = threading.local()


def _count_disk_hits(event: str, **kwargs) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _disk_hits.count = getattr(_disk_hits, "count", 0) + 1


@functools.cache
def _enable_persistent_cache(folder: str) -> None:
    jax = _import_jax()
    jax.config.update("jax_compilation_cache_dir", folder)
    # Cache every kernel: fine-grained tasks compile fast, which is why a cache pays.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.monitoring.register_event_listener(_count_disk_hits)


class JaxSession(Session):
    def _jax_device(self):
        jax = _import_jax()
        platform = self.offer.detail["platform"]
        return jax.devices(platform)[self.offer.detail["platform_index"]]

    def warm_up(self) -> None:
        jax = _import_jax()
        _enable_persistent_cache(str(cache_root(self.config) / "jax"))
        self._launch = threading.local()
        self._device = self._jax_device()
        with jax.default_device(self._device):
            f = jax.jit(lambda a: jax.numpy.tanh(a @ a).sum())
            f(jax.numpy.ones((8, 8))).block_until_ready()

    def namespace(self) -> dict[str, Any]:
        jax = _import_jax()
        return {"xp": jax.numpy, "jax": jax, "device": self.device}

    @property
    def physical_device(self) -> str:
        """"cpu" for XLA:CPU (also tpu's stand-in); "gpu:N" (N the device's id, its CUDA
        ordinal under XLA's CUDA plugin) or "tpu:N" for an accelerator."""
        platform = self.offer.detail.get("platform", "cpu")
        if platform == "cpu":
            return "cpu"
        device = getattr(self, "_device", None)
        number = device.id if device is not None else self.offer.detail.get("platform_index", 0)
        return f"{'gpu' if platform in ('gpu', 'cuda', 'rocm') else platform}:{number}"

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        jax = _import_jax()
        with jax.default_device(self._device):
            yield

    def synchronize(self, values: list[Any]) -> None:
        jax = _import_jax()
        jax.block_until_ready([v for v in values if isinstance(v, jax.Array)])

    compiles_on_call = True

    def build(self, spec):
        jax = _import_jax()
        from ..cellcode import padded

        # The names a JAX cell has are there for a JAX kernel too.
        namespace: dict[str, Any] = {"__name__": f"kaas_kernel_{spec.name}", "jax": jax, "jnp": jax.numpy,
                                     "xp": jax.numpy}
        exec(compile(padded(spec.source, spec.line_offset), f"<kernel {spec.name}>", "exec"), namespace)
        function = namespace.get(spec.name)
        if not callable(function):
            from ..kernelspec import KernelError

            raise KernelError(f"JAX kernel source defines no function named {spec.name!r}")
        return jax.jit(function)

    def launch(self, spec, jitted, args: tuple, kwargs: dict):
        from ..kernelspec import bind

        if spec.params is not None:
            bound = bind(spec, args, kwargs)
            args, kwargs = tuple(bound.values[p.name] for p in spec.params), {}
        compiled_before = jitted._cache_size()
        disk_before = getattr(_disk_hits, "count", 0)
        with self.activate():
            result = jitted(*args, **kwargs)
        if jitted._cache_size() == compiled_before:
            self._launch.state = "warm"
        else:
            self._launch.state = "disk" if getattr(_disk_hits, "count", 0) > disk_before else "compiled"
        return result

    def launch_state(self) -> str:
        return getattr(self._launch, "state", "warm")

    def to_device(self, value: Any) -> Any:
        jax = _import_jax()
        return jax.device_put(value, self._device)

    def memory(self) -> tuple[int | None, int | None]:
        stats = self._device.memory_stats() or {}
        return stats.get("bytes_in_use"), stats.get("bytes_limit")

    def is_own_array(self, value: Any) -> bool:
        jax = _import_jax()
        return isinstance(value, jax.Array)

    def from_dlpack(self, value: Any) -> Any:
        # Zero-copy where XLA can use the buffer as it is (on XLA:CPU: 64-byte aligned,
        # compact strides, a dtype JAX holds); otherwise XLA copies it on the device.
        jax = _import_jax()
        return jax.dlpack.from_dlpack(value, device=self._device)

    def device_copy(self, value: Any) -> Any:
        jax = _import_jax()
        return jax.numpy.array(value, copy=True) if isinstance(value, jax.Array) else None

    def data_pointer(self, value: Any) -> int | None:
        jax = _import_jax()
        if not isinstance(value, jax.Array):
            return None
        try:
            return value.unsafe_buffer_pointer()
        except Exception:  # sharded over several devices, or deleted
            return None

    def to_host(self, value: Any) -> Any:
        jax = _import_jax()
        import numpy

        def convert(v: Any) -> Any:
            return numpy.asarray(v) if isinstance(v, jax.Array) else v

        return map_containers(value, convert)


class JaxBackend(Backend):
    name = "jax"
    session_class = JaxSession
    languages = ("jax",)
    targets = {"tpu": ("device", "fallback"), "gpu": ("device",), "cpu": ("device",)}
    default_for = ("tpu",)
    injected = ("xp", "device", "jax")

    def discover(self) -> list[Offer]:
        try:
            jax = _import_jax()
        except ImportError:
            return []
        offers: list[Offer] = []
        serve_tpu_with_any = bool(kaas_config.get("jax.accelerators-serve-tpu", self.config))
        accelerators = [d for d in jax.devices() if d.platform != "cpu"]
        for i, d in enumerate(accelerators):
            detail = {"platform": d.platform, "platform_index": i}
            name = f"{d.device_kind} (JAX/XLA {d.platform} device {d.id})"
            if d.platform == "tpu" or serve_tpu_with_any:
                offers.append(Offer(Service("tpu", "jax", "device", i), name, detail))
            if d.platform in ("gpu", "cuda", "rocm"):
                offers.append(Offer(Service("gpu", "jax", "device", i), name, detail))
        cpu_detail = {"platform": "cpu", "platform_index": 0}
        cpu = cpu_name()
        offers.append(Offer(Service("cpu", "jax", "device"), f"{cpu}, JAX on XLA:CPU", cpu_detail))
        offers.append(
            Offer(
                Service("tpu", "jax", "fallback"),
                f"CPU stand-in for tpu: JAX on XLA:CPU, {cpu}",
                cpu_detail,
            )
        )
        return offers


BACKEND = JaxBackend
