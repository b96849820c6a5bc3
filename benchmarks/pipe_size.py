"""Throughput of ``bigipc.Pipe(duplex=False)`` by message size and pipe size.

The study behind ``bigipc._platform.DEFAULT_PIPE_SIZE``: for each message size
it moves about ``--total`` bytes from a forked producer to the consumer,
``send_bytes`` of one ``bytes`` object against ``recv_bytes`` into a fresh one,
once per pipe size and once through ``multiprocessing.Pipe(duplex=False)``,
interleaved, and prints the median MB/s of ``--rounds`` rounds (Linux; it
uses fork)::

    python benchmarks/pipe_size.py --sizes 1M,16M,256M --pipes 256K,512K,1M
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
from typing import Any

from _forked import parse_size, size_label, timed_transfer

import bigipc


def measure(size: int, pipe_size: int | None, total: int) -> float:
    """MB/s of one run; ``pipe_size`` None means multiprocessing's pipe."""
    reader: Any
    writer: Any
    if pipe_size is None:
        reader, writer = multiprocessing.Pipe(duplex=False)
    else:
        reader, writer = bigipc.Pipe(duplex=False, buffer_size=pipe_size)
    count = max(4, total // size)
    elapsed, _ = timed_transfer(reader, writer, os.urandom(size), count)
    return count * size / elapsed / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256K,1M,4M,16M,64M,256M")
    parser.add_argument("--pipes", default="256K,512K,1M")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--total", default="512M", help="bytes per run")
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    pipes: list[int | None] = [None] + [parse_size(p) for p in args.pipes.split(",")]
    total = parse_size(args.total)
    runs: dict[tuple[int, int | None], list[float]] = {}
    for _ in range(args.rounds):
        for size in sizes:
            for pipe_size in pipes:
                runs.setdefault((size, pipe_size), []).append(measure(size, pipe_size, total))
    print("MB/s, median of %d rounds; ratio to multiprocessing in brackets" % args.rounds)
    for size in sizes:
        base = statistics.median(runs[(size, None)])
        cells = ["%6s  mp %6.0f" % (size_label(size), base)]
        for pipe_size in pipes[1:]:
            value = statistics.median(runs[(size, pipe_size)])
            cells.append("pipe %s %6.0f (%.2fx)" % (size_label(pipe_size or 0), value, value / base))
        print(" | ".join(cells))


if __name__ == "__main__":
    main()
