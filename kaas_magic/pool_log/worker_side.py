"""The worker's side: a worker process's fd 1 and 2, and its logging handlers that wrote to
stdout/stderr, pointed at its own file (:func:`redirect_output`): in an embedded pool's
workers by the workers' preload (:data:`PRELOAD`) and at this module's import, in the
workers of other pools that load kaas by the plugin (:func:`worker_started`).

Whether and where this process was redirected is kept here only (``_redirected`` is
reassigned once it is): read it through :func:`redirected`, never through a copied name.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

from .. import config as kaas_config  # cheap: Dask's config is read only when asked
from .folders import ENV_DIR, REMOTE_FOLDER, WORKER_PREFIX, base_directory
from .records import FORMAT, _std_streams, writes_to_std_stream

_redirected: Path | None = None
_redirect_lock = threading.Lock()
_header_written = False
_log_stream = None


def redirected() -> Path | None:
    """The file this process's fd 1 and 2 point to (a worker), or None."""
    return _redirected


def redirect_output(directory: str | os.PathLike) -> Path:
    """Point this process's fd 1 and 2 at ``<directory>/worker-<pid>.log`` (os.dup2: C
    libraries and child processes, the supervisor among them, write there too), and the
    logging handlers that wrote to stdout/stderr at it too. Once per process."""
    global _redirected, _log_stream
    with _redirect_lock:
        if _redirected is not None:
            return _redirected
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = directory / f"{WORKER_PREFIX}{os.getpid()}.log"
        for stream in _std_streams():
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.dup2(fd, 1)
            os.dup2(fd, 2)
        finally:
            os.close(fd)
        for name in ("__stdout__", "__stderr__"):  # order kept with the lines of C code
            stream = sys.__dict__.get(name)
            try:
                stream.reconfigure(line_buffering=True)
            except Exception:  # noqa: BLE001
                pass
        _log_stream = os.fdopen(2, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)
        _repoint_handlers(_log_stream)
        _redirected = target
        return target


def _repoint_handlers(stream) -> None:
    """Handlers that write to stdout/stderr write to ``stream`` (fd 2, the file) instead; the
    kaas_magic loggers get one of their own there (records below no handler would otherwise
    go to whatever ``sys.stderr`` is at the time: inside a call, the caller's cell)."""
    loggers = [logging.getLogger()] + [v for v in list(logging.Logger.manager.loggerDict.values())
                                       if isinstance(v, logging.Logger)]
    for logger in loggers:
        for h in list(logger.handlers):
            if writes_to_std_stream(h) and h.stream is not stream:
                h.setStream(stream)
    kaas_logger = logging.getLogger("kaas_magic")
    if not any(isinstance(h, logging.StreamHandler) and h.stream is stream for h in kaas_logger.handlers):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter(FORMAT))
        kaas_logger.addHandler(handler)
        kaas_logger.propagate = False


def _write_header(worker) -> None:
    global _header_written
    if _redirected is None or _header_written or _log_stream is None:
        return
    _header_written = True
    name = getattr(worker, "name", None)
    name = "" if name is None else str(name).replace(" ", "_")
    address = str(getattr(worker, "address", "") or "")
    try:
        _log_stream.write(f"==== kaas worker name={name} address={address} pid={os.getpid()} "
                          f"({time.strftime('%Y-%m-%d %H:%M:%S')}) ====\n")
        _log_stream.flush()
    except (OSError, ValueError):
        pass


def _owner_is_this_process() -> bool:
    from ..supervisor import OWNER_ENV

    return os.environ.get(OWNER_ENV[0]) == str(os.getpid())


def _embedded_worker_start() -> None:
    """In an embedded pool's worker (the folder in its environment): redirect now. Run by
    the preload as the Worker is built (before its plugins, and so before kaas's runtime
    and its supervisor), and at this module's import. Never in the pool's own process."""
    directory = os.environ.get(ENV_DIR)
    if not directory or _owner_is_this_process():
        return
    try:
        redirect_output(directory)
    except OSError:  # the folder is gone: the worker serves on, its output where it was
        pass


# The workers' preload, as text: Dask runs a text preload afresh in each worker as the
# Worker is built (a module name would not run again where this module was imported
# already, e.g. by a spawned worker re-importing its parent's main script).
PRELOAD = ("import kaas_magic.pool_log as _kaas_pool_log  # kaas: this worker's output goes to its file\n"
           "_kaas_pool_log.preload_start()\n"
           "dask_setup = _kaas_pool_log.dask_setup\n")


def preload_start() -> None:
    """The preload's first step, in an embedded pool's worker as it is being built."""
    _embedded_worker_start()


def dask_setup(worker) -> None:
    """Dask preload hook (see PRELOAD), once the worker listens: its header line."""
    _embedded_worker_start()
    _write_header(worker)


def worker_started(worker, config: dict | None = None) -> Path | None:
    """From the kaas plugin's setup, before the runtime (and its supervisor) starts: a worker
    of any pool that loads kaas writes its output to a file (kaas.pool.log.worker-output).
    Not a worker without a nanny (it may run inside the notebook's own process)."""
    if _redirected is None:
        mode = str(kaas_config.get("pool.log.worker-output", config if config is not None else {}) or "").lower()
        if mode != "file" or not getattr(worker, "nanny", None) or _owner_is_this_process():
            return None
        directory = os.environ.get(ENV_DIR)
        try:
            if directory:
                redirect_output(directory)
            else:  # a worker of a pool not embedded here: on its own host
                folder = base_directory(config if config is not None else {}) / REMOTE_FOLDER
                target = folder / f"{WORKER_PREFIX}{os.getpid()}.log"
                # the last line the old stderr gets: where the rest went
                print(f"kaas: this worker's output (fd 1 and 2) now goes to {target}", file=sys.__dict__.get(
                    "__stderr__") or sys.stderr, flush=True)
                redirect_output(folder)
        except OSError:
            return None
    _write_header(worker)
    return _redirected


_embedded_worker_start()
