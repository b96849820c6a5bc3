"""Tests of the core's newer methods: multipart messages (send_multipart,
recv_message), batches (send_many, recv_many), the streaming receive
(recv_begin, recv_chunk_into), and the Connection features built on them.

The core tests run once per core ("cython", "python") over real pipes and
socket pairs; hand-written frames go in through a raw pipe end. The
Connection tests run against the core bigipc._backend picked, and their ids
name it. Every receive made by the test code carries a timeout and every
helper thread is joined with a bound and checked to have ended, so a bug
fails a test instead of hanging the run.
"""

import io
import multiprocessing.connection
import os
import pickle
import select
import signal
import socket
import struct
import threading
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bigipc
from bigipc._errors import (
    FrameError,
    MessageTooLong,
    MultipartMessageError,
    TruncatedMessageError,
)

pytestmark = pytest.mark.timeout(120)

# Bound for calls expected to complete: far above what they need.
LONG = 30.0
# Bound for joining helper threads.
JOIN = 60.0
# Bound for calls that must fail at once (a broken stream, a refused call):
# short enough that a core that waits instead fails the test quickly.
BRIEF = 0.5
# How much later than its deadline a timed-out call may return.
SLACK = 5.0

KiB = 1 << 10
MiB = 1 << 20

READONLY_BIT = 1 << 63
MAX_PARTS = 65536  # checked against both cores in test_max_parts_constant


def hypothesis_settings(max_examples):
    # The function-scoped fixture is the channel factory: every example
    # builds (and the factory closes) its own channels.
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


# --------------------------------------------------------------------------
# helpers


_payload_cache = {}


def payload(n, seed=0):
    """n pseudo-random bytes; different seeds give different contents."""
    key = (n, seed)
    if key not in _payload_cache:
        if len(_payload_cache) > 16:
            _payload_cache.clear()
        _payload_cache[key] = np.random.default_rng(seed).bytes(n)
    return _payload_cache[key]


def assert_same(got, expected):
    """Compare two (possibly huge) byte strings without pytest diffing them."""
    got = bytes(got)
    expected = bytes(expected)
    if got == expected:
        return
    n = min(len(got), len(expected))
    diff = np.flatnonzero(np.frombuffer(got, np.uint8, n) != np.frombuffer(expected, np.uint8, n))
    first = int(diff[0]) if len(diff) else n
    pytest.fail(
        "messages differ: got %d bytes, expected %d; first difference at byte %d"
        % (len(got), len(expected), first)
    )


def as_bytes(buffer):
    """The bytes a buffer (of any item type) holds."""
    return bytes(memoryview(buffer).cast("B"))


def header(n):
    return struct.pack("!i", n)


def long_header(n):
    return struct.pack("!iQ", -1, n)


def frame(data, long=False):
    return (long_header(len(data)) if long else header(len(data))) + bytes(data)


def multipart_frame(parts, readonly=None):
    """A multipart frame as docs/protocol.md specifies it."""
    readonly = readonly or [False] * len(parts)
    out = struct.pack("!iI", -2, len(parts))
    for part, ro in zip(parts, readonly):
        out += struct.pack("!Q", len(part) | (READONLY_BIT if ro else 0))
    return out + b"".join(bytes(p) for p in parts)


def multipart_header(lengths):
    """The fixed header and length table of a multipart frame, lengths given
    as raw 64-bit table words."""
    return struct.pack("!iI", -2, len(lengths)) + b"".join(struct.pack("!Q", n) for n in lengths)


def expected_parts(parts, readonly):
    """What recv_message returns for a multipart message of these parts."""
    return [bytes(p) if ro else bytearray(p) for p, ro in zip(parts, readonly)]


def assert_message(got, expected):
    """``got`` equals ``expected`` in content and in kind: bytes for a plain
    message, a list of bytes / bytearray parts for a multipart one."""
    if isinstance(expected, list):
        assert type(got) is list, "expected a multipart message, got %s" % type(got).__name__
        assert len(got) == len(expected), "got %d parts, expected %d" % (len(got), len(expected))
        for i, (g, e) in enumerate(zip(got, expected)):
            assert type(g) is type(e), "part %d is %s, expected %s" % (
                i, type(g).__name__, type(e).__name__)
            assert_same(g, e)
    else:
        assert type(got) is bytes, "expected bytes, got %s" % type(got).__name__
        assert_same(got, expected)


def assert_messages(got, expected):
    assert len(got) == len(expected), "got %d messages, expected %d" % (len(got), len(expected))
    for i, (g, e) in enumerate(zip(got, expected)):
        try:
            assert_message(g, e)
        except BaseException as exc:
            raise AssertionError("message %d: %s" % (i, exc)) from None


class Worker(threading.Thread):
    """Runs fn(*args, **kwargs) in a daemon thread; finish() joins with a
    bound, asserts the thread ended, re-raises its exception or returns its
    result. ``on_error`` (closing the channel the thread used) makes the
    main thread's call on the peer end at once instead of at its timeout."""

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
    """Reports the error of a helper thread the test did not get to finish()."""
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


def recv_many_until(receiver, count, max_bytes=65536, timeout=LONG):
    """Call recv_many until at least ``count`` messages arrived, checking
    that every call returns a non-empty list."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        left = deadline - time.monotonic()
        assert left > 0, "only %d of %d messages arrived" % (len(got), count)
        batch = receiver.recv_many(max_bytes, timeout=left)
        assert type(batch) is list, "recv_many returned %s" % type(batch).__name__
        assert batch, "recv_many returned an empty list"
        got.extend(batch)
    return got


def read_exactly(fd, n, timeout=LONG):
    """Read n bytes from a raw (blocking) descriptor, with an overall deadline."""
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


def read_available(fd):
    """Everything a raw descriptor holds right now."""
    out = bytearray()
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while poller.poll(0):
        chunk = os.read(fd, MiB)
        if not chunk:
            break
        out += chunk
    return bytes(out)


def assert_broken(reader, error=FrameError):
    """Every receive raises ``error`` at once, whatever follows on the wire,
    and poll() reports the channel ready so a waiting reader sees it."""
    calls = {
        "recv_message": lambda: reader.recv_message(timeout=BRIEF),
        "recv_bytes": lambda: reader.recv_bytes(timeout=BRIEF),
        "recv_bytes_into": lambda: reader.recv_bytes_into(bytearray(64), timeout=BRIEF),
        "recv_many": lambda: reader.recv_many(65536, timeout=BRIEF),
        "recv_begin": lambda: reader.recv_begin(timeout=BRIEF),
        "recv_message again": lambda: reader.recv_message(timeout=BRIEF),
    }
    for name, call in calls.items():
        with pytest.raises(error) as info:
            call()
        assert isinstance(info.value, error), name
    assert reader.poll(0) is True


def fill(sender, size=4092):
    """Send ``size``-byte frames (header included: 4096 bytes, one pipe page,
    all or nothing for a pipe) with timeout 0 until the kernel buffer takes no
    more. Returns (messages committed to the stream, send_pending)."""
    sent = []
    while True:
        data = struct.pack("!I", len(sent)) + payload(size - 4, seed=len(sent) % 7)
        try:
            sender.send_bytes(data, timeout=0)
        except TimeoutError:
            pending = sender.send_pending
            if pending:
                sent.append(data)
            return sent, pending
        sent.append(data)
        assert len(sent) < 100000, "the buffer never filled up"


def test_max_parts_constant(core):
    assert core.MAX_PARTS == MAX_PARTS
    assert core.MULTIPART_HEADER == -2


# --------------------------------------------------------------------------
# send_multipart / recv_message


PART_SIZES = [0, 1, 64 * KiB, 3 * MiB]
PART_SIZE_IDS = ["0", "1", "64KiB", "3MiB"]


def make_part(kind, data):
    """(part object, sent from read-only memory?) holding ``data``."""
    if kind == "bytes":
        return data, True
    if kind == "memoryview-of-bytes":
        return memoryview(data), True
    if kind == "readonly-memoryview-of-bytearray":
        return memoryview(bytearray(data)).toreadonly(), True
    if kind == "bytearray":
        return bytearray(data), False
    if kind == "memoryview-of-bytearray":
        return memoryview(bytearray(data)), False
    if kind == "numpy":
        return np.frombuffer(data, np.uint8).copy(), False
    if kind == "numpy-float64":
        n = len(data) - len(data) % 8
        return np.frombuffer(data[:n], np.float64).copy(), False
    if kind == "numpy-readonly":
        array = np.frombuffer(data, np.uint8).copy()
        array.flags.writeable = False
        return array, True
    raise ValueError(kind)


PART_KINDS = [
    "bytes",
    "memoryview-of-bytes",
    "readonly-memoryview-of-bytearray",
    "bytearray",
    "memoryview-of-bytearray",
    "numpy",
    "numpy-float64",
    "numpy-readonly",
]


def send_and_receive(receiver, sender, parts):
    """send_multipart in a thread (the data may exceed the kernel buffer),
    recv_message here."""
    worker = start(sender.send_multipart, parts, timeout=LONG, on_error=sender.close)
    got = receiver.recv_message(timeout=LONG)
    worker.finish()
    return got


@pytest.mark.parametrize("kind", PART_KINDS)
@pytest.mark.parametrize("size", PART_SIZES, ids=PART_SIZE_IDS)
def test_multipart_part_size_and_kind(pair, size, kind):
    receiver, sender = pair
    part, readonly = make_part(kind, payload(size, seed=size % 97))
    parts = [b"head", part, bytearray(b"tail")]
    got = send_and_receive(receiver, sender, parts)
    expected = [b"head", as_bytes(part) if readonly else bytearray(as_bytes(part)), bytearray(b"tail")]
    assert_message(got, expected)
    assert not receiver.recv_in_progress
    assert not receiver.poll(0)


def test_multipart_every_size_and_kind_in_one_message(pair):
    receiver, sender = pair
    parts, expected = [], []
    for i, size in enumerate(PART_SIZES):
        for j, kind in enumerate(PART_KINDS):
            if size == 3 * MiB and j % 2:
                continue  # keep the message at about 12 MiB
            part, readonly = make_part(kind, payload(size, seed=10 * i + j))
            parts.append(part)
            expected.append(as_bytes(part) if readonly else bytearray(as_bytes(part)))
    got = send_and_receive(receiver, sender, parts)
    assert_message(got, expected)
    sender.send_bytes(b"after", timeout=LONG)
    assert receiver.recv_message(timeout=LONG) == b"after"


def test_multipart_single_empty_part(pair):
    receiver, sender = pair
    sender.send_multipart([b""], timeout=LONG)
    sender.send_multipart([bytearray()], timeout=LONG)
    assert_message(receiver.recv_message(timeout=LONG), [b""])
    assert_message(receiver.recv_message(timeout=LONG), [bytearray()])
    assert not receiver.poll(0)


def test_multipart_max_parts_all_empty(core, pair):
    receiver, sender = pair
    # 512 KiB of length table and nothing else: more than a pipe holds.
    parts = [b"" if i % 2 else bytearray() for i in range(core.MAX_PARTS)]
    got = send_and_receive(receiver, sender, parts)
    assert len(got) == core.MAX_PARTS
    assert all(type(g) is type(p) and len(g) == 0 for g, p in zip(got, parts))
    sender.send_bytes(b"after", timeout=LONG)
    assert receiver.recv_bytes(timeout=LONG) == b"after"


def test_multipart_parts_from_any_iterable(pair):
    receiver, sender = pair
    sender.send_multipart((p for p in [b"gen", bytearray(b"erator")]), timeout=LONG)
    sender.send_multipart((b"tu", b"ple"), timeout=LONG)
    assert_message(receiver.recv_message(timeout=LONG), [b"gen", bytearray(b"erator")])
    assert_message(receiver.recv_message(timeout=LONG), [b"tu", b"ple"])


def test_multipart_received_parts_are_independent_objects(pair):
    receiver, sender = pair
    sender.send_multipart([bytearray(b"same"), bytearray(b"same")], timeout=LONG)
    got = receiver.recv_message(timeout=LONG)
    got[0][0:1] = b"X"
    assert got == [bytearray(b"Xame"), bytearray(b"same")]


@pytest.mark.parametrize("count", [0, MAX_PARTS + 1, MAX_PARTS + 1000], ids=["0", "MAX+1", "MAX+1000"])
def test_multipart_part_count_out_of_range(pair, count):
    receiver, sender = pair
    with pytest.raises(ValueError):
        sender.send_multipart([b"x"] * count, timeout=LONG)
    assert sender.send_pending == 0
    assert not receiver.poll(0), "a refused multipart message put bytes on the wire"
    sender.send_bytes(b"in sync", timeout=LONG)
    assert receiver.recv_message(timeout=LONG) == b"in sync"


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda: "text", id="str"),
        pytest.param(lambda: 12, id="int"),
        pytest.param(lambda: None, id="None"),
        pytest.param(lambda: np.arange(10)[::2], id="non-contiguous"),
    ],
)
def test_multipart_bad_part_sends_nothing(pair, bad):
    receiver, sender = pair
    with pytest.raises((TypeError, ValueError, BufferError)):
        sender.send_multipart([b"good", bad(), b"good"], timeout=LONG)
    assert sender.send_pending == 0
    assert not receiver.poll(0)
    sender.send_multipart([b"next"], timeout=LONG)
    assert_message(receiver.recv_message(timeout=LONG), [b"next"])


@pytest.mark.parametrize("size", [0, 1, 100, 70 * KiB, 3 * MiB], ids=str)
def test_recv_message_plain_is_bytes(pair, size):
    receiver, sender = pair
    data = payload(size, seed=1)
    worker = start(sender.send_bytes, bytearray(data), timeout=LONG, on_error=sender.close)
    got = receiver.recv_message(timeout=LONG)
    worker.finish()
    assert_message(got, data)


def test_recv_message_long_header_plain(raw_writer):
    reader, raw = raw_writer
    raw.write(frame(b"long form", long=True) + frame(b"", long=True))
    assert_message(reader.recv_message(timeout=LONG), b"long form")
    assert_message(reader.recv_message(timeout=LONG), b"")


def test_recv_message_alternating_kinds(pair):
    receiver, sender = pair
    sent = []
    for i in range(50):
        if i % 3 == 0:
            parts = [b"%d" % i, bytearray(b"x" * i)]
            sender.send_multipart(parts, timeout=LONG)
            sent.append([parts[0], parts[1]])
        else:
            sender.send_bytes(b"plain %d" % i, timeout=LONG)
            sent.append(b"plain %d" % i)
    assert_messages([receiver.recv_message(timeout=LONG) for _ in sent], sent)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda r: r.recv_bytes(timeout=LONG), id="recv_bytes"),
        pytest.param(lambda r: r.recv_bytes(1 << 30, timeout=LONG), id="recv_bytes-maxlength"),
        pytest.param(lambda r: r.recv_bytes(timeout=0), id="recv_bytes-timeout-0"),
        pytest.param(lambda r: r.recv_bytes_into(bytearray(64 * KiB), timeout=LONG), id="recv_bytes_into"),
        pytest.param(lambda r: r.recv_bytes_into(bytearray(1), timeout=LONG), id="recv_bytes_into-short"),
        pytest.param(lambda r: r.recv_begin(timeout=LONG), id="recv_begin"),
    ],
)
def test_plain_receive_refuses_multipart_message_kept(pair, call):
    receiver, sender = pair
    parts = [b"first", bytearray(payload(1000, seed=2)), b""]
    sender.send_multipart(parts, timeout=LONG)
    sender.send_bytes(b"plain after", timeout=LONG)
    for _ in range(3):
        with pytest.raises(MultipartMessageError):
            call(receiver)
    assert_message(receiver.recv_message(timeout=LONG), [b"first", bytearray(parts[1]), b""])
    assert receiver.recv_bytes(timeout=LONG) == b"plain after"
    assert not receiver.recv_in_progress


def test_recv_bytes_into_refusing_multipart_leaves_buffer_alone(pair):
    receiver, sender = pair
    sender.send_multipart([b"abc", b"def"], timeout=LONG)
    buf = bytearray(b"untouched")
    with pytest.raises(MultipartMessageError):
        receiver.recv_bytes_into(buf, timeout=LONG)
    assert buf == b"untouched"
    assert receiver.recv_message(timeout=LONG) == [b"abc", b"def"]


def test_plain_receive_refuses_large_multipart_being_sent(pair):
    """The refusal comes from the header alone; the payload, still being
    written by the sender, is then received whole."""
    receiver, sender = pair
    big = payload(3 * MiB, seed=3)
    worker = start(sender.send_multipart, [big, b"x"], timeout=LONG, on_error=sender.close)
    with pytest.raises(MultipartMessageError):
        receiver.recv_bytes(timeout=LONG)
    with pytest.raises(MultipartMessageError):
        receiver.recv_bytes_into(bytearray(4 * MiB), timeout=LONG)
    got = receiver.recv_message(timeout=LONG)
    worker.finish()
    assert_message(got, [big, b"x"])


@pytest.mark.parametrize("cut", [4, 6, 8, 12, 24, 30, 40], ids=lambda c: "cut%d" % c)
def test_plain_receive_on_partial_multipart(raw_writer, cut):
    reader, raw = raw_writer
    parts = [b"0123456789", payload(20, seed=4)]
    whole = multipart_frame(parts, readonly=[True, False])  # header ends at 24
    raw.write(whole[:cut])
    if cut < 24:
        # Too little to know the message's kind and size yet.
        with pytest.raises(TimeoutError):
            reader.recv_bytes(timeout=0.05)
        with pytest.raises(TimeoutError):
            reader.recv_bytes_into(bytearray(100), timeout=0)
    else:
        with pytest.raises(MultipartMessageError):
            reader.recv_bytes(timeout=0)
        with pytest.raises(MultipartMessageError):
            reader.recv_bytes_into(bytearray(100), timeout=0)
    assert reader.recv_in_progress
    raw.write(whole[cut:] + frame(b"next"))
    with pytest.raises(MultipartMessageError):
        reader.recv_bytes(timeout=LONG)
    assert_message(reader.recv_message(timeout=LONG), expected_parts(parts, [True, False]))
    assert reader.recv_bytes(timeout=LONG) == b"next"


def test_recv_message_maxlength_multipart(pair):
    receiver, sender = pair
    big = payload(3 * MiB, seed=5)
    parts = [big, bytearray(b"1")]
    total = len(big) + 1
    worker = start(sender.send_multipart, parts, timeout=LONG, on_error=sender.close)
    for maxlength in (0, 1, total - 1):
        with pytest.raises(MessageTooLong) as info:
            receiver.recv_message(maxlength, timeout=LONG)
        assert info.value.length == total
        assert info.value.maxlength == maxlength
    got = receiver.recv_message(total, timeout=LONG)
    worker.finish()
    assert_message(got, [big, bytearray(b"1")])
    assert not receiver.recv_in_progress


def test_recv_message_maxlength_plain(pair):
    receiver, sender = pair
    sender.send_bytes(b"12345", timeout=LONG)
    with pytest.raises(MessageTooLong) as info:
        receiver.recv_message(4, timeout=LONG)
    assert (info.value.length, info.value.maxlength) == (5, 4)
    assert receiver.recv_message(maxlength=5, timeout=LONG) == b"12345"


def test_recv_message_maxlength_counts_all_parts(pair):
    receiver, sender = pair
    sender.send_multipart([b"aaaa", b"bbbb", b"cc"], timeout=LONG)
    with pytest.raises(MessageTooLong) as info:
        receiver.recv_message(9, timeout=LONG)
    assert info.value.length == 10
    sender.send_multipart([b""], timeout=LONG)
    assert receiver.recv_message(10, timeout=LONG) == [b"aaaa", b"bbbb", b"cc"]
    assert receiver.recv_message(0, timeout=LONG) == [b""]


def test_recv_message_negative_maxlength(pair):
    receiver, sender = pair
    sender.send_multipart([b"kept"], timeout=LONG)
    with pytest.raises(ValueError):
        receiver.recv_message(-1, timeout=LONG)
    assert receiver.recv_message(timeout=LONG) == [b"kept"]


def test_multipart_partial_receive_then_message_too_long(raw_writer):
    reader, raw = raw_writer
    parts = [payload(500, seed=6), payload(500, seed=7)]
    whole = multipart_frame(parts)
    raw.write(whole[:300])
    with pytest.raises(TimeoutError):
        reader.recv_message(timeout=0.05)
    with pytest.raises(MessageTooLong):
        reader.recv_message(999, timeout=0)
    raw.write(whole[300:])
    assert_message(reader.recv_message(1000, timeout=LONG), expected_parts(parts, [False, False]))


def test_multipart_wire_format_readonly_bits(raw_reader):
    writer, raw = raw_reader
    cases = [(kind, make_part(kind, payload(9, seed=i))) for i, kind in enumerate(PART_KINDS)]
    parts = [part for _, (part, _) in cases]
    readonly = [ro for _, (_, ro) in cases]
    writer.send_multipart(parts, timeout=LONG)
    expected = multipart_frame([as_bytes(p) for p in parts], readonly=readonly)
    assert read_exactly(raw.fd, len(expected)) == expected


# --------------------------------------------------------------------------
# hand-written multipart frames


HANDMADE = [
    ([b"one"], [True]),
    ([b"one"], [False]),
    ([b"", b"", b""], [True, False, True]),
    ([b"a", b"bb", b"ccc", b"dddd"], [False, True, False, True]),
    ([bytes(range(256)) * 4, b"", b"\0"], [True, False, False]),
    ([payload(200 * KiB, seed=8), payload(100, seed=9)], [False, True]),
]


@pytest.mark.parametrize("via", ["recv_message", "recv_many"])
@pytest.mark.parametrize("case", HANDMADE, ids=lambda c: "x".join(str(len(p)) for p in c[0]))
def test_handmade_multipart_frame_decoded(raw_writer, case, via):
    reader, raw = raw_writer
    parts, readonly = case
    data = multipart_frame(parts, readonly) + frame(b"plain") + multipart_frame([b"z"], [True])
    writer = start(raw.write, data)
    expected = [expected_parts(parts, readonly), b"plain", [b"z"]]
    if via == "recv_message":
        got = [reader.recv_message(timeout=LONG) for _ in expected]
    else:
        got = recv_many_until(reader, len(expected))
    writer.finish()
    assert_messages(got, expected)
    assert not reader.poll(0)


def test_handmade_multipart_readonly_bit_on_empty_part(raw_writer):
    reader, raw = raw_writer
    raw.write(multipart_header([READONLY_BIT, 0, READONLY_BIT | 2]) + b"hi")
    got = reader.recv_message(timeout=LONG)
    assert_message(got, [b"", bytearray(), b"hi"])


CORRUPT_HEADERS = {
    "count-0": struct.pack("!iI", -2, 0),
    "count-MAX+1": struct.pack("!iI", -2, MAX_PARTS + 1),
    "count-2**31": struct.pack("!iI", -2, 2**31),
    "count-2**32-1": struct.pack("!iI", -2, 2**32 - 1),
    "sum-2**63": multipart_header([2**62, 2**62]),
    "sum-(2**63-1)+1": multipart_header([2**63 - 1, 1]),
    "sum-overflow-readonly": multipart_header([READONLY_BIT | (2**63 - 1), READONLY_BIT | 1]),
    "sum-3*(2**63-1)": multipart_header([2**63 - 1] * 3),
    "sum-wraps-2**64": multipart_header([2**63 - 1, 2**63 - 1, 2]),
    "late-overflow": multipart_header([1] * 1000 + [2**63 - 1]),
}


@pytest.mark.parametrize("via", ["recv_message", "recv_many"])
@pytest.mark.parametrize("name", sorted(CORRUPT_HEADERS))
def test_corrupt_multipart_header_breaks_receive_side(raw_writer, name, via):
    reader, raw = raw_writer
    # Valid frames follow: a core that tried to resynchronise would read them.
    raw.write(CORRUPT_HEADERS[name] + frame(b"valid") + multipart_frame([b"valid"]))
    tracemalloc.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(FrameError) as info:
            if via == "recv_message":
                reader.recv_message(timeout=LONG)
            else:
                reader.recv_many(65536, timeout=LONG)
        elapsed = time.monotonic() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not isinstance(info.value, TruncatedMessageError)
    assert elapsed < SLACK
    assert peak < 2 * MiB, "a corrupt header made the core allocate %d bytes" % peak
    assert_broken(reader)


@pytest.mark.parametrize("via", ["recv_message", "recv_many", "recv_bytes"])
@pytest.mark.parametrize(
    "lengths",
    [
        [2**40],
        [READONLY_BIT | 2**40],
        [500, 501],
        [1, 2**40, 1],
        [200 * MiB],
        [1000, 1],
        [0] * 1000 + [1001],
    ],
    ids=["2**40", "2**40-readonly", "500+501", "1+2**40+1", "200MiB", "1000+1", "zeros+1001"],
)
def test_multipart_above_max_message_size(channels, lengths, via):
    reader, raw = channels.raw_writer(max_message_size=1000)
    raw.write(multipart_header(lengths) + b"x" * 100)
    tracemalloc.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(FrameError) as info:
            getattr(reader, via)(timeout=LONG)
        elapsed = time.monotonic() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not isinstance(info.value, TruncatedMessageError)
    assert elapsed < SLACK
    assert peak < MiB, "an oversized announcement made the core allocate %d bytes" % peak
    assert_broken(reader)


def test_multipart_exactly_max_message_size_accepted(channels):
    reader, raw = channels.raw_writer(max_message_size=1000)
    parts = [payload(600, seed=10), payload(400, seed=11)]
    raw.write(multipart_frame(parts, [True, False]) + multipart_frame([b""] * 5))
    assert_message(reader.recv_message(timeout=LONG), expected_parts(parts, [True, False]))
    assert reader.recv_message(timeout=LONG) == [b""] * 5


@pytest.mark.parametrize("via", ["recv_message", "recv_many", "recv_bytes"])
@pytest.mark.parametrize("cut", [2, 4, 6, 8, 10, 16, 20, 23, 24, 27, 31], ids=lambda c: "cut%d" % c)
def test_eof_inside_multipart_frame_is_truncated(raw_writer, cut, via):
    reader, raw = raw_writer
    whole = multipart_frame([b"abc", b"defgh"])  # 8 + 16 header bytes, then 8
    raw.write(whole[:cut])
    raw.close()
    if via == "recv_bytes" and cut >= 24:
        # The whole header is there: refused as multipart before the
        # truncated payload is met; recv_message then meets it.
        with pytest.raises(MultipartMessageError):
            reader.recv_bytes(timeout=LONG)
        via = "recv_message"
    with pytest.raises(TruncatedMessageError):
        getattr(reader, via)(timeout=LONG)
    assert_broken(reader, TruncatedMessageError)


def test_eof_inside_large_part_table(raw_writer):
    reader, raw = raw_writer
    table = multipart_header([1] * 5000)
    writer = start(raw.write, table[: len(table) - 3])
    with pytest.raises(TimeoutError):
        reader.recv_message(timeout=0.1)
    writer.finish()
    raw.close()
    with pytest.raises(TruncatedMessageError):
        reader.recv_message(timeout=LONG)
    assert_broken(reader, TruncatedMessageError)


SPLIT_PARTS = [b"alpha", b"", payload(300, seed=12), b"z", bytes(9)]
SPLIT_READONLY = [True, False, True, False, False]
SPLIT_FRAME = multipart_frame(SPLIT_PARTS, SPLIT_READONLY)
SPLIT_EXPECTED = expected_parts(SPLIT_PARTS, SPLIT_READONLY)


@pytest.mark.parametrize("completion", ["recv_message", "recv_many-16", "recv_many-64KiB"])
@pytest.mark.parametrize("first", ["recv_message", "recv_many-16", "recv_many-64KiB"])
def test_multipart_split_at_every_offset(raw_writer, first, completion):
    """One channel, the frame split at every byte offset in turn: a receive
    with timeout 0 between the two writes times out, and the next one gets
    the message whole. The channel is reused, so each split also checks that
    the previous message left no state behind."""
    reader, raw = raw_writer

    def receive(how, timeout):
        if how == "recv_message":
            return [reader.recv_message(timeout=timeout)]
        return reader.recv_many(16 if how.endswith("-16") else 65536, timeout=timeout)

    for cut in range(1, len(SPLIT_FRAME)):
        raw.write(SPLIT_FRAME[:cut])
        with pytest.raises(TimeoutError):
            receive(first, 0)
        assert reader.recv_in_progress, "cut %d" % cut
        assert reader.poll(0) is False, "cut %d" % cut
        raw.write(SPLIT_FRAME[cut:] + frame(b"after %d" % cut))
        got = []
        while len(got) < 2:
            batch = receive(completion, LONG)
            assert batch
            got.extend(batch)
        try:
            assert_messages(got, [SPLIT_EXPECTED, b"after %d" % cut])
        except AssertionError as exc:
            raise AssertionError("split at byte %d: %s" % (cut, exc)) from None
        assert not reader.recv_in_progress
        assert not reader.poll(0)


@hypothesis_settings(100)
@given(data=st.data())
def test_multipart_split_into_random_pieces(channels, data):
    stream = SPLIT_FRAME + frame(b"plain") + SPLIT_FRAME
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=12)))
    methods = data.draw(
        st.lists(st.sampled_from(["message", "many16", "many100", "many"]), min_size=1, max_size=5)
    )
    reader, raw = channels.raw_writer()
    try:
        got = []
        method = iter(methods * 1000)
        for a, b in zip([0] + cuts, cuts + [len(stream)]):
            raw.write(stream[a:b])
            while True:
                how = next(method)
                try:
                    if how == "message":
                        got.append(reader.recv_message(timeout=0))
                    else:
                        max_bytes = {"many16": 16, "many100": 100, "many": 65536}[how]
                        batch = reader.recv_many(max_bytes, timeout=0)
                        assert batch
                        got.extend(batch)
                except TimeoutError:
                    break
        assert_messages(got, [SPLIT_EXPECTED, b"plain", SPLIT_EXPECTED])
        assert not reader.recv_in_progress
    finally:
        reader.close()
        raw.close()


# --------------------------------------------------------------------------
# send_many / recv_many


def small_messages(count, seed):
    """``count`` messages of random sizes 0..300, each starting with its
    index where there is room, so that a mix-up shows."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 301, count)
    blob = payload(400 * count + 8, seed=seed)
    out = []
    for i, n in enumerate(sizes):
        body = struct.pack("!I", i) + blob[400 * i : 400 * i + 300]
        out.append(body[:n])
    return out


def send_in_batches(sender, messages, seed):
    rng = np.random.default_rng(seed)
    i = 0
    while i < len(messages):
        n = int(rng.integers(1, 700))
        batch = messages[i : i + n]
        if rng.integers(2):
            batch = [bytearray(m) for m in batch]
        sender.send_many(batch, timeout=LONG)
        i += n


@pytest.mark.parametrize("max_bytes", [16, 100, 4096, 65536])
def test_send_many_recv_many_10000(pair, max_bytes):
    receiver, sender = pair
    messages = small_messages(10000, seed=max_bytes)
    worker = start(send_in_batches, sender, messages, max_bytes, on_error=sender.close)
    got = recv_many_until(receiver, len(messages), max_bytes)
    worker.finish()
    assert_messages(got, messages)
    assert not receiver.recv_in_progress
    assert not receiver.poll(0)


def test_send_many_received_one_by_one(pair):
    receiver, sender = pair
    messages = small_messages(500, seed=1)
    worker = start(send_in_batches, sender, messages, 1, on_error=sender.close)
    got = [receiver.recv_bytes(timeout=LONG) for _ in messages]
    worker.finish()
    assert_messages(got, messages)


def test_send_many_empty_batch_sends_nothing(pair):
    receiver, sender = pair
    sender.send_many([], timeout=LONG)
    sender.send_many(iter([]), timeout=LONG)
    assert not receiver.poll(0)


def test_send_many_buffer_kinds_and_large_items(pair):
    receiver, sender = pair
    big = payload(3 * MiB, seed=13)
    batch = [
        b"",
        memoryview(b"view"),
        np.arange(7, dtype=np.int64),
        bytearray(big),
        b"tail",
        memoryview(bytearray(b"rw view")),
    ]
    worker = start(sender.send_many, batch, timeout=LONG, on_error=sender.close)
    got = recv_many_until(receiver, len(batch), 4096)
    worker.finish()
    assert_messages(got, [as_bytes(m) for m in batch])


def test_send_many_bad_item_sends_nothing(pair):
    receiver, sender = pair
    with pytest.raises((TypeError, ValueError, BufferError)):
        sender.send_many([b"one", b"two", "three"], timeout=LONG)
    assert sender.send_pending == 0
    assert not receiver.poll(0)
    sender.send_many([b"four"], timeout=LONG)
    assert receiver.recv_many(timeout=LONG) == [b"four"]


def test_send_many_wire_format(raw_reader):
    writer, raw = raw_reader
    batch = [b"a", b"", bytearray(b"ccc"), np.arange(4, dtype=np.uint8)]
    writer.send_many(batch, timeout=LONG)
    expected = b"".join(frame(as_bytes(m)) for m in batch)
    assert read_exactly(raw.fd, len(expected)) == expected


def test_recv_many_takes_everything_available_at_once(pair):
    receiver, sender = pair
    messages = [b"m%03d" % i for i in range(100)]
    sender.send_many(messages, timeout=LONG)
    # All 800 bytes sit in the kernel: one call returns every message.
    assert receiver.recv_many(65536, timeout=LONG) == messages
    assert not receiver.poll(0)


@pytest.mark.parametrize("k", [1, 2, 7])
@pytest.mark.parametrize("extra", [0, 1, 4, 9], ids=lambda e: "extra%d" % e)
def test_recv_many_stops_at_max_bytes(pair, k, extra):
    receiver, sender = pair
    messages = [b"%010d" % i for i in range(10)]  # 14-byte frames
    sender.send_many(messages, timeout=LONG)
    max_bytes = max(16, 14 * k + extra)
    complete = max_bytes // 14
    assert receiver.recv_many(max_bytes, timeout=LONG) == messages[:complete]
    # A cut frame is held like an interrupted receive; a whole one is not read.
    assert receiver.recv_in_progress is (max_bytes % 14 != 0)
    rest = [receiver.recv_bytes(timeout=LONG) for _ in messages[complete:]]
    assert rest == messages[complete:]


def _send_mixed(sender, count):
    """Plain, multipart and batched messages interleaved; returns what
    recv_message would return for each."""
    expected = []
    for i in range(count):
        if i % 4 == 0:
            parts = [b"p%d" % i, bytearray(b"q" * (i % 50)), memoryview(b"ro")]
            sender.send_multipart(parts, timeout=LONG)
            expected.append([b"p%d" % i, bytearray(b"q" * (i % 50)), b"ro"])
        elif i % 4 == 1:
            batch = [b"many %d" % i, b""]
            sender.send_many(batch, timeout=LONG)
            expected.extend(batch)
        else:
            sender.send_bytes(b"plain %d" % i, timeout=LONG)
            expected.append(b"plain %d" % i)
    return expected


@pytest.mark.parametrize("max_bytes", [16, 100, 65536])
def test_recv_many_mixed_plain_and_multipart(pair, max_bytes):
    receiver, sender = pair
    # Many small sends can fill a socket's buffer (per-packet overhead).
    worker = start(_send_mixed, sender, 300, on_error=sender.close)
    got = recv_many_until(receiver, 375, max_bytes)
    expected = worker.finish()
    assert_messages(got, expected)
    assert not receiver.poll(0)


def _send_small_big_small(sender, big, big_kind):
    sender.send_many([b"s%d" % i for i in range(50)], timeout=LONG)
    if big_kind == "plain":
        sender.send_bytes(big, timeout=LONG)
    else:
        sender.send_multipart([b"hdr", bytearray(big)], timeout=LONG)
    sender.send_many([b"t%d" % i for i in range(50)], timeout=LONG)


@pytest.mark.parametrize("big_kind", ["plain", "multipart"])
@pytest.mark.parametrize("max_bytes", [16, 4096, 65536, 8 * MiB])
def test_recv_many_large_message_among_small_ones(pair, max_bytes, big_kind):
    receiver, sender = pair
    big = payload(5 * MiB, seed=14)
    worker = start(_send_small_big_small, sender, big, big_kind, on_error=sender.close)
    got = recv_many_until(receiver, 101, max_bytes)
    worker.finish()
    middle = big if big_kind == "plain" else [b"hdr", bytearray(big)]
    assert_messages(got, [b"s%d" % i for i in range(50)] + [middle] + [b"t%d" % i for i in range(50)])


@pytest.mark.parametrize("max_bytes", [15, 8, 1, 0, -1, -(2**40)])
def test_recv_many_max_bytes_below_16(pair, max_bytes):
    receiver, sender = pair
    sender.send_bytes(b"kept", timeout=LONG)
    with pytest.raises(ValueError):
        receiver.recv_many(max_bytes, timeout=LONG)
    with pytest.raises(ValueError):
        receiver.recv_many(max_bytes=max_bytes, timeout=0)
    assert not receiver.recv_in_progress
    assert receiver.recv_many(16, timeout=LONG) == [b"kept"]


def test_recv_many_default_max_bytes(pair):
    receiver, sender = pair
    sender.send_many([b"a", b"b"], timeout=LONG)
    assert receiver.recv_many(timeout=LONG) == [b"a", b"b"]


@pytest.mark.parametrize("timeout", [0, -1, -0.5])
def test_recv_many_empty_channel_does_not_block(pair, timeout):
    receiver, sender = pair
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        receiver.recv_many(65536, timeout=timeout)
    assert time.monotonic() - t0 < SLACK


def test_recv_many_timeout_waits(pair):
    receiver, sender = pair
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        receiver.recv_many(65536, timeout=0.2)
    elapsed = time.monotonic() - t0
    assert 0.19 <= elapsed < 0.2 + SLACK, "returned after %.3f s" % elapsed
    sender.send_bytes(b"still fine", timeout=LONG)
    assert receiver.recv_many(timeout=LONG) == [b"still fine"]


def test_recv_many_waits_for_first_message(pair):
    receiver, sender = pair

    def later():
        time.sleep(0.2)
        sender.send_many([b"late", b"later"], timeout=LONG)

    worker = start(later, on_error=sender.close)
    got = recv_many_until(receiver, 2)
    worker.finish()
    assert got == [b"late", b"later"]


def test_recv_many_timeout_on_partial_message_keeps_it(raw_writer):
    reader, raw = raw_writer
    raw.write(frame(b"whole") + header(10) + b"01234")
    assert reader.recv_many(timeout=LONG) == [b"whole"]
    with pytest.raises(TimeoutError):
        reader.recv_many(timeout=0.05)
    assert reader.recv_in_progress
    raw.write(b"56789")
    assert reader.recv_many(timeout=LONG) == [b"0123456789"]


def test_recv_many_eof_at_boundary(pair):
    receiver, sender = pair
    messages = [b"one", b"", b"three"]
    sender.send_many(messages, timeout=LONG)
    sender.send_multipart([b"four"], timeout=LONG)
    sender.close()
    assert_messages(recv_many_until(receiver, 4), messages + [[b"four"]])
    for _ in range(3):
        with pytest.raises(EOFError):
            receiver.recv_many(timeout=LONG)
    with pytest.raises(EOFError):
        receiver.recv_message(timeout=LONG)


def test_recv_many_eof_on_empty_stream(pair):
    receiver, sender = pair
    sender.close()
    with pytest.raises(EOFError):
        receiver.recv_many(16, timeout=LONG)


TRUNCATIONS = {
    "in-header": header(10)[:2],
    "in-long-header": long_header(10)[:7],
    "in-payload": header(10) + b"01234",
    "after-multipart-word": struct.pack("!i", -2),
    "in-part-table": multipart_header([3, 4])[:13],
    "in-parts": multipart_frame([b"abc", b"defg"])[:-2],
}


@pytest.mark.parametrize("max_bytes", [16, 65536])
@pytest.mark.parametrize("where", sorted(TRUNCATIONS))
def test_recv_many_eof_mid_frame(raw_writer, where, max_bytes):
    reader, raw = raw_writer
    raw.write(frame(b"first") + frame(b"second") + TRUNCATIONS[where])
    raw.close()
    assert recv_many_until(reader, 2, max_bytes) == [b"first", b"second"]
    with pytest.raises(TruncatedMessageError):
        reader.recv_many(max_bytes, timeout=LONG)
    assert_broken(reader, TruncatedMessageError)


@pytest.mark.parametrize("completion", ["recv_bytes", "recv_message", "recv_many"])
@pytest.mark.parametrize("k", [1, 3, 40])
@pytest.mark.parametrize(
    "half",
    ["header", "long-header", "payload", "multipart-word", "part-table", "parts"],
)
def test_recv_many_holds_back_no_complete_message(raw_writer, k, half, completion):
    reader, raw = raw_writer
    messages = [b"msg %d" % i + bytes(i % 5) for i in range(k)]
    complete = b"".join(frame(m) for m in messages)
    last_parts = [b"last part", b"!"]
    if half in ("header", "long-header", "payload"):
        last = frame(b"0123456789", long=half == "long-header")
        expected_last = b"0123456789"
    else:
        last = multipart_frame(last_parts, [True, False])
        expected_last = [b"last part", bytearray(b"!")]
    cut = {"header": 2, "long-header": 7, "payload": 9, "multipart-word": 4,
           "part-table": 12, "parts": len(last) - 3}[half]
    raw.write(complete + last[:cut])
    assert_messages(reader.recv_many(65536, timeout=LONG), messages)
    # Nothing is left in the kernel and no complete message is inside.
    assert reader.poll(0) is False
    assert reader.recv_in_progress is True
    with pytest.raises(TimeoutError):
        reader.recv_many(65536, timeout=0)
    raw.write(last[cut:] + frame(b"next"))
    if isinstance(expected_last, list) and completion == "recv_bytes":
        completion = "recv_message"  # recv_bytes refuses a multipart message
    if completion == "recv_many":
        got = recv_many_until(reader, 2, 16)
    else:
        got = [getattr(reader, completion)(timeout=LONG), reader.recv_bytes(timeout=LONG)]
    assert_messages(got, [expected_last, b"next"])
    assert not reader.recv_in_progress


def _stream_messages(draw_kinds, sizes):
    """(frames, messages as received) for a list of kinds and sizes."""
    frames, expected = [], []
    for i, (kind, size) in enumerate(zip(draw_kinds, sizes)):
        body = (struct.pack("!I", i) + payload(size + 4, seed=i % 5))[:size]
        if kind == "plain":
            frames.append(frame(body))
            expected.append(body)
        elif kind == "long":
            frames.append(frame(body, long=True))
            expected.append(body)
        else:
            parts = [body[: size // 2], body[size // 2 :], b""]
            readonly = [i % 2 == 0, i % 2 == 1, True]
            frames.append(multipart_frame(parts, readonly))
            expected.append(expected_parts(parts, readonly))
    return frames, expected


@hypothesis_settings(150)
@given(data=st.data())
def test_recv_many_no_complete_message_held_back(channels, data):
    """Bytes arrive in random pieces; after each piece recv_many(timeout=0)
    is called until it times out. Then poll() is False, and every message
    whose frame is complete within the bytes written has been returned, in
    order, and no other: nothing complete is ever held inside the channel."""
    count = data.draw(st.integers(1, 30))
    kinds = data.draw(st.lists(st.sampled_from(["plain", "long", "multipart"]), min_size=count, max_size=count))
    sizes = data.draw(st.lists(st.integers(0, 700), min_size=count, max_size=count))
    frames, expected = _stream_messages(kinds, sizes)
    stream = b"".join(frames)
    ends = np.cumsum([len(f) for f in frames]).tolist()
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=15)))
    max_bytes = data.draw(st.sampled_from([16, 17, 31, 100, 1000, 4096, 65536]))
    reader, raw = channels.raw_writer()
    try:
        got = []
        written = 0
        for a, b in zip([0] + cuts, cuts + [len(stream)]):
            raw.write(stream[a:b])  # less than a pipe holds: the reader has drained it
            written = b
            while True:
                try:
                    batch = reader.recv_many(max_bytes, timeout=0)
                except TimeoutError:
                    break
                assert type(batch) is list and batch, "recv_many returned %r" % (batch,)
                got.extend(batch)
            assert reader.poll(0) is False
            complete = sum(1 for end in ends if end <= written)
            assert len(got) == complete, "after %d bytes: %d messages returned, %d complete" % (
                written, len(got), complete)
            assert reader.recv_in_progress is (written not in ends)
        assert_messages(got, expected)
    finally:
        reader.close()
        raw.close()


def test_recv_many_delivers_messages_before_corrupt_frame(raw_writer):
    """Messages complete before a corrupt header are the stream's data: they
    are returned (as recv_message would return them one by one), and only
    then does the broken stream raise FrameError."""
    reader, raw = raw_writer
    raw.write(frame(b"good 1") + multipart_frame([b"good 2"]) + header(-7) + frame(b"lost"))
    got = []
    with pytest.raises(FrameError):
        for _ in range(3):
            got.extend(reader.recv_many(65536, timeout=LONG))
    assert_messages(got, [b"good 1", [bytearray(b"good 2")]])
    assert_broken(reader)


def test_recv_many_delivers_messages_before_oversized_frame(channels):
    reader, raw = channels.raw_writer(max_message_size=100)
    raw.write(frame(b"small") + header(101) + b"x" * 101)
    got = []
    with pytest.raises(FrameError):
        for _ in range(3):
            got.extend(reader.recv_many(65536, timeout=LONG))
    assert got == [b"small"]
    assert_broken(reader)


def test_recv_many_after_message_too_long(pair):
    receiver, sender = pair
    sender.send_bytes(b"0123456789", timeout=LONG)
    sender.send_bytes(b"next", timeout=LONG)
    with pytest.raises(MessageTooLong):
        receiver.recv_message(5, timeout=LONG)
    assert recv_many_until(receiver, 2) == [b"0123456789", b"next"]


def test_recv_many_after_multipart_refused(pair):
    receiver, sender = pair
    sender.send_multipart([b"a", bytearray(b"b")], timeout=LONG)
    sender.send_bytes(b"c", timeout=LONG)
    with pytest.raises(MultipartMessageError):
        receiver.recv_bytes(timeout=LONG)
    assert_messages(recv_many_until(receiver, 2), [[b"a", bytearray(b"b")], b"c"])


@pytest.mark.parametrize("via", ["recv_bytes", "recv_bytes_into", "recv_message"])
def test_recv_many_continues_interrupted_receive(raw_writer, via):
    reader, raw = raw_writer
    data = payload(1000, seed=15)
    raw.write(header(1000) + data[:400])
    with pytest.raises(TimeoutError):
        if via == "recv_bytes_into":
            reader.recv_bytes_into(bytearray(2000), timeout=0.05)
        else:
            getattr(reader, via)(timeout=0.05)
    raw.write(data[400:] + frame(b"after"))
    got = recv_many_until(reader, 2, 16)
    assert_messages(got, [data, b"after"])


@pytest.mark.parametrize("via", ["recv_bytes", "recv_bytes_into", "recv_message"])
def test_receive_continues_after_recv_many_cut(raw_writer, via):
    reader, raw = raw_writer
    data = payload(1000, seed=16)
    raw.write(frame(b"first") + header(1000) + data[:400])
    assert reader.recv_many(65536, timeout=LONG) == [b"first"]
    raw.write(data[400:])
    if via == "recv_bytes_into":
        buf = bytearray(1100)
        assert reader.recv_bytes_into(buf, 50, timeout=LONG) == 1000
        assert_same(buf[50:1050], data)
    else:
        assert_message(getattr(reader, via)(timeout=LONG), data)


# --------------------------------------------------------------------------
# send_many interrupted


def _receive_all(receiver, count):
    return recv_many_until(receiver, count, 65536, timeout=LONG)


@pytest.mark.parametrize("resume", ["flush", "next-send"])
def test_send_many_interrupted_keeps_whole_batch(pair, resume):
    receiver, sender = pair
    originals = small_messages(2000, seed=17) + [payload(4 * MiB, seed=18)] + small_messages(50, seed=19)
    batch = [bytearray(m) for m in originals]
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        sender.send_many(batch, timeout=0.2)
    elapsed = time.monotonic() - t0
    assert 0.19 <= elapsed < 0.2 + SLACK, "returned after %.3f s" % elapsed
    # The kernel buffer was empty, so some of the batch went out.
    pending = sender.send_pending
    assert 0 < pending < sum(len(m) + 4 for m in originals)
    for m in batch:  # the rest was copied: the caller may reuse its buffers
        m[:] = bytes(len(m))
    worker = start(_receive_all, receiver, len(originals) + 1, on_error=receiver.close)
    if resume == "flush":
        sender.flush(timeout=LONG)
        assert sender.send_pending == 0
    sender.send_bytes(b"later", timeout=LONG)
    assert sender.send_pending == 0
    got = worker.finish()
    assert_messages(got, originals + [b"later"])
    assert not receiver.poll(0)


def test_send_many_on_full_buffer(pair):
    receiver, sender = pair
    filled, fill_pending = fill(sender)
    originals = small_messages(3000, seed=20)
    batch = [bytearray(m) for m in originals]
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        sender.send_many(batch, timeout=0.2)
    elapsed = time.monotonic() - t0
    assert 0.19 <= elapsed < 0.2 + SLACK, "returned after %.3f s" % elapsed
    pending = sender.send_pending
    # With bytes of an earlier frame still pending, the batch may not have
    # been started at all; once started, its whole rest is pending.
    committed = pending > fill_pending
    worker = start(_receive_all, receiver, len(filled) + len(originals) + 1, on_error=receiver.close)
    sender.flush(timeout=LONG)
    assert sender.send_pending == 0
    if not committed:
        sender.send_many(batch, timeout=LONG)  # nothing of it went out: send it again
    sender.send_bytes(b"later", timeout=LONG)
    got = worker.finish()
    assert_messages(got, filled + originals + [b"later"])


@pytest.mark.parametrize("timeout", [0, 0.05])
def test_send_many_pending_counts_unsent_bytes(raw_reader, timeout):
    writer, raw = raw_reader
    batch = [payload(n, seed=n) for n in (0, 100, 70 * KiB, 5, 200 * KiB, 1)]
    wire = b"".join(frame(m) for m in batch)
    with pytest.raises(TimeoutError):
        writer.send_many([bytearray(m) for m in batch], timeout=timeout)
    first = read_available(raw.fd)
    assert len(first) > 0
    assert len(first) + writer.send_pending == len(wire)
    rest = len(wire) - len(first)
    worker = start(writer.flush, timeout=LONG, on_error=writer.close)
    second = read_exactly(raw.fd, rest)
    worker.finish()
    assert writer.send_pending == 0
    assert first + second == wire


def test_send_many_interrupted_then_close_truncates(pair):
    receiver, sender = pair
    batch = [payload(300 * KiB, seed=21)] * 20
    with pytest.raises(TimeoutError):
        sender.send_many(batch, timeout=0.05)
    assert sender.send_pending > 0
    sender.close()
    with pytest.raises(TruncatedMessageError):
        recv_many_until(receiver, len(batch) + 1)


# --------------------------------------------------------------------------
# streaming receive


def stream_all(receiver, buffer_size, timeout=LONG, expect=None):
    """recv_begin, then recv_chunk_into until the message is taken."""
    remaining = receiver.recv_begin(timeout=timeout)
    if expect is not None:
        assert remaining == expect
    buf = bytearray(buffer_size)
    out = bytearray()
    while len(out) < remaining:
        n = receiver.recv_chunk_into(buf, timeout=timeout)
        assert 1 <= n <= min(buffer_size, remaining - len(out)), n
        out += buf[:n]
    return bytes(out)


def test_stream_20mib_through_64kib_buffer(pair):
    receiver, sender = pair
    data = payload(20 * MiB, seed=22)
    worker = start(sender.send_bytes, data, timeout=LONG, on_error=sender.close)
    assert receiver.recv_begin(timeout=LONG) == len(data)
    buf = bytearray(64 * KiB)
    view = memoryview(buf)
    out = np.empty(len(data), np.uint8)
    have = 0
    while have < len(data):
        assert receiver.recv_in_progress
        n = receiver.recv_chunk_into(buf, timeout=LONG)
        assert 1 <= n <= len(buf)
        out[have : have + n] = np.frombuffer(view[:n], np.uint8)
        have += n
    worker.finish()
    assert have == len(data)
    assert_same(out.tobytes(), data)
    assert not receiver.recv_in_progress
    with pytest.raises(ValueError):
        receiver.recv_chunk_into(buf, timeout=0)
    sender.send_bytes(b"next", timeout=LONG)
    assert receiver.recv_bytes(timeout=LONG) == b"next"


@pytest.mark.parametrize(
    "make_buffer",
    [
        pytest.param(lambda n: bytearray(n), id="bytearray"),
        pytest.param(lambda n: np.zeros(n, np.uint8), id="numpy"),
        pytest.param(lambda n: memoryview(bytearray(n + 10))[5 : 5 + n], id="memoryview-slice"),
    ],
)
def test_stream_into_buffer_kinds(pair, make_buffer):
    receiver, sender = pair
    data = payload(10000, seed=23)
    sender.send_bytes(data, timeout=LONG)
    buf = make_buffer(333)
    assert receiver.recv_begin(timeout=LONG) == len(data)
    out = bytearray()
    while len(out) < len(data):
        n = receiver.recv_chunk_into(buf, timeout=LONG)
        out += as_bytes(buf)[:n]
    assert_same(out, data)


def test_stream_chunk_never_crosses_into_next_message(pair):
    receiver, sender = pair
    sender.send_bytes(b"0123456789", timeout=LONG)
    sender.send_bytes(b"next message", timeout=LONG)
    assert receiver.recv_begin(timeout=LONG) == 10
    buf = bytearray(64 * KiB)
    out = bytearray()
    while len(out) < 10:
        out += buf[: receiver.recv_chunk_into(buf, timeout=LONG)]
    assert out == b"0123456789"
    assert buf[10:20] == bytes(10)
    assert receiver.recv_bytes(timeout=LONG) == b"next message"


def test_recv_begin_again_returns_remaining(pair):
    receiver, sender = pair
    data = payload(1000, seed=24)
    sender.send_bytes(data, timeout=LONG)
    assert receiver.recv_begin(timeout=LONG) == 1000
    assert receiver.recv_begin(timeout=LONG) == 1000
    buf = bytearray(300)
    out = bytearray()
    while len(out) < 300:
        out += buf[: receiver.recv_chunk_into(memoryview(buf)[: 300 - len(out)], timeout=LONG)]
    assert receiver.recv_begin(timeout=LONG) == 700
    while len(out) < 1000:
        out += buf[: receiver.recv_chunk_into(buf, timeout=LONG)]
    assert_same(out, data)


@pytest.mark.parametrize(
    "name,call",
    [
        ("recv_bytes", lambda r: r.recv_bytes(timeout=LONG)),
        ("recv_bytes-0", lambda r: r.recv_bytes(timeout=0)),
        ("recv_bytes_into", lambda r: r.recv_bytes_into(bytearray(100), timeout=LONG)),
        ("recv_message", lambda r: r.recv_message(timeout=LONG)),
        ("recv_message-0", lambda r: r.recv_message(timeout=0)),
        ("recv_many", lambda r: r.recv_many(65536, timeout=LONG)),
        ("recv_many-16", lambda r: r.recv_many(16, timeout=0)),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_other_receives_refused_while_streaming(pair, name, call):
    receiver, sender = pair
    data = payload(5000, seed=25)
    sender.send_bytes(data, timeout=LONG)
    sender.send_multipart([b"after", bytearray(b"it")], timeout=LONG)
    sender.send_bytes(b"plain after", timeout=LONG)
    assert receiver.recv_begin(timeout=LONG) == len(data)
    buf = bytearray(1000)
    out = bytearray(buf[: receiver.recv_chunk_into(buf, timeout=LONG)])
    for _ in range(2):
        with pytest.raises(ValueError):
            call(receiver)
    assert receiver.recv_in_progress
    while len(out) < len(data):
        out += buf[: receiver.recv_chunk_into(buf, timeout=LONG)]
    assert_same(out, data)
    assert_messages(
        [receiver.recv_message(timeout=LONG), receiver.recv_message(timeout=LONG)],
        [[b"after", bytearray(b"it")], b"plain after"],
    )


def test_other_receives_refused_before_first_chunk(pair):
    receiver, sender = pair
    sender.send_bytes(b"streamed", timeout=LONG)
    assert receiver.recv_begin(timeout=LONG) == 8
    with pytest.raises(ValueError):
        receiver.recv_bytes(timeout=LONG)
    assert stream_all(receiver, 3) == b"streamed"


def test_recv_chunk_into_without_recv_begin(pair):
    receiver, sender = pair
    with pytest.raises(ValueError):
        receiver.recv_chunk_into(bytearray(10), timeout=0)
    with pytest.raises(ValueError):
        receiver.recv_chunk_into(bytearray(10), timeout=LONG)  # refused, not waited for
    sender.send_bytes(b"pending", timeout=LONG)
    with pytest.raises(ValueError):
        receiver.recv_chunk_into(bytearray(10), timeout=LONG)
    assert receiver.recv_bytes(timeout=LONG) == b"pending"


def test_recv_chunk_into_refused_for_held_partial_message(raw_writer):
    reader, raw = raw_writer
    raw.write(header(10) + b"01234")
    with pytest.raises(TimeoutError):
        reader.recv_bytes(timeout=0.05)
    with pytest.raises(ValueError):
        reader.recv_chunk_into(bytearray(10), timeout=LONG)
    raw.write(b"56789")
    assert reader.recv_bytes(timeout=LONG) == b"0123456789"


def test_recv_chunk_into_readonly_buffer(pair):
    receiver, sender = pair
    sender.send_bytes(b"abc", timeout=LONG)
    assert receiver.recv_begin(timeout=LONG) == 3
    with pytest.raises((TypeError, BufferError)):
        receiver.recv_chunk_into(b"readonly", timeout=LONG)
    assert stream_all(receiver, 10) == b"abc"


@pytest.mark.parametrize("next_via", ["recv_bytes", "recv_begin", "recv_many", "recv_message"])
def test_stream_empty_message(pair, next_via):
    receiver, sender = pair
    sender.send_bytes(b"", timeout=LONG)
    sender.send_bytes(b"next", timeout=LONG)
    assert receiver.recv_begin(timeout=LONG) == 0
    assert not receiver.recv_in_progress
    with pytest.raises(ValueError):
        receiver.recv_chunk_into(bytearray(10), timeout=0)
    if next_via == "recv_begin":
        assert stream_all(receiver, 2, expect=4) == b"next"
    elif next_via == "recv_many":
        assert receiver.recv_many(timeout=LONG) == [b"next"]
    else:
        assert getattr(receiver, next_via)(timeout=LONG) == b"next"


def test_recv_begin_timeout_and_eof(pair):
    receiver, sender = pair
    with pytest.raises(TimeoutError):
        receiver.recv_begin(timeout=0)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        receiver.recv_begin(timeout=0.2)
    assert 0.19 <= time.monotonic() - t0 < 0.2 + SLACK
    sender.close()
    with pytest.raises(EOFError):
        receiver.recv_begin(timeout=LONG)


def test_recv_begin_maxlength_keeps_message(pair):
    receiver, sender = pair
    sender.send_bytes(b"x" * 100, timeout=LONG)
    with pytest.raises(MessageTooLong) as info:
        receiver.recv_begin(99, timeout=LONG)
    assert info.value.length == 100
    with pytest.raises(ValueError):
        receiver.recv_chunk_into(bytearray(10), timeout=0)  # not streaming
    with pytest.raises(ValueError):
        receiver.recv_begin(-1, timeout=LONG)
    assert stream_all(receiver, 64, expect=100) == b"x" * 100


def test_stream_interrupted_by_timeout_resumes(raw_writer):
    reader, raw = raw_writer
    data = payload(100000, seed=26)
    raw.write(header(len(data)) + data[:30000])
    assert reader.recv_begin(timeout=LONG) == len(data)
    buf = bytearray(7000)
    out = bytearray()
    while True:
        try:
            n = reader.recv_chunk_into(buf, timeout=0.05)
        except TimeoutError:
            break
        out += buf[:n]
    assert_same(out, data[: len(out)])
    assert len(out) == 30000
    assert reader.recv_in_progress
    assert reader.recv_begin(timeout=0) == len(data) - len(out)
    with pytest.raises(ValueError):
        reader.recv_bytes(timeout=0)  # the interrupted stream still holds the channel
    writer = start(raw.write, data[30000:] + frame(b"next"))
    while len(out) < len(data):
        assert reader.recv_begin(timeout=0) == len(data) - len(out)
        out += buf[: reader.recv_chunk_into(buf, timeout=LONG)]
    writer.finish()
    assert_same(out, data)
    assert reader.recv_bytes(timeout=LONG) == b"next"


def test_stream_header_arrives_late(raw_writer):
    reader, raw = raw_writer
    raw.write(header(10)[:2])
    with pytest.raises(TimeoutError):
        reader.recv_begin(timeout=0.05)
    with pytest.raises(ValueError):
        reader.recv_chunk_into(bytearray(10), timeout=0)  # recv_begin did not start it
    raw.write(header(10)[2:] + b"0123456789")
    assert stream_all(reader, 4, expect=10) == b"0123456789"


@pytest.mark.parametrize("via", ["recv_bytes", "recv_bytes_into", "recv_message", "recv_many"])
@pytest.mark.parametrize("chunk", [100, 300, 5000])
def test_stream_delivers_already_received_bytes_first(raw_writer, via, chunk):
    reader, raw = raw_writer
    data = payload(2000, seed=27)
    raw.write(header(len(data)) + data[:300])
    with pytest.raises(TimeoutError):
        if via == "recv_bytes_into":
            reader.recv_bytes_into(bytearray(4000), timeout=0.05)
        elif via == "recv_many":
            reader.recv_many(65536, timeout=0.05)
        else:
            getattr(reader, via)(timeout=0.05)
    assert reader.recv_in_progress
    assert reader.recv_begin(timeout=0) == len(data)
    buf = bytearray(chunk)
    out = bytearray()
    while len(out) < 300:  # the held bytes come without waiting
        out += buf[: reader.recv_chunk_into(buf, timeout=0)]
    raw.write(data[300:] + frame(b"next"))
    while len(out) < len(data):
        out += buf[: reader.recv_chunk_into(buf, timeout=LONG)]
    assert_same(out, data)
    assert reader.recv_bytes(timeout=LONG) == b"next"


def test_stream_refuses_multipart(pair):
    receiver, sender = pair
    sender.send_multipart([b"one", bytearray(b"two")], timeout=LONG)
    with pytest.raises(MultipartMessageError):
        receiver.recv_begin(timeout=LONG)
    with pytest.raises(ValueError):
        receiver.recv_chunk_into(bytearray(10), timeout=0)
    with pytest.raises(MultipartMessageError):
        receiver.recv_begin(timeout=0)
    assert_message(receiver.recv_message(timeout=LONG), [b"one", bytearray(b"two")])


def test_stream_eof_inside_message(raw_writer):
    reader, raw = raw_writer
    raw.write(header(100) + b"x" * 40)
    raw.close()
    assert reader.recv_begin(timeout=LONG) == 100
    buf = bytearray(64)
    out = bytearray()
    with pytest.raises(TruncatedMessageError):
        while True:
            out += buf[: reader.recv_chunk_into(buf, timeout=LONG)]
    assert out == b"x" * 40
    assert_broken(reader, TruncatedMessageError)


def test_stream_long_header_message(raw_writer):
    reader, raw = raw_writer
    raw.write(frame(b"long form", long=True))
    assert stream_all(reader, 4, expect=9) == b"long form"


def test_stream_above_max_message_size(channels):
    reader, raw = channels.raw_writer(max_message_size=1000)
    raw.write(header(1001) + b"x" * 1001)
    with pytest.raises(FrameError):
        reader.recv_begin(timeout=LONG)
    assert_broken(reader)


# --------------------------------------------------------------------------
# Connection (the core bigipc._backend picked)


def _conn_id(kind):
    return "%s-%s" % (bigipc.IMPLEMENTATION, kind)


@pytest.fixture(params=["pipe", "socket"], ids=_conn_id)
def conn_pair(request):
    """(receiving end, sending end): bigipc Connections from bigipc.Pipe."""
    a, b = bigipc.Pipe(duplex=request.param == "socket")
    yield a, b
    a.close()
    b.close()


@pytest.fixture(params=["pipe", "socket"], ids=_conn_id)
def stdlib_kind(request):
    return request.param


@pytest.fixture
def conns_to_close():
    conns = []
    yield conns
    for conn in conns:
        try:
            conn.close()
        except OSError:
            pass


def mixed_pair(kind, bigipc_sends, conns_to_close):
    """(bigipc Connection, stdlib Connection) on one pipe or socket pair."""
    if kind == "pipe":
        r, w = os.pipe()
        if bigipc_sends:
            ours = bigipc.Connection(w, readable=False)
            theirs = multiprocessing.connection.Connection(r, writable=False)
        else:
            ours = bigipc.Connection(r, writable=False)
            theirs = multiprocessing.connection.Connection(w, readable=False)
    else:
        s1, s2 = socket.socketpair()
        ours = bigipc.Connection(s1.detach())
        theirs = multiprocessing.connection.Connection(s2.detach())
    conns_to_close.extend([ours, theirs])
    return ours, theirs


def conn_send_recv(receiver, sender, obj):
    worker = start(sender.send, obj, timeout=LONG, on_error=sender.close)
    got = receiver.recv(timeout=LONG)
    worker.finish()
    return got


def float_array(nbytes, seed):
    return np.random.default_rng(seed).standard_normal(nbytes // 8)


def test_connection_numpy_writable_stays_writable(conn_pair):
    receiver, sender = conn_pair
    array = float_array(8 * MiB, seed=30)
    got = conn_send_recv(receiver, sender, array)
    assert got.dtype == np.float64 and got.shape == array.shape
    assert np.array_equal(got, array)
    assert got.flags.writeable
    got[0] = 1.5  # really writable memory
    assert got[0] == 1.5


def test_connection_numpy_readonly_stays_readonly(conn_pair):
    receiver, sender = conn_pair
    array = float_array(8 * MiB, seed=31)
    array.flags.writeable = False
    got = conn_send_recv(receiver, sender, array)
    assert np.array_equal(got, array)
    assert not got.flags.writeable


def test_connection_numpy_goes_out_of_band(conns_to_close):
    r, w = os.pipe()
    sender = bigipc.Connection(w, readable=False)
    conns_to_close.extend([sender, _RawCloser(r)])
    array = np.arange(100000, dtype=np.float64)
    worker = start(sender.send, array, timeout=LONG, on_error=sender.close)
    word, count = struct.unpack("!iI", read_exactly(r, 8))
    assert word == -2, "a large array should travel as a multipart message"
    table = read_exactly(r, 8 * count)
    lengths = [struct.unpack("!Q", table[8 * i : 8 * i + 8])[0] for i in range(count)]
    assert count == 2  # the pickle, then the array's memory
    assert lengths[-1] == array.nbytes  # writable: no read-only bit
    read_exactly(r, sum(n & ~READONLY_BIT for n in lengths))
    worker.finish()


class _RawCloser:
    def __init__(self, fd):
        self.fd = fd

    def close(self):
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_connection_top_level_bytes_like(conn_pair, kind):
    receiver, sender = conn_pair
    obj = kind(payload(MiB, seed=32))
    got = conn_send_recv(receiver, sender, obj)
    assert type(got) is kind
    assert_same(got, obj)


@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_connection_small_top_level_bytes_like(conn_pair, kind):
    receiver, sender = conn_pair
    obj = kind(b"small")
    assert conn_send_recv(receiver, sender, obj) == obj
    assert type(conn_send_recv(receiver, sender, obj)) is kind


def test_connection_dict_is_a_plain_message(conns_to_close):
    r, w = os.pipe()
    sender = bigipc.Connection(w, readable=False)
    conns_to_close.extend([sender, _RawCloser(r)])
    obj = {"key %d" % i: (i, "value %d" % i, i * 0.5, b"b" * (i % 7)) for i in range(100)}
    sender.send(obj, timeout=LONG)
    (length,) = struct.unpack("!i", read_exactly(r, 4))
    assert length >= 0, "header %d: a dict of small values must be a plain message" % length
    assert pickle.loads(read_exactly(r, length)) == obj
    assert read_available(r) == b""


def test_connection_dict_round_trip(conn_pair):
    receiver, sender = conn_pair
    obj = {i: ("value", i, [i] * 3) for i in range(100)}
    assert conn_send_recv(receiver, sender, obj) == obj


def test_connection_list_of_three_arrays(conn_pair):
    receiver, sender = conn_pair
    readonly = np.frombuffer(payload(300 * KiB, seed=33), np.uint8)
    arrays = [
        float_array(MiB, seed=34),
        np.arange(10, dtype=np.int32),  # small: pickled in band
        readonly,
    ]
    got = conn_send_recv(receiver, sender, arrays)
    assert type(got) is list and len(got) == 3
    for g, a in zip(got, arrays):
        assert g.dtype == a.dtype and g.shape == a.shape
        assert np.array_equal(g, a)
    assert got[0].flags.writeable
    assert not got[2].flags.writeable


def test_connection_oob_disabled_stdlib_receives_numpy(stdlib_kind, conns_to_close):
    ours, theirs = mixed_pair(stdlib_kind, True, conns_to_close)
    ours.out_of_band_threshold = None
    array = float_array(8 * MiB, seed=35)
    worker = start(ours.send, array, timeout=LONG, on_error=ours.close)
    assert theirs.poll(LONG)
    got = theirs.recv()
    worker.finish()
    assert np.array_equal(got, array)
    ours.send({"after": 1}, timeout=LONG)
    assert theirs.poll(LONG) and theirs.recv() == {"after": 1}


def test_connection_oob_disabled_sends_plain_frame(conns_to_close):
    r, w = os.pipe()
    sender = bigipc.Connection(w, readable=False)
    conns_to_close.extend([sender, _RawCloser(r)])
    sender.out_of_band_threshold = None
    array = np.arange(20000, dtype=np.int64)  # 160 KiB
    worker = start(sender.send, array, timeout=LONG, on_error=sender.close)
    (length,) = struct.unpack("!i", read_exactly(r, 4))
    assert length > array.nbytes
    assert np.array_equal(pickle.loads(read_exactly(r, length)), array)
    worker.finish()


def test_connection_stdlib_sends_numpy(stdlib_kind, conns_to_close):
    ours, theirs = mixed_pair(stdlib_kind, False, conns_to_close)
    array = float_array(8 * MiB, seed=36)
    worker = start(theirs.send, array, on_error=theirs.close)
    try:
        got = ours.recv(timeout=LONG)
    except BaseException:
        ours.close()  # the stdlib sender blocks without a timeout: let it fail
        raise
    worker.finish()
    assert np.array_equal(got, array)
    assert got.flags.writeable


class _RecordingFile(io.BytesIO):
    def __init__(self):
        super().__init__()
        self.write_sizes = []

    def write(self, data):
        self.write_sizes.append(len(data))
        return super().write(data)


def test_connection_recv_bytes_to(conn_pair):
    receiver, sender = conn_pair
    data = payload(10 * MiB, seed=37)
    worker = start(sender.send_bytes, data, timeout=LONG, on_error=sender.close)
    out = _RecordingFile()
    assert receiver.recv_bytes_to(out, chunk_size=65536, timeout=LONG) == len(data)
    worker.finish()
    assert_same(out.getvalue(), data)
    assert all(1 <= n <= 65536 for n in out.write_sizes)
    sender.send({"next": True}, timeout=LONG)
    assert receiver.recv(timeout=LONG) == {"next": True}


def test_connection_recv_bytes_to_empty_message(conn_pair):
    receiver, sender = conn_pair
    sender.send_bytes(b"", timeout=LONG)
    sender.send_bytes(b"next", timeout=LONG)
    out = io.BytesIO()
    assert receiver.recv_bytes_to(out, chunk_size=65536, timeout=LONG) == 0
    assert out.getvalue() == b""
    assert receiver.recv_bytes(timeout=LONG) == b"next"


def test_connection_recv_bytes_to_resumes_after_timeout(conns_to_close):
    r, w = os.pipe()
    receiver = bigipc.Connection(r, writable=False)
    conns_to_close.extend([receiver, _RawCloser(w)])
    data = payload(10 * MiB, seed=38)
    first_part = 3 * MiB
    go_on = threading.Event()

    def write_in_two_goes():
        view = memoryview(header(len(data)) + data)
        first = 4 + first_part
        _write_all(w, view[:first])
        assert go_on.wait(LONG), "the test never released the second half"
        _write_all(w, view[first:])
        _write_all(w, frame(b"after"))

    worker = start(write_in_two_goes, on_error=receiver.close)
    out = io.BytesIO()
    try:
        with pytest.raises(TimeoutError):
            receiver.recv_bytes_to(out, chunk_size=65536, timeout=2.0)
        got_first = out.getvalue()
        assert 0 < len(got_first) <= first_part
        assert_same(got_first, data[: len(got_first)])
        with pytest.raises(ValueError):
            receiver.recv_bytes(timeout=0)
        with pytest.raises(ValueError):
            receiver.recv(timeout=0)
    finally:
        go_on.set()
    assert receiver.recv_bytes_to(out, chunk_size=65536, timeout=LONG) == len(data) - len(got_first)
    worker.finish()
    assert_same(out.getvalue(), data)
    assert receiver.recv_bytes(timeout=LONG) == b"after"


def _write_all(fd, data):
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def test_connection_recv_bytes_to_refuses_multipart(conn_pair):
    receiver, sender = conn_pair
    array = np.arange(100000, dtype=np.float64)
    worker = start(sender.send, array, timeout=LONG, on_error=sender.close)
    with pytest.raises(MultipartMessageError):
        receiver.recv_bytes_to(io.BytesIO(), timeout=LONG)
    assert np.array_equal(receiver.recv(timeout=LONG), array)
    worker.finish()


# --------------------------------------------------------------------------
# the new methods and the rest of the contract: limits, closed channels,
# peers that go away, blocking without a timeout, threads, signals


@pytest.mark.parametrize("max_bytes", [2**40, 2**62], ids=["2**40", "2**62"])
def test_recv_many_huge_max_bytes_is_only_an_upper_bound(pair, max_bytes):
    """max_bytes bounds how much may be read, it is no size to allocate: a
    caller passing a huge value to mean "no limit" gets the messages."""
    receiver, sender = pair
    sender.send_many([b"one", b"two"], timeout=LONG)
    assert recv_many_until(receiver, 2, max_bytes) == [b"one", b"two"]


NEW_METHOD_CALLS = {
    "send_multipart": lambda c: c.send_multipart([b"x"], timeout=BRIEF),
    "send_many": lambda c: c.send_many([b"x"], timeout=BRIEF),
    "recv_message": lambda c: c.recv_message(timeout=BRIEF),
    "recv_many": lambda c: c.recv_many(65536, timeout=BRIEF),
    "recv_begin": lambda c: c.recv_begin(timeout=BRIEF),
    "recv_chunk_into": lambda c: c.recv_chunk_into(bytearray(8), timeout=BRIEF),
}


@pytest.mark.parametrize("name", sorted(NEW_METHOD_CALLS))
def test_new_methods_on_closed_channel(pair, name):
    for chan in pair:
        chan.close()
        with pytest.raises(OSError) as info:
            NEW_METHOD_CALLS[name](chan)
        assert type(info.value) is OSError, "%s: %r" % (name, info.value)


@pytest.mark.parametrize("name", sorted(NEW_METHOD_CALLS))
def test_new_methods_in_the_wrong_direction(pipe_pair, name):
    reader, writer = pipe_pair
    wrong = writer if name.startswith("recv") else reader
    with pytest.raises(OSError):
        NEW_METHOD_CALLS[name](wrong)


@pytest.mark.parametrize("method", ["send_many", "send_multipart"])
def test_new_sends_to_a_closed_reader(pair, method):
    receiver, sender = pair
    receiver.close()
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        getattr(sender, method)([b"a", b"b"], timeout=LONG)
    assert sender.send_pending == 0


@pytest.mark.parametrize("method", ["send_many", "send_multipart"])
def test_new_sends_when_reader_goes_away_mid_send(pair, method):
    receiver, sender = pair
    data = [payload(MiB, seed=40)] * 8
    worker = start(getattr(sender, method), data, timeout=LONG)
    assert receiver.poll(LONG)  # the send is under way (8 MiB: it blocks)
    receiver.close()
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        worker.finish()


def test_new_receives_block_without_timeout(pair):
    receiver, sender = pair

    def later():
        for item in (b"for recv_many", [b"for", b"recv_message"], b"streamed"):
            time.sleep(0.1)
            if isinstance(item, list):
                sender.send_multipart(item, timeout=LONG)
            else:
                sender.send_bytes(item, timeout=LONG)

    worker = start(later, on_error=sender.close)
    try:
        assert receiver.recv_many(65536, timeout=None) == [b"for recv_many"]
        assert receiver.recv_message(timeout=None) == [b"for", b"recv_message"]
        assert receiver.recv_begin(timeout=None) == 8
        buf = bytearray(8)
        out = bytearray()
        while len(out) < 8:
            out += buf[: receiver.recv_chunk_into(buf, timeout=None)]
        assert out == b"streamed"
    except BaseException:
        sender.close()
        raise
    worker.finish()


@pytest.mark.parametrize("huge", [1e9, float("inf")])
def test_new_receives_huge_timeout(pair, huge):
    receiver, sender = pair
    sender.send_many([b"a", b"b"], timeout=huge)
    sender.send_multipart([b"c"], timeout=huge)
    assert_messages(recv_many_until(receiver, 3, timeout=huge), [b"a", b"b", [b"c"]])
    assert not receiver.poll(0)


def _thread_receiver(receiver, done, max_bytes):
    """recv_many until the sender is done and the channel stays empty."""
    got = []
    while True:
        try:
            batch = receiver.recv_many(max_bytes, timeout=0.2)
        except TimeoutError:
            if done.is_set():
                return got
            continue
        assert batch, "recv_many returned an empty list"
        got.extend(batch)


@pytest.mark.parametrize("max_bytes", [16, 4096])
def test_concurrent_recv_many(pair, max_bytes):
    receiver, sender = pair
    messages = small_messages(3000, seed=41)
    messages = [struct.pack("!I", i) + m for i, m in enumerate(messages)]
    done = threading.Event()
    workers = [start(_thread_receiver, receiver, done, max_bytes) for _ in range(3)]
    try:
        send_in_batches(sender, messages, seed=42)
    finally:
        done.set()
    results = [w.finish() for w in workers]
    everything = []
    for got in results:
        tags = [struct.unpack("!I", m[:4])[0] for m in got]
        assert tags == sorted(tags), "a thread got messages out of order"
        everything.extend(got)
    everything.sort(key=lambda m: struct.unpack("!I", m[:4])[0])
    assert_messages(everything, messages)


def _send_tagged_multipart(sender, thread, count):
    for i in range(count):
        sender.send_multipart(
            [struct.pack("!II", thread, i), bytearray(payload(100 * KiB, seed=thread))], timeout=LONG
        )


def test_concurrent_send_multipart(pair):
    receiver, sender = pair
    threads, count = 4, 30
    workers = [start(_send_tagged_multipart, sender, t, count, on_error=sender.close) for t in range(threads)]
    got = [receiver.recv_message(timeout=LONG) for _ in range(threads * count)]
    for w in workers:
        w.finish()
    seen = {t: [] for t in range(threads)}
    for message in got:
        assert type(message) is list and len(message) == 2
        thread, i = struct.unpack("!II", message[0])
        assert_same(message[1], payload(100 * KiB, seed=thread))
        seen[thread].append(i)
    assert all(seen[t] == list(range(count)) for t in range(threads))


def _send_tagged_batches(sender, thread, batches):
    for b in range(batches):
        sender.send_many([struct.pack("!III", thread, b, j) + bytes(j * 37) for j in range(50)], timeout=LONG)


def test_concurrent_send_many_batches_stay_whole(pair):
    receiver, sender = pair
    threads, batches = 4, 40
    workers = [start(_send_tagged_batches, sender, t, batches, on_error=sender.close) for t in range(threads)]
    got = recv_many_until(receiver, threads * batches * 50, 4096)
    for w in workers:
        w.finish()
    assert len(got) == threads * batches * 50
    # Each batch goes out under the send lock as one unit: its 50 messages
    # are consecutive in the stream, and each thread's batches in order.
    next_batch = {t: 0 for t in range(threads)}
    for k in range(0, len(got), 50):
        group = got[k : k + 50]
        thread, b, _ = struct.unpack("!III", group[0][:12])
        assert b == next_batch[thread]
        next_batch[thread] += 1
        for j, m in enumerate(group):
            assert m == struct.pack("!III", thread, b, j) + bytes(j * 37)


@pytest.mark.parametrize(
    "name",
    ["recv_many", "recv_message", "recv_begin"],
)
def test_lock_wait_counts_against_deadline(pair, name):
    receiver, sender = pair
    calls = {
        "recv_many": lambda t: receiver.recv_many(65536, timeout=t),
        "recv_message": lambda t: receiver.recv_message(timeout=t),
        "recv_begin": lambda t: receiver.recv_begin(timeout=t),
    }
    blocked = start(receiver.recv_many, 65536, timeout=LONG, on_error=sender.close)
    time.sleep(0.1)  # let it take the receive lock and wait
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        calls[name](0.2)
    elapsed = time.monotonic() - t0
    sender.send_bytes(b"for the blocked thread", timeout=LONG)
    assert blocked.finish() == [b"for the blocked thread"]
    assert 0.19 <= elapsed < 0.2 + SLACK, "returned after %.3f s" % elapsed


class Alarm(Exception):
    """Raised by the test's SIGALRM handler."""


def _raise_alarm(signum, frame):
    raise Alarm()


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


class _Counter:
    def __init__(self):
        self.count = 0

    def __call__(self, signum, frame):
        self.count += 1


# pytest-timeout's signal method uses SIGALRM too: these tests own the
# signal and use the thread method. The blocked calls carry a timeout far
# above the alarm's delay, so a call the signal fails to end fails the test.
signal_test = pytest.mark.timeout(60, method="thread")
BLOCKED = 10.0


@signal_test
@pytest.mark.parametrize("max_bytes", [16, 65536])
def test_signal_interrupts_recv_many_mid_message(raw_writer, max_bytes):
    reader, raw = raw_writer
    data = payload(5000, seed=43)
    raw.write(header(len(data)) + data[:1234])
    with _AlarmHandler(_raise_alarm, 0.2):
        with pytest.raises(Alarm):
            reader.recv_many(max_bytes, timeout=BLOCKED)
    assert reader.recv_in_progress
    raw.write(data[1234:] + frame(b"next"))
    assert_messages(recv_many_until(reader, 2, max_bytes), [data, b"next"])


@signal_test
def test_signal_interrupts_recv_message_mid_multipart(raw_writer):
    reader, raw = raw_writer
    whole = multipart_frame(SPLIT_PARTS, SPLIT_READONLY)
    raw.write(whole[:100])
    with _AlarmHandler(_raise_alarm, 0.2):
        with pytest.raises(Alarm):
            reader.recv_message(timeout=BLOCKED)
    raw.write(whole[100:])
    assert_message(reader.recv_message(timeout=LONG), SPLIT_EXPECTED)


@signal_test
def test_signal_interrupts_recv_chunk_into(raw_writer):
    reader, raw = raw_writer
    data = payload(5000, seed=44)
    raw.write(header(len(data)) + data[:2000])
    assert reader.recv_begin(timeout=LONG) == len(data)
    buf = bytearray(1500)
    out = bytearray()
    with _AlarmHandler(_raise_alarm, 0.2):
        with pytest.raises(Alarm):
            while True:
                out += buf[: reader.recv_chunk_into(buf, timeout=BLOCKED)]
    assert_same(out, data[:2000])
    assert reader.recv_begin(timeout=0) == 3000
    raw.write(data[2000:])
    while len(out) < len(data):
        out += buf[: reader.recv_chunk_into(buf, timeout=LONG)]
    assert_same(out, data)


@signal_test
@pytest.mark.parametrize("method", ["send_many", "send_multipart"])
def test_signal_interrupts_blocked_new_send(pair, method):
    receiver, sender = pair
    originals = [payload(MiB, seed=45), payload(3 * MiB, seed=46), b"small"]
    parts = [bytearray(m) for m in originals]
    with _AlarmHandler(_raise_alarm, 0.2):
        with pytest.raises(Alarm):
            getattr(sender, method)(parts, timeout=BLOCKED)
    assert sender.send_pending > 0
    for p in parts:
        p[:] = bytes(len(p))
    count = len(originals) if method == "send_many" else 1
    worker = start(recv_many_until, receiver, count + 1, on_error=receiver.close)
    sender.flush(timeout=LONG)
    sender.send_bytes(b"after", timeout=LONG)
    got = worker.finish()
    expected = originals if method == "send_many" else [[bytearray(m) for m in originals]]
    assert_messages(got, expected + [b"after"])


@signal_test
def test_returning_handler_does_not_end_new_calls(pair):
    receiver, sender = pair
    counter = _Counter()

    def later():
        time.sleep(0.5)
        sender.send_many([b"many"], timeout=LONG)
        time.sleep(0.3)
        sender.send_multipart([b"multi"], timeout=LONG)
        time.sleep(0.3)
        sender.send_bytes(b"stream", timeout=LONG)
        time.sleep(0.3)

    worker = start(later, on_error=sender.close)
    with _AlarmHandler(counter, 0.05, 0.05):
        assert receiver.recv_many(65536, timeout=BLOCKED) == [b"many"]
        assert receiver.recv_message(timeout=BLOCKED) == [b"multi"]
        assert receiver.recv_begin(timeout=BLOCKED) == 6
        buf = bytearray(6)
        n = receiver.recv_chunk_into(buf, timeout=BLOCKED)
        assert buf[:n] == b"stream"[:n]
        out = bytes(buf[:n])
        while len(out) < 6:
            out += bytes(buf[: receiver.recv_chunk_into(buf, timeout=BLOCKED)])
        assert out == b"stream"
    worker.finish()
    # The handler ran (its signals arrived while the calls were blocked) and
    # returning from it ended none of them.
    assert counter.count > 0
