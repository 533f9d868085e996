"""The kaas cache folder: compiled kernels on disk, so a restarted worker is warm at once.

Each framework keeps its compiled form where it knows best; this module names the folders
and points the frameworks at them before they are imported on the worker:

- OpenCL: program binaries, stored here by the OpenCL session (``opencl/``), plus PoCL's
  own kernel cache (``POCL_CACHE_DIR``);
- CuPy: its kernel cache (``CUPY_CACHE_DIR``);
- JAX: XLA's persistent compilation cache (``jax/``);
- Qiskit: transpiled circuits, pickled (``qiskit/``).

Entries are keyed by the device, the framework's version and what the compiled form is made
from (see docs/caches.md for each key), and written atomically so concurrent workers never
read half a file.
Each file starts with a header naming the cache format, its key and a checksum of its
contents: a file from another format, under the wrong name, cut short or damaged is a miss,
never a wrong answer.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def cache_root(config: dict) -> Path:
    """The kaas cache folder, as ``config`` (a config.snapshot()) sets it."""
    from . import config as kaas_config

    configured = kaas_config.get("cache.dir", config)
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

    # Bump when the key derivation or the file layout changes: older files then miss.
    FORMAT = b"kaas-disk-cache/2"

    def __init__(self, config: dict, namespace: str):
        self.folder = cache_root(config) / namespace

    @classmethod
    def key(cls, *parts: object) -> str:
        """A file name for ``parts``: SHA-256 over the cache format and each part, length
        prefixed (so no two different lists of parts give the same input, whatever
        characters they hold); bytes are taken as they are, anything else as its str()."""
        digest = hashlib.sha256(cls.FORMAT)
        for part in parts:
            data = b"b" + part if isinstance(part, bytes) else b"s" + str(part).encode("utf-8", "surrogatepass")
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
        return digest.hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / key

    def _header(self, key: str, data: bytes) -> bytes:
        return self.FORMAT + b"\n" + key.encode() + b"\n" + hashlib.sha256(data).digest()

    def load(self, key: str) -> bytes | None:
        """The bytes stored under ``key``; None when there are none, or when the file is not
        one this format wrote for this key with these contents (then it is a miss)."""
        try:
            blob = self.path(key).read_bytes()
        except OSError:
            return None
        size = len(self.FORMAT) + 1 + len(key.encode()) + 1 + hashlib.sha256().digest_size
        data = blob[size:]
        if len(blob) < size or blob[:size] != self._header(key, data):
            return None
        return data

    def store(self, key: str, data: bytes) -> None:
        tmp = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(self._header(key, data))
                f.write(data)
            os.replace(tmp, self.path(key))
            tmp = None
        except OSError:  # a read-only or full disk costs a recompile, never a failed call
            pass
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
