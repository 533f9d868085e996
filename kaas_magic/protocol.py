"""What travels on a direct link (see fastlink), typed: the call request a client sends,
the stream messages and the one reply a worker answers it with, and a device's row of the
pool's metrics. TypedDicts cost nothing at run time: a message is still a plain dict, read
with ``[]`` where the key is always there.

A request names its operation (``op``); the worker runs each by a function of its own,
never by code generated in the notebook:

- ``"run"``: a cell's ``code`` (the default, for a request that names no operation);
- ``"call"``: one kernel, ``kernel``, its arguments the inputs by parameter name;
- ``"put"``: the input ``__value`` copied onto the device, kept there as ``__kept``;
- ``"fetch"``: a kept buffer, the input ``__handle``, brought home as ``__value``;
- ``"compile"``: kernel ``kernel`` compiled (or loaded) on the device: ``__how`` says how;
- ``"batch"``: many small calls as one (Pool.map): ``items``, each its inputs packed, run in
  turn with kernel ``kernel`` (or, without one, the ``code``); the reply's output
  ``BATCH_RESULTS`` is one :class:`BatchItem` per item, in order.

A reply is built in one place, :func:`reply`, for calls that ran and for calls that
ended before or instead of running (refused, timed out, stopped); the worker's runtime
addresses it (who answered, when) as it sends it.
"""

# No ``from __future__ import annotations``: TypedDict tells NotRequired keys apart at run
# time only from evaluated annotations (its __required_keys__, which the tests read).
from dataclasses import dataclass
from typing import Any, Literal, NotRequired, TypedDict, get_args

Op = Literal["run", "call", "put", "fetch", "compile", "batch"]
OPS: frozenset[str] = frozenset(get_args(Op))

# The names an operation reads and writes (the request's ``inputs`` and ``outputs``).
PUT_VALUE, PUT_KEPT = "__value", "__kept"
FETCH_HANDLE, FETCH_VALUE = "__handle", "__value"
CALL_RESULT = "__result"
# The value of a cell's final expression, when the request asks for it: an output like the
# others (sent home, kept, or skipped under the same rules), named apart from any variable.
CELL_VALUE = "__kaas_value__"
COMPILE_HOW = "__how"
# A batch's per-item results (a list of BatchItem), the one output of a "batch" reply.
BATCH_RESULTS = "__batch__"


class CallRequest(TypedDict):
    """A call, client to worker (see CallPath.submit)."""

    op: NotRequired[Op]  # "run" when absent
    service: str  # the service resource the call runs on, e.g. "kaas/cpu/numpy/device/0"
    inputs: dict[str, Any]  # name -> serial.Packed; DeviceHandles travel as HandleRefs
    outputs: list[str]  # the names to send home (or keep)
    client: str  # the client's id: kept buffers are its own
    call_id: str
    timeout: float | None  # None: the worker's kaas.limits.max-timeout
    keep: bool  # array outputs stay on the device
    progress: bool  # stream the call's states
    free: list[str]  # kept buffers the client dropped since its last call here
    filename: str  # named in tracebacks
    code: NotRequired[str]  # "run"
    line_offset: NotRequired[int]  # "run": lines above the cell in its notebook cell
    outputs_explicit: NotRequired[bool]  # "run": say which outputs the cell did not assign
    value: NotRequired[bool]  # "run": send home the value of a final expression (as CELL_VALUE)
    kernel: NotRequired[str]  # "call", "compile": the kernel's name
    kernels: NotRequired[list[dict]]  # registered kernels (KernelSpec.to_dict) the call may use
    items: NotRequired[list[dict[str, Any]]]  # "batch": each item's inputs, name -> serial.Packed


class StreamMessage(TypedDict):
    """Print output (``"stdout"``, ``"stderr"``), states (``"state"``) and rich displays
    (``"display"``, its payload a :class:`DisplayChunk`) as they happen, in order."""

    kind: Literal["stream"]
    chunks: list[tuple[str, Any]]  # (name, text), or ("display", DisplayChunk)
    call_id: str | None  # stamped by fastlink.Replier


class DisplayChunk(TypedDict):
    """A displayed object (``display(obj)``, ``IPython.display``, a matplotlib figure; see
    worker.display), as Jupyter's display_data carries it: plain data, JSON-safe, binary
    data (images) as base64 text. Or, alone, ``clear``: clear the cell's output (the value:
    wait for the next output)."""

    data: NotRequired[dict[str, Any]]  # MIME type -> text (or a JSON value)
    metadata: NotRequired[dict[str, Any]]
    transient: NotRequired[dict[str, Any]]  # {"display_id": ...}
    update: NotRequired[bool]  # replaces the output of transient's display_id
    clear: NotRequired[bool]


class Timings(TypedDict):
    """Seconds on the worker, by phase."""

    warm_wait: float  # waiting for the backend to warm up
    queue: float  # waiting for the device's turn
    setup: float
    execute: float
    to_host: float


class KeptBuffer(TypedDict):
    """A kept output, as the reply describes it (a DeviceHandle's metadata)."""

    id: str
    shape: list[int]
    dtype: str
    nbytes: int
    type: str


class ErrorInfo(TypedDict):
    """An exception, as errors.wrap_error describes it."""

    type: str
    message: str
    exception_only: list[str]
    frames: list[tuple]
    state: Any


class Reply(TypedDict):
    """The one answer to a call."""

    kind: Literal["result"]
    ok: bool
    outputs: dict[str, Any]  # name -> serial.Packed
    skipped: dict[str, str]  # name -> why it did not come home
    error: ErrorInfo | None
    kept: dict[str, KeptBuffer | list[KeptBuffer]]
    timings: Timings
    kernels: dict[str, str]  # kernel name -> how it was had ("compiled", "disk", ...)
    # Kept buffers of another backend that this call's inputs were converted from, on the
    # worker (see worker.convert): {name, from, to, device, copied, how, why, nbytes} each.
    conversions: list[dict]
    worker_exiting: bool  # the worker is being replaced: route nothing more to it
    worker: str
    host: str
    device: str
    received_at: float  # the worker's wall clock
    replied_at: float
    call_id: NotRequired[str | None]  # stamped by fastlink.Replier
    # Calls running or queued per service of the worker as it replied: every reply carries
    # the worker's load, so a busy client needs no separate load requests (see ControlPlane).
    load: NotRequired[dict[str, int]]


class BatchItem(TypedDict):
    """One item of a batch, in its reply: its result (packed), its error, or that it did
    not run (the batch was stopped first)."""

    ok: bool
    value: NotRequired[Any]  # serial.Packed, when ok
    error: NotRequired[ErrorInfo]  # when it failed
    not_run: NotRequired[bool]  # the batch was stopped before this item


class Refused(TypedDict):
    """A request the worker could not take (not a message of kaas's, or a failure outside
    the call)."""

    kind: Literal["refused"]
    text: str
    call_id: NotRequired[str | None]


class MetricsRow(TypedDict):
    """One device of one worker, for the pool monitor (see WorkerRuntime.metrics)."""

    worker: str
    worker_name: str
    host: str
    device_id: str
    physical_device: str  # what backends on one device share: "cpu", "gpu:0" (see Session.physical_device)
    target: str
    backend: str
    kind: str
    device: str
    services: list[str]
    concurrency: int
    in_flight: int
    queued: int
    busy_10s: float
    busy_60s: float
    calls: int
    errors: int
    median_latency_s: float | None
    memory_used: int | None
    memory_total: int | None
    kept_bytes: int
    warm_kernels: list[str]


def reply(error: ErrorInfo | None, timings: Timings, outputs: dict[str, Any] | None = None,
          skipped: dict[str, str] | None = None, kept: dict | None = None, kernels: dict[str, str] | None = None,
          worker_exiting: bool = False, conversions: list | None = None) -> Reply:
    """A call's reply: ``ok`` when there is no ``error``. Who answered and when are filled
    in as it is sent (WorkerRuntime._addressed)."""
    return {"kind": "result", "ok": error is None, "outputs": {} if outputs is None else outputs,
            "skipped": {} if skipped is None else skipped, "error": error, "kept": {} if kept is None else kept,
            "timings": timings, "kernels": {} if kernels is None else kernels, "worker_exiting": worker_exiting,
            "conversions": [] if conversions is None else conversions,
            "worker": "", "host": "", "device": "", "received_at": 0.0, "replied_at": 0.0}


@dataclass(frozen=True)
class ValueRepr:
    """A cell's value that could not travel (an OpenCL ``Program``, a lock): its ``repr``,
    made on the worker, which is what the notebook shows as the cell's output."""

    text: str
    type_name: str

    def __repr__(self) -> str:
        return self.text
