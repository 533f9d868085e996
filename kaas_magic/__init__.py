"""kaas-magic: Kernel-as-a-Service for notebooks.

Run a cell, or later a registered kernel, on a pool of warm accelerator workers::

    %load_ext kaas_magic
    %%kaas gpu --fallback
    v = xp.asarray(x) * 3

or without IPython::

    import kaas_magic as kaas
    result = kaas.run("y = xp.sqrt(x)", "cpu", inputs={"x": x})
    result.outputs["y"], kaas.last_run()

Importing this package is cheap: Dask and every device framework load on first use, and
the frameworks only on the workers.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from . import config  # cheap: reads Dask's config only when first asked
from .errors import (
    KaasError, KaasUsageError, RemoteError, StaleHandleError, TargetUnavailable, VariableNotSendable, WorkerLost,
)
from .targets import TARGETS

if TYPE_CHECKING:
    from .client import Pool, RunResult
    from .record import RunRecord
    from .pool_status import PoolStatus

__version__ = "0.1.0"

_pool: "Pool | None" = None
_pool_lock = threading.Lock()


def start(n_workers: int | None = None, **cluster_kwargs) -> "Pool":
    """Start (or return) the default pool: an embedded LocalCluster on 127.0.0.1.

    When ``KAAS_SCHEDULER_ADDRESS`` or ``kaas.scheduler-address`` is set, connect there
    instead.
    """
    global _pool
    from .client import Pool

    with _pool_lock:
        if _pool is None:
            address = config.scheduler_address()
            _pool = Pool.connect(address) if address else Pool.start(n_workers, **cluster_kwargs)
        return _pool


def connect(address: str, security=None) -> "Pool":
    """Make a pool on an existing Dask scheduler the default (closing a previous one)."""
    global _pool
    from .client import Pool

    with _pool_lock:
        if _pool is not None:
            _pool.close()
            _pool = None
        _pool = Pool.connect(address, security=security)
        return _pool


def pool() -> "Pool":
    """The default pool, started on first use."""
    return _pool if _pool is not None else start()


def shutdown() -> None:
    """Close the default pool (and its embedded cluster, if any)."""
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.close()
            _pool = None


def use_pool(pool: "Pool | None") -> "Pool | None":
    """Make ``pool`` the default pool that the magics and this module's functions use
    (``None`` clears it, so the next use starts one). Returns the previous default, which
    is left open: the caller owns both, and can put the previous one back with
    ``use_pool(previous)``.
    """
    global _pool
    with _pool_lock:
        previous, _pool = _pool, pool
        return previous


def run(code: str, target: str = "cpu", **options: Any) -> "RunResult":
    """Run ``code`` on the default pool; see :meth:`kaas_magic.client.Pool.run`. A first
    call that starts the pool counts the start in its record."""
    options.setdefault("started", time.perf_counter())
    return pool().run(code, target, **options)


def run_cell(code: str, target: str, namespace: dict, **options: Any) -> "RunResult":
    """Run ``code`` with inputs read from and outputs written to ``namespace``."""
    options.setdefault("started", time.perf_counter())
    return pool().run_cell(code, target, namespace, **options)


def call(name: str, *args: Any, **kwargs: Any) -> Any:
    """Run kernel ``name`` on the default pool: ``kaas.call("scale", a, k=2.0)``."""
    kwargs.setdefault("started", time.perf_counter())
    return pool().call(name, *args, **kwargs)


# concurrent.futures' own, for the futures of calls made with block=False.
from concurrent.futures import as_completed, wait  # noqa: E402


def map(fn_or_code: str, iterable, **options: Any):  # noqa: A001 - kaas.map, as Executor.map
    """Many calls at once on the default pool: ``kaas.map("scale", [(a, 2.0), ...])``, or
    code over dicts of inputs; see :meth:`kaas_magic.client.Pool.map`."""
    return pool().map(fn_or_code, iterable, **options)


def pool_started() -> bool:
    """Whether the default pool is started or connected (a call now would not wait for it)."""
    return _pool is not None


def put(value: Any, target: str = "cpu", **options: Any):
    """Copy a host array onto a device of ``target`` and keep it there; returns a handle."""
    return pool().put(value, target, **options)


def metrics() -> list[dict]:
    """One row per device in the pool: occupancy, utilisation, latency, memory."""
    return pool().metrics()


def monitor(interval: float | None = None):
    """Show a live view of every device in the pool (updates in the background)."""
    from .pool_monitor import monitor as show

    return show(pool(), interval)


def panel(interval: float | None = None):
    """The live pool monitor, docked in a JupyterLab side panel."""
    from .pool_monitor import panel as dock

    return dock(pool(), interval)


def register(source: str, language: str, **options: Any):
    """Register a kernel from source on the default pool; see :meth:`Pool.register`."""
    return pool().register(source, language, **options)


def kernels():
    """Library and registered kernels, with where each is compiled."""
    return pool().kernels()


def last_run() -> "RunRecord | None":
    """The record of the latest run on the default pool (None before any)."""
    return _pool.last_run() if _pool is not None else None


def status() -> "PoolStatus":
    return pool().status()


def adapt(minimum: int = 1, maximum: int | None = None, **policy: Any):
    """Grow and shrink the default pool with its load; see :meth:`Pool.adapt`."""
    return pool().adapt(minimum, maximum, **policy)


def load_ipython_extension(ipython) -> None:
    from .magics import KaasMagics

    ipython.register_magics(KaasMagics)


def unload_ipython_extension(ipython) -> None:
    shutdown()


__all__ = [
    "TARGETS", "config", "call", "put", "register", "kernels", "metrics", "monitor", "panel", "start", "connect", "pool", "use_pool", "pool_started", "shutdown", "wait", "as_completed", "run", "run_cell", "last_run", "status", "adapt",
    "KaasError", "KaasUsageError", "RemoteError", "StaleHandleError", "TargetUnavailable", "VariableNotSendable",
    "WorkerLost",
]
