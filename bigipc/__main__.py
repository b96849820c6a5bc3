"""``python -m bigipc``: the self-check and the side-by-side benchmark.

    python -m bigipc                 selfcheck, then a quick bench
    python -m bigipc selfcheck       end-to-end checks of this installation
    python -m bigipc bench [...]     bigipc against multiprocessing and the
                                     rest; see ``python -m bigipc bench -h``

Exit status: 0 when every check passed and every message arrived intact,
1 otherwise, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import os
import sys
import time

# Set in the environment of the re-run below, so it happens once at most.
_RERUN_MARK = "_BIGIPC_MAIN_RERUN"
# The re-run: the same command with the current directory gone from sys.path.
_RERUN_CODE = (
    "import runpy, sys; del sys.path[0]; sys.argv[0] = 'bigipc'; "
    "runpy.run_module('bigipc', run_name='__main__', alter_sys=True)"
)


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _parser() -> argparse.ArgumentParser:
    from bigipc import _bench

    parser = argparse.ArgumentParser(
        prog="python -m bigipc",
        description="Self-check and benchmark of bigipc. With no command: selfcheck, then bench --quick.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("selfcheck", help="end-to-end checks of this installation (PASS/FAIL per check)")
    bench = commands.add_parser(
        "bench",
        help="side-by-side throughput comparison between processes",
        description=(
            "Move messages from a producer process to a consumer process through each "
            "transport, check every message, and report throughput (MB/s = 10**6 bytes/s), "
            "messages/s, the consumer's peak RSS and bigipc's ratios to multiprocessing.Pipe "
            "and to the floor: a raw pipe driven from Python, and the same pipe driven by "
            "read/write loops in C."
        ),
    )
    bench.add_argument(
        "--quick", action="store_true", help="small totals: the whole run takes under a minute"
    )
    bench.add_argument(
        "--repeat",
        type=int,
        default=None,
        metavar="N",
        help="runs per case and transport (default 5, 3 with --quick)",
    )
    bench.add_argument("--json", metavar="PATH", help="write every run and the summary as JSON")
    bench.add_argument("--png", metavar="PATH", help="draw a chart (needs matplotlib)")
    bench.add_argument(
        "--cases", type=_names, metavar="A,B", help="cases to run (default all): %s" % ", ".join(_bench.CASES)
    )
    bench.add_argument(
        "--transports",
        type=_names,
        metavar="A,B",
        help="transports to run (default all installed): %s" % ", ".join(_bench.TRANSPORTS),
    )
    bench.add_argument(
        "--start-method",
        choices=["fork", "spawn", "forkserver"],
        default=None,
        help="how the producer and consumer processes start (default: %s)" % _bench.default_start_method(),
    )
    bench.add_argument(
        "--check",
        choices=["sampled", "full"],
        default="sampled",
        help="how received messages are checked: length, ends, a window and sampled bytes of each large "
        "message (default), or every byte (slower: lowers the figures of the fastest transports)",
    )
    bench.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="longest one run may take (default: by size)",
    )
    return parser


def _bench(args: argparse.Namespace) -> int:
    from bigipc import _bench

    quick = bool(args.quick)
    repeat = args.repeat if args.repeat is not None else (3 if quick else 5)
    if repeat < 1:
        sys.stderr.write("--repeat must be at least 1\n")
        return 2
    try:
        cases, transports, notes = _bench.plan(args.cases, args.transports)
    except KeyError as exc:
        sys.stderr.write("%s\n" % exc.args[0])
        return 2
    env = _bench.environment()
    start_method = args.start_method or _bench.default_start_method()
    print(
        "bigipc %s (%s core) on Python %s, %s, %s CPUs, pipe size %d KiB, start method %s"
        % (
            env["bigipc_version"],
            env["implementation"],
            sys.version.split()[0],
            env["platform"],
            env["cpu_count"],
            env["pipe_size"] // 1024,
            start_method,
        )
    )
    if env["implementation"] != "cython":
        print("NOTE: measuring bigipc's pure-Python core, not the compiled one")
    for note in notes:
        print("note: %s" % note)
    sys.stdout.flush()
    started = time.monotonic()
    results, failures = _bench.run_bench(
        cases,
        transports,
        quick=quick,
        repeat=repeat,
        start_method=start_method,
        timeout=args.timeout,
        full_check=args.check == "full",
    )
    rows = _bench.summarize(results)
    print(_bench.format_table(rows, cases, repeat))
    print()
    print(
        "%s run: %d measurements in %.0f s. Throughput counts payload bytes; msg/s and MB/s are "
        "medians; peak RSS is the consumer's (ru_maxrss)."
        % ("quick" if quick else "full", len(results), time.monotonic() - started)
    )
    settings = {
        "quick": quick,
        "repeat": repeat,
        "start_method": start_method,
        "check": args.check,
        "cases": [c.name for c in cases],
        "transports": [t.name for t in transports],
        "notes": notes,
        "argv": sys.argv,
    }
    if args.json:
        _bench.write_json(args.json, results, rows, failures, settings)
        print("wrote %s" % args.json)
    if args.png:
        problem = _bench.draw_chart(args.png, rows, cases)
        print("chart not drawn: %s" % problem if problem else "wrote %s" % args.png)
    if failures:
        print()
        print(
            "FAILED: %d measurement(s) went wrong; a message arrived different from what was sent or a "
            "process failed:" % len(failures)
        )
        for failure in failures:
            print("  - %s" % failure)
        return 1
    print("every message received matched what was sent")
    return 0


def _selfcheck() -> int:
    from bigipc._selfcheck import run_selfcheck

    return 1 if run_selfcheck() else 0


def _installed_copy_with_core(shadowed_root: str) -> str | None:
    """The folder of another bigipc on sys.path that has the compiled core."""
    search = [p for p in sys.path if os.path.abspath(p or os.curdir) != shadowed_root]
    spec = importlib.machinery.PathFinder.find_spec("bigipc", search)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            if os.path.exists(os.path.join(folder, "_core" + suffix)):
                return folder
    return None


def _run_installed_copy_instead(argv: list[str]) -> None:
    """Leave a source checkout for the installed package, when that is meant.

    ``python -m bigipc`` puts the current directory first on sys.path, so in
    the root of a checkout (where the README's ``pip install . && python -m
    bigipc`` runs) it imports the checkout's bigipc, which has no compiled
    core unless one was built in place. When an installed bigipc with the
    compiled core is on sys.path too, run that one: it is what was just
    installed and what the command is meant to check.
    """
    import bigipc

    forced_pure = os.environ.get("BIGIPC_PUREPYTHON", "") not in ("", "0")
    if bigipc.IMPLEMENTATION != "python" or forced_pure or os.environ.get(_RERUN_MARK):
        return
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(bigipc.__file__)))
    if os.path.abspath(sys.path[0] or os.curdir) != package_root:
        return
    installed = _installed_copy_with_core(package_root)
    if installed is None:
        return
    sys.stderr.write(
        "note: the bigipc in the current directory (%s) has no compiled core; running the installed "
        "one (%s) instead\n" % (os.path.join(package_root, "bigipc"), installed)
    )
    sys.stderr.flush()
    sys.stdout.flush()
    environment = dict(os.environ, **{_RERUN_MARK: "1"})
    os.execve(sys.executable, [sys.executable, "-c", _RERUN_CODE, *argv], environment)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
        if __name__ == "__main__":
            _run_installed_copy_instead(argv)
    args = _parser().parse_args(argv)
    if args.command == "selfcheck":
        return _selfcheck()
    if args.command == "bench":
        return _bench(args)
    status = _selfcheck()
    print()
    bench_status = _bench(_parser().parse_args(["bench", "--quick"]))
    return status or bench_status


if __name__ == "__main__":
    sys.exit(main())
