"""What the study scripts in this directory share: one timed transfer from a
forked producer to the calling process, and sizes written as ``512K``.

The scripts run as ``python benchmarks/<name>.py``, which puts this
directory first on ``sys.path``. Linux (and other systems with fork).
"""

from __future__ import annotations

import os
import time
from typing import Any

_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """``"512K"`` -> 524288; a plain number is bytes."""
    text = text.strip().upper()
    if text[-1:] in _UNITS:
        return int(text[:-1]) * _UNITS[text[-1]]
    return int(text)


def size_label(size: int) -> str:
    """524288 -> ``"512K"``: the largest unit that divides the size."""
    for unit in "GMK":
        if size >= _UNITS[unit] and size % _UNITS[unit] == 0:
            return "%d%s" % (size // _UNITS[unit], unit)
    return str(size)


def timed_transfer(
    reader: Any, writer: Any, message: bytes, count: int, batches: bool = False
) -> tuple[float, float]:
    """Send ``message`` ``count`` times with ``writer.send_bytes`` from a forked
    producer and take them here with ``reader.recv_bytes()``, or with
    ``reader.recv_many()`` if ``batches``. Return (seconds, CPU seconds of
    this process) from the first receive to the last. Closes both ends;
    raises ``AssertionError`` if a message checked differs (the last one;
    every one in batches) or the producer failed.
    """
    receive = reader.recv_many if batches else reader.recv_bytes
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
        start, cpu = time.perf_counter(), time.process_time()
        if batches:
            left = count
            while left > 0:
                got = receive()
                left -= len(got)
                # Each message on its own, as a one-by-one consumer sees it.
                for one in got:
                    if one != message:
                        left = -1
            good = left == 0
        else:
            for _ in range(count):
                got = receive()
            good = got == message
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        if not good:
            raise AssertionError("the messages received differ from the ones sent")
    finally:
        reader.close()
        _, status = os.waitpid(pid, 0)
    if status != 0:
        raise AssertionError("the producer failed (wait status %d)" % status)
    return elapsed, cpu
