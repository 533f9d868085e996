"""Dask preload for ``kaas worker``: install the kaas runtime as the worker starts, so it
warms up before any client connects.  Usable directly: ``dask worker ADDR --preload kaas_magic.preload``."""

from __future__ import annotations


def dask_setup(worker) -> None:
    from .worker import install

    install(worker)
