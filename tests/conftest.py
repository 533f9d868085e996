"""Shared fixtures: one real embedded pool (LocalCluster of worker processes) per session,
and an in-process IPython shell with the extension loaded."""

from __future__ import annotations

import os

import pytest

# Workers inherit the environment: keep JAX off any GPU memory grab in tests.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """A kaas cache folder of the test session's own, so "compiled" vs "disk" is known."""
    import dask.config

    from kaas_magic import config

    config.get("cache")  # merges kaas.yaml into Dask's config first
    path = tmp_path_factory.mktemp("kaas-cache")
    dask.config.set({"kaas.cache.dir": str(path)})
    return path


@pytest.fixture(scope="session")
def pool(cache_dir):
    import kaas_magic
    from kaas_magic.client import Pool

    pool = Pool.start(2)
    pool.wait_ready(timeout=240)
    kaas_magic.use_pool(pool)  # the magics use the same pool
    yield pool
    kaas_magic.use_pool(None)
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


class StandInCudaDevice:
    """``cupy.cuda.Device`` for tests that put a stand-in ``cupy`` in place (no GPU here):
    a context manager that does nothing."""

    def __init__(self, index):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def mandelbrot_reference(width, height, x0, x1, y0, y1, max_iter):
    """The library's mandelbrot kernel, in NumPy with the same float32 arithmetic."""
    import numpy as np

    xs = np.float32(x0) + np.float32(x1 - x0) * np.arange(width, dtype=np.float32) / np.float32(width)
    ys = np.float32(y0) + np.float32(y1 - y0) * np.arange(height, dtype=np.float32) / np.float32(height)
    c = xs[None, :].astype(np.complex64) + 1j * ys[:, None].astype(np.complex64)
    z, counts = np.zeros_like(c), np.zeros(c.shape, np.int32)
    for _ in range(max_iter):
        alive = np.abs(z) ** 2 <= 4
        z = np.where(alive, z * z + c, z)
        counts += alive
    return counts
