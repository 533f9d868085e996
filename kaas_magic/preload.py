"""Dask preload for ``kaas worker``: install the kaas runtime as the worker starts, so it
warms up before any client connects.  Usable directly: ``dask worker ADDR --preload kaas_magic.preload``."""

from __future__ import annotations


def dask_setup(worker) -> None:
    from . import pool_log
    from .worker import install

    pool_log.worker_started(worker)  # before install(): its supervisor inherits the log file
    install(worker)
