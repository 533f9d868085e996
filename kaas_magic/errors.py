"""Errors kaas-magic raises, and an exception's round trip from a worker to the notebook.

Each error names what went wrong (the variable, the target, the worker) and carries a
``_render_traceback_`` so IPython shows our message instead of kaas-magic's own frames.

A worker turns the exception a call raised into a payload with :func:`wrap_error` (its
class, message, attributes and the traceback from the cell on); the notebook turns the
payload back into an exception with :func:`rebuild_error`.
"""

from __future__ import annotations

import importlib
import os
import pickle
import traceback
import types
from typing import Any


class KaasError(Exception):
    """Base class of errors raised by kaas-magic itself (not by user code)."""

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}", *_cell_line(self)]


def _cell_line(exc: BaseException) -> list[str]:
    """Where in the user's cell a remote error happened (a timeout: where the cell was when
    stopped), from the frames the worker sent: one line, or none."""
    frames = [f for f in getattr(exc, "kaas_frames", None) or () if str(f[0]).startswith("<kaas")]
    if not frames:
        return []
    filename, lineno, _, text = frames[-1]
    return [f"  at {filename}, line {lineno}" + (f": {text}" if text else "")]


class CellInterrupted(KeyboardInterrupt):
    """The notebook interrupted a call (its stop button, Ctrl-C). A KeyboardInterrupt, as
    IPython and the user's own handlers expect; shown in a few lines: where the call was
    stopped and what became of its worker, not kaas's own frames."""

    def _render_traceback_(self) -> list[str]:
        return [f"KeyboardInterrupt: {self}"]


class CallCancelled(KaasError):
    """A call whose future was cancelled before it was sent: nothing ran."""


class CellSyntaxError(KaasError, ValueError):
    """A ``%%kaas`` cell that is not valid Python, shown as a normal cell's syntax error is:
    the line and the caret, no frames (a SyntaxError itself IPython shows with every frame
    of the magic). ``error`` is the original SyntaxError."""

    def __init__(self, error: SyntaxError):
        super().__init__(str(error))
        self.error = error

    def _render_traceback_(self) -> list[str]:
        return [line.rstrip("\n") for line in traceback.format_exception_only(SyntaxError, self.error)]


class OutputNotReturned(KaasError, LookupError):
    """A name the user asked for (``--out``) did not come back; the message says why. The
    names that did come back are assigned."""


class KaasUsageError(KaasError, ValueError):
    """Bad arguments: unknown target, backend or option."""


class TargetUnavailable(KaasError, LookupError):
    """No worker in the pool serves the requested target (and fallback is off)."""


class VariableNotSendable(KaasError, TypeError):
    """A variable the cell needs cannot be sent to a worker."""

    def __init__(self, name: str, value: Any, reason: str):
        self.name = name
        self.type_name = f"{type(value).__module__}.{type(value).__qualname__}"
        super().__init__(
            f"variable {name!r} of type {self.type_name} cannot be sent to the worker: "
            f"{reason}. Nothing was run. Pass the data in a sendable form "
            f"(numpy array, number, str, picklable object) or exclude it with --in."
        )


class WorkerLost(KaasError, ConnectionError):
    """The worker running a call died or became unreachable."""


class LinkBroken(KaasError, ConnectionError):
    """The direct link to a worker failed during a call while the worker itself is still in
    the pool (or a reply came that belonged to no call of ours): the link is dropped, the
    worker keeps serving, and this call's result is lost."""


class StaleHandleError(KaasError, LookupError):
    """A device handle whose buffer is gone: freed, evicted, or its worker left the pool."""


class CallTimeout(KaasError, TimeoutError):
    """A call ran past its timeout and was stopped (or its worker replaced)."""


class DeviceOutOfMemory(KaasError, MemoryError):
    """A device could not allocate what a call asked for; the worker goes on serving."""


class SchedulerUnreachable(KaasError, ConnectionError):
    """No Dask scheduler answers at the address (or it refused us: TLS, certificates)."""


class SchedulerLost(SchedulerUnreachable):
    """The Dask scheduler of a connected pool stopped answering."""


class PoolNotRunning(KaasError, RuntimeError):
    """An operation needs a pool and none is started or connected."""


class KernelError(KaasError):
    """A kernel is unknown, malformed, or could not be built."""


class KernelArgumentError(KaasError, TypeError):
    """A call's arguments do not match the kernel's signature."""


class KernelCompileError(KernelError):
    """The device compiler rejected the source; the message carries its log."""


class RemoteError(Exception):
    """A worker-side exception whose own type could not be rebuilt in the notebook."""


# --- an exception's wire form, and its rebuild --------------------------------------------


def exception_state(exc: BaseException) -> dict:
    """What it takes to rebuild ``exc`` elsewhere: its class by name, its ``args``, and every
    attribute it has, those kept in C slots (``SystemExit.code``, ``StopIteration.value``,
    ``OSError.errno``, ``UnicodeError.reason``, a class's ``__slots__``) as well as its
    ``__dict__``; each value pickled on its own, so one that cannot travel drops alone.

    Not ``pickle.dumps(exc)``: Dask installs tblib's exception pickling, whose rebuild
    loses the slot attributes."""
    cls = type(exc)
    attributes: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        for name, descriptor in vars(klass).items():
            if name.startswith("__") or name == "args":
                continue
            if isinstance(descriptor, (types.MemberDescriptorType, types.GetSetDescriptorType)):
                try:
                    value = getattr(exc, name)
                except Exception:  # noqa: BLE001 - unset (OSError.characters_written)
                    continue
                # None is every slot's default; set explicitly it would change the message
                # (OSError prints "[Errno None] None: None" once filename is set, even to None).
                if value is not None:
                    attributes[name] = value
    attributes.update(getattr(exc, "__dict__", {}))
    packed = {}
    for name, value in attributes.items():
        if isinstance(value, BaseException) or name.startswith("kaas_") or name == "_render_traceback_":
            continue
        try:
            packed[name] = pickle.dumps(value, protocol=5)
        except Exception:  # noqa: BLE001
            pass
    try:
        args = pickle.dumps(exc.args, protocol=5)
    except Exception:  # noqa: BLE001 - unpicklable arguments: their text
        args = pickle.dumps(tuple(str(a) for a in exc.args), protocol=5)
    return {"module": cls.__module__, "qualname": cls.__qualname__, "args": args, "attributes": packed}


def exception_from_state(state: dict) -> BaseException | None:
    """The exception ``exception_state`` described, of its own class when that class exists
    here (None when it does not: the caller makes a stand-in)."""
    try:
        cls: Any = importlib.import_module(state["module"])
        for part in state["qualname"].split("."):
            cls = getattr(cls, part)
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            return None
        args = pickle.loads(state["args"])
    except Exception:  # noqa: BLE001
        return None
    try:
        exc = cls(*args)
    except Exception:  # noqa: BLE001 - an __init__ of another shape: rebuilt without it
        exc = cls.__new__(cls, *args)
        exc.args = args
    set_attributes(exc, state)
    return exc


def set_attributes(exc: BaseException, state: dict) -> None:
    for name, value in state.get("attributes", {}).items():
        try:
            setattr(exc, name, pickle.loads(value))
        except Exception:  # noqa: BLE001 - read-only here, or its value's class is missing
            pass


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def wrap_error(exc: BaseException, filename: str | None, source: str | None = None,
               line_offset: int = 0, traceback_of: BaseException | None = None) -> dict:
    """What the client needs to rebuild ``exc`` (see exception_state): its type, message
    and attributes, and the traceback from the cell's first frame on. The cell's own lines
    are quoted from ``source``, this call's code: linecache holds whichever cell of that
    name this worker compiled last (another notebook's In[3], say). ``traceback_of``: the
    exception whose traceback to show instead (where a stopped cell was when it stopped)."""
    frames = traceback.extract_tb((traceback_of or exc).__traceback__)
    start = next((i for i, f in enumerate(frames) if f.filename == filename), None)
    frames = frames[start:] if start is not None else frames[-1:]
    # kaas's own frames between the cell and a kernel say nothing to the user.
    frames = [f for f in frames if not f.filename.startswith(_PACKAGE_DIR)] or frames[-1:]
    cell_lines = source.splitlines() if source is not None else None

    def line(frame) -> str | None:
        if cell_lines is None or frame.filename != filename:
            return frame.line
        index = (frame.lineno or 0) - 1 - line_offset
        return cell_lines[index].strip() if 0 <= index < len(cell_lines) else None

    cls = type(exc)
    return {
        "type": cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}",
        "message": str(exc),
        "exception_only": traceback.format_exception_only(cls, exc),
        "frames": [(f.filename, f.lineno, f.name, line(f)) for f in frames],
        "state": exception_state(exc),
    }


def rebuild_error(error: dict, *, worker: str, where: str) -> BaseException:
    """Turn a worker's error payload (see wrap_error) into an exception of the original type.

    The original exception instance is used when it unpickled; otherwise a stand-in class
    with the same name (a RemoteError subclass) so ``ename`` in a notebook still reads right.
    The remote traceback, with the cell's own line numbers, is attached both as a note (for
    plain Python) and through ``_render_traceback_`` (for IPython).
    """
    state = error.get("state")
    exc = exception_from_state(state) if state else None
    if exc is None:
        name = error["type"].rsplit(".", 1)[-1]
        exc = type(name, (RemoteError,), {"__module__": "kaas_magic.remote"})(error["message"])
        if state:
            set_attributes(exc, state)
    if isinstance(exc, KaasError):  # our own errors: the message says it all
        exc.kaas_worker = worker  # type: ignore[attr-defined]
        exc.kaas_frames = error.get("frames") or []  # type: ignore[attr-defined]
        return exc
    header = f"{error['type'].rsplit('.', 1)[-1]} on worker {worker}" + (f" ({where})" if where else "")
    frames = error.get("frames") or []
    tb_lines = ["Traceback (most recent call last):\n"] if frames else []
    tb_lines += traceback.format_list([tuple(f) for f in frames])
    message = "".join(error.get("exception_only") or [f"{error['type']}: {error['message']}\n"])
    rendered = [header, *(["".join(tb_lines).rstrip("\n")] if tb_lines else []), message.rstrip("\n")]
    try:
        exc._render_traceback_ = lambda: rendered  # type: ignore[attr-defined]
        exc.kaas_worker = worker  # type: ignore[attr-defined]
        exc.kaas_frames = frames  # type: ignore[attr-defined]
        exc.add_note(f"(raised on kaas worker {worker}" + (f", {where}" if where else "") + ")\n"
                     + "".join(tb_lines).rstrip("\n"))
    except (AttributeError, TypeError):  # exceptions with __slots__ and no __dict__
        pass
    return exc


rebuild_remote_exception = rebuild_error  # an alias: kaas_magic.client imports this name
