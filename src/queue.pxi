# QueueEnds: the per-item fast paths of bigipc.Queue (bigipc/queues.py).
#
# A queue record is one datagram on an AF_UNIX/SOCK_DGRAM socket pair; the
# record format and the counters' meaning belong to bigipc/queues.py, which
# hands this type the inline record header and the field offsets. What is
# here is only the part of put() and get() that runs for every small item:
# one system call plus the counter updates, with no Python objects made on
# the way. Anything else (a full socket, a record that is not inline) is
# reported back for queues.py to handle.

from libc.stdint cimport int64_t
from libc.string cimport memcmp

cdef extern from *:
    """
    #include <sys/socket.h>
    #ifndef MSG_CMSG_CLOEXEC
    #define MSG_CMSG_CLOEXEC 0
    #endif
    #ifndef ENOBUFS
    #define ENOBUFS EAGAIN
    #endif
    #ifndef ETOOMANYREFS
    #define ETOOMANYREFS EAGAIN
    #endif
    /* Room for the descriptors one record may carry (queues.py sends one). */
    #define BIGIPC_QUEUE_FDS 8
    #define BIGIPC_QUEUE_CONTROL CMSG_SPACE(BIGIPC_QUEUE_FDS * sizeof(int))
    """
    int MSG_CMSG_CLOEXEC
    int MSG_TRUNC
    int MSG_CTRUNC
    int ENOBUFS
    int ETOOMANYREFS
    int SCM_RIGHTS
    int BIGIPC_QUEUE_CONTROL
    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type
    cmsghdr *CMSG_FIRSTHDR(msghdr *msg) nogil
    cmsghdr *CMSG_NXTHDR(msghdr *msg, cmsghdr *cmsg) nogil
    unsigned char *CMSG_DATA(cmsghdr *cmsg) nogil
    size_t CMSG_LEN(size_t length) nogil
    ssize_t recvmsg(int fd, msghdr *msg, int flags) nogil

DEF _QUEUE_HEADER = 8


cdef class QueueEnds:
    """The two ends of a queue's socket pair and its shared counters.

    See bigipc/_core.pyi for the contract.
    """

    cdef object _recv_sock
    cdef object _send_sock
    cdef object _counters
    cdef uint8_t _header[_QUEUE_HEADER]
    cdef Py_ssize_t _puts, _gets, _pending

    def __init__(self, recv_sock, send_sock, counters, bytes header, Py_ssize_t puts,
                 Py_ssize_t gets, Py_ssize_t pending):
        cdef Py_buffer view
        if len(header) != _QUEUE_HEADER:
            raise ValueError("a queue record header is %d bytes" % _QUEUE_HEADER)
        PyObject_GetBuffer(counters, &view, PyBUF_WRITABLE)
        try:
            if view.itemsize != 8 or view.len % 8:
                raise ValueError("counters must be a writable buffer of int64")
        finally:
            PyBuffer_Release(&view)
        memcpy(self._header, PyBytes_AS_STRING(header), _QUEUE_HEADER)
        self._recv_sock = recv_sock
        self._send_sock = send_sock
        self._counters = counters
        self._puts = puts
        self._gets = gets
        self._pending = pending

    cdef int64_t *_slot(self, Py_buffer *view, Py_ssize_t slot_at, Py_ssize_t width=4) except NULL:
        """The counters from ``slot_at`` on (int64 units); ``view`` must be
        released by the caller."""
        PyObject_GetBuffer(self._counters, view, PyBUF_WRITABLE)
        if slot_at < 0 or (slot_at + width) * 8 > view.len:
            PyBuffer_Release(view)
            raise ValueError("counter index %d out of range" % slot_at)
        return <int64_t *>view.buf + slot_at

    def add(self, Py_ssize_t index, int64_t delta):
        """Add ``delta`` to the counter at ``index``; return the new value.
        Atomic with respect to the other counter updates made here, in
        every thread of this process (the GIL is held throughout)."""
        cdef Py_buffer view
        cdef int64_t *counter = self._slot(&view, index, 1)
        counter[0] += delta
        delta = counter[0]
        PyBuffer_Release(&view)
        return delta

    def send_inline(self, Py_ssize_t slot_at, data):
        """Send the header and ``data`` as one inline record if the socket
        takes it now, counting it as put; False when it has no room."""
        cdef Py_buffer payload, view
        cdef int64_t *slot
        cdef iovec iov[2]
        cdef msghdr message
        cdef ssize_t rc
        cdef int err, fd = self._send_sock.fileno()
        PyObject_GetBuffer(data, &payload, PyBUF_SIMPLE)
        try:
            slot = self._slot(&view, slot_at)
            try:
                iov[0].iov_base = self._header
                iov[0].iov_len = _QUEUE_HEADER
                iov[1].iov_base = payload.buf
                iov[1].iov_len = <size_t>payload.len
                memset(&message, 0, sizeof(message))
                message.msg_iov = iov
                message.msg_iovlen = 2
                # Pending while in flight: a consumer may count its get
                # before this returns. The GIL is held throughout, so the
                # process's other threads never see the counts half done.
                slot[self._pending] += 1
                while True:
                    rc = sendmsg(fd, &message, MSG_DONTWAIT | MSG_NOSIGNAL)
                    if rc >= 0:
                        slot[self._puts] += 1
                        slot[self._pending] -= 1
                        return True
                    err = errno
                    if err != EINTR:
                        break
                    try:
                        _run_signal_handlers()
                    except BaseException:
                        slot[self._pending] -= 1
                        raise
                slot[self._pending] -= 1
                if err == EAGAIN or err == EWOULDBLOCK or err == ENOBUFS or err == ETOOMANYREFS:
                    return False
                raise _os_error(err)
            finally:
                PyBuffer_Release(&view)
        finally:
            PyBuffer_Release(&payload)

    def recv(self, buffer, Py_ssize_t slot_at, bint wait):
        """Receive one record into ``buffer``: its length when it is an
        inline record (counted as a get), -1 when none is there and ``wait``
        is false, else ``(length, descriptors, flags)`` (not counted)."""
        cdef Py_buffer target, view
        cdef int64_t *slot
        cdef iovec iov
        cdef msghdr message
        cdef cmsghdr *cmsg
        cdef char control[256]
        cdef ssize_t rc
        cdef int err, i, count, flags = MSG_CMSG_CLOEXEC
        cdef int fd = self._recv_sock.fileno()
        cdef list fds
        cdef int *numbers
        if BIGIPC_QUEUE_CONTROL > <int>sizeof(control):
            raise SystemError("control buffer too small")
        if not wait:
            flags |= MSG_DONTWAIT
        # The slot is checked before anything is taken off the socket.
        slot = self._slot(&view, slot_at)
        PyBuffer_Release(&view)
        PyObject_GetBuffer(buffer, &target, PyBUF_WRITABLE)
        try:
            iov.iov_base = target.buf
            iov.iov_len = <size_t>target.len
            while True:
                memset(&message, 0, sizeof(message))
                message.msg_iov = &iov
                message.msg_iovlen = 1
                message.msg_control = control
                message.msg_controllen = BIGIPC_QUEUE_CONTROL
                if wait:
                    with nogil:
                        rc = recvmsg(fd, &message, flags)
                        err = errno
                else:
                    rc = recvmsg(fd, &message, flags)
                    err = errno
                if rc >= 0:
                    break
                if err == EINTR:
                    _run_signal_handlers()
                    continue
                if err == EAGAIN or err == EWOULDBLOCK:
                    return -1
                raise _os_error(err)
            if (message.msg_controllen == 0 and not (message.msg_flags & (MSG_TRUNC | MSG_CTRUNC))
                    and rc >= _QUEUE_HEADER and memcmp(target.buf, self._header, _QUEUE_HEADER) == 0):
                slot = self._slot(&view, slot_at)
                slot[self._gets] += 1
                PyBuffer_Release(&view)
                return rc
            fds = []
            cmsg = CMSG_FIRSTHDR(&message) if message.msg_controllen else NULL
            while cmsg != NULL:
                if cmsg.cmsg_level == SOL_SOCKET and cmsg.cmsg_type == SCM_RIGHTS:
                    count = <int>((cmsg.cmsg_len - CMSG_LEN(0)) // sizeof(int))
                    numbers = <int *>CMSG_DATA(cmsg)
                    for i in range(count):
                        fds.append(numbers[i])
                cmsg = CMSG_NXTHDR(&message, cmsg)
            return (rc, fds, message.msg_flags)
        finally:
            PyBuffer_Release(&target)
