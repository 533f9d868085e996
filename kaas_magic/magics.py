"""IPython magics: a thin skin over :mod:`kaas_magic`'s Python API.

``%%kaas TARGET [options]`` runs the cell on the pool. ``%kaas COMMAND`` manages the pool:
``start``, ``connect``, ``status``, ``last``, ``kernels``, ``monitor``, ``panel``, ``stop``. Options are declared once here and
shared, so every magic spells them the same way.
"""

from __future__ import annotations

import argparse
import functools
import shlex
import sys

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import MagicArgumentParser, argument, magic_arguments, parse_argstring

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
@argument("target", choices=list(TARGETS), help="where to run: " + ", ".join(f"{t} ({d})" for t, d in TARGETS.items()))
@argument("--register", "-r", metavar="SIGNATURE",
          help="register the cell as a kernel instead of running it: its name, or its signature "
               "such as 'scale(a: float32[n], out: out float32[n], k: float32)'")
@run_options
def _cell_parser():
    """%%kaas TARGET [options]: run the cell on a warm worker serving TARGET."""


def _command_parser() -> MagicArgumentParser:
    parser = MagicArgumentParser(prog="%kaas", description="Manage the kaas pool.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    start = sub.add_parser("start", help="start the embedded pool (LocalCluster on 127.0.0.1)")
    start.add_argument("--workers", "-n", type=int, default=None, help="number of worker processes")
    connect = sub.add_parser("connect", help="use an existing Dask scheduler")
    connect.add_argument("address", help="scheduler address, e.g. tcp://10.0.0.5:8786")
    sub.add_parser("status", help="workers, their targets and devices, calls in flight")
    sub.add_parser("last", help="the record of the latest run")
    sub.add_parser("kernels", help="registered kernels: signature, where compiled, compile count")
    sub.add_parser("monitor", help="live view of every device in the pool: occupancy, utilisation, latency")
    sub.add_parser("panel", help="the monitor, docked in a JupyterLab side panel")
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


@magics_class
class KaasMagics(Magics):
    @line_cell_magic
    def kaas(self, line: str, cell: str | None = None):
        """Run a cell on the kaas pool (``%%kaas TARGET``) or manage it (``%kaas COMMAND``).

        Targets: gpu, tpu, fpga, qpu, cpu. Commands: start, connect, status, last, kernels,
        monitor, panel, stop.
        """
        if cell is None:
            return self._command(line)
        return self._run(line, cell)

    # -- %%kaas TARGET --

    def _run(self, line: str, cell: str):
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
        filename = f"<kaas In[{shell.execution_count}]>"
        view = None if args.quiet else inline_view()
        result = kaas.run_cell(
            cell,
            args.target,
            shell.user_ns,
            inputs=_names(args.inputs),
            outputs=_names(args.outputs),
            exclude=_ipython_machinery(shell, cell, filename),
            backend=args.backend,
            fallback=args.fallback,
            worker=args.worker,
            filename=filename,
            line_offset=1,  # the %%kaas line is line 1 of the notebook cell
            keep=args.keep,
            timeout=args.timeout,
            retries=args.retries,
            progress=view.update if view is not None else None,
        )
        for name, reason in result.record.skipped.items():
            print(f"kaas: {name!r} not returned: {reason}", file=sys.stderr)
        if not args.quiet and view is None:
            from IPython.display import display

            display(result.record)

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
        if args.command == "stop":
            kaas.shutdown()
            print("kaas pool closed")
            return None
        raise UsageError(_COMMANDS.format_usage())


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
