"""The worker side: a Dask worker extension that keeps backends warm and runs cells.

Installed on every worker by :class:`KaasWorkerPlugin` (registered by each client) or by
``kaas worker``'s preload.

Calls (the hot path) come on direct links from the calling threads (see fastlink), skipping
the scheduler as Dask actors do. Each link has its own thread on the worker, which waits for
the device's turn, runs the cell itself, streams print output back as it happens, and sends
the reply with outputs, timings and any error. Everything else is a Dask comm handler on the
worker's event loop: ``kaas_info`` (what this worker serves, how warm and busy it is),
``kaas_load``, ``kaas_metrics``, ``kaas_free``, ``kaas_cancel`` and ``kaas_endpoint``.

Warm-up runs in a background thread when the worker starts: each backend discovers its
devices, opens and warms a session per device, then advertises its services as Dask worker
resources (``kaas/<target>/<backend>/<kind>/<index>``), which clients route by.

Modules, one job each:

- ``runtime``: the composition root: warm-up, resources, the link, admitting each call to
  its device's turn, the info/load/metrics handlers;
- ``execute``: one call, a request in and a reply out;
- ``stops``: the calls queued or running, and stopping them;
- ``kernel_library``, ``kernel_namespace``: the kernels a worker runs, and ``kernels`` in a cell;
- ``link``: the worker's end of the direct link.
"""

from __future__ import annotations

import signal

from distributed.diagnostics.plugin import WorkerPlugin

from ..isolation import report_state  # noqa: F401  (backends use worker.report_state)
from .runtime import WorkerRuntime

EXTENSION = "kaas"


def install(worker, config: dict | None = None) -> WorkerRuntime:
    """Install the kaas runtime on a Dask worker (once per worker process)."""
    runtime = worker.extensions.get(EXTENSION)
    if runtime is not None:
        return runtime
    if config is None:
        from .. import config as kaas_config

        config = kaas_config.snapshot()
    _ignore_notebook_interrupts()
    runtime = WorkerRuntime(worker, config)
    worker.extensions[EXTENSION] = runtime
    worker.handlers["kaas_info"] = runtime.handle_info
    worker.handlers["kaas_load"] = runtime.handle_load
    worker.handlers["kaas_metrics"] = runtime.handle_metrics
    worker.handlers["kaas_free"] = runtime.handle_free
    worker.handlers["kaas_cancel"] = runtime.stops.handle_cancel
    worker.handlers["kaas_endpoint"] = runtime.handle_endpoint
    worker.handlers["kaas_adapt_load"] = runtime.retirement.handle_load  # autoscaling (see retire)
    worker.handlers["kaas_retire"] = runtime.retirement.handle_retire
    return runtime


def _ignore_notebook_interrupts() -> None:
    """An embedded pool's workers share the notebook kernel's process group, and Jupyter's
    stop button sends SIGINT to the whole group: it would kill them. A kaas worker is
    stopped by its nanny (SIGTERM) or by kaas's own cancel, never by SIGINT."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing to protect here
        pass


class KaasWorkerPlugin(WorkerPlugin):
    """Registered by each client; installs the runtime on current and future workers."""

    name = "kaas"
    idempotent = True

    def __init__(self, config: dict):
        self.config = config

    def setup(self, worker) -> None:
        # First: the worker's output goes to its file in the pool's log (kaas.pool.log.
        # worker-output), and the supervisor the runtime starts inherits that (see pool_log).
        from .. import pool_log

        pool_log.worker_started(worker, self.config)
        install(worker, self.config)


__all__ = ["EXTENSION", "KaasWorkerPlugin", "install", "report_state", "WorkerRuntime"]
