"""Pure-Python core: the interface of ``bigipc/_core.pyi`` without a compiler.

Same frames, deadlines, errors and stream-sync rules as the compiled core,
built on ``os.read``/``os.readv``/``os.writev``, the socket methods and
``select.poll``. It is slower, and some payloads are copied once more (read
into a ``bytearray``, then turned into ``bytes``): those of ``recv_bytes``
over 64 KiB, and the parts of a multipart message sent from read-only memory.

Keeping the stream in sync when a signal handler raises: CPython runs Python
signal handlers between bytecodes: right after a C function returns, before
its result is stored, and (before 3.11) after any attribute store. So no
state here ever needs two stores to stay valid:

* every syscall that moves bytes runs as
  ``results.extend(starmap(syscall, (args,)))``: ``deque.extend`` appends
  the result (a byte count, or the bytes read) from C code, and progress is
  never kept anywhere else; it is read back from the results;
* a message being sent or received is one record (``_Outgoing``,
  ``_Incoming``) that a single store installs or retires; fields of a record
  change one at a time, each change leaving it valid;
* the tidy-up an exception triggers (copy the unsent rest out of the
  caller's buffer, move a partial payload out of the caller's buffer) is
  idempotent, and the next call redoes it if a second signal cut it short;
* ``recv_many`` reads ahead: the bytes it read past the received part of the
  current message wait in that message's record, and what its ``reads``
  took in says how many of them are used up. It takes them in on a copy of
  the record and installs the record its last message leaves with one
  store, so a handler that raises part way loses none of the messages.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import math
import operator
import os
import select
import socket
import stat
import struct
import sys
import threading
import time
import weakref
from bisect import bisect_right
from collections import deque
from itertools import accumulate, starmap
from typing import Any, NoReturn, Union

from bigipc._errors import (
    BufferTooShort,
    FrameError,
    MessageTooLong,
    MultipartMessageError,
    TruncatedMessageError,
)

__all__ = [
    "LONG_HEADER",
    "MAX_PARTS",
    "MAX_SHORT_LENGTH",
    "MULTIPART_HEADER",
    "VMSPLICE",
    "Channel",
    "QueueEnds",
]

LONG_HEADER = -1
MULTIPART_HEADER = -2
MAX_SHORT_LENGTH = 2**31 - 1
MAX_PARTS = 1 << 16
# Python has no vmsplice: this core always copies payloads into the kernel.
VMSPLICE = False

_SHORT_HEADER = struct.Struct("!i")
_LONG_LENGTH = struct.Struct("!Q")
_SHORT_HEADER_SIZE = _SHORT_HEADER.size
_LONG_HEADER_BYTES = _SHORT_HEADER.pack(LONG_HEADER)
_LONG_HEADER_SIZE = _SHORT_HEADER.size + _LONG_LENGTH.size
# A multipart message starts with MULTIPART_HEADER and its part count, then a
# table of one 8-byte length per part. The top bit of a length marks a part
# sent from read-only memory: it is delivered as bytes, the others as
# bytearray.
_MULTIPART_START = struct.Struct("!iI")
_MULTIPART_START_SIZE = _MULTIPART_START.size
_MULTIPART_HEADER_BYTES = _SHORT_HEADER.pack(MULTIPART_HEADER)
_READONLY_PART = 1 << 63
_PART_LENGTH = _READONLY_PART - 1

# A piece of an outgoing frame: a header, a small joined frame, a view of the
# caller's memory, or the kept copy of an unsent rest.
_Piece = Union[bytes, memoryview]

# A received message: a plain one's bytes, or a multipart one's parts.
_Message = Union[bytes, list[Union[bytes, bytearray]]]

# Frames up to this size (header included) are joined and written with one
# call: for a few bytes that is cheaper than an iovec (multiprocessing joins
# below the same size).
_SMALL_FRAME = 16 * 1024

# Payloads up to this size are read with os.read()/recv(), which return the
# final bytes object when the whole payload is there (the usual case), instead
# of into a bytearray that is then copied.
_SMALL_PAYLOAD = 64 * 1024

# macOS rejects reads and writes of more than INT_MAX bytes (EINVAL), and Linux
# moves at most 0x7ffff000 bytes per call anyway.
_MAX_IO_SIZE = 1 << 30

# Most bytes recv_many reads in one call: a pipe holds less anyway, and the
# read allocates what it asks for.
_MAX_BATCH_READ = 1 << 20


def _iov_max() -> int:
    try:
        value = os.sysconf("SC_IOV_MAX")
    except (ValueError, OSError):
        value = -1
    # 16 is the POSIX minimum (_XOPEN_IOV_MAX).
    return value if value > 0 else 16


# writev() and sendmsg() fail (EINVAL, EMSGSIZE) with more iovecs than this.
_IOV_MAX = _iov_max()

# poll() takes a C int of milliseconds.
_MAX_POLL_MS = 2**31 - 1

# Sockets keep their blocking mode (code such as
# multiprocessing.reduction.recv_handle does its own blocking I/O on them), so
# each call asks for non-blocking behaviour itself. MSG_NOSIGNAL turns SIGPIPE
# into EPIPE where it exists (not on macOS; Python ignores SIGPIPE anyway).
_SEND_FLAGS = socket.MSG_DONTWAIT | getattr(socket, "MSG_NOSIGNAL", 0)
_RECV_FLAGS = socket.MSG_DONTWAIT

# The byte count in what socket.recvmsg_into() returns.
_first = operator.itemgetter(0)


def _deadline(timeout: float | None) -> float | None:
    """The absolute monotonic time at which a call with ``timeout`` gives up."""
    if timeout is None:
        return None
    if timeout != timeout:
        raise ValueError("timeout must not be NaN")
    return time.monotonic() + timeout


def _poll_ms(remaining: float) -> int:
    """``remaining`` seconds as a poll() timeout: rounded up, so a wait never
    ends before the deadline, and clamped to a C int."""
    if remaining >= _MAX_POLL_MS / 1000:
        return _MAX_POLL_MS
    return math.ceil(remaining * 1000)


def _acquire(lock: threading.Lock, deadline: float | None, held: deque[bool], what: str) -> None:
    """Take ``lock`` before ``deadline``; append ``True`` to ``held`` once it is ours.

    ``held`` is filled from C code (see the module docstring), so the caller's
    ``finally`` knows whether to release even if a signal handler raises right
    after the lock was taken. Callers bind ``lock.release`` before their
    ``try``: CPython before 3.10 may run a signal handler after an attribute
    lookup, and one in the ``finally`` would skip the release.
    """
    args: tuple[bool, float]
    if deadline is None:
        args = (True, -1)
    else:
        remaining = deadline - time.monotonic()
        args = (True, min(remaining, threading.TIMEOUT_MAX)) if remaining > 0 else (False, -1)
    held.extend(filter(None, starmap(lock.acquire, (args,))))
    if not held:
        raise TimeoutError("timed out waiting for another thread's %s" % what)


def _byte_view(obj: Any) -> memoryview:
    """``obj``'s memory as a flat view of bytes (offsets and sizes are in bytes)."""
    view = memoryview(obj)
    if view.ndim == 1 and view.format == "B":
        return view
    if not view.nbytes:
        # cast() refuses a shape with a zero in it (an empty 2-D array).
        readonly = view.readonly
        view.release()
        return memoryview(b"" if readonly else bytearray())
    return view.cast("B")


def _frame_header(size: int) -> bytes:
    if size <= MAX_SHORT_LENGTH:
        return _SHORT_HEADER.pack(size)
    return _LONG_HEADER_BYTES + _LONG_LENGTH.pack(size)


def _iovec(pieces: list[_Piece], index: int, start: int) -> list[_Piece]:
    """The buffers of the next write: from byte ``start`` of ``pieces[index]``
    on, at most IOV_MAX of them and ``_MAX_IO_SIZE`` bytes in all."""
    first: _Piece = pieces[index]
    if start or len(first) > _MAX_IO_SIZE:
        first = memoryview(first)[start : start + _MAX_IO_SIZE]
    iovec = [first]
    room = _MAX_IO_SIZE - len(first)
    for piece in pieces[index + 1 : index + _IOV_MAX]:
        if room <= 0:
            break
        if len(piece) > room:
            piece = memoryview(piece)[:room]
        iovec.append(piece)
        room -= len(piece)
    return iovec


def _unsent(pieces: list[_Piece], done: int) -> list[_Piece]:
    """What is left of ``pieces`` (written back to back) after ``done`` bytes."""
    rest: list[_Piece] = []
    for piece in pieces:
        size = len(piece)
        if done >= size:
            done -= size
            continue
        rest.append(memoryview(piece)[done:] if done else piece)
        done = 0
    return rest


def _keep(piece: _Piece) -> _Piece:
    """``piece`` when immutable ``bytes`` back it, else a copy: the caller may
    reuse its buffer as soon as the send returns."""
    if isinstance(piece, bytes) or type(piece.obj) is bytes:
        return piece
    return bytes(piece)


def _header_size(header: bytes) -> int:
    """The size of the header that ``header`` begins, as far as its bytes
    tell: a multipart header's ends with its table of part lengths."""
    if len(header) < _SHORT_HEADER_SIZE:
        return _SHORT_HEADER_SIZE
    kind = header[:_SHORT_HEADER_SIZE]
    if kind == _LONG_HEADER_BYTES:
        return _LONG_HEADER_SIZE
    if kind != _MULTIPART_HEADER_BYTES:
        return _SHORT_HEADER_SIZE
    if len(header) < _MULTIPART_START_SIZE:
        return _MULTIPART_START_SIZE
    count: int = _MULTIPART_START.unpack_from(header)[1]
    return _MULTIPART_START_SIZE + 8 * count


def _table_words(header: bytes) -> tuple[int, ...]:
    """The entries of a complete multipart header's table of part lengths."""
    count = (len(header) - _MULTIPART_START_SIZE) // 8
    return struct.unpack_from("!%dQ" % count, header, _MULTIPART_START_SIZE)


def _check_max_message_size(value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("max_message_size must be None or >= 0")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError("max_message_size must be None or >= 0") from None
    if value < 0:
        raise ValueError("max_message_size must be None or >= 0")
    return value


class _Outgoing:
    """A message being sent, or the unsent rest of one.

    ``pieces`` go out back to back, ``total`` bytes in all; every write
    appends its byte count to ``counts``. ``new``: the send call that made
    this record is still running, and drops it if it fails before the first
    byte (a send that wrote nothing sends nothing).
    """

    __slots__ = ("counts", "new", "pieces", "total")

    def __init__(self, pieces: list[_Piece], total: int, new: bool) -> None:
        self.pieces = pieces
        self.total = total
        self.new = new
        self.counts: deque[int] = deque()


class _Incoming:
    """The message being received.

    ``reads`` holds the result of every read of it, in order: ``bytes`` read
    as a new object (header pieces; the first piece of a plain payload), or
    the count of payload bytes read into ``payload`` (the held buffer of a
    partly received plain payload), ``parts`` (a multipart message's) or,
    during recv_bytes_into, the caller's buffer. ``target`` is ``(caller's
    view, bytes of the payload in payload)`` while recv_bytes_into reads into
    the caller's buffer.

    ``ahead`` holds a chunk recv_many read past what ``reads`` took in; it
    starts at byte ``ahead_base`` of everything the message received, so
    ``reads`` tells how much of it is used up. ``stream`` is set while the
    message is being streamed (recv_begin).
    """

    __slots__ = ("ahead", "ahead_base", "parts", "payload", "reads", "stream", "target")

    def __init__(self, ahead: bytes = b"", ahead_base: int = 0) -> None:
        self.reads: deque[Any] = deque()
        self.payload: bytearray | None = None
        self.parts: list[bytearray] | None = None
        self.target: tuple[memoryview, int] | None = None
        self.ahead: deque[bytes] | None = deque((ahead,)) if ahead else None
        self.ahead_base = ahead_base
        self.stream: _Stream | None = None

    def copy(self) -> _Incoming:
        """A record in the same state to work on; the buffers are shared."""
        twin = _Incoming()
        twin.reads.extend(self.reads)
        twin.payload = self.payload
        twin.parts = self.parts
        if self.ahead is not None:
            twin.ahead = deque(self.ahead)
        twin.ahead_base = self.ahead_base
        return twin


class _Stream:
    """A message being streamed: ``delivered`` of its payload bytes reached
    the caller; ``chunk`` holds the last read made for the caller, payload
    bytes from byte ``base`` on (read as a new object, so that bytes a
    signal handler kept from the caller stay here)."""

    __slots__ = ("base", "chunk", "delivered")

    def __init__(self) -> None:
        self.delivered = 0
        self.chunk: deque[bytes] = deque()
        self.base = 0


def _received(reads: deque[Any]) -> tuple[bytes, int, int]:
    """Read the state of a message back from the results of its reads: the
    header bytes, the payload bytes received, and the index in ``reads`` of a
    payload piece read as ``bytes`` (-1 if none)."""
    header = b""
    got = 0
    piece_at = -1
    for index, result in enumerate(reads):
        if type(result) is int:
            got += result
        elif len(header) < _header_size(header):
            # Header reads stop at the header's end: a bytes result belongs
            # to the header until it is complete.
            header += result
        elif result:
            got += len(result)
            piece_at = index
    return header, got, piece_at


def _held_payload(incoming: _Incoming, length: int) -> bytearray:
    """The buffer that holds ``incoming``'s plain payload, made if there is
    none, with a payload piece that was read as ``bytes`` moved into it."""
    payload = incoming.payload
    _, _, piece_at = _received(incoming.reads)
    if piece_at >= 0:
        piece = incoming.reads[piece_at]
        if payload is None:
            payload = bytearray(length)
            payload[: len(piece)] = piece
            incoming.payload = payload
        else:
            payload[: len(piece)] = piece
        incoming.reads[piece_at] = len(piece)
    elif payload is None:
        payload = incoming.payload = bytearray(length)
    return payload


def _finished_payload(incoming: _Incoming, length: int) -> bytes:
    """``incoming``'s plain payload, received whole, as ``bytes``."""
    reads = incoming.reads
    _, _, piece_at = _received(reads)
    if piece_at >= 0 and len(reads[piece_at]) == length:
        piece: bytes = reads[piece_at]
        return piece
    if not length:
        return b""
    return bytes(_held_payload(incoming, length))


def _held_parts(incoming: _Incoming, header: bytes) -> list[bytearray]:
    """The objects ``incoming``'s multipart payload is read into, made on
    first use."""
    parts = incoming.parts
    if parts is None:
        parts = incoming.parts = [bytearray(word & _PART_LENGTH) for word in _table_words(header)]
    return parts


def _finished_parts(parts: list[bytearray], header: bytes) -> list[bytes | bytearray]:
    """A multipart message's parts, received whole, as delivered: ``bytes``
    for those sent from read-only memory."""
    return [bytes(part) if word & _READONLY_PART else part for part, word in zip(parts, _table_words(header))]


def _ahead_left(incoming: _Incoming) -> int:
    """How many bytes read ahead ``incoming`` holds that its message has yet
    to take in (or that are the next messages')."""
    ahead = incoming.ahead
    if not ahead:
        return 0
    header, got, _ = _received(incoming.reads)
    return max(0, len(ahead[0]) - (len(header) + got - incoming.ahead_base))


def _successor(incoming: _Incoming) -> _Incoming:
    """The record of the message after ``incoming``'s, which inherits the
    bytes read ahead past it."""
    if incoming.ahead is None:
        return _Incoming()
    left = _ahead_left(incoming)
    if not left:
        return _Incoming()
    assert incoming.ahead is not None  # bytes are left
    chunk = incoming.ahead[0]
    return _Incoming(chunk, left - len(chunk))


class _BorrowedSocket(socket.socket):
    """A socket object over a descriptor that a Channel owns.

    ``socket.socket`` closes its descriptor when it is finalized, and the
    garbage collector may finalize it before the Channel that owns the
    descriptor (objects in a collected cycle are finalized in any order).
    This one lets go of the descriptor instead.
    """

    __slots__ = ()

    def __del__(self) -> None:
        self.detach()


def _borrow_socket(fd: int) -> _BorrowedSocket:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    sock = _BorrowedSocket(fileno=fd)
    if sock.gettimeout() is not None:
        # socket.setdefaulttimeout() is in effect: the constructor made the
        # descriptor non-blocking, and the socket methods would wait on their
        # own after EAGAIN. Undo both.
        try:
            sock.settimeout(None)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        except BaseException:
            sock.detach()
            raise
    return sock


# Every live Channel, so that a forked child can replace their locks: a lock
# held by another thread at fork() time would stay held in the child, where
# that thread does not exist.
_live_channels: weakref.WeakSet[Channel] = weakref.WeakSet()


def _renew_locks_after_fork() -> None:
    for channel in list(_live_channels):
        channel._send_lock = threading.Lock()
        channel._recv_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_locks_after_fork)


class Channel:
    """One end of a framed byte stream; owns its file descriptor.

    Non-socket descriptors are put in non-blocking mode (``detach()`` restores
    it); sockets keep their flags and get ``MSG_DONTWAIT`` per call.
    Thread-safe: one lock per direction, taken against the call's deadline.
    """

    # What close() and __del__ see when __init__ stopped early.
    _fd = -1
    _sock: _BorrowedSocket | None = None

    def __init__(
        self,
        fd: int,
        readable: bool = True,
        writable: bool = True,
        *,
        max_message_size: int | None = None,
    ) -> None:
        """Take ownership of ``fd``."""
        fd = operator.index(fd)
        if fd < 0:
            raise ValueError("invalid file descriptor")
        if not readable and not writable:
            raise ValueError("at least one of `readable` and `writable` must be True")
        limit = _check_max_message_size(max_message_size)
        sock = None
        made_nonblocking = False
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            sock = _borrow_socket(fd)
        else:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            if not flags & os.O_NONBLOCK:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
                made_nonblocking = True
        self._readable = bool(readable)
        self._writable = bool(writable)
        self._sock = sock
        self._made_nonblocking = made_nonblocking
        # Only this process undoes O_NONBLOCK (see detach()).
        self._flags_pid = os.getpid()
        self._max_message_size = limit
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        _live_channels.add(self)
        # The message being sent or the unsent rest of one, if any.
        self._outgoing: _Outgoing | None = None
        # The message being received, and once the stream can no longer be
        # trusted, the error every receive raises.
        self._incoming = _Incoming()
        self._broken: FrameError | None = None
        self._fd = fd

    def __del__(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                self.close()

    def __repr__(self) -> str:
        if self._fd < 0:
            return "<%s closed>" % type(self).__name__
        return "<%s fd=%d>" % (type(self).__name__, self._fd)

    # -- properties -------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once ``close()`` or ``detach()`` was called."""
        return self._fd < 0

    @property
    def readable(self) -> bool:
        """True if the channel receives."""
        return self._readable

    @property
    def writable(self) -> bool:
        """True if the channel sends."""
        return self._writable

    @property
    def is_socket(self) -> bool:
        """True if the descriptor is a socket."""
        return self._sock is not None

    @property
    def max_message_size(self) -> int | None:
        """Largest length a received header may announce (``None``: no limit)."""
        return self._max_message_size

    @max_message_size.setter
    def max_message_size(self, value: int | None) -> None:
        self._max_message_size = _check_max_message_size(value)

    @property
    def spliced_bytes(self) -> int:
        """Always 0: this core sends every byte by copy."""
        return 0

    @property
    def send_pending(self) -> int:
        """Bytes (header included) of a timed-out send still to be written."""
        outgoing = self._outgoing
        if outgoing is None:
            return 0
        done = sum(outgoing.counts)
        if outgoing.new and not done:
            return 0
        return outgoing.total - done

    @property
    def recv_in_progress(self) -> bool:
        """True while a partly received message is held for the next receive."""
        incoming = self._incoming
        return any(incoming.reads) or _ahead_left(incoming) > 0

    def fileno(self) -> int:
        """The descriptor; ``OSError("handle is closed")`` once closed."""
        if self._fd < 0:
            raise OSError("handle is closed")
        return self._fd

    # -- closing ------------------------------------------------------------

    def close(self) -> None:
        """Close the descriptor. Idempotent. Unsent rest of a timed-out send is
        dropped (the peer then sees a truncated message)."""
        fd = self._fd
        if fd < 0:
            return
        self._give_up_fd()
        os.close(fd)

    def detach(self) -> int:
        """Give up ownership without closing: restore the descriptor's flags
        and return it. The channel is closed afterwards."""
        fd = self.fileno()
        if self._made_nonblocking and self._flags_pid == os.getpid():
            # A forked child detaching its inherited copy must not make the
            # parent's reads blocking behind its back: the flag lives on the
            # shared open file description.
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        self._give_up_fd()
        return fd

    def _give_up_fd(self) -> None:
        self._fd = -1
        if self._sock is not None:
            self._sock.detach()
            self._sock = None
        self._outgoing = None
        self._incoming = _Incoming()

    def _check_writable(self) -> None:
        if self._fd < 0:
            raise OSError("handle is closed")
        if not self._writable:
            raise OSError("connection is read-only")

    def _check_readable(self) -> None:
        if self._fd < 0:
            raise OSError("handle is closed")
        if not self._readable:
            raise OSError("connection is write-only")

    def _wait(self, events: int, deadline: float | None, what: str) -> None:
        """Block until the descriptor reports ``events`` (or hang-up/error) or
        the deadline passes; ``TimeoutError`` if it has passed."""
        ms: int | None = None
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out %s a message" % what)
            ms = _poll_ms(remaining)
        fd = self._fd
        if fd < 0:
            raise OSError("handle is closed")
        poller = select.poll()
        poller.register(fd, events)
        poller.poll(ms)

    # -- sending ------------------------------------------------------------

    def send_bytes(
        self, data: Any, offset: int = 0, size: int | None = None, *, timeout: float | None = None
    ) -> None:
        """Send ``data[offset:offset+size]`` (in bytes) as one message."""
        self._check_writable()
        deadline = _deadline(timeout)
        view = _byte_view(data)
        pieces: list[_Piece] = []
        try:
            length = len(view)
            if offset < 0:
                raise ValueError("offset is negative")
            if length < offset:
                raise ValueError("buffer length < offset")
            if size is None:
                size = length - offset
            elif size < 0:
                raise ValueError("size is negative")
            elif offset + size > length:
                raise ValueError("buffer length < offset + size")
            header = _frame_header(size)
            total = len(header) + size
            if total <= _SMALL_FRAME:
                pieces.append(header + view[offset : offset + size])
            else:
                pieces.append(header)
                pieces.append(view[offset : offset + size])
            self._send_frame(pieces, total, deadline)
        finally:
            # Let go of the caller's buffer now, not when the traceback of an
            # exception that is still referenced goes away (a bytearray cannot
            # be resized while a view of it lives); unless an interrupted
            # tidy-up left the message pending.
            self._drop_pieces(pieces)
            view.release()

    def send_parts(self, parts: Any, *, timeout: float | None = None) -> None:
        """Send the concatenation of the buffers in the sequence ``parts`` as
        one message, without joining them in memory."""
        self._check_writable()
        deadline = _deadline(timeout)
        views: list[memoryview] = []
        pieces: list[_Piece] = []
        try:
            views.extend([_byte_view(part) for part in parts])
            size = sum(map(len, views))
            header = _frame_header(size)
            total = len(header) + size
            if total <= _SMALL_FRAME:
                pieces.append(header + b"".join(views))
            else:
                pieces.append(header)
                pieces.extend(view for view in views if len(view))
            self._send_frame(pieces, total, deadline)
        finally:
            # Dropping the views lets go of the callers' buffers (unless an
            # interrupted tidy-up left the message pending).
            self._drop_pieces(pieces)
            views.clear()

    def send_multipart(self, parts: Any, *, timeout: float | None = None) -> None:
        """Send the buffers of ``parts`` (1 to MAX_PARTS of them) as one
        multipart message, written from their own memory with one gather
        write; ``recv_message`` returns them as separate objects."""
        self._check_writable()
        parts = tuple(parts)
        count = len(parts)
        if not 1 <= count <= MAX_PARTS:
            raise ValueError("a multipart message has 1 to %d parts, not %d" % (MAX_PARTS, count))
        deadline = _deadline(timeout)
        views: list[memoryview] = []
        pieces: list[_Piece] = []
        try:
            views.extend([_byte_view(part) for part in parts])
            header = struct.pack(
                "!iI%dQ" % count,
                MULTIPART_HEADER,
                count,
                *[len(view) | (_READONLY_PART if view.readonly else 0) for view in views],
            )
            total = len(header) + sum(map(len, views))
            if total <= _SMALL_FRAME:
                pieces.append(header + b"".join(views))
            else:
                pieces.append(header)
                pieces.extend(view for view in views if len(view))
            self._send_frame(pieces, total, deadline)
        finally:
            # Dropping the views lets go of the callers' buffers (unless an
            # interrupted tidy-up left the message pending).
            self._drop_pieces(pieces)
            views.clear()

    def send_many(self, messages: Any, *, timeout: float | None = None) -> None:
        """Send each buffer of ``messages`` as its own plain message, written
        together with as few system calls as possible. Interrupted once some
        bytes are out, the unsent rest of the whole batch is pending as one
        unit (``send_pending``, ``flush()``)."""
        self._check_writable()
        messages = tuple(messages)
        if not messages:
            return
        deadline = _deadline(timeout)
        views: list[memoryview] = []
        pieces: list[_Piece] = []
        small: list[_Piece] = []  # consecutive small frames, joined into one piece
        try:
            views.extend([_byte_view(message) for message in messages])
            total = 0
            for view in views:
                header = _frame_header(len(view))
                size = len(header) + len(view)
                total += size
                if size <= _SMALL_FRAME:
                    small.append(header)
                    small.append(view)
                    continue
                if small:
                    pieces.append(b"".join(small))
                    small.clear()
                pieces.append(header)
                pieces.append(view)
            if small:
                pieces.append(b"".join(small))
                small.clear()
            self._send_frame(pieces, total, deadline)
        finally:
            # Dropping the views lets go of the callers' buffers (unless an
            # interrupted tidy-up left the batch pending).
            self._drop_pieces(pieces)
            small.clear()
            views.clear()

    def flush(self, *, timeout: float | None = None) -> None:
        """Write the rest of a send that timed out. No-op when none."""
        self._check_writable()
        deadline = _deadline(timeout)
        held: deque[bool] = deque()
        release = self._send_lock.release
        try:
            _acquire(self._send_lock, deadline, held, "send")
            self._settle_send()
            if self._outgoing is not None:
                self._write_out(deadline)
        finally:
            if held:
                release()

    def _send_frame(self, pieces: list[_Piece], total: int, deadline: float | None) -> None:
        """Send one frame (``total`` bytes in ``pieces``) after any pending rest."""
        held: deque[bool] = deque()
        release = self._send_lock.release
        try:
            _acquire(self._send_lock, deadline, held, "send")
            self._settle_send()
            if self._outgoing is not None:
                self._write_out(deadline)
            self._outgoing = _Outgoing(pieces, total, True)
            self._write_out(deadline)
        finally:
            if held:
                release()

    def _drop_pieces(self, pieces: list[_Piece]) -> None:
        outgoing = self._outgoing
        if outgoing is None or outgoing.pieces is not pieces:
            pieces.clear()

    def _write_out(self, deadline: float | None) -> None:
        """Write the outgoing record to its end."""
        outgoing = self._outgoing
        assert outgoing is not None
        try:
            self._write_pieces(outgoing, deadline)
        except BaseException:
            self._tidy_send()
            raise
        self._outgoing = None

    def _settle_send(self) -> None:
        """Finish a tidy-up that a second exception cut short."""
        outgoing = self._outgoing
        if outgoing is not None and (outgoing.new or outgoing.counts):
            self._tidy_send()

    def _tidy_send(self) -> None:
        """Bring the send state to rest after an interrupted write: keep the
        unsent rest, copied out of the caller's memory, or nothing if nothing
        of a new message was written."""
        outgoing = self._outgoing
        if outgoing is None:
            return
        done = sum(outgoing.counts)
        rest: list[_Piece] = []
        if done or not outgoing.new:
            rest = [_keep(piece) for piece in _unsent(outgoing.pieces, done)]
        self._outgoing = _Outgoing(rest, sum(map(len, rest)), False) if rest else None
        # The frames of the traceback still reference this list: empty it so
        # that it stops pinning the caller's buffer.
        outgoing.pieces.clear()

    def _write_pieces(self, outgoing: _Outgoing, deadline: float | None) -> None:
        """Write what is left of ``outgoing``."""
        pieces = outgoing.pieces
        counts = outgoing.counts
        sock = self._sock
        done = sum(counts)
        last = len(pieces) - 1
        index = 0  # pieces[index] holds the next byte to write
        end = len(pieces[0])  # and ends at this byte of the whole
        while True:
            while done >= end:
                if index == last:
                    return
                index += 1
                end += len(pieces[index])
            try:
                if not done and not last and end <= _MAX_IO_SIZE:
                    # A single piece from its start: the common small frame.
                    if sock is None:
                        counts.extend(starmap(os.write, ((self._fd, pieces[0]),)))
                    else:
                        counts.extend(starmap(sock.send, ((pieces[0], _SEND_FLAGS),)))
                else:
                    start = done - end + len(pieces[index])
                    if sock is None:
                        counts.extend(starmap(os.writev, ((self._fd, _iovec(pieces, index, start)),)))
                    else:
                        counts.extend(
                            starmap(sock.sendmsg, ((_iovec(pieces, index, start), (), _SEND_FLAGS),))
                        )
            except BlockingIOError:
                self._wait(select.POLLOUT, deadline, "sending")
                continue
            done += counts[-1]

    # -- receiving ----------------------------------------------------------

    def recv_bytes(self, maxlength: int | None = None, *, timeout: float | None = None) -> bytes:
        """Receive one plain message as ``bytes``."""
        self._check_readable()
        if maxlength is not None and maxlength < 0:
            raise ValueError("negative maxlength")
        deadline = _deadline(timeout)
        held: deque[bool] = deque()
        release = self._recv_lock.release
        try:
            self._start_receive(deadline, held)
            header, length, got = self._read_header(deadline)
            if maxlength is not None or len(header) > _SHORT_HEADER_SIZE:
                self._check_plain(header, length, maxlength)
            return self._read_payload(length, got, deadline)
        except BaseException:
            if held:
                self._tidy_recv()
            raise
        finally:
            if held:
                release()

    def recv_message(self, maxlength: int | None = None, *, timeout: float | None = None) -> Any:
        """Receive one message of either kind: ``bytes`` for a plain message,
        for a multipart one the list of its parts (``bytes`` for parts sent
        from read-only memory, ``bytearray`` otherwise). ``maxlength`` bounds
        the total size."""
        self._check_readable()
        if maxlength is not None and maxlength < 0:
            raise ValueError("negative maxlength")
        deadline = _deadline(timeout)
        held: deque[bool] = deque()
        release = self._recv_lock.release
        try:
            self._start_receive(deadline, held)
            header, length, got = self._read_header(deadline)
            if maxlength is not None and length > maxlength:
                raise MessageTooLong(length, maxlength)
            return self._read_message(header, length, got, deadline)
        except BaseException:
            if held:
                self._tidy_recv()
            raise
        finally:
            if held:
                release()

    def recv_bytes_into(self, buffer: Any, offset: int = 0, *, timeout: float | None = None) -> int:
        """Receive one plain message into ``buffer`` at byte ``offset``; return
        its length. ``BufferTooShort`` (message consumed) when it does not fit."""
        self._check_readable()
        deadline = _deadline(timeout)
        view = _byte_view(buffer)
        target: memoryview | None = None
        held: deque[bool] = deque()
        release = self._recv_lock.release
        try:
            if view.readonly:
                raise TypeError("recv_bytes_into() argument must be a writable buffer")
            space = len(view)
            if offset < 0:
                raise ValueError("negative offset")
            if offset > space:
                raise ValueError("offset too large")
            self._start_receive(deadline, held)
            header, length, got = self._read_header(deadline)
            self._check_plain(header, length, None)
            if length > space - offset:
                raise BufferTooShort(self._read_payload(length, got, deadline))
            incoming = self._incoming
            target = view[offset : offset + length]
            if got:
                target[:got] = memoryview(_held_payload(incoming, length))[:got]
            incoming.target = (target, got)
            self._fill([target], [length], got, length, deadline)
            self._incoming = _successor(incoming)
            return length
        except BaseException:
            if held:
                self._tidy_recv()
            raise
        finally:
            if held:
                release()
            # Let go of the caller's buffer now, not when the traceback of an
            # exception that is still referenced goes away (a bytearray cannot
            # be resized while a view of it lives). A target still installed
            # is one an interrupted tidy-up has yet to copy from.
            installed = self._incoming.target
            if target is not None and (installed is None or installed[0] is not target):
                target.release()
            view.release()

    def recv_many(self, max_bytes: int = 65536, *, timeout: float | None = None) -> list[Any]:
        """Receive every message completed within the next ``max_bytes`` bytes
        of the stream: at least one, waiting up to ``timeout`` for it."""
        max_bytes = operator.index(max_bytes)
        if max_bytes < 16:
            raise ValueError("max_bytes must be at least 16")
        max_bytes = min(max_bytes, _MAX_BATCH_READ)
        self._check_readable()
        deadline = _deadline(timeout)
        held: deque[bool] = deque()
        release = self._recv_lock.release
        try:
            self._start_receive(deadline, held, take_ahead=False)
            while True:
                incoming = self._incoming
                if _ahead_left(incoming):
                    # All or nothing: the bytes are taken into a copy of the
                    # record, and the record the last message leaves is
                    # installed with one store. A signal handler raising
                    # before that leaves everything as it was.
                    out: list[_Message] = []
                    try:
                        last = self._take_ahead(incoming.copy(), out)
                    except FrameError:
                        if out and self._broken is not None:
                            # The messages before the framing error are the
                            # stream's data; the next receive raises it.
                            return out
                        raise
                    self._incoming = last
                    if out:
                        return out
                    continue
                header, got, _ = _received(incoming.reads)
                if len(header) >= _header_size(header):
                    # A message under way whose header is complete: its
                    # payload is read straight into place.
                    length = self._payload_length(header)
                    return [self._read_message(header, length, got, deadline)]
                # Read ahead. The chunk starts at this byte of the message.
                ahead = incoming.ahead
                if ahead is None:
                    ahead = incoming.ahead = deque()
                ahead.clear()
                incoming.ahead_base = len(header)
                if not self._recv_chunk(ahead, max_bytes, deadline):
                    ahead.clear()
                    if not header:
                        raise EOFError("end of stream")
                    self._break_stream(
                        TruncatedMessageError("end of file after %d bytes of a message header" % len(header))
                    )
        except BaseException:
            if held:
                self._tidy_recv()
            raise
        finally:
            if held:
                release()

    def recv_begin(self, maxlength: int | None = None, *, timeout: float | None = None) -> int:
        """Start streaming the next plain message; return how many of its
        bytes are still to be taken with ``recv_chunk_into`` (all of them
        unless an earlier stream of it was interrupted). Until they are, other
        receives raise ``ValueError``."""
        self._check_readable()
        if maxlength is not None and maxlength < 0:
            raise ValueError("negative maxlength")
        deadline = _deadline(timeout)
        held: deque[bool] = deque()
        release = self._recv_lock.release
        try:
            self._start_receive(deadline, held, streaming=True)
            incoming = self._incoming
            header, length, _ = self._read_header(deadline)
            stream = incoming.stream
            if stream is None:
                self._check_plain(header, length, maxlength)
                stream = incoming.stream = _Stream()
            remaining = length - stream.delivered
            if not remaining:
                self._incoming = _successor(incoming)  # an empty message is taken at once
            return remaining
        except BaseException:
            if held:
                self._tidy_recv()
            raise
        finally:
            if held:
                release()

    def recv_chunk_into(self, buffer: Any, *, timeout: float | None = None) -> int:
        """Copy the next bytes (at least one, at most ``len(buffer)``) of the
        message being streamed into ``buffer``; return the count."""
        view = _byte_view(buffer)
        held: deque[bool] = deque()
        release = self._recv_lock.release
        try:
            if view.readonly:
                raise TypeError("recv_chunk_into() argument must be a writable buffer")
            self._check_readable()
            deadline = _deadline(timeout)
            self._start_receive(deadline, held, streaming=True)
            incoming = self._incoming
            stream = incoming.stream
            if stream is None:
                raise ValueError("no message is being streamed; call recv_begin() first")
            _, length, got = self._read_header(deadline)
            delivered = stream.delivered
            want = min(length - delivered, len(view))
            if not want:
                return 0
            if delivered < got:
                # Bytes received before the stream began come first.
                count = min(got - delivered, want)
                _, _, piece_at = _received(incoming.reads)
                source: Any = incoming.reads[piece_at] if piece_at >= 0 else incoming.payload
                view[:count] = memoryview(source)[delivered : delivered + count]
            else:
                # Read as a new bytes object, not into the caller's buffer: a
                # signal handler raising after the read leaves the bytes in
                # the record, and the next call delivers them.
                chunks = stream.chunk
                chunk = chunks[0] if chunks else b""
                start = delivered - stream.base
                if start >= len(chunk):
                    chunks.clear()
                    stream.base = delivered
                    chunk = self._recv_chunk(chunks, want, deadline)
                    if not chunk:
                        self._break_stream(
                            TruncatedMessageError(
                                "end of file after %d of %d bytes of a message" % (delivered, length)
                            )
                        )
                    start = 0
                count = min(len(chunk) - start, want)
                view[:count] = memoryview(chunk)[start : start + count]
            stream.delivered = delivered + count
            if delivered + count == length:
                self._incoming = _successor(incoming)
            return count
        except BaseException:
            if held:
                self._tidy_recv()
            raise
        finally:
            if held:
                release()
            view.release()

    def poll(self, timeout: float | None = 0.0) -> bool:
        """True when a receive can make progress now: data or end of file on
        the descriptor, or a broken stream whose error the receive reports."""
        self._check_readable()
        # Bytes recv_many read ahead, still held when a signal handler cut it
        # short, are progress a receive can make now.
        if self._broken is not None or _ahead_left(self._incoming):
            return True
        deadline = _deadline(timeout)
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        while True:
            ms: int | None = None
            if deadline is not None:
                remaining = deadline - time.monotonic()
                ms = _poll_ms(remaining) if remaining > 0 else 0
            if poller.poll(ms):
                return True
            if ms == 0:
                return False

    def _start_receive(
        self, deadline: float | None, held: deque[bool], streaming: bool = False, take_ahead: bool = True
    ) -> None:
        """Take the receive lock (``held`` records it) and bring the receive
        state to rest. Raise the error of a broken stream; refuse, unless
        ``streaming``, while a message is being streamed. With ``take_ahead``,
        take bytes recv_many read ahead into the current message."""
        _acquire(self._recv_lock, deadline, held, "receive")
        incoming = self._incoming
        if incoming.target is not None:
            self._tidy_recv()
        broken = self._broken
        if broken is not None:
            raise type(broken)(*broken.args)
        if incoming.stream is not None and not streaming:
            raise ValueError(
                "a message is being streamed (recv_begin); finish it with recv_chunk_into() first"
            )
        if take_ahead and incoming.ahead:
            self._take_ahead(incoming)

    def _check_plain(self, header: bytes, length: int, maxlength: int | None) -> None:
        """Refuse a multipart message, or one longer than ``maxlength``; either
        stays pending."""
        if header[:_SHORT_HEADER_SIZE] == _MULTIPART_HEADER_BYTES:
            raise MultipartMessageError(
                "the next message is a multipart message of %d parts; receive it with "
                "recv_message() (or recv() on a Connection)" % _MULTIPART_START.unpack_from(header)[1]
            )
        if maxlength is not None and length > maxlength:
            raise MessageTooLong(length, maxlength)

    def _read_header(self, deadline: float | None) -> tuple[bytes, int, int]:
        """Finish reading the current message's header (with a multipart
        message's table of part lengths); return it, the payload length it
        announces, and how many payload bytes were received already."""
        reads = self._incoming.reads
        if not reads:
            # The usual case: a whole, acceptable short header in one read.
            chunk = self._recv_chunk(reads, _SHORT_HEADER_SIZE, deadline)
            if len(chunk) == _SHORT_HEADER_SIZE:
                length: int = _SHORT_HEADER.unpack(chunk)[0]
                limit = self._max_message_size
                if length >= 0 and (limit is None or length <= limit):
                    return chunk, length, 0
            elif not chunk:
                reads.clear()
                raise EOFError("end of stream")
        while True:
            header, got, _ = _received(reads)
            size = _header_size(header)
            if len(header) >= size:
                return header, self._payload_length(header), got
            self._check_part_count(header)
            # Read no further than the header: bytes of the next frame must
            # stay in the descriptor, or poll() on it would lie.
            if not self._recv_chunk(reads, size - len(header), deadline):
                if not header:
                    reads.clear()
                    raise EOFError("end of stream")
                self._break_stream(
                    TruncatedMessageError("end of file after %d bytes of a message header" % len(header))
                )

    def _check_part_count(self, header: bytes) -> None:
        """Once a multipart header's part count is in, check it: before the
        table of part lengths is read, since the count comes from the peer."""
        if len(header) >= _MULTIPART_START_SIZE and header[:_SHORT_HEADER_SIZE] == _MULTIPART_HEADER_BYTES:
            count: int = _MULTIPART_START.unpack_from(header)[1]
            if not 1 <= count <= MAX_PARTS:
                self._break_stream(FrameError("invalid multipart header: %d parts" % count))

    def _payload_length(self, header: bytes) -> int:
        """The payload length a complete header announces, checked before
        anything is allocated: it comes from the peer."""
        (length,) = _SHORT_HEADER.unpack_from(header)
        if length == LONG_HEADER:
            (length,) = _LONG_LENGTH.unpack_from(header, _SHORT_HEADER_SIZE)
        elif length == MULTIPART_HEADER:
            self._check_part_count(header)
            length = sum(map(_PART_LENGTH.__and__, _table_words(header)))
            if length > sys.maxsize:
                self._break_stream(
                    FrameError("invalid multipart header: parts add up to more than %d bytes" % sys.maxsize)
                )
        elif length < 0:
            self._break_stream(FrameError("invalid message header: negative length %d" % length))
        if length > sys.maxsize:
            self._break_stream(FrameError("message length %d is more than this platform can hold" % length))
        limit = self._max_message_size
        if limit is not None and length > limit:
            self._break_stream(FrameError("message length %d exceeds max_message_size %d" % (length, limit)))
        result: int = length
        return result

    def _read_message(self, header: bytes, length: int, got: int, deadline: float | None) -> _Message:
        """The current message, of either kind; ends it."""
        if header[:_SHORT_HEADER_SIZE] == _MULTIPART_HEADER_BYTES:
            return self._read_parts(header, length, got, deadline)
        return self._read_payload(length, got, deadline)

    def _read_payload(self, length: int, got: int, deadline: float | None) -> bytes:
        """The payload of the current plain message as ``bytes``; ends the message."""
        incoming = self._incoming
        if got == length:
            # Received whole already (by a call a signal handler cut short).
            data = _finished_payload(incoming, length)
            self._incoming = _successor(incoming)
            return data
        if not got and length <= _SMALL_PAYLOAD:
            chunk = self._recv_chunk(incoming.reads, length, deadline) if length else b""
            if len(chunk) == length:
                self._incoming = _successor(incoming)
                return chunk
            if not chunk:
                self._break_stream(
                    TruncatedMessageError("end of file after 0 of %d bytes of a message" % length)
                )
            got = len(chunk)
        payload = _held_payload(incoming, length)
        self._fill([payload], [length], got, length, deadline)
        data = bytes(payload)
        self._incoming = _successor(incoming)
        return data

    def _read_parts(
        self, header: bytes, length: int, got: int, deadline: float | None
    ) -> list[bytes | bytearray]:
        """The parts of the current multipart message, each read straight into
        its own object; ends the message."""
        incoming = self._incoming
        parts = _held_parts(incoming, header)
        self._fill(parts, list(accumulate(map(len, parts))), got, length, deadline)
        message = _finished_parts(parts, header)
        self._incoming = _successor(incoming)
        return message

    def _fill(
        self, buffers: list[Any], ends: list[int], got: int, length: int, deadline: float | None
    ) -> None:
        """Read the payload from byte ``got`` to ``length`` into ``buffers``,
        which hold it back to back, ``buffers[i]`` up to byte ``ends[i]``."""
        reads = self._incoming.reads
        sock = self._sock
        while got < length:
            index = bisect_right(ends, got)
            iovec = _iovec(buffers, index, got - ends[index] + len(buffers[index]))
            try:
                if sock is None:
                    reads.extend(starmap(os.readv, ((self._fd, iovec),)))
                elif len(iovec) == 1:
                    reads.extend(starmap(sock.recv_into, ((iovec[0], 0, _RECV_FLAGS),)))
                else:
                    reads.extend(map(_first, starmap(sock.recvmsg_into, ((iovec, 0, _RECV_FLAGS),))))
            except BlockingIOError:
                # Drop the slices of the caller's buffer before waiting: a
                # TimeoutError's traceback would otherwise keep them, and the
                # caller's bytearray could not be resized while it lives.
                del iovec
                self._wait(select.POLLIN, deadline, "receiving")
                continue
            del iovec
            if not reads[-1]:
                self._break_stream(
                    TruncatedMessageError("end of file after %d of %d bytes of a message" % (got, length))
                )
            got += reads[-1]

    def _recv_chunk(self, reads: deque[Any], size: int, deadline: float | None) -> bytes:
        """One read of up to ``size`` bytes as a new ``bytes`` object, waiting
        until it returns data or meets end of file; appended to ``reads``."""
        sock = self._sock
        while True:
            try:
                if sock is None:
                    reads.extend(starmap(os.read, ((self._fd, size),)))
                else:
                    reads.extend(starmap(sock.recv, ((size, _RECV_FLAGS),)))
            except BlockingIOError:
                self._wait(select.POLLIN, deadline, "receiving")
                continue
            chunk: bytes = reads[-1]
            return chunk

    def _take_ahead(self, incoming: _Incoming, out: list[_Message] | None = None) -> _Incoming:
        """Take bytes recv_many read ahead into ``incoming``'s message.

        Without ``out``, stop at the end of that message. With ``out``
        (recv_many, working on a copy), append every message completed to it
        and go on with the record of the next; return the last record. Each
        step takes bytes by appending one result to ``reads``: that is what
        uses them up.
        """
        while True:
            ahead = incoming.ahead
            if not ahead:
                return incoming
            reads = incoming.reads
            chunk = ahead[0]
            if out is not None and not reads:
                # Whole messages with a short header are cut from the chunk
                # directly; the rest goes step by step below.
                pos = first = -incoming.ahead_base
                size = len(chunk)
                limit = self._max_message_size
                while size - pos >= _SHORT_HEADER_SIZE:
                    length: int = _SHORT_HEADER.unpack_from(chunk, pos)[0]
                    end = pos + _SHORT_HEADER_SIZE + length
                    if length < 0 or end > size or (limit is not None and length > limit):
                        break
                    out.append(chunk[pos + _SHORT_HEADER_SIZE : end])
                    pos = end
                if pos != first:
                    incoming = _Incoming(chunk, -pos) if pos < size else _Incoming()
                    continue
            header, got, _ = _received(reads)
            start = len(header) + got - incoming.ahead_base
            left = len(chunk) - start
            size = _header_size(header)
            if len(header) < size:
                self._check_part_count(header)
                if left <= 0:
                    incoming.ahead = None  # used up
                    return incoming
                reads.append(chunk[start : start + min(size - len(header), left)])
                continue
            length = self._payload_length(header)
            multipart = header[:_SHORT_HEADER_SIZE] == _MULTIPART_HEADER_BYTES
            if got == length:
                if out is None:
                    return incoming
                if multipart:
                    out.append(_finished_parts(_held_parts(incoming, header), header))
                else:
                    out.append(_finished_payload(incoming, length))
                incoming = _successor(incoming)
                continue
            if left <= 0:
                incoming.ahead = None  # used up
                return incoming
            take = min(length - got, left)
            if not multipart and not got:
                reads.append(chunk[start : start + take])
                continue
            source = memoryview(chunk)[start : start + take]
            if not multipart:
                payload = _held_payload(incoming, length)
                payload[got : got + take] = source
            else:
                parts = _held_parts(incoming, header)
                ends = list(accumulate(map(len, parts)))
                index = bisect_right(ends, got)
                done = 0
                while done < take:
                    part = parts[index]
                    offset = got + done - ends[index] + len(part)
                    count = min(ends[index] - got - done, take - done)
                    part[offset : offset + count] = source[done : done + count]
                    done += count
                    index += 1
            reads.append(take)

    def _tidy_recv(self) -> None:
        """After an interrupted recv_bytes_into, move the payload bytes that
        arrived in the caller's buffer into the held buffer, where the next
        receive of any kind looks for them."""
        incoming = self._incoming
        target = incoming.target
        if target is None:
            return
        view, start = target
        _, got, _ = _received(incoming.reads)
        if got > start:
            payload = incoming.payload
            if payload is None:
                payload = incoming.payload = bytearray(len(view))
            memoryview(payload)[start:got] = view[start:got]
        incoming.target = None

    def _break_stream(self, error: FrameError) -> NoReturn:
        """Mark the receive side broken and raise ``error``; every later
        receive raises it again."""
        self._broken = error
        self._incoming = _Incoming()
        raise error


# ---------------------------------------------------------------- QueueEnds

_QUEUE_HEADER = 8
_QUEUE_CONTROL = socket.CMSG_SPACE(8 * 4)  # room for 8 descriptors
_QUEUE_RECV_WAIT = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
_QUEUE_RECV_NOW = _QUEUE_RECV_WAIT | socket.MSG_DONTWAIT
_QUEUE_BAD_FLAGS = int(socket.MSG_TRUNC) | int(socket.MSG_CTRUNC)
_QUEUE_NO_ROOM = frozenset(
    {errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS, getattr(errno, "ETOOMANYREFS", -1)}
)


class QueueEnds:
    """The two ends of a queue's socket pair and its shared counters: the
    per-item fast paths of ``bigipc.Queue`` (see bigipc/_core.pyi)."""

    def __init__(
        self,
        recv_sock: socket.socket,
        send_sock: socket.socket,
        counters: Any,
        header: bytes,
        puts: int,
        gets: int,
        pending: int,
    ) -> None:
        if len(header) != _QUEUE_HEADER:
            raise ValueError("a queue record header is %d bytes" % _QUEUE_HEADER)
        with memoryview(counters) as view:
            if view.readonly or view.itemsize != 8 or view.nbytes % 8:
                raise ValueError("counters must be a writable buffer of int64")
        # The caller's object itself: no extra export of its memory, which
        # its owner must be able to release.
        self._recv_sock = recv_sock
        self._send_sock = send_sock
        self._counters = counters
        self._header = bytes(header)
        self._puts = puts
        self._gets = gets
        self._pending = pending
        # Makes each counter update atomic among this process's threads, as
        # the GIL does for the compiled core; never held across a wait.
        self._update = threading.Lock()

    def _check_slot(self, slot_at: int, width: int = 4) -> None:
        if slot_at < 0 or slot_at + width > len(self._counters):
            raise ValueError("counter index %d out of range" % slot_at)

    def add(self, index: int, delta: int) -> int:
        """Add ``delta`` to the counter at ``index``; return the new value.
        Atomic with respect to the other counter updates made here."""
        self._check_slot(index, 1)
        with self._update:
            value: int = self._counters[index] + delta
            self._counters[index] = value
        return value

    def send_inline(self, slot_at: int, data: Any) -> bool:
        """Send the header and ``data`` as one inline record if the socket
        takes it now, counting it as put; False when it has no room."""
        self._check_slot(slot_at)
        record = self._header + bytes(data)
        self.add(slot_at + self._pending, 1)
        try:
            self._send_sock.send(record, _SEND_FLAGS)
        except OSError as exc:
            self.add(slot_at + self._pending, -1)
            if exc.errno in _QUEUE_NO_ROOM:
                return False
            raise
        except BaseException:
            self.add(slot_at + self._pending, -1)
            raise
        with self._update:
            self._counters[slot_at + self._puts] += 1
            self._counters[slot_at + self._pending] -= 1
        return True

    def recv(self, buffer: Any, slot_at: int, wait: bool) -> int | tuple[int, list[int], int]:
        """Receive one record into ``buffer``: its length when it is an
        inline record (counted as a get), -1 when none is there and ``wait``
        is false, else ``(length, descriptors, flags)`` (not counted)."""
        self._check_slot(slot_at)
        try:
            n, anc, flags, _ = self._recv_sock.recvmsg_into(
                [buffer], _QUEUE_CONTROL, _QUEUE_RECV_WAIT if wait else _QUEUE_RECV_NOW
            )
        except BlockingIOError:
            return -1
        inline = not anc and not flags & _QUEUE_BAD_FLAGS and n >= _QUEUE_HEADER
        if inline and memoryview(buffer)[:_QUEUE_HEADER] == self._header:
            self.add(slot_at + self._gets, 1)
            return n
        fds: list[int] = []
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                numbers = array.array("i")
                numbers.frombytes(data[: len(data) - len(data) % numbers.itemsize])
                fds.extend(numbers)
        return n, fds, flags
