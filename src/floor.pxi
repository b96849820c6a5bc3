# The benchmark's floor: plain read/write loops in C over a blocking
# descriptor, with no framing, no allocation and no Python call per message.
# `python -m bigipc bench` runs them as "C read/write loop" to show what the
# kernel itself costs. Not part of the core's interface (the pure core has
# no equivalent: the point of the floor is that no Python runs per message).


cdef int _floor_io(int fd, char *data, Py_ssize_t size, bint writing) except -1:
    """Move exactly ``size`` bytes; the GIL is held only to run signal
    handlers after EINTR."""
    cdef Py_ssize_t rc
    cdef int err
    while size > 0:
        with nogil:
            if writing:
                rc = write(fd, data, <size_t>size)
            else:
                rc = read(fd, data, <size_t>size)
            err = errno
        if rc > 0:
            data += rc
            size -= rc
        elif rc == 0:
            raise EOFError("end of file %d bytes before the end of a message" % size)
        elif err == EINTR:
            if PyErr_CheckSignals() < 0:
                return -1
        else:
            raise _os_error(err)
    return 0


def _floor_write(int fd, list messages, Py_ssize_t start, Py_ssize_t count):
    """Write ``messages[(start + i) % len(messages)]`` (bytes) for i in
    range(count), each whole, to the blocking descriptor ``fd``."""
    cdef Py_ssize_t n = len(messages), i, index
    cdef object message
    if n == 0 or count < 0:
        raise ValueError("no messages to write, or a negative count")
    for message in messages:
        if not PyBytes_CheckExact(message):
            raise TypeError("the floor writes bytes objects, not %s" % type(message).__name__)
    index = start % n
    for i in range(count):
        # `messages` holds a reference to every message while it is written.
        message = messages[index]
        _floor_io(fd, PyBytes_AS_STRING(message), len(message), True)
        index += 1
        if index == n:
            index = 0


def _floor_read(int fd, buffer, Py_ssize_t count):
    """Read ``count`` messages of ``len(buffer)`` bytes each from the blocking
    descriptor ``fd``, each into ``buffer`` (which ends up holding the last)."""
    cdef Py_buffer view
    cdef Py_ssize_t i
    if count < 0:
        raise ValueError("negative count")
    PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
    try:
        for i in range(count):
            _floor_io(fd, <char *>view.buf, view.len, False)
    finally:
        PyBuffer_Release(&view)
