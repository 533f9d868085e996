"""The call path: one call from the notebook to a warm worker and back.

1. route (see :mod:`.router`; a call with kept inputs goes where they are);
2. serialise the inputs, refusing by name any that cannot travel;
3. take a direct link to the worker (see :mod:`kaas_magic.fastlink`), send, relay the
   streamed print output as it arrives, and read the reply, all in the calling thread;
4. rebuild outputs, or the cell's exception with the cell's line numbers, and a RunRecord
   saying where the time went.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import pickle
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, TextIO, cast

from .. import config as kaas_config
from .. import pool_log, serial
from ..errors import (
    CallTimeout,
    CellInterrupted,
    KaasError,
    LinkBroken,
    VariableNotSendable,
    WorkerLost,
    rebuild_remote_exception,
)
from ..handles import handles_in
from ..protocol import CELL_VALUE, CallRequest, ErrorInfo, Op, Reply
from ..record import RunRecord
from ..stopping import REPLY_MARGIN_S, check_call_options, check_count, max_timeout
from .cell_inputs import CellInputs
from .clock import CallClock


@dataclass
class RunResult:
    outputs: dict[str, Any]
    record: RunRecord
    stdout: str = ""
    stderr: str = ""
    # What the code displayed (display(), IPython.display, matplotlib figures), in order:
    # each {"data": {mime: text}, "metadata": {...}} (images as base64 text), as Jupyter's
    # display_data carries it. In IPython they were shown where the call was made.
    displays: list = field(default_factory=list)
    # The value of the code's final expression, as IPython keeps a cell's (None when the
    # code ends in a statement, or its value was not asked for).
    value: Any = None

    def __getitem__(self, name: str) -> Any:
        return self.outputs[name]


class CallPath:
    """Sends calls for one pool: ``control`` routes and reaches workers outside the hot
    path, ``links`` are the direct links, ``kept`` the pool's kept data."""

    def __init__(self, control, links, kept, client_id: str, embedded: bool):
        self.control = control
        self.router = control.router
        self.links = links
        self.kept = kept
        self.client_id = client_id
        self.embedded = embedded
        self.counter = itertools.count(1)
        self.last_record: RunRecord | None = None
        # perf_counter() when the pool became usable: a call that began before waited for
        # it, and that wait is its startup phase.
        self.ready_at = 0.0
        self.devices: dict[tuple[str, str], str] = {}  # (service resource, worker) -> its device

    def run(self, code: str, target: str, inputs, outputs, filename, line_offset, kernels: dict, t_start: float, *,
            backend, fallback, worker, stdout, stderr, keep, progress, timeout, retries, value: bool = True,
            watch=None) -> RunResult:
        """Pool.run, once the pool is known usable: the cell's request, then :meth:`submit`.
        ``inputs``: a mapping, or :class:`CellInputs` (what Pool.run_cell sends, chosen once
        the call is routed)."""
        from ..cellcode import analyse

        # Named by content, so that running the same code again hits the parse cache here
        # and the compile cache on the worker.
        filename = filename or f"<kaas-cell-{hashlib.blake2b(code.encode(), digest_size=8).hexdigest()}>"
        line_offset = check_count(line_offset, "line_offset", 0, 10**6, "lines before a cell")
        info = analyse(code, filename, line_offset)  # SyntaxError here: nothing is sent
        body = {
            "op": "run", "code": code, "filename": filename, "line_offset": line_offset,
            "outputs_explicit": outputs is not None, "value": bool(value),
            "kernels": [k.to_dict() for k in kernels.values()] if "kernels" in info.reads else [],
        }
        output_names = list(outputs) if outputs is not None else list(info.writes)
        if not isinstance(inputs, CellInputs):
            inputs = dict(inputs or {})
        return self.submit(body, target, inputs, output_names,
                           backend=backend, fallback=fallback, worker=worker, stdout=stdout, stderr=stderr,
                           keep=keep, progress=progress, timeout=timeout, retries=retries, t_start=t_start,
                           watch=watch)

    def operation(self, op: Op, target: str, inputs: dict, output: str, t_start: float, *, filename: str,
                  kernel: str | None = None, kernels: list[dict] | None = None, backend=None, fallback=None,
                  worker=None, keep: bool = False) -> RunResult:
        """One of kaas's own operations (Pool.put, Pool.fetch, Pool.register's compile; see
        protocol), sent as such: its ``inputs``, its one ``output`` by name, its print
        output dropped, under the call's default timeout and no retries."""
        body = {"op": op, "filename": filename, "outputs_explicit": True, "kernels": kernels or []}
        if kernel is not None:
            body["kernel"] = kernel
        return self.submit(body, target, inputs, [output], backend=backend, fallback=fallback, worker=worker,
                           stdout=io.StringIO(), stderr=None, keep=keep, progress=None, timeout=None, retries=0,
                           t_start=t_start)

    def submit(self, body: dict, target: str, inputs: dict, output_names: list[str], *, backend, fallback,
               worker, stdout, stderr, keep, progress, timeout, retries, t_start: float,
               watch: Callable[[str, RunRecord], None] | None = None) -> RunResult:
        """What every call shares: route, send, relay, rebuild, record. ``body`` says what
        runs: its ``op`` (see protocol) and what that needs (cell code, a kernel's name).
        ``progress`` is told every state, the worker's included; ``watch`` (a future's) the
        states seen here only, so the worker streams none for it."""
        # Checked before anything is sent (a bad value must not switch a worker's safety
        # off). Every call runs under a timeout: its own, kaas.timeout, or (None) the
        # worker's kaas.limits.max-timeout.
        timeout, retries = check_call_options(timeout, retries,
                                              inputs if backend == "qiskit" and body["op"] == "call" else None)
        started_wall = time.time() - (time.perf_counter() - t_start)
        call_id = f"{self.client_id[:16]}-{next(self.counter)}"  # unique across clients and hosts
        record = RunRecord(call_id=call_id, target=target, started_at=started_wall)
        clock = CallClock(t_start, self.ready_at, watch)
        log_mark = pool_log.mark()  # the pool's warnings during this call become one note
        user_report = progress or _ignore

        def report(state: str, record: RunRecord) -> None:
            clock.state = state
            if watch is not None:
                watch(state, record)
            user_report(state, record)

        def waiting(why: str) -> None:
            record.waiting_for = why
            report("starting", record)

        try:
            if clock.startup:  # this call waited for the pool to start
                record.cold = True
            cell_inputs = inputs if isinstance(inputs, CellInputs) else None
            route, service, waited, inputs = self.kept.route_with_data(
                target, backend, fallback, worker, cell_inputs.candidates() if cell_inputs else inputs,
                on_wait=waiting)
            clock.routed(waited)
            if cell_inputs is not None:  # routed on every candidate; sent: those not injected there
                sent = cell_inputs.for_backend(service.backend)
                inputs = {name: value for name, value in inputs.items() if name in sent}
            record.backend, record.kind, record.worker, record.host = (service.backend, service.kind,
                                                                        route.address, route.host)
            record.device, record.inputs, record.waiting_for = self._device(service.resource, route.address), \
                tuple(inputs), ""
            record.cold = record.cold or waited
            report("queued", record)
            report("sending", record)
            serialized, record.bytes_in = _serialize_inputs(inputs)
            clock.serialized()
            message = cast(CallRequest, {
                **body,
                "service": service.resource,
                "inputs": serialized,
                "outputs": output_names,
                "client": self.client_id,
                "call_id": call_id,
                "timeout": float(timeout) if timeout is not None else None,
                "keep": keep,
                "progress": progress is not None,
                "free": self.kept.frees_for(route.address),
            })
            reply, out, sent_at, t_received = self._send(
                message, record, report, (target, backend, fallback, worker), inputs, retries,
                stdout or sys.stdout, stderr or sys.stderr, clock)
        except BaseException as e:  # ended before its reply: the phases up to here, and the rest
            record.timings = clock.cut_short(time.perf_counter())
            if record.worker and not record.device:  # learnt meanwhile, with the worker's endpoint
                record.device = self._device(service.resource, record.worker)
            record.ok, record.error = False, _short_name(type(e))
            _note_pool_warnings(record, log_mark)
            self.last_record = record
            report("cancelled" if isinstance(e, KeyboardInterrupt) else "error", record)
            raise
        if reply["worker_exiting"]:
            self.control.forget_worker(record.worker)
        elif "load" in reply:  # the worker's load, as it replied: no need to ask it again soon
            self.router.note_load(record.worker, reply["load"])

        result_outputs, deserialize_time, value = {}, 0.0, None
        if reply["ok"]:
            report("receiving", record)
            t = time.perf_counter()
            result_outputs, record.bytes_out, skipped = _deserialize_outputs(reply["outputs"])
            record.skipped = {**reply["skipped"], **skipped}
            for name, kept in reply["kept"].items():
                result_outputs[name] = self.kept.handles(kept, record.worker, message["service"], reply["device"])
            value = result_outputs.pop(CELL_VALUE, None)
            if CELL_VALUE in record.skipped:
                record.skipped["the cell's value"] = record.skipped.pop(CELL_VALUE)
            record.notes += [f"{name} not returned: {why}" if name == "the cell's value" else
                             f"{name!r} not returned: {why}" for name, why in record.skipped.items()]
            deserialize_time = time.perf_counter() - t
        t_end = time.perf_counter()

        record.timings = clock.replied(reply, sent_at, t_received, t_end, deserialize_time)
        record.device = reply["device"] or record.device
        if reply["device"]:
            self.devices[message["service"], record.worker] = reply["device"]
        record.kernels = dict(reply["kernels"])
        record.add_conversions(reply.get("conversions"))  # kept buffers of another backend (worker.convert)
        record.cold = record.cold or reply["timings"]["warm_wait"] > 0.001
        record.outputs = tuple(result_outputs)
        record.ok = bool(reply["ok"])
        _note_pool_warnings(record, log_mark)
        self.last_record = record
        if not record.ok:
            error = reply["error"]
            record.error = error["type"].rsplit(".", 1)[-1]
            report("error", record)
            raise _remote_exception(error, record)
        report("done", record)
        return RunResult(result_outputs, record, *out, value=value)

    def _device(self, resource: str, address: str) -> str:
        """The device behind a service of a worker, as far as known before the call's reply."""
        device = self.devices.get((resource, address))
        if device is None:
            endpoint = self.control.endpoints.get(address) or {}
            device = (endpoint.get("devices") or {}).get(resource, "")
        return device

    def _send(self, message: CallRequest, record: RunRecord, report, where: tuple, inputs: dict, retries: int,
              stdout: TextIO, stderr: TextIO, clock: CallClock):
        """Send the call and wait for its reply; on a worker lost under it, route the call
        again (``retries`` times: ``where`` is its target, backend, fallback and worker).
        The record follows the worker."""
        in_flight = self.router.in_flight
        while True:
            address = record.worker
            in_flight[address] += 1
            try:
                sent_at = time.time()
                reply, out = self.exchange(address, message, stdout, stderr, lambda state: report(state, record),
                                           lambda: clock.sent(record))
                if _refused_as_retiring(reply) and where[3] is None:
                    # Autoscaling retired that worker as the call was on its way; it ran
                    # nothing: the call goes elsewhere, whatever its retries.
                    self.router.mark_retiring(address)
                    route, service, _ = self.control.route(*where)
                    record.worker, record.host = route.address, route.host
                    record.device = self._device(service.resource, route.address)
                    message["service"] = service.resource
                    continue
                return reply, out, sent_at, time.perf_counter()
            except WorkerLost as e:
                if not self.embedded and not self.control.scheduler_answers():
                    raise self.control.lost_scheduler_error() from e  # the worker went with its scheduler
                # Kept inputs died with the worker: nothing to retry with.
                if retries <= 0 or any(True for v in inputs.values() for _ in handles_in(v)):
                    raise
                retries -= 1
                route, service = self.control.reroute_after_loss(address, *where)
                record.worker, record.host = route.address, route.host
                record.device = self._device(service.resource, route.address)
                message["service"] = service.resource
            finally:  # off the worker it was counted on (a reroute has changed record.worker)
                in_flight[address] -= 1

    def exchange(self, address: str, message: CallRequest, stdout: TextIO, stderr: TextIO,
                 on_state: Callable[[str], None],
                 on_sent: Callable[[], None] | None = None) -> tuple[Reply, tuple[str, str]]:
        """Send one call and relay its streamed output, in the caller's thread, over a
        direct link to the worker (see fastlink): printing lands where the caller is (the
        right notebook cell), and no event loop sits in the hot path."""
        try:
            endpoint = self.control.endpoint(address)
            link = self.links.take(endpoint)
        except Exception as e:
            self.control.forget_worker(address)
            raise WorkerLost(f"worker {address} cannot be reached ({type(e).__name__}: {e}); it may have died. "
                             f"The pool replaces dead workers; calls on other workers go on") from e
        relay = _OutputRelay(stdout, stderr, on_state)
        call_id = message["call_id"]
        # Nothing here waits for ever: past its timeout (without one, this notebook's
        # kaas.limits.max-timeout) and the worker's and its supervisor's time to stop it,
        # plus a few seconds, the call is given up (and the worker with it).
        budget = message.get("timeout") or max_timeout(kaas_config.get("limits.max-timeout"))
        deadline = time.monotonic() + budget + REPLY_MARGIN_S
        try:
            link.sock.settimeout(budget + REPLY_MARGIN_S)
            link.send(message)
            if on_sent is not None:
                on_sent()
            while True:
                # A Reply, a Refused or a StreamMessage (see protocol); read with .get() until
                # its kind is known: nothing the peer sends is trusted.
                reply = link.receive()
                if not _answers(reply, call_id):
                    raise _Mismatch(reply)
                if reply.get("kind") != "stream":
                    break
                relay.write(reply["chunks"])
                link.sock.settimeout(max(deadline - time.monotonic(), 0.001))
            link.sock.settimeout(None)
        except KeyboardInterrupt:
            raise self._cancel_remote(address, call_id, link) from None
        except _Mismatch as e:
            link.close()
            raise LinkBroken(
                f"the link to worker {address} carried a reply that is not this call's ({e}); the link was "
                f"dropped and nothing from it was used. The worker goes on serving; run the call again"
            ) from None
        except (OSError, EOFError, ValueError, pickle.UnpicklingError) as e:  # the link, not our output
            link.close()
            if time.monotonic() > deadline - REPLY_MARGIN_S:  # past its timeout: the worker was stopped
                self.control.forget_worker(address)
                how = (f"did not answer within {REPLY_MARGIN_S:.0f} s more" if isinstance(e, TimeoutError)
                       else "was stopped, as the code could not be stopped in place")
                raise CallTimeout(f"the cell ran past its timeout of {budget:g} s and worker {address} {how}: "
                                  f"the worker is being replaced by a fresh one") from None
            raise self._link_failed(address, e) from e
        self.links.give_back(endpoint, link)
        if reply.get("kind") != "result":
            raise KaasError(f"worker {address} could not accept the call: {reply.get('text')}")
        return reply, relay.captured()

    def transport(self, address: str) -> str:
        """"unix" or "tcp": how calls reach worker ``address``."""
        endpoint = self.control.endpoint(address)
        link = self.links.take(endpoint)
        try:
            return "unix" if link.sock.family == getattr(socket, "AF_UNIX", None) else "tcp"
        finally:
            self.links.give_back(endpoint, link)

    def _link_failed(self, address: str, error: BaseException) -> KaasError:
        """A call's link broke. Only evidence that the worker is gone drops it from routing:
        the scheduler no longer lists it, or a fresh connection to it fails. A link broken
        for another reason (a peer's bad frame, a stalled send) costs this call only."""
        gone = False
        try:
            self.control.sync(self.control.refresh_routes(), timeout=5)
            gone = address not in {r.address for r in self.router.routes()}
        except Exception:  # the scheduler is unreachable: judge by the worker alone
            pass
        if not gone:
            try:
                self.links.probe(self.control.endpoint(address))
            except Exception:
                gone = True
        if gone:
            self.control.forget_worker(address)
            return WorkerLost(
                f"worker {address} died (or became unreachable) while running this call "
                f"({type(error).__name__}: {error}). The pool replaces dead workers and calls "
                f"on other workers go on; add --retries N (retries=N) to run it again elsewhere "
                f"if running it twice is safe")
        return LinkBroken(
            f"the link to worker {address} broke during this call ({type(error).__name__}: {error}); the worker "
            f"is still in the pool and goes on serving, but this call's result is lost: run it again")

    def _cancel_remote(self, address: str, call_id: str, link) -> KeyboardInterrupt:
        """The notebook was interrupted during a call: stop the code on the worker too, and
        give it about a second to confirm before handing the interrupt back: the worker's
        answer says where the cell was stopped and what became of the worker."""
        try:
            self.control.cancel(address, call_id)
            reply = link.receive(timeout=1.5)
            while isinstance(reply, dict) and reply.get("kind") == "stream":
                reply = link.receive(timeout=1.5)
            if _answers(reply, call_id) and reply.get("error"):
                if reply.get("worker_exiting"):
                    self.control.forget_worker(address)
                stopped = rebuild_remote_exception(reply["error"], worker=address, where="")
                if isinstance(stopped, KeyboardInterrupt):
                    return stopped
                return CellInterrupted(f"the cell was interrupted; worker {address} answered: {stopped}")
        except Exception:  # unreachable worker or slow stop: the worker escalates by itself
            pass
        finally:
            link.close()  # it may be mid-message: never reuse it
        return CellInterrupted(f"interrupted; asked worker {address} to stop the cell (it had not confirmed "
                               f"within 1.5 s: it stops it, or is replaced, by itself)")


def _refused_as_retiring(reply: Reply) -> bool:
    """A worker being retired by autoscaling refused the call without running it."""
    error = reply.get("error") if not reply.get("ok") else None
    return bool(error) and str(error.get("type", "")).rsplit(".", 1)[-1] == "WorkerRetiring"


def _note_pool_warnings(record: RunRecord, mark: int) -> None:
    """Dask's and the workers' warnings go to the pool's log, never into a cell: the run
    view says in one line that there were some (see pool_log)."""
    note = pool_log.note(mark)
    if note:
        record.notes.append(note)


def _short_name(cls: type) -> str:
    return cls.__qualname__


def _remote_exception(error: ErrorInfo, record: RunRecord) -> BaseException:
    exception = rebuild_remote_exception(
        error, worker=record.worker, where=f"{record.target} on {record.label()}"
    )
    try:
        exception.kaas_record = record  # type: ignore[attr-defined]
    except AttributeError:
        pass
    return exception


def _transfer_limits() -> tuple[int, int]:
    """kaas.transfer's (max-bytes, max-message-bytes)."""
    return (int(kaas_config.get("transfer.max-bytes") or 2**31),
            int(kaas_config.get("transfer.max-message-bytes") or 2**32))


def _serialize_inputs(inputs: Mapping[str, Any]):
    limit, message_limit = _transfer_limits()
    out, total = {}, 0
    for name, value in inputs.items():
        try:
            ser = serial.dumps(value)
        except Exception as e:
            reason = str(e).splitlines()[-1] if str(e) else type(e).__name__
            raise VariableNotSendable(name, value, reason) from None
        size = serial.nbytes(ser)
        if size > limit:
            raise VariableNotSendable(
                name, value, f"it is {size:,} bytes, over the transfer limit of {limit:,} bytes "
                f"(kaas.transfer.max-bytes)"
            )
        total += size
        if total > message_limit:
            raise VariableNotSendable(
                name, value, f"with it the call's variables come to {total:,} bytes, over the limit of "
                f"{message_limit:,} bytes for one call (kaas.transfer.max-message-bytes)")
        out[name] = ser
    return out, total


def _deserialize_outputs(outputs: Mapping[str, Any]):
    values, skipped, total = {}, {}, 0
    for name, ser in outputs.items():
        try:
            total += serial.nbytes(ser)
            values[name] = serial.loads(ser)
        except Exception as e:
            skipped[name] = f"could not be rebuilt in the notebook ({type(e).__name__}: {e})"
    return values, total, skipped


def _ignore(state: str, record: RunRecord) -> None:
    pass


class _Mismatch(Exception):
    """A reply on a link that does not answer the call waiting on it."""

    def __init__(self, reply: Any):
        got = reply.get("call_id") if isinstance(reply, dict) else type(reply).__name__
        super().__init__(f"it answers call {got!r}")


def _answers(reply: Any, call_id: str) -> bool:
    """Whether ``reply`` belongs to the call ``call_id``. A refusal of a request the worker
    could not even read names no call."""
    if type(reply) is not dict:
        return False
    got = reply.get("call_id")
    return got == call_id or (got is None and reply.get("kind") == "refused")


class _OutputRelay:
    """A call's streamed output, written where the caller prints as it arrives. A failure
    here is the notebook's own (a stream that cannot encode a character, a closed stream,
    a view that fails to update): it never breaks the link or blames the worker. Text a
    stream cannot encode is written with backslash escapes; a stream that fails otherwise
    is given up for this call (its text is still in the result).

    Displays (``"display"`` chunks, see worker.display) are kept for the result and shown:
    in IPython, when the call prints to the cell's own stream (``sys.stdout``), published
    as display data in that cell, after the text before them; a stream with a
    ``kaas_display(payload)`` method gets them itself; elsewhere (a script, a stream of
    its own) their text/plain is written to stdout."""

    def __init__(self, stdout: TextIO, stderr: TextIO, on_state: Callable[[str], None]):
        self._streams: dict[str, TextIO | None] = {"stdout": stdout, "stderr": stderr}
        self._on_state = on_state
        self._text: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._displays: list[dict] = []
        self._show: Callable[[dict], None] | None = None

    def write(self, chunks: list[tuple[str, str]]) -> None:
        for name, text in chunks:
            if name == "state":
                try:
                    self._on_state(text)
                except Exception:  # noqa: BLE001 - a view's trouble is not the call's
                    pass
                continue
            if name == "display":
                self._display(text)
                continue
            if name not in self._text or not isinstance(text, str):  # not one of ours: ignored
                continue
            self._text[name].append(text)
            stream = self._streams[name]
            if stream is not None:
                self._streams[name] = _write_or_give_up(stream, text)
        self._flush()

    def _flush(self) -> None:
        for name, stream in self._streams.items():
            if stream is not None:
                try:
                    stream.flush()
                except Exception:  # noqa: BLE001
                    self._streams[name] = None

    def _display(self, payload) -> None:
        payload = _display_payload(payload)
        if payload is None:
            return
        if "data" in payload:
            self._displays.append(payload)
        self._flush()  # the text before it, first
        try:
            if self._show is None:
                self._show = _display_shower(self._streams["stdout"])
            self._show(payload)
        except Exception:  # noqa: BLE001 - the notebook's trouble: the display is still in the result
            pass

    def captured(self) -> tuple[str, str, list[dict]]:
        return "".join(self._text["stdout"]), "".join(self._text["stderr"]), self._displays


def _display_payload(payload) -> dict | None:
    """A display chunk as sent by the worker, checked (nothing the peer sends is trusted):
    None when it is not one."""
    if type(payload) is not dict:
        return None
    if "data" not in payload:
        return {"clear": bool(payload.get("clear"))} if "clear" in payload else None
    data, metadata = payload.get("data"), payload.get("metadata") or {}
    if type(data) is not dict or type(metadata) is not dict or not all(type(k) is str for k in data):
        return None
    checked = {"data": data, "metadata": metadata}
    transient = payload.get("transient")
    if type(transient) is dict and isinstance(transient.get("display_id"), str):
        checked["transient"] = {"display_id": transient["display_id"]}
        if payload.get("update") is True:
            checked["update"] = True
    return checked


def _display_shower(stdout: TextIO | None) -> Callable[[dict], None]:
    """How this call's displays are shown (see _OutputRelay)."""
    own = getattr(stdout, "kaas_display", None)
    if callable(own):
        return own
    shell = None
    if "IPython" in sys.modules and stdout is not None and stdout is sys.stdout:
        from IPython.core.interactiveshell import InteractiveShell

        if InteractiveShell.initialized():
            shell = InteractiveShell.instance()
    if shell is not None:
        from IPython.display import clear_output, publish_display_data

        def publish(payload: dict) -> None:
            if "data" not in payload:
                clear_output(wait=payload["clear"])
                return
            kwargs = {}
            if "transient" in payload:
                kwargs["transient"] = payload["transient"]
                if payload.get("update"):
                    kwargs["update"] = True
            publish_display_data(payload["data"], payload["metadata"], **kwargs)

        return publish

    def as_text(payload: dict) -> None:
        text = (payload.get("data") or {}).get("text/plain")
        if isinstance(text, str) and stdout is not None:
            _write_or_give_up(stdout, text + "\n")

    return as_text


def _write_or_give_up(stream: TextIO, text: str) -> TextIO | None:
    try:
        stream.write(text)
        return stream
    except UnicodeEncodeError:
        encoding = getattr(stream, "encoding", None) or "utf-8"
        try:
            stream.write(text.encode(encoding, "backslashreplace").decode(encoding, "replace"))
            return stream
        except Exception:  # noqa: BLE001
            return None
    except Exception:  # noqa: BLE001 - closed or broken: stop writing to it
        return None
