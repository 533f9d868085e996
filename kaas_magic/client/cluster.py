"""Making a pool's Dask client: an embedded LocalCluster, or a connection to a scheduler."""

from __future__ import annotations

import gc
import weakref

from .. import config as kaas_config
from .. import pool_log
from ..errors import KaasError, SchedulerUnreachable
from ..stopping import check_count

# Embedded pools this process started: scheduler address -> a weak reference to the
# cluster, whose certificates (in memory only) let Pool.connect reach it too.
embedded_clusters: dict = {}


def start_cluster(n_workers: int | None = None, **cluster_kwargs):
    """(client, cluster) of a new embedded LocalCluster: see Pool.start."""
    import dask.config
    from distributed import Client

    if n_workers is None:
        n_workers = kaas_config.get("pool.n-workers")
    n_workers = check_count(n_workers, "n_workers", 1, 1024, "workers of one embedded pool")
    cluster_kwargs.setdefault("threads_per_worker", 1)
    cluster_kwargs.setdefault("memory_limit", kaas_config.get("pool.memory-limit"))
    # Loopback only: whoever reaches the pool can run code on it.
    cluster_kwargs.setdefault("dashboard_address", "127.0.0.1:0")
    cluster_kwargs.setdefault("worker_dashboard_address", "127.0.0.1:0")
    # And only this user: any local user can reach 127.0.0.1, so the scheduler, nannies,
    # workers, this client and kaas's direct links all require certificates made for this
    # pool alone (Dask's Security.temporary(), in memory: never written where others read).
    if "security" not in cluster_kwargs:
        _secure(cluster_kwargs)
    # The workers end with this process (a kernel restart, a crash), even one stuck in C
    # code: their supervisors watch this pid, handed on by the nannies (see supervisor).
    from ..supervisor import owner_environment

    cluster_kwargs["env"] = {**(cluster_kwargs.get("env") or {}), **owner_environment()}
    # The pool's log (see pool_log), open before anything starts: Dask's log lines in this
    # process go there, not to the cell; each worker process points its fd 1 and 2 at a file
    # in its folder as it starts (pool_log is the workers' preload: it runs before plugins).
    log = pool_log.open_log(embedded=True)
    if log.worker_output:
        cluster_kwargs["env"].update(log.worker_environment())
        preload = cluster_kwargs.get("preload") or dask.config.get("distributed.worker.preload", [])
        preload = [preload] if isinstance(preload, str) else list(preload)
        cluster_kwargs["preload"] = [pool_log.PRELOAD, *preload]
        argv = cluster_kwargs.get("preload_argv")
        if argv and isinstance(argv[0], list):  # one list per preload: ours takes none
            cluster_kwargs["preload_argv"] = [[], *argv]
    # Nannies hand their config to the worker processes they start (and restart).
    profiler = bool(kaas_config.get("pool.worker-profiler"))
    try:
        with dask.config.set({"distributed.worker.profile.enabled": profiler}):
            cluster = _local_cluster_class()(
                n_workers=n_workers, processes=True, host="127.0.0.1", **cluster_kwargs
            )
        client = Client(cluster, security=getattr(cluster, "security", None), set_as_default=False)
    except BaseException:
        log.close()
        raise
    log.address = cluster.scheduler_address
    pool_log.adopt(client, log)
    for address, ref in list(embedded_clusters.items()):  # forget the collected ones
        if ref() is None:
            embedded_clusters.pop(address, None)
    embedded_clusters[cluster.scheduler_address] = weakref.ref(cluster)
    return client, cluster


def _local_cluster_class():
    """LocalCluster, except that a nanny is never closed because its worker left the scheduler.

    Dask's SpecCluster closes a lost worker's nanny ``distributed.deploy.lost-worker-timeout``
    (15 s) after the worker's removal unless a worker of the same name is registered at that
    very moment (meant for batch jobs that never come back). A nanny here restarts its worker
    itself (the supervisor's kill relies on it), so a worker killed twice within 15 s had its
    nanny closed while the second replacement was starting, and the pool lost a worker for
    good. A nanny that cannot restart its worker closes itself; scaling down and autoscaling
    close nannies through the cluster's spec, which this leaves alone."""
    from distributed import LocalCluster
    from distributed.deploy.cluster import Cluster

    class KaasLocalCluster(LocalCluster):
        def _update_worker_status(self, op, msg):
            if op == "remove":  # the bookkeeping only, without the delayed close
                Cluster._update_worker_status(self, op, msg)
            else:
                super()._update_worker_status(op, msg)

    return KaasLocalCluster


def _secure(cluster_kwargs: dict) -> None:
    """kaas.pool.security: temporary (the default) gives the cluster mutual TLS."""
    mode = kaas_config.get("pool.security")
    mode = "none" if mode in (None, False) else str(mode).strip().lower()
    if mode == "temporary":
        from distributed.security import Security

        try:
            cluster_kwargs["security"] = Security.temporary()
        except ImportError as e:
            raise KaasError(
                "the embedded pool's TLS certificates need the `cryptography` package: "
                "pip install cryptography (or set kaas.pool.security: none, and then any "
                "user of this machine can run code as you through the pool)") from e
        cluster_kwargs.setdefault("protocol", "tls://")
    elif mode != "none":
        raise KaasError(f"kaas.pool.security must be 'temporary' or 'none', not {mode!r}")


def connect_client(address: str, security=None, timeout: float = 30):
    """A Dask client of the scheduler at ``address``: see Pool.connect."""
    from distributed import Client

    if security is None:  # an embedded pool of this process: with its own certificates
        cluster = embedded_clusters.get(address, lambda: None)()
        security = getattr(cluster, "security", None)
    failure = None
    log = pool_log.open_log(embedded=False, address=address)  # this process's Dask lines: see pool_log
    log.worker_directory = pool_log.worker_directory_of(address)  # an embedded pool of this process
    try:
        client = Client(address, security=security, timeout=timeout, set_as_default=False)
    except Exception as e:
        hint = ""
        if address.startswith("tls://"):
            hint = (" A tls:// scheduler needs security=distributed.security.Security(tls_ca_file=..., "
                    "tls_client_cert=..., tls_client_key=...) with a certificate its CA signed.")
        failure = SchedulerUnreachable(
            f"could not connect to the Dask scheduler at {address}: {type(e).__name__}: {e}.{hint}")
        failure.__cause__ = e.with_traceback(None)
    except BaseException:
        log.close()
        raise
    if failure is not None:
        log.close()
        # The half-made Client is garbage now. Collect it here: its __del__ takes the lock
        # of Dask's shared loop runner, and run later by chance (during the next Client's
        # start, which holds that lock) it would deadlock.
        gc.collect()
        raise failure
    pool_log.adopt(client, log)
    return client
