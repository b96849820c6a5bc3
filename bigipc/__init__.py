"""bigipc: fast, framed, timeout-aware IPC between processes over pipes.

Drop-in replacements for ``multiprocessing``'s ``Pipe``/``Connection``
(and, as they land, its queues), with a compiled core that moves message
bytes without user-space copies and honours deadlines in both directions.
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

__all__ = [
    "IMPLEMENTATION",
    "BufferTooShort",
    "Connection",
    "FrameError",
    "MessageTooLong",
    "MultipartMessageError",
    "Pipe",
    "TruncatedMessageError",
    "__version__",
    "wait",
]
