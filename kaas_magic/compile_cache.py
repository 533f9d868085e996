"""The kaas cache folder: compiled kernels on disk, so a restarted worker is warm at once.

Each framework keeps its compiled form where it knows best; this module names the folders
and points the frameworks at them before they are imported on the worker:

- OpenCL: program binaries, stored here by the OpenCL session (``opencl/``), plus PoCL's
  own kernel cache (``POCL_CACHE_DIR``);
- CuPy: its kernel cache (``CUPY_CACHE_DIR``);
- JAX: XLA's persistent compilation cache (``jax/``);
- Qiskit: transpiled circuits, pickled (``qiskit/``).

Entries are keyed by the device, the framework's version and the kernel's digest (source,
signature, build options), and written atomically so concurrent workers never read half a file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def cache_root(config: dict) -> Path:
    configured = (config.get("cache") or {}).get("dir")
    if configured:
        return Path(os.path.expanduser(str(configured)))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kaas-magic"


def prepare_environment(config: dict) -> Path:
    """Point the frameworks' own caches into the kaas cache folder. Call on the worker,
    before any framework is imported; settings the user made in the environment win."""
    root = cache_root(config)
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("CUPY_CACHE_DIR", str(root / "cupy"))
    os.environ.setdefault("POCL_CACHE_DIR", str(root / "pocl"))
    return root


class DiskCache:
    """Bytes on disk under ``<root>/<namespace>/``, by key."""

    def __init__(self, config: dict, namespace: str):
        self.folder = cache_root(config) / namespace

    @staticmethod
    def key(*parts: object) -> str:
        return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:40]

    def path(self, key: str) -> Path:
        return self.folder / key

    def load(self, key: str) -> bytes | None:
        try:
            return self.path(key).read_bytes()
        except OSError:
            return None

    def store(self, key: str, data: bytes) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path(key))
        except OSError:  # a read-only or full disk costs a recompile, never a failed call
            pass
