"""bigipc: fast, framed, timeout-aware IPC between processes over pipes.

Drop-in replacements for ``multiprocessing``'s ``Pipe``/``Connection``,
``Queue``, ``SimpleQueue`` and ``JoinableQueue``, with a compiled core that
moves message bytes without user-space copies and honours deadlines in both
directions. The queues need no ``/dev/shm`` and survive a killed peer.
"""

import sys

if sys.platform == "win32":  # pragma: no cover - checked on POSIX only
    raise ImportError(
        "bigipc supports POSIX systems only (Linux, macOS, BSD): it works on raw "
        "pipe and socket file descriptors, which Windows does not have"
    )

from bigipc._backend import IMPLEMENTATION
from bigipc._errors import (
    BufferTooShort,
    FrameError,
    MessageTooLong,
    MultipartMessageError,
    TruncatedMessageError,
)
from bigipc._version import __version__
from bigipc.connection import Connection, Pipe, wait
from bigipc.queues import JoinableQueue, Queue, QueueClosedError, SimpleQueue

__all__ = [
    "IMPLEMENTATION",
    "BufferTooShort",
    "Connection",
    "FrameError",
    "JoinableQueue",
    "MessageTooLong",
    "MultipartMessageError",
    "Pipe",
    "Queue",
    "QueueClosedError",
    "SimpleQueue",
    "TruncatedMessageError",
    "__version__",
    "wait",
]
