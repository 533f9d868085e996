"""Shared fixtures: one real embedded pool (LocalCluster of worker processes) per session,
and an in-process IPython shell with the extension loaded."""

from __future__ import annotations

import os

import pytest

# Workers inherit the environment: keep JAX off any GPU memory grab in tests.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


@pytest.fixture(scope="session")
def pool():
    import kaas_magic
    from kaas_magic.client import Pool

    pool = Pool.start(2)
    pool.wait_ready(timeout=240)
    kaas_magic._pool = pool  # the magics use the same pool
    yield pool
    kaas_magic._pool = None
    pool.close()


@pytest.fixture(scope="session")
def shell(pool):
    from IPython.testing.globalipapp import start_ipython

    ip = start_ipython()
    ip.extension_manager.load_extension("kaas_magic")
    return ip


@pytest.fixture
def ip(shell):
    """The shell, with the user namespace cleaned of test variables afterwards."""
    before = set(shell.user_ns)
    yield shell
    for name in set(shell.user_ns) - before:
        shell.user_ns.pop(name, None)


def cuda_available() -> bool:
    try:
        import cupy
    except ImportError:
        return False
    try:
        return bool(cupy.cuda.is_available())
    except Exception:
        return False


requires_gpu = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU and CuPy; none here")
