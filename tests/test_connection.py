"""API-level tests of bigipc.Pipe, bigipc.Connection and bigipc.wait.

They use real child processes (fork, spawn and forkserver), real pipes and
socket pairs, and run against whichever core this process loaded
(``BIGIPC_PUREPYTHON=1`` selects the pure-Python one; tests/test_both_cores.py
re-runs this file under it). Every receive made by the test code carries a
timeout, every join is bounded and checks the exit code, so a bug fails a
test instead of hanging the run.

Child targets live in tests/_children.py, which is made importable in
children of every start method before any child starts.
"""

import array
import copy
import gc
import io
import multiprocessing
import multiprocessing.connection
import os
import pickle
import selectors
import signal
import socket
import struct
import sys
import threading
import time
import tracemalloc
import weakref
from contextlib import contextmanager

import pytest

import bigipc
from bigipc import BufferTooShort, FrameError, MessageTooLong, TruncatedMessageError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _children  # noqa: E402
from _children import check_tagged, digest, frame_header, pattern, tagged_message  # noqa: E402
from _signals import Interrupted, alarm, raise_interrupted  # noqa: E402

_children.make_importable_in_children()

pytestmark = pytest.mark.timeout(120)

KiB = 1 << 10
MiB = 1 << 20

# Bound for calls expected to complete: far above what they need.
LONG = 30.0
# Bound for joining a child that should exit on its own.
JOIN = 60.0
# A short timeout for calls expected to time out, and how much later than it
# such a call may return (generous: loaded CI machines).
SHORT = 0.2
SLACK = 5.0

START_METHODS = [m for m in ("fork", "spawn", "forkserver") if m in multiprocessing.get_all_start_methods()]
PURE_FORCED = os.environ.get("BIGIPC_PUREPYTHON", "") not in ("", "0")


# --------------------------------------------------------------------------
# fixtures and helpers


class Children:
    """Starts child processes and makes sure none outlives the test."""

    def __init__(self):
        self.procs = []

    def start(self, method, target, *args):
        ctx = multiprocessing.get_context(method)
        proc = ctx.Process(target=target, args=args, daemon=True)
        proc.start()
        self.procs.append(proc)
        return proc

    def finish(self, proc, exitcode=0, timeout=JOIN):
        proc.join(timeout)
        assert proc.exitcode is not None, "child %s did not exit within %s s" % (proc.name, timeout)
        assert proc.exitcode == exitcode, "child %s exited with %s" % (proc.name, proc.exitcode)

    def cleanup(self):
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
            proc.join(10)


@pytest.fixture
def children():
    kids = Children()
    yield kids
    kids.cleanup()


@pytest.fixture(params=START_METHODS)
def method(request):
    return request.param


class Closer:
    """Closes every Connection (bigipc or stdlib) a test registers."""

    def __init__(self):
        self.items = []

    def __call__(self, *conns):
        self.items.extend(conns)
        return conns if len(conns) > 1 else conns[0]

    def close_all(self):
        for conn in self.items:
            try:
                conn.close()
            except OSError:
                pass


@pytest.fixture
def closing():
    closer = Closer()
    yield closer
    closer.close_all()


def make_pipe(closing, duplex, **kwargs):
    """(receiving end, sending end) of a bigipc.Pipe, closed at teardown."""
    a, b = bigipc.Pipe(duplex=duplex, **kwargs)
    closing(a, b)
    return a, b


@contextmanager
def elapsed_at_most(seconds):
    """Assert the block takes less than ``seconds``; yields a timer holder."""
    holder = {}
    start = time.monotonic()
    try:
        yield holder
    finally:
        holder["elapsed"] = elapsed = time.monotonic() - start
    assert elapsed < seconds, "took %.2f s, bound %.2f s" % (elapsed, seconds)


def expect_timeout(call, timeout=SHORT):
    """Run ``call`` (which gets ``timeout=``) and assert it raises
    TimeoutError no earlier than the deadline and not much later."""
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        call(timeout=timeout)
    elapsed = time.monotonic() - start
    assert elapsed >= max(0.0, timeout) - 0.01, "returned after %.3f s, before its %.3f s deadline" % (elapsed, timeout)
    assert elapsed < max(0.0, timeout) + SLACK, "returned after %.3f s for a %.3f s timeout" % (elapsed, timeout)
    return elapsed


def start_echo(children, closing, method, duplex, **pipe_kwargs):
    """Start an echo child; return (send end, receive end, process, info
    the child reported about the ends it got)."""
    if duplex:
        ours, theirs = make_pipe(closing, True, **pipe_kwargs)
        proc = children.start(method, _children.echo, theirs)
        theirs.close()
        info = ours.recv(timeout=LONG)
        return ours, ours, proc, info
    to_child_r, to_child_w = make_pipe(closing, False, **pipe_kwargs)
    from_child_r, from_child_w = make_pipe(closing, False, **pipe_kwargs)
    proc = children.start(method, _children.echo_between, to_child_r, from_child_w)
    to_child_r.close()
    from_child_w.close()
    info = from_child_r.recv(timeout=LONG)
    return to_child_w, from_child_r, proc, info


def start_digest_reader(children, closing, reader, kinds, method="fork"):
    """Start a child that receives one message per entry of ``kinds``
    ("bytes" or "object") from ``reader`` and reports their digests; returns
    (process, end the report arrives on)."""
    report_r, report_w = make_pipe(closing, False)
    proc = children.start(method, _children.receive_and_report, reader, report_w, list(kinds))
    report_w.close()
    return proc, report_r


def stop_echo(children, send_end, proc):
    send_end.send_bytes(b"STOP", timeout=LONG)
    children.finish(proc)


def sample_object(n):
    return {"size": n, "data": pattern(n, seed=n), "nested": [1, 2.5, None, "text", (n,)]}


ROUND_TRIP_SIZES = [0, 1, 16 * KiB, 16 * KiB + 3, MiB + 7]
SIZE_IDS = ["0", "1", "16KiB", "16KiB+3", "1MiB+7"]


# --------------------------------------------------------------------------
# which core, basic properties


def test_implementation_is_the_expected_core():
    expected = "python" if PURE_FORCED else "cython"
    assert bigipc.IMPLEMENTATION == expected
    core = sys.modules["bigipc._purecore" if PURE_FORCED else "bigipc._core"]
    assert issubclass(bigipc.Connection, core.Channel)


@pytest.mark.parametrize("duplex", [True, False], ids=["duplex", "simplex"])
def test_pipe_ends_and_flags(closing, duplex):
    a, b = make_pipe(closing, duplex)
    assert isinstance(a, bigipc.Connection) and isinstance(b, bigipc.Connection)
    assert a.fileno() != b.fileno()
    for conn in (a, b):
        assert type(conn.fileno()) is int
        os.fstat(conn.fileno())
        assert conn.closed is False
    if duplex:
        assert (a.readable, a.writable, b.readable, b.writable) == (True, True, True, True)
        b.send("from b")
        assert a.recv(timeout=LONG) == "from b"
    else:
        assert (a.readable, a.writable) == (True, False)
        assert (b.readable, b.writable) == (False, True)
    b.send(("x", 1))
    assert a.recv(timeout=LONG) == ("x", 1)


def test_pipe_max_message_size_applies_to_both_ends(closing):
    for duplex in (True, False):
        a, b = make_pipe(closing, duplex, max_message_size=12345)
        assert a.max_message_size == 12345 and b.max_message_size == 12345
    a, b = make_pipe(closing, True)
    assert a.max_message_size is None
    a.max_message_size = 10
    assert a.max_message_size == 10
    a.max_message_size = None
    assert a.max_message_size is None


def test_pipe_buffer_size(closing):
    fcntl = pytest.importorskip("fcntl")
    get_size = getattr(fcntl, "F_GETPIPE_SZ", 1032)
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            pipe_max = int(f.read())
    except OSError:
        pytest.skip("no /proc/sys/fs/pipe-max-size: not Linux")
    # The default is 512 KiB (the vmsplice balance, docs/protocol.md), never
    # more than the system allows.
    r, w = make_pipe(closing, False)
    assert fcntl.fcntl(w.fileno(), get_size) == min(512 * KiB, pipe_max)
    r, w = make_pipe(closing, False, buffer_size=pipe_max)
    assert fcntl.fcntl(w.fileno(), get_size) == pipe_max
    r, w = make_pipe(closing, False, buffer_size=0)
    assert fcntl.fcntl(w.fileno(), get_size) == 64 * KiB
    r, w = make_pipe(closing, False, buffer_size=256 * KiB)
    assert fcntl.fcntl(w.fileno(), get_size) == 256 * KiB
    a, b = make_pipe(closing, True, buffer_size=512 * KiB)
    with socket.socket(fileno=os.dup(a.fileno())) as s:
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 512 * KiB


def test_default_pipe_size_without_the_system_maximum(monkeypatch):
    from bigipc import _platform

    if _platform._F_SETPIPE_SZ is None:
        assert _platform.default_pipe_size() == 0
        return
    # /proc unreadable (a sandbox): ask for 512 KiB anyway, the kernel judges.
    monkeypatch.setattr(_platform, "_pipe_max_cache", 0)
    assert _platform.default_pipe_size() == 512 * KiB
    # An administrator's lower maximum caps the request.
    monkeypatch.setattr(_platform, "_pipe_max_cache", 128 * KiB)
    assert _platform.default_pipe_size() == 128 * KiB
    r, w = os.pipe()
    try:
        assert _platform.set_pipe_size(w, None) == 128 * KiB
    finally:
        os.close(r)
        os.close(w)


def test_pipe_descriptors_are_not_inherited_by_exec(closing):
    for duplex in (True, False):
        for conn in make_pipe(closing, duplex):
            assert os.get_inheritable(conn.fileno()) is False


def test_wait_is_multiprocessings():
    assert bigipc.wait is multiprocessing.connection.wait


def test_direction_errors(closing):
    reader, writer = make_pipe(closing, False)
    with pytest.raises(OSError, match="read-only"):
        reader.send(1)
    with pytest.raises(OSError, match="read-only"):
        reader.send_bytes(b"x")
    with pytest.raises(OSError, match="write-only"):
        writer.recv(timeout=LONG)
    with pytest.raises(OSError, match="write-only"):
        writer.recv_bytes(timeout=LONG)
    with pytest.raises(OSError, match="write-only"):
        writer.recv_bytes_into(bytearray(10), timeout=LONG)
    with pytest.raises(OSError, match="write-only"):
        writer.poll()
    # Nothing was sent or lost by the refused calls.
    assert reader.poll(0) is False
    writer.send("ok")
    assert reader.recv(timeout=LONG) == "ok"
    assert reader.poll(0) is False


CLOSED_CALLS = {
    "fileno": lambda c: c.fileno(),
    "send": lambda c: c.send(1),
    "send_bytes": lambda c: c.send_bytes(b"x"),
    "send_bytes_timeout": lambda c: c.send_bytes(b"x", timeout=1),
    "recv": lambda c: c.recv(timeout=1),
    "recv_bytes": lambda c: c.recv_bytes(timeout=1),
    "recv_bytes_maxlength": lambda c: c.recv_bytes(10),
    "recv_bytes_into": lambda c: c.recv_bytes_into(bytearray(10), timeout=1),
    "poll": lambda c: c.poll(),
    "poll_timeout": lambda c: c.poll(1),
    "flush": lambda c: c.flush(timeout=1),
    "detach": lambda c: c.detach(),
    "send_parts": lambda c: c.send_parts([b"a", b"b"], timeout=1),
    "send_multipart": lambda c: c.send_multipart([b"a", b"b"], timeout=1),
    "send_many": lambda c: c.send_many([b"a", b"b"], timeout=1),
    "recv_message": lambda c: c.recv_message(timeout=1),
    "recv_many": lambda c: c.recv_many(timeout=1),
    "recv_begin": lambda c: c.recv_begin(timeout=1),
    "recv_chunk_into": lambda c: c.recv_chunk_into(bytearray(10), timeout=1),
    "recv_bytes_to": lambda c: c.recv_bytes_to(io.BytesIO(), timeout=1),
}


@pytest.mark.parametrize("call", sorted(CLOSED_CALLS))
@pytest.mark.parametrize("duplex", [True, False], ids=["duplex", "simplex"])
def test_closed_connection_raises_handle_is_closed(closing, duplex, call):
    a, b = make_pipe(closing, duplex)
    for conn in (a, b):
        conn.close()
        assert conn.closed
        conn.close()  # idempotent
        assert conn.closed
        with pytest.raises(OSError, match="handle is closed"):
            CLOSED_CALLS[call](conn)


def test_closed_peer_gives_eof_not_handle_error(closing):
    a, b = make_pipe(closing, True)
    b.close()
    with pytest.raises(EOFError):
        a.recv(timeout=LONG)
    with pytest.raises(EOFError):
        a.recv_bytes(timeout=LONG)


def test_context_manager(closing):
    a, b = make_pipe(closing, True)
    with a as entered_a, b:
        assert entered_a is a
        a.send(1729)
        assert b.recv(timeout=LONG) == 1729
        assert not a.closed and not b.closed
    assert a.closed and b.closed
    with pytest.raises(OSError, match="handle is closed"):
        a.recv(timeout=LONG)
    c, d = make_pipe(closing, False)
    with pytest.raises(ZeroDivisionError):
        with c, d:
            1 / 0
    assert c.closed and d.closed


def test_repr(closing):
    a, b = make_pipe(closing, False)
    text_a, text_b = repr(a), repr(b)
    assert "fd=%d" % a.fileno() in text_a and "readable" in text_a and "writable" not in text_a
    assert "fd=%d" % b.fileno() in text_b and "writable" in text_b and "readable" not in text_b
    c, d = make_pipe(closing, True)
    assert "readable" in repr(c) and "writable" in repr(c)
    a.close()
    assert "closed" in repr(a)


def test_detach_gives_the_fd_back(closing):
    a, b = make_pipe(closing, False)
    fd = b.fileno()
    assert b.detach() == fd
    assert b.closed
    closing(multiprocessing.connection.Connection(fd, readable=False))
    # The stdlib object now owns it and can still write to our reader.
    os.write(fd, frame_header(3) + b"abc")
    assert a.recv_bytes(timeout=LONG) == b"abc"


def test_plain_pickle_refuses_a_connection(closing):
    a, b = make_pipe(closing, True)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(TypeError):
            pickle.dumps(a, protocol)
    with pytest.raises(TypeError):
        copy.copy(a)
    # The refusal broke nothing.
    a.send("still fine")
    assert b.recv(timeout=LONG) == "still fine"


# --------------------------------------------------------------------------
# round trips through a child process


@pytest.mark.parametrize("size", ROUND_TRIP_SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("duplex", [True, False], ids=["duplex", "simplex"])
def test_round_trip_bytes(children, closing, duplex, size):
    tx, rx, proc, _ = start_echo(children, closing, "fork", duplex)
    data = pattern(size, seed=size)
    tx.send_bytes(data, timeout=LONG)
    assert rx.recv_bytes(timeout=LONG) == data
    # Offsets and sizes count bytes and send only the slice.
    tx.send_bytes(data, size // 3, size // 3, timeout=LONG)
    assert rx.recv_bytes(timeout=LONG) == data[size // 3 : size // 3 + size // 3]
    # Into a buffer at an offset, leaving the bytes around it alone.
    tx.send_bytes(bytearray(data), timeout=LONG)
    buf = bytearray(b"\xee" * (size + 16))
    assert rx.recv_bytes_into(buf, 8, timeout=LONG) == size
    assert buf[:8] == b"\xee" * 8 and buf[8 : 8 + size] == data and buf[8 + size :] == b"\xee" * 8
    # A memoryview and an array.array go out as their bytes.
    tx.send_bytes(memoryview(data), timeout=LONG)
    assert rx.recv_bytes(timeout=LONG) == data
    arr = array.array("i", range(size // 4))
    tx.send_bytes(arr, timeout=LONG)
    assert rx.recv_bytes(timeout=LONG) == arr.tobytes()
    stop_echo(children, tx, proc)


@pytest.mark.parametrize("size", ROUND_TRIP_SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("duplex", [True, False], ids=["duplex", "simplex"])
def test_round_trip_objects(children, closing, duplex, size):
    tx, rx, proc, _ = start_echo(children, closing, "fork", duplex)
    obj = sample_object(size)
    tx.send(obj, timeout=LONG)
    assert rx.recv(timeout=LONG) == obj
    tx.send(pattern(size), timeout=LONG)
    assert rx.recv(timeout=LONG) == pattern(size)
    # An object's message is an ordinary message: bytes in, object out.
    tx.send_bytes(pickle.dumps(obj), timeout=LONG)
    assert rx.recv(timeout=LONG) == obj
    stop_echo(children, tx, proc)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("duplex", [True, False], ids=["duplex", "simplex"])
def test_round_trip_100mib(children, closing, duplex):
    size = 100 * MiB
    tx, rx, proc, _ = start_echo(children, closing, "fork", duplex)
    data = pattern(size, seed=100)
    tx.send_bytes(data, timeout=120)
    got = rx.recv_bytes(timeout=120)
    assert len(got) == size and got == data
    del got
    tx.send(data, timeout=120)
    got = rx.recv(timeout=120)
    assert got == data
    del got
    tx.send_bytes(data, timeout=120)
    buf = bytearray(size)
    assert rx.recv_bytes_into(buf, timeout=120) == size
    assert buf == data
    stop_echo(children, tx, proc)


def test_many_messages_through_child_keep_order(children, closing):
    tx, rx, proc, _ = start_echo(children, closing, "fork", False)
    sizes = [0, 1, 5, 100, 4 * KiB, 70 * KiB, 300 * KiB]
    expected = []
    for i in range(60):
        message = tagged_message(1, i, sizes[i % len(sizes)])
        tx.send_bytes(message, timeout=LONG)
        expected.append(message)
        if i % 3 == 2:
            for _ in range(3):
                assert rx.recv_bytes(timeout=LONG) == expected.pop(0)
    stop_echo(children, tx, proc)


# --------------------------------------------------------------------------
# passing connections to children


@pytest.mark.parametrize("duplex", [True, False], ids=["duplex", "simplex"])
def test_connections_as_process_args(children, closing, method, duplex):
    tx, rx, proc, info = start_echo(children, closing, method, duplex, max_message_size=4 * MiB)
    infos = [info] if duplex else list(info)
    for got in infos:
        assert got["is_bigipc"], got
        assert got["type"] == "bigipc.connection.Connection"
        assert got["implementation"] == bigipc.IMPLEMENTATION
        assert got["fileno_is_int"] and not got["closed"]
        assert got["max_message_size"] == 4 * MiB
    if duplex:
        assert (infos[0]["readable"], infos[0]["writable"]) == (True, True)
    else:
        assert (infos[0]["readable"], infos[0]["writable"]) == (True, False)
        assert (infos[1]["readable"], infos[1]["writable"]) == (False, True)
    for size in (0, 10, 200 * KiB, 3 * MiB):
        data = pattern(size, seed=size + 1)
        tx.send_bytes(data, timeout=LONG)
        assert rx.recv_bytes(timeout=LONG) == data
    tx.send(sample_object(1000), timeout=LONG)
    assert rx.recv(timeout=LONG) == sample_object(1000)
    stop_echo(children, tx, proc)


def test_child_gets_a_connection_the_parent_closed_right_after_start(children, closing, method):
    reader, writer = make_pipe(closing, False)
    proc = children.start(method, _children.send_messages, writer, [b"one", b"two"])
    writer.close()
    assert reader.recv_bytes(timeout=LONG) == b"one"
    assert reader.recv_bytes(timeout=LONG) == b"two"
    with pytest.raises(EOFError):
        reader.recv_bytes(timeout=LONG)
    children.finish(proc)


@pytest.mark.parametrize("what", ["echo-duplex", "write-simplex", "read-simplex"])
def test_send_connection_to_running_child(children, closing, method, what):
    control, theirs = make_pipe(closing, True)
    proc = children.start(method, _children.receive_connections, theirs)
    theirs.close()
    assert control.recv(timeout=LONG) == "ready"
    for _ in range(2):  # twice: the same child takes a second one too
        if what == "echo-duplex":
            mine, sent = make_pipe(closing, True)
            control.send(("echo", sent), timeout=LONG)
            sent.close()
            info = control.recv(timeout=LONG)
            mine.send_bytes(b"ping" * 1000, timeout=LONG)
            assert mine.recv_bytes(timeout=LONG) == b"ping" * 1000
            expected_flags = (True, True)
        elif what == "write-simplex":
            mine, sent = make_pipe(closing, False)
            control.send(("write", sent), timeout=LONG)
            sent.close()
            info = control.recv(timeout=LONG)
            assert mine.recv(timeout=LONG) == ("hello from", proc.pid)
            expected_flags = (False, True)
        else:
            sent, mine = make_pipe(closing, False)
            control.send(("read", sent), timeout=LONG)
            sent.close()
            info = control.recv(timeout=LONG)
            mine.send({"to": "child"}, timeout=LONG)
            assert control.recv(timeout=LONG) == {"to": "child"}
            expected_flags = (True, False)
        assert info["is_bigipc"] and info["implementation"] == bigipc.IMPLEMENTATION
        assert (info["readable"], info["writable"]) == expected_flags
        # The child closed its copy: the parent's end sees the end.
        if mine.readable:
            with pytest.raises(EOFError):
                mine.recv(timeout=LONG)
        else:
            with pytest.raises(BrokenPipeError):
                for _ in range(100):
                    mine.send_bytes(b"x" * 64 * KiB, timeout=LONG)
        mine.close()
    control.send(None, timeout=LONG)
    children.finish(proc)


def test_connection_through_a_multiprocessing_queue(closing):
    # Whatever pickles with multiprocessing's ForkingPickler carries a bigipc
    # Connection (through the resource sharer): here a stdlib SimpleQueue.
    queue = multiprocessing.get_context("fork").SimpleQueue()
    mine, sent = make_pipe(closing, False, max_message_size=4321)
    queue.put(sent)
    rebuilt = closing(queue.get())
    assert isinstance(rebuilt, bigipc.Connection)
    assert rebuilt.fileno() != sent.fileno()
    assert (rebuilt.readable, rebuilt.writable, rebuilt.max_message_size) == (False, True, 4321)
    sent.close()
    rebuilt.send("via queue")
    assert mine.recv(timeout=LONG) == "via queue"
    queue.close()


# --------------------------------------------------------------------------
# timeouts


RECV_CALLS = {
    "recv": lambda c, timeout: c.recv(timeout=timeout),
    "recv_bytes": lambda c, timeout: c.recv_bytes(timeout=timeout),
    "recv_bytes_into": lambda c, timeout: c.recv_bytes_into(bytearray(64), timeout=timeout),
}


@pytest.mark.parametrize("call", sorted(RECV_CALLS))
@pytest.mark.parametrize("duplex", [True, False], ids=["duplex", "simplex"])
def test_recv_timeout_nothing_sent(children, closing, duplex, call):
    rx, tx = make_pipe(closing, duplex)
    receive = RECV_CALLS[call]
    expect_timeout(lambda timeout: receive(rx, timeout))
    for zero in (0, 0.0, -1):
        with elapsed_at_most(SLACK):
            with pytest.raises(TimeoutError):
                receive(rx, zero)
    # Still usable, nothing lost: a child sends two messages.
    messages = [pickle.dumps("first"), pickle.dumps("second")]
    proc = children.start("fork", _children.send_messages, tx, messages)
    tx.close()
    assert rx.recv(timeout=LONG) == "first"
    assert rx.recv_bytes(timeout=LONG) == messages[1]
    children.finish(proc)
    with pytest.raises(EOFError):
        receive(rx, LONG)


def test_recv_timeout_zero_returns_a_waiting_message(closing):
    rx, tx = make_pipe(closing, False)
    tx.send_bytes(b"here")
    assert rx.poll(LONG)
    assert rx.recv_bytes(timeout=0) == b"here"
    tx.send("obj")
    assert rx.poll(LONG)
    assert rx.recv(timeout=0) == "obj"


@pytest.mark.parametrize("bad", [float("nan")])
def test_nan_timeout_is_value_error(closing, bad):
    rx, tx = make_pipe(closing, True)
    with pytest.raises(ValueError):
        rx.recv(timeout=bad)
    with pytest.raises(ValueError):
        tx.send(b"x", timeout=bad)
    tx.send("fine")
    assert rx.recv(timeout=LONG) == "fine"


@pytest.mark.parametrize("explicit_flush", [True, False], ids=["flush", "implicit"])
@pytest.mark.parametrize("call", ["send", "send_bytes"])
@pytest.mark.parametrize("duplex", [True, False], ids=["duplex", "simplex"])
def test_send_timeout_no_reader(children, closing, duplex, call, explicit_flush):
    rx, tx = make_pipe(closing, duplex)
    big = pattern(32 * MiB, seed=5)
    if call == "send":
        expect_timeout(lambda timeout: tx.send(big, timeout=timeout))
        first_kind, first_digest = "object", ("bytes",) + digest(big)
    else:
        expect_timeout(lambda timeout: tx.send_bytes(big, timeout=timeout))
        first_kind, first_digest = "bytes", digest(big)
    pending = tx.send_pending
    # Some of it went out, the rest (at most the payload, its pickle and
    # headers) is pending.
    assert 0 < pending < len(big) + 64 * KiB
    # A send that cannot write its first byte sends nothing at all.
    with elapsed_at_most(SLACK):
        with pytest.raises(TimeoutError):
            tx.send_bytes(b"never sent", timeout=0)
    # flush() with a deadline of its own, still no reader: times out too.
    expect_timeout(lambda timeout: tx.flush(timeout=timeout))
    assert tx.send_pending == pending
    proc, report = start_digest_reader(children, closing, rx, [first_kind, "bytes", "bytes"])
    if explicit_flush:
        tx.flush(timeout=LONG)
        assert tx.send_pending == 0
        tx.flush(timeout=0)  # nothing pending: a no-op
    tx.send_bytes(b"after-1", timeout=LONG)
    assert tx.send_pending == 0
    tx.send_bytes(b"after-2", timeout=LONG)
    digests = report.recv(timeout=LONG)
    assert digests == [first_digest, digest(b"after-1"), digest(b"after-2")]
    children.finish(proc)


@pytest.mark.parametrize("final", ["recv_bytes", "recv_bytes_into", "mixed"])
@pytest.mark.timeout(180)
def test_slow_64mib_message_survives_timeouts(children, closing, method, final):
    size, chunk = 64 * MiB, MiB
    r, w = os.pipe()
    reader = closing(bigipc.Connection(r, writable=False))
    raw = closing(multiprocessing.connection.Connection(w, readable=False))
    control, theirs = make_pipe(closing, True)
    proc = children.start(method, _children.write_frame_slowly, raw, theirs, size, chunk, 0.02)
    raw.close()
    theirs.close()
    assert control.recv(timeout=LONG) == "started"
    # Header and first chunk are there, the rest is not: every kind of receive
    # times out and keeps what it read.
    assert reader.poll(LONG)
    expect_timeout(lambda timeout: reader.recv_bytes(timeout=timeout))
    expect_timeout(lambda timeout: reader.recv_bytes_into(bytearray(size), timeout=timeout))
    expect_timeout(lambda timeout: reader.recv(timeout=timeout))
    control.send("go")
    timeouts = 0
    buf = bytearray(size + 1)
    deadline = time.monotonic() + 120
    while True:
        kind = final if final != "mixed" else ("recv_bytes", "recv_bytes_into")[timeouts % 2]
        try:
            if kind == "recv_bytes":
                got = reader.recv_bytes(timeout=SHORT)
            else:
                n = reader.recv_bytes_into(buf, 1, timeout=SHORT)
                assert n == size
                got = bytes(buf[1 : 1 + n])
            break
        except TimeoutError:
            timeouts += 1
            assert time.monotonic() < deadline, "the message never completed"
    assert timeouts >= 2, "expected the slow message to outlast several timeouts"
    assert len(got) == size
    assert got == pattern(size, seed=7)
    assert reader.recv_bytes(timeout=LONG) == b"done"
    with pytest.raises(EOFError):
        reader.recv_bytes(timeout=LONG)
    children.finish(proc)


@pytest.mark.timeout(180)
def test_slow_multipart_object_survives_timeouts_and_signals(children, closing, method):
    # An object with large buffers arrives as a multipart message, slowly
    # and in stages: timeouts and signal handlers that raise interrupt its
    # receive again and again, and recv() still returns the whole object.
    r, w = os.pipe()
    reader = closing(bigipc.Connection(r, writable=False))
    raw = closing(multiprocessing.connection.Connection(w, readable=False))
    control, theirs = make_pipe(closing, True)
    proc = children.start(
        method, _children.write_multipart_slowly, raw, theirs, 256 * KiB, 0.0, b"done", [2 * MiB, 2 * MiB]
    )
    raw.close()
    theirs.close()
    assert control.recv(timeout=LONG) == "started"
    assert reader.poll(LONG)
    expect_timeout(lambda timeout: reader.recv(timeout=timeout))
    # The header said multipart: a plain receive refuses it and keeps it.
    with pytest.raises(bigipc.MultipartMessageError):
        reader.recv_bytes(timeout=SHORT)
    with pytest.raises(bigipc.MultipartMessageError):
        reader.recv_bytes_into(bytearray(32 * MiB), timeout=SHORT)
    control.send("go")
    expect_timeout(lambda timeout: reader.recv(timeout=timeout), timeout=0.5)
    control.send("go")
    with alarm(raise_interrupted, 0.5):
        with pytest.raises(Interrupted):
            reader.recv(timeout=LONG)
    control.send("go")
    assert reader.recv(timeout=LONG) == _children.big_object()
    assert reader.recv_bytes(timeout=LONG) == b"done"
    with pytest.raises(EOFError):
        reader.recv(timeout=LONG)
    children.finish(proc)


def test_recv_bytes_to_streams_and_resumes_after_timeout(children, closing, tmp_path):
    size = 16 * MiB
    r, w = os.pipe()
    reader = closing(bigipc.Connection(r, writable=False))
    raw = closing(multiprocessing.connection.Connection(w, readable=False))
    control, theirs = make_pipe(closing, True)
    proc = children.start("fork", _children.write_frame_slowly, raw, theirs, size, MiB, 0.0, b"done", [4 * MiB])
    raw.close()
    theirs.close()
    assert control.recv(timeout=LONG) == "started"
    path = tmp_path / "message.bin"
    with open(path, "wb") as f:
        expect_timeout(lambda timeout: reader.recv_bytes_to(f, chunk_size=64 * KiB, timeout=timeout))
        # Until the streamed message is finished, other receives refuse.
        with pytest.raises(ValueError):
            reader.recv_bytes(timeout=SHORT)
        control.send("go")
        expect_timeout(lambda timeout: reader.recv_bytes_to(f, chunk_size=64 * KiB, timeout=timeout), 0.5)
        control.send("go")
        written = reader.recv_bytes_to(f, chunk_size=64 * KiB, timeout=LONG)
        assert 0 < written < size
    assert path.read_bytes() == pattern(size, seed=7)
    out = io.BytesIO()
    assert reader.recv_bytes_to(out, timeout=LONG) == 4
    assert out.getvalue() == b"done"
    children.finish(proc)


def test_recv_many_with_wait_from_children(children, closing, method):
    readers = []
    procs = []
    for tag in range(3):
        r, w = make_pipe(closing, False)
        messages = [tagged_message(tag, seq, (seq * 977) % (20 * KiB)) for seq in range(300)]
        procs.append(children.start(method, _children.send_messages, w, messages))
        w.close()
        readers.append(r)
    got = {tag: [] for tag in range(3)}
    deadline = time.monotonic() + 90
    while readers:
        assert time.monotonic() < deadline
        ready = bigipc.wait(readers, timeout=LONG)
        assert ready
        for r in ready:
            try:
                batch = r.recv_many(64 * KiB, timeout=LONG)
            except EOFError:
                readers.remove(r)
                continue
            assert batch
            for message in batch:
                tag, seq = check_tagged(message)
                got[tag].append(seq)
    assert got == {tag: list(range(300)) for tag in range(3)}
    for proc in procs:
        children.finish(proc)


@pytest.mark.parametrize("bad", ["above-max-message-size", "negative-header"])
@pytest.mark.parametrize("mode", ["one-by-one", "recv_many"])
def test_messages_before_a_bad_frame_are_delivered(closing, mode, bad):
    # Two good messages, then a frame the receiver must reject. Receiving
    # one at a time delivers both and then raises FrameError; a batch
    # receive must not do worse and swallow the good ones with the bad.
    r, w = os.pipe()
    reader = closing(bigipc.Connection(r, writable=False, max_message_size=1000))
    bad_header = frame_header(5000) if bad == "above-max-message-size" else struct.pack("!i", -5)
    os.write(w, frame_header(3) + b"one" + frame_header(3) + b"two" + bad_header)
    try:
        assert reader.poll(LONG)
        got = []
        with pytest.raises(FrameError):
            while True:
                if mode == "recv_many":
                    got.extend(reader.recv_many(65536, timeout=LONG))
                else:
                    got.append(reader.recv_bytes(timeout=LONG))
        assert got == [b"one", b"two"]
        # And the receive side stays failed.
        with pytest.raises(FrameError):
            reader.recv_bytes(timeout=LONG)
    finally:
        os.close(w)


def test_timeout_is_a_deadline_for_the_whole_call(children, closing):
    # A sender that trickles one byte every 50 ms never lets a read block for
    # long, yet the receive must still end at its deadline.
    r, w = os.pipe()
    reader = closing(bigipc.Connection(r, writable=False))
    raw = closing(multiprocessing.connection.Connection(w, readable=False))
    control, theirs = make_pipe(closing, True)
    proc = children.start("fork", _children.write_frame_slowly, raw, theirs, 40, 1, 0.05)
    raw.close()
    theirs.close()
    assert control.recv(timeout=LONG) == "started"
    control.send("go")
    expect_timeout(lambda timeout: reader.recv_bytes(timeout=timeout), timeout=0.5)
    assert reader.recv_bytes(timeout=LONG) == pattern(40, seed=7)
    assert reader.recv_bytes(timeout=LONG) == b"done"
    children.finish(proc)


# --------------------------------------------------------------------------
# interoperability with multiprocessing.connection.Connection


def _transport(kind):
    """(fd_a, fd_b, duplex): a read/write pair of descriptors."""
    if kind == "pipe":
        r, w = os.pipe()
        return r, w, False
    s1, s2 = socket.socketpair()
    return s1.detach(), s2.detach(), True


INTEROP_SIZES = [0, 1, 16 * KiB, 200 * KiB, 3 * MiB]


@pytest.mark.parametrize("direction", ["bigipc-to-stdlib", "stdlib-to-bigipc"])
@pytest.mark.parametrize("transport", ["pipe", "socketpair"])
def test_stdlib_interop_in_process(closing, transport, direction):
    fd_r, fd_w, duplex = _transport(transport)
    if direction == "bigipc-to-stdlib":
        sender = closing(bigipc.Connection(fd_w, readable=duplex))
        # Large buffers would go out of band, which only bigipc reads
        # (docs/protocol.md): off for a stdlib peer.
        sender.out_of_band_threshold = None
        receiver = closing(multiprocessing.connection.Connection(fd_r, writable=duplex))
    else:
        sender = closing(multiprocessing.connection.Connection(fd_w, readable=duplex))
        receiver = closing(bigipc.Connection(fd_r, writable=duplex))
    messages = [pattern(n, seed=n) for n in INTEROP_SIZES]
    objects = [sample_object(n) for n in INTEROP_SIZES]

    def send_all():
        for message, obj in zip(messages, objects):
            sender.send_bytes(message)
            sender.send(obj)

    thread = threading.Thread(target=send_all, daemon=True)
    thread.start()
    for message, obj in zip(messages, objects):
        assert receiver.poll(LONG)
        if isinstance(receiver, bigipc.Connection):
            assert receiver.recv_bytes(timeout=LONG) == message
            assert receiver.recv(timeout=LONG) == obj
        else:
            assert receiver.recv_bytes() == message
            assert receiver.poll(LONG)
            assert receiver.recv() == obj
    thread.join(JOIN)
    assert not thread.is_alive()
    if duplex:
        # And back the other way on the same socket pair.
        receiver.send_bytes(b"reply")
        assert sender.poll(LONG)
        assert sender.recv_bytes() == b"reply"


@pytest.mark.parametrize("child_kind", ["stdlib-in-child", "bigipc-in-child"])
@pytest.mark.parametrize("transport", ["pipe", "socketpair"])
def test_stdlib_interop_across_processes(children, closing, method, transport, child_kind):
    # The child echoes with one kind of Connection, the parent talks with the
    # other kind on the other end of the same descriptors.
    if transport == "socketpair":
        fd_parent, fd_child, _ = _transport("socketpair")
        parent_kind = bigipc.Connection if child_kind == "stdlib-in-child" else multiprocessing.connection.Connection
        child_kind_cls = multiprocessing.connection.Connection if child_kind == "stdlib-in-child" else bigipc.Connection
        parent = closing(parent_kind(fd_parent))
        child_end = closing(child_kind_cls(fd_child))
        proc = children.start(method, _children.echo, child_end)
        child_end.close()
        tx = rx = parent
    else:
        r1, w1 = os.pipe()  # parent -> child
        r2, w2 = os.pipe()  # child -> parent
        if child_kind == "stdlib-in-child":
            child_cls, parent_cls = multiprocessing.connection.Connection, bigipc.Connection
        else:
            child_cls, parent_cls = bigipc.Connection, multiprocessing.connection.Connection
        child_r = closing(child_cls(r1, writable=False))
        child_w = closing(child_cls(w2, readable=False))
        tx = closing(parent_cls(w1, readable=False))
        rx = closing(parent_cls(r2, writable=False))
        proc = children.start(method, _children.echo_between, child_r, child_w)
        child_r.close()
        child_w.close()
    if isinstance(tx, bigipc.Connection):
        tx.out_of_band_threshold = None  # the peer is a stdlib Connection
    first = _children.recv_any(rx, LONG)
    infos = first if isinstance(first, tuple) else (first,)
    for info in infos:
        assert info["is_bigipc"] == (child_kind == "bigipc-in-child"), info
    for n in INTEROP_SIZES:
        data = pattern(n, seed=n + 11)
        tx.send_bytes(data)
        assert _children.recv_bytes_any(rx, LONG) == data
        tx.send(sample_object(n))
        assert _children.recv_any(rx, LONG) == sample_object(n)
    tx.send_bytes(b"STOP")
    children.finish(proc)


def test_default_send_reaches_a_stdlib_peer_when_no_buffer_is_large(closing):
    # With the default out-of-band threshold, objects without a large buffer
    # (however large their pickle) are plain messages a stdlib peer reads.
    fd_r, fd_w, _ = _transport("socketpair")
    sender = closing(bigipc.Connection(fd_w))
    receiver = closing(multiprocessing.connection.Connection(fd_r))
    objects = [
        list(range(50000)),  # a pickle of a few hundred KiB, no buffers
        ("nested bytes", pattern(MiB)),  # bytes inside a container stay in band
        {"small bytearray": bytearray(pattern(60 * KiB))},  # below the threshold
        "text" * 40000,
    ]

    def send_all():
        for obj in objects:
            sender.send(obj, timeout=LONG)

    thread = threading.Thread(target=send_all, daemon=True)
    thread.start()
    for obj in objects:
        assert receiver.poll(LONG)
        assert receiver.recv() == obj
    thread.join(JOIN)
    assert not thread.is_alive()


def test_large_buffers_go_out_of_band_between_bigipc_ends(children, closing):
    np = pytest.importorskip("numpy")
    tx, rx, proc, _ = start_echo(children, closing, "fork", True)
    assert tx.out_of_band_threshold == 64 * KiB
    arr = np.arange(MiB // 8, dtype=np.float64).reshape(256, -1)
    objects = [
        pattern(MiB),  # top-level bytes
        bytearray(pattern(200 * KiB)),  # top-level bytearray
        {"a": arr, "b": bytearray(pattern(70 * KiB)), "small": b"x" * 10},
        pickle.PickleBuffer(bytearray(pattern(100 * KiB, seed=2))),
    ]
    for obj in objects:
        tx.send(obj, timeout=LONG)
    # A multipart message is not for recv_bytes: it says so, and the
    # message stays for recv().
    assert rx.poll(LONG)
    with pytest.raises(bigipc.MultipartMessageError):
        rx.recv_bytes(timeout=LONG)
    assert isinstance(bigipc.MultipartMessageError("x"), OSError)
    with pytest.raises(bigipc.MultipartMessageError):
        rx.recv_bytes_into(bytearray(4 * MiB), timeout=LONG)
    got = rx.recv(timeout=LONG)
    assert type(got) is bytes and got == objects[0]
    got = rx.recv(timeout=LONG)
    assert type(got) is bytearray and got == objects[1]
    got = rx.recv(timeout=LONG)
    assert np.array_equal(got["a"], arr) and got["a"].flags.writeable
    assert got["b"] == objects[2]["b"] and got["small"] == b"x" * 10
    got = rx.recv(timeout=LONG)
    assert bytes(got) == pattern(100 * KiB, seed=2)
    # Off: the same object becomes one plain message.
    tx.out_of_band_threshold = None
    tx.send(pattern(MiB), timeout=LONG)
    assert pickle.loads(rx.recv_bytes(timeout=LONG)) == pattern(MiB)
    stop_echo(children, tx, proc)


@pytest.mark.parametrize("duplex", [True, False], ids=["duplex", "simplex"])
def test_adopt_takes_over_in_place(closing, duplex):
    receiving, sending = multiprocessing.Pipe(duplex=duplex)
    closing(sending)  # not the other: the test wants it collected
    # Data in flight before the takeover.
    sending.send({"before": 1})
    sending.send_bytes(b"raw before")
    fd = receiving.fileno()
    flags = (receiving.readable, receiving.writable)
    adopted = closing(bigipc.Connection.adopt(receiving))
    assert isinstance(adopted, bigipc.Connection)
    assert adopted.fileno() == fd
    assert (adopted.readable, adopted.writable) == flags
    assert receiving.closed
    with pytest.raises(OSError):
        receiving.fileno()
    with pytest.raises(OSError):
        receiving.recv()
    # Closing and collecting the old object leaves the descriptor alone.
    receiving.close()
    gone = weakref.ref(receiving)
    del receiving
    gc.collect()
    assert gone() is None
    os.fstat(fd)
    assert adopted.recv(timeout=LONG) == {"before": 1}
    assert adopted.recv_bytes(timeout=LONG) == b"raw before"
    sending.send("after")
    assert adopted.recv(timeout=LONG) == "after"
    if duplex:
        adopted.send("back")
        assert sending.poll(LONG)
        assert sending.recv() == "back"
    # And the adopted end closes the descriptor when it is closed.
    adopted.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_adopt_a_stdlib_end_a_child_is_writing_to(children, closing, method):
    reader, writer = multiprocessing.Pipe(duplex=False)
    closing(reader, writer)
    messages = [b"m%d" % i + pattern(i * 50 * KiB, seed=i) for i in range(5)]
    proc = children.start(method, _children.send_messages, writer, messages, 0.5)
    writer.close()
    assert reader.poll(LONG)  # the child has started writing
    adopted = closing(bigipc.Connection.adopt(reader))
    for message in messages:
        assert adopted.recv_bytes(timeout=LONG) == message
    with pytest.raises(EOFError):
        adopted.recv_bytes(timeout=LONG)
    children.finish(proc)


def test_adopt_errors(closing):
    a, b = make_pipe(closing, True)
    with pytest.raises(TypeError):
        bigipc.Connection.adopt(a)
    s1, s2 = socket.socketpair()
    with s1, s2:
        with pytest.raises(TypeError):
            bigipc.Connection.adopt(s1)
    c, d = multiprocessing.Pipe()
    closing(d)
    c.close()
    with pytest.raises(OSError):
        bigipc.Connection.adopt(c)


# --------------------------------------------------------------------------
# wait() and selectors


@pytest.mark.parametrize("wait", [bigipc.wait, multiprocessing.connection.wait], ids=["bigipc.wait", "mp.wait"])
@pytest.mark.parametrize("slow", [False, True], ids=["fast", "slow"])
def test_wait_many_children(children, closing, method, wait, slow):
    # CPython's TestWait.test_wait, with bigipc Connections.
    readers = []
    procs = []
    for tag in range(4):
        r, w = make_pipe(closing, False)
        procs.append(children.start(method, _children.send_objects_slowly, w, tag, 10, 0.05 if slow else 0))
        w.close()
        readers.append(r)
    results = []
    deadline = time.monotonic() + 90
    while readers:
        left = deadline - time.monotonic()
        assert left > 0
        # Spawned children on a loaded machine can take many seconds to start:
        # the bound is the test's whole deadline, not one LONG.
        ready = wait(readers, timeout=left)
        assert ready, "wait() timed out with children still sending"
        for r in ready:
            assert r in readers
            try:
                msg = r.recv(timeout=LONG)
            except EOFError:
                readers.remove(r)
                r.close()
            else:
                results.append(msg)
    pids = {p.pid for p in procs}
    assert {pid for _, _, pid in results} == pids
    assert sorted((tag, i) for tag, i, _ in results) == [(t, i) for t in range(4) for i in range(10)]
    for proc in procs:
        children.finish(proc)


def test_wait_timeout_and_readiness(closing):
    a, b = make_pipe(closing, True)
    c, d = make_pipe(closing, False)
    start = time.monotonic()
    assert bigipc.wait([a, c], timeout=SHORT) == []
    assert SHORT - 0.05 <= time.monotonic() - start < SHORT + SLACK
    assert bigipc.wait([a, c], timeout=0) == []
    d.send(1)
    assert bigipc.wait([a, c], timeout=LONG) == [c]
    b.send(2)
    assert set(bigipc.wait([a, c], timeout=LONG)) == {a, c}
    assert c.recv(timeout=LONG) == 1 and a.recv(timeout=LONG) == 2
    assert bigipc.wait([a, c], timeout=0) == []


def test_wait_reports_eof(children, closing, method):
    r1, w1 = make_pipe(closing, False)
    r2, w2 = make_pipe(closing, True)
    proc = children.start(method, _children.exit_at_once, w1, w2)
    w1.close()
    w2.close()
    children.finish(proc)
    assert set(bigipc.wait([r1, r2], timeout=LONG)) == {r1, r2}
    for r in (r1, r2):
        with pytest.raises(EOFError):
            r.recv(timeout=LONG)


def test_wait_mixes_bigipc_and_stdlib_connections(closing):
    a, b = make_pipe(closing, False)
    c, d = multiprocessing.Pipe(duplex=False)
    closing(c, d)
    s1, s2 = socket.socketpair()
    with s1, s2:
        d.send("stdlib")
        s2.sendall(b"x")
        ready = bigipc.wait([a, c, s1], timeout=LONG)
        assert set(ready) == {c, s1}
        b.send("bigipc")
        assert a in bigipc.wait([a], timeout=LONG)


def test_selector_registration(children, closing):
    rx, tx = make_pipe(closing, False)
    with selectors.DefaultSelector() as sel:
        key = sel.register(rx, selectors.EVENT_READ, data="rx")
        assert key.fd == rx.fileno()
        assert sel.select(timeout=0) == []
        proc = children.start("fork", _children.send_messages, tx, [b"hi"])
        tx.close()
        events = sel.select(timeout=LONG)
        assert [(k.fileobj, k.data, ev) for k, ev in events] == [(rx, "rx", selectors.EVENT_READ)]
        assert rx.recv_bytes(timeout=LONG) == b"hi"
        sel.unregister(rx)
        children.finish(proc)
    a, b = make_pipe(closing, True)
    with selectors.DefaultSelector() as sel:
        sel.register(a, selectors.EVENT_READ | selectors.EVENT_WRITE)
        events = sel.select(timeout=LONG)
        assert events and events[0][1] == selectors.EVENT_WRITE
        b.send(5)
        deadline = time.monotonic() + LONG
        while time.monotonic() < deadline:
            events = sel.select(timeout=LONG)
            if events[0][1] & selectors.EVENT_READ:
                break
        assert events[0][1] & selectors.EVENT_READ
        assert a.recv(timeout=LONG) == 5


# --------------------------------------------------------------------------
# threads


@pytest.mark.parametrize("kind", ["send_bytes", "send", "send-out-of-band"])
@pytest.mark.parametrize("duplex", [True, False], ids=["duplex", "simplex"])
def test_sends_from_threads_never_interleave(children, closing, duplex, kind):
    objects = kind != "send_bytes"
    rx, tx = make_pipe(closing, duplex)
    per_thread, nthreads = 40, 4
    sizes = [10, 100 * KiB, 7, 1536 * KiB, 33 * KiB, 0]
    report_r, report_w = make_pipe(closing, False)
    proc = children.start("fork", _children.validate_tagged, rx, report_w, per_thread * nthreads, objects)
    report_w.close()
    errors = []

    def sender(tag):
        try:
            for seq in range(per_thread):
                message = tagged_message(tag, seq, sizes[(seq + tag) % len(sizes)])
                if kind == "send-out-of-band":
                    # A bytearray of 64 KiB or more travels out of band: a
                    # multipart message.
                    tx.send((tag, seq, bytearray(message)), timeout=LONG)
                elif objects:
                    tx.send((tag, seq, message), timeout=LONG)
                else:
                    tx.send_bytes(message, timeout=LONG)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(tag,), daemon=True) for tag in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN)
        assert not t.is_alive()
    assert errors == []
    seen, bad = report_r.recv(timeout=LONG)
    assert bad == []
    assert sorted(seen) == sorted((tag, seq) for tag in range(nthreads) for seq in range(per_thread))
    for tag in range(nthreads):
        # Each thread's own messages arrive in its order.
        assert [s for t, s in seen if t == tag] == list(range(per_thread))
    children.finish(proc)


@pytest.mark.parametrize("kind", ["bytes", "objects"])
@pytest.mark.parametrize("duplex", [True, False], ids=["duplex", "simplex"])
def test_receives_from_threads_get_whole_messages(children, closing, duplex, kind):
    rx, tx = make_pipe(closing, duplex)
    nthreads, count = 4, 200
    sizes = [3, 250 * KiB, 0, 70 * KiB, 1100 * KiB, 16 * KiB]
    proc = children.start("fork", _children.send_tagged, tx, [9], count, sizes, nthreads, kind == "objects")
    tx.close()
    got = [[] for _ in range(nthreads)]
    errors = []

    def receiver(i):
        buf = bytearray(2 * MiB)
        try:
            while True:
                if kind == "objects":
                    # bytearrays, the large ones sent out of band
                    message = rx.recv(timeout=LONG)
                elif i % 2:
                    n = rx.recv_bytes_into(buf, timeout=LONG)
                    message = bytes(buf[:n])
                else:
                    message = rx.recv_bytes(timeout=LONG)
                if message == b"STOP":
                    return
                got[i].append(check_tagged(message))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=receiver, args=(i,), daemon=True) for i in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN)
        assert not t.is_alive()
    assert errors == []
    everything = sorted(m for per in got for m in per)
    assert everything == [(9, seq) for seq in range(count)]
    for per in got:
        # A thread's messages come in stream order.
        assert per == sorted(per)
    children.finish(proc)


# --------------------------------------------------------------------------
# peer death


@pytest.mark.parametrize("how", ["kill", "exit"])
@pytest.mark.parametrize(
    "announced,written",
    # 2**31 + 5 is the smallest length that needs the 12-byte header.
    [
        (MiB + 3 * KiB, 600 * KiB),
        (MiB + 3 * KiB, 0),
        (MiB + 3 * KiB, -2),
        (2**31 + 5, -8),
        # The receiver allocates the 2 GiB it was promised before EOF shows.
        pytest.param(2**31 + 5, 10, marks=pytest.mark.slow),
    ],
    ids=["mid-payload", "after-header", "mid-header", "mid-long-header", "after-long-header"],
)
def test_peer_dies_mid_frame(children, closing, how, announced, written):
    # written: payload bytes sent before dying; negative: only that many
    # bytes of the header.
    r, w = os.pipe()
    reader = closing(bigipc.Connection(r, writable=False))
    raw = closing(multiprocessing.connection.Connection(w, readable=False))
    control, theirs = make_pipe(closing, True)
    proc = children.start("fork", _children.write_partial_frame, raw, theirs, announced, written, how)
    raw.close()
    theirs.close()
    assert control.recv(timeout=LONG) == "writing"

    def kill_when_written():
        try:
            control.recv(timeout=LONG)
        finally:
            proc.kill()

    killer = None
    if how == "kill":
        killer = threading.Thread(target=kill_when_written, daemon=True)
        killer.start()
    with elapsed_at_most(15):
        with pytest.raises(TruncatedMessageError) as info:
            reader.recv_bytes(timeout=LONG)
    assert isinstance(info.value, FrameError) and isinstance(info.value, OSError)
    # The stream cannot be trusted any more: every receive says so, and
    # poll() does not hide it.
    assert reader.poll(0)
    with pytest.raises(FrameError):
        reader.recv_bytes(timeout=LONG)
    with pytest.raises(FrameError):
        reader.recv_bytes_into(bytearray(10), timeout=LONG)
    if killer is not None:
        killer.join(JOIN)
        children.finish(proc, exitcode=-signal.SIGKILL)
    else:
        children.finish(proc)


def test_peer_killed_while_we_are_blocked_in_recv(children, closing):
    r, w = os.pipe()
    reader = closing(bigipc.Connection(r, writable=False))
    raw = closing(multiprocessing.connection.Connection(w, readable=False))
    control, theirs = make_pipe(closing, True)
    # Less than the 64 KiB pipe holds: the child gets to "written" on its own.
    proc = children.start("fork", _children.write_partial_frame, raw, theirs, MiB + 5 * KiB, 60 * KiB, "kill")
    raw.close()
    theirs.close()
    assert control.recv(timeout=LONG) == "writing"
    assert control.recv(timeout=LONG) == "written"
    timer = threading.Timer(0.5, proc.kill)
    timer.start()
    try:
        with elapsed_at_most(15):
            with pytest.raises(TruncatedMessageError):
                reader.recv(timeout=LONG)
    finally:
        timer.cancel()
    children.finish(proc, exitcode=-signal.SIGKILL)


@pytest.mark.parametrize("duplex", [True, False], ids=["duplex", "simplex"])
def test_peer_dies_with_nothing_in_flight(children, closing, method, duplex):
    rx, tx = make_pipe(closing, duplex)
    proc = children.start(method, _children.send_messages, tx, [b"last words", b""])
    tx.close()
    assert rx.recv_bytes(timeout=LONG) == b"last words"
    assert rx.recv_bytes(timeout=LONG) == b""
    with elapsed_at_most(SLACK + LONG):
        with pytest.raises(EOFError):
            rx.recv(timeout=LONG)
    with pytest.raises(EOFError):
        rx.recv_bytes_into(bytearray(4), timeout=LONG)
    with pytest.raises(EOFError):
        rx.recv_bytes(timeout=0)
    assert rx.poll(0)  # end of file is "readable"
    children.finish(proc)


@pytest.mark.parametrize("size", [10, 8 * MiB], ids=["small", "8MiB"])
@pytest.mark.parametrize("duplex", [True, False], ids=["duplex", "simplex"])
def test_send_to_dead_reader_is_broken_pipe(children, closing, duplex, size):
    rx, tx = make_pipe(closing, duplex)
    proc = children.start("fork", _children.exit_at_once, rx)
    rx.close()
    children.finish(proc)
    with elapsed_at_most(SLACK):
        with pytest.raises(BrokenPipeError):
            tx.send_bytes(pattern(size), timeout=LONG)
    with pytest.raises(BrokenPipeError):
        tx.send("again", timeout=LONG)


@pytest.mark.parametrize("duplex", [True, False], ids=["duplex", "simplex"])
def test_reader_dies_while_we_are_blocked_sending(children, closing, duplex):
    rx, tx = make_pipe(closing, duplex)
    control_r, control_w = make_pipe(closing, False)
    proc = children.start("fork", _children.read_a_little_then_exit, rx, control_w, 100 * KiB)
    rx.close()
    control_w.close()
    with elapsed_at_most(LONG):
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            tx.send_bytes(pattern(64 * MiB), timeout=LONG)
    assert control_r.recv(timeout=LONG) == 100 * KiB
    children.finish(proc)


# --------------------------------------------------------------------------
# signals


@pytest.mark.parametrize("call", sorted(RECV_CALLS))
@pytest.mark.parametrize("duplex", [True, False], ids=["duplex", "simplex"])
def test_signal_interrupts_blocked_recv(closing, duplex, call):
    rx, tx = make_pipe(closing, duplex)
    with alarm(raise_interrupted, 0.2):
        with elapsed_at_most(SLACK):
            with pytest.raises(Interrupted):
                RECV_CALLS[call](rx, None)
    tx.send("after the signal")
    tx.send_bytes(b"second")
    assert rx.recv(timeout=LONG) == "after the signal"
    assert rx.recv_bytes(timeout=LONG) == b"second"


@pytest.mark.timeout(180)
def test_signal_interrupts_recv_mid_message_stream_stays_in_sync(children, closing):
    # The child writes the message in stages and waits for a "go" between
    # them, so each alarmed receive certainly blocks mid-message: the signal
    # never lands after a receive that completed (where Python itself would
    # drop the returned message on the floor).
    size, step = 64 * MiB, 4 * MiB
    r, w = os.pipe()
    reader = closing(bigipc.Connection(r, writable=False))
    raw = closing(multiprocessing.connection.Connection(w, readable=False))
    control, theirs = make_pipe(closing, True)
    proc = children.start(
        "fork", _children.write_frame_slowly, raw, theirs, size, MiB, 0.0, b"done", [step, step, step]
    )
    raw.close()
    theirs.close()
    assert control.recv(timeout=LONG) == "started"
    assert reader.poll(LONG)
    with alarm(raise_interrupted, 0.3):
        with pytest.raises(Interrupted):
            reader.recv_bytes(timeout=LONG)
    buf = bytearray(size)
    for stage in range(3):
        control.send("go")
        with alarm(raise_interrupted, 0.5):
            with elapsed_at_most(SLACK):
                with pytest.raises(Interrupted):
                    if stage % 2:
                        reader.recv_bytes_into(buf, timeout=LONG)
                    else:
                        reader.recv(timeout=LONG)
    control.send("go")
    assert reader.recv_bytes_into(buf, timeout=LONG) == size
    assert buf == pattern(size, seed=7)
    assert reader.recv_bytes(timeout=LONG) == b"done"
    with pytest.raises(EOFError):
        reader.recv_bytes(timeout=LONG)
    children.finish(proc)


@pytest.mark.parametrize("call", ["send", "send_bytes"])
@pytest.mark.parametrize("duplex", [True, False], ids=["duplex", "simplex"])
def test_signal_interrupts_blocked_send(children, closing, duplex, call):
    rx, tx = make_pipe(closing, duplex)
    big = bytearray(pattern(32 * MiB, seed=21))
    with alarm(raise_interrupted, 0.3):
        with elapsed_at_most(SLACK):
            with pytest.raises(Interrupted):
                if call == "send":
                    tx.send(big)
                else:
                    tx.send_bytes(big)
    if call == "send":
        first_kind, first_digest = "object", ("bytearray",) + digest(big)
    else:
        first_kind, first_digest = "bytes", digest(big)
    assert 0 < tx.send_pending <= len(big) + 64 * KiB
    # The caller may reuse its buffer at once: what is pending was kept aside.
    big[:] = b"\0" * len(big)
    proc, report = start_digest_reader(children, closing, rx, [first_kind, "bytes"])
    tx.send_bytes(b"after", timeout=LONG)
    assert tx.send_pending == 0
    assert report.recv(timeout=LONG) == [first_digest, digest(b"after")]
    children.finish(proc)


def test_signal_handler_that_returns_lets_the_call_go_on(children, closing):
    rx, tx = make_pipe(closing, False)
    calls = []
    with alarm(lambda signum, frame: calls.append(signum), 0.05, 0.05):
        expect_timeout(lambda timeout: rx.recv(timeout=timeout), timeout=0.6)
        assert len(calls) >= 3
        # A message that arrives while the signals keep coming is received.
        proc = children.start("fork", _children.send_messages, tx, [pickle.dumps("late")], 0)
        assert rx.recv(timeout=LONG) == "late"
        # A blocked send with no reader also runs to its deadline.
        calls.clear()
        big = pattern(16 * MiB)
        other_rx, other_tx = make_pipe(closing, True)
        expect_timeout(lambda timeout: other_tx.send_bytes(big, timeout=timeout), timeout=0.6)
        assert len(calls) >= 3
    children.finish(proc)
    reader_proc, report = start_digest_reader(children, closing, other_rx, ["bytes", "bytes"])
    other_tx.send_bytes(b"x", timeout=LONG)
    assert report.recv(timeout=LONG) == [digest(big), digest(b"x")]
    children.finish(reader_proc)


# --------------------------------------------------------------------------
# message size limits


@pytest.mark.parametrize(
    "header",
    [frame_header(2**31 - 1), frame_header(1 << 30), frame_header(1 << 40), frame_header(MiB + 1)],
    ids=["2GiB-1", "1GiB", "1TiB-long", "1MiB+1"],
)
def test_max_message_size_rejects_header_before_allocating(closing, header):
    r, w = os.pipe()
    reader = closing(bigipc.Connection(r, writable=False, max_message_size=MiB))
    os.write(w, header)
    try:
        tracemalloc.start()
        try:
            with elapsed_at_most(SLACK):
                with pytest.raises(FrameError) as info:
                    reader.recv_bytes(timeout=LONG)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert not isinstance(info.value, TruncatedMessageError)
        assert peak < MiB, "allocated %d bytes before rejecting the header" % peak
        # The receive side stays failed.
        with pytest.raises(FrameError):
            reader.recv(timeout=LONG)
    finally:
        os.close(w)


def test_max_message_size_boundary_through_pipe(closing):
    rx, tx = make_pipe(closing, False, max_message_size=1000)
    tx.send_bytes(b"a" * 1000)
    assert rx.recv_bytes(timeout=LONG) == b"a" * 1000
    tx.send_bytes(b"b" * 1001)
    with pytest.raises(FrameError):
        rx.recv_bytes(timeout=LONG)


def test_max_message_size_travels_to_the_child(children, closing, method):
    a, b = make_pipe(closing, True, max_message_size=777)
    proc = children.start(method, _children.report, b)
    b.close()
    assert a.recv(timeout=LONG)["max_message_size"] == 777
    children.finish(proc)


def test_recv_bytes_maxlength_keeps_the_message(closing):
    rx, tx = make_pipe(closing, True)
    tx.send_bytes(b"z" * 100)
    tx.send("next")
    with pytest.raises(MessageTooLong) as info:
        rx.recv_bytes(10, timeout=LONG)
    assert isinstance(info.value, OSError)
    assert info.value.length == 100 and info.value.maxlength == 10
    with pytest.raises(MessageTooLong):
        rx.recv_bytes(99, timeout=LONG)
    assert rx.recv_bytes(100, timeout=LONG) == b"z" * 100
    assert rx.recv(timeout=LONG) == "next"
    with pytest.raises(ValueError):
        rx.recv_bytes(-1, timeout=LONG)
    # A pickled object that is too long stays for recv() too.
    tx.send(sample_object(5000))
    with pytest.raises(MessageTooLong):
        rx.recv_bytes(100, timeout=LONG)
    assert rx.recv(timeout=LONG) == sample_object(5000)


def test_buffer_too_short_consumes_and_carries_message(closing):
    rx, tx = make_pipe(closing, False)
    tx.send_bytes(b"long message" * 10)
    tx.send_bytes(b"fits")
    buf = bytearray(20)
    with pytest.raises(BufferTooShort) as info:
        rx.recv_bytes_into(buf, timeout=LONG)
    assert info.value.args == (b"long message" * 10,)
    assert isinstance(info.value, multiprocessing.BufferTooShort)
    assert rx.recv_bytes_into(buf, 3, timeout=LONG) == 4
    assert buf[3:7] == b"fits"


# --------------------------------------------------------------------------
# numpy


@pytest.mark.parametrize("method_", ["fork", "spawn"])
def test_numpy_arrays(children, closing, method_):
    np = pytest.importorskip("numpy")
    arr = np.random.default_rng(1).standard_normal(MiB)  # 8 MiB of float64
    assert arr.nbytes == 8 * MiB
    a, b = make_pipe(closing, True)
    proc = children.start(method_, _children.numpy_echo, b)
    b.close()
    a.send(arr, timeout=LONG)
    back = a.recv(timeout=LONG)
    assert back.dtype == np.float64 and back.shape == arr.shape
    assert np.array_equal(back, arr)
    a.send_bytes(arr, timeout=LONG)
    out = np.zeros_like(arr)
    assert a.recv_bytes_into(out, timeout=LONG) == arr.nbytes
    assert np.array_equal(out, arr)
    children.finish(proc)


@pytest.mark.parametrize("call", ["send", "send_bytes"])
def test_numpy_array_reused_after_a_timed_out_send(children, closing, call):
    # The rest of a timed-out send is kept aside: the sender may overwrite
    # its array at once, the receiver still gets the original contents.
    np = pytest.importorskip("numpy")
    rx, tx = make_pipe(closing, True)
    arr = np.random.default_rng(3).standard_normal(4 * MiB)  # 32 MiB
    original = arr.copy()
    if call == "send":
        expect_timeout(lambda timeout: tx.send(arr, timeout=timeout))
    else:
        expect_timeout(lambda timeout: tx.send_bytes(arr, timeout=timeout))
    assert tx.send_pending > 0
    arr[:] = 0.0
    kind = "object" if call == "send" else "bytes"
    proc, report = start_digest_reader(children, closing, rx, [kind, "bytes"])
    tx.send_bytes(b"end", timeout=LONG)
    first, last = report.recv(timeout=LONG)
    assert last == digest(b"end")
    assert first[-2:] == digest(original.tobytes())
    children.finish(proc)


def test_numpy_send_bytes_offset_and_size_in_bytes(closing):
    np = pytest.importorskip("numpy")
    rx, tx = make_pipe(closing, False)
    arr = np.arange(1000, dtype=np.float64)
    tx.send_bytes(arr, 80, 160)
    got = np.frombuffer(rx.recv_bytes(timeout=LONG), dtype=np.float64)
    assert np.array_equal(got, arr[10:30])
    tx.send_bytes(arr[::2].copy())
    out = np.zeros(1000, dtype=np.float64)
    assert rx.recv_bytes_into(out, 8 * 500, timeout=LONG) == 4000
    assert np.array_equal(out[500:], arr[::2]) and not out[:500].any()


# --------------------------------------------------------------------------
# fork with a lock held by another thread


def test_fork_while_a_thread_holds_the_receive_lock(children, closing):
    # A parent thread is blocked in recv() (holding the receive lock) when
    # the child is forked; the child's own recv() must not wait for a thread
    # that does not exist in the child.
    rx, tx = make_pipe(closing, True)
    report_r, report_w = make_pipe(closing, False)
    outcome = []

    def blocked_receiver():
        try:
            rx.recv(timeout=1.5)
        except TimeoutError:
            outcome.append("timeout")
        except BaseException as exc:  # reported below
            outcome.append(exc)

    thread = threading.Thread(target=blocked_receiver, daemon=True)
    thread.start()
    time.sleep(0.3)  # let it take the lock and block
    proc = children.start("fork", _children.recv_after_fork, rx, report_w)
    report_w.close()
    thread.join(JOIN)
    assert outcome == ["timeout"]
    # Only the child reads from now on.
    tx.send("for the child")
    assert report_r.recv(timeout=LONG) == ("ok", "for the child")
    children.finish(proc)


def test_threads_of_a_forked_child_take_turns_on_an_inherited_connection(children, closing):
    # The receive side is free at fork. In the child, one thread holds it
    # (blocked on the empty channel); a second thread must wait for it and
    # time out waiting, not receive in its place or beside it.
    rx, tx = make_pipe(closing, True)
    rx.send_bytes(b"used in the parent")
    assert tx.recv_bytes(timeout=LONG) == b"used in the parent"
    report_r, report_w = make_pipe(closing, False)
    proc = children.start("fork", _children.threads_contend_after_fork, rx, report_w)
    report_w.close()
    assert report_r.recv(timeout=LONG) == ("second", "timed out waiting for another thread's receive")
    tx.send_bytes(b"for the holder")
    assert report_r.recv(timeout=LONG) == ("holder", [("ok", b"for the holder")])
    children.finish(proc)


def test_fork_child_detaching_its_copy_keeps_parent_timeouts(children, closing):
    # Under fork the child has a copy of the parent's Connection, on the same
    # open file description. detach() in the child must not take away what
    # the parent's deadlines rely on: the parent's recv(timeout=...) still
    # ends at its deadline.
    rx, tx = make_pipe(closing, False)
    proc = children.start("fork", _children.detach_and_exit, rx)
    children.finish(proc)
    outcome = []

    def receive():
        try:
            outcome.append(("ok", rx.recv_bytes(timeout=0.5)))
        except BaseException as exc:  # reported below
            outcome.append(("error", type(exc).__name__))

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    thread.join(SLACK)
    hung = thread.is_alive()
    if hung:
        # Unblock the thread stuck in a blocking read before failing.
        tx.send_bytes(b"unblock")
        thread.join(JOIN)
    assert not hung, "recv(timeout=0.5) still blocked after %s s" % SLACK
    assert outcome == [("error", "TimeoutError")]


def test_send_behind_another_threads_blocked_send(children, closing):
    # Thread A is blocked sending a message nobody reads yet; a send from
    # the main thread with a deadline gives up waiting for A and sends
    # nothing, and A's message arrives whole.
    rx, tx = make_pipe(closing, False)
    big = pattern(8 * MiB, seed=8)
    errors = []

    def send_big():
        try:
            tx.send_bytes(big, timeout=LONG)
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=send_big, daemon=True)
    thread.start()
    time.sleep(0.3)  # let it take the send lock and fill the pipe
    expect_timeout(lambda timeout: tx.send_bytes(b"queue-jumper", timeout=timeout))
    proc, report = start_digest_reader(children, closing, rx, ["bytes", "bytes"])
    thread.join(JOIN)
    assert not thread.is_alive() and errors == []
    tx.send_bytes(b"after", timeout=LONG)
    assert report.recv(timeout=LONG) == [digest(big), digest(b"after")]
    children.finish(proc)


def test_unpicklable_object_sends_nothing(closing):
    rx, tx = make_pipe(closing, True)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        tx.send(lambda: None)
    with pytest.raises(TypeError):
        tx.send(threading.Lock())
    tx.send("fine")
    assert rx.recv(timeout=LONG) == "fine"
    assert rx.poll(0) is False


def test_corrupt_pickle_costs_only_that_message(closing):
    rx, tx = make_pipe(closing, False)
    tx.send_bytes(b"\x80\x05not a pickle")
    tx.send("next")
    with pytest.raises(Exception) as info:
        rx.recv(timeout=LONG)
    assert not isinstance(info.value, (TimeoutError, EOFError))
    assert rx.recv(timeout=LONG) == "next"


def test_close_with_a_pending_send_truncates_the_message(closing):
    rx, tx = make_pipe(closing, True)
    expect_timeout(lambda timeout: tx.send_bytes(pattern(32 * MiB), timeout=timeout))
    assert tx.send_pending > 0
    tx.close()
    with elapsed_at_most(LONG):
        with pytest.raises(TruncatedMessageError):
            rx.recv_bytes(timeout=LONG)


@pytest.mark.parametrize("duplex", [True, False], ids=["duplex", "simplex"])
def test_collecting_a_connection_closes_its_fd(duplex):
    a, b = bigipc.Pipe(duplex=duplex)
    fds = [a.fileno(), b.fileno()]
    refs = [weakref.ref(a), weakref.ref(b)]
    del a, b
    gc.collect()
    assert [r() for r in refs] == [None, None]
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
