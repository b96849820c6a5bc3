# The Channel type: one framed byte stream on one file descriptor.

from multiprocessing import BufferTooShort
from bigipc._errors import FrameError, MessageTooLong, MultipartMessageError, TruncatedMessageError

cdef enum:
    _LONG_HEADER = -1               # 4-byte header value: an 8-byte length follows
    _MULTIPART_HEADER = -2          # 4-byte header value: a multipart message follows
    _MAX_SHORT_LENGTH = 0x7FFFFFFF  # largest payload with a 4-byte header
    _MAX_PARTS = 1 << 16            # most parts one multipart message may have
    _KIND_UNKNOWN = 0
    _KIND_PLAIN = 1
    _KIND_MULTIPART = 2

# In a multipart length table, the top bit of a length marks a part sent
# from read-only memory; it is delivered as bytes, the others as bytearray.
cdef uint64_t _READONLY_PART = (<uint64_t>1) << 63

LONG_HEADER = _LONG_HEADER
MULTIPART_HEADER = _MULTIPART_HEADER
MAX_SHORT_LENGTH = _MAX_SHORT_LENGTH
MAX_PARTS = _MAX_PARTS

# One syscall moves at most this much. Linux stops at about 2 GiB anyway and
# macOS rejects more than INT_MAX with EINVAL; a bounded chunk also bounds
# how long the GIL-free part of a call runs before signals are looked at.
DEF _MAX_IO = 1 << 30
# iovecs handed to one writev/sendmsg (POSIX guarantees at least 16; Linux
# and macOS take 1024).
DEF _IOV_BATCH = 64
# Receive buffers from this size up ask for huge pages: filling a fresh
# 256 MiB buffer otherwise costs 65536 page faults.
DEF _HUGE_PAGE_THRESHOLD = 4 << 20
# Reads and writes of at most this many bytes keep the GIL. The descriptor
# is non-blocking (O_NONBLOCK on a pipe, MSG_DONTWAIT on a socket), so such
# a call never waits: it copies a few KiB or fails with EAGAIN, and the wait
# that may follow releases the GIL. Releasing and taking back the GIL around
# each call costs more than the copy for small messages: with it kept, a
# 100-byte message costs the receiver two syscalls and no GIL hand-over.
DEF _GIL_IO_MAX = 16 << 10
# Most bytes recv_many reads in one system call.
DEF _MAX_BATCH_READ = 1 << 20
# send_bytes of an exact bytes object into a pipe hands the pages of all but
# the last pipe-capacity bytes to the pipe by reference (vmsplice) when at
# least this much would go that way (docs/protocol.md, "vmsplice").
DEF _SPLICE_MIN = 256 << 10

import os as _os

# Bumped in every child forked by os.fork() (and so by multiprocessing):
# a Channel whose direction was taken in an older generation was taken by a
# thread of a parent process (see Channel._lock).
cdef unsigned long _fork_generation = 0


def _forked_child():
    global _fork_generation
    _fork_generation += 1


if hasattr(_os, "register_at_fork"):
    _os.register_at_fork(after_in_child=_forked_child)
# BIGIPC_VMSPLICE=0 turns page-reference sends off (every byte is copied).
cdef bint _splice_enabled = bool(BIGIPC_HAVE_VMSPLICE) and _os.environ.get("BIGIPC_VMSPLICE", "1") != "0"
VMSPLICE = _splice_enabled


cdef inline void _pack_u32(uint8_t *out, uint32_t value) noexcept nogil:
    out[0] = <uint8_t>(value >> 24)
    out[1] = <uint8_t>(value >> 16)
    out[2] = <uint8_t>(value >> 8)
    out[3] = <uint8_t>value


cdef inline uint32_t _unpack_u32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | <uint32_t>p[3]


cdef inline Py_ssize_t _make_header(uint8_t *out, uint64_t length) noexcept nogil:
    """Write the frame header for ``length`` into ``out``; return its size."""
    if length <= _MAX_SHORT_LENGTH:
        _pack_u32(out, <uint32_t>length)
        return 4
    _pack_u32(out, 0xFFFFFFFFu)
    _pack_u32(out + 4, <uint32_t>(length >> 32))
    _pack_u32(out + 8, <uint32_t>(length & 0xFFFFFFFFu))
    return 12


cdef inline void _pack_u64(uint8_t *out, uint64_t value) noexcept nogil:
    _pack_u32(out, <uint32_t>(value >> 32))
    _pack_u32(out + 4, <uint32_t>(value & 0xFFFFFFFFu))


cdef inline uint64_t _unpack_u64(const uint8_t *p) noexcept nogil:
    return (<uint64_t>_unpack_u32(p) << 32) | _unpack_u32(p + 4)


cdef inline bint _fits(const iovec *iov, Py_ssize_t count, size_t limit) noexcept nogil:
    """Whether the first ``count`` entries of ``iov`` hold at most ``limit``
    bytes (stops looking as soon as they do not)."""
    cdef size_t total = 0
    cdef Py_ssize_t i
    for i in range(count):
        total += iov[i].iov_len
        if total > limit:
            return False
    return True


cdef object _closed_error():
    return OSError("handle is closed")


cdef class Channel:
    """One end of a framed byte stream; owns its file descriptor.

    See bigipc/_core.pyi for the full contract.
    """

    cdef int _fd
    cdef bint _readable
    cdef bint _writable
    cdef bint _is_socket
    cdef int _saved_flags            # flags before O_NONBLOCK, -1 if untouched
    cdef pid_t _flags_pid            # the process that set O_NONBLOCK
    cdef uint64_t _max_message_size  # 0 with _limit_size false: no limit
    cdef bint _limit_size
    # One lock per direction, in two levels. _send_users/_recv_users count
    # the thread that holds the direction plus those waiting for it; they
    # are only read and changed with the GIL held, so taking a free
    # direction is one test and one store. The thread locks are used only
    # when threads actually contend: they start out taken, and releasing
    # one hands the direction to one waiter. _send_gen/_recv_gen record the
    # fork generation (_fork_generation) in which the holder took it.
    cdef int _send_users
    cdef int _recv_users
    cdef unsigned long _send_gen
    cdef unsigned long _recv_gen
    cdef PyThread_type_lock _send_lock
    cdef PyThread_type_lock _recv_lock

    # Rest of a message whose send was interrupted: a list of
    # [bytes, start, end] still to write, in order.
    cdef list _pending

    # vmsplice (pipes only): whether send_bytes may use it on this fd, and
    # how many payload bytes went to the pipe by reference so far.
    cdef bint _can_splice
    cdef unsigned long long _spliced

    # State of the message being received, kept across interrupted calls.
    # _header holds the fixed header bytes read so far (_header_need of
    # them make it whole: 4, 12 for a long plain frame, 8 for a multipart
    # one). A multipart header is followed by its table of part lengths,
    # read into the private bytes object _table. Once _header_done:
    #   plain:     _length is the payload size; _partial (private bytes of
    #              that size, or None) holds its first _have bytes.
    #   multipart: _length is the total; _parts (list, or None) holds the
    #              part objects; part _part_index has its first _have bytes.
    cdef uint8_t _header[12]
    cdef int _header_have
    cdef int _header_need
    cdef int _kind
    cdef bint _header_done
    cdef uint64_t _length
    cdef uint32_t _part_count
    cdef object _table
    cdef Py_ssize_t _table_have
    cdef object _partial
    cdef list _parts
    cdef Py_ssize_t _part_index
    cdef Py_ssize_t _have
    # A plain message being streamed to the caller (recv_begin): _have bytes
    # of it have left the descriptor, _delivered of them reached the caller;
    # the difference, if any, sits in _partial from an earlier interrupted
    # receive.
    cdef bint _streaming
    cdef Py_ssize_t _delivered
    # A framing error makes the receive side unusable: (type, message).
    cdef object _recv_failure
    cdef object __weakref__

    def __cinit__(self):
        self._fd = -1
        self._saved_flags = -1
        self._send_lock = NULL
        self._recv_lock = NULL

    def __init__(self, int fd, bint readable=True, bint writable=True, *, max_message_size=None):
        cdef struct_stat st
        cdef int flags, one = 1
        if fd < 0:
            raise ValueError("invalid file descriptor")
        if not readable and not writable:
            raise ValueError("at least one of `readable` and `writable` must be True")
        if fstat(fd, &st) != 0:
            PyErr_SetFromErrno(OSError)
        self.max_message_size = max_message_size
        self._renew_lock(True)
        self._renew_lock(False)
        self._is_socket = S_ISSOCK(st.st_mode)
        if self._is_socket:
            # Sockets keep their flags: MSG_DONTWAIT makes each of our calls
            # non-blocking, and other users of the fd see what they expect.
            if BIGIPC_SO_NOSIGPIPE:
                setsockopt(fd, SOL_SOCKET, BIGIPC_SO_NOSIGPIPE, &one, sizeof(one))
        else:
            # Pipes have no per-call non-blocking flag, so the open file
            # description itself goes non-blocking; detach() undoes it.
            flags = fcntl(fd, F_GETFL)
            if flags < 0:
                PyErr_SetFromErrno(OSError)
            if not (flags & O_NONBLOCK):
                if fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0:
                    PyErr_SetFromErrno(OSError)
                self._saved_flags = flags
                self._flags_pid = getpid()
        self._readable = readable
        self._writable = writable
        self._pending = []
        self._can_splice = _splice_enabled and writable and not self._is_socket
        self._reset_recv_state()
        self._recv_failure = None
        self._fd = fd

    def __dealloc__(self):
        if self._fd >= 0:
            c_close(self._fd)
            self._fd = -1
        if self._send_lock != NULL:
            PyThread_free_lock(self._send_lock)
            self._send_lock = NULL
        if self._recv_lock != NULL:
            PyThread_free_lock(self._recv_lock)
            self._recv_lock = NULL

    # ------------------------------------------------------------ properties

    @property
    def closed(self):
        return self._fd < 0

    @property
    def readable(self):
        return self._readable

    @property
    def writable(self):
        return self._writable

    @property
    def is_socket(self):
        return self._is_socket

    @property
    def max_message_size(self):
        return self._max_message_size if self._limit_size else None

    @max_message_size.setter
    def max_message_size(self, value):
        if value is None:
            self._limit_size = False
            self._max_message_size = 0
            return
        if value < 0:
            raise ValueError("max_message_size must be None or >= 0")
        self._max_message_size = value
        self._limit_size = True

    @property
    def send_pending(self):
        cdef Py_ssize_t total = 0
        for entry in self._pending:
            total += <Py_ssize_t>entry[2] - <Py_ssize_t>entry[1]
        return total

    @property
    def spliced_bytes(self):
        return self._spliced

    @property
    def recv_in_progress(self):
        return self._header_have > 0

    def fileno(self):
        if self._fd < 0:
            raise _closed_error()
        return self._fd

    def close(self):
        cdef int fd = self._fd
        if fd >= 0:
            self._fd = -1
            self._pending = []
            if c_close(fd) != 0 and errno != EINTR:
                # EINTR from close() still leaves the fd closed on Linux and
                # macOS; retrying could close someone else's new fd.
                PyErr_SetFromErrno(OSError)

    def detach(self):
        cdef int fd = self._fd
        if fd < 0:
            raise _closed_error()
        if self._saved_flags >= 0 and self._flags_pid == getpid():
            # Only the process that made the description non-blocking undoes
            # it: a forked child detaching its copy must not turn the
            # parent's reads into blocking ones behind its back.
            fcntl(fd, F_SETFL, self._saved_flags)
        self._saved_flags = -1
        self._fd = -1
        self._pending = []
        return fd

    def __repr__(self):
        if self._fd < 0:
            return "<bigipc._core.Channel closed>"
        return "<bigipc._core.Channel fd=%d%s%s%s>" % (
            self._fd, " readable" if self._readable else "",
            " writable" if self._writable else "", " socket" if self._is_socket else "")

    # --------------------------------------------------------------- helpers

    cdef int _check(self, bint sending) except -1:
        if self._fd < 0:
            raise _closed_error()
        if sending and not self._writable:
            raise OSError("connection is read-only")
        if not sending and not self._readable:
            raise OSError("connection is write-only")
        return 0

    cdef int _lock(self, bint sending, double deadline) except -1:
        """Take this direction for the calling thread (the GIL is held)."""
        cdef int *users = &self._send_users if sending else &self._recv_users
        cdef unsigned long *gen = &self._send_gen if sending else &self._recv_gen
        if users[0] == 0:
            users[0] = 1
            gen[0] = _fork_generation
            return 0
        if gen[0] != _fork_generation:
            # The holder and waiters counted here are threads of a parent
            # process, which do not exist after fork(): start over.
            self._renew_lock(sending)
            users[0] = 1
        else:
            self._wait_for_turn(sending, deadline)
        if self._fd < 0:
            self._unlock(sending)
            raise _closed_error()
        return 0

    cdef int _wait_for_turn(self, bint sending, double deadline) except -1:
        """_lock() when another thread holds the direction."""
        cdef int *users = &self._send_users if sending else &self._recv_users
        users[0] += 1
        try:
            _acquire_lock(self._thread_lock(sending), deadline, "send" if sending else "receive")
        except BaseException:
            # A hand-over may have come after the wait gave up and before
            # this thread took the GIL back: then this thread holds the
            # direction and passes it on; otherwise it stops waiting.
            if PyThread_acquire_lock_timed(self._thread_lock(sending), 0, 0) == PY_LOCK_ACQUIRED:
                self._unlock(sending)
            else:
                users[0] -= 1
            raise
        if sending:
            self._send_gen = _fork_generation
        else:
            self._recv_gen = _fork_generation
        return 0

    cdef inline PyThread_type_lock _thread_lock(self, bint sending) noexcept:
        return self._send_lock if sending else self._recv_lock

    cdef void _unlock(self, bint sending) noexcept:
        cdef int *users = &self._send_users if sending else &self._recv_users
        if users[0] > 0:
            users[0] -= 1
            if users[0] > 0:
                PyThread_release_lock(self._thread_lock(sending))

    cdef int _renew_lock(self, bint sending) except -1:
        """A fresh, taken thread lock for one direction, with no users (at
        creation, and in a forked child whose inherited state counts threads
        of its parent)."""
        cdef PyThread_type_lock fresh = PyThread_allocate_lock()
        if fresh == NULL:
            raise MemoryError()
        PyThread_acquire_lock_timed(fresh, 0, 0)
        # An inherited lock is not freed: the copy in this process is never
        # waited on again, and freeing a lock in an unknown state is not
        # allowed (one small object leaks, once per fork and direction).
        if sending:
            self._send_lock = fresh
            self._send_users = 0
            self._send_gen = _fork_generation
        else:
            self._recv_lock = fresh
            self._recv_users = 0
            self._recv_gen = _fork_generation
        return 0

    # ------------------------------------------------------------------ send

    cdef Py_ssize_t _write_some(self, iovec *iov, Py_ssize_t count, int *err) noexcept nogil:
        """One write of at most _IOV_BATCH iovecs and _MAX_IO bytes."""
        cdef iovec batch[_IOV_BATCH]
        cdef msghdr message
        cdef Py_ssize_t n = 0, total = 0
        cdef ssize_t rc
        while n < count and n < _IOV_BATCH and total < _MAX_IO:
            batch[n] = iov[n]
            if batch[n].iov_len > <size_t>(_MAX_IO - total):
                batch[n].iov_len = <size_t>(_MAX_IO - total)
            total += batch[n].iov_len
            n += 1
        if self._is_socket:
            memset(&message, 0, sizeof(message))
            message.msg_iov = batch
            message.msg_iovlen = n
            rc = sendmsg(self._fd, &message, MSG_DONTWAIT | MSG_NOSIGNAL)
        elif n == 1:
            rc = write(self._fd, batch[0].iov_base, batch[0].iov_len)
        else:
            rc = writev(self._fd, batch, <int>n)
        if rc < 0:
            err[0] = errno
        return rc

    cdef int _write_all(self, iovec *iov, Py_ssize_t count, Py_ssize_t *first,
                        Py_ssize_t *written, double deadline,
                        Py_ssize_t splice_index=-1) except -1:
        """Write iov[first[0]:count] completely, advancing the entries in
        place so that, on an exception, they describe exactly the unsent rest.

        iov[splice_index] (if >= 0) goes to the pipe by page reference
        (vmsplice); see send_bytes for when that is safe.
        """
        cdef Py_ssize_t rc, i, limit
        cdef int err = 0
        cdef size_t chunk
        while True:
            i = first[0]
            while i < count and iov[i].iov_len == 0:
                i += 1
            first[0] = i
            if i >= count:
                return 0
            if i == splice_index:
                chunk = iov[i].iov_len if iov[i].iov_len < _MAX_IO else _MAX_IO
                with nogil:
                    rc = bigipc_vmsplice(self._fd, iov[i].iov_base, chunk)
                    if rc < 0:
                        err = errno
                if rc > 0:
                    self._spliced += <unsigned long long>rc
                elif rc < 0 and err != EAGAIN and err != EINTR:
                    # Not possible on this descriptor after all (ENOSYS,
                    # EINVAL, EBADF...): copy the rest as usual. A real
                    # write error shows up on that write.
                    self._can_splice = False
                    splice_index = -1
                    continue
            else:
                limit = count if splice_index < i else splice_index
                if _fits(iov + i, limit - i, _GIL_IO_MAX):
                    rc = self._write_some(iov + i, limit - i, &err)  # cannot wait (_GIL_IO_MAX)
                else:
                    with nogil:
                        rc = self._write_some(iov + i, limit - i, &err)
            if rc > 0:
                written[0] += rc
                while rc > 0:
                    if <size_t>rc >= iov[i].iov_len:
                        rc -= iov[i].iov_len
                        iov[i].iov_len = 0
                        i += 1
                    else:
                        iov[i].iov_base = <char *>iov[i].iov_base + rc
                        iov[i].iov_len -= rc
                        rc = 0
                while i < count and iov[i].iov_len == 0:
                    i += 1
                if i < count:
                    # Only while bytes remain: a send that is complete must
                    # never report a timeout (the caller would send again).
                    _checkpoint(deadline, "sending")
                continue
            if rc == 0 or err == EAGAIN or err == EWOULDBLOCK:
                if not _wait_fd(self._fd, POLLOUT, deadline):
                    raise TimeoutError("timed out sending a message")
            elif err == EINTR:
                if PyErr_CheckSignals() < 0:
                    return -1
            else:
                raise _os_error(err)

    cdef int _flush(self, double deadline) except -1:
        """Write the rest of an interrupted message; keep what is still unsent
        if this is interrupted too."""
        cdef Py_ssize_t count = len(self._pending), first = 0, written = 0, i
        cdef iovec *iov
        cdef list entry
        if count == 0:
            return 0
        iov = <iovec *>PyMem_Malloc(count * sizeof(iovec))
        if iov == NULL:
            raise MemoryError()
        try:
            for i in range(count):
                entry = self._pending[i]
                iov[i].iov_base = PyBytes_AS_STRING(entry[0]) + <Py_ssize_t>entry[1]
                iov[i].iov_len = <Py_ssize_t>entry[2] - <Py_ssize_t>entry[1]
            try:
                self._write_all(iov, count, &first, &written, deadline)
            except BaseException:
                for i in range(count):
                    entry = self._pending[i]
                    entry[1] = <Py_ssize_t>entry[2] - <Py_ssize_t>iov[i].iov_len
                self._pending = [e for e in self._pending if e[1] < e[2]]
                raise
            self._pending = []
        finally:
            PyMem_Free(iov)
        return 0

    cdef int _send_frame(self, iovec *iov, Py_ssize_t count, object keep, double deadline,
                         Py_ssize_t splice_index=-1) except -1:
        """Send one frame: iov[0] is its header, iov[1:count] the payload.

        Anything pending from an interrupted send goes first. ``keep`` is an
        immutable bytes object the payload entries point into (or None): if
        the send is interrupted it is held instead of copied. iov[splice_index]
        may go to the pipe by reference (see _write_all).
        """
        cdef Py_ssize_t first = 0, written = 0
        self._flush(deadline)
        try:
            self._write_all(iov, count, &first, &written, deadline, splice_index)
        except BaseException as exc:
            if written > 0:
                self._save_rest(iov, count, first, keep)
                if isinstance(exc, TimeoutError):
                    raise TimeoutError(
                        "timed out sending a message; its last %d bytes are pending and go "
                        "out before the next message (flush() sends them)" % self.send_pending
                    ) from None
            raise
        return 0

    cdef int _save_rest(self, iovec *iov, Py_ssize_t count, Py_ssize_t first, object keep) except -1:
        cdef Py_ssize_t i
        cdef char *base
        cdef list rest = []
        for i in range(first, count):
            if iov[i].iov_len == 0:
                continue
            if i >= 1 and keep is not None:
                base = PyBytes_AS_STRING(keep)
                rest.append([keep, <char *>iov[i].iov_base - base,
                             <char *>iov[i].iov_base - base + <Py_ssize_t>iov[i].iov_len])
            else:
                rest.append([PyBytes_FromStringAndSize(<char *>iov[i].iov_base, iov[i].iov_len),
                             0, <Py_ssize_t>iov[i].iov_len])
        self._pending = rest
        return 0

    def send_bytes(self, data, Py_ssize_t offset=0, size=None, *, timeout=None):
        """Send ``data[offset:offset+size]`` (bytes) as one message."""
        cdef Py_buffer view
        cdef Py_ssize_t n, capacity, splice_index = -1
        cdef int count = 2
        cdef iovec iov[3]
        cdef uint8_t header[12]
        cdef double deadline
        cdef object keep = None
        self._check(True)
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            n = view.len
            if offset < 0:
                raise ValueError("offset is negative")
            if n < offset:
                raise ValueError("buffer length < offset")
            if size is None:
                size = n - offset
            elif size < 0:
                raise ValueError("size is negative")
            elif offset + size > n:
                raise ValueError("buffer length < offset + size")
            iov[0].iov_base = header
            iov[0].iov_len = _make_header(header, <uint64_t>size)
            iov[1].iov_base = <char *>view.buf + offset
            iov[1].iov_len = <Py_ssize_t>size
            if PyBytes_CheckExact(data):
                keep = data
            deadline = _deadline(timeout)
            self._lock(True, deadline)
            try:
                n = <Py_ssize_t>iov[1].iov_len
                if keep is not None and self._can_splice and n > _SPLICE_MIN:
                    # All but the last `capacity` bytes go by reference; those
                    # last ones are copied. Once they are all in, the reader
                    # has taken every referenced page (the pipe holds no more
                    # than `capacity` bytes, in order), so no reference to
                    # `data` outlives a completed send. An interrupted one
                    # keeps `data` itself in _pending until its rest is
                    # written (or the frame is abandoned by close()).
                    capacity = bigipc_pipe_capacity(self._fd)
                    if capacity > 0 and n - capacity >= _SPLICE_MIN:
                        iov[2].iov_base = <char *>iov[1].iov_base + (n - capacity)
                        iov[2].iov_len = <size_t>capacity
                        iov[1].iov_len = <size_t>(n - capacity)
                        splice_index = 1
                        count = 3
                    elif capacity <= 0:
                        self._can_splice = False
                self._send_frame(iov, count, keep, deadline, splice_index)
            finally:
                self._unlock(True)
        finally:
            PyBuffer_Release(&view)

    cdef int _send_buffers(self, parts, int mode, double deadline) except -1:
        """Send the buffers of ``parts``: mode 0 joins them into one plain
        message, 1 sends a multipart message, 2 sends each as its own
        message, all with as few system calls as the kernel allows."""
        cdef Py_ssize_t count = len(parts), got = 0, i, slots, header_size
        cdef Py_buffer *views = NULL
        cdef iovec *iov = NULL
        cdef uint8_t *headers = NULL
        cdef uint64_t total = 0
        if mode == 1 and not (1 <= count <= _MAX_PARTS):
            raise ValueError("a multipart message has 1 to %d parts, not %d" % (_MAX_PARTS, count))
        if mode == 2:
            slots = 2 * count
            header_size = 12 * count
        else:
            slots = count + 1
            header_size = 8 + 8 * count if mode == 1 else 12
        views = <Py_buffer *>PyMem_Malloc((count + 1) * sizeof(Py_buffer))
        iov = <iovec *>PyMem_Malloc((slots + 1) * sizeof(iovec))
        headers = <uint8_t *>PyMem_Malloc(header_size + 1)
        try:
            if views == NULL or iov == NULL or headers == NULL:
                raise MemoryError()
            for i in range(count):
                PyObject_GetBuffer(parts[i], &views[i], PyBUF_SIMPLE)
                got += 1
                total += <uint64_t>views[i].len
                if mode == 2:
                    iov[2 * i].iov_base = headers + 12 * i
                    iov[2 * i].iov_len = _make_header(headers + 12 * i, <uint64_t>views[i].len)
                    iov[2 * i + 1].iov_base = views[i].buf
                    iov[2 * i + 1].iov_len = views[i].len
                else:
                    iov[i + 1].iov_base = views[i].buf
                    iov[i + 1].iov_len = views[i].len
                    if mode == 1:
                        _pack_u64(headers + 8 + 8 * i, <uint64_t>views[i].len
                                  | (_READONLY_PART if views[i].readonly else 0))
            if mode == 0:
                iov[0].iov_base = headers
                iov[0].iov_len = _make_header(headers, total)
            elif mode == 1:
                _pack_u32(headers, <uint32_t><int32_t>_MULTIPART_HEADER)
                _pack_u32(headers + 4, <uint32_t>count)
                iov[0].iov_base = headers
                iov[0].iov_len = header_size
            self._lock(True, deadline)
            try:
                self._send_frame(iov, slots, None, deadline)
            finally:
                self._unlock(True)
        finally:
            for i in range(got):
                PyBuffer_Release(&views[i])
            PyMem_Free(views)
            PyMem_Free(iov)
            PyMem_Free(headers)
        return 0

    def send_parts(self, parts, *, timeout=None):
        """Send the buffers of the sequence ``parts`` as one plain message
        (their concatenation), without joining them in memory."""
        self._check(True)
        self._send_buffers(tuple(parts), 0, _deadline(timeout))

    def send_multipart(self, parts, *, timeout=None):
        """Send the buffers of ``parts`` as one multipart message: the receiver
        gets them back as separate objects (``recv_message``)."""
        self._check(True)
        self._send_buffers(tuple(parts), 1, _deadline(timeout))

    def send_many(self, messages, *, timeout=None):
        """Send each buffer of ``messages`` as its own plain message, written
        together. Interrupted part way, the unsent rest of the batch is
        pending as one unit (see send_pending and flush())."""
        self._check(True)
        messages = tuple(messages)
        if messages:
            self._send_buffers(messages, 2, _deadline(timeout))

    def flush(self, *, timeout=None):
        """Write the rest of a send that was interrupted; no-op when none."""
        cdef double deadline
        self._check(True)
        if not self._pending:
            return
        deadline = _deadline(timeout)
        self._lock(True, deadline)
        try:
            self._flush(deadline)
        finally:
            self._unlock(True)

    # --------------------------------------------------------------- receive

    cdef void _reset_recv_state(self) noexcept:
        self._header_have = 0
        self._header_need = 4
        self._kind = _KIND_UNKNOWN
        self._header_done = False
        self._length = 0
        self._part_count = 0
        self._table = None
        self._table_have = 0
        self._partial = None
        self._parts = None
        self._part_index = 0
        self._have = 0
        self._streaming = False
        self._delivered = 0

    cdef int _fail(self, type kind, str message) except -1:
        """Mark the receive side broken and raise."""
        self._recv_failure = (kind, message)
        self._reset_recv_state()
        raise kind(message)

    cdef inline Py_ssize_t _read_now(self, char *into, Py_ssize_t size, int *err) noexcept nogil:
        """One non-blocking read; -1 with ``err`` set on failure."""
        cdef Py_ssize_t rc
        if self._is_socket:
            rc = recv(self._fd, into, size, MSG_DONTWAIT)
        else:
            rc = read(self._fd, into, size)
        if rc < 0:
            err[0] = errno
        return rc

    cdef Py_ssize_t _read_some(self, char *into, Py_ssize_t size, double deadline) except -1:
        """Read at least one and at most ``size`` bytes; 0 at end of file."""
        cdef Py_ssize_t rc
        cdef int err = 0
        if size > _MAX_IO:
            size = _MAX_IO
        while True:
            if size <= _GIL_IO_MAX:
                rc = self._read_now(into, size, &err)
            else:
                with nogil:
                    rc = self._read_now(into, size, &err)
            if rc >= 0:
                return rc
            if err == EAGAIN or err == EWOULDBLOCK:
                if not _wait_fd(self._fd, POLLIN, deadline):
                    raise TimeoutError("timed out receiving a message")
            elif err == EINTR:
                if PyErr_CheckSignals() < 0:
                    return -1
            else:
                raise _os_error(err)

    cdef char *_header_slot(self, Py_ssize_t *want) noexcept:
        """Where the next header bytes go, and how many are wanted (0 once the
        header, and a multipart message's length table, are complete)."""
        if self._header_done:
            want[0] = 0
            return NULL
        if self._header_have < self._header_need:
            want[0] = self._header_need - self._header_have
            return <char *>self._header + self._header_have
        want[0] = 8 * <Py_ssize_t>self._part_count - self._table_have
        return PyBytes_AS_STRING(self._table) + self._table_have

    cdef int _header_advance(self, Py_ssize_t got) except -1:
        """Account for ``got`` header bytes stored at _header_slot(), and
        validate each piece as soon as it is complete."""
        cdef int32_t first
        cdef uint64_t length, total, limit
        cdef Py_ssize_t i
        cdef const uint8_t *table
        if self._header_have < self._header_need:
            self._header_have += got
            if self._header_have < self._header_need:
                return 0
            if self._header_have == 4:
                first = <int32_t>_unpack_u32(self._header)
                if first >= 0:
                    self._kind = _KIND_PLAIN
                    return self._header_complete(<uint64_t>first)
                if first == _LONG_HEADER:
                    self._kind = _KIND_PLAIN
                    self._header_need = 12
                    return 0
                if first == _MULTIPART_HEADER:
                    self._kind = _KIND_MULTIPART
                    self._header_need = 8
                    return 0
                self._fail(FrameError, "invalid frame header: length %d" % first)
            if self._kind == _KIND_PLAIN:
                return self._header_complete(_unpack_u64(self._header + 4))
            self._part_count = _unpack_u32(self._header + 4)
            if not (1 <= self._part_count <= _MAX_PARTS):
                self._fail(FrameError, "invalid multipart header: %d parts" % self._part_count)
            self._table = PyBytes_FromStringAndSize(NULL, 8 * <Py_ssize_t>self._part_count)
            self._table_have = 0
            return 0
        self._table_have += got
        if self._table_have < 8 * <Py_ssize_t>self._part_count:
            return 0
        table = <const uint8_t *>PyBytes_AS_STRING(self._table)
        total = 0
        limit = <uint64_t>PY_SSIZE_T_MAX
        for i in range(self._part_count):
            length = _unpack_u64(table + 8 * i) & ~_READONLY_PART
            if length > limit - total:
                self._fail(FrameError, "invalid multipart header: parts add up to more than %d bytes" % limit)
            total += length
        return self._header_complete(total)

    cdef int _header_complete(self, uint64_t length) except -1:
        if length > <uint64_t>PY_SSIZE_T_MAX:
            self._fail(FrameError, "invalid frame header: length %d" % length)
        if self._limit_size and length > self._max_message_size:
            self._fail(FrameError, "message of %d bytes exceeds max_message_size %d"
                       % (length, self._max_message_size))
        self._length = length
        self._header_done = True
        return 0

    cdef int _read_header(self, double deadline) except -1:
        """Complete and validate the header of the next message."""
        cdef Py_ssize_t got, want
        cdef char *slot
        while True:
            slot = self._header_slot(&want)
            if want == 0:
                return 0
            got = self._read_some(slot, want, deadline)
            if got == 0:
                if self._header_have == 0:
                    raise EOFError("end of stream")
                self._fail(TruncatedMessageError, "end of file inside a frame header")
            self._header_advance(got)

    cdef int _begin_receive(self, double deadline, bint streaming=False) except -1:
        self._check(False)
        self._lock(False, deadline)
        if self._recv_failure is not None:
            self._unlock(False)
            kind, message = self._recv_failure
            raise kind(message)
        if self._streaming and not streaming:
            self._unlock(False)
            raise ValueError("a message is being streamed (recv_begin); finish it with "
                             "recv_chunk_into() first")
        return 0

    cdef int _check_plain(self, maxlength) except -1:
        if self._kind == _KIND_MULTIPART:
            raise MultipartMessageError(
                "the next message is a multipart message of %d parts; receive it with "
                "recv_message() (or recv() on a Connection)" % self._part_count)
        if maxlength is not None and self._length > <uint64_t>maxlength:
            raise MessageTooLong(self._length, maxlength)
        return 0

    cdef int _allocate_payload(self) except -1:
        """Create the objects the current message's payload is read into."""
        cdef Py_ssize_t i
        cdef uint64_t length
        cdef const uint8_t *table
        cdef list parts
        cdef object part
        cdef char *data
        if self._kind == _KIND_PLAIN:
            if self._partial is None:
                self._partial = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>self._length)
                self._have = 0
                if self._length >= _HUGE_PAGE_THRESHOLD:
                    bigipc_advise_huge(PyBytes_AS_STRING(self._partial), <Py_ssize_t>self._length)
            return 0
        if self._parts is None:
            table = <const uint8_t *>PyBytes_AS_STRING(self._table)
            parts = []
            for i in range(self._part_count):
                length = _unpack_u64(table + 8 * i)
                if length & _READONLY_PART:
                    length &= ~_READONLY_PART
                    part = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>length)
                    data = PyBytes_AS_STRING(part)
                else:
                    part = PyByteArray_FromStringAndSize(NULL, <Py_ssize_t>length)
                    data = PyByteArray_AS_STRING(part)
                if length >= _HUGE_PAGE_THRESHOLD:
                    bigipc_advise_huge(data, <Py_ssize_t>length)
                parts.append(part)
            self._parts = parts
            self._part_index = 0
            self._have = 0
        return 0

    cdef char *_payload_slot(self, Py_ssize_t *want) except? NULL:
        """Where the next payload bytes go and how many are wanted; 0 wanted
        once the message is complete."""
        cdef object part
        cdef Py_ssize_t size
        if self._kind == _KIND_PLAIN:
            want[0] = <Py_ssize_t>self._length - self._have
            return PyBytes_AS_STRING(self._partial) + self._have
        while self._part_index < <Py_ssize_t>self._part_count:
            part = self._parts[self._part_index]
            size = len(part)
            if self._have < size:
                want[0] = size - self._have
                if PyBytes_CheckExact(part):
                    return PyBytes_AS_STRING(part) + self._have
                return PyByteArray_AS_STRING(part) + self._have
            self._part_index += 1
            self._have = 0
        want[0] = 0
        return NULL

    cdef object _take_message(self):
        """The completed message; the state is reset for the next one."""
        result = self._partial if self._kind == _KIND_PLAIN else self._parts
        self._reset_recv_state()
        return result

    cdef object _read_payload(self, double deadline):
        """Read the rest of the current message straight into its final
        objects and return it: bytes, or a list of parts."""
        cdef Py_ssize_t got, want
        cdef char *slot
        cdef bint progressed = False
        self._allocate_payload()
        while True:
            slot = self._payload_slot(&want)
            if want == 0:
                return self._take_message()
            if progressed:
                _checkpoint(deadline, "receiving")
            got = self._read_some(slot, want, deadline)
            if got == 0:
                self._fail(TruncatedMessageError,
                           "end of file inside a message of %d bytes" % self._length)
            self._have += got
            progressed = True

    def recv_bytes(self, maxlength=None, *, timeout=None):
        """Receive one plain message as bytes."""
        cdef double deadline
        if maxlength is not None and maxlength < 0:
            raise ValueError("negative maxlength")
        deadline = _deadline(timeout)
        self._begin_receive(deadline)
        try:
            self._read_header(deadline)
            self._check_plain(maxlength)
            return self._read_payload(deadline)
        finally:
            self._unlock(False)

    def recv_message(self, maxlength=None, *, timeout=None):
        """Receive one message of either kind: bytes for a plain message, a
        list of parts (bytes for read-only parts, bytearray for the others)
        for a multipart one."""
        cdef double deadline
        if maxlength is not None and maxlength < 0:
            raise ValueError("negative maxlength")
        deadline = _deadline(timeout)
        self._begin_receive(deadline)
        try:
            self._read_header(deadline)
            if maxlength is not None and self._length > <uint64_t>maxlength:
                raise MessageTooLong(self._length, maxlength)
            return self._read_payload(deadline)
        finally:
            self._unlock(False)

    def recv_bytes_into(self, buffer, Py_ssize_t offset=0, *, timeout=None):
        """Receive one plain message into ``buffer`` at byte ``offset``."""
        cdef Py_buffer view
        cdef double deadline
        cdef Py_ssize_t length, have = 0, got = 0
        cdef char *target
        PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE)
        try:
            if offset < 0:
                raise ValueError("negative offset")
            if offset > view.len:
                raise ValueError("offset too large")
            deadline = _deadline(timeout)
            self._begin_receive(deadline)
            try:
                self._read_header(deadline)
                self._check_plain(None)
                length = <Py_ssize_t>self._length
                if length > view.len - offset:
                    raise BufferTooShort(self._read_payload(deadline))
                target = <char *>view.buf + offset
                if self._partial is not None:
                    have = self._have
                    memcpy(target, PyBytes_AS_STRING(self._partial), have)
                try:
                    while have < length:
                        if got:
                            _checkpoint(deadline, "receiving")
                        got = self._read_some(target + have, length - have, deadline)
                        if got == 0:
                            self._fail(TruncatedMessageError,
                                       "end of file inside a message of %d bytes" % length)
                        have += got
                except BaseException:
                    if self._header_done:
                        self._keep_partial(target, have)
                    raise
                self._reset_recv_state()
                return length
            finally:
                self._unlock(False)
        finally:
            PyBuffer_Release(&view)

    cdef int _keep_partial(self, const char *source, Py_ssize_t have) except -1:
        """An interrupted receive into a caller's buffer: move what arrived
        into private memory so any later receive can finish the message."""
        if self._partial is None:
            try:
                self._partial = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>self._length)
            except MemoryError:
                self._fail(FrameError, "out of memory holding a partly received message")
        memcpy(PyBytes_AS_STRING(self._partial), source, have)
        self._have = have
        return 0

    cdef int _feed(self, const char *data, Py_ssize_t size, list out) except -1:
        """Run ``size`` bytes already read through the receive state machine,
        appending every message they complete to ``out``."""
        cdef Py_ssize_t want, take
        cdef char *slot
        while True:
            if not self._header_done:
                if size == 0:
                    return 0
                slot = self._header_slot(&want)
                take = want if want < size else size
                memcpy(slot, data, take)
                data += take
                size -= take
                self._header_advance(take)
                continue
            self._allocate_payload()
            slot = self._payload_slot(&want)
            if want == 0:
                out.append(self._take_message())
                continue
            if size == 0:
                return 0
            take = want if want < size else size
            memcpy(slot, data, take)
            data += take
            size -= take
            self._have += take

    def recv_many(self, Py_ssize_t max_bytes=65536, *, timeout=None):
        """Receive every message that is complete within the next ``max_bytes``
        bytes of the stream (at least one; waiting for it up to ``timeout``).

        Small messages cost one system call per batch instead of two each.
        A message cut by the end of the batch stays held, exactly as after an
        interrupted receive; no complete message is ever held back, so
        poll(), wait() and selectors stay truthful.
        """
        cdef double deadline
        cdef list out = []
        cdef char *scratch
        cdef Py_ssize_t rc
        cdef int err = 0
        if max_bytes < 16:
            raise ValueError("max_bytes must be at least 16")
        if max_bytes > _MAX_BATCH_READ:
            # Larger batches gain nothing (the pipe holds less), and the
            # scratch buffer is allocated on every call.
            max_bytes = _MAX_BATCH_READ
        deadline = _deadline(timeout)
        self._begin_receive(deadline)
        scratch = <char *>PyMem_Malloc(max_bytes)
        try:
            if scratch == NULL:
                raise MemoryError()
            while not out:
                if self._header_done:
                    # A message is under way: read its payload in place.
                    out.append(self._read_payload(deadline))
                    break
                with nogil:
                    if self._is_socket:
                        rc = recv(self._fd, scratch, max_bytes, MSG_DONTWAIT)
                    else:
                        rc = read(self._fd, scratch, max_bytes)
                    if rc < 0:
                        err = errno
                if rc > 0:
                    try:
                        self._feed(scratch, rc, out)
                    except BaseException as exc:
                        if self._recv_failure is None:
                            # Out of memory half way through bytes already
                            # taken from the descriptor: the rest of them are
                            # gone, so the stream cannot be trusted any more.
                            self._recv_failure = (
                                FrameError, "receive side lost bytes of the stream: %r" % (exc,))
                            self._reset_recv_state()
                        if out:
                            # The messages completed before the failure are
                            # delivered; the next receive reports the error.
                            return out
                        raise
                elif rc == 0:
                    if self._header_have == 0:
                        raise EOFError("end of stream")
                    self._fail(TruncatedMessageError, "end of file inside a message")
                elif err == EAGAIN or err == EWOULDBLOCK:
                    if not _wait_fd(self._fd, POLLIN, deadline):
                        raise TimeoutError("timed out receiving a message")
                elif err == EINTR:
                    _run_signal_handlers()
                else:
                    raise _os_error(err)
            return out
        finally:
            PyMem_Free(scratch)
            self._unlock(False)

    def recv_begin(self, maxlength=None, *, timeout=None):
        """Start streaming the next plain message and return how many of its
        bytes are still to be taken (its length, unless a stream of it was
        interrupted before); they come from ``recv_chunk_into``. Other
        receives refuse to run until the whole message has been taken."""
        cdef double deadline
        cdef Py_ssize_t remaining
        if maxlength is not None and maxlength < 0:
            raise ValueError("negative maxlength")
        deadline = _deadline(timeout)
        self._begin_receive(deadline, True)
        try:
            if not self._streaming:
                self._read_header(deadline)
                self._check_plain(maxlength)
                self._streaming = True
            remaining = <Py_ssize_t>self._length - self._delivered
            if remaining == 0:
                self._reset_recv_state()  # an empty message is taken at once
            return remaining
        finally:
            self._unlock(False)

    def recv_chunk_into(self, buffer, *, timeout=None):
        """Copy the next bytes of the message being streamed into ``buffer``
        (at most its size; at least one byte, waiting up to ``timeout``) and
        return how many. Once the last byte is taken the message is done."""
        cdef Py_buffer view
        cdef double deadline
        cdef Py_ssize_t want, got, length
        PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE)
        try:
            deadline = _deadline(timeout)
            self._begin_receive(deadline, True)
            try:
                if not self._streaming:
                    raise ValueError("no message is being streamed; call recv_begin() first")
                length = <Py_ssize_t>self._length
                want = length - self._delivered
                if want > view.len:
                    want = view.len
                if want == 0:
                    if length == self._delivered:
                        self._reset_recv_state()
                    return 0
                if self._partial is not None and self._delivered < self._have:
                    got = self._have - self._delivered
                    if got > want:
                        got = want
                    memcpy(view.buf, PyBytes_AS_STRING(self._partial) + self._delivered, got)
                else:
                    self._partial = None
                    got = self._read_some(<char *>view.buf, want, deadline)
                    if got == 0:
                        self._fail(TruncatedMessageError,
                                   "end of file inside a message of %d bytes" % length)
                    self._have += got
                self._delivered += got
                if self._delivered == length:
                    self._reset_recv_state()
                return got
            finally:
                self._unlock(False)
        finally:
            PyBuffer_Release(&view)

    def poll(self, timeout=0.0):
        """True when a receive can make progress now. Never reads."""
        cdef double deadline
        self._check(False)
        if self._recv_failure is not None:
            return True
        deadline = _deadline(timeout)
        return _wait_fd(self._fd, POLLIN, deadline) == 1
