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
import time
from typing import Any

import bigipc

_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _size(text: str) -> int:
    text = text.strip().upper()
    if text[-1:] in _UNITS:
        return int(text[:-1]) * _UNITS[text[-1]]
    return int(text)


def _label(size: int) -> str:
    for unit in "GMK":
        if size >= _UNITS[unit] and size % _UNITS[unit] == 0:
            return "%d%s" % (size // _UNITS[unit], unit)
    return str(size)


def measure(size: int, pipe_size: int | None, total: int) -> float:
    """MB/s of one run; ``pipe_size`` None means multiprocessing's pipe."""
    reader: Any
    writer: Any
    if pipe_size is None:
        reader, writer = multiprocessing.Pipe(duplex=False)
    else:
        reader, writer = bigipc.Pipe(duplex=False, buffer_size=pipe_size)
    message = os.urandom(size)
    count = max(4, total // size)
    pid = os.fork()
    if pid == 0:  # the producer
        code = 1
        try:
            reader.close()
            for _ in range(count):
                writer.send_bytes(message)
            code = 0
        finally:
            os._exit(code)
    writer.close()
    try:
        start = time.perf_counter()
        for _ in range(count):
            got = reader.recv_bytes()
        elapsed = time.perf_counter() - start
        if got != message:
            raise AssertionError("the last message differs from the one sent")
    finally:
        reader.close()
        _, status = os.waitpid(pid, 0)
    if status != 0:
        raise AssertionError("the producer failed (wait status %d)" % status)
    return count * size / elapsed / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256K,1M,4M,16M,64M,256M")
    parser.add_argument("--pipes", default="256K,512K,1M")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--total", default="512M", help="bytes per run")
    args = parser.parse_args()
    sizes = [_size(s) for s in args.sizes.split(",")]
    pipes: list[int | None] = [None] + [_size(p) for p in args.pipes.split(",")]
    total = _size(args.total)
    runs: dict[tuple[int, int | None], list[float]] = {}
    for _ in range(args.rounds):
        for size in sizes:
            for pipe_size in pipes:
                runs.setdefault((size, pipe_size), []).append(measure(size, pipe_size, total))
    print("MB/s, median of %d rounds; ratio to multiprocessing in brackets" % args.rounds)
    for size in sizes:
        base = statistics.median(runs[(size, None)])
        cells = ["%6s  mp %6.0f" % (_label(size), base)]
        for pipe_size in pipes[1:]:
            value = statistics.median(runs[(size, pipe_size)])
            cells.append("pipe %s %6.0f (%.2fx)" % (_label(pipe_size or 0), value, value / base))
        print(" | ".join(cells))


if __name__ == "__main__":
    main()
