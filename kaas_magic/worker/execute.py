"""One call on a worker: a request in, a reply out.

Runs in the thread serving the caller's link once the device's turn has come: builds the
cell's namespace (a module of its own, the inputs unpacked, handles resolved to the
buffers they name), runs the cell or the kernel, and sends home what it assigned, within
the transfer limits; results asked to stay are kept as device buffers.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import functools
import linecache
import random
import sys
import threading
import time
import types
from typing import Any

import cachetools
import numpy as np

from .. import isolation, protocol, serial, shared_frames
from ..backends.base import Session
from ..buffer_store import BufferStore
from ..call_stream import CallStream
from ..cellcode import padded
from ..containers import map_containers
from ..errors import DeviceOutOfMemory, KaasError, wrap_error
from ..handles import HandleRef, is_array
from ..isolation import report_state
from ..protocol import CallRequest, ErrorInfo, Reply, Timings
from ..stopping import RunningCall, StopCall, stop_error
from . import display as _display
from .convert import convert
from .kernel_library import KernelLibrary
from .kernel_namespace import KernelNamespace


class Executor:
    def __init__(self, worker, sessions: dict[str, Session], buffers: BufferStore, library: KernelLibrary,
                 max_value_bytes: int, max_message_bytes: int):
        self.worker = worker
        self.sessions = sessions  # the runtime's, filled in as backends warm up
        self.buffers = buffers
        self.library = library
        self.max_value_bytes = max_value_bytes  # kaas.transfer.max-bytes
        self.max_message_bytes = max_message_bytes  # kaas.transfer.max-message-bytes
        self._code_cache: cachetools.LRUCache = cachetools.LRUCache(512)  # under _code_lock
        self._code_lock = threading.Lock()

    def execute(self, session: Session, msg: CallRequest, output: CallStream, call: RunningCall) -> Reply:
        """The reply to ``msg``, run on ``session``'s device; print output goes to ``output``."""
        t0 = time.perf_counter()
        t1 = None
        timings: Timings = {"warm_wait": 0.0, "queue": 0.0, "setup": 0.0, "execute": 0.0, "to_host": 0.0}
        outputs: dict[str, Any] = {}
        skipped: dict[str, str] = {}
        kept: dict[str, Any] = {}
        conversions: list[dict] = []  # kept buffers of another backend converted (see convert)
        error = None
        kernels = None
        client = msg.get("client", "")
        scope = isolation.call_scope(output.write, bool(msg.get("progress"))).enter()
        try:
            if call.reason is not None:  # cancelled while it waited for its turn
                raise StopCall()
            report_state("running")
            with session.activate():
                kernels = KernelNamespace(self.library, session, msg.get("kernels") or (), self.worker)
                namespace, module, code = self._namespace(session, msg, call, kernels, client, conversions)
                t1 = time.perf_counter()
                timings["setup"] = t1 - t0
                try:
                    self._run(session, msg, call, kernels, namespace, module, code)
                finally:
                    call.leave_user_code()
                    _display.end_call(render=call.reason is None)  # the figures it left open: shown, closed
                    t2 = time.perf_counter()
                    timings["execute"] = t2 - t1
                self._collect(session, msg, namespace, client, outputs, skipped, kept)
                timings["to_host"] = time.perf_counter() - t2
        except BaseException as e:
            error = self._error(e, session, msg, call)
            if t1 is None:
                timings["setup"] = time.perf_counter() - t0
        finally:
            scope.exit()  # what the cell changed of the process is put back (see isolation)
        if error is not None:  # a failed call keeps nothing
            self.buffers.free(client, [m["id"] for v in kept.values() for m in (v if isinstance(v, list) else [v])])
            kept = {}
        return protocol.reply(error, timings, outputs, skipped, kept, kernels.states if kernels else {},
                              conversions=conversions)

    def _namespace(self, session: Session, msg: CallRequest, call: RunningCall, kernels: KernelNamespace,
                   client: str, conversions: list | None = None
                   ) -> tuple[dict, types.ModuleType | None, types.CodeType | None]:
        """The names the call runs with: for a cell, its module's namespace with the
        session's names, ``kernels`` and ``to_device``; then the inputs, handles resolved."""
        module = code = None
        if msg.get("op", "run") == "run":  # a cell, in a module of its own that libraries can look up
            code = self._compile(msg["code"], msg["filename"], msg.get("line_offset", 0), bool(msg.get("value")))
            module = _cell_module(call.id)
            namespace = module.__dict__
            namespace.update(session.namespace())
            namespace["kernels"] = kernels
            namespace["to_device"] = session.to_device
            _display.install()  # display(), IPython.display, matplotlib figures (see worker.display)
            namespace.update(_display.names())
        else:  # an operation of kaas's own: its inputs by name, nothing else
            namespace = {}
        # A kernel whose launch only reads its inputs may take them read-only, in place
        # (results sent back by reference); a cell gets arrays of its own.
        read_only_ok = msg.get("op") == "call" and kernels._launch_only_reads(msg["kernel"])
        for name, packed in msg["inputs"].items():
            namespace[name] = self._resolve_handles(self._unpack(name, packed, read_only_ok), client, session, name,
                                                    conversions)
        return namespace, module, code

    @staticmethod
    def _run(session: Session, msg: CallRequest, call: RunningCall, kernels: KernelNamespace, namespace: dict,
             module: types.ModuleType | None, code: types.CodeType | None) -> None:
        """The user's code, and its device work finished: outputs synchronised when they
        stay, else copied home with it."""
        call.enter_user_code()
        # A kernel call whose results all go home: a large one may be made, or copied from
        # the device, straight into shared memory of the caller's link (see shared_frames).
        goes_home = msg.get("op") == "call" and not msg.get("keep")
        with shared_frames.results_go_home() if goes_home else contextlib.nullcontext():
            if module is not None:  # a cell
                # Registered while it runs (dataclasses, typing and pickle look a class's
                # module up by name), gone after: nothing outlives the call.
                sys.modules[module.__name__] = module
                try:
                    exec(code, namespace)
                finally:
                    sys.modules.pop(module.__name__, None)
            else:  # checked to be one of these on arrival (see WorkerRuntime.handle_call)
                _OPERATIONS[msg["op"]](session, msg, kernels, namespace)
            names = [n for n in _output_names(msg, namespace) if n in namespace]
            if msg.get("keep"):
                session.synchronize([namespace[n] for n in names])
            else:  # the device's work and the copies home, waited for at once
                namespace.update(zip(names, session.download([namespace[n] for n in names])))
        call.leave_user_code()

    def _collect(self, session: Session, msg: CallRequest, namespace: dict, client: str, outputs: dict,
                 skipped: dict, kept: dict) -> None:
        """The outputs into ``outputs`` (packed), ``kept`` (handles) or ``skipped`` (why not)."""
        sent = 0  # bytes of outputs going home: bounded like the link (kaas.transfer)
        for name in _output_names(msg, namespace):
            if name not in namespace:
                if msg.get("outputs_explicit"):
                    skipped[name] = "the cell did not assign it"
                continue
            if msg.get("keep") and _keepable(namespace[name]):
                kept[name] = self._keep(namespace[name], client, session)
                continue
            try:
                packed = serial.dumps(self.to_host(namespace[name], session))
            except Exception as e:
                value = namespace[name]
                if name == protocol.CELL_VALUE:  # shown, not used: its repr says what it is
                    packed = serial.dumps(_value_repr(value))
                    outputs[name] = packed
                    sent += serial.nbytes(packed)
                    continue
                skipped[name] = (
                    f"{type(value).__module__}.{type(value).__qualname__} cannot leave "
                    f"the worker ({type(e).__name__})"
                )
                continue
            size = serial.nbytes(packed)
            if size > self.max_value_bytes or sent + size > self.max_message_bytes:
                skipped[name] = self._too_large(name, namespace[name], size, sent, client, session, kept)
                continue
            outputs[name] = packed
            sent += size

    def _error(self, exc: BaseException, session: Session, msg: CallRequest, call: RunningCall) -> ErrorInfo:
        """The reply's error: why a stopped call stopped, not where it was hit; a device out
        of memory said as such; else the exception with the cell's traceback."""
        stopped_at = None
        if call.reason is not None:  # its traceback still says where the cell was stopped
            exc, stopped_at = stop_error(call, self.worker.address, replaced=False), exc
        elif _is_out_of_memory(exc):
            exc = _out_of_memory_error(exc, session)
        return wrap_error(exc, msg["filename"], msg.get("code"), msg.get("line_offset", 0), traceback_of=stopped_at)

    def _compile(self, source: str, filename: str, line_offset: int, value: bool = False):
        key = (source, filename, line_offset, value)
        with self._code_lock:
            code = self._code_cache.get(key)
            if code is not None:
                return code
        text = padded(source, line_offset)
        # dont_inherit: the cell gets exactly its own __future__ imports, as in the notebook,
        # never this module's (``annotations`` would turn its annotations into strings).
        code = compile(_value_kept(ast.parse(text, filename)) if value else text, filename, "exec", dont_inherit=True)
        # Lets tracebacks on this worker quote the cell's lines.
        linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
        with self._code_lock:
            self._code_cache[key] = code
        return code

    def _too_large(self, name: str, value: Any, size: int, sent: int, client: str, session: Session,
                   kept: dict) -> str:
        """An output over kaas.transfer.max-bytes (or one that would take the reply past
        max-message-bytes) does not go home, where it could take the notebook's kernel down
        for memory: an array stays here as a handle, anything else is dropped; either way the
        notebook is told its name and size."""
        if size > self.max_value_bytes:
            why = f"{name!r} is {size:,} bytes, over the transfer limit of {self.max_value_bytes:,} (kaas.transfer.max-bytes)"
        else:
            why = (f"{name!r} ({size:,} bytes) would take this reply past {self.max_message_bytes:,} bytes "
                   f"(kaas.transfer.max-message-bytes; {sent:,} bytes of other outputs go home)")
        if _keepable(value):
            kept[name] = self._keep(value, client, session)
            return f"{why}: it stays on worker {self.worker.address} as a DeviceHandle; bring home pieces of it"
        return f"{why}: it was not sent"

    def _unpack(self, name: str, packed: serial.Packed, read_only_ok: bool = False) -> Any:
        try:
            return serial.loads(packed, read_only_ok)
        except Exception as e:
            raise KaasError(
                f"variable {name!r} could not be rebuilt on worker {self.worker.address}: {type(e).__name__}: {e}. "
                f"Nothing was run. The worker needs the packages (and versions) the notebook has for it."
            ) from None

    # -- data kept on the device between calls --

    def _resolve_handles(self, value: Any, client: str, session: Session, name: str = "",
                         conversions: list | None = None) -> Any:
        """Inputs that are handles become the kept device buffers they name, in place. A
        buffer kept by another backend (session) becomes this session's array on the worker,
        through DLPack where it can (see convert; each conversion added to ``conversions``);
        one kept on another physical device is refused, naming the variable."""

        def resolve(v: Any) -> Any:
            if not isinstance(v, HandleRef):
                return v
            kept = self.buffers.get(client, v.id)
            if kept.device_id == session.device_id:
                return kept.value
            source = self._session_of(kept.device_id)
            if source is None:  # its session is gone (cannot happen while the worker lives)
                return self.to_host(kept.value, session)
            value, conversion = convert(kept.value, name, source, session)
            if conversion is not None and conversions is not None:
                conversions.append(conversion)
            return value

        return map_containers(value, resolve)

    def _session_of(self, device_id: str) -> Session | None:
        return next((s for s in list(self.sessions.values()) if s.device_id == device_id), None)

    def _keep(self, value: Any, client: str, session: Session) -> dict | list:
        if isinstance(value, (list, tuple)):
            return [self._keep(v, client, session) for v in value]
        # Random, so that a restarted worker's ids never match a dead one's handles; not
        # from os.urandom, a slow system call on some VMs (ids are namespaced per client).
        id = f"{random.getrandbits(128):032x}"
        self.buffers.put(client, id, value, session.device_id)
        return {"id": id, "shape": list(value.shape), "dtype": _type_name(value.dtype), "nbytes": int(value.nbytes),
                "type": _type_name(type(value))}

    def to_host(self, value: Any, session: Session) -> Any:
        """Device arrays of any backend on this worker (a cell may call kernels of another
        backend than its own) become host arrays."""
        if type(value) in _HOST_TYPES:  # the usual case (downloaded already): nothing to convert
            return value
        value = session.to_host(value)
        for other in {type(s): s for s in self.sessions.values()}.values():
            if type(other) is not type(session):
                value = other.to_host(value)
        return value

    # -- many small calls as one (Pool.map) --

    def execute_batch(self, session: Session, msg: CallRequest, output: CallStream, call: RunningCall) -> Reply:
        """A "batch" (Pool.map): its items, each one small call, run in turn as ONE call
        (one device turn, one timeout, one isolation scope). What every item shares is done
        once: the scope, the device's activation, ``kernels``, the code's compile and its
        base namespace. Per item only: unpack its inputs, run it, bring the result home and
        pack it. An item's exception is that item's error and the loop goes on; a stop
        (interrupt, cancel, timeout) ends the batch, the items left reported as not run."""
        t0 = time.perf_counter()
        timings: Timings = {"warm_wait": 0.0, "queue": 0.0, "setup": 0.0, "execute": 0.0, "to_host": 0.0}
        items = msg.get("items") or []
        results: list[protocol.BatchItem] = []
        error = None
        kernels = None
        conversions: list[dict] = []
        client = msg.get("client", "")
        kernel = msg.get("kernel")
        t1 = None
        scope = isolation.call_scope(output.write, False).enter()
        try:
            if call.reason is not None:  # cancelled while it waited for its turn
                raise StopCall()
            with session.activate():
                kernels = KernelNamespace(self.library, session, msg.get("kernels") or (), self.worker)
                run_item = (_batch_kernel(kernels, kernel) if kernel is not None
                            else self._batch_code(session, msg, kernels))
                t1 = time.perf_counter()
                timings["setup"] = t1 - t0
                try:
                    self._run_batch(session, msg, call, client, items, run_item, results, conversions)
                finally:
                    _display.end_call(render=call.reason is None)  # figures left open: shown, closed
        except BaseException as e:  # a stop, or a failure of what the items share
            error = self._error(e, session, msg, call)
        finally:
            scope.exit()
            t2 = time.perf_counter()
            if t1 is None:
                timings["setup"] = t2 - t0
            else:
                timings["execute"] = t2 - t1
        if error is None and call.reason is not None and len(results) < len(items):
            error = self._error(StopCall(), session, msg, call)
        results.extend({"ok": False, "not_run": True} for _ in range(len(items) - len(results)))
        return protocol.reply(error, timings, {protocol.BATCH_RESULTS: results},
                              kernels=kernels.states if kernels else {}, conversions=conversions)

    def _batch_code(self, session: Session, msg: CallRequest, kernels: KernelNamespace):
        """A code batch's item runner: the code compiled once (its final expression's value
        kept), each item run in a fresh copy of one base namespace. Its result: that value,
        else the names it assigned (``outputs``) that it did assign."""
        code = self._compile(msg["code"], msg["filename"], msg.get("line_offset", 0), True)
        base = dict(session.namespace())
        base.update(__builtins__=builtins, __name__="__kaas_map__", kernels=kernels, to_device=session.to_device)
        _display.install()  # as in a cell: display() and figures reach the caller
        base.update(_display.names())
        names = list(msg.get("outputs") or ())
        value_name = protocol.CELL_VALUE

        def run_item(inputs: dict) -> Any:
            namespace = base.copy()
            namespace.update(inputs)
            exec(code, namespace)
            if value_name in namespace:
                return namespace[value_name]
            return {n: namespace[n] for n in names if n in namespace}

        return run_item

    def _run_batch(self, session: Session, msg: CallRequest, call: RunningCall, client: str, items: list,
                   run_item, results: list, conversions: list | None = None) -> None:
        """The items in turn, each result packed into ``results`` (see execute_batch)."""
        sent = 0
        resolve, unpack, to_host, dumps, nbytes = (self._resolve_handles, self._unpack, self.to_host, serial.dumps,
                                                   serial.nbytes)
        for packed_inputs in items:
            if call.reason is not None:
                return
            try:
                inputs = {name: resolve(unpack(name, p), client, session, name, conversions)
                          for name, p in packed_inputs.items()}
                call.enter_user_code()
                try:
                    (value,) = session.download([run_item(inputs)])
                finally:
                    call.leave_user_code()
                packed = dumps(to_host(value, session))
                size = nbytes(packed)
                if size > self.max_value_bytes or sent + size > self.max_message_bytes:
                    raise KaasError(f"the item's result is {size:,} bytes: over the transfer limits "
                                    f"(kaas.transfer.max-bytes, max-message-bytes); it was not sent")
                sent += size
                results.append({"ok": True, "value": packed})
            except StopCall:
                raise
            except Exception as e:  # this item's error; the batch goes on
                results.append({"ok": False, "error": self._error(e, session, msg, call)})


def failed_reply(exc: BaseException, execute: float = 0.0, worker_exiting: bool = False) -> Reply:
    """The reply of a call that ended before or instead of running its code."""
    timings: Timings = {"warm_wait": 0.0, "queue": 0.0, "setup": 0.0, "execute": execute, "to_host": 0.0}
    return protocol.reply(wrap_error(exc, None), timings, worker_exiting=worker_exiting)


# -- the operations other than a cell: each a function, run as the user's code is (under
# the call's timeout and isolation scope, its print output the caller's), its result an
# output like a cell's (kept, sent home, or skipped the same way) --


def _call(session: Session, msg: CallRequest, kernels: KernelNamespace, namespace: dict) -> None:
    """kaas.call: one kernel, its arguments the inputs by parameter name."""
    namespace[protocol.CALL_RESULT] = kernels._invoke(msg["kernel"], namespace)


def _put(session: Session, msg: CallRequest, kernels: KernelNamespace, namespace: dict) -> None:
    """Pool.put: a host array onto the device (kept there: the request says keep)."""
    namespace[protocol.PUT_KEPT] = session.to_device(namespace[protocol.PUT_VALUE])


def _fetch(session: Session, msg: CallRequest, kernels: KernelNamespace, namespace: dict) -> None:
    """Pool.fetch: a kept buffer (its handle resolved with the inputs), on its way home."""
    namespace[protocol.FETCH_VALUE] = namespace[protocol.FETCH_HANDLE]


def _compile_kernel(session: Session, msg: CallRequest, kernels: KernelNamespace, namespace: dict) -> None:
    """Pool.register: the kernel compiled (or loaded) here, and how."""
    namespace[protocol.COMPILE_HOW] = kernels._compile(msg["kernel"])


_OPERATIONS = {"call": _call, "put": _put, "fetch": _fetch, "compile": _compile_kernel}
assert set(_OPERATIONS) | {"run", "batch"} == protocol.OPS


def _batch_kernel(kernels: KernelNamespace, name: str):
    """A kernel batch's item runner: kernel ``name`` with the item's arguments."""
    invoke = kernels._invoke
    return lambda inputs: invoke(name, inputs)


def _output_names(msg: CallRequest, namespace: dict) -> list[str]:
    """The names a call sends home: those asked for, and the cell's value when it has one."""
    if msg.get("value") and protocol.CELL_VALUE in namespace:
        return [*msg["outputs"], protocol.CELL_VALUE]
    return msg["outputs"]


def _value_kept(tree: ast.Module) -> ast.Module:
    """A cell whose last statement is an expression, with that expression's value assigned
    to CELL_VALUE, as IPython keeps a cell's value (line numbers unchanged)."""
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = tree.body[-1]
        tree.body[-1] = ast.copy_location(
            ast.Assign(targets=[ast.Name(protocol.CELL_VALUE, ast.Store())], value=last.value), last)
        ast.fix_missing_locations(tree)
    return tree


def _value_repr(value: Any) -> protocol.ValueRepr:
    kind = type(value)
    try:
        text = repr(value)
    except Exception as e:  # noqa: BLE001 - a broken __repr__ is the value's, not the call's
        text = f"<{kind.__module__}.{kind.__qualname__} object (its repr failed: {type(e).__name__})>"
    return protocol.ValueRepr(text[:100_000], f"{kind.__module__}.{kind.__qualname__}")


def _cell_module(call_id: str) -> types.ModuleType:
    """A fresh module for one cell: its name is unique to the call, so concurrent cells never
    share one, and classes defined in the cell name a module that exists while it runs."""
    module = types.ModuleType(f"__kaas_cell_{call_id.replace('-', '_')}__")
    module.__dict__["__builtins__"] = builtins
    return module


@functools.lru_cache(maxsize=256)
def _type_name_cached(kind, aligned) -> str:
    return str(kind) if not isinstance(kind, type) else f"{kind.__module__}.{kind.__qualname__}"


def _type_name(kind) -> str:
    """A dtype's name ("float32"), or a class's dotted path; asked for every kept array.
    Keyed on alignment too: an aligned and a packed struct dtype are equal, named apart."""
    return _type_name_cached(kind, getattr(kind, "isalignedstruct", None))


_HOST_TYPES = frozenset({np.ndarray, int, float, complex, bool, str, bytes, type(None)})


def _keepable(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return bool(value) and all(is_array(v) for v in value)
    return is_array(value)


_OOM_NAMES = ("OutOfMemoryError", "MemoryError", "RESOURCE_EXHAUSTED", "MEM_OBJECT_ALLOCATION_FAILURE",
              "OUT_OF_RESOURCES")


def _is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError from NumPy or PyOpenCL, CuPy's OutOfMemoryError, XLA's RESOURCE_EXHAUSTED."""
    text = f"{type(exc).__name__} {exc}"
    return isinstance(exc, MemoryError) or any(name in text for name in _OOM_NAMES)


def _out_of_memory_error(exc: BaseException, session: Session) -> DeviceOutOfMemory:
    try:
        session.release_cached_memory()  # so the next call has the most room
        used, total = session.memory()
    except Exception:
        used, total = None, None
    known = f" ({used / 2**20:,.0f} MiB of {total / 2**20:,.0f} MiB in use)" if used and total else ""
    return DeviceOutOfMemory(
        f"{session.device} ran out of memory{known}: {type(exc).__name__}: {str(exc).rstrip('. ')}. "
        f"The worker goes on serving; free kept buffers or use smaller pieces."
    )
