"""The one small interface every backend implements.

A backend discovers the devices of the worker's machine (importing its framework only
there, on the worker), and opens a warm :class:`Session` per device. The worker runs every
cell through a session: ``namespace()`` gives the injected names, ``activate()`` makes the
device current for the calling thread, ``synchronize()`` waits for queued device work so
timings are honest, and ``to_host()`` turns device arrays into NumPy arrays.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import platform
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

from ..targets import Service


@dataclass
class Offer:
    """A service a backend can provide, and what to tell users about its device."""

    service: Service
    device: str  # readable description, shown to users
    detail: dict = field(default_factory=dict)  # extra facts: memory, platform, ...


class Session:
    """A warm context on one device. Subclasses override what their framework needs.
    What a session injects (``namespace()``) and compiles is declared on its Backend."""

    # A kernel launch on this session only reads a host input while it runs: it neither
    # writes nor keeps it (it uploads a copy, or a CPU device reads it in place). Such a
    # launch may take read-only views of shared memory as inputs (see shared_frames).
    launch_only_reads_inputs = False

    def __init__(self, offer: Offer, config: dict):
        self.offer = offer
        self.config = config
        # Created here so that relabelled copies of a session (Backend.open) share them.
        self._kernels: dict[str, Any] = {}
        self._kernels_lock = threading.Lock()
        self._kernel_stats: dict[str, dict] = {}
        # Names the device, not the label: relabelled copies share it (Backend.open).
        self.device_id = f"{offer.service.backend}:{offer.service.index}:{offer.device}"

    @property
    def device(self) -> str:
        return self.offer.device

    @property
    def physical_device(self) -> str:
        """The physical device this session's calls run on, named the same by every backend
        that drives it: "cpu" for the worker's host CPU, "gpu:N" for CUDA device N, and so on.
        The pool monitor groups sessions by it (calls of different backends on one device
        compete for it). By default a session's device is its own."""
        return self.device_id

    def warm_up(self) -> None:
        """Run something tiny so that contexts, JITs and allocators are initialised."""

    def namespace(self) -> dict[str, Any]:
        raise NotImplementedError

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        yield

    def synchronize(self, values: list[Any]) -> None:
        """Block until device work producing ``values`` has finished."""

    def to_host(self, value: Any) -> Any:
        """Return ``value`` with device arrays replaced by host NumPy arrays."""
        return value

    def download(self, values: list[Any]) -> list[Any]:
        """Wait for the device work producing ``values``, then bring them home (to_host);
        a backend that can queue the copies behind that work and wait once does so. A value
        that cannot come home is left as it is (the caller names it when sending fails)."""
        self.synchronize(values)
        return [try_convert(self.to_host, v) for v in values]

    def close(self) -> None:
        pass

    def to_device(self, value: Any) -> Any:
        """``value`` (a host array) copied onto this device: what ``kaas.put`` keeps."""
        return value

    def memory(self) -> tuple[int | None, int | None]:
        """(bytes used, bytes total) of the device, where the backend can tell."""
        return None, self.offer.detail.get("memory_total")

    # -- arrays kept by another backend on the same physical device (see worker.convert) --

    def is_own_array(self, value: Any) -> bool:
        """Whether ``value`` is an array of this backend already (nothing to convert)."""
        return False

    def from_dlpack(self, value: Any) -> Any:
        """``value``, an array of another backend on this session's physical device, as an
        array of this backend through DLPack (``__dlpack__``), sharing its memory where the
        framework can; raises where the framework refuses it (a dtype, strides)."""
        raise NotImplementedError(f"{type(self).__name__} takes no DLPack arrays")

    def device_copy(self, value: Any) -> Any:
        """A compact copy of this backend's array ``value`` made on its own device (so that
        another backend can take it through DLPack); None where the backend cannot."""
        return None

    def data_pointer(self, value: Any) -> int | None:
        """The address of the first element of this backend's array ``value``; None when
        it is not one or the framework does not say."""
        return None

    def release_cached_memory(self) -> None:
        """Give memory a pool holds for reuse back to the device (after running out)."""

    # -- registered kernels: compiled once per (kernel, device, options), then warm --

    # JAX compiles per input shape on a kernel's first call, not when it is built: such a
    # session reports how each call went from launch() (see launch_state).
    compiles_on_call: ClassVar[bool] = False

    def kernel(self, spec, report: Callable[[str], None] | None = None) -> tuple[Any, str]:
        """The compiled form of ``spec`` on this device, and how it was had: "warm" (in
        memory), "disk" (loaded from the kaas cache folder) or "compiled". ``report`` is
        told when compiling starts and ends (a live view shows it)."""
        stats = self.kernel_stats(spec)
        key = self.kernel_key(spec)
        with self._kernels_lock:
            compiled = self._kernels.get(key)
            if compiled is not None:
                how = "warm"
            else:
                if report is not None:
                    report("compiling")
                compiled, how = self.load_or_build(spec)
                if report is not None:
                    report("running")
                # Never evicted: backends key per-thread objects on id(compiled) (OpenCL
                # kernel objects), which is only safe while the compiled form stays alive.
                self._kernels[key] = compiled
            if not self.compiles_on_call:
                stats[_STAT_OF[how]] += 1
            return compiled, how

    def kernel_key(self, spec) -> str:
        """What names the compiled form of ``spec`` in memory (see :func:`compiled_key`)."""
        return compiled_key(spec)

    def load_or_build(self, spec) -> tuple[Any, str]:
        cached = self.load_cached(spec)
        if cached is not None:
            return cached, "disk"
        compiled = self.build(spec)
        self.store_cached(spec, compiled)
        return compiled, "compiled"

    def load_cached(self, spec) -> Any | None:
        """The compiled form from the disk cache, or None."""
        return None

    def store_cached(self, spec, compiled) -> None:
        """Save the compiled form to the disk cache."""

    def kernel_stats(self, spec=None) -> dict:
        """Registered-kernel counters ("calls", "compiles", "disk_loads", "cache_hits",
        "execute_s", and the kernel's "language") kept on this device.

        With ``spec``: that kernel's counters, created at zero on first ask (keyed by
        ``spec.name``). Without: every kernel's, as ``{name: counters}``. That dict is the
        live one, shared by relabelled copies of a session (see ``Backend.open``), so
        ``id()`` of it names the device's counters; read it, do not change it."""
        if spec is None:
            return self._kernel_stats
        return self._kernel_stats.setdefault(
            spec.name,
            {"language": spec.language, "calls": 0, "compiles": 0, "disk_loads": 0, "cache_hits": 0,
             "execute_s": 0.0},
        )

    def call_kernel(self, spec, args: tuple, kwargs: dict,
                    report: Callable[[str], None] | None = None) -> tuple[Any, str]:
        """Run a registered kernel here; results stay on the device (to_host brings them home)."""
        compiled, how = self.kernel(spec, report)
        started = time.perf_counter()
        result = self.launch(spec, compiled, args, kwargs)
        stats = self.kernel_stats(spec)
        if self.compiles_on_call:
            how = self.launch_state()
            stats[_STAT_OF[how]] += 1
        stats["calls"] += 1
        stats["execute_s"] += time.perf_counter() - started
        return result, how

    def launch_state(self) -> str:
        """For compiles_on_call sessions: how the calling thread's last launch was had."""
        return "warm"

    def build(self, spec) -> Any:
        raise NotImplementedError(f"{type(self).__name__} cannot build {spec.language} kernels")

    def launch(self, spec, compiled, args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError


_STAT_OF = {"warm": "cache_hits", "disk": "disk_loads", "compiled": "compiles"}


def compiled_key(spec) -> str:
    """The in-memory key of a kernel's compiled form: a SHA-256 of every field the compiled
    form (or what is made from it once and kept) can depend on. The source, name, language
    and build options make the program; the signature sets how a launch packs scalars into
    kernel objects made from it (OpenCL keeps those per program); the line offset sets the
    line numbers that code compiled from Python reports. ``KernelSpec.digest`` hashes the
    same fields the same way and equals it; this also takes spec-like objects without that
    property. Worked out once per spec object (specs are frozen) and kept on it, as
    cached_property does."""
    cached = getattr(spec, "__dict__", {}).get("_kaas_compiled_key")
    if cached is not None:
        return cached
    params = None if spec.params is None else tuple(
        (p.name, p.role, p.dtype, None if p.shape is None else tuple(p.shape)) for p in spec.params
    )
    described = (spec.language, spec.name, spec.source, tuple(spec.options), params, spec.line_offset)
    key = hashlib.sha256(repr(described).encode("utf-8", "surrogatepass")).hexdigest()
    try:
        spec.__dict__["_kaas_compiled_key"] = key
    except AttributeError:  # a spec without a __dict__: worked out on every call
        pass
    return key


class Backend:
    """A family of devices one framework drives. What it is, it says once, here, in class
    attributes that :mod:`kaas_magic.backends.registry` reads (without discovering any
    device): its ``name`` (as its ``kaas_magic.backends`` entry point is named), the kernel
    ``languages`` its sessions build, the ``targets`` it can serve with the kinds of service
    for each (in the order its kernels default to), the targets it is the ``default_for``,
    and the names its sessions' ``namespace()`` puts in every cell (``injected``)."""

    name: ClassVar[str]
    session_class: ClassVar[type[Session]] = Session
    languages: ClassVar[tuple[str, ...]] = ()
    targets: ClassVar[dict[str, tuple[str, ...]]] = {}  # target: kinds (see targets.KINDS)
    default_for: ClassVar[tuple[str, ...]] = ()
    injected: ClassVar[tuple[str, ...]] = ("xp", "device")

    def __init__(self, config: dict):
        self.config = config
        self._warm: dict[Any, Session] = {}

    def discover(self) -> list[Offer]:
        """Devices this worker can serve through this backend (imports the framework)."""
        raise NotImplementedError

    def device_key(self, offer: Offer) -> Any:
        """Offers with the same key share one warm context (e.g. ``cpu`` and the ``fpga``
        stand-in both use PoCL's CPU device); only their labels differ."""
        return (offer.service.index, repr(sorted(offer.detail.items())))

    def open(self, offer: Offer) -> Session:
        service = offer.service
        if service.backend != self.name or service.kind not in dict(self.targets).get(service.target, ()):
            raise ValueError(f"backend {self.name!r} offered {service.label()} ({service.resource}), "
                             f"which its declared targets do not include: {dict(self.targets)}")
        key = self.device_key(offer)
        warm = self._warm.get(key)
        if warm is not None:
            session = copy.copy(warm)
            session.offer = offer
            return session
        session = self.session_class(offer, self.config)
        session.warm_up()
        self._warm[key] = session
        return session


def cpu_name() -> str:
    """A readable CPU description, e.g. 'AMD EPYC 7B13 (2 cores)'."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "CPU"
    return f"{model} ({os.cpu_count()} cores)"


def try_convert(convert, value: Any) -> Any:
    try:
        return convert(value)
    except Exception:  # noqa: BLE001 - reported when the value is sent
        return value


from ..containers import map_containers  # noqa: E402,F401 (its home: kaas_magic.containers)
