"""The worker's end of the direct link that calls come on (see fastlink): a TCP listener on
the worker's own host, with TLS when the pool uses it, and a Unix socket for local clients."""

from __future__ import annotations

import os
import tempfile
from typing import Callable

from .. import fastlink
from ..errors import KaasError


def start(worker, handler: Callable, hostname: str, unix_path: str) -> tuple[dict, fastlink.Server]:
    """The link's server, each connection served by ``handler`` in a thread of its own, and
    the endpoint clients are told."""
    from distributed.comm.addressing import get_address_host

    # A TLS pool: the link's TCP listener takes only clients with a certificate the
    # pool's CA signed, as Dask's own listener does (Dask's context requires client
    # certificates; fastlink.Server refuses one that does not). Its Unix socket has no
    # TLS: it is private to this user (see socket_path and fastlink.Server).
    ssl_context = None
    if worker.address.startswith("tls://"):
        ssl_context = worker.security.get_listen_args("worker").get("ssl_context")
        if ssl_context is None:
            raise KaasError(f"worker {worker.address} uses TLS but has no TLS context for its direct link")
    host = get_address_host(worker.address)
    server = fastlink.Server(host, handler, ssl_context, unix_path=unix_path)
    return {"host": host, "port": server.port, "unix": server.unix_path, "hostname": hostname}, server


def socket_path(worker) -> str:
    """Where the Unix socket for local clients goes: the worker's own folder (removed
    with the worker) when it is private to this user (mode 0700, as Dask makes it with
    mkdtemp) and its path short enough for a socket; else a fresh private folder of its
    own (mkdtemp: 0700), removed when this process exits."""
    folder = worker.local_directory
    path = os.path.join(folder, "kaas-link.sock")
    try:
        info = os.stat(folder)
        private = info.st_uid == os.getuid() and not info.st_mode & 0o077
    except (OSError, AttributeError):  # AttributeError: no getuid (Windows)
        private = False
    if private and len(path.encode()) < 100:
        return path
    import multiprocessing.util
    import shutil

    folder = tempfile.mkdtemp(prefix="kaas-link-")
    # Run at exit by Dask's worker processes too (multiprocessing children end with
    # os._exit, which skips plain atexit handlers).
    multiprocessing.util.Finalize(None, shutil.rmtree, args=(folder,), kwargs={"ignore_errors": True},
                                  exitpriority=0)
    return os.path.join(folder, "link.sock")
