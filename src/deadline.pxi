# Deadlines, waiting on a descriptor, and the per-direction thread locks.
#
# Every blocking call turns its timeout into one absolute deadline on the
# monotonic clock at its start; every wait inside the call (for a lock, for
# the descriptor) is measured against that same deadline, so signals and
# short reads never stretch the total.

cdef inline double _monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef object _os_error(int err):
    # OSError(errno, text) picks the subclass (BrokenPipeError, ...) itself.
    return OSError(err, strerror(err).decode("utf-8", "replace"))


cdef int _run_signal_handlers() except -1:
    # PyErr_CheckSignals() runs the Python handlers; -1 means one raised.
    return PyErr_CheckSignals()


cdef int _checkpoint(double deadline, str what) except -1:
    """Between two pieces of a long transfer that keeps making progress:
    run pending signal handlers and honour the deadline, so neither waits
    for the end of a multi-gigabyte message. Costs a flag test and a vDSO
    clock read."""
    if PyErr_CheckSignals() < 0:
        return -1
    # A zero deadline means "do not wait", not "stop after one piece": such a
    # call goes on for as long as the kernel has bytes for it without waiting.
    if deadline != INFINITY and deadline != 0.0 and _monotonic() >= deadline:
        raise TimeoutError("timed out %s a message" % what)
    return 0


cdef double _deadline(object timeout) except? -1.0:
    """None blocks forever; zero or a negative number means "do not block"."""
    cdef double seconds
    if timeout is None:
        return INFINITY
    seconds = timeout
    if seconds != seconds:
        raise ValueError("timeout must not be NaN")
    if seconds <= 0.0:
        return 0.0
    return _monotonic() + seconds


cdef int _poll_ms(double deadline) noexcept:
    """Milliseconds left, rounded up so the wait never ends just before the
    deadline; clamped to what poll() takes; -1 for no deadline."""
    cdef double left
    if deadline == INFINITY:
        return -1
    left = (deadline - _monotonic()) * 1000.0
    if left <= 0.0:
        return 0
    if left >= <double>INT_MAX:
        return INT_MAX
    return <int>ceil(left)


cdef int _wait_fd(int fd, short events, double deadline) except -1:
    """Wait until ``fd`` is ready for ``events`` (or has hung up or failed).

    Returns 1 when ready, 0 when the deadline passed. Python signal handlers
    run while waiting: one that raises ends the wait with its exception, one
    that returns lets the wait go on to the same deadline.
    """
    cdef pollfd entry
    cdef int rc, saved_errno, ms
    while True:
        ms = _poll_ms(deadline)
        entry.fd = fd
        entry.events = events
        entry.revents = 0
        with nogil:
            rc = poll(&entry, 1, ms)
            saved_errno = errno
        if rc > 0:
            if entry.revents & POLLNVAL:
                raise OSError(EBADF, "handle is closed")
            return 1
        if rc == 0:
            # poll() may return a hair early (clock granularity); only the
            # deadline itself ends the wait.
            if ms == 0 or _monotonic() >= deadline:
                return 0
            continue
        if saved_errno == EINTR:
            if PyErr_CheckSignals() < 0:
                return -1
            continue
        raise _os_error(saved_errno)


# Longest single wait for a thread lock; longer waits loop, so an infinite
# deadline never overflows the platform's timeout type.
cdef long long _LOCK_SLICE_US = 3600LL * 1000000LL


cdef int _acquire_lock(PyThread_type_lock lock, double deadline, str what) except -1:
    """Take ``lock`` before ``deadline``; TimeoutError otherwise."""
    cdef long long wait_us
    cdef double left
    cdef int status
    if PyThread_acquire_lock_timed(lock, 0, 0) == PY_LOCK_ACQUIRED:
        return 0
    while True:
        if deadline == INFINITY:
            wait_us = _LOCK_SLICE_US
        else:
            left = deadline - _monotonic()
            if left <= 0.0:
                raise TimeoutError("timed out waiting for another thread's %s" % what)
            wait_us = <long long>ceil(left * 1e6)
            if wait_us > _LOCK_SLICE_US:
                wait_us = _LOCK_SLICE_US
        with nogil:
            status = PyThread_acquire_lock_timed(lock, wait_us, 1)
        if status == PY_LOCK_ACQUIRED:
            return 0
        if status == PY_LOCK_INTR:
            if PyErr_CheckSignals() < 0:
                return -1
