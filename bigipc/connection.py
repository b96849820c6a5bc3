"""``Connection`` and ``Pipe``: multiprocessing's point-to-point API on the core.

A bigipc ``Connection`` frames messages exactly as
``multiprocessing.connection.Connection`` does on POSIX, so either kind can
sit at either end of one pipe or socket. On top of the stdlib's API every
send and receive takes ``timeout=`` (keyword only): ``None`` blocks, a
number is the deadline for the whole call in seconds, ``0`` never blocks.
"""

import os
import pickle
import socket
from multiprocessing import connection as _mp_connection
from multiprocessing import reduction as _reduction

from bigipc import _platform
from bigipc._backend import Channel

__all__ = ["Connection", "Pipe", "wait"]

_dumps = _reduction.ForkingPickler.dumps
_loads = _reduction.ForkingPickler.loads
# Protocol 5 is what a stdlib peer reads too (pickle.loads takes any
# protocol), and the one that can carry buffers out of band.
_PROTOCOL = 5

# bigipc never reads ahead of the message it returns, so the readiness of
# the descriptor is the whole truth and multiprocessing's wait() serves as
# is (it takes any object with fileno()).
wait = _mp_connection.wait


class Connection:
    """A connection over one pipe or socket file descriptor.

    ``Connection(fd, readable=True, writable=True)`` takes ownership of
    ``fd``. ``max_message_size`` (``None``: unlimited) caps the length a
    received header may announce; a longer one raises ``FrameError`` before
    anything is allocated.

    Sends from several threads never interleave; receives from several
    threads each get whole messages.
    """

    __slots__ = ("_channel", "__weakref__")

    def __init__(self, handle, readable=True, writable=True, *, max_message_size=None):
        self._channel = Channel(handle.__index__(), readable, writable, max_message_size=max_message_size)

    @classmethod
    def adopt(cls, conn, *, max_message_size=None):
        """Take over a ``multiprocessing.connection.Connection`` in place.

        The returned bigipc Connection uses the same file descriptor (same
        number, same direction); ``conn`` is left closed without closing the
        descriptor, so nothing can use it behind bigipc's back. Data the peer
        has sent and nobody has read yet is received by the new object.
        """
        if not isinstance(conn, _mp_connection.Connection):
            raise TypeError("adopt() takes a multiprocessing.connection.Connection, not %s" % type(conn).__name__)
        fd = conn.fileno()  # raises OSError("handle is closed") when it is
        readable, writable = conn.readable, conn.writable
        adopted = cls(fd, readable, writable, max_message_size=max_message_size)
        # Detach the stdlib object from the fd: with _handle gone its close()
        # and __del__ leave the descriptor alone.
        conn._handle = None
        return adopted

    # -- state -------------------------------------------------------------

    @property
    def closed(self):
        """True once ``close()`` was called."""
        return self._channel.closed

    @property
    def readable(self):
        """True if the connection can receive."""
        return self._channel.readable

    @property
    def writable(self):
        """True if the connection can send."""
        return self._channel.writable

    @property
    def max_message_size(self):
        """Largest message length a received header may announce (None: any)."""
        return self._channel.max_message_size

    @max_message_size.setter
    def max_message_size(self, value):
        self._channel.max_message_size = value

    @property
    def send_pending(self):
        """Bytes of a timed-out send that still go out before the next one."""
        return self._channel.send_pending

    def fileno(self):
        """The file descriptor."""
        return self._channel.fileno()

    def close(self):
        """Close the connection. Idempotent."""
        self._channel.close()

    def detach(self):
        """Return the file descriptor without closing it (flags restored)."""
        return self._channel.detach()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        channel = self._channel
        if channel.closed:
            return "<bigipc.Connection closed>"
        return "<bigipc.Connection fd=%d%s%s>" % (
            channel.fileno(),
            " readable" if channel.readable else "",
            " writable" if channel.writable else "",
        )

    # -- bytes -------------------------------------------------------------

    def send_bytes(self, buf, offset=0, size=None, *, timeout=None):
        """Send ``buf[offset:offset+size]`` (any buffer, offsets in bytes) as one
        message, written straight from the caller's memory."""
        self._channel.send_bytes(buf, offset, size, timeout)

    def recv_bytes(self, maxlength=None, *, timeout=None):
        """Receive one message as ``bytes``.

        A message longer than ``maxlength`` raises ``MessageTooLong`` (an
        ``OSError``, as the stdlib's "bad message length") and stays pending,
        unlike the stdlib, which closes the connection.
        """
        return self._channel.recv_bytes(maxlength, timeout)

    def recv_bytes_into(self, buf, offset=0, *, timeout=None):
        """Receive one message into ``buf`` at byte ``offset``; return its size.

        When it does not fit, the message is consumed and
        ``BufferTooShort(message)`` is raised, as in the stdlib.
        """
        return self._channel.recv_bytes_into(buf, offset, timeout)

    def flush(self, *, timeout=None):
        """Finish a send that timed out part way; no-op when none is pending."""
        self._channel.flush(timeout)

    # -- objects -----------------------------------------------------------

    def send(self, obj, *, timeout=None):
        """Send a picklable object (pickled in the caller, protocol 5)."""
        self._channel.send_bytes(_dumps(obj, _PROTOCOL), 0, None, timeout)

    def recv(self, *, timeout=None):
        """Receive an object sent with ``send()``."""
        return _loads(self._channel.recv_bytes(None, timeout))

    def poll(self, timeout=0.0):
        """Whether data (or end of file) is waiting; waits up to ``timeout``
        seconds (``None``: forever). A message may still be only partly there:
        use ``recv(timeout=...)`` for a bounded receive."""
        return self._channel.poll(timeout)

    def __getstate__(self):
        raise TypeError(
            "a bigipc Connection can only be pickled by multiprocessing: as a Process "
            "argument or sent over another Connection"
        )


def _reduce_connection(conn):
    # Same hand-over as the stdlib's: DupFd passes the descriptor to a child
    # being started (spawn, forkserver) or through the resource sharer to a
    # running process.
    handle = _reduction.DupFd(conn.fileno())
    return _rebuild_connection, (handle, conn.readable, conn.writable, conn.max_message_size)


def _rebuild_connection(handle, readable, writable, max_message_size):
    return Connection(handle.detach(), readable, writable, max_message_size=max_message_size)


_reduction.register(Connection, _reduce_connection)


def Pipe(duplex=True, *, buffer_size=None, max_message_size=None):
    """Return a pair ``(conn1, conn2)`` of connected ``Connection`` objects.

    ``duplex=True`` gives a socket pair (both ends send and receive);
    ``duplex=False`` a pipe: ``conn1`` receives, ``conn2`` sends.
    ``buffer_size`` is the kernel buffer to ask for: for a pipe the system
    maximum by default (``/proc/sys/fs/pipe-max-size`` on Linux), for sockets
    4 MiB (capped by the kernel); ``0`` keeps the kernel's default.
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
