# The benchmark's floor: plain read/write loops in C over a blocking
# descriptor, with no framing, no allocation and no Python call per message.
# `python -m bigipc bench` runs them as "C read/write loop" to show what the
# kernel itself costs. Not part of the core's interface (the pure core has
# no equivalent: the point of the floor is that no Python runs per message).


cdef int _floor_move(int fd, char *data, Py_ssize_t size, bint writing) except -1 nogil:
    """Move exactly ``size`` bytes without the GIL; it is taken only to
    raise, or to run signal handlers after EINTR."""
    cdef Py_ssize_t rc
    cdef int err
    while size > 0:
        if writing:
            rc = write(fd, data, <size_t>size)
        else:
            rc = read(fd, data, <size_t>size)
        if rc > 0:
            data += rc
            size -= rc
            continue
        err = errno
        with gil:
            if rc == 0:
                raise EOFError("end of file %d bytes before the end of a message" % size)
            if err != EINTR:
                raise _os_error(err)
            if PyErr_CheckSignals() < 0:
                return -1
    return 0


def _floor_write(int fd, list messages, Py_ssize_t start, Py_ssize_t count):
    """Write ``messages[(start + i) % len(messages)]`` (bytes) for i in
    range(count), each whole, to the blocking descriptor ``fd``. The whole
    run goes without the GIL."""
    # A tuple of its own keeps every message alive whatever other threads
    # do to the list meanwhile.
    cdef tuple keep = tuple(messages)
    cdef Py_ssize_t n = len(keep), i, index
    cdef char **data
    cdef Py_ssize_t *sizes
    cdef object message
    if n == 0 or count < 0:
        raise ValueError("no messages to write, or a negative count")
    for message in keep:
        if not PyBytes_CheckExact(message):
            raise TypeError("the floor writes bytes objects, not %s" % type(message).__name__)
    data = <char **>PyMem_Malloc(n * sizeof(char *))
    sizes = <Py_ssize_t *>PyMem_Malloc(n * sizeof(Py_ssize_t))
    try:
        if data == NULL or sizes == NULL:
            raise MemoryError()
        for i in range(n):
            data[i] = PyBytes_AS_STRING(keep[i])
            sizes[i] = len(keep[i])
        index = start % n
        with nogil:
            for i in range(count):
                _floor_move(fd, data[index], sizes[index], True)
                index += 1
                if index == n:
                    index = 0
    finally:
        PyMem_Free(data)
        PyMem_Free(sizes)


def _floor_read(int fd, buffer, Py_ssize_t count):
    """Read ``count`` messages of ``len(buffer)`` bytes each from the blocking
    descriptor ``fd``, each into ``buffer`` (which ends up holding the last).
    The whole run goes without the GIL."""
    cdef Py_buffer view
    cdef Py_ssize_t i
    if count < 0:
        raise ValueError("negative count")
    PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
    try:
        with nogil:
            for i in range(count):
                _floor_move(fd, <char *>view.buf, view.len, False)
    finally:
        PyBuffer_Release(&view)
