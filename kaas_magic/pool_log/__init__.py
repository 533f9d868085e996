"""The pool's log: where Dask's and kaas's own log lines go, instead of the user's cells.

A notebook kernel forwards whatever reaches its stderr (the Python object, and file
descriptor 2, which ipykernel captures) into the cell running at the time. An embedded
pool lives partly in that process (the scheduler, the nannies, the client) and its worker
processes inherit the kernel's descriptors: so a nanny's warning when it replaces a worker,
a worker's own log line, a C library's message written to fd 2, all landed in cells. Now:

* **In the process that owns a pool** (the notebook kernel), while a pool is open, records
  of the ``distributed``, ``dask``, ``tornado`` and ``kaas_magic`` loggers go to the pool
  log: the stream handlers that write them to stderr are detached while any pool is open
  and put back when the last one closes (:class:`HandlerSwap`, refcounted). The last
  ``kaas.pool.log.records`` records are kept in memory, and each is written to the pool's
  file ``pool.log`` as well. Warnings and errors are counted: :func:`mark` and
  :func:`since` (and :func:`note`) tell the call path what was logged during a call.
* **In each worker process** of an embedded pool, fd 1 and fd 2 are pointed (``os.dup2``)
  at ``worker-<pid>.log`` in the pool's folder as the worker starts: :data:`PRELOAD` is the
  workers' first Dask *preload*, run while the Worker is being built, before any plugin
  (and so before kaas's runtime starts the worker's supervisor, which inherits them), and
  handlers that wrote to the old stderr write there. Workers of other pools that load kaas
  get the same from the plugin (``kaas.pool.log.worker-output``), into a folder on their
  own host, which this process cannot read.

:func:`show` is what ``%kaas log`` displays; :func:`path` is the current pool's folder.

Layout: ``<kaas.pool.log.dir, else <tmp>/kaas-magic-<uid>/logs>/pool-<time>-<pid>-<id>/``
holding ``pool.log`` (this process) and one ``worker-<pid>.log`` per worker process
(a replaced worker leaves its file; its replacement gets its own).

Modules, each with one job:

- ``records``: this process's records: the store, its handler, the swap of the stream
  handlers, and :func:`mark` / :func:`since` / :func:`note`
- ``logs``: the pool logs, one per pool (:class:`PoolLog`, :class:`WorkerFile`,
  :class:`LogView`), their registry, :func:`current`, :func:`show`, :func:`path`
- ``folders``: where the logs go: the base folder, a folder per pool, pruning old ones
- ``worker_side``: a worker's fd 1 and 2 to its file (:data:`PRELOAD`, :func:`worker_started`);
  imported last: in an embedded pool's worker, importing this package redirects it

Everything is used through this package (``kaas_magic.pool_log``); the state that changes
(the store, the registry, whether this process was redirected) lives in its one module.
"""

from __future__ import annotations

from .records import (
    FORMAT,
    LOGGERS,
    Entry,
    HandlerSwap,
    PoolLogHandler,
    mark,
    note,
    since,
    writes_to_std_stream,
)
from .folders import ENV_DIR, KERNEL_FILE, REMOTE_FOLDER, WORKER_PREFIX, base_directory, new_pool_directory, prune
from .logs import LogView, PoolLog, WorkerFile, adopt, current, open_log, path, show, take, worker_directory_of

# Last: its import redirects an embedded pool's worker (see _embedded_worker_start), once.
from .worker_side import PRELOAD, dask_setup, preload_start, redirect_output, redirected, worker_started

__all__ = [
    # records
    "FORMAT", "LOGGERS", "Entry", "HandlerSwap", "PoolLogHandler", "mark", "note", "since", "writes_to_std_stream",
    # folders
    "ENV_DIR", "KERNEL_FILE", "REMOTE_FOLDER", "WORKER_PREFIX", "base_directory", "new_pool_directory", "prune",
    # logs
    "LogView", "PoolLog", "WorkerFile", "adopt", "current", "open_log", "path", "show", "take", "worker_directory_of",
    # worker_side
    "PRELOAD", "dask_setup", "preload_start", "redirect_output", "redirected", "worker_started",
]
