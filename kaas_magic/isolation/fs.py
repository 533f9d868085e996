"""The working directory and umask: the link thread's own, with ``unshare(CLONE_FS)``
(Linux); moved back to the worker's only when a cell moved it."""

from __future__ import annotations

import ctypes
import os
import sys
import threading

from .calls import _current, logger

CLONE_FS = 0x00000200

_fs_private_ok = False
_base_fd: int | None = None
_base_umask = 0o022
_unshare = None


def _probe_unshare() -> bool:
    """Whether unshare(CLONE_FS) works here, tried in a throwaway thread."""
    global _unshare
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        _unshare = libc.unshare
    except (OSError, AttributeError):
        return False
    result = []
    probe = threading.Thread(target=lambda: result.append(_unshare(CLONE_FS) == 0), name="kaas-unshare-probe")
    probe.start()
    probe.join()
    return bool(result and result[0])


def _own_working_directory() -> list | None:
    """The calling link thread's own working directory, at the worker's and with its umask
    (None where threads cannot have their own). Moved back only when a cell moved it (chdir
    and umask are watched): two system calls less per call."""
    if not _fs_private_ok:
        return None
    fs = _current.fs
    if fs is None:
        if _unshare(CLONE_FS) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_FS) failed")
        fs = _current.fs = [True]
    if fs[0]:
        os.fchdir(_base_fd)
        os.umask(_base_umask)
        fs[0] = False
    return fs


def _watch_working_directory() -> None:
    """os.chdir, os.fchdir and os.umask inside a call mark its link thread's directory moved."""
    for name in ("chdir", "fchdir", "umask"):
        function = getattr(os, name, None)
        if function is None or getattr(function, "_kaas", False):
            continue

        def watched(*args, _function=function, **kwargs):
            call = _current.call
            if call is not None and call.fs is not None:
                call.fs[0] = True
            return _function(*args, **kwargs)

        watched._kaas = True
        watched.__wrapped__ = function
        watched.__name__, watched.__doc__ = function.__name__, function.__doc__
        setattr(os, name, watched)


def _setup() -> None:
    """At install: whether each call gets its own working directory, and the worker's
    directory (an open descriptor) and umask it starts in."""
    global _fs_private_ok, _base_fd, _base_umask
    _fs_private_ok = _probe_unshare()
    if _fs_private_ok:
        _base_fd = os.open(os.getcwd(), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        os.set_inheritable(_base_fd, False)
        _base_umask = os.umask(0o022)
        os.umask(_base_umask)
        _watch_working_directory()
    else:
        logger.info("kaas: unshare(CLONE_FS) is unavailable; the working directory is restored after calls")


def fs_isolated() -> bool:
    """Whether each call has its own working directory (else it is restored after calls)."""
    return _fs_private_ok
