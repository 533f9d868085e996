"""The ``kaas`` command: ``kaas worker``, ``kaas demo``, ``kaas bench``."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def _worker(args: argparse.Namespace) -> int:
    """Start Dask worker(s) that serve this machine's devices to a scheduler."""
    from . import config as kaas_config

    command = [
        sys.executable, "-m", "distributed.cli.dask_worker", args.scheduler,
        "--preload", "kaas_magic.preload",
        "--nworkers", str(args.nworkers),
        "--nthreads", "1",
    ]
    if args.name:
        command += ["--name", args.name]
    if args.host:
        command += ["--host", args.host]
    if args.port:
        command += ["--worker-port", str(args.port)]
    for flag in ("tls_ca_file", "tls_cert", "tls_key"):
        value = getattr(args, flag)
        if value:
            command += [f"--{flag.replace('_', '-')}", value]
    env = dict(os.environ)
    # See kaas.pool.worker-profiler: Dask's sampling profiler slows warm calls.
    env.setdefault("DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED",
                   "True" if kaas_config.get("pool.worker-profiler") else "False")
    if args.concurrency:
        env["DASK_KAAS__POOL__CONCURRENCY"] = str(args.concurrency)
    if args.fallback is not None:
        env["DASK_KAAS__FALLBACK"] = str(args.fallback).lower()
    return subprocess.call(command, env=env)


def _demo(args: argparse.Namespace) -> int:
    from .demo import main

    return main(args)


def _bench(args: argparse.Namespace) -> int:
    if args.which == "kernels":
        from .bench.kernels import main
    elif args.which == "paper":
        from .bench.paper import main
    elif args.which == "fanout":
        from .bench.fanout import main
    elif args.which == "control":
        from .bench.control import main
    elif args.which == "cells":
        from .bench.cells import main
    elif args.which == "transfer":
        from .bench.transfer import main
    elif args.which == "load":
        from .bench.load import main

        args.clients = args.clients or 3
    else:
        from .bench.overhead import main

    return main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kaas", description="Kernel-as-a-Service for notebooks")
    sub = parser.add_subparsers(dest="command", required=True)

    worker = sub.add_parser("worker", help="serve this machine's devices to a Dask scheduler")
    worker.add_argument("scheduler", help="scheduler address, e.g. tcp://10.0.0.5:8786")
    worker.add_argument("--nworkers", type=int, default=1, help="worker processes (default 1)")
    worker.add_argument("--name", help="worker name")
    worker.add_argument("--host", help="address to listen on (default: Dask's choice)")
    worker.add_argument("--port", type=int, help="port to listen on (default: any free one)")
    worker.add_argument("--concurrency", type=int, help="calls one device serves at once")
    worker.add_argument("--fallback", action=argparse.BooleanOptionalAction, default=None)
    worker.add_argument("--tls-ca-file")
    worker.add_argument("--tls-cert")
    worker.add_argument("--tls-key")
    worker.set_defaults(func=_worker)

    demo = sub.add_parser("demo", help="start the embedded pool and run every target it serves")
    demo.add_argument("--workers", type=int, default=2)
    demo.set_defaults(func=_demo)

    bench = sub.add_parser("bench", help="benchmarks that print figures measured in one run")
    bench.add_argument("which", choices=["overhead", "kernels", "paper", "load", "fanout", "control", "cells", "transfer"],
                       help="overhead: per-call cost against Dask, ipyparallel and a Pipe; "
                            "kernels: warm kernel calls and a kept-data chain against in-process calls; "
                            "paper: the seed paper's completion-time table, naive fresh processes vs the warm pool; "
                            "load: concurrent notebook clients on mixed targets, then a memory soak; "
                            "fanout: many tiny tasks through kaas.map vs a serial call loop, Dask client.map and Ray; "
                            "control: control-plane messages and routing quality against workers and clients; "
                            "cells: a cell's cost in a real Jupyter kernel, plain vs %%%%kaas --quiet vs with its run view")
    bench.add_argument("--calls", type=int, default=300, help="calls per measurement")
    bench.add_argument("--no-ipyparallel", action="store_true", help="skip ipyparallel even if installed")
    bench.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    paper = bench.add_argument_group("paper")
    paper.add_argument("--targets", default="gpu,fpga,tpu,qpu,cpu",
                       help="targets to measure (default: all; gpu only where a CUDA GPU is)")
    paper.add_argument("--repeats", type=int, help="naive runs per target (default 20, --quick 3)")
    paper.add_argument("--kaas-repeats", type=int, help="KaaS calls per target (default 10x --repeats, or 200)")
    paper.add_argument("--clients", type=int, help="concurrent clients when sharing (default 4, --quick 2)")
    paper.add_argument("--quick", action="store_true", help="few repeats: a check that it works, not figures")
    paper.add_argument("--out", default="results/paper.csv", help="CSV to write (default results/paper.csv)")
    paper.add_argument("--plot", default="results/paper.png", help="PNG to write (default results/paper.png)")
    load = bench.add_argument_group("load")
    load.add_argument("--seconds", type=float, default=20, help="how long the clients run (default 20)")
    load.add_argument("--soak", type=int, default=5000, help="small calls in the soak (default 5000)")
    load.add_argument("--faults", action="store_true",
                      help="one more client injects faults (runaway native code, vanished callers, slow readers, "
                           "cells that change process state) while the others run")
    fanout = bench.add_argument_group("fanout")
    fanout.add_argument("--tasks", type=int, default=2000, help="tiny tasks per path (default 2000)")
    fanout.add_argument("--slow-tasks", type=int, default=400, help="tasks of 5 ms per path (default 400)")
    cells = bench.add_argument_group("cells")
    cells.add_argument("--cells", type=int, default=40, help="cells of each kind (default 40)")
    cells.add_argument("--browser", action="store_true",
                       help="add a row: the run view's cells in JupyterLab in headless Chromium (needs jupyterlab, "
                            "playwright and /usr/bin/chromium)")
    transfer = bench.add_argument_group("transfer")
    transfer.add_argument("--sizes", default="1,16,64,256", help="array sizes in MiB (default 1,16,64,256)")
    control = bench.add_argument_group("control")
    control.add_argument("--workers-list", default="4,16,32", help="pool sizes to run (default 4,16,32)")
    control.add_argument("--clients-list", default="2,8", help="numbers of clients to run (default 2,8)")
    control.add_argument("--task-ms", type=float, default=10.0, help="each call sleeps this long (default 10)")
    control.add_argument("--seconds-each", dest="control_seconds", type=float, default=8.0,
                         help="seconds each run lasts (default 8)")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
