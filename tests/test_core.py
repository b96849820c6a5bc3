"""Tests of the core Channel, run against both cores and both kinds of fd.

Every test uses real pipes or socket pairs. Blocking calls made by the test
itself carry a timeout (``LONG``) wherever the call is not the thing under
test, threads are joined with a bound and checked to have finished, so a bug
makes a test fail instead of hanging the run.
"""

import array
import errno
import fcntl
import functools
import mmap
import os
import random
import select
import signal
import socket
import struct
import sys
import threading
import time
import tracemalloc
from multiprocessing.connection import Connection

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bigipc._errors import (
    BufferTooShort,
    FrameError,
    MessageTooLong,
    MultipartMessageError,
    TruncatedMessageError,
)

pytestmark = pytest.mark.timeout(60)

# Bound for calls that are expected to complete: far above what they need.
LONG = 30.0
# Bound for joining helper threads.
JOIN = 60.0

KiB = 1 << 10
MiB = 1 << 20

try:
    with open("/proc/sys/fs/pipe-max-size") as _f:
        PIPE_MAX_SIZE = int(_f.read())
except OSError:  # pragma: no cover - not Linux
    PIPE_MAX_SIZE = MiB

# A frame of exactly PIPE_BUF bytes: a pipe write of at most PIPE_BUF bytes
# is all or nothing (and on Linux, where it is 4096, fills a whole page).
FILL_PAYLOAD_SIZE = select.PIPE_BUF - 4

LINUX = sys.platform.startswith("linux")
# F_SETPIPE_SZ / F_GETPIPE_SZ and the 2 GiB tests.
linux_only = pytest.mark.skipif(not LINUX, reason="Linux pipe sizing (F_SETPIPE_SZ)")
# Tests that need a full kernel buffer to take no byte at all of a later
# write: true of Linux pipes filled with page-sized frames and of Linux unix
# sockets (a send is refused while the socket's send buffer is full); other
# kernels accept a few more bytes.
full_buffer_takes_nothing = pytest.mark.skipif(
    not LINUX, reason="relies on Linux's pipe and socket buffer accounting"
)

# fcntl has these names from Python 3.10 on; the values are Linux's ABI.
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


def hypothesis_settings(max_examples):
    # The function-scoped fixture used is a channel factory: every example
    # builds and closes its own channels.
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


# --------------------------------------------------------------------------
# helpers


@functools.lru_cache(maxsize=8)
def payload(n, seed=0):
    """n pseudo-random bytes; different seeds give different contents, so a
    message mixed up with another one does not compare equal."""
    return np.random.default_rng(seed).bytes(n)


BLOB = payload(MiB, seed=12345)


def tagged(tag, size):
    """``size`` bytes starting with the 4-byte ``tag``, the rest from BLOB at
    a tag-dependent offset."""
    off = (tag * 7919) % (len(BLOB) - size) if size < len(BLOB) else 0
    return (struct.pack("<I", tag) + BLOB[off : off + size])[:size]


def assert_same(got, expected):
    """Compare two (possibly huge) byte strings without pytest diffing them."""
    got = bytes(got)
    expected = bytes(expected)
    if got == expected:
        return
    n = min(len(got), len(expected))
    a = np.frombuffer(got, np.uint8, n)
    b = np.frombuffer(expected, np.uint8, n)
    diff = np.flatnonzero(a != b)
    first = int(diff[0]) if len(diff) else n
    pytest.fail(
        "messages differ: got %d bytes, expected %d; first difference at byte %d"
        % (len(got), len(expected), first)
    )


def header(n):
    return struct.pack("!i", n)


def long_header(n):
    return b"\xff\xff\xff\xff" + struct.pack("!Q", n)


def frame(data, long=False):
    return (long_header(len(data)) if long else header(len(data))) + bytes(data)


class Worker(threading.Thread):
    """Runs fn(*args, **kwargs) in a daemon thread; finish() joins with a
    bound, asserts the thread ended, re-raises its exception or returns its
    result.

    ``on_error`` (typically closing the channel the thread used) runs when fn
    fails, so the main thread's call on the peer ends at once with EOFError
    or BrokenPipeError instead of waiting for its timeout. The thread's own
    error is then reported when the test tears down (see _helper_threads).
    """

    started = []

    def __init__(self, fn, *args, on_error=None, **kwargs):
        super().__init__(daemon=True)
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.on_error = on_error
        self.result = None
        self.error = None
        self.reported = False
        Worker.started.append(self)

    def run(self):
        try:
            self.result = self.fn(*self.args, **self.kwargs)
        except BaseException as exc:  # reported by finish() or at teardown
            self.error = exc
            if self.on_error is not None:
                try:
                    self.on_error()
                except Exception:
                    pass

    def finish(self, timeout=JOIN):
        self.join(timeout)
        assert not self.is_alive(), "helper thread still running after %s s" % timeout
        self.reported = True
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture(autouse=True)
def _helper_threads():
    """Reports the error of a helper thread the test did not get to finish()
    (because its own assertion failed first, usually as a consequence)."""
    Worker.started.clear()
    yield
    workers, Worker.started[:] = list(Worker.started), []
    for worker in workers:
        worker.join(5)
        if worker.error is not None and not worker.reported:
            raise AssertionError("helper thread %s failed" % worker.fn) from worker.error


def start(fn, *args, **kwargs):
    worker = Worker(fn, *args, **kwargs)
    worker.start()
    return worker


def delayed(delay, fn, *args, on_error=None, **kwargs):
    def run():
        time.sleep(delay)
        return fn(*args, **kwargs)

    return start(run, on_error=on_error)


def drain(receiver, count, timeout=LONG):
    return [receiver.recv_bytes(timeout=timeout) for _ in range(count)]


def fill(sender):
    """Send PIPE_BUF-sized frames with timeout 0 until the kernel buffer takes
    no more. Returns (messages, pending): the payloads committed to the
    stream (a last one partly written included) and send_pending."""
    sent = []
    while True:
        data = tagged(len(sent), FILL_PAYLOAD_SIZE)
        try:
            sender.send_bytes(data, timeout=0)
        except TimeoutError:
            pending = sender.send_pending
            if not sender.is_socket:
                # Header and payload go out in one writev, and a pipe write
                # of at most PIPE_BUF bytes is all or nothing.
                assert pending == 0, "a PIPE_BUF-sized frame was written in part"
            if pending:
                sent.append(data)
            return sent, pending
        assert sender.send_pending == 0
        sent.append(data)
        assert len(sent) < 100000, "the buffer never filled up"


def read_exactly(fd, n, timeout=LONG):
    """Read n bytes from a raw descriptor, with an overall deadline."""
    deadline = time.monotonic() + timeout
    out = bytearray()
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while len(out) < n:
        left = deadline - time.monotonic()
        assert left > 0, "timed out reading %d bytes (got %d)" % (n, len(out))
        if not poller.poll(left * 1000):
            continue
        chunk = os.read(fd, min(n - len(out), MiB))
        assert chunk, "unexpected end of file after %d of %d bytes" % (len(out), n)
        out += chunk
    return bytes(out)


def wait_child(pid, timeout=LONG):
    """waitpid with a bound; kills the child if it does not exit in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("child process did not exit within %s s" % timeout)


def is_nonblocking(fd):
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)


def fd_is_open(fd):
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False
    return True


class Alarm(Exception):
    """Raised by the test's SIGALRM handler."""


def _raise_alarm(signum, frame):
    raise Alarm()


# --------------------------------------------------------------------------
# the module and construction


def test_module_interface(core):
    assert core.LONG_HEADER & 0xFFFFFFFF == 0xFFFFFFFF  # -1 as a 4-byte field
    assert core.MAX_SHORT_LENGTH == 2**31 - 1
    assert core.MULTIPART_HEADER & 0xFFFFFFFF == 0xFFFFFFFE  # -2
    assert core.MAX_PARTS == 65536
    assert isinstance(core.Channel, type)


def test_errors_are_the_shared_classes():
    assert issubclass(FrameError, OSError)
    assert issubclass(TruncatedMessageError, FrameError)
    assert issubclass(MessageTooLong, OSError)
    assert issubclass(MultipartMessageError, OSError)


def test_pipe_properties(core, pipe_pair):
    reader, writer = pipe_pair
    assert reader.readable and not reader.writable
    assert writer.writable and not writer.readable
    for chan in pipe_pair:
        assert not chan.closed
        assert not chan.is_socket
        assert chan.max_message_size is None
        assert chan.send_pending == 0
        assert chan.recv_in_progress is False
        assert isinstance(chan.fileno(), int) and chan.fileno() >= 0
    assert reader.fileno() != writer.fileno()


def test_socket_properties(core, socket_pair):
    for chan in socket_pair:
        assert chan.readable and chan.writable
        assert chan.is_socket
        assert not chan.closed


def test_fileno_is_the_given_fd(core, channels):
    rfd, wfd = os.pipe()
    reader = channels.channel(rfd, True, False)
    writer = channels.channel(wfd, False, True)
    assert reader.fileno() == rfd
    assert writer.fileno() == wfd


def test_max_message_size_property(core, channels):
    reader, writer = channels.pipe(max_message_size=1000)
    assert reader.max_message_size == 1000
    reader.max_message_size = 10
    assert reader.max_message_size == 10
    reader.max_message_size = None
    assert reader.max_message_size is None


def test_max_message_size_is_keyword_only(core):
    rfd, wfd = os.pipe()
    try:
        with pytest.raises(TypeError):
            core.Channel(rfd, True, False, 1000)
    finally:
        for fd in (rfd, wfd):
            try:
                os.close(fd)
            except OSError:
                pass


def test_signatures_positional_like_multiprocessing_timeout_keyword_only(socket_pair):
    a, b = socket_pair
    b.send_bytes(b"0123456789", 2, 3)
    assert a.recv_bytes(5) == b"234"
    b.send_bytes(data=b"xyz", offset=1, size=1, timeout=LONG)
    assert a.recv_bytes(maxlength=1, timeout=LONG) == b"y"
    b.send_parts(parts=[b"p"], timeout=LONG)
    buf = bytearray(4)
    assert a.recv_bytes_into(buf, 1) == 1 and buf == b"\0p\0\0"
    b.send_bytes(b"q")
    assert a.recv_bytes_into(buffer=buf, offset=3, timeout=LONG) == 1 and buf[3:] == b"q"
    b.flush(timeout=LONG)
    assert a.poll(0.01) is False and a.poll(timeout=0) is False
    for call in (
        lambda: b.send_bytes(b"x", 0, None, 1.0),
        lambda: b.send_parts([b"x"], 1.0),
        lambda: b.flush(1.0),
        lambda: a.recv_bytes(None, 1.0),
        lambda: a.recv_bytes_into(bytearray(4), 0, 1.0),
    ):
        with pytest.raises(TypeError):
            call()
    assert not a.poll(0)


def test_channel_can_be_subclassed(core, channels):
    class Sub(core.Channel):
        extra = "attribute"

    rfd, wfd = os.pipe()
    writer = channels.channel(wfd, False, True)
    reader = Sub(rfd, True, False)
    try:
        writer.send_bytes(b"sub")
        assert reader.recv_bytes(timeout=LONG) == b"sub"
        assert reader.extra == "attribute"
    finally:
        reader.close()


@pytest.mark.parametrize("fd", [-1, -5])
def test_negative_fd_is_value_error(core, fd):
    with pytest.raises(ValueError):
        core.Channel(fd)


def test_no_direction_is_value_error(core):
    rfd, wfd = os.pipe()
    try:
        with pytest.raises(ValueError):
            core.Channel(rfd, readable=False, writable=False)
    finally:
        for fd in (rfd, wfd):
            try:
                os.close(fd)
            except OSError:
                pass


def test_closed_fd_number_is_oserror(core):
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    with pytest.raises(OSError) as info:
        core.Channel(fd)
    assert info.value.errno == errno.EBADF


def test_pipe_fd_made_nonblocking_socket_left_alone(core, channels):
    reader, writer = channels.pipe()
    assert is_nonblocking(reader.fileno())
    assert is_nonblocking(writer.fileno())
    a, b = channels.socketpair()
    # Sockets keep their flags: MSG_DONTWAIT per call instead.
    assert not is_nonblocking(a.fileno())
    assert not is_nonblocking(b.fileno())


# --------------------------------------------------------------------------
# round trips

ROUND_TRIP_SIZES = [
    pytest.param(n, id=str(n)) for n in [0, 1, 16383, 16384, 16385, 65535, 65536, 65537]
] + [
    pytest.param(PIPE_MAX_SIZE, id="pipe-max-size"),
    pytest.param(MiB, id="1MiB"),
]


@pytest.mark.parametrize("size", ROUND_TRIP_SIZES)
def test_round_trip(pair, size):
    receiver, sender = pair
    data = payload(size, seed=size)
    worker = start(sender.send_bytes, data, timeout=LONG, on_error=sender.close)
    got = receiver.recv_bytes(timeout=LONG)
    worker.finish()
    assert type(got) is bytes
    assert_same(got, data)
    assert sender.send_pending == 0
    assert not receiver.recv_in_progress
    assert not receiver.poll(0)


@linux_only
@pytest.mark.parametrize(
    "size",
    [PIPE_MAX_SIZE - 5, PIPE_MAX_SIZE - 4, PIPE_MAX_SIZE - 3, PIPE_MAX_SIZE, 3 * PIPE_MAX_SIZE + 1],
)
def test_round_trip_enlarged_pipe(core, channels, size):
    receiver, sender = channels.pipe(pipe_size=PIPE_MAX_SIZE)
    data = payload(size, seed=size)
    worker = start(sender.send_bytes, data, timeout=LONG, on_error=sender.close)
    got = receiver.recv_bytes(timeout=LONG)
    worker.finish()
    assert_same(got, data)


def test_round_trip_fifo(core, channels, tmp_path):
    path = str(tmp_path / "fifo")
    os.mkfifo(path)
    rfd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    reader = channels.channel(rfd, True, False)
    writer = channels.channel(os.open(path, os.O_WRONLY), False, True)
    assert not reader.is_socket and not writer.is_socket
    data = payload(3 * MiB, seed=23)
    worker = start(writer.send_bytes, data, timeout=LONG, on_error=writer.close)
    got = reader.recv_bytes(timeout=LONG)
    worker.finish()
    assert_same(got, data)
    writer.close()
    with pytest.raises(EOFError):
        reader.recv_bytes(timeout=LONG)


@linux_only
@pytest.mark.parametrize("pipe_size", [None, PIPE_MAX_SIZE], ids=["default", "max"])
def test_frame_filling_pipe_exactly_needs_no_reader(core, channels, pipe_size):
    receiver, sender = channels.pipe(pipe_size=pipe_size)
    capacity = fcntl.fcntl(sender.fileno(), F_GETPIPE_SZ)
    data = payload(capacity - 4, seed=1)
    sender.send_bytes(data, timeout=0)  # header + payload fit exactly
    assert sender.send_pending == 0
    with pytest.raises(TimeoutError):
        sender.send_bytes(b"x", timeout=0)
    assert sender.send_pending == 0
    assert_same(receiver.recv_bytes(timeout=LONG), data)
    assert not receiver.poll(0)  # the refused b"x" was not sent


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_round_trip_100mib(pair):
    receiver, sender = pair
    data = payload(100 * MiB, seed=100)
    worker = start(sender.send_bytes, data, timeout=120, on_error=sender.close)
    got = receiver.recv_bytes(timeout=120)
    worker.finish()
    assert_same(got, data)


def test_many_small_messages_in_order(pair):
    receiver, sender = pair
    messages = [tagged(i, i % 50) for i in range(2000)]
    worker = start(lambda: [sender.send_bytes(m, timeout=LONG) for m in messages], on_error=sender.close)
    got = drain(receiver, len(messages))
    worker.finish()
    assert got == messages


# --------------------------------------------------------------------------
# send_bytes arguments and buffer types

SEND_ERRORS = [
    (-1, None, "offset is negative"),
    (-1, -1, "offset is negative"),
    (11, None, "buffer length < offset"),
    (11, 0, "buffer length < offset"),
    (0, -1, "size is negative"),
    (5, 6, "buffer length < offset + size"),
    (0, 11, "buffer length < offset + size"),
]


def test_send_error_wording_matches_multiprocessing():
    rfd, wfd = os.pipe()
    conn = Connection(wfd, readable=False)
    try:
        for offset, size, message in SEND_ERRORS:
            with pytest.raises(ValueError) as info:
                conn.send_bytes(b"0123456789", offset, size)
            assert str(info.value) == message
    finally:
        conn.close()
        os.close(rfd)


@pytest.mark.parametrize("offset,size,message", SEND_ERRORS)
def test_send_bytes_bad_offset_size(pair, offset, size, message):
    receiver, sender = pair
    with pytest.raises(ValueError, match="^%s$" % message.replace("+", r"\+")):
        sender.send_bytes(b"0123456789", offset, size)
    assert not receiver.poll(0)  # nothing went out
    sender.send_bytes(b"ok", timeout=LONG)
    assert receiver.recv_bytes(timeout=LONG) == b"ok"


@pytest.mark.parametrize(
    "offset,size,expected",
    [
        (0, None, b"0123456789"),
        (3, None, b"3456789"),
        (3, 4, b"3456"),
        (3, 0, b""),
        (10, None, b""),
        (10, 0, b""),
        (0, 10, b"0123456789"),
    ],
)
def test_send_bytes_offset_size(pair, offset, size, expected):
    receiver, sender = pair
    sender.send_bytes(b"0123456789", offset, size)
    assert receiver.recv_bytes(timeout=LONG) == expected
    sender.send_bytes(bytearray(b"0123456789"), offset=offset, size=size, timeout=LONG)
    assert receiver.recv_bytes(timeout=LONG) == expected


def test_send_bytes_offset_size_count_bytes_not_items(pair):
    receiver, sender = pair
    arr = array.array("i", range(10))  # 40 bytes
    raw = arr.tobytes()
    sender.send_bytes(arr, 4, 8)
    assert receiver.recv_bytes(timeout=LONG) == raw[4:12]
    sender.send_bytes(arr, 13)  # not a multiple of the item size
    assert receiver.recv_bytes(timeout=LONG) == raw[13:]
    sender.send_bytes(arr, 40)
    assert receiver.recv_bytes(timeout=LONG) == b""
    with pytest.raises(ValueError, match="^buffer length < offset$"):
        sender.send_bytes(arr, 41)
    with pytest.raises(ValueError, match=r"^buffer length < offset \+ size$"):
        sender.send_bytes(arr, 36, 5)
    nums = np.arange(10, dtype=np.float64)
    sender.send_bytes(nums, 8, 16)
    assert receiver.recv_bytes(timeout=LONG) == nums.tobytes()[8:24]
    assert not receiver.poll(0)


def _anon_mmap(data):
    mm = mmap.mmap(-1, len(data))
    mm[:] = data
    return mm


BUFFER_KINDS = {
    "bytes": lambda d: d,
    "bytearray": bytearray,
    "memoryview": memoryview,
    "memoryview-slice": lambda d: memoryview(b"xx" + d + b"yyy")[2:-3],
    "memoryview-of-bytearray-slice": lambda d: memoryview(bytearray(b"x" + d + b"y"))[1:-1],
    "memoryview-cast": lambda d: memoryview(bytearray(d)).cast("i"),
    "array-i": lambda d: array.array("i", d),
    "array-d": lambda d: array.array("d", d),
    "mmap": _anon_mmap,
    "numpy-uint8": lambda d: np.frombuffer(d, np.uint8).copy(),
    "numpy-readonly": lambda d: np.frombuffer(d, np.uint8),
    "numpy-int32": lambda d: np.frombuffer(d, np.int32).copy(),
    "numpy-2d-float64": lambda d: np.frombuffer(d, np.float64).reshape(-1, 8).copy(),
    "numpy-contiguous-slice": lambda d: np.frombuffer(b"\0" * 64 + d + b"\0" * 64, np.int64)[8:-8],
}


@pytest.mark.parametrize(
    "kind,size",
    [
        (kind, size)
        for kind in sorted(BUFFER_KINDS)
        for size in (0, 64, 200 * KiB)
        if not (kind == "mmap" and size == 0)  # an mmap cannot be empty
    ],
)
def test_send_buffer_types(pair, kind, size):
    receiver, sender = pair
    data = payload(size, seed=7)
    buf = BUFFER_KINDS[kind](data)
    worker = start(sender.send_bytes, buf, timeout=LONG, on_error=sender.close)
    got = receiver.recv_bytes(timeout=LONG)
    worker.finish()
    assert_same(got, data)


@pytest.mark.parametrize(
    "make",
    [
        lambda: memoryview(bytes(range(100)))[::2],
        lambda: np.arange(100, dtype=np.int32)[::2],
        lambda: np.arange(100, dtype=np.int32).reshape(10, 10).T,
    ],
    ids=["memoryview-strided", "numpy-strided", "numpy-transposed"],
)
def test_send_non_contiguous_buffer_rejected(pair, make):
    receiver, sender = pair
    with pytest.raises((TypeError, BufferError, ValueError)):
        sender.send_bytes(make())
    assert not receiver.poll(0)


@pytest.mark.parametrize("bad", ["text", 12, None, object()])
def test_send_non_buffer_is_type_error(pair, bad):
    receiver, sender = pair
    with pytest.raises(TypeError):
        sender.send_bytes(bad)
    assert not receiver.poll(0)


# --------------------------------------------------------------------------
# send_parts


def test_send_parts_one_message(pair):
    receiver, sender = pair
    parts = [
        b"ab",
        bytearray(b"cd"),
        memoryview(b"xefgx")[1:4],
        b"",
        array.array("i", [1, 2]),
        np.arange(3, dtype=np.int16),
        _anon_mmap(b"mm"),
    ]
    expected = b"".join(bytes(memoryview(p).cast("B")) for p in parts)
    sender.send_parts(parts)
    sender.send_parts(tuple(parts))
    sender.send_bytes(b"next")
    assert receiver.recv_bytes(timeout=LONG) == expected
    assert receiver.recv_bytes(timeout=LONG) == expected
    assert receiver.recv_bytes(timeout=LONG) == b"next"
    assert not receiver.poll(0)


@pytest.mark.parametrize("parts", [[], [b""], [b"", b"", bytearray()]], ids=["none", "one-empty", "three-empty"])
def test_send_parts_empty(pair, parts):
    receiver, sender = pair
    sender.send_parts(parts)
    assert receiver.recv_bytes(timeout=LONG) == b""
    assert not receiver.poll(0)


def test_send_parts_large(pair):
    receiver, sender = pair
    parts = [payload(700 * KiB, seed=1), bytearray(payload(3, seed=2)), payload(MiB + 1, seed=3)]
    worker = start(sender.send_parts, parts, timeout=LONG, on_error=sender.close)
    got = receiver.recv_bytes(timeout=LONG)
    worker.finish()
    assert_same(got, b"".join(bytes(p) for p in parts))


def test_send_parts_bad_part_sends_nothing(pair):
    receiver, sender = pair
    with pytest.raises((TypeError, BufferError, ValueError)):
        sender.send_parts([b"abc", "not a buffer"])
    with pytest.raises((TypeError, BufferError, ValueError)):
        sender.send_parts([b"abc", memoryview(b"abcdef")[::2]])
    assert not receiver.poll(0)
    sender.send_parts([b"a", b"b"])
    assert receiver.recv_bytes(timeout=LONG) == b"ab"


@pytest.mark.parametrize("count,size", [(3000, 100), (5000, 1), (2, 0)])
def test_send_parts_many_parts(pair, count, size):
    """More parts than IOV_MAX (1024 on Linux) still make one message."""
    receiver, sender = pair
    parts = [tagged(i, size) for i in range(count)] + [b""] * 10
    worker = start(sender.send_parts, parts, timeout=LONG, on_error=sender.close)
    got = receiver.recv_bytes(timeout=LONG)
    worker.finish()
    assert_same(got, b"".join(parts))


def test_send_parts_timeout_then_flush(pair):
    receiver, sender = pair
    parts = [bytearray(payload(2 * MiB, seed=4)), bytearray(payload(2 * MiB, seed=5))]
    expected = b"".join(bytes(p) for p in parts)
    with pytest.raises(TimeoutError):
        sender.send_parts(parts, timeout=0.1)
    assert sender.send_pending > 0
    for p in parts:  # the caller may reuse its buffers
        p[:] = bytes(len(p))
    worker = start(drain, receiver, 2, on_error=receiver.close)
    sender.flush(timeout=LONG)
    sender.send_parts([b"x", b"y"], timeout=LONG)
    got = worker.finish()
    assert_same(got[0], expected)
    assert got[1] == b"xy"


# --------------------------------------------------------------------------
# recv_bytes maxlength


def test_recv_bytes_negative_maxlength(pair):
    receiver, sender = pair
    sender.send_bytes(b"hello")
    with pytest.raises(ValueError, match="^negative maxlength$"):
        receiver.recv_bytes(-1)
    assert receiver.recv_bytes(timeout=LONG) == b"hello"


def test_recv_bytes_maxlength_boundaries(pair):
    receiver, sender = pair
    sender.send_bytes(b"")
    sender.send_bytes(b"x" * 100)
    sender.send_bytes(b"y" * 100)
    assert receiver.recv_bytes(0, timeout=LONG) == b""
    assert receiver.recv_bytes(100, timeout=LONG) == b"x" * 100
    assert receiver.recv_bytes(maxlength=101, timeout=LONG) == b"y" * 100


def test_message_too_long_keeps_message(pair):
    receiver, sender = pair
    sender.send_bytes(b"x" * 100)
    sender.send_bytes(b"after")
    for maxlength in (99, 0, 99):
        with pytest.raises(MessageTooLong) as info:
            receiver.recv_bytes(maxlength, timeout=LONG)
        assert isinstance(info.value, OSError)
        assert info.value.length == 100
        assert info.value.maxlength == maxlength
    assert receiver.recv_bytes(timeout=LONG) == b"x" * 100
    assert receiver.recv_bytes(timeout=LONG) == b"after"
    assert not receiver.poll(0)


def test_message_too_long_then_recv_bytes_into(pair):
    receiver, sender = pair
    sender.send_bytes(b"z" * 50)
    with pytest.raises(MessageTooLong):
        receiver.recv_bytes(10, timeout=LONG)
    buf = bytearray(60)
    assert receiver.recv_bytes_into(buf, timeout=LONG) == 50
    assert buf[:50] == b"z" * 50


def test_message_too_long_large_message(pair):
    receiver, sender = pair
    data = payload(3 * MiB, seed=9)
    worker = start(sender.send_bytes, data, timeout=LONG, on_error=sender.close)
    t0 = time.monotonic()
    with pytest.raises(MessageTooLong) as info:
        receiver.recv_bytes(10, timeout=LONG)
    assert time.monotonic() - t0 < LONG / 2
    assert info.value.length == len(data)
    got = receiver.recv_bytes(timeout=LONG)
    worker.finish()
    assert_same(got, data)


# --------------------------------------------------------------------------
# recv_bytes_into


def test_recv_into_error_wording_matches_multiprocessing():
    rfd, wfd = os.pipe()
    conn = Connection(rfd, writable=False)
    try:
        with pytest.raises(ValueError) as info:
            conn.recv_bytes_into(bytearray(10), -1)
        assert str(info.value) == "negative offset"
        with pytest.raises(ValueError) as info:
            conn.recv_bytes_into(bytearray(10), 11)
        assert str(info.value) == "offset too large"
        with pytest.raises(ValueError) as info:
            conn.recv_bytes(-1)
        assert str(info.value) == "negative maxlength"
    finally:
        conn.close()
        os.close(wfd)


@pytest.mark.parametrize("offset,size", [(0, 10), (10, 10), (90, 10), (100, 0), (0, 100), (37, 0)])
def test_recv_bytes_into_offsets(pair, offset, size):
    receiver, sender = pair
    data = payload(size, seed=offset)
    sender.send_bytes(data)
    buf = bytearray(b"\xaa" * 100)
    assert receiver.recv_bytes_into(buf, offset, timeout=LONG) == size
    assert buf[offset : offset + size] == data
    assert buf[:offset] == b"\xaa" * offset
    assert buf[offset + size :] == b"\xaa" * (100 - offset - size)


def test_recv_bytes_into_bad_offset_keeps_message(pair):
    receiver, sender = pair
    sender.send_bytes(b"abc")
    with pytest.raises(ValueError, match="^negative offset$"):
        receiver.recv_bytes_into(bytearray(10), -1)
    with pytest.raises(ValueError, match="^offset too large$"):
        receiver.recv_bytes_into(bytearray(10), 11)
    with pytest.raises(ValueError, match="^offset too large$"):
        receiver.recv_bytes_into(array.array("i", [0, 0]), 9)  # 8 bytes
    buf = bytearray(10)
    assert receiver.recv_bytes_into(buf, 7, timeout=LONG) == 3
    assert buf[7:] == b"abc"


def test_buffer_too_short_carries_message(pair):
    receiver, sender = pair
    sender.send_bytes(b"0123456789A")
    sender.send_bytes(b"next")
    buf = bytearray(20)
    with pytest.raises(BufferTooShort) as info:
        receiver.recv_bytes_into(buf, 10, timeout=LONG)
    assert info.value.args == (b"0123456789A",)
    # the message was consumed; the stream goes on with the next one
    assert receiver.recv_bytes_into(buf, 16, timeout=LONG) == 4
    assert buf[16:] == b"next"
    assert not receiver.poll(0)


def test_buffer_too_short_empty_buffer(pair):
    receiver, sender = pair
    sender.send_bytes(b"x")
    sender.send_bytes(b"")
    with pytest.raises(BufferTooShort) as info:
        receiver.recv_bytes_into(bytearray(), timeout=LONG)
    assert info.value.args == (b"x",)
    assert receiver.recv_bytes_into(bytearray(), timeout=LONG) == 0


def test_buffer_too_short_large_message(pair):
    receiver, sender = pair
    data = payload(2 * MiB + 3, seed=11)
    worker = start(sender.send_bytes, data, timeout=LONG, on_error=sender.close)
    with pytest.raises(BufferTooShort) as info:
        receiver.recv_bytes_into(bytearray(100), timeout=LONG)
    worker.finish()
    assert len(info.value.args) == 1
    assert type(info.value.args[0]) is bytes
    assert_same(info.value.args[0], data)
    sender.send_bytes(b"next")
    assert receiver.recv_bytes(timeout=LONG) == b"next"


def test_recv_bytes_into_buffer_types(pair):
    receiver, sender = pair
    data = bytes(range(1, 13))  # 12 bytes

    arr = array.array("i", [0] * 8)  # 32 bytes
    sender.send_bytes(data)
    assert receiver.recv_bytes_into(arr, 4, timeout=LONG) == 12
    assert arr.tobytes()[4:16] == data and arr.tobytes()[:4] == b"\0" * 4

    arr = array.array("i", [0] * 8)
    sender.send_bytes(data)
    assert receiver.recv_bytes_into(arr, 1, timeout=LONG) == 12  # byte offset, unaligned
    assert arr.tobytes()[1:13] == data

    nums = np.zeros(4, dtype=np.float64)  # 32 bytes
    sender.send_bytes(data)
    assert receiver.recv_bytes_into(nums, 20, timeout=LONG) == 12
    assert nums.tobytes()[20:] == data

    mm = mmap.mmap(-1, 4096)
    sender.send_bytes(data)
    assert receiver.recv_bytes_into(mm, 4000, timeout=LONG) == 12
    assert mm[4000:4012] == data

    backing = bytearray(40)
    view = memoryview(backing)[10:30]
    sender.send_bytes(data)
    assert receiver.recv_bytes_into(view, 8, timeout=LONG) == 12
    assert backing[18:30] == data and backing[:18] == b"\0" * 18

    arr = array.array("i", [0] * 8)
    sender.send_bytes(b"abc")
    with pytest.raises(BufferTooShort) as info:
        receiver.recv_bytes_into(arr, 30, timeout=LONG)  # 30 + 3 > 32 bytes
    assert info.value.args == (b"abc",)
    assert not receiver.poll(0)


def test_recv_bytes_into_readonly_buffer_rejected(pair):
    receiver, sender = pair
    sender.send_bytes(b"abc")
    with pytest.raises((TypeError, BufferError, ValueError)):
        receiver.recv_bytes_into(b"\0" * 10)


def test_recv_bytes_into_non_contiguous_buffer_rejected(pair):
    receiver, sender = pair
    sender.send_bytes(b"abc")
    with pytest.raises((TypeError, BufferError, ValueError)):
        receiver.recv_bytes_into(np.zeros(20, dtype=np.uint8)[::2])


def test_recv_bytes_into_large_numpy(pair):
    receiver, sender = pair
    data = payload(3 * MiB, seed=12)
    target = np.zeros(3 * MiB // 8 + 2, dtype=np.float64)
    worker = start(sender.send_bytes, data, timeout=LONG, on_error=sender.close)
    assert receiver.recv_bytes_into(target, 16, timeout=LONG) == len(data)
    worker.finish()
    assert_same(target.tobytes()[16:], data)


# --------------------------------------------------------------------------
# wire compatibility with multiprocessing.connection


@pytest.fixture(params=["pipe", "socket"])
def mp_peer(request, channels):
    """make(channel_sends) -> (Channel, multiprocessing Connection) on one pipe
    or socket pair; the Connection is closed at teardown."""
    conns = []

    def make(channel_sends):
        if request.param == "pipe":
            rfd, wfd = os.pipe()
            if channel_sends:
                conn = Connection(rfd, writable=False)
                chan = channels.channel(wfd, False, True)
            else:
                conn = Connection(wfd, readable=False)
                chan = channels.channel(rfd, True, False)
        else:
            left, right = socket.socketpair()
            conn = Connection(right.detach())
            chan = channels.channel(left.detach())
        conns.append(conn)
        return chan, conn

    yield make
    for conn in conns:
        conn.close()


WIRE_SIZES = [0, 1, 1000, 65531, 65536, MiB, 3 * MiB + 7]


def test_channel_to_multiprocessing(mp_peer):
    chan, conn = mp_peer(channel_sends=True)
    messages = [payload(n, seed=n) for n in WIRE_SIZES]

    def send_all():
        for m in messages:
            chan.send_bytes(m, timeout=LONG)
        chan.send_parts([b"pa", b"rts"], timeout=LONG)

    worker = start(send_all, on_error=chan.close)
    for m in messages:
        assert conn.poll(LONG)
        assert_same(conn.recv_bytes(), m)
    assert conn.recv_bytes() == b"parts"
    worker.finish()
    assert not conn.poll(0)


def test_multiprocessing_to_channel(mp_peer):
    chan, conn = mp_peer(channel_sends=False)
    messages = [payload(n, seed=n) for n in WIRE_SIZES]
    worker = start(lambda: [conn.send_bytes(m) for m in messages], on_error=conn.close)
    for m in messages:
        assert_same(chan.recv_bytes(timeout=LONG), m)
    worker.finish()
    assert not chan.poll(0)


@pytest.mark.parametrize("n", [0, 5, 100, 70000])
def test_long_header_accepted(raw_writer, n):
    reader, raw = raw_writer
    data = payload(n, seed=n)
    worker = start(raw.write, long_header(n) + data + frame(b"short") + frame(b"long again", long=True), on_error=raw.close)
    assert_same(reader.recv_bytes(timeout=LONG), data)
    assert reader.recv_bytes(timeout=LONG) == b"short"
    buf = bytearray(20)
    assert reader.recv_bytes_into(buf, timeout=LONG) == 10
    assert buf[:10] == b"long again"
    worker.finish()


def test_handmade_long_header_is_what_multiprocessing_reads():
    # Guards the test's own framing helper against multiprocessing's reader.
    rfd, wfd = os.pipe()
    conn = Connection(rfd, writable=False)
    try:
        os.write(wfd, long_header(5) + b"hello")
        assert conn.recv_bytes() == b"hello"
    finally:
        conn.close()
        os.close(wfd)


@linux_only
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("n", [2**31 - 1, 2**31], ids=["max-short", "first-long"])
def test_header_choice_at_2gib(core, channels, n):
    """Payloads of 2**31 bytes and more get the 8-byte length. The payload is
    an untouched anonymous mapping (reads map the zero page, so it costs no
    memory); a raw reader checks the header and counts the bytes."""
    writer, raw = channels.raw_reader()
    fcntl.fcntl(writer.fileno(), F_SETPIPE_SZ, PIPE_MAX_SIZE)
    mm = mmap.mmap(-1, n)
    try:
        mm[:4] = b"HEAD"
        mm[n - 4 :] = b"TAIL"

        def read_frame():
            hdr = read_exactly(raw.fd, 4)
            if hdr == b"\xff\xff\xff\xff":
                hdr += read_exactly(raw.fd, 8)
            chunk = bytearray(MiB)
            first = last = b""
            left = n
            while left:
                got = os.readv(raw.fd, [memoryview(chunk)[: min(left, MiB)]])
                assert got > 0
                if not first:
                    first = bytes(chunk[:4])
                last = (last + bytes(chunk[:got]))[-4:]
                left -= got
            return hdr, first, last

        reader = start(read_frame, on_error=raw.close)
        writer.send_bytes(mm, timeout=240)
        hdr, first, last = reader.finish(timeout=240)
    finally:
        mm.close()
    if n > 2**31 - 1:
        assert hdr == long_header(n)
    else:
        assert hdr == header(n)
    assert first == b"HEAD" and last == b"TAIL"


# --------------------------------------------------------------------------
# corrupt and hostile headers


def assert_broken(reader):
    """Every later receive reports the framing error again."""
    for _ in range(2):
        with pytest.raises(FrameError):
            reader.recv_bytes(timeout=1)
        with pytest.raises(FrameError):
            reader.recv_bytes(timeout=0)
        with pytest.raises(FrameError):
            reader.recv_bytes_into(bytearray(100), timeout=1)
    assert reader.poll(0)  # a receive can "make progress": it reports the error


# -1 is the long header and -2 starts a multipart message.
@pytest.mark.parametrize("length", [-3, -4, -100, -(2**31)])
def test_negative_length_is_frame_error(raw_writer, length):
    reader, raw = raw_writer
    raw.write(frame(b"abc") + header(length) + b"junk that follows")
    assert reader.recv_bytes(timeout=LONG) == b"abc"
    with pytest.raises(FrameError):
        reader.recv_bytes(timeout=LONG)
    raw.write(frame(b"looks valid"))
    assert_broken(reader)


def test_negative_length_via_recv_bytes_into(raw_writer):
    reader, raw = raw_writer
    raw.write(header(-7))
    with pytest.raises(FrameError):
        reader.recv_bytes_into(bytearray(10), timeout=LONG)
    assert_broken(reader)


@pytest.mark.parametrize(
    "hdr",
    [long_header(2**40), long_header(2**31), header(64 * MiB), header(1001)],
    ids=["long-2**40", "long-2**31", "short-64MiB", "short-1001"],
)
def test_length_above_max_message_size(channels, hdr):
    reader, raw = channels.raw_writer(max_message_size=1000)
    raw.write(frame(b"x" * 1000) + hdr + b"some payload bytes")
    assert reader.recv_bytes(timeout=LONG) == b"x" * 1000  # the limit itself is fine
    tracemalloc.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(FrameError):
            reader.recv_bytes(timeout=LONG)
        elapsed = time.monotonic() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 2.0  # raised at once, without waiting for payload
    assert peak < MiB, "allocated %d bytes before rejecting the header" % peak
    assert_broken(reader)


def test_max_message_size_set_later(channels):
    reader, raw = channels.raw_writer()
    raw.write(frame(b"a" * 20) + frame(b"b" * 11))
    reader.max_message_size = 20
    assert reader.recv_bytes(timeout=LONG) == b"a" * 20
    reader.max_message_size = 10
    with pytest.raises(FrameError):
        reader.recv_bytes(timeout=LONG)


def test_max_message_size_only_limits_receiving(channels):
    a, b = channels.socketpair(max_message_size=10)
    a.send_bytes(b"z" * 100)
    b.max_message_size = None
    assert b.recv_bytes(timeout=LONG) == b"z" * 100


@pytest.mark.parametrize("n", [2**63 + 5, 2**63, 2**64 - 1])
def test_huge_long_length_is_frame_error(raw_writer, n):
    reader, raw = raw_writer
    raw.write(long_header(n) + b"payload")
    t0 = time.monotonic()
    with pytest.raises(FrameError):
        reader.recv_bytes(timeout=LONG)
    assert time.monotonic() - t0 < 2.0
    assert_broken(reader)


def test_huge_long_length_via_recv_bytes_into(raw_writer):
    reader, raw = raw_writer
    raw.write(long_header(2**63 + 5))
    with pytest.raises(FrameError):
        reader.recv_bytes_into(bytearray(100), timeout=LONG)
    assert_broken(reader)


# --------------------------------------------------------------------------
# streams split at arbitrary byte offsets


def _collect(reader, out, modes):
    """Receive with timeout 0 until nothing complete is left."""
    while True:
        mode = next(modes)
        try:
            if mode == "bytes":
                out.append(reader.recv_bytes(timeout=0))
            else:
                buf = bytearray(70000)
                n = reader.recv_bytes_into(buf, 3, timeout=0)
                out.append(bytes(buf[3 : 3 + n]))
        except TimeoutError:
            return


@pytest.mark.parametrize("mode", ["bytes", "into", "mixed"])
def test_stream_written_byte_by_byte(raw_writer, mode):
    reader, raw = raw_writer
    messages = [b"", b"a", payload(300, seed=1), b"", payload(5, seed=2), payload(1000, seed=3), b"z"]
    stream = b"".join(frame(m, long=(i % 3 == 1)) for i, m in enumerate(messages))
    cycle = {"bytes": ["bytes"], "into": ["into"], "mixed": ["bytes", "into", "into"]}[mode]
    modes = iter(cycle * (10 * len(stream)))
    got = []
    for i in range(len(stream)):
        raw.write(stream[i : i + 1])
        _collect(reader, got, modes)
    assert got == messages
    assert not reader.recv_in_progress
    assert not reader.poll(0)


@hypothesis_settings(60)
@given(data=st.data())
def test_stream_split_anywhere(channels, data):
    sizes = data.draw(
        st.lists(st.integers(0, 3000) | st.sampled_from([0, 1, 4, 8, 9, 12]), min_size=1, max_size=8),
        label="sizes",
    )
    longs = data.draw(st.lists(st.booleans(), min_size=len(sizes), max_size=len(sizes)), label="long")
    messages = [tagged(i, n) for i, n in enumerate(sizes)]
    stream = b"".join(frame(m, long=lg) for m, lg in zip(messages, longs))
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=40), label="cuts")
    bounds = sorted(set([0, len(stream)] + cuts))
    modes = iter(data.draw(st.lists(st.sampled_from(["bytes", "into"]), min_size=1, max_size=5)) * 100000)
    reader, raw = channels.raw_writer()
    try:
        got = []
        for lo, hi in zip(bounds, bounds[1:]):
            raw.write(stream[lo:hi])
            _collect(reader, got, modes)
        assert got == messages
        assert not reader.recv_in_progress
    finally:
        reader.close()
        raw.close()


def _trickle(raw, stream, bounds, pause):
    for lo, hi in zip(bounds, bounds[1:]):
        raw.write(stream[lo:hi])
        time.sleep(pause)


@hypothesis_settings(20)
@given(data=st.data())
def test_stream_split_anywhere_blocking_reader(channels, data):
    sizes = data.draw(st.lists(st.integers(0, 200 * KiB) | st.integers(0, 20), min_size=1, max_size=6))
    longs = data.draw(st.lists(st.booleans(), min_size=len(sizes), max_size=len(sizes)))
    messages = [tagged(i, n) for i, n in enumerate(sizes)]
    stream = b"".join(frame(m, long=lg) for m, lg in zip(messages, longs))
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    bounds = sorted(set([0, len(stream)] + cuts))
    reader, raw = channels.raw_writer()
    try:
        worker = start(_trickle, raw, stream, bounds, 0.001, on_error=raw.close)
        got = [reader.recv_bytes(timeout=LONG) for _ in messages]
        worker.finish()
        assert len(got) == len(messages)
        for g, m in zip(got, messages):
            assert_same(g, m)
    finally:
        reader.close()
        raw.close()


# --------------------------------------------------------------------------
# end of file


def test_eof_at_frame_boundary(pair):
    receiver, sender = pair
    sender.send_bytes(b"one")
    sender.send_bytes(b"")
    sender.close()
    assert receiver.recv_bytes(timeout=LONG) == b"one"
    assert receiver.recv_bytes(timeout=LONG) == b""
    for _ in range(3):
        with pytest.raises(EOFError):
            receiver.recv_bytes(timeout=LONG)
        with pytest.raises(EOFError):
            receiver.recv_bytes(timeout=0)
        with pytest.raises(EOFError):
            receiver.recv_bytes_into(bytearray(10), timeout=LONG)
        assert receiver.poll(0)
    with pytest.raises(EOFError):
        receiver.recv_bytes()  # timeout None: end of file does not block


def test_eof_after_socket_half_close(socket_pair):
    a, b = socket_pair
    b.send_bytes(b"last")
    peer = socket.socket(fileno=os.dup(b.fileno()))
    try:
        peer.shutdown(socket.SHUT_WR)
    finally:
        peer.close()  # closes the duplicate only
    assert a.recv_bytes(timeout=LONG) == b"last"
    with pytest.raises(EOFError):
        a.recv_bytes(timeout=LONG)
    # the other direction still works
    a.send_bytes(b"reply", timeout=LONG)
    assert b.recv_bytes(timeout=LONG) == b"reply"


def test_eof_on_empty_stream(raw_writer):
    reader, raw = raw_writer
    raw.close()
    with pytest.raises(EOFError):
        reader.recv_bytes(timeout=LONG)
    with pytest.raises(EOFError):
        reader.recv_bytes(timeout=LONG)


@pytest.mark.parametrize(
    "partial",
    [
        header(100) + b"0123456789",
        header(100),
        header(100)[:2],
        b"\xff\xff\xff\xff",
        long_header(100)[:7],
        long_header(100) + b"0123456789",
    ],
    ids=["mid-payload", "after-header", "mid-header", "after-escape", "mid-long-header", "long-mid-payload"],
)
def test_eof_mid_frame_is_truncated_message(raw_writer, partial):
    reader, raw = raw_writer
    raw.write(frame(b"whole") + partial)
    raw.close()
    assert reader.recv_bytes(timeout=LONG) == b"whole"
    with pytest.raises(TruncatedMessageError) as info:
        reader.recv_bytes(timeout=LONG)
    assert isinstance(info.value, FrameError)
    assert isinstance(info.value, OSError)
    assert_broken(reader)


def test_eof_mid_frame_after_partial_receive(raw_writer):
    reader, raw = raw_writer
    raw.write(header(100) + b"0123456789")
    with pytest.raises(TimeoutError):
        reader.recv_bytes(timeout=0.05)
    raw.close()
    with pytest.raises(TruncatedMessageError):
        reader.recv_bytes_into(bytearray(200), timeout=LONG)
    assert_broken(reader)


def test_close_with_pending_send_truncates(pair):
    receiver, sender = pair
    with pytest.raises(TimeoutError):
        sender.send_bytes(payload(4 * MiB), timeout=0.1)
    assert sender.send_pending > 0
    sender.close()
    with pytest.raises(TruncatedMessageError):
        # drains what was written, then hits end of file
        receiver.recv_bytes(timeout=LONG)


# --------------------------------------------------------------------------
# broken pipe


def test_broken_pipe(pair):
    receiver, sender = pair
    receiver.close()
    with pytest.raises(BrokenPipeError):
        sender.send_bytes(b"x", timeout=LONG)
    with pytest.raises(BrokenPipeError):
        sender.send_bytes(payload(MiB), timeout=LONG)
    with pytest.raises(BrokenPipeError):
        sender.send_parts([b"a", b"b"], timeout=LONG)
    sender.flush()  # nothing pending: no-op


def test_broken_pipe_mid_send(pair):
    receiver, sender = pair
    worker = start(sender.send_bytes, payload(8 * MiB), timeout=LONG, on_error=sender.close)
    time.sleep(0.2)  # the sender fills the buffer and waits
    assert worker.is_alive()
    receiver.close()
    with pytest.raises(BrokenPipeError):
        worker.finish()


# --------------------------------------------------------------------------
# closed handle, detach, directions


def _every_method(chan):
    return {
        "fileno": chan.fileno,
        "send_bytes": lambda: chan.send_bytes(b"x", timeout=1),
        "send_parts": lambda: chan.send_parts([b"x"], timeout=1),
        "flush": lambda: chan.flush(timeout=1),
        "recv_bytes": lambda: chan.recv_bytes(timeout=1),
        "recv_bytes_into": lambda: chan.recv_bytes_into(bytearray(10), timeout=1),
        "poll": lambda: chan.poll(1),
        "detach": chan.detach,
    }


def test_closed_channel_methods(pair):
    for chan in pair:
        fd = chan.fileno()
        chan.close()
        assert chan.closed
        assert not fd_is_open(fd)
        chan.close()  # idempotent
        chan.close()
        for name, call in _every_method(chan).items():
            with pytest.raises(OSError, match="handle is closed"):
                call()


def test_detach_returns_open_fd(pair):
    receiver, sender = pair
    sender.send_bytes(b"still here")
    fd = receiver.detach()
    try:
        assert receiver.closed
        assert fd_is_open(fd)
        for name, call in _every_method(receiver).items():
            with pytest.raises(OSError, match="handle is closed"):
                call()
        receiver.close()  # must not close the detached fd
        assert fd_is_open(fd)
        assert read_exactly(fd, 4 + 10) == frame(b"still here")
    finally:
        os.close(fd)


def test_detach_restores_blocking_mode(core):
    rfd, wfd = os.pipe()
    assert not is_nonblocking(rfd) and not is_nonblocking(wfd)
    reader = core.Channel(rfd, True, False)
    writer = core.Channel(wfd, False, True)
    try:
        assert is_nonblocking(rfd) and is_nonblocking(wfd)
        assert reader.detach() == rfd
        assert writer.detach() == wfd
        assert not is_nonblocking(rfd)
        assert not is_nonblocking(wfd)
    finally:
        reader.close()
        writer.close()
        os.close(rfd)
        os.close(wfd)


def test_detach_keeps_nonblocking_mode_set_before(core):
    rfd, wfd = os.pipe()
    os.set_blocking(rfd, False)
    reader = core.Channel(rfd, True, False)
    try:
        assert reader.detach() == rfd
        assert is_nonblocking(rfd)
    finally:
        os.close(rfd)
        os.close(wfd)


def test_detach_socket_keeps_flags(core):
    left, right = socket.socketpair()
    fd = left.detach()
    try:
        chan = core.Channel(fd)
        assert not is_nonblocking(fd)
        assert chan.detach() == fd
        assert not is_nonblocking(fd)
        assert chan.closed
    finally:
        os.close(fd)
        right.close()


def test_direction_errors(pipe_pair):
    reader, writer = pipe_pair
    for call in (
        lambda: reader.send_bytes(b"x", timeout=1),
        lambda: reader.send_parts([b"x"], timeout=1),
    ):
        with pytest.raises(OSError, match="read-only"):
            call()
    for call in (
        lambda: writer.recv_bytes(timeout=1),
        lambda: writer.recv_bytes_into(bytearray(4), timeout=1),
        lambda: writer.poll(0),
    ):
        with pytest.raises(OSError, match="write-only"):
            call()
    # the channels are unharmed
    writer.send_bytes(b"fine")
    assert reader.recv_bytes(timeout=LONG) == b"fine"


# --------------------------------------------------------------------------
# timeouts


def test_recv_timeout_zero(pair):
    receiver, sender = pair
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        receiver.recv_bytes(timeout=0)
    with pytest.raises(TimeoutError):
        receiver.recv_bytes_into(bytearray(10), timeout=0)
    assert time.monotonic() - t0 < 1.0
    sender.send_bytes(b"then")
    assert receiver.recv_bytes(timeout=0) == b"then"


def test_recv_timeout_expires(pair):
    receiver, sender = pair
    for call in (lambda: receiver.recv_bytes(timeout=0.2), lambda: receiver.recv_bytes_into(bytearray(8), timeout=0.2)):
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            call()
        elapsed = time.monotonic() - t0
        assert 0.19 <= elapsed < 2.0
    sender.send_bytes(b"works afterwards")
    assert receiver.recv_bytes(timeout=LONG) == b"works afterwards"
    assert not receiver.recv_in_progress


def test_recv_timeout_none_blocks_until_data(pair):
    receiver, sender = pair
    # The clock starts before the sender's timer: under load, starting the
    # thread may take a while, which must not count as the receive's wait.
    t0 = time.monotonic()
    worker = delayed(0.2, sender.send_bytes, b"late", timeout=LONG, on_error=sender.close)
    assert receiver.recv_bytes(timeout=None) == b"late"
    assert time.monotonic() - t0 >= 0.15
    worker.finish()
    worker = delayed(0.2, sender.send_bytes, b"later", on_error=sender.close)
    buf = bytearray(5)
    assert receiver.recv_bytes_into(buf) == 5
    assert buf == b"later"
    worker.finish()


@pytest.mark.parametrize("timeout", [-1, -0.001, -1e9, float("-inf")])
def test_negative_timeout_like_zero(pair, timeout):
    receiver, sender = pair
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        receiver.recv_bytes(timeout=timeout)
    assert time.monotonic() - t0 < 1.0
    sender.send_bytes(b"data", timeout=timeout)
    assert receiver.recv_bytes(timeout=timeout) == b"data"
    assert not receiver.poll(timeout)


@pytest.mark.parametrize("huge", [1e9, float("inf")])
def test_huge_timeout(pair, huge):
    receiver, sender = pair
    sender.send_bytes(b"ready", timeout=huge)
    t0 = time.monotonic()
    assert receiver.poll(huge) is True
    assert receiver.recv_bytes(timeout=huge) == b"ready"
    assert time.monotonic() - t0 < 1.0
    worker = delayed(0.2, sender.send_bytes, b"late", timeout=huge, on_error=sender.close)
    assert receiver.recv_bytes(timeout=huge) == b"late"
    worker.finish()
    assert not receiver.poll(0)


@full_buffer_takes_nothing
def test_send_timeouts(pair):
    receiver, sender = pair
    sent, pending = fill(sender)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        sender.send_bytes(b"x", timeout=0)
    with pytest.raises(TimeoutError):
        sender.send_bytes(b"x", timeout=-1)
    assert time.monotonic() - t0 < 1.0
    for call in (
        lambda: sender.send_bytes(b"x", timeout=0.2),
        lambda: sender.send_parts([b"x"], timeout=0.2),
        lambda: sender.send_bytes(payload(MiB), timeout=0.2),
    ):
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            call()
        assert 0.19 <= time.monotonic() - t0 < 2.0
    assert sender.send_pending == pending
    worker = start(drain, receiver, len(sent) + 1, on_error=receiver.close)
    sender.flush(timeout=LONG)
    sender.send_bytes(b"end", timeout=LONG)
    got = worker.finish()
    assert got == sent + [b"end"]


def test_flush_timeout(pair):
    receiver, sender = pair
    data = payload(4 * MiB, seed=3)
    with pytest.raises(TimeoutError):
        sender.send_bytes(data, timeout=0.1)
    pending = sender.send_pending
    assert pending > 0
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        sender.flush(timeout=0.2)
    assert 0.19 <= time.monotonic() - t0 < 2.0
    with pytest.raises(TimeoutError):
        sender.flush(timeout=0)
    assert sender.send_pending == pending
    worker = start(drain, receiver, 1, on_error=receiver.close)
    sender.flush()
    assert sender.send_pending == 0
    sender.flush(timeout=0)  # no-op
    assert_same(worker.finish()[0], data)


def test_recv_deadline_covers_whole_call(raw_writer):
    """A message trickling in keeps the receive busy; the deadline still ends
    it after the timeout, not after the timeout per syscall."""
    reader, raw = raw_writer
    data = payload(1000, seed=4)
    stop = threading.Event()

    def trickle():
        raw.write(header(1000))
        for i in range(1000):
            if stop.is_set():
                return i
            raw.write(data[i : i + 1])
            time.sleep(0.02)
        return 1000

    worker = start(trickle)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        reader.recv_bytes(timeout=0.5)
    elapsed = time.monotonic() - t0
    stop.set()
    written = worker.finish()
    assert 0.45 <= elapsed < 2.0
    raw.write(data[written:])
    assert_same(reader.recv_bytes(timeout=LONG), data)


def test_send_deadline_covers_whole_call(raw_reader):
    """A reader draining slowly keeps the send busy; the deadline still ends
    it after the timeout."""
    writer, raw = raw_reader
    data = payload(4 * MiB, seed=5)
    stop = threading.Event()
    chunks = []

    def slow_reader():
        while not stop.is_set():
            select.select([raw.fd], [], [], 0.02)
            try:
                chunks.append(os.read(raw.fd, 4096))
            except BlockingIOError:
                pass
            time.sleep(0.02)

    os.set_blocking(raw.fd, False)
    worker = start(slow_reader)
    t0 = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            writer.send_bytes(data, timeout=0.5)
        elapsed = time.monotonic() - t0
    finally:
        stop.set()
        worker.finish()
    assert 0.45 <= elapsed < 2.0
    os.set_blocking(raw.fd, True)
    rest = start(read_exactly, raw.fd, 4 + len(data) - sum(map(len, chunks)), on_error=raw.close)
    writer.flush(timeout=LONG)
    assert_same(b"".join(chunks) + rest.finish(), frame(data))


# --------------------------------------------------------------------------
# partial receives resumed


def _partial_message(raw, reader, first=300, total=1000, via="bytes"):
    data = payload(total, seed=first)
    raw.write(header(total) + data[:first])
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        if via == "bytes":
            reader.recv_bytes(timeout=0.1)
        else:
            reader.recv_bytes_into(bytearray(total + 50), 5, timeout=0.1)
    assert 0.09 <= time.monotonic() - t0 < 2.0
    assert reader.recv_in_progress
    assert not reader.poll(0)  # nothing new on the descriptor
    return data


@pytest.mark.parametrize("via", ["bytes", "into"])
def test_partial_receive_completed_by_recv_bytes(raw_writer, via):
    reader, raw = raw_writer
    data = _partial_message(raw, reader, via=via)
    raw.write(data[300:] + frame(b"next"))
    assert reader.poll(0)
    assert_same(reader.recv_bytes(), data)
    assert not reader.recv_in_progress
    assert reader.recv_bytes(timeout=LONG) == b"next"


@pytest.mark.parametrize("via", ["bytes", "into"])
def test_partial_receive_completed_by_recv_bytes_into(raw_writer, via):
    reader, raw = raw_writer
    data = _partial_message(raw, reader, via=via)
    raw.write(data[300:])
    # a different buffer and offset from the one that timed out
    buf = bytearray(b"\xee" * 1200)
    assert reader.recv_bytes_into(buf, 100, timeout=LONG) == 1000
    assert_same(buf[100:1100], data)
    assert buf[:100] == b"\xee" * 100 and buf[1100:] == b"\xee" * 100
    assert not reader.recv_in_progress


@pytest.mark.parametrize("via", ["bytes", "into"])
def test_partial_receive_completed_into_short_buffer(raw_writer, via):
    reader, raw = raw_writer
    data = _partial_message(raw, reader, via=via)
    raw.write(data[300:] + frame(b"next"))
    with pytest.raises(BufferTooShort) as info:
        reader.recv_bytes_into(bytearray(500), timeout=LONG)
    assert info.value.args == (data,)
    assert reader.recv_bytes(timeout=LONG) == b"next"


def test_partial_receive_does_not_pin_callers_buffer(raw_writer):
    """The part of a message received into the caller's buffer is kept by the
    channel: the caller may resize or drop that buffer before the rest comes."""
    reader, raw = raw_writer
    data = payload(1000, seed=21)
    raw.write(header(1000) + data[:300])
    first = bytearray(2000)
    with pytest.raises(TimeoutError) as caught:
        reader.recv_bytes_into(first, timeout=0.05)
    # The exception (and its traceback) is still alive here: no frame of the
    # call may hold an export of the buffer.
    assert caught.value is not None
    first += b"x" * 100000  # no export of it may remain
    first[:] = b"\xee" * len(first)
    del first
    raw.write(data[300:])
    assert_same(reader.recv_bytes(timeout=LONG), data)


def test_partial_receive_then_message_too_long(raw_writer):
    reader, raw = raw_writer
    data = _partial_message(raw, reader)
    with pytest.raises(MessageTooLong):
        reader.recv_bytes(10, timeout=0.05)
    raw.write(data[300:])
    with pytest.raises(MessageTooLong):
        reader.recv_bytes(999, timeout=LONG)
    assert_same(reader.recv_bytes(1000, timeout=LONG), data)


def test_partial_receive_many_timeouts(raw_writer):
    reader, raw = raw_writer
    data = payload(5000, seed=6)
    stream = long_header(5000) + data
    for i in range(0, len(stream), 500):
        raw.write(stream[i : i + 500])
        if i + 500 < len(stream):
            with pytest.raises(TimeoutError):
                if i % 1000:
                    reader.recv_bytes(timeout=0)
                else:
                    reader.recv_bytes_into(bytearray(6000), timeout=0.01)
    assert_same(reader.recv_bytes(timeout=0), data)


@pytest.mark.parametrize("split", [1, 2, 3, 5, 11])
def test_partial_header_resumed(raw_writer, split):
    reader, raw = raw_writer
    stream = long_header(3) + b"abc" if split > 3 else header(3) + b"abc"
    raw.write(stream[:split])
    with pytest.raises(TimeoutError):
        reader.recv_bytes(timeout=0.05)
    raw.write(stream[split:])
    assert reader.recv_bytes(timeout=LONG) == b"abc"


def test_partial_large_message_resumed(pair):
    receiver, sender = pair
    data = payload(8 * MiB, seed=7)
    worker = start(sender.send_bytes, data, timeout=LONG, on_error=sender.close)
    timeouts = 0
    deadline = time.monotonic() + LONG
    while True:
        assert time.monotonic() < deadline
        try:
            got = receiver.recv_bytes(timeout=0.0005)
            break
        except TimeoutError:
            timeouts += 1
    worker.finish()
    assert_same(got, data)
    assert not receiver.recv_in_progress


# --------------------------------------------------------------------------
# partial sends resumed


@pytest.mark.parametrize("source", ["bytearray", "bytes", "numpy", "memoryview-of-bytearray"])
@pytest.mark.parametrize("resume", ["flush", "next-send"])
def test_partial_send_resumed(pair, source, resume):
    receiver, sender = pair
    original = payload(4 * MiB, seed=8)
    if source == "bytearray":
        buf = bytearray(original)
    elif source == "bytes":
        buf = original
    elif source == "numpy":
        buf = np.frombuffer(original, np.uint8).copy()
    else:
        backing = bytearray(original)
        buf = memoryview(backing)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        sender.send_bytes(buf, timeout=0.2)
    assert 0.19 <= time.monotonic() - t0 < 2.0
    pending = sender.send_pending
    assert 0 < pending < len(original) + 4
    # the caller reuses its memory at once
    if source == "bytearray":
        buf[:] = bytes(len(buf))
        buf += b"resized"  # no export may still pin it
    elif source == "numpy":
        buf[:] = 0
    elif source == "memoryview-of-bytearray":
        buf.release()
        backing[:] = bytes(len(backing))
        backing += b"resized"
    worker = start(drain, receiver, 2, on_error=receiver.close)
    if resume == "flush":
        sender.flush(timeout=LONG)
        assert sender.send_pending == 0
    sender.send_bytes(b"second", timeout=LONG)
    assert sender.send_pending == 0
    got = worker.finish()
    assert_same(got[0], original)
    assert got[1] == b"second"
    assert not receiver.poll(0.05)


@linux_only  # whole 4096-byte frames written with os.write
def test_send_on_full_pipe_with_nothing_pending_sends_nothing(pipe_pair):
    receiver, sender = pipe_pair
    # Fill the pipe behind the channel's back, in whole PIPE_BUF-sized frames.
    sent = []
    while True:
        data = tagged(len(sent), FILL_PAYLOAD_SIZE)
        try:
            os.write(sender.fileno(), frame(data))
        except BlockingIOError:
            break
        sent.append(data)
    for timeout in (0, 0.1):
        with pytest.raises(TimeoutError):
            sender.send_bytes(payload(MiB), timeout=timeout)
        assert sender.send_pending == 0
        with pytest.raises(TimeoutError):
            sender.send_bytes(b"small", timeout=timeout)
        assert sender.send_pending == 0
    sender.flush(timeout=0)  # nothing to flush
    worker = start(drain, receiver, len(sent) + 1, on_error=receiver.close)
    sender.send_bytes(b"follow-up", timeout=LONG)
    got = worker.finish()
    assert got[: len(sent)] == sent
    assert got[-1] == b"follow-up"
    assert not receiver.poll(0.05)


def test_send_pending_counts_unwritten_bytes(raw_reader):
    writer, raw = raw_reader
    data = payload(4 * MiB, seed=22)
    with pytest.raises(TimeoutError):
        writer.send_bytes(data, timeout=0.1)
    pending = writer.send_pending
    os.set_blocking(raw.fd, False)
    written = b""
    while True:
        try:
            chunk = os.read(raw.fd, MiB)
        except BlockingIOError:
            break
        written += chunk
    os.set_blocking(raw.fd, True)
    assert len(written) + pending == 4 + len(data)
    assert writer.send_pending == pending  # reading did not change it
    rest = start(read_exactly, raw.fd, pending, on_error=raw.close)
    writer.flush(timeout=LONG)
    assert writer.send_pending == 0
    assert_same(written + rest.finish(), frame(data))


@full_buffer_takes_nothing
def test_send_that_wrote_nothing_sends_nothing(pair):
    receiver, sender = pair
    sent, pending = fill(sender)
    assert sent
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        sender.send_bytes(b"never" * 1000, timeout=0.2)
    assert 0.19 <= time.monotonic() - t0 < 2.0
    assert sender.send_pending == pending
    with pytest.raises(TimeoutError):
        sender.send_bytes(payload(4 * MiB), timeout=0)
    assert sender.send_pending == pending
    worker = start(drain, receiver, len(sent) + 1, on_error=receiver.close)
    sender.flush(timeout=LONG)
    sender.send_bytes(b"follow-up", timeout=LONG)
    got = worker.finish()
    assert got[: len(sent)] == sent
    assert got[-1] == b"follow-up"
    assert not receiver.poll(0.05)


# --------------------------------------------------------------------------
# property: random sizes, random timeouts on both sides

# Mostly tiny timeouts, so that both sides keep timing out mid-message.
TIMEOUT_CHOICES = st.sampled_from([0, -1, 1e-6, 1e-4, 1e-4, 1e-3, 0, 0.005, 0.02, 0.1])
SIZE_CHOICES = st.integers(0, 100) | st.integers(0, 70 * KiB) | st.integers(0, 300 * KiB)


def _send_one(sender, message, mode, timeout):
    if mode == "bytes":
        sender.send_bytes(message, timeout=timeout)
    elif mode == "bytearray":
        sender.send_bytes(bytearray(message), timeout=timeout)
    else:  # parts
        cut = len(message) // 3
        sender.send_parts([message[:cut], bytearray(message[cut:])], timeout=timeout)


def _sender_loop(sender, messages, timeouts, modes):
    """Send every message once, with random timeouts. Pending rest is flushed
    before each new send, so a TimeoutError tells whether the message was
    committed (send_pending > 0) or not sent at all (retry). Returns the
    number of TimeoutErrors met."""
    tick = iter(timeouts * 1000000)
    mode = iter(modes * 1000000)
    timeouts_met = 0
    for m in messages:
        while True:
            while sender.send_pending:
                try:
                    sender.flush(timeout=next(tick))
                except TimeoutError:
                    timeouts_met += 1
            try:
                _send_one(sender, m, next(mode), next(tick))
            except TimeoutError:
                timeouts_met += 1
                if sender.send_pending:
                    break
                continue
            break
    while sender.send_pending:
        try:
            sender.flush(timeout=next(tick))
        except TimeoutError:
            timeouts_met += 1
    return timeouts_met


def _receiver_loop(receiver, count, timeouts, modes):
    """Receive ``count`` messages with random timeouts, retrying after each
    TimeoutError; mode "pause" sleeps a little instead, so that the sender
    meets a full buffer. Returns (messages, number of TimeoutErrors)."""
    tick = iter(timeouts * 1000000)
    mode = iter(modes * 1000000)
    into = bytearray(300 * KiB + 16)
    got = []
    timeouts_met = 0
    deadline = time.monotonic() + LONG
    while len(got) < count:
        assert time.monotonic() < deadline, "stream stalled after %d messages" % len(got)
        this = next(mode)
        if this == "pause":
            time.sleep(0.002)
            continue
        try:
            if this == "bytes":
                got.append(receiver.recv_bytes(timeout=next(tick)))
            else:
                n = receiver.recv_bytes_into(into, 16, timeout=next(tick))
                got.append(bytes(into[16 : 16 + n]))
        except TimeoutError:
            timeouts_met += 1
    return got, timeouts_met


def _check_stream(got, messages):
    assert len(got) == len(messages)
    for i, (g, m) in enumerate(zip(got, messages)):
        assert len(g) == len(m), "message %d has %d bytes, expected %d" % (i, len(g), len(m))
        assert_same(g, m)


@pytest.mark.slow  # moves a few hundred MiB over all examples
@hypothesis_settings(60)
@given(
    kind=st.sampled_from(["pipe", "socket"]),
    sizes=st.lists(SIZE_CHOICES, min_size=1, max_size=40),
    send_timeouts=st.lists(TIMEOUT_CHOICES, min_size=1, max_size=10),
    recv_timeouts=st.lists(TIMEOUT_CHOICES, min_size=1, max_size=10),
    send_modes=st.lists(st.sampled_from(["bytes", "bytearray", "parts"]), min_size=1, max_size=4),
    recv_modes=st.lists(st.sampled_from(["bytes", "into", "pause"]), max_size=4).map(
        lambda modes: modes + ["into"]
    ),
)
@pytest.mark.timeout(120)
def test_random_timeouts_keep_stream_in_sync(
    channels, kind, sizes, send_timeouts, recv_timeouts, send_modes, recv_modes
):
    messages = [tagged(i, n) for i, n in enumerate(sizes)]
    receiver, sender = channels.pair(kind)
    try:
        worker = start(
            _sender_loop, sender, messages, send_timeouts, send_modes, on_error=sender.close
        )
        got, recv_timeouts_met = _receiver_loop(receiver, len(messages), recv_timeouts, recv_modes)
        send_timeouts_met = worker.finish()
        event("sender timed out: %s" % bool(send_timeouts_met))
        event("receiver timed out: %s" % bool(recv_timeouts_met))
        _check_stream(got, messages)
        assert not receiver.poll(0)
        assert not receiver.recv_in_progress
        assert sender.send_pending == 0
    finally:
        receiver.close()
        sender.close()


def _mixed_sender(sender, messages, kinds, timeouts, methods):
    """Like _sender_loop, with every send method: multipart messages go out
    with send_multipart, plain ones with send_bytes, send_parts or, a few at
    a time, send_many. A TimeoutError commits the message (or the batch)
    exactly when it left a rest pending."""
    tick = iter(timeouts * 1000000)
    method = iter(methods * 1000000)
    i = 0
    while i < len(messages):
        while sender.send_pending:
            try:
                sender.flush(timeout=next(tick))
            except TimeoutError:
                pass
        how = next(method)
        m = messages[i]
        if kinds[i] == "multipart":
            call, count = (lambda t: sender.send_multipart(_split(m), timeout=t)), 1
        elif how == "many":
            count = 1
            while count < 3 and i + count < len(messages) and kinds[i + count] == "plain":
                count += 1
            batch = [bytearray(x) for x in messages[i : i + count]]
            call = lambda t: sender.send_many(batch, timeout=t)  # noqa: E731
        elif how == "parts":
            call, count = (lambda t: sender.send_parts(_split(m), timeout=t)), 1
        else:
            call, count = (lambda t: sender.send_bytes(bytearray(m), timeout=t)), 1
        try:
            call(next(tick))
        except TimeoutError:
            if not sender.send_pending:
                continue  # nothing went out: send it again
        i += count
    while sender.send_pending:
        try:
            sender.flush(timeout=next(tick))
        except TimeoutError:
            pass


def _split(m):
    cut = len(m) // 3
    return [m[:cut], bytearray(m[cut:])]


def _mixed_receiver(receiver, count, timeouts, modes):
    """Receive ``count`` messages with every receive method and random
    timeouts; a multipart message refused by a plain receive is taken with
    recv_message next. Returns the items as the methods return them."""
    tick = iter(timeouts * 1000000)
    mode = iter(modes * 1000000)
    into = bytearray(300 * KiB + 16)
    chunk = bytearray(50 * KiB)
    got = []
    streamed = None  # bytes of a message being streamed
    streamed_length = 0
    deadline = time.monotonic() + LONG
    force_message = False
    while len(got) < count:
        assert time.monotonic() < deadline, "stream stalled after %d messages" % len(got)
        this = "message" if force_message else next(mode)
        force_message = False
        try:
            if streamed is not None:
                n = receiver.recv_chunk_into(chunk, timeout=next(tick))
                streamed += chunk[:n]
                if len(streamed) == streamed_length:
                    got.append(bytes(streamed))
                    streamed = None
            elif this == "pause":
                time.sleep(0.002)
            elif this == "bytes":
                got.append(receiver.recv_bytes(timeout=next(tick)))
            elif this == "into":
                n = receiver.recv_bytes_into(into, 16, timeout=next(tick))
                got.append(bytes(into[16 : 16 + n]))
            elif this == "message":
                got.append(receiver.recv_message(timeout=next(tick)))
            elif this == "many":
                max_bytes = [16, 1000, 65536, MiB][len(got) % 4]
                got.extend(receiver.recv_many(max_bytes, timeout=next(tick)))
            else:  # stream
                streamed_length = receiver.recv_begin(timeout=next(tick))
                streamed = bytearray()
                if streamed_length == 0:
                    got.append(b"")
                    streamed = None
        except TimeoutError:
            pass
        except MultipartMessageError:
            force_message = True
    return got


@hypothesis_settings(40)
@given(
    kind=st.sampled_from(["pipe", "socket"]),
    sizes=st.lists(SIZE_CHOICES, min_size=1, max_size=30),
    data=st.data(),
    send_timeouts=st.lists(TIMEOUT_CHOICES, min_size=1, max_size=10),
    recv_timeouts=st.lists(TIMEOUT_CHOICES, min_size=1, max_size=10),
    methods=st.lists(st.sampled_from(["bytes", "parts", "many"]), min_size=1, max_size=5),
    modes=st.lists(
        st.sampled_from(["bytes", "into", "message", "many", "stream", "pause"]), max_size=6
    ).map(lambda modes: modes + ["message"]),
)
def _random_mixed_api(channels, kind, sizes, data, send_timeouts, recv_timeouts, methods, modes):
    kinds = data.draw(
        st.lists(st.sampled_from(["plain", "multipart"]), min_size=len(sizes), max_size=len(sizes))
    )
    messages = [tagged(i, n) for i, n in enumerate(sizes)]
    receiver, sender = channels.pair(kind)
    try:
        worker = start(
            _mixed_sender, sender, messages, kinds, send_timeouts, methods, on_error=sender.close
        )
        got = _mixed_receiver(receiver, len(messages), recv_timeouts, modes)
        worker.finish()
        assert len(got) == len(messages)
        for i, (g, m, k) in enumerate(zip(got, messages, kinds)):
            if k == "multipart":
                assert isinstance(g, list), "message %d should be multipart" % i
                assert len(g) == 2
                assert_same(g[0], m[: len(m) // 3])
                assert_same(g[1], m[len(m) // 3 :])
            else:
                assert type(g) is bytes, "message %d should be plain" % i
                assert_same(g, m)
        assert not receiver.poll(0)
        assert not receiver.recv_in_progress
        assert sender.send_pending == 0
    finally:
        receiver.close()
        sender.close()


@pytest.mark.slow  # moves a few hundred MiB over all examples
@pytest.mark.timeout(120)
def test_random_mixed_api_keeps_stream_in_sync(channels):
    # Checked before Hypothesis runs: a missing method would otherwise cost
    # a long search for the "smallest" failing example.
    for name in ("send_multipart", "send_many", "recv_message", "recv_many", "recv_begin"):
        assert hasattr(channels.core.Channel, name), "Channel has no %s()" % name
    _random_mixed_api(channels)


def test_tiny_timeouts_keep_stream_in_sync(pair):
    """The same with settings that surely time out on both sides."""
    receiver, sender = pair
    rng = random.Random(5)
    messages = [tagged(i, rng.choice([0, 7, 70 * KiB, 300 * KiB])) for i in range(40)]
    worker = start(
        _sender_loop, sender, messages, [1e-4, 0, 1e-3], ["bytes", "parts", "bytearray"],
        on_error=sender.close,
    )
    got, recv_timeouts_met = _receiver_loop(
        receiver, len(messages), [1e-4, 0, 1e-3], ["bytes", "pause", "into", "pause"]
    )
    send_timeouts_met = worker.finish()
    _check_stream(got, messages)
    assert send_timeouts_met > 0 and recv_timeouts_met > 0
    assert not receiver.poll(0)


# --------------------------------------------------------------------------
# signals


class _AlarmHandler:
    """Installs a SIGALRM handler and ITIMER_REAL; restores both on exit."""

    def __init__(self, handler, delay, interval=0.0):
        self.handler, self.delay, self.interval = handler, delay, interval

    def __enter__(self):
        self.old = signal.signal(signal.SIGALRM, self.handler)
        signal.setitimer(signal.ITIMER_REAL, self.delay, self.interval)
        return self

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.old)
        return False


def _watchdog(delay, fn, *args):
    """Unblocks a call the test expected to be interrupted, so a bug fails
    the test instead of hanging it."""
    timer = threading.Timer(delay, fn, args)
    timer.daemon = True
    timer.start()
    return timer


# pytest-timeout's default method also uses SIGALRM: these tests use the
# thread method so the test owns the signal.
signal_test = pytest.mark.timeout(60, method="thread")


@signal_test
def test_signal_interrupts_blocked_recv(pair):
    receiver, sender = pair
    dog = _watchdog(10, lambda: sender.send_bytes(b"watchdog", timeout=5))
    try:
        with _AlarmHandler(_raise_alarm, 0.2):
            t0 = time.monotonic()
            with pytest.raises(Alarm):
                receiver.recv_bytes()
            elapsed = time.monotonic() - t0
    finally:
        dog.cancel()
    assert 0.15 <= elapsed < 5.0
    assert not receiver.recv_in_progress
    sender.send_bytes(b"after", timeout=LONG)
    assert receiver.recv_bytes(timeout=LONG) == b"after"


@signal_test
def test_signal_interrupts_blocked_recv_mid_message(raw_writer):
    reader, raw = raw_writer
    data = payload(1000, seed=10)
    raw.write(header(1000) + data[:300])
    dog = _watchdog(10, raw.write, data[300:])
    try:
        with _AlarmHandler(_raise_alarm, 0.2):
            with pytest.raises(Alarm):
                reader.recv_bytes_into(bytearray(1000))
    finally:
        dog.cancel()
    assert reader.recv_in_progress
    raw.write(data[300:] + frame(b"next"))
    assert_same(reader.recv_bytes(timeout=LONG), data)
    assert reader.recv_bytes(timeout=LONG) == b"next"


@signal_test
def test_signal_interrupts_blocked_send_mid_message(pair):
    receiver, sender = pair
    data = payload(4 * MiB, seed=11)
    buf = bytearray(data)
    dog = _watchdog(10, drain, receiver, 1)
    try:
        with _AlarmHandler(_raise_alarm, 0.2):
            t0 = time.monotonic()
            with pytest.raises(Alarm):
                sender.send_bytes(buf)
            elapsed = time.monotonic() - t0
    finally:
        dog.cancel()
    assert 0.15 <= elapsed < 5.0
    # part of the message went out before the signal: the rest is kept
    assert 0 < sender.send_pending < len(data) + 4
    buf[:] = bytes(len(buf))
    worker = start(drain, receiver, 2, on_error=receiver.close)
    sender.flush(timeout=LONG)
    sender.send_bytes(b"after", timeout=LONG)
    got = worker.finish()
    assert_same(got[0], data)
    assert got[1] == b"after"


@full_buffer_takes_nothing
@signal_test
def test_signal_interrupts_blocked_send_on_full_buffer(pair):
    receiver, sender = pair
    sent, pending = fill(sender)
    dog = _watchdog(10, drain, receiver, len(sent))
    try:
        with _AlarmHandler(_raise_alarm, 0.2):
            with pytest.raises(Alarm):
                sender.send_bytes(b"interrupted" * 1000)
    finally:
        dog.cancel()
    assert sender.send_pending == pending  # nothing of the new message
    worker = start(drain, receiver, len(sent) + 1, on_error=receiver.close)
    sender.flush(timeout=LONG)
    sender.send_bytes(b"after", timeout=LONG)
    got = worker.finish()
    assert got[: len(sent)] == sent
    assert got[-1] == b"after"
    assert not receiver.poll(0.05)


class _Counter:
    def __init__(self):
        self.count = 0

    def __call__(self, signum, frame):
        self.count += 1


@signal_test
def test_returning_handler_does_not_end_recv(pair):
    receiver, sender = pair
    counter = _Counter()
    with _AlarmHandler(counter, 0.05, 0.05):
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            receiver.recv_bytes(timeout=0.5)
        elapsed = time.monotonic() - t0
    assert 0.45 <= elapsed < 5.0
    assert counter.count > 1
    sender.send_bytes(b"ok", timeout=LONG)
    assert receiver.recv_bytes(timeout=LONG) == b"ok"


@signal_test
def test_returning_handler_does_not_end_blocking_recv(pair):
    receiver, sender = pair
    counter = _Counter()
    worker = delayed(0.5, sender.send_bytes, b"late", timeout=LONG, on_error=sender.close)
    with _AlarmHandler(counter, 0.05, 0.05):
        t0 = time.monotonic()
        got = receiver.recv_bytes(timeout=None)
        elapsed = time.monotonic() - t0
    worker.finish()
    assert got == b"late"
    assert elapsed >= 0.4
    assert counter.count > 1


@full_buffer_takes_nothing
@signal_test
def test_returning_handler_does_not_end_send(pair):
    receiver, sender = pair
    sent, pending = fill(sender)
    counter = _Counter()
    with _AlarmHandler(counter, 0.05, 0.05):
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            sender.send_bytes(b"blocked", timeout=0.5)
        elapsed = time.monotonic() - t0
    assert 0.45 <= elapsed < 5.0
    assert counter.count > 1
    assert sender.send_pending == pending
    reader = start(drain, receiver, len(sent), on_error=receiver.close)
    sender.flush(timeout=LONG)
    assert reader.finish() == sent
    assert not receiver.poll(0.05)


@signal_test
def test_returning_handler_does_not_end_poll(pair):
    receiver, sender = pair
    counter = _Counter()
    with _AlarmHandler(counter, 0.05, 0.05):
        t0 = time.monotonic()
        assert receiver.poll(0.5) is False
        elapsed = time.monotonic() - t0
    assert 0.45 <= elapsed < 5.0
    assert counter.count > 1


# --------------------------------------------------------------------------
# threads


def _thread_message(tid, seq, size):
    off = (tid * 7919 + seq * 104729) % (len(BLOB) - size)
    return struct.pack("<III", tid, seq, size) + BLOB[off : off + size - 12]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_concurrent_senders(pair):
    receiver, sender = pair
    threads, per_thread = 4, 200

    def send_all(tid):
        rng = random.Random(tid)
        for seq in range(per_thread):
            sender.send_bytes(_thread_message(tid, seq, rng.randint(12, 200 * KiB)), timeout=LONG)

    workers = [start(send_all, tid, on_error=sender.close) for tid in range(threads)]
    next_seq = [0] * threads
    for _ in range(threads * per_thread):
        m = receiver.recv_bytes(timeout=LONG)
        assert len(m) >= 12
        tid, seq, size = struct.unpack("<III", m[:12])
        assert tid < threads and len(m) == size
        assert seq == next_seq[tid], "thread %d: got message %d, expected %d" % (tid, seq, next_seq[tid])
        assert m == _thread_message(tid, seq, size)
        next_seq[tid] += 1
    for w in workers:
        w.finish()
    assert next_seq == [per_thread] * threads
    assert not receiver.poll(0)


@pytest.mark.timeout(120)
def test_concurrent_receivers(pair):
    receiver, sender = pair
    count = 400
    rng = random.Random(1)
    sizes = [rng.randint(12, 100 * KiB) for _ in range(count)]

    def send_all():
        for seq, size in enumerate(sizes):
            sender.send_bytes(_thread_message(0, seq, size), timeout=LONG)
        sender.close()  # end of file tells the receivers to stop

    def receive_all():
        seqs = []
        while True:
            try:
                m = receiver.recv_bytes(timeout=LONG)
            except EOFError:
                return seqs
            _, seq, size = struct.unpack("<III", m[:12])
            assert len(m) == size == sizes[seq]
            assert m == _thread_message(0, seq, size)
            seqs.append(seq)

    receivers = [start(receive_all, on_error=receiver.close) for _ in range(4)]
    sending = start(send_all, on_error=sender.close)
    sending.finish()
    results = [r.finish() for r in receivers]
    everything = sorted(s for seqs in results for s in seqs)
    assert everything == list(range(count))
    for seqs in results:
        assert seqs == sorted(seqs)  # each receiver sees the stream's order


def test_lock_wait_counts_against_recv_deadline(pair):
    receiver, sender = pair
    blocked = start(receiver.recv_bytes, timeout=None, on_error=receiver.close)
    time.sleep(0.1)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        receiver.recv_bytes(timeout=0.2)
    assert time.monotonic() - t0 < 2.0
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        receiver.recv_bytes(timeout=0)
    assert time.monotonic() - t0 < 1.0
    sender.send_bytes(b"for the first", timeout=LONG)
    assert blocked.finish() == b"for the first"


def test_lock_wait_counts_against_send_deadline(pair):
    receiver, sender = pair
    data = payload(4 * MiB, seed=13)
    blocked = start(sender.send_bytes, data, timeout=None, on_error=sender.close)
    time.sleep(0.2)
    assert blocked.is_alive()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        sender.send_bytes(b"must not go", timeout=0.2)
    assert time.monotonic() - t0 < 2.0
    reader = start(drain, receiver, 2, on_error=receiver.close)
    blocked.finish()
    sender.send_bytes(b"second", timeout=LONG)
    got = reader.finish()
    assert_same(got[0], data)
    assert got[1] == b"second"


def _direction_is_free(receiver, sender):
    """Nothing holds or waits for either direction: a receive on the empty
    channel times out on the descriptor, not on another thread, and a
    message goes through."""
    with pytest.raises(TimeoutError, match="receiving"):
        receiver.recv_bytes(timeout=0)
    sender.send_bytes(b"after", timeout=0)
    assert receiver.recv_bytes(timeout=LONG) == b"after"


@pytest.mark.timeout(120)
def test_lock_waiters_that_time_out_leave_the_direction_consistent(pair):
    # Receivers with short timeouts give up waiting for the receive lock
    # while others hand it over: no message may be lost or duplicated, and
    # afterwards nothing may still count as holding or waiting.
    receiver, sender = pair
    count = 3000
    stop = threading.Event()
    messages = [b"m%06d" % i for i in range(count)]

    def send_all():
        rng = random.Random(5)
        for m in messages:
            sender.send_bytes(m, timeout=LONG)
            if rng.random() < 0.02:
                time.sleep(0.001)

    def receive_some(seed):
        rng = random.Random(seed)
        got, timeouts = [], 0
        while not stop.is_set():
            try:
                got.append(receiver.recv_bytes(timeout=rng.choice((0, 0.00005, 0.0001, 0.0003, 0.002))))
            except TimeoutError:
                timeouts += 1
        return got, timeouts

    receivers = [start(receive_some, seed, on_error=receiver.close) for seed in range(6)]
    sending = start(send_all, on_error=sender.close)
    sending.finish()
    deadline = time.monotonic() + LONG
    results = []
    try:
        while time.monotonic() < deadline:
            time.sleep(0.05)
            if not receiver.poll(0):
                break
    finally:
        stop.set()
        results = [r.finish() for r in receivers]
    everything = sorted(m for got, _ in results for m in got)
    assert everything == messages
    assert sum(t for _, t in results) > 0  # the waits really timed out
    _direction_is_free(receiver, sender)


@signal_test
def test_raising_handler_ends_a_wait_for_the_receive_lock(pair):
    # The main thread waits for the receive lock that another thread holds
    # (blocked on the empty channel). A signal handler that raises ends
    # that wait with its exception; the holder is not disturbed, and once it
    # is done the direction is free.
    receiver, sender = pair
    holder = start(receiver.recv_bytes, timeout=1.0)
    time.sleep(0.1)

    def interrupt(signum, frame):
        raise _Interrupted

    with _AlarmHandler(interrupt, 0.2):
        with pytest.raises(_Interrupted):
            receiver.recv_bytes(timeout=LONG)
    # The wait ended while the holder still held the receive side (it
    # gives up only at its own deadline): not after taking it over.
    assert holder.is_alive()
    with pytest.raises(TimeoutError, match="receiving"):
        holder.finish()
    _direction_is_free(receiver, sender)


class _Interrupted(Exception):
    pass


def test_blocked_recv_releases_gil(pair):
    receiver, sender = pair
    blocked = start(receiver.recv_bytes, timeout=1.0)
    time.sleep(0.05)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.2:
        pass
    # The main thread ran Python code while the other one waited in recv.
    assert blocked.is_alive()
    with pytest.raises(TimeoutError):
        blocked.finish()


def test_blocked_send_releases_gil(pair):
    receiver, sender = pair
    fill(sender)
    blocked = start(sender.send_bytes, b"x" * 100000, timeout=1.0)
    time.sleep(0.05)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.2:
        pass
    assert blocked.is_alive()
    with pytest.raises(TimeoutError):
        blocked.finish()


# --------------------------------------------------------------------------
# poll


def test_poll_empty(pair):
    receiver, sender = pair
    assert receiver.poll() is False
    assert receiver.poll(0) is False
    assert receiver.poll(-1) is False


def test_poll_never_consumes(pair):
    receiver, sender = pair
    sender.send_bytes(b"first")
    sender.send_bytes(b"second")
    for _ in range(3):
        assert receiver.poll() is True
        assert receiver.poll(0.1) is True
    assert receiver.recv_bytes(timeout=LONG) == b"first"
    assert receiver.poll(1e9) is True
    assert receiver.recv_bytes(timeout=LONG) == b"second"
    assert receiver.poll() is False


def test_poll_true_at_eof(pair):
    receiver, sender = pair
    sender.close()
    assert receiver.poll(LONG) is True
    assert receiver.poll() is True
    with pytest.raises(EOFError):
        receiver.recv_bytes(timeout=LONG)
    assert receiver.poll() is True


def test_poll_none_blocks_until_data(pair):
    receiver, sender = pair
    worker = delayed(0.2, sender.send_bytes, b"late", timeout=LONG, on_error=sender.close)
    t0 = time.monotonic()
    assert receiver.poll(None) is True
    assert time.monotonic() - t0 >= 0.15
    worker.finish()
    assert receiver.recv_bytes(timeout=LONG) == b"late"


def test_poll_timeout_waits(pair):
    receiver, sender = pair
    t0 = time.monotonic()
    assert receiver.poll(0.2) is False
    assert 0.19 <= time.monotonic() - t0 < 2.0


def test_poll_partial_message(raw_writer):
    reader, raw = raw_writer
    raw.write(header(10) + b"01234")
    assert reader.poll() is True  # bytes are there, even if not a whole message
    with pytest.raises(TimeoutError):
        reader.recv_bytes(timeout=0.05)
    assert reader.poll() is False
    raw.write(b"56789")
    assert reader.poll() is True
    assert reader.recv_bytes(timeout=LONG) == b"0123456789"


# --------------------------------------------------------------------------
# multipart messages, batches, streaming receive


def multipart_frame(parts, readonly=None):
    """A multipart frame as docs/protocol.md specifies it."""
    readonly = readonly or [False] * len(parts)
    out = struct.pack("!iI", -2, len(parts))
    for part, ro in zip(parts, readonly):
        out += struct.pack("!Q", len(part) | ((1 << 63) if ro else 0))
    return out + b"".join(bytes(p) for p in parts)


def test_multipart_round_trip(pair):
    receiver, sender = pair
    big_rw = bytearray(payload(3 * MiB, seed=30))
    big_ro = payload(3 * MiB + 1, seed=31)
    parts = [
        b"read-only",
        bytearray(b"writable"),
        np.arange(5, dtype=np.int32),  # writable
        np.frombuffer(b"abcd", np.uint8),  # read-only
        memoryview(b"xview")[1:],  # read-only
        array.array("h", [1, 2, 3]),  # writable
        b"",
        big_rw,
        big_ro,
    ]
    expected_types = [bytes, bytearray, bytearray, bytes, bytes, bytearray, bytes, bytearray, bytes]
    worker = start(sender.send_multipart, parts, timeout=LONG, on_error=sender.close)
    got = receiver.recv_message(timeout=LONG)
    worker.finish()
    assert isinstance(got, list) and len(got) == len(parts)
    for i, (g, p, t) in enumerate(zip(got, parts, expected_types)):
        assert type(g) is t, "part %d is %s, expected %s" % (i, type(g).__name__, t.__name__)
        assert_same(g, memoryview(p).cast("B"))
    sender.send_bytes(b"plain after", timeout=LONG)
    assert receiver.recv_message(timeout=LONG) == b"plain after"


def test_multipart_wire_format(raw_reader):
    writer, raw = raw_reader
    parts = [b"ro", bytearray(b"rw!"), b"", np.arange(2, dtype=np.uint8)]
    writer.send_multipart(parts, timeout=LONG)
    expected = multipart_frame(parts, readonly=[True, False, True, False])
    assert read_exactly(raw.fd, len(expected)) == expected


def test_multipart_handmade_frame(raw_writer):
    reader, raw = raw_writer
    raw.write(
        multipart_frame([b"a", b"", b"ccc"], readonly=[True, False, False])
        + frame(b"plain")
        + multipart_frame([b"only"])
    )
    got = reader.recv_message(timeout=LONG)
    assert got == [b"a", b"", b"ccc"]
    assert [type(x) for x in got] == [bytes, bytearray, bytearray]
    assert reader.recv_message(timeout=LONG) == b"plain"
    assert reader.recv_message(timeout=LONG) == [bytearray(b"only")]


def test_multipart_part_count_limits(core, pair):
    receiver, sender = pair
    for parts in ([], [b"x"] * (core.MAX_PARTS + 1)):
        with pytest.raises(ValueError):
            sender.send_multipart(parts, timeout=LONG)
    assert not receiver.poll(0)
    parts = [bytes([i % 251]) for i in range(core.MAX_PARTS)]
    worker = start(sender.send_multipart, parts, timeout=LONG, on_error=sender.close)
    got = receiver.recv_message(timeout=LONG)
    worker.finish()
    assert got == parts


def test_plain_receives_refuse_multipart(pair):
    receiver, sender = pair
    sender.send_multipart([b"one", bytearray(b"two")])
    sender.send_bytes(b"plain")
    for call in (
        lambda: receiver.recv_bytes(timeout=LONG),
        lambda: receiver.recv_bytes(100, timeout=LONG),
        lambda: receiver.recv_bytes_into(bytearray(100), timeout=LONG),
        lambda: receiver.recv_begin(timeout=LONG),
        lambda: receiver.recv_bytes(timeout=LONG),
    ):
        with pytest.raises(MultipartMessageError):
            call()
    assert receiver.recv_message(timeout=LONG) == [b"one", b"two"]
    assert receiver.recv_bytes(timeout=LONG) == b"plain"


def test_recv_message_maxlength(pair):
    receiver, sender = pair
    sender.send_multipart([b"12345", b"67890"])
    sender.send_bytes(b"abc")
    with pytest.raises(MessageTooLong) as info:
        receiver.recv_message(9, timeout=LONG)
    assert info.value.length == 10
    assert receiver.recv_message(10, timeout=LONG) == [b"12345", b"67890"]
    with pytest.raises(MessageTooLong):
        receiver.recv_message(2, timeout=LONG)
    assert receiver.recv_message(3, timeout=LONG) == b"abc"
    with pytest.raises(ValueError):
        receiver.recv_message(-1, timeout=LONG)


def test_multipart_counts_against_max_message_size(channels):
    reader, raw = channels.raw_writer(max_message_size=100)
    raw.write(multipart_frame([b"a" * 50, b"b" * 50]) + multipart_frame([b"a" * 60, b"b" * 41]))
    assert reader.recv_message(timeout=LONG) == [b"a" * 50, b"b" * 50]
    with pytest.raises(FrameError):
        reader.recv_message(timeout=LONG)
    assert_broken(reader)


@pytest.mark.parametrize(
    "hdr",
    [
        struct.pack("!iI", -2, 0),
        struct.pack("!iI", -2, 65537),
        struct.pack("!iI", -2, 2**32 - 1),
        struct.pack("!iIQQ", -2, 2, 2**62, 2**62),  # adds up to 2**63
        struct.pack("!iIQQQ", -2, 3, 2**62, 2**62, 2**62),
    ],
    ids=["no-parts", "too-many-parts", "2**32-1-parts", "sum-2**63", "sum-3*2**62"],
)
def test_multipart_hostile_header(raw_writer, hdr):
    reader, raw = raw_writer
    raw.write(hdr)
    tracemalloc.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(FrameError):
            reader.recv_message(timeout=LONG)
        elapsed = time.monotonic() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 2.0
    assert peak < MiB
    assert_broken(reader)


def test_multipart_readonly_bit_is_not_length(raw_writer):
    reader, raw = raw_writer
    raw.write(struct.pack("!iIQQ", -2, 2, (1 << 63) | 5, 2) + b"hello" + b"hi")
    got = reader.recv_message(timeout=LONG)
    assert got == [b"hello", b"hi"]
    assert [type(x) for x in got] == [bytes, bytearray]


@pytest.mark.parametrize("cut", [2, 4, 6, 8, 12, 20, 24, 27, 30])
def test_multipart_truncated(raw_writer, cut):
    reader, raw = raw_writer
    whole = multipart_frame([b"abc", b"defgh"])  # 8 + 16 + 8 bytes
    raw.write(whole[:cut])
    raw.close()
    with pytest.raises(TruncatedMessageError):
        reader.recv_message(timeout=LONG)
    assert_broken(reader)


def test_multipart_partial_receive_resumed(raw_writer):
    reader, raw = raw_writer
    parts = [payload(700, seed=32), payload(900, seed=33)]
    whole = multipart_frame(parts, readonly=[True, False])
    for cut in (6, 20, 500, len(whole) - 1):
        raw.write(whole[:cut])
        with pytest.raises(TimeoutError):
            reader.recv_message(timeout=0.05)
        assert reader.recv_in_progress
        raw.write(whole[cut:])
        got = reader.recv_message(timeout=LONG)
        assert got == parts
        assert [type(x) for x in got] == [bytes, bytearray]
        assert not reader.recv_in_progress


def test_multipart_partial_send_resumed(pair):
    receiver, sender = pair
    originals = [payload(2 * MiB, seed=34), payload(2 * MiB, seed=35)]
    parts = [bytearray(originals[0]), np.frombuffer(originals[1], np.uint8).copy()]
    with pytest.raises(TimeoutError):
        sender.send_multipart(parts, timeout=0.1)
    assert sender.send_pending > 0
    parts[0][:] = bytes(len(parts[0]))
    parts[0] += b"resized"
    parts[1][:] = 0
    worker = start(lambda: [receiver.recv_message(timeout=LONG) for _ in range(2)], on_error=receiver.close)
    sender.flush(timeout=LONG)
    sender.send_bytes(b"after", timeout=LONG)
    got = worker.finish()
    assert len(got[0]) == 2
    assert_same(got[0][0], originals[0])
    assert_same(got[0][1], originals[1])
    assert got[1] == b"after"


def test_send_many(pair):
    receiver, sender = pair
    batch = [b"a", bytearray(b"bc"), b"", memoryview(b"xdefx")[1:4], np.arange(3, dtype=np.uint16)]
    sender.send_many(batch, timeout=LONG)
    sender.send_bytes(b"after", timeout=LONG)
    for item in batch:
        assert receiver.recv_bytes(timeout=LONG) == bytes(memoryview(item).cast("B"))
    assert receiver.recv_bytes(timeout=LONG) == b"after"
    assert not receiver.poll(0)


def test_send_many_wire_format(raw_reader):
    writer, raw = raw_reader
    batch = [b"one", b"", bytearray(b"three")]
    writer.send_many(batch, timeout=LONG)
    expected = b"".join(frame(m) for m in batch)
    assert read_exactly(raw.fd, len(expected)) == expected


def test_send_many_timeout_keeps_whole_batch(pair):
    receiver, sender = pair
    originals = [payload(3 * MiB, seed=36), b"small", payload(MiB, seed=37), b""]
    batch = [bytearray(m) for m in originals]
    with pytest.raises(TimeoutError):
        sender.send_many(batch, timeout=0.1)
    assert sender.send_pending > 0
    for m in batch:
        m[:] = b"\0" * len(m)
    worker = start(drain, receiver, len(originals) + 1, on_error=receiver.close)
    sender.flush(timeout=LONG)
    assert sender.send_pending == 0
    sender.send_bytes(b"after", timeout=LONG)
    got = worker.finish()
    for g, m in zip(got, originals):
        assert_same(g, m)
    assert got[-1] == b"after"


def test_recv_many(pair):
    receiver, sender = pair
    messages = [b"%010d" % i for i in range(10)]  # 14-byte frames
    for m in messages:
        sender.send_bytes(m)
    assert receiver.recv_many(16, timeout=LONG) == messages[:1]
    assert receiver.recv_bytes(timeout=LONG) == messages[1]  # the cut message
    assert receiver.recv_many(28, timeout=LONG) == messages[2:4]
    assert receiver.recv_many(timeout=LONG) == messages[4:]
    assert not receiver.poll(0)
    assert not receiver.recv_in_progress


def test_recv_many_mixed_and_large(pair):
    receiver, sender = pair
    big = payload(2 * MiB, seed=38)
    sender.send_bytes(b"plain")
    sender.send_multipart([b"m1", bytearray(b"m2")])
    worker = start(sender.send_bytes, big, timeout=LONG, on_error=sender.close)
    got = receiver.recv_many(timeout=LONG)
    while len(got) < 3:
        got += receiver.recv_many(timeout=LONG)
    worker.finish()
    assert got[0] == b"plain"
    assert got[1] == [b"m1", b"m2"]
    assert_same(got[2], big)
    assert len(got) == 3


def test_recv_many_errors(pair):
    receiver, sender = pair
    with pytest.raises(ValueError):
        receiver.recv_many(15)
    with pytest.raises(TimeoutError):
        receiver.recv_many(timeout=0)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        receiver.recv_many(timeout=0.2)
    assert 0.19 <= time.monotonic() - t0 < 2.0
    sender.send_bytes(b"last")
    sender.close()
    assert receiver.recv_many(timeout=LONG) == [b"last"]
    with pytest.raises(EOFError):
        receiver.recv_many(timeout=LONG)


def test_streaming_receive(pair):
    receiver, sender = pair
    data = payload(3 * MiB + 5, seed=39)
    worker = start(sender.send_bytes, data, timeout=LONG, on_error=sender.close)
    assert receiver.recv_begin(timeout=LONG) == len(data)
    chunk = bytearray(100 * KiB)
    got = bytearray()
    while len(got) < len(data):
        n = receiver.recv_chunk_into(chunk, timeout=LONG)
        assert 1 <= n <= len(chunk)
        got += chunk[:n]
    worker.finish()
    assert_same(got, data)
    with pytest.raises(ValueError):
        receiver.recv_chunk_into(chunk, timeout=LONG)
    sender.send_bytes(b"next")
    assert receiver.recv_bytes(timeout=LONG) == b"next"


def test_streaming_blocks_other_receives(pair):
    receiver, sender = pair
    sender.send_bytes(b"0123456789")
    sender.send_bytes(b"later")
    assert receiver.recv_begin(timeout=LONG) == 10
    buf = bytearray(4)
    assert receiver.recv_chunk_into(buf, timeout=LONG) == 4 and buf == b"0123"
    for call in (
        lambda: receiver.recv_bytes(timeout=LONG),
        lambda: receiver.recv_bytes_into(bytearray(100), timeout=LONG),
        lambda: receiver.recv_message(timeout=LONG),
        lambda: receiver.recv_many(timeout=LONG),
    ):
        with pytest.raises(ValueError):
            call()
    rest = bytearray()
    while len(rest) < 6:
        n = receiver.recv_chunk_into(buf, timeout=LONG)
        rest += buf[:n]
    assert rest == b"456789"
    assert receiver.recv_bytes(timeout=LONG) == b"later"


def test_streaming_errors(pair):
    receiver, sender = pair
    with pytest.raises(ValueError):
        receiver.recv_chunk_into(bytearray(10), timeout=0)
    sender.send_bytes(b"x" * 100)
    with pytest.raises(MessageTooLong):
        receiver.recv_begin(10, timeout=LONG)
    assert receiver.recv_bytes(timeout=LONG) == b"x" * 100
    sender.send_bytes(b"")
    assert receiver.recv_begin(timeout=LONG) == 0  # nothing to take: done
    with pytest.raises(ValueError):
        receiver.recv_chunk_into(bytearray(10), timeout=0)
    with pytest.raises(TimeoutError):
        receiver.recv_begin(timeout=0)


def test_streaming_after_interrupted_receive(raw_writer):
    reader, raw = raw_writer
    data = _partial_message(raw, reader)  # header + 300 of 1000 bytes held
    raw.write(data[300:])
    assert reader.recv_begin(timeout=LONG) == 1000
    got = bytearray()
    chunk = bytearray(128)
    while len(got) < 1000:
        got += chunk[: reader.recv_chunk_into(chunk, timeout=LONG)]
    assert_same(got, data)
    assert not reader.recv_in_progress


def test_streaming_chunk_timeout_resumed(raw_writer):
    reader, raw = raw_writer
    data = payload(1000, seed=40)
    raw.write(header(1000) + data[:300])
    assert reader.recv_begin(timeout=LONG) == 1000
    got = bytearray()
    chunk = bytearray(2000)
    while len(got) < 300:
        got += chunk[: reader.recv_chunk_into(chunk, timeout=LONG)]
    assert len(got) == 300
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        reader.recv_chunk_into(chunk, timeout=0.1)
    assert 0.09 <= time.monotonic() - t0 < 2.0
    raw.write(data[300:] + frame(b"next"))
    while len(got) < 1000:
        got += chunk[: reader.recv_chunk_into(chunk, timeout=LONG)]
    assert_same(got, data)
    assert reader.recv_bytes(timeout=LONG) == b"next"


# --------------------------------------------------------------------------
# fork


@pytest.mark.parametrize("size", [10, 3 * MiB])
def test_fork_child_sends(pair, size):
    receiver, sender = pair
    data = payload(size, seed=14)
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            sender.send_bytes(data, timeout=20)
            sender.send_bytes(b"from child %d" % os.getpid(), timeout=20)
            code = 0
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    try:
        got = receiver.recv_bytes(timeout=LONG)
        tail = receiver.recv_bytes(timeout=LONG)
    finally:
        status = wait_child(pid)
    assert status == 0
    assert_same(got, data)
    assert tail == b"from child %d" % pid


def test_fork_child_receives(pair):
    receiver, sender = pair
    data = payload(2 * MiB, seed=15)
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            got = receiver.recv_bytes(timeout=20)
            code = 0 if got == data else 3
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    try:
        sender.send_bytes(data, timeout=LONG)
    finally:
        status = wait_child(pid)
    assert status == 0
    assert not receiver.poll(0)  # the child took the message
