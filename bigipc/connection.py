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

    def __init__(self, handle, readable=True, writable=True, *, max_message_size=None):
        super().__init__(handle.__index__(), readable, writable, max_message_size=max_message_size)

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
        adopted = cls(fd, conn.readable, conn.writable, max_message_size=max_message_size)
        # Detach the stdlib object from the fd: with _handle gone its close()
        # and __del__ leave the descriptor alone.
        conn._handle = None
        return adopted

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        if self.closed:
            return "<bigipc.Connection closed>"
        return "<bigipc.Connection fd=%d%s%s>" % (
            self.fileno(),
            " readable" if self.readable else "",
            " writable" if self.writable else "",
        )

    def send(self, obj, *, timeout=None):
        """Send a picklable object (pickled here, in the caller, protocol 5)."""
        self.send_bytes(_dumps(obj, _PROTOCOL), timeout=timeout)

    def recv(self, *, timeout=None):
        """Receive an object sent with ``send()``."""
        return _loads(self.recv_bytes(timeout=timeout))

    def __reduce_ex__(self, protocol):
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
