"""Kernel buffer tuning for the descriptors bigipc creates.

Bigger kernel buffers mean fewer wake-ups per megabyte: with the default
64 KiB Linux pipe a writer and a reader hand over control every 64 KiB.
Bigger is not always faster for a pipe, though: the compiled core copies the
last pipe-capacity bytes of a large ``bytes`` message and hands the rest over
by reference (docs/protocol.md, "vmsplice"), so a smaller pipe lets more of a
message go without a copy. ``DEFAULT_PIPE_SIZE`` is the measured balance.
Every adjustment here is best effort; a refusal leaves the default.
"""

from __future__ import annotations

import contextlib
import fcntl
import socket
import sys

# fcntl.F_SETPIPE_SZ appeared in Python 3.10; the value is Linux's ABI.
_LINUX = sys.platform.startswith("linux")
_F_SETPIPE_SZ: int | None = getattr(fcntl, "F_SETPIPE_SZ", 1031 if _LINUX else None)
_F_GETPIPE_SZ: int | None = getattr(fcntl, "F_GETPIPE_SZ", 1032 if _LINUX else None)

# Socket buffer asked for on duplex pairs. The kernel caps it (Linux at
# net.core.wmem_max / rmem_max, 208 KiB by default); asking is harmless.
DEFAULT_SOCKET_BUFFER = 4 << 20

# Pipe size asked for by Pipe(duplex=False) (capped at the system maximum).
# Measured with 1 MiB to 256 MiB messages (docs/protocol.md): 256 KiB is the
# fastest up to a few MiB but erratic for 256 MiB, 1 MiB copies a 1 MiB
# message whole; 512 KiB is close to the best at every size.
DEFAULT_PIPE_SIZE = 512 << 10

_pipe_max_cache: int | None = None


def pipe_max_size() -> int:
    """The largest pipe an unprivileged process may ask for (Linux), else 0."""
    global _pipe_max_cache
    if _pipe_max_cache is None:
        try:
            with open("/proc/sys/fs/pipe-max-size") as f:
                _pipe_max_cache = int(f.read())
        except (OSError, ValueError):
            _pipe_max_cache = 0
    return _pipe_max_cache


def default_pipe_size() -> int:
    """The size ``set_pipe_size(fd, None)`` asks for (0: none, not Linux).

    Where the system maximum cannot be read, 512 KiB is asked for anyway:
    a kernel that allows less refuses, and the pipe keeps its size.
    """
    if _F_SETPIPE_SZ is None:
        return 0
    largest = pipe_max_size()
    return min(DEFAULT_PIPE_SIZE, largest) if largest else DEFAULT_PIPE_SIZE


def set_pipe_size(fd: int, size: int | None) -> int:
    """Resize the pipe behind ``fd``; return its size afterwards (0 if unknown).

    ``None`` asks for ``default_pipe_size()``, ``0`` leaves the pipe alone.
    Failure (not Linux, EPERM past the per-user pipe quota, EBUSY when the
    pipe holds more data than the new size) keeps the current size.
    """
    if _F_SETPIPE_SZ is None or _F_GETPIPE_SZ is None:
        return 0
    if size is None:
        size = default_pipe_size()
    if size:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, _F_SETPIPE_SZ, size)
    try:
        return fcntl.fcntl(fd, _F_GETPIPE_SZ)
    except OSError:
        return 0


def set_socket_buffers(sock: socket.socket, size: int | None) -> None:
    """Ask for ``size``-byte send and receive buffers (None: the default)."""
    if size is None:
        size = DEFAULT_SOCKET_BUFFER
    if not size:
        return
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, size)
