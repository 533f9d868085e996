"""IPython magics: a thin skin over :mod:`kaas_magic`'s Python API.

``%%kaas TARGET [options]`` runs the cell on the pool. ``%kaas COMMAND`` manages the pool:
``start``, ``connect``, ``status``, ``last``, ``kernels``, ``monitor``, ``panel``, ``log``,
``stop``. Options are declared once here and shared, so every magic spells them the same
way; ``%kaas?`` shows them all (see :func:`usage`).
"""

from __future__ import annotations

import argparse
import functools
import shlex
import time

from IPython.core.displayhook import DisplayHook
from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import MagicArgumentParser, argument, magic_arguments, parse_argstring

from .errors import CellInterrupted, CellSyntaxError, OutputNotReturned
from .targets import BACKENDS, TARGETS


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise UsageError(f"not a variable name: {', '.join(bad)}")
    return names


def run_options(func):
    """Options shared by every magic that runs something on the pool."""
    for decorator in reversed(
        [
            argument("--backend", "-b", choices=BACKENDS, help="backend to use instead of the target's default"),
            argument("--fallback", dest="fallback", action="store_const", const=True, default=None,
                     help="run on a CPU stand-in when the pool has no device for the target"),
            argument("--no-fallback", dest="fallback", action="store_const", const=False,
                     help="never run on a CPU stand-in (overrides kaas.fallback)"),
            argument("--in", dest="inputs", metavar="NAMES", help="comma-separated names to send (default: the names the cell reads)"),
            argument("--out", dest="outputs", metavar="NAMES", help="comma-separated names to bring back (default: the names the cell assigns)"),
            argument("--worker", "-w", metavar="ADDRESS", help="run on this worker (address or name)"),
            argument("--timeout", "-t", type=float, metavar="SECONDS",
                     help="stop the cell after this many seconds (default: kaas.timeout, else kaas.limits.max-timeout)"),
            argument("--retries", type=int, default=0, metavar="N",
                     help="run again elsewhere if the worker dies (only if running twice is safe)"),
            argument("--keep", "-k", action="store_true",
                     help="leave array results on the device as handles that later calls use in place"),
            argument("--quiet", "-q", action="store_true", help="show no run view or summary"),
        ]
    ):
        func = decorator(func)
    return func


@magic_arguments()
@argument("target", choices=list(TARGETS), metavar="TARGET",
          help="where to run: " + ", ".join(f"{t} ({d})" for t, d in TARGETS.items()))
@argument("--background", "-B", action="store_true",
          help="return at once: the cell's output, run view and value land here as they arrive, its "
               "variables are assigned when it finishes (%%kaas wait waits for it)")
@argument("--register", "-r", metavar="SIGNATURE",
          help="register the cell as a kernel instead of running it: its name, or its signature "
               "such as 'scale(a: float32[n], out: out float32[n], k: float32)'")
@run_options
def _cell_parser():
    """%%kaas TARGET [options]: run the cell on a warm worker serving TARGET."""


# Shown to users as "%%kaas", in argparse's own plain format (magic_arguments' formatter
# writes reStructuredText markup and names the parser after this function).
_cell_parser.parser.prog = "%%kaas"
_cell_parser.parser.formatter_class = argparse.HelpFormatter


def _command_parser() -> MagicArgumentParser:
    parser = MagicArgumentParser(prog="%kaas", description="Manage the kaas pool.",
                                 formatter_class=argparse.HelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser = functools.partial(sub.add_parser, formatter_class=argparse.HelpFormatter)  # plain text
    start = sub.add_parser("start", help="start the embedded pool (LocalCluster on 127.0.0.1)")
    start.add_argument("--workers", "-n", type=int, default=None, metavar="N", help="number of worker processes")
    connect = sub.add_parser("connect", help="use an existing Dask scheduler")
    connect.add_argument("address", help="scheduler address, e.g. tcp://10.0.0.5:8786")
    sub.add_parser("status", help="workers, their targets and devices, calls in flight")
    sub.add_parser("last", help="the record of the latest run")
    sub.add_parser("kernels", help="registered kernels: signature, where compiled, compile count")
    sub.add_parser("monitor", help="live view of every device in the pool: occupancy, utilisation, latency")
    sub.add_parser("panel", help="the monitor, docked in a JupyterLab side panel")
    sub.add_parser("log", help="the pool's log: Dask's and the workers' own messages, kept out of cells")
    wait = sub.add_parser("wait", help="wait for background cells (%%kaas -B): all, or those of the prompts given")
    wait.add_argument("cells", nargs="*", type=int, metavar="N", help="prompt numbers, e.g. 5 for In[5]")
    wait.add_argument("--timeout", "-t", type=float, default=None, metavar="SECONDS")
    adapt = sub.add_parser("adapt", help="grow and shrink the pool with its queue: MIN MAX [interval=S idle-after=S "
                                         "...], off, or (nothing) the state and latest decisions")
    adapt.add_argument("words", nargs="*", metavar="MIN MAX | off")
    cancel = sub.add_parser("cancel", help="stop background cells: all running, or those of the prompts given")
    cancel.add_argument("cells", nargs="*", type=int, metavar="N")
    sub.add_parser("stop", help="close the pool (and the embedded cluster)")
    return parser


_COMMANDS = _command_parser()


def _parse_cell_line(line: str) -> argparse.Namespace:
    """The options of a ``%%kaas`` line. A notebook reruns the same few lines, and parsing
    one was the largest single cost of a warm cell on the client: each is parsed once."""
    return argparse.Namespace(**vars(_parsed_cell_line(line)))  # a copy: callers may change it


@functools.lru_cache(maxsize=256)
def _parsed_cell_line(line: str) -> argparse.Namespace:
    return parse_argstring(_cell_parser, line)


@functools.lru_cache(maxsize=256)
def _shows_value(cell: str) -> bool:
    """Whether the cell's value is shown (no ``;`` after its last expression), as IPython
    decides; IPython tokenizes the cell for it, so each cell text is decided once."""
    return not DisplayHook.semicolon_at_end_of_expression(cell)


_EXAMPLES = """\
Examples:
  %%kaas gpu                   run the cell on a GPU worker; xp is CuPy there
  %%kaas gpu --fallback        ... or on a CPU stand-in (labelled FALLBACK) when the pool has no GPU
  %%kaas cpu --in x --out y    send only x, bring back only y
  %%kaas tpu --timeout 10      stop the cell after 10 s
  %%kaas gpu --keep            leave array results on the device as handles
  %%kaas gpu -r 'scale(a: float32[n], out: out float32[n], k: float32)'
                               register the cell (CUDA C) as a kernel; then kaas.call("scale", a, k=2.0)

  %kaas start -n 2             start the embedded pool with 2 workers
  %kaas connect tcp://10.0.0.5:8786
                               use an existing Dask scheduler
  %kaas status                 workers, their devices, calls in flight
  %kaas last                   where the latest cell ran and where its time went
  %kaas kernels                registered kernels and where they are compiled
  %kaas monitor                live view of every device (%kaas panel: in a side panel)
  %kaas log                    the pool's own log messages
  %%kaas gpu -B                run the cell in the background; later cells run meanwhile
  %kaas wait                   wait for the background cells (and raise the first error); %kaas wait 5: In[5] only
  %kaas cancel 5               stop background cell In[5]
  %kaas adapt 1 8              grow the pool to 8 workers under sustained queueing, back to 1 when idle
  %kaas stop                   close the pool
"""


def usage() -> str:
    """The help of ``%%kaas`` and ``%kaas`` (what ``%kaas?`` shows): every option, every
    command, examples."""
    commands = _COMMANDS._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    lines = [_cell_parser.parser.format_help().rstrip(), "", "%kaas COMMAND: manage the pool", "", "commands:"]
    for name, sub in commands.items():
        summary = next(a.help for a in _COMMANDS._subparsers._group_actions[0]._choices_actions if a.dest == name)
        lines.append(f"  {sub.format_usage().removeprefix('usage: ').strip():<32} {summary}")
    return "\n".join(lines) + "\n\n" + _EXAMPLES


@magics_class
class KaasMagics(Magics):
    @line_cell_magic
    def kaas(self, line: str, cell: str | None = None):
        # The docstring, what %kaas? shows, is usage() (set below).
        if cell is None:
            return self._command(line)
        return self._run(line, cell)

    kaas.__doc__ = usage()

    # -- %%kaas TARGET --

    def _run(self, line: str, cell: str):
        started = time.perf_counter()  # the cell's wait for a pool that is still starting counts
        import kaas_magic as kaas

        try:
            args = _parse_cell_line(line)
        except UsageError as e:
            raise UsageError(f"{e}\n{_cell_parser.parser.format_usage()}") from None
        if not cell.strip():
            raise UsageError("%%kaas: the cell is empty; there is nothing to run")
        if args.register:
            # magic_arguments splits like a shell but keeps the quotes around a value.
            args.register = args.register.strip().strip("'\"")
            return self._register(args, cell)
        from .widgets import inline_view

        shell = self.shell
        # The prompt's number: IPython counts the cell running now as execution_count.
        filename = f"<kaas In[{shell.execution_count}]>"
        try:
            exclude = _ipython_machinery(shell, cell, filename)
        except SyntaxError as e:  # like a normal cell's: the line and the caret, no frames
            raise CellSyntaxError(e) from None
        view = None if args.quiet else inline_view(end_with_cell=not args.background)
        if view is not None and not kaas.pool_started():
            from .record import RunRecord

            view.update("starting", RunRecord(call_id="", target=args.target, waiting_for="starting the pool"))
        if args.background:
            self._background(args, cell, view, filename, exclude, started)
            return None
        try:
            result = kaas.run_cell(
                cell,
                args.target,
                shell.user_ns,
                inputs=_names(args.inputs),
                outputs=_names(args.outputs),
                exclude=exclude,
                backend=args.backend,
                fallback=args.fallback,
                worker=args.worker,
                filename=filename,
                line_offset=1,  # the %%kaas line is line 1 of the notebook cell
                keep=args.keep,
                timeout=args.timeout,
                retries=args.retries,
                progress=view.update if view is not None else None,
                value=_shows_value(cell),
                started=started,
            )
        except KeyboardInterrupt as e:
            if hasattr(e, "_render_traceback_"):  # the worker's word on where it stopped
                raise
            raise CellInterrupted(_interrupted_where(view)) from None
        if not args.quiet and view is None:
            from IPython.display import display

            display(result.record)
        asked = [n for n in _names(args.outputs) or () if n in result.record.skipped and n not in result.outputs]
        if asked:  # the user named these: not getting them is an error, not a note
            raise OutputNotReturned("; ".join(f"{n!r} not returned: {result.record.skipped[n]}" for n in asked))
        return result.value

    def _background(self, args, cell: str, view, filename: str, exclude: set[str], started: float) -> None:
        """``%%kaas -B``: start the call and return; it shows in this cell as it goes (see
        background)."""
        import kaas_magic as kaas

        from .background import CELLS

        def submit(stdout, stderr):
            return kaas.run_cell(
                cell, args.target, self.shell.user_ns, inputs=_names(args.inputs), outputs=_names(args.outputs),
                exclude=exclude, backend=args.backend, fallback=args.fallback, worker=args.worker,
                filename=filename, line_offset=1, keep=args.keep, timeout=args.timeout, retries=args.retries,
                progress=view.update if view is not None else None, stdout=stdout, stderr=stderr,
                value=_shows_value(cell), started=started, block=False)

        CELLS.start(self.shell.execution_count, submit)

    def _register(self, args, cell: str):
        import kaas_magic as kaas

        from .backends import registry

        # A backend's kernels are in the first language it declares (see the registry).
        backend = args.backend or registry.default_backend(args.target)
        language = next(iter(registry.info(backend).languages), None)
        if language is None:
            able = [b.name for b in registry.infos() if b.languages and b.serves(args.target)]
            raise UsageError(f"kernels for {args.target} need a kernel backend: pass --backend "
                             f"{' or '.join(able) or '(none installed serves it)'}")
        spec, record = kaas.pool().register(
            cell, language,
            signature=args.register if "(" in args.register else None,
            name=None if "(" in args.register else args.register,
            target=args.target, fallback=args.fallback, line_offset=1,
        )
        if not args.quiet:
            print(f"registered {spec.signature()} [{spec.language}], compiled on {record.label()} "
                  f"@ {record.worker}")

    # -- %kaas COMMAND --

    def _command(self, line: str):
        import kaas_magic as kaas

        if not line.strip():
            line = "status"
        args = _COMMANDS.parse_args(shlex.split(line))
        if args.command == "start":
            pool = kaas.start(args.workers)
            print(f"kaas pool at {pool.scheduler_address}; warming up in the background")
            return None
        if args.command == "connect":
            pool = kaas.connect(args.address)
            print(f"kaas connected to {pool.scheduler_address}")
            return None
        if args.command == "status":
            return kaas.status()
        if args.command == "last":
            return kaas.last_run()
        if args.command == "kernels":
            return kaas.pool().kernels()
        if args.command == "monitor":
            kaas.monitor()
            return None
        if args.command == "panel":
            kaas.panel()
            return None
        if args.command == "log":
            from . import pool_log

            return pool_log.show()
        if args.command == "wait":
            from .background import CELLS

            cells = CELLS.wait(args.cells or None, args.timeout)
            print("kaas: " + (", ".join(f"In[{c.number}] {c.state}" for c in cells) or "no background cells"))
            return None
        if args.command == "cancel":
            from .background import CELLS

            cells = [c for c in CELLS.get(args.cells or None) if not c.future.done()]
            for c in cells:
                c.future.cancel()
            print("kaas: " + (", ".join(f"In[{c.number}] cancelled" for c in cells) or "no background cell was running"))
            return None
        if args.command == "adapt":
            from .client.adapt import adapt_command

            print(adapt_command(kaas.pool(), " ".join(args.words)))
            return None
        if args.command == "stop":
            kaas.shutdown()
            print("kaas pool closed")
            return None
        raise UsageError(_COMMANDS.format_usage())


def _interrupted_where(view) -> str:
    """What an interrupt outside the exchange with the worker stopped (routing, sending,
    reading the results): said from the run view's last state when there is one."""
    state = view.state if view is not None else ""
    record = view.record if view is not None else None
    if state == "starting":
        return f"stopped while waiting: {record.waiting_for}" if record and record.waiting_for else "stopped while waiting for the pool"
    if state in ("queued", "sending"):
        return "stopped while queued, before the call reached " + (f"worker {record.worker}" if record and record.worker else "a worker") + ": nothing ran"
    if state == "receiving":
        return "stopped while the results came home: the cell ran, its variables were not all assigned"
    return "the cell was stopped (nothing more is known of the call; see %kaas last)"


def _ipython_machinery(shell, cell: str, filename: str) -> set[str]:
    """Names a cell must not send: IPython's own objects (``In``, ``Out``, ``get_ipython``,
    ``exit`` ...) while they still hold what IPython put there, and hidden names the cell
    assigns itself (``for _ in ...``: a throwaway, not the last output). A hidden name the
    user or the output history has given a value since (``_``, ``__``, ``_i``) is sent like
    any other variable the cell reads."""
    from .cellcode import analyse

    user_ns, hidden = shell.user_ns, shell.user_ns_hidden
    written = analyse(cell, filename, 1).writes
    machinery = {name for name, value in hidden.items() if user_ns.get(name, _MISSING) is value}
    return machinery | (set(written) & (set(hidden) | _OUTPUT_HISTORY))


_OUTPUT_HISTORY = frozenset({"_", "__", "___"})  # IPython's last outputs (hidden or not)


_MISSING = object()
