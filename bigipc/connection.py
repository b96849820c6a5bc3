"""``Connection`` and ``Pipe``: multiprocessing's point-to-point API on the core.

A bigipc ``Connection`` frames messages exactly as
``multiprocessing.connection.Connection`` does on POSIX, so either kind can
sit at either end of one pipe or socket. One exception: ``send()`` of an
object holding a large buffer (a numpy array, say) uses a multipart message
that only bigipc reads; set ``out_of_band_threshold = None`` on a connection
whose peer is a stdlib one (``Connection.adopt`` does so). On top of the stdlib's API every
send and receive takes ``timeout=`` (keyword only): ``None`` blocks, a
number is the deadline for the whole call in seconds, ``0`` never blocks.
"""

from __future__ import annotations

import io
import os
import pickle
import socket
import time
from multiprocessing import connection as _mp_connection
from multiprocessing import reduction as _reduction
from typing import Any, Callable, NoReturn, Protocol, SupportsIndex, TypeVar

from bigipc import _platform
from bigipc._backend import Channel

__all__ = ["Connection", "Pipe", "wait"]

_ForkingPickler = _reduction.ForkingPickler
_loads = _ForkingPickler.loads
# Protocol 5 is what a stdlib peer reads too (pickle.loads takes any
# protocol), and the one that can carry buffers out of band.
_PROTOCOL = 5
# Buffers at least this large travel out of band: copying less costs less
# than the extra bookkeeping of a multipart message.
OUT_OF_BAND_THRESHOLD = 64 * 1024

_ConnectionT = TypeVar("_ConnectionT", bound="Connection")


class _Writable(Protocol):
    """What ``recv_bytes_to`` writes into: a binary file, a BytesIO, ..."""

    def write(self, data: memoryview, /) -> object: ...


def _out_of_band(buffers: list[memoryview], threshold: int) -> Callable[[pickle.PickleBuffer], bool]:
    """A pickler ``buffer_callback`` that appends buffers of at least
    ``threshold`` bytes to ``buffers`` (out of band) and keeps the rest in band."""

    def callback(buffer: pickle.PickleBuffer) -> bool:
        view = buffer.raw()
        if view.nbytes < threshold:
            return True  # in band
        buffers.append(view)
        return False

    return callback


def _dumps(obj: Any, threshold: int | None) -> tuple[memoryview, list[memoryview]]:
    """Pickle ``obj``; return (pickle data, out-of-band buffers)."""
    buffers: list[memoryview] = []
    callback: Callable[[pickle.PickleBuffer], bool] | None
    if threshold is None:
        callback = None
    else:
        # Pickled as a PickleBuffer, a top-level bytes or bytearray goes out
        # of band too and unpickles as the very object received.
        if (type(obj) is bytes or type(obj) is bytearray) and len(obj) >= threshold:
            obj = pickle.PickleBuffer(obj)

        callback = _out_of_band(buffers, threshold)

    out = io.BytesIO()
    # ForkingPickler passes only positional arguments on to the Pickler:
    # (file, protocol, fix_imports, buffer_callback).
    _ForkingPickler(out, _PROTOCOL, True, callback).dump(obj)
    return out.getbuffer(), buffers


# bigipc never reads ahead of the message it returns, so the readiness of
# the descriptor is the whole truth and multiprocessing's wait() serves as
# is (it takes any object with fileno()).
wait = _mp_connection.wait


class Connection(Channel):
    """A connection over one pipe or socket file descriptor.

    ``Connection(fd, readable=True, writable=True)`` takes ownership of
    ``fd``. ``max_message_size`` (``None``: unlimited) caps the length a
    received header may announce; a longer one raises ``FrameError`` before
    anything is allocated.

    The byte-level methods (``send_bytes``, ``recv_bytes``,
    ``recv_bytes_into``, ``poll``, ``flush``, ``send_parts``, ``fileno``,
    ``close``, ``detach``) are the core's own, called with no Python layer in
    between; this class adds objects (pickling) and the stdlib's manners.

    Sends from several threads never interleave; receives from several
    threads each get whole messages.
    """

    def __init__(
        self,
        handle: SupportsIndex,
        readable: bool = True,
        writable: bool = True,
        *,
        max_message_size: int | None = None,
    ) -> None:
        super().__init__(handle.__index__(), readable, writable, max_message_size=max_message_size)

    @classmethod
    def adopt(
        cls: type[_ConnectionT], conn: _mp_connection.Connection, *, max_message_size: int | None = None
    ) -> _ConnectionT:
        """Take over a ``multiprocessing.connection.Connection`` in place.

        The returned bigipc Connection uses the same file descriptor (same
        number, same direction); ``conn`` is left closed without closing the
        descriptor, so nothing can use it behind bigipc's back. Data the peer
        has sent and nobody has read yet is received by the new object.
        """
        if not isinstance(conn, _mp_connection.Connection):
            raise TypeError(
                "adopt() takes a multiprocessing.connection.Connection, not %s" % type(conn).__name__
            )
        fd = conn.fileno()  # raises OSError("handle is closed") when it is
        adopted = cls(fd, conn.readable, conn.writable, max_message_size=max_message_size)
        # The peer of an adopted connection is most likely a stdlib one,
        # which cannot read multipart messages.
        adopted.out_of_band_threshold = None
        # Detach the stdlib object from the fd: with _handle gone its close()
        # and __del__ leave the descriptor alone.
        conn._handle = None  # type: ignore[attr-defined]  # private, not in typeshed
        return adopted

    def __enter__(self: _ConnectionT) -> _ConnectionT:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return "<bigipc.Connection closed>"
        return "<bigipc.Connection fd=%d%s%s>" % (
            self.fileno(),
            " readable" if self.readable else "",
            " writable" if self.writable else "",
        )

    def recv_bytes_to(
        self,
        file: _Writable,
        *,
        chunk_size: int = 1 << 20,
        maxlength: int | None = None,
        timeout: float | None = None,
    ) -> int:
        """Stream the next message into ``file`` (anything with ``write()``:
        an open binary file, a BytesIO, a socket's makefile) one chunk at a
        time, so it may be larger than free memory. Return the number of bytes
        written.

        ``timeout`` is one deadline for the whole message. On ``TimeoutError``
        the bytes written so far stay written and the next call of this
        method writes the rest; other receives refuse (``ValueError``) until
        the message is finished.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        remaining = self.recv_begin(maxlength, timeout=timeout)
        chunk = memoryview(bytearray(max(1, min(chunk_size, remaining))))
        written = 0
        while remaining:
            left = None if deadline is None else deadline - time.monotonic()
            n = self.recv_chunk_into(chunk[: min(remaining, len(chunk))], timeout=left)
            file.write(chunk[:n])
            remaining -= n
            written += n
        return written

    #: Buffers of at least this many bytes inside a sent object (numpy
    #: arrays, ``PickleBuffer``, a top-level bytes or bytearray) travel out of
    #: band: written from the object's memory and read straight into the
    #: receiver's. Such a message is multipart, which only bigipc reads; set
    #: ``None`` on a connection whose peer is a stdlib Connection.
    out_of_band_threshold: int | None = OUT_OF_BAND_THRESHOLD

    def send(self, obj: Any, *, timeout: float | None = None) -> None:
        """Send a picklable object, pickled here in the caller (protocol 5);
        large buffers go out of band (see ``out_of_band_threshold``)."""
        data, buffers = _dumps(obj, self.out_of_band_threshold)
        if buffers:
            self.send_multipart([data, *buffers], timeout=timeout)
        else:
            self.send_bytes(data, timeout=timeout)

    def recv(self, *, timeout: float | None = None) -> Any:
        """Receive an object sent with ``send()`` (by bigipc or the stdlib)."""
        message = self.recv_message(timeout=timeout)
        if type(message) is list:
            return _loads(message[0], buffers=message[1:])
        return _loads(message)

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        raise TypeError(
            "a bigipc Connection can only be pickled by multiprocessing: as a Process "
            "argument or sent over another Connection"
        )


def _reduce_connection(conn: Connection) -> tuple[Callable[..., Connection], tuple[Any, ...]]:
    # Same hand-over as the stdlib's: DupFd passes the descriptor to a child
    # being started (spawn, forkserver) or through the resource sharer to a
    # running process.
    handle = _reduction.DupFd(conn.fileno())
    return _rebuild_connection, (handle, conn.readable, conn.writable, conn.max_message_size)


def _rebuild_connection(
    handle: Any, readable: bool, writable: bool, max_message_size: int | None
) -> Connection:
    return Connection(handle.detach(), readable, writable, max_message_size=max_message_size)


_reduction.register(Connection, _reduce_connection)


def Pipe(
    duplex: bool = True, *, buffer_size: int | None = None, max_message_size: int | None = None
) -> tuple[Connection, Connection]:
    """Return a pair ``(conn1, conn2)`` of connected ``Connection`` objects.

    ``duplex=True`` gives a socket pair (both ends send and receive);
    ``duplex=False`` a pipe: ``conn1`` receives, ``conn2`` sends.
    ``buffer_size`` is the kernel buffer to ask for: for a pipe 512 KiB by
    default (capped at ``/proc/sys/fs/pipe-max-size`` on Linux; measured to be
    faster for large messages than the maximum, see docs/protocol.md), for
    sockets 4 MiB (capped by the kernel); ``0`` keeps the kernel's default.
    """
    if duplex:
        s1, s2 = socket.socketpair()
        try:
            for s in (s1, s2):
                _platform.set_socket_buffers(s, buffer_size)
            c1 = Connection(s1.detach(), max_message_size=max_message_size)
            c2 = Connection(s2.detach(), max_message_size=max_message_size)
        finally:
            s1.close()
            s2.close()
    else:
        r, w = os.pipe()
        _platform.set_pipe_size(w, buffer_size)
        c1 = Connection(r, writable=False, max_message_size=max_message_size)
        c2 = Connection(w, readable=False, max_message_size=max_message_size)
    return c1, c2
