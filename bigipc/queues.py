"""``Queue``, ``SimpleQueue`` and ``JoinableQueue`` on kernel objects only.

Each queue is one ``AF_UNIX``/``SOCK_DGRAM`` socket pair plus a small block
of shared memory (a ``memfd`` on Linux, an unlinked temporary file
elsewhere) and one notification pipe. No named semaphore and nothing in
``/dev/shm`` is used, so the queues work where ``multiprocessing.Queue()``
cannot be created (AWS Lambda, containers with a read-only ``/dev/shm``).

How an item travels (``docs/protocol.md``, "Queues", is the reference):

* Every record is one datagram. The kernel delivers a datagram whole to
  exactly one receiver and never interleaves two senders' datagrams, so
  producers and consumers need no lock at all to keep records intact.
* A small item (its pickle fits in ``inline_limit`` bytes) is sent inside
  its datagram. ``put_many`` packs many small items into one datagram.
* A large item gets a pipe of its own: the producer writes the framed
  message (pickle plus out-of-band buffers, as ``Connection.send`` does)
  into a fresh pipe and sends the pipe's read end in the datagram
  (``SCM_RIGHTS``). The consumer that receives the datagram owns the item
  and reads it straight into its final buffers; nobody else can see it.

What this buys, and what a SIGKILL can cost:

* A producer killed while writing a large item leaves a pipe that ends
  early: its consumer sees end-of-file, drops that one item and moves on.
* A consumer killed while reading a large item takes only that item with
  it; the producer's writes fail with ``EPIPE`` and it moves on.
* No lock is ever held across a transfer, so no death can leave one held.
  The few cross-process locks (the bound of a bounded queue, the task count
  of a ``JoinableQueue``, the per-process counter slots) are POSIX record
  locks, which the kernel releases when their holder dies.
* Counters (``qsize``, the bound, unfinished tasks) live in per-process
  slots of the shared block; a dead process's reservations are reclaimed
  by the next process that needs the room. A kill that lands in the few
  instructions between the kernel taking a record and the counter update
  can leave ``qsize()`` one off; a bounded queue detects and repairs a count
  that says "full" while the queue is provably empty.

``put()`` pickles in the caller, so an unpicklable object raises there and
nothing is enqueued. On ``Queue`` and ``JoinableQueue`` it never blocks on
the pipe: a record the socket cannot take now (and the part of a large item
its pipe cannot hold) goes to a per-process feeder thread, which keeps the
process's order. The parts handed over are copied unless immutable, so the
consumer gets the object as it was at ``put()`` time.
"""

from __future__ import annotations

import array
import collections
import contextlib
import errno
import fcntl
import io
import mmap
import os
import pickle
import queue as _queue
import secrets
import select
import socket
import struct
import tempfile
import threading
import time
import traceback
import weakref
from collections.abc import Iterable
from multiprocessing import context as _mp_context
from multiprocessing import reduction as _reduction
from multiprocessing import util as _mp_util
from typing import Any, Callable

from bigipc import _platform
from bigipc._backend import Channel, QueueEnds
from bigipc._errors import FrameError
from bigipc.connection import _PROTOCOL, OUT_OF_BAND_THRESHOLD, _dumps, _loads, _out_of_band

__all__ = ["JoinableQueue", "Queue", "QueueClosedError", "SimpleQueue"]

Empty = _queue.Empty
Full = _queue.Full


class QueueClosedError(OSError, ValueError):
    """Use of a queue after ``close()`` in this process. Both a ValueError
    (what the stdlib's put and get raise) and an OSError (what its empty and
    SimpleQueue raise), so code written for either keeps working."""


# --- record format (one datagram) -------------------------------------------
# magic "BQ", format version, record kind, item count; big-endian.
_RECORD = struct.Struct("!2sBBI")
_RECORD_SIZE = _RECORD.size
_MAGIC = b"BQ"
_VERSION = 1
KIND_INLINE = 1  # one pickle follows the header
KIND_BATCH = 2  # count u32 lengths, then the pickles back to back
KIND_STREAM = 3  # no payload; one descriptor: a pipe holding one framed message
KIND_PARTS = 4  # count u32 part lengths; the parts, each at a 64-byte-aligned offset
KIND_LIST = 5  # one pickle of a list of count items (put_many)
_READONLY = 1 << 31  # in a part length: the part was a read-only buffer (bytes)
_ALIGN = 64
_LENGTH = struct.Struct("!I")
_INLINE_HEADER = _RECORD.pack(_MAGIC, _VERSION, KIND_INLINE, 1)

# Largest record a queue sends as one datagram: a quarter of the socket's
# send buffer, at most this. A datagram of 1 MiB moves at 6.8 GB/s between
# two processes here, more than twice what a fresh pipe per item reaches,
# so the limit is as high as the kernel lets it be. Bigger items travel
# through a pipe of their own.
DEFAULT_INLINE_LIMIT = 4 * 1024 * 1024
# Private pipes a process keeps open for large items still being written
# by its feeder; later large items wait (copied) until one finishes.
MAX_OPEN_STREAMS = 64

# --- shared block ------------------------------------------------------------
# Header: magic, token (16 bytes), then int64 fields; slots from _SLOTS_AT.
_SHM_MAGIC = b"bigipcQ1"
_F_HIGH = 3  # one past the highest slot ever claimed
_F_WAITERS = 4  # producers waiting for room (a hint for consumers)
_SLOTS_AT = 8  # in int64 units: 64 bytes of header
_SLOT_FIELDS = 8
_PUTS, _GETS, _DONE, _RESERVED = range(4)
MAX_PROCESSES = 1024
_SHM_SIZE = 8 * (_SLOTS_AT + _SLOT_FIELDS * MAX_PROCESSES)
# Byte offsets of the POSIX record locks: far past the data.
_LOCK_BOUND = 1 << 30
_LOCK_SLOT0 = (1 << 30) + 64

# A waiter re-checks at least this often, whatever it was told: it covers a
# wake-up lost to a race, or to a process killed before it could ring.
_RECHECK = 0.02
# How long a "full" count must stay unexplained before it is repaired.
_HEAL_AFTER = 0.05

# Plain ints: the socket module's flag enums cost a microsecond per use.
_DONTWAIT = int(socket.MSG_DONTWAIT)
# Received descriptors come close-on-exec where recvmsg can do it (Linux).
_RECV_CLOEXEC = hasattr(socket, "MSG_CMSG_CLOEXEC")
_BAD_FLAGS = int(socket.MSG_TRUNC) | int(socket.MSG_CTRUNC)
_NO_ROOM = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS, getattr(errno, "ETOOMANYREFS", -1)})


def _deadline(block: bool, timeout: float | None) -> float | None:
    """None for "forever", else an absolute time.monotonic() value."""
    if not block:
        return 0.0
    if timeout is None:
        return None
    if timeout < 0:
        raise ValueError("'timeout' must be a non-negative number")
    return time.monotonic() + timeout


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


def _wait_fd(fd: int, events: int, timeout: float | None) -> bool:
    """Wait until ``fd`` is ready for ``events``; False when time ran out.

    A fresh poll object per wait: poll objects refuse concurrent use from
    several threads. EINTR is retried by Python with the time recomputed.
    """
    p = select.poll()
    p.register(fd, events)
    return bool(p.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999))))


def _readable_now(fd: int) -> bool:
    return _wait_fd(fd, select.POLLIN, 0)


def _close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _new_shared_file() -> int:
    """A file of _SHM_SIZE zero bytes that lives only as long as its fds."""
    fd = -1
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        with contextlib.suppress(OSError):
            fd = memfd_create("bigipc-queue", os.MFD_CLOEXEC)
    if fd < 0:
        # An unlinked file in the temporary directory (never /dev/shm).
        with tempfile.TemporaryFile(prefix="bigipc-queue-") as f:
            fd = os.dup(f.fileno())
        os.set_inheritable(fd, False)
    try:
        os.ftruncate(fd, _SHM_SIZE)
    except BaseException:
        os.close(fd)
        raise
    return fd


# Processes find their own copy of a queue (the one created here or first
# unpickled here) by its token, so that one process has one counter slot
# per queue however many times the queue reaches it.
_by_token: weakref.WeakValueDictionary[bytes, Queue] = weakref.WeakValueDictionary()
_live: weakref.WeakSet[Queue] = weakref.WeakSet()


class _Record:
    """One datagram to send, with what it needs until it is sent."""

    __slots__ = ("buffers", "count", "data", "kind", "parts", "read_fd", "writer")

    def __init__(self, kind: int, count: int) -> None:
        self.kind = kind
        self.count = count
        self.parts: list[Any] = []
        self.data: Any = None  # STREAM: the pickle
        self.buffers: list[Any] = []  # STREAM: its out-of-band buffers
        self.read_fd = -1  # STREAM: read end of the item's pipe, once made
        self.writer: Any = None  # STREAM: Channel on the write end

    def keep_contents(self) -> None:
        """Copy what the caller could still change: the record is about to
        outlive put(). The pickles are ours; read-only buffers stay as they
        are; writable out-of-band buffers (a numpy array) are copied."""
        if self.kind == KIND_PARTS:
            self.parts = [p if type(p) is not memoryview or p.readonly else bytes(p) for p in self.parts]
            self.buffers = []
        else:
            self.buffers = [b if b.readonly else memoryview(bytearray(b)) for b in self.buffers]

    def discard(self) -> None:
        if self.read_fd >= 0:
            _close_fds([self.read_fd])
            self.read_fd = -1
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _reducer_count() -> int:
    # Reducers registered with multiprocessing.reduction.register().
    return len(getattr(_reduction.ForkingPickler, "_extra_reducers", ()))


# Exact types whose pickle no reducer can change (see _Pickling.dumps).
_SCALARS = frozenset({str, int, float, bool, complex, type(None)})
_plain_dumps = pickle.dumps
_NO_BUFFERS: list[memoryview] = []  # never changed: shared by every scalar put


class _Pickling(threading.local):
    """A ForkingPickler kept per thread and reused: building one copies the
    whole copyreg dispatch table, which costs more than pickling a small
    object. Rebuilt when someone registers another reducer."""

    def __init__(self) -> None:
        self.reducers = -1
        self.busy = False

    def _build(self) -> None:
        self.out = io.BytesIO()
        self.buffers: list[memoryview] = []
        callback = _out_of_band(self.buffers, OUT_OF_BAND_THRESHOLD)
        self.pickler = _reduction.ForkingPickler(self.out, _PROTOCOL, True, callback)
        self.reducers = _reducer_count()

    def dumps(self, obj: Any) -> tuple[Any, list[memoryview]]:
        """(pickle, out-of-band buffers), as connection._dumps gives."""
        kind = type(obj)
        if kind in _SCALARS or (kind is bytes and len(obj) < OUT_OF_BAND_THRESHOLD):
            # The pickler writes these built-in types itself, before any
            # reducer is looked at: a plain pickle is byte for byte what the
            # ForkingPickler would write, at a fraction of the cost.
            return _plain_dumps(obj, _PROTOCOL), []
        if self.busy:  # pickling obj put something on a queue: no reuse
            return _dumps(obj, OUT_OF_BAND_THRESHOLD)
        if self.reducers != _reducer_count():
            self._build()
        # A large top-level bytes goes out of band as a PickleBuffer and
        # comes back as bytes. (A bytearray pickles itself out of band.)
        if type(obj) is bytes and len(obj) >= OUT_OF_BAND_THRESHOLD:
            obj = pickle.PickleBuffer(obj)
        self.busy = True
        try:
            self.pickler.dump(obj)
            data: Any = self.out.getvalue()
            buffers = self.buffers[:]
        finally:
            self.pickler.clear_memo()
            self.out.seek(0)
            self.out.truncate()
            self.buffers.clear()
            self.busy = False
        return data, buffers


_pickling = _Pickling()


def _encode_inline(data: Any) -> list[Any]:
    return [_INLINE_HEADER, data]


_PADDING = bytes(_ALIGN)


def _parts_layout(lengths: Iterable[int], count: int) -> tuple[list[int], int]:
    """Offsets of the parts of a KIND_PARTS record, and its total size: the
    header, the length table, then each part at a multiple of _ALIGN (so
    that arrays rebuilt on the received buffer are aligned)."""
    at = _RECORD.size + _LENGTH.size * count
    offsets = []
    for length in lengths:
        at = (at + _ALIGN - 1) // _ALIGN * _ALIGN
        offsets.append(at)
        at += length
    return offsets, at


def _encode_parts(data: Any, buffers: list[memoryview], limit: int) -> list[Any] | None:
    """The iovecs of a KIND_PARTS record, or None if it exceeds ``limit``."""
    items = [data, *buffers]
    lengths = [len(data)] + [b.nbytes for b in buffers]
    offsets, total = _parts_layout(lengths, len(items))
    if total > limit:
        return None
    parts: list[Any] = [
        _RECORD.pack(_MAGIC, _VERSION, KIND_PARTS, len(items)),
        _LENGTH.pack(lengths[0])
        + b"".join(_LENGTH.pack(b.nbytes | (_READONLY if b.readonly else 0)) for b in buffers),
    ]
    at = _RECORD.size + _LENGTH.size * len(items)
    for item, offset, length in zip(items, offsets, lengths):
        if offset > at:
            parts.append(_PADDING[: offset - at])
        parts.append(item)
        at = offset + length
    return parts


class Queue:
    """A multi-producer, multi-consumer FIFO queue between processes.

    The API of ``multiprocessing.Queue``, plus ``put_many``/``get_many``.
    ``maxsize <= 0`` means unbounded. ``inline_limit`` is the largest
    pickled item sent inside a datagram (default: 64 KiB, or less when the
    kernel's socket buffer is small); bigger items get a pipe of their own.
    """

    _blocking_put = False  # SimpleQueue: put() waits for the pipe, no feeder
    _joinable = False

    def __init__(self, maxsize: int = 0, *, ctx: Any = None, inline_limit: int | None = None) -> None:
        maxsize = int(maxsize)
        rsock, wsock = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        shm_fd = bell_r = bell_w = -1
        try:
            _platform.set_socket_buffers(wsock, None)
            _platform.set_socket_buffers(rsock, None)
            sndbuf = wsock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            if inline_limit is None:
                # A record must fit in the send buffer with room to spare,
                # or a single send would wait for the buffer to drain.
                inline_limit = max(1024, min(DEFAULT_INLINE_LIMIT, sndbuf // 4))
            elif inline_limit < _RECORD.size + 64:
                raise ValueError("inline_limit must be at least %d" % (_RECORD.size + 64))
            shm_fd = _new_shared_file()
            bell_r, bell_w = os.pipe()
            os.set_blocking(bell_r, False)
            os.set_blocking(bell_w, False)
            token = secrets.token_bytes(16)
            mm = mmap.mmap(shm_fd, _SHM_SIZE)
            mm[0:8] = _SHM_MAGIC
            mm[8:24] = token
            mm.close()
        except BaseException:
            rsock.close()
            wsock.close()
            _close_fds(fd for fd in (shm_fd, bell_r, bell_w) if fd >= 0)
            raise
        self._setup(maxsize, token, inline_limit, rsock.detach(), wsock.detach(), shm_fd, bell_r, bell_w, [])

    # -- construction shared by __init__ and unpickling ----------------------

    def _setup(
        self,
        maxsize: int,
        token: bytes,
        inline_limit: int,
        rfd: int,
        wfd: int,
        shm_fd: int,
        bell_r: int,
        bell_w: int,
        extra_fds: list[int],
    ) -> None:
        self._maxsize = maxsize
        self._bounded = maxsize > 0
        # put() may send an inline record straight away (unbounded queues;
        # a SimpleQueue whose socket is full then waits in _send_blocking).
        self._fast_put = not self._bounded
        self._token = token
        self._inline_limit = inline_limit
        self._inline_room = inline_limit - _RECORD_SIZE  # largest inline pickle
        self._rsock = socket.socket(fileno=rfd)
        self._wsock = socket.socket(fileno=wfd)
        self._shm_fd = shm_fd
        self._bell_r = bell_r
        self._bell_w = bell_w
        self._owned_fds = [shm_fd, bell_r, bell_w, *extra_fds]
        self._mmap = mmap.mmap(shm_fd, _SHM_SIZE)
        if self._mmap[0:8] != _SHM_MAGIC or self._mmap[8:24] != token:
            raise FrameError("not a bigipc queue's shared block")
        self._counters = memoryview(self._mmap).cast("q")
        self._closed = False
        self._put_any = False
        self._joincancelled = False
        self._reset_process_state()
        _by_token[token] = self
        _live.add(self)
        self._finalizer = _mp_util.Finalize(
            self,
            Queue._release,
            (self._rsock, self._wsock, self._counters, self._mmap, self._owned_fds),
            exitpriority=-10,
        )

    def _reset_process_state(self) -> None:
        """What belongs to one process: set up anew in a forked child.

        ``_slot`` goes back to -1 first and ``_pid`` is set last: put() and
        get() take the slow path, which checks the process, while ``_slot``
        is negative, so a reset that fails half-way is retried (or raises)
        on the next use instead of running on the parent's state."""
        self._slot = -1
        self._slot_at = -1
        # Every change to this process's counters goes through _ends (their
        # updates are atomic there); _lock orders them with the records. A
        # queue closed and released before the fork has no counters left.
        self._ends: Any = None
        if not self._released():
            self._ends = QueueEnds(
                self._rsock, self._wsock, self._counters, _INLINE_HEADER, _PUTS, _GETS, _RESERVED
            )
        self._lock = threading.Lock()  # this process's counters and records
        self._rlock = threading.Lock()  # this process's received-items state
        self._held: collections.deque[Any] = collections.deque()  # rest of a batch
        self._partials: collections.deque[Any] = collections.deque()  # timed-out streams
        self._tls = threading.local()
        self._heal_seen: tuple[int, int, float] | None = None
        # The feeder: records not sent yet (in order), pipes not yet full.
        self._backlog: collections.deque[_Record] = collections.deque()
        self._flushing: list[Any] = []
        self._feeder: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self._jointhread: Any = None
        self._pid = os.getpid()

    def _released(self) -> bool:
        """Closed here with the shared block already unmapped."""
        return self._closed and not self._finalizer.still_active()

    @staticmethod
    def _release(
        rsock: socket.socket, wsock: socket.socket, counters: memoryview, mm: mmap.mmap, fds: list[int]
    ) -> None:
        rsock.close()
        wsock.close()
        counters.release()
        mm.close()
        _close_fds(fds)

    def _after_fork(self) -> None:
        # The parent's records, pipes and feeder stay the parent's: touching
        # them here would send its items twice. Close only our copies.
        old = (self._backlog, self._flushing, self._partials, self._wake_r, self._wake_w)
        self._reset_process_state()
        backlog, flushing, partials, wr, ww = old
        for rec in backlog:
            if rec.writer is not None:
                rec.writer.close()
            if rec.read_fd >= 0:
                _close_fds([rec.read_fd])
        for ch in flushing:
            ch.close()
        for ch in partials:
            ch.close()
        _close_fds(fd for fd in (wr, ww) if fd >= 0)

    # -- pickling: only to a child being started, like the stdlib's ------------

    def __reduce__(self) -> tuple[Callable[..., Queue], tuple[Any, ...]]:
        _mp_context.assert_spawning(self)
        fds = (self._rsock.fileno(), self._wsock.fileno(), self._shm_fd, self._bell_r, self._bell_w)
        return _rebuild_queue, (
            type(self),
            self._maxsize,
            self._token,
            self._inline_limit,
            self._joincancelled,
            *[_reduction.DupFd(fd) for fd in fds],
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("maxsize=%d" % self._maxsize if self._bounded else "unbounded")
        return "<bigipc.%s %s at %#x>" % (type(self).__name__, state, id(self))

    # -- counters --------------------------------------------------------------

    def _ensure_process(self) -> None:
        """Called with self._lock held: claim this process's counter slot."""
        if self._slot < 0:
            self._slot = self._claim_slot()
            self._slot_at = _SLOTS_AT + self._slot * _SLOT_FIELDS

    def _claim_slot(self) -> int:
        c = self._counters
        for i in range(MAX_PROCESSES):
            try:
                fcntl.lockf(self._shm_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _LOCK_SLOT0 + i)
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EAGAIN):
                    continue  # a live process owns it
                raise
            # Free, or its owner died: what that owner had reserved died too.
            c[_SLOTS_AT + i * _SLOT_FIELDS + _RESERVED] = 0
            with self._bound_lock():
                if c[_F_HIGH] < i + 1:
                    c[_F_HIGH] = i + 1
            return i
        raise OSError(errno.EMFILE, "more than %d processes use this queue at once" % MAX_PROCESSES)

    @contextlib.contextmanager
    def _bound_lock(self) -> Any:
        """The cross-process lock for check-then-change of counters. Held for
        a few instructions only, never across a wait; the kernel drops it if
        its holder dies."""
        fcntl.lockf(self._shm_fd, fcntl.LOCK_EX, 1, _LOCK_BOUND)
        try:
            yield
        finally:
            fcntl.lockf(self._shm_fd, fcntl.LOCK_UN, 1, _LOCK_BOUND)

    def _add(self, field: int, n: int) -> None:
        """Add to this process's own slot (self._lock held)."""
        self._ends.add(self._slot_at + field, n)

    def _sum(self, field: int) -> int:
        if self._released():
            raise QueueClosedError("Queue %r is closed" % self)
        c = self._counters
        high = c[_F_HIGH]
        start = _SLOTS_AT + field
        return sum(c[start : start + high * _SLOT_FIELDS : _SLOT_FIELDS])

    def _ring(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._bell_w, b"\0")

    def _wait_bell(self, deadline: float | None) -> None:
        left = _remaining(deadline)
        wait = _RECHECK if left is None else min(left, _RECHECK)
        if _wait_fd(self._bell_r, select.POLLIN, wait):
            with contextlib.suppress(BlockingIOError, OSError):
                os.read(self._bell_r, 65536)

    # -- checks --------------------------------------------------------------

    def _check_open(self) -> None:
        if self._pid != os.getpid():
            self._after_fork()
        if self._closed:
            raise QueueClosedError("Queue %r is closed" % self)

    # -- producing ----------------------------------------------------------

    def _make_record(self, obj: Any) -> _Record:
        data, buffers = _pickling.dumps(obj)
        return self._record_for(data, buffers)

    def _record_for(self, data: Any, buffers: list[memoryview]) -> _Record:
        if not buffers and _RECORD.size + len(data) <= self._inline_limit:
            rec = _Record(KIND_INLINE, 1)
            rec.parts = _encode_inline(data)
            return rec
        if buffers:
            parts = _encode_parts(data, buffers, self._inline_limit)
            if parts is not None:
                rec = _Record(KIND_PARTS, 1)
                rec.parts = parts
                rec.buffers = buffers
                return rec
        rec = _Record(KIND_STREAM, 1)
        rec.data = data
        rec.buffers = buffers
        return rec

    def _make_records(self, objs: Iterable[Any]) -> tuple[list[_Record], int]:
        """put_many: one pickle per group of items when the group fits in a
        datagram (one pickler call for hundreds of small items), else
        small pickles packed many to a datagram, large items on their own."""
        items = objs if isinstance(objs, list) else list(objs)
        records: list[_Record] = []
        group = 1024
        for start in range(0, len(items), group):
            chunk = items[start : start + group]
            data, buffers = _pickling.dumps(chunk)
            if not buffers and _RECORD.size + len(data) <= self._inline_limit:
                rec = _Record(KIND_LIST, len(chunk))
                rec.parts = [_RECORD.pack(_MAGIC, _VERSION, KIND_LIST, len(chunk)), data]
                records.append(rec)
            else:
                records += self._make_item_records(chunk)
        return records, len(items)

    def _make_item_records(self, objs: Iterable[Any]) -> list[_Record]:
        """Pack consecutive small pickles into batch datagrams."""
        records: list[_Record] = []
        batch: list[Any] = []
        size = _RECORD.size

        def close_batch() -> None:
            nonlocal batch, size
            if not batch:
                return
            rec = _Record(KIND_BATCH if len(batch) > 1 else KIND_INLINE, len(batch))
            if len(batch) == 1:
                rec.parts = _encode_inline(batch[0])
            else:
                rec.parts = [
                    _RECORD.pack(_MAGIC, _VERSION, KIND_BATCH, len(batch)),
                    b"".join(_LENGTH.pack(len(p)) for p in batch),
                    *batch,
                ]
            records.append(rec)
            batch = []
            size = _RECORD.size

        for obj in objs:
            data, buffers = _pickling.dumps(obj)
            if buffers or _RECORD.size + len(data) > self._inline_limit:
                close_batch()
                records.append(self._record_for(data, buffers))
                continue
            if size + _LENGTH.size + len(data) > self._inline_limit:
                close_batch()
            batch.append(data)
            size += _LENGTH.size + len(data)
        close_batch()
        return records

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        """Put ``obj`` on the queue. It is pickled now, in the caller: an
        unpicklable object raises here and nothing is enqueued.

        Unbounded queues never block. A bounded queue waits for room (up to
        ``timeout``; ``queue.Full`` when there is none)."""
        if self._closed or self._slot < 0:  # closed, or this process's first put
            self._check_open()
        self._put_any = True
        if self._fast_put:
            kind = type(obj)
            if kind in _SCALARS or (kind is bytes and len(obj) < OUT_OF_BAND_THRESHOLD):
                data, buffers = _plain_dumps(obj, _PROTOCOL), _NO_BUFFERS  # as _Pickling.dumps
            else:
                data, buffers = _pickling.dumps(obj)
            if not buffers and len(data) <= self._inline_room:
                lock = self._lock
                lock.acquire()  # (cheaper than `with` on this per-item path)
                try:
                    if self._slot >= 0 and not self._backlog and self._ends.send_inline(self._slot_at, data):
                        return
                finally:
                    lock.release()
                rec = _Record(KIND_INLINE, 1)
                rec.parts = [_INLINE_HEADER, data]
            else:
                rec = self._record_for(data, buffers)
        else:
            rec = self._make_record(obj)
        self._enqueue([rec], 1, _deadline(block, timeout))

    def put_nowait(self, obj: Any) -> None:
        self.put(obj, False)

    def put_many(self, items: Iterable[Any], block: bool = True, timeout: float | None = None) -> None:
        """Put every item of ``items``, in order, packing small ones many to
        a datagram. All are pickled first: if one fails, none is enqueued.

        Items sent together in one datagram are delivered together: the
        consumer that receives it gets all of them (one by one from
        ``get``). On a bounded queue the room for all of them is taken at
        once, so ``len(items)`` may not exceed ``maxsize``."""
        self._check_open()
        self._put_any = True
        deadline = _deadline(block, timeout)
        records, n = self._make_records(items)
        if n:
            self._enqueue(records, n, deadline)

    def _enqueue(self, records: list[_Record], n: int, deadline: float | None) -> None:
        # Every accepted item is counted as pending (_RESERVED) in this
        # process's slot until the socket takes it; then as put (_PUTS).
        if self._bounded:
            self._reserve(n, deadline)
        else:
            with self._lock:
                self._ensure_process()
                self._add(_RESERVED, n)
        if self._blocking_put:
            self._send_blocking(records, deadline)
            return
        with self._lock:
            i = 0
            if not self._backlog:
                try:
                    while i < len(records) and self._try_send(records[i]):
                        i += 1
                except BaseException:
                    records[i].discard()
                    self._add(_RESERVED, -sum(r.count for r in records[i:]))
                    raise
            if i == len(records):
                if self._flushing:
                    self._start_feeder()  # the rest of a large item
                return
            rest = records[i:]
            for rec in rest:
                rec.keep_contents()
            idle = not self._backlog
            self._backlog.extend(rest)
            if idle or self._feeder is None:
                # A feeder with a backlog already is sending it or waiting
                # for room in the socket; it needs no wake-up per item.
                self._start_feeder()

    def _drop_pending(self, records: list[_Record]) -> None:
        """Undo the pending count of records that will never be sent."""
        k = sum(r.count for r in records)
        if k:
            with self._lock:
                self._add(_RESERVED, -k)
            if self._bounded:
                self._ring()

    def _open_stream(self, rec: _Record) -> bool:
        """Make the item's pipe and write into it what fits right now.
        False when the process is out of descriptors (retried later)."""
        try:
            r, w = os.pipe()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                return False
            raise
        try:
            # The largest pipe: put() writes what fits at once and leaves
            # the rest to the feeder, so more room means less copying.
            _platform.set_pipe_size(w, _platform.pipe_max_size())
            writer = Channel(w, readable=False)
        except BaseException:
            _close_fds([r, w])
            raise
        rec.read_fd = r
        rec.writer = writer
        try:
            if rec.buffers:
                writer.send_multipart([rec.data, *rec.buffers], timeout=0)
            else:
                writer.send_bytes(rec.data, timeout=0)
        except TimeoutError:
            pass  # the rest is pending in the writer (copied unless immutable)
        rec.data = None
        rec.buffers = []
        return True

    def _try_send(self, rec: _Record) -> bool:
        """Send one record now if the socket takes it (self._lock held)."""
        ancdata: list[Any] = []
        if rec.kind == KIND_STREAM:
            if rec.writer is None and (len(self._flushing) >= MAX_OPEN_STREAMS or not self._open_stream(rec)):
                return False
            ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [rec.read_fd]))]
            parts = [_RECORD.pack(_MAGIC, _VERSION, KIND_STREAM, 1)]
        else:
            parts = rec.parts
        try:
            self._wsock.sendmsg(parts, ancdata, _DONTWAIT)
        except OSError as exc:
            if exc.errno in _NO_ROOM:
                return False
            raise
        self._add(_PUTS, rec.count)
        self._add(_RESERVED, -rec.count)
        if rec.kind == KIND_STREAM:
            os.close(rec.read_fd)
            rec.read_fd = -1
            writer, rec.writer = rec.writer, None
            if writer.send_pending:
                self._flushing.append(writer)
            else:
                writer.close()
        return True

    def _send_blocking(self, records: list[_Record], deadline: float | None) -> None:
        """SimpleQueue: send in the caller, waiting for room as needed."""
        for index, rec in enumerate(records):
            while True:
                with self._lock:
                    try:
                        sent = self._try_send(rec)
                    except BaseException:
                        rec.discard()
                        self._add(_RESERVED, -sum(r.count for r in records[index:]))
                        raise
                    if sent:
                        writer = self._flushing.pop() if self._flushing else None
                        break
                left = _remaining(deadline)
                if left == 0.0:
                    rec.discard()
                    self._drop_pending(records[index:])
                    raise Full
                _wait_fd(
                    self._wsock.fileno(), select.POLLOUT, _RECHECK if left is None else min(left, _RECHECK)
                )
            if writer is not None:
                # The consumer has the pipe; the rest of the item follows.
                # A consumer that dies here took the item with it.
                try:
                    writer.flush(timeout=None)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    writer.close()

    # -- the feeder ----------------------------------------------------------

    def _start_feeder(self) -> None:
        """Called with self._lock held, after adding to the backlog. The
        feeder runs while there is something to hand over, then exits."""
        if self._feeder is not None:
            self._wake_feeder()
            return
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        t = threading.Thread(target=self._feed, name="bigipc-queue-feeder", daemon=True)
        self._feeder = t
        t.start()
        # At exit, wait for the feeder to hand over everything (the stdlib's
        # join_thread), unless cancel_join_thread() was called.
        if not self._joincancelled:
            self._jointhread = _mp_util.Finalize(t, Queue._finalize_join, [weakref.ref(t)], exitpriority=-5)

    @staticmethod
    def _finalize_join(ref: weakref.ref[threading.Thread]) -> None:
        t = ref()
        if t is not None and t.is_alive() and t is not threading.current_thread():
            t.join()

    def _wake_feeder(self) -> None:
        if self._wake_w >= 0:
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._wake_w, b"\0")

    def _feed(self) -> None:
        try:
            self._feed_loop()
        except BaseException:  # pragma: no cover - a bug; do not die silently
            traceback.print_exc()
        finally:
            with self._lock:
                self._retire_feeder()

    def _retire_feeder(self) -> None:
        """Called with self._lock held by the feeder as it exits. Done in
        the same locked section that saw no work left: a put() that comes
        after it finds no feeder and starts a new one."""
        if self._feeder is threading.current_thread():
            self._feeder = None
            _close_fds([self._wake_r, self._wake_w])
            self._wake_r = self._wake_w = -1

    def _feed_loop(self) -> None:
        """Send the backlog in order and finish the item pipes, waiting on
        all of them at once so one slow consumer holds up nothing else."""
        while True:
            with self._lock:
                if self._pid != os.getpid():
                    return
                stuck = False
                while self._backlog:
                    rec = self._backlog[0]
                    try:
                        if not self._try_send(rec):
                            stuck = True
                            break
                    except OSError as exc:
                        rec.discard()
                        self._add(_RESERVED, -rec.count)
                        self._report(exc)
                    self._backlog.popleft()
                flushing = list(self._flushing)
                if not self._backlog and not flushing:
                    self._retire_feeder()
                    return
                wake = self._wake_r
            waiting = []
            for ch in flushing:
                try:
                    ch.flush(timeout=0)
                except TimeoutError:
                    waiting.append(ch)
                    continue
                except OSError:
                    pass  # the consumer of this item died (EPIPE): it took it
                with self._lock:
                    self._flushing.remove(ch)
                ch.close()
            if waiting or stuck:
                p = select.poll()
                p.register(wake, select.POLLIN)
                if stuck:
                    p.register(self._wsock.fileno(), select.POLLOUT)
                for ch in waiting:
                    p.register(ch.fileno(), select.POLLOUT)
                # Some refusals (ENOBUFS, too many descriptors in flight, out
                # of descriptors) do not show in poll(): retry on a timer.
                p.poll(int(_RECHECK * 1000) if stuck else None)
                with contextlib.suppress(BlockingIOError, OSError):
                    os.read(wake, 4096)

    @staticmethod
    def _report(exc: BaseException) -> None:
        """An OS error sending a record from the feeder: the record is
        dropped and reported (as the stdlib's feeder does); the rest goes on."""
        traceback.print_exception(type(exc), exc, exc.__traceback__)

    # -- bounded queues --------------------------------------------------------

    def _reserve(self, n: int, deadline: float | None) -> None:
        if n > self._maxsize:
            raise ValueError("cannot put %d items at once on a queue of maxsize %d" % (n, self._maxsize))
        waiting = False
        try:
            while True:
                with self._lock:
                    self._ensure_process()
                    with self._bound_lock():
                        if self._occupancy() + n <= self._maxsize or (
                            self._repair() and self._occupancy() + n <= self._maxsize
                        ):
                            self._add(_RESERVED, n)
                            return
                        if deadline is not None and deadline <= time.monotonic():
                            raise Full
                        if not waiting:
                            self._counters[_F_WAITERS] += 1
                            waiting = True
                self._wait_bell(deadline)
        finally:
            if waiting:
                with self._lock, self._bound_lock():
                    self._counters[_F_WAITERS] -= 1

    def _occupancy(self) -> int:
        pending = self._sum(_RESERVED)  # before put: see _unfinished
        return self._sum(_PUTS) - self._sum(_GETS) + pending

    def _reclaim_dead(self) -> bool:
        """Drop the pending counts of processes that died holding them.
        Bound lock held. True if anything changed."""
        c = self._counters
        changed = False
        for i in range(c[_F_HIGH]):
            at = _SLOTS_AT + i * _SLOT_FIELDS + _RESERVED
            if i == self._slot or c[at] == 0:
                continue
            try:
                fcntl.lockf(self._shm_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _LOCK_SLOT0 + i)
            except OSError:
                continue  # its owner is alive
            c[at] = 0
            changed = True
            fcntl.lockf(self._shm_fd, fcntl.LOCK_UN, 1, _LOCK_SLOT0 + i)
        return changed

    def _repair(self) -> bool:
        """The queue counts full: reclaim the room held by dead processes,
        and repair a count no live process explains. Bound lock held."""
        if self._reclaim_dead():
            return True
        # Items counted but nowhere: nothing in the socket, nothing pending
        # anywhere, and the counts did not move for a while. Only a process
        # killed between taking a record and counting it leaves that.
        puts, gets = self._sum(_PUTS), self._sum(_GETS)
        excess = puts - gets
        if excess <= 0 or self._sum(_RESERVED) or self._backlog or _readable_now(self._rsock.fileno()):
            self._heal_seen = None
            return False
        now = time.monotonic()
        if self._heal_seen is None or self._heal_seen[:2] != (puts, gets):
            self._heal_seen = (puts, gets, now)
            return False
        if now - self._heal_seen[2] < _HEAL_AFTER:
            return False
        self._add(_GETS, excess)
        self._heal_seen = None
        return True

    # -- consuming --------------------------------------------------------------

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Remove and return an item; ``queue.Empty`` if none comes in time.

        ``timeout`` holds for the whole item: a large item only partly
        arrived when time runs out stays with this process, whole, and the
        next ``get`` here continues it."""
        if self._closed or self._slot < 0:  # closed, or this process's first get
            self._check_open()
        if not self._held and not self._partials:
            # Fast path: an inline record already waiting, or, with no time
            # limit, the next one (the socket is blocking: the wait happens
            # in recvmsg, with no poll and no EAGAIN round trip).
            buf = getattr(self._tls, "buf", None) or self._buffer()
            if self._slot < 0:
                with self._lock:
                    self._ensure_process()
            got = self._ends.recv(buf, self._slot_at, block and timeout is None)
            if isinstance(got, int):
                if got >= 0:  # an inline record, counted as a get
                    if self._counters[_F_WAITERS] > 0:
                        self._ring()
                    return _loads(buf[_RECORD_SIZE:got])
            else:
                n, fds, flags = got
                return self._slow_record(buf, n, fds, flags, _deadline(block, timeout))
        deadline = _deadline(block, timeout)
        out: list[Any] = []
        self._collect(out, 1, deadline)
        return out[0]

    def _slow_record(
        self, buf: memoryview, n: int, fds: list[int], flags: int, deadline: float | None
    ) -> Any:
        """get(): a record the fast path did not handle (a batch, a stream,
        or a bad one). Falls back to a normal receive if the item is lost."""
        out: list[Any] = []
        if not self._handle(buf, n, fds, flags, out, 1, deadline):
            self._collect(out, 1, deadline)
        return out[0]

    def get_nowait(self) -> Any:
        return self.get(False)

    def get_many(
        self, max_items: int = 1 << 30, block: bool = True, timeout: float | None = None
    ) -> list[Any]:
        """Remove and return up to ``max_items`` items: waits (up to
        ``timeout``) for the first, then takes what is already there.
        ``queue.Empty`` if nothing came in time."""
        self._check_open()
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        deadline = _deadline(block, timeout)
        out: list[Any] = []
        self._collect(out, max_items, deadline)
        return out

    def _collect(self, out: list[Any], want: int, deadline: float | None) -> None:
        """Append up to ``want`` items to ``out``, at least one or raise Empty."""
        with self._rlock:
            while self._held and len(out) < want:
                out.append(self._held.popleft())
            partial = self._partials.popleft() if (len(out) < want and self._partials) else None
        if partial is not None:
            self._finish_stream(partial, out, deadline)
        while len(out) < want:
            if out:
                deadline = 0.0  # have some: take only what is there now
            if not self._receive(out, want, deadline):
                if out:
                    return
                raise Empty

    def _count_gets(self, count: int) -> None:
        with self._lock:
            if self._slot < 0:
                self._ensure_process()
            self._add(_GETS, count)
        if self._counters[_F_WAITERS] > 0:
            self._ring()

    def _buffer(self) -> memoryview:
        buf = getattr(self._tls, "buf", None)
        if buf is None:
            buf = self._tls.buf = memoryview(bytearray(self._inline_limit))
        return buf

    def _receive(self, out: list[Any], want: int, deadline: float | None) -> bool:
        """Receive one record into ``out``; False when none came in time."""
        buf = self._buffer()
        fd = self._rsock.fileno()
        while True:
            if self._slot < 0:
                with self._lock:
                    self._ensure_process()
            got = self._ends.recv(buf, self._slot_at, deadline is None)
            if isinstance(got, int):
                if got >= 0:  # an inline record, counted as a get
                    if self._counters[_F_WAITERS] > 0:
                        self._ring()
                    out.append(_loads(buf[_RECORD_SIZE:got]))
                    return True
                left = _remaining(deadline)
                if left == 0.0:
                    return False
                _wait_fd(fd, select.POLLIN, left)
                continue
            n, fds, flags = got
            if self._handle(buf, n, fds, flags, out, want, deadline):
                return True
            # That item's producer died before finishing it: it is lost.
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def _handle(
        self,
        buf: memoryview,
        n: int,
        fds: list[int],
        flags: int,
        out: list[Any],
        want: int,
        deadline: float | None,
    ) -> bool:
        """Decode one received record into ``out``. False if it was a large
        item whose producer died before writing all of it (dropped)."""
        if fds and not _RECV_CLOEXEC:
            for fd in fds:
                os.set_inheritable(fd, False)
        try:
            kind, count = self._check_record(buf, n, flags, fds)
        except BaseException:
            _close_fds(fds)
            raise
        self._count_gets(1 if kind == KIND_PARTS else count)  # parts: one item
        if kind == KIND_INLINE:
            out.append(_loads(buf[_RECORD.size : n]))
        elif kind == KIND_BATCH:
            self._unpack_batch(buf, n, count, out, want)
        elif kind == KIND_PARTS:
            out.append(self._unpack_parts(buf, n, count))
        elif kind == KIND_LIST:
            items = _loads(buf[_RECORD.size : n])
            if type(items) is not list or len(items) != count:
                raise FrameError("list record does not hold %d items" % count)
            self._deliver(items, out, want)
        else:
            return self._finish_stream(Channel(fds[0], writable=False), out, deadline)
        return True

    def _unpack_parts(self, buf: memoryview, n: int, count: int) -> Any:
        """Rebuild an object whose out-of-band buffers came in the record.
        A record filling at least half the receive buffer keeps that buffer
        (the thread gets a fresh one): the arrays live where the kernel put
        the bytes. A smaller one has its buffers copied out."""
        raw = struct.unpack_from("!%dI" % count, buf, _RECORD.size)
        lengths = [length & ~_READONLY for length in raw]
        offsets, total = _parts_layout(lengths, count)
        if total != n:
            raise FrameError("parts record lengths do not add up (%d != %d)" % (total, n))
        # Read-only parts were bytes at the sender and become bytes again
        # (a copy: a bytes object cannot be received into). Writable ones
        # (arrays, bytearrays) stay where they are when they fill at least
        # half the receive buffer: the thread then gets a fresh buffer.
        writable = sum(ln for r, ln in zip(raw[1:], lengths[1:]) if not r & _READONLY)
        keep = writable >= len(buf) // 2
        if keep:
            self._tls.buf = None
        buffers: list[Any] = []
        for r, o, ln in zip(raw[1:], offsets[1:], lengths[1:]):
            view = buf[o : o + ln]
            if r & _READONLY:
                buffers.append(bytes(view))
            else:
                buffers.append(view if keep else bytearray(view))
        return _loads(buf[offsets[0] : offsets[0] + lengths[0]], buffers=buffers)

    @staticmethod
    def _check_record(buf: memoryview, n: int, flags: int, fds: list[int]) -> tuple[int, int]:
        if flags & _BAD_FLAGS or n < _RECORD.size:
            raise FrameError("queue record truncated (%d bytes, flags %#x)" % (n, flags))
        magic, version, kind, count = _RECORD.unpack_from(buf)
        if magic != _MAGIC or version != _VERSION:
            raise FrameError("not a bigipc queue record (magic %r, version %d)" % (magic, version))
        if kind == KIND_STREAM:
            if len(fds) != 1 or count != 1:
                raise FrameError("stream record with %d descriptors" % len(fds))
        elif fds or kind not in (KIND_INLINE, KIND_BATCH, KIND_PARTS, KIND_LIST) or count < 1:
            raise FrameError("bad queue record (kind %d, count %d)" % (kind, count))
        return kind, count

    def _unpack_batch(self, buf: memoryview, n: int, count: int, out: list[Any], want: int) -> None:
        at = _RECORD.size + _LENGTH.size * count
        lengths = struct.unpack_from("!%dI" % count, buf, _RECORD.size)
        if at + sum(lengths) != n:
            raise FrameError("batch record lengths do not add up")
        items = []
        for length in lengths:
            items.append(_loads(buf[at : at + length]))
            at += length
        self._deliver(items, out, want)

    def _deliver(self, items: list[Any], out: list[Any], want: int) -> None:
        """Hand ``want`` items to the caller; this process keeps the rest."""
        take = want - len(out)
        out.extend(items[:take])
        if len(items) > take:
            with self._rlock:
                self._held.extendleft(reversed(items[take:]))

    def _finish_stream(self, ch: Any, out: list[Any], deadline: float | None) -> bool:
        """Read a large item from its pipe into ``out``; False if its
        producer died before finishing it. On timeout (or a signal handler
        that raises) the item stays with this process for the next get."""
        try:
            message = ch.recv_message(timeout=_remaining(deadline))
        except (EOFError, FrameError):
            ch.close()
            if self._joinable:
                # Its producer died before finishing it: nobody will ever
                # mark it done, so count it done here, or join() would wait
                # for it for good.
                with self._lock:
                    self._ensure_process()
                    with self._bound_lock():
                        self._add(_DONE, 1)
                self._ring()
            return False
        except TimeoutError:
            with self._rlock:
                self._partials.appendleft(ch)
            raise Empty from None
        except BaseException:
            with self._rlock:
                self._partials.appendleft(ch)
            raise
        ch.close()
        if type(message) is list:
            out.append(_loads(message[0], buffers=message[1:]))
        else:
            out.append(_loads(message))
        return True

    # -- state ----------------------------------------------------------------

    def qsize(self) -> int:
        """Items in the queue: put and not yet taken by any consumer, plus
        those this process holds (the rest of a batch, a partial item).
        Works on Linux and macOS."""
        with self._rlock:
            local = len(self._held) + len(self._partials)
        return max(0, self._sum(_PUTS) - self._sum(_GETS)) + local

    def empty(self) -> bool:
        """True when this process holds no item of the queue and none is
        waiting in its socket. On a closed queue: ``True`` if this process
        never put anything (as the stdlib's Queue), else
        ``QueueClosedError``."""
        if self._closed and not self._blocking_put and self._jointhread is None and not self._put_any:
            return True
        self._check_open()
        with self._rlock:
            if self._held or self._partials:
                return False
        return not _readable_now(self._rsock.fileno())

    def full(self) -> bool:
        return self._bounded and self._occupancy() >= self._maxsize

    @property
    def maxsize(self) -> int:
        return self._maxsize

    @property
    def inline_limit(self) -> int:
        return self._inline_limit

    # -- closing ----------------------------------------------------------------

    def close(self) -> None:
        """No more puts or gets from this process. The feeder still hands
        over what it holds, then exits. The queue's descriptors close when
        this process's queue object goes away, or at once when this process
        has no feeder running (then ``qsize()`` raises too)."""
        if self._closed:
            return
        self._closed = True
        if self._pid != os.getpid():
            self._after_fork()
        with self._lock:
            started = self._feeder is not None
        with self._rlock:
            partials = list(self._partials)
            self._partials.clear()
            self._held.clear()
        for ch in partials:
            ch.close()
        if not started:
            self._finalizer()

    def join_thread(self) -> None:
        """Wait for the feeder to hand everything over. Only after close()."""
        if not self._closed:
            raise ValueError("join_thread() needs close() first: %r" % self)
        if self._jointhread is not None:
            self._jointhread()
        elif self._feeder is not None:
            self._feeder.join()

    def cancel_join_thread(self) -> None:
        """Do not wait for the feeder at exit: items it still holds (records
        the socket had no room for, the unwritten part of large items) are
        lost when this process exits."""
        self._joincancelled = True
        if self._jointhread is not None:
            self._jointhread.cancel()


class SimpleQueue(Queue):
    """``multiprocessing.SimpleQueue``: ``put`` writes in the caller and waits
    for room in the pipe, with no feeder thread and no copy of the item."""

    _blocking_put = True

    def __init__(self, *, ctx: Any = None, inline_limit: int | None = None) -> None:
        super().__init__(0, ctx=ctx, inline_limit=inline_limit)

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        """Put ``obj``, waiting while the queue's socket is full (up to
        ``timeout``: ``queue.Full``). A large item is written while its
        consumer reads it."""
        super().put(obj, block, timeout)


class JoinableQueue(Queue):
    """``multiprocessing.JoinableQueue``: ``task_done`` and ``join`` on top.
    The count of unfinished tasks lives in the shared block."""

    _joinable = True

    def task_done(self) -> None:
        """Mark one item taken by a ``get`` as processed."""
        self._check_open()
        with self._lock:
            self._ensure_process()
            with self._bound_lock():
                # Pending counts too: a consumer can receive an item before
                # its producer has moved it from pending to put.
                if self._unfinished() <= 0:
                    raise ValueError("task_done() called too many times")
                self._add(_DONE, 1)
                finished = self._unfinished() <= 0
        if finished:
            self._ring()

    def _unfinished(self) -> int:
        # Pending is read before put: producers move items from the one to
        # the other without the bound lock. And never less than what
        # consumers took: a producer killed between sending an item and
        # counting it leaves "put" short.
        done = self._sum(_DONE)
        pending = self._sum(_RESERVED)
        return max(self._sum(_PUTS) + pending, self._sum(_GETS)) - done

    def join(self, timeout: float | None = None) -> None:
        """Wait until every item put (by any process) has been marked done.
        ``timeout`` (seconds; bigipc's addition) raises ``TimeoutError`` when
        it passes. Items a dead process had accepted but not yet handed to
        the socket are not waited for; an item a consumer took and never
        marked done (it died) is, so use a timeout where that can happen."""
        self._check_open()
        deadline = _deadline(True, timeout)
        while True:
            with self._lock:
                self._ensure_process()
                with self._bound_lock():
                    if self._unfinished() <= 0 or (self._reclaim_dead() and self._unfinished() <= 0):
                        return
            if deadline is not None and deadline <= time.monotonic():
                raise TimeoutError("join() timed out with %d tasks unfinished" % self._unfinished())
            self._wait_bell(deadline)


def _rebuild_queue(
    cls: type[Queue],
    maxsize: int,
    token: bytes,
    inline_limit: int,
    joincancelled: bool,
    *handles: Any,
) -> Queue:
    fds = [h.detach() for h in handles]
    existing = _by_token.get(token)
    if existing is not None and not existing._closed:
        # This process already has the queue. Keep the new descriptors open
        # but unused: closing a descriptor of the shared file would drop this
        # process's record locks on it.
        existing._owned_fds.extend(fds)  # closed with the queue
        return existing
    q = cls.__new__(cls)
    rfd, wfd, shm_fd, bell_r, bell_w = fds
    q._setup(maxsize, token, inline_limit, rfd, wfd, shm_fd, bell_r, bell_w, [])
    q._joincancelled = joincancelled
    return q


def _after_fork_in_child() -> None:
    # Every queue must be reset, whatever happens to one of them: a queue
    # left on its parent's state would hand its items to the parent's
    # feeder, which does not exist here. One that fails is marked for the
    # slow path (negative slot, foreign pid), where its next use sets it up
    # again or raises the error to the caller.
    for q in list(_live):
        try:
            q._after_fork()
        except Exception:
            q._slot = -1
            q._pid = -1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
