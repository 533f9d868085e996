"""The folders: the folder of pool-log folders (:func:`base_directory`: ``kaas.pool.log.dir``,
else a private folder of this user under the temporary folder), a new folder per pool
(:func:`new_pool_directory`), removing old ones (:func:`prune`), the names of the files in
them, and the ``kaas.pool.log.records`` setting.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
import uuid
from pathlib import Path

from .. import config as kaas_config  # cheap: Dask's config is read only when asked
from .records import _DEFAULT_RECORDS

# Set by the embedded pool in its workers' environment (through the nannies): their folder.
ENV_DIR = "KAAS_POOL_LOG_DIR"
KERNEL_FILE = "pool.log"
WORKER_PREFIX = "worker-"
REMOTE_FOLDER = "remote"  # workers of pools not embedded here: <dir>/remote/worker-<pid>.log


def _records_setting() -> int:
    try:
        n = int(kaas_config.get("pool.log.records"))
    except (TypeError, ValueError):
        n = _DEFAULT_RECORDS
    return max(1, n)


def _private_dir(path: Path) -> bool:
    """Whether ``path`` is a real folder of this user that no one else can write or read."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        return False
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return False
    return not st.st_mode & 0o077


def base_directory(snapshot=None) -> Path:
    """The folder of pool-log folders: ``kaas.pool.log.dir``, else ``<tmp>/kaas-magic-<uid>/logs``
    (a folder of this user only; if that name is taken by someone else, a fresh private one)."""
    configured = kaas_config.get("pool.log.dir", snapshot)
    if configured:
        base = Path(os.path.expanduser(str(configured)))
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
        return base
    user = str(os.getuid()) if hasattr(os, "getuid") else (os.environ.get("USERNAME") or "user")
    top = Path(tempfile.gettempdir()) / f"kaas-magic-{user}"
    try:
        top.mkdir(mode=0o700, exist_ok=True)
    except OSError:
        pass
    if not _private_dir(top):  # another user made it first (or a link): never write there
        return Path(tempfile.mkdtemp(prefix="kaas-magic-logs-"))
    base = top / "logs"
    base.mkdir(mode=0o700, exist_ok=True)
    return base


def prune(base: Path, keep_days: float) -> None:
    """Remove pool-log folders (and remote workers' files) not written for ``keep_days``."""
    if keep_days is None or keep_days < 0:
        return
    limit = time.time() - float(keep_days) * 86400
    from .logs import _open, _registry_lock  # here, not above: logs imports this module

    with _registry_lock:
        ours = {log.directory for log in _open}
    for p in base.glob("pool-*"):
        try:
            if p in ours or p.is_symlink() or not p.is_dir():
                continue
            newest = max([p.stat().st_mtime] + [f.stat().st_mtime for f in p.iterdir()])
            if newest < limit:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            continue
    for f in (base / REMOTE_FOLDER).glob(f"{WORKER_PREFIX}*.log"):
        try:
            if f.stat().st_mtime < limit:
                f.unlink()
        except OSError:
            continue


def new_pool_directory() -> Path:
    base = base_directory()
    try:
        prune(base, float(kaas_config.get("pool.log.keep-days")))
    except (TypeError, ValueError):
        pass
    name = f"pool-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    directory = base / name
    directory.mkdir(mode=0o700)
    return directory
