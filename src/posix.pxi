# Declarations of the POSIX and CPython calls the core uses.

from libc.errno cimport errno, EINTR, EAGAIN, EBADF
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int32_t
from libc.string cimport memcpy, memset, strerror
from libc.math cimport INFINITY, ceil
from posix.unistd cimport read, write, getpid, close as c_close
from posix.types cimport pid_t
from posix.fcntl cimport fcntl, F_GETFL, F_SETFL, O_NONBLOCK
from posix.stat cimport struct_stat, fstat, S_ISSOCK

from cpython.buffer cimport (
    PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE,
)
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_CheckExact
from cpython.bytearray cimport PyByteArray_FromStringAndSize, PyByteArray_AS_STRING
from cpython.exc cimport PyErr_CheckSignals, PyErr_SetFromErrno
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from cpython.pythread cimport (
    PyThread_type_lock, PyThread_allocate_lock, PyThread_free_lock,
    PyThread_release_lock, PyLockStatus, PY_LOCK_ACQUIRED, PY_LOCK_INTR,
)

cdef extern from "pythread.h" nogil:
    PyLockStatus PyThread_acquire_lock_timed(PyThread_type_lock lock, long long microseconds, int intr_flag)


cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t writev(int fd, const iovec *iov, int iovcnt)

cdef extern from "<sys/socket.h>" nogil:
    struct msghdr:
        void *msg_name
        int msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    int MSG_DONTWAIT

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    short POLLIN, POLLOUT, POLLNVAL

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk_id, timespec *tp)
    int CLOCK_MONOTONIC

cdef extern from *:
    """
    /* macOS has no MSG_NOSIGNAL; there the core relies on Python ignoring
       SIGPIPE (which it does by default) and sets SO_NOSIGPIPE on sockets. */
    #include <sys/socket.h>
    #ifndef MSG_NOSIGNAL
    #define MSG_NOSIGNAL 0
    #endif
    #ifdef SO_NOSIGPIPE
    #define BIGIPC_SO_NOSIGPIPE SO_NOSIGPIPE
    #else
    #define BIGIPC_SO_NOSIGPIPE 0
    #endif
    #include <sys/mman.h>
    /* Large receive buffers ask for transparent huge pages where the kernel
       offers them on request (Linux); elsewhere this is a no-op. */
    static void bigipc_advise_huge(char *start, Py_ssize_t size) {
    #if defined(MADV_HUGEPAGE)
        const uintptr_t huge = (uintptr_t)2 << 20;
        uintptr_t first = ((uintptr_t)start + huge - 1) & ~(huge - 1);
        uintptr_t last = ((uintptr_t)start + (uintptr_t)size) & ~(huge - 1);
        if (last > first)
            (void)madvise((void *)first, last - first, MADV_HUGEPAGE);
    #else
        (void)start; (void)size;
    #endif
    }
    /* Zero-copy sends into a pipe (Linux). vmsplice() without
       SPLICE_F_GIFT makes the pipe refer to the caller's pages instead of
       copying them; bigipc only does this under the rules written in
       docs/protocol.md ("Sending large bytes into a pipe: vmsplice"). */
    #include <fcntl.h>
    #include <sys/uio.h>
    #if defined(__linux__) && defined(F_GETPIPE_SZ) && defined(SPLICE_F_NONBLOCK)
    #define BIGIPC_HAVE_VMSPLICE 1
    static int bigipc_pipe_capacity(int fd) { return fcntl(fd, F_GETPIPE_SZ); }
    static ssize_t bigipc_vmsplice(int fd, void *base, size_t size) {
        struct iovec part;
        part.iov_base = base;
        part.iov_len = size;
        return vmsplice(fd, &part, 1, SPLICE_F_NONBLOCK);
    }
    #else
    #define BIGIPC_HAVE_VMSPLICE 0
    static int bigipc_pipe_capacity(int fd) { (void)fd; errno = ENOSYS; return -1; }
    static ssize_t bigipc_vmsplice(int fd, void *base, size_t size) {
        (void)fd; (void)base; (void)size; errno = ENOSYS; return -1;
    }
    #endif
    #include <limits.h>
    #include <errno.h>
    #ifndef IOV_MAX
    #define IOV_MAX 1024
    #endif
    """
    int MSG_NOSIGNAL
    void bigipc_advise_huge(char *start, Py_ssize_t size) nogil
    int BIGIPC_HAVE_VMSPLICE
    int bigipc_pipe_capacity(int fd) nogil
    ssize_t bigipc_vmsplice(int fd, void *base, size_t size) nogil
    int BIGIPC_SO_NOSIGPIPE
    int SOL_SOCKET
    int setsockopt(int fd, int level, int name, const void *value, unsigned int length)
    int IOV_MAX
    int EWOULDBLOCK
    int INT_MAX
    Py_ssize_t PY_SSIZE_T_MAX
