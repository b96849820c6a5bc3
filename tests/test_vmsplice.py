"""Large bytes sent into a pipe by page reference (vmsplice).

The compiled core on Linux hands all but the last pipe-capacity bytes of a
large exact ``bytes`` payload to the pipe by reference instead of copying
them (docs/protocol.md, "Sending large bytes into a pipe: vmsplice"). The
promise is that this is invisible: whatever the sender does with its memory
once ``send_bytes`` has returned (or raised), the reader gets the bytes the
object held at the call, or, for a frame its sender abandoned, an error and
never a damaged message.

The tests that could catch a violation make the sender's freed memory come
straight back with other contents: a large free raises glibc's mmap
threshold first, so the payloads below live on the heap, where a freed block
is handed out again by the next allocation of its size (a block that went
back to the kernel with munmap could not show a violation: the pipe would
keep its pages).
"""

import fcntl
import multiprocessing
import os
import subprocess
import sys
import threading
from contextlib import contextmanager

import pytest

import bigipc
from bigipc import TruncatedMessageError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _children
from _children import seeded_payload as payload

_children.make_importable_in_children()

core = pytest.importorskip("bigipc._core")

pytestmark = pytest.mark.skipif(
    bigipc.IMPLEMENTATION != "cython" or not core.VMSPLICE,
    reason="the core in use does not use vmsplice (not Linux, pure core, or BIGIPC_VMSPLICE=0)",
)

MiB = 1 << 20
KiB = 1 << 10
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
SPLICE_MIN = 256 * KiB  # src/channel.pxi _SPLICE_MIN
WAIT = 60.0


def capacity(conn):
    return fcntl.fcntl(conn.fileno(), F_GETPIPE_SZ)


def raise_mmap_threshold():
    """Make later allocations of up to 24 MiB come from the reusable heap
    (glibc raises its mmap threshold to the size of a freed mapped block, up
    to 32 MiB)."""
    block = bytearray(24 * MiB)
    del block


def churn(size, rounds=4):
    """Allocate and scribble over blocks of ``size``: a freed payload's memory
    gets new contents."""
    keep = []
    for _ in range(rounds):
        block = bytearray(size)
        block[:] = b"\xee" * size
        keep.append(block)
    return keep


def exchange(receive, send):
    """Run ``receive`` in a thread while ``send`` runs here; return what
    ``receive`` returned (None if it failed)."""
    got = []
    thread = threading.Thread(target=lambda: got.append(receive()))
    thread.start()
    try:
        send()
    finally:
        thread.join(WAIT)
    assert not thread.is_alive()
    return got[0] if got else None


def recv_one(conn):
    return lambda: conn.recv_bytes(timeout=WAIT)


def stalled_send(writer, seed, size):
    """Send a fresh heap payload that nobody reads until the send times out
    part way; the caller's reference is gone when this returns."""
    raise_mmap_threshold()
    data = payload(seed, size)
    with pytest.raises(TimeoutError):
        writer.send_bytes(data, timeout=0.2)
    assert writer.spliced_bytes > 0
    assert 0 < writer.send_pending < size


@contextmanager
def reader_child(start_method, target, *args, as_fd=False):
    """Start ``target(reader, *args, results)`` in a child process, ``reader``
    being the read end of a simplex pipe (its descriptor number with
    ``as_fd``, for a fork child); yield (writer, results); then reap the
    child, which must exit cleanly."""
    ctx = multiprocessing.get_context(start_method)
    reader, writer = bigipc.Pipe(duplex=False)
    results_r, results_w = bigipc.Pipe(duplex=False)
    if as_fd:
        # A plain descriptor for code that does blocking reads: detach()
        # turns the read end's shared description back to blocking, which a
        # bigipc Connection had made non-blocking (README, "Pipes and
        # O_NONBLOCK"); inherited as it was, a reader that empties the pipe
        # would get BlockingIOError instead of waiting.
        reader = reader.detach()
    child = ctx.Process(target=target, args=(reader, *args, results_w))
    child.start()
    if as_fd:
        os.close(reader)
    else:
        reader.close()
    results_w.close()
    try:
        yield writer, results_r
    finally:
        writer.close()
        results_r.close()
        child.join(WAIT)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0


@pytest.fixture
def simplex():
    reader, writer = bigipc.Pipe(duplex=False)
    yield reader, writer
    reader.close()
    writer.close()


# ---------------------------------------------------------------- which sends


def test_large_bytes_go_by_reference_except_the_last_pipe_full(simplex):
    reader, writer = simplex
    cap = capacity(writer)
    data = payload(1, 8 * MiB)
    got = exchange(recv_one(reader), lambda: writer.send_bytes(data, timeout=WAIT))
    assert got == data
    assert writer.spliced_bytes == len(data) - cap


@pytest.mark.parametrize("extra, spliced", [(SPLICE_MIN - 1, False), (SPLICE_MIN, True)])
def test_threshold_is_a_quarter_mebibyte_beyond_the_pipe(simplex, extra, spliced):
    reader, writer = simplex
    data = payload(2, capacity(writer) + extra)
    exchange(recv_one(reader), lambda: writer.send_bytes(data, timeout=WAIT))
    assert writer.spliced_bytes == (extra if spliced else 0)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(bytearray, id="bytearray"),
        pytest.param(memoryview, id="memoryview-of-bytes"),
        pytest.param(lambda b: type("Sub", (bytes,), {})(b), id="bytes-subclass"),
    ],
)
def test_mutable_or_foreign_buffers_are_always_copied(simplex, make):
    reader, writer = simplex
    data = payload(3, 4 * MiB)
    got = exchange(recv_one(reader), lambda: writer.send_bytes(make(data), timeout=WAIT))
    assert got == data
    assert writer.spliced_bytes == 0


def test_parts_multipart_and_objects_are_copied(simplex):
    reader, writer = simplex
    data = payload(4, 4 * MiB)

    def receive():
        return [reader.recv_bytes(timeout=WAIT), reader.recv_message(timeout=WAIT), reader.recv(timeout=WAIT)]

    def send():
        writer.send_parts([data, data], timeout=WAIT)
        writer.send_multipart([data], timeout=WAIT)
        writer.send(data, timeout=WAIT)

    got = exchange(receive, send)
    assert got[0] == data + data
    assert [bytes(p) for p in got[1]] == [data]
    assert got[2] == data
    assert writer.spliced_bytes == 0


def test_socket_pairs_are_copied():
    left, right = bigipc.Pipe()
    data = payload(5, 8 * MiB)
    got = exchange(recv_one(right), lambda: left.send_bytes(data, timeout=WAIT))
    left.close()
    right.close()
    assert got == data
    assert left.spliced_bytes == 0


def test_an_offset_slice_of_bytes_is_spliced_and_exact(simplex):
    reader, writer = simplex
    data = payload(6, 6 * MiB)
    got = exchange(recv_one(reader), lambda: writer.send_bytes(data, 12345, 4 * MiB + 7, timeout=WAIT))
    assert got == data[12345 : 12345 + 4 * MiB + 7]
    assert writer.spliced_bytes == 4 * MiB + 7 - capacity(writer)


def test_switch_off_with_environment_variable(tmp_path):
    code = (
        "import bigipc, bigipc._core as c, threading\n"
        "r, w = bigipc.Pipe(duplex=False)\n"
        "d = bytes(range(256)) * (1 << 15)\n"
        "t = threading.Thread(target=lambda: print(r.recv_bytes(timeout=30) == d)); t.start()\n"
        "w.send_bytes(d, timeout=30); t.join(30)\n"
        "print(c.VMSPLICE, w.spliced_bytes)\n"
    )
    # The copy of bigipc under test, whether installed or in a source tree
    # (the child's working directory is empty, so nothing else is found).
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(bigipc.__file__)))
    env = dict(os.environ, BIGIPC_VMSPLICE="0", PYTHONPATH=package_root)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=WAIT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False", "0"]


# ------------------------------------------------------- memory reuse is safe


@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_reused_memory_after_send_never_reaches_a_lagging_reader(start_method):
    size = 6 * MiB
    seeds = list(range(10, 22))
    with reader_child(start_method, _children.slow_reader, seeds, size) as (writer, results):
        raise_mmap_threshold()
        for seed in seeds:
            data = payload(seed, size)
            writer.send_bytes(data, timeout=WAIT)
            del data
            scribbled = churn(size, rounds=2)
            del scribbled
        assert writer.spliced_bytes == len(seeds) * (size - capacity(writer))
        assert results.recv(timeout=WAIT) == [True] * len(seeds)


def test_a_timed_out_send_keeps_its_pages_until_flushed(simplex):
    reader, writer = simplex
    size = 8 * MiB
    stalled_send(writer, 30, size)
    scribbled = churn(size)
    got = exchange(recv_one(reader), lambda: writer.flush(timeout=WAIT))
    del scribbled
    assert got == payload(30, size)


def test_a_send_interrupted_in_every_phase_then_finished_by_flushes(simplex):
    # The reader takes one pipe-full at a time and the sender's flushes time
    # out in between, so the send is cut off in the referenced part, at its
    # border and inside the copied last pipe-full; after each cut the
    # caller's other memory is scribbled over.
    reader, writer = simplex
    cap = capacity(writer)
    size = 4 * cap + 12345
    stalled_send(writer, 31, size)
    received = bytearray()
    left = reader.recv_begin(timeout=WAIT)
    assert left == size
    chunk = bytearray(cap // 2 + 999)
    cuts = 0
    while writer.send_pending:
        scribbled = churn(size, rounds=1)
        want = min(len(chunk), size - len(received))
        while want:
            got = reader.recv_chunk_into(memoryview(chunk)[:want], timeout=WAIT)
            received += chunk[:got]
            want -= got
        del scribbled
        try:
            writer.flush(timeout=0.05)
        except TimeoutError:
            cuts += 1
    while len(received) < size:
        got = reader.recv_chunk_into(chunk, timeout=WAIT)
        received += chunk[:got]
    assert cuts >= 3
    assert bytes(received) == payload(31, size)


def test_abandoned_frame_is_reported_truncated_never_delivered(simplex):
    reader, writer = simplex
    size = 8 * MiB
    stalled_send(writer, 32, size)
    writer.close()
    scribbled = churn(size)
    with pytest.raises(TruncatedMessageError):
        reader.recv_bytes(timeout=WAIT)
    del scribbled


def test_closing_and_freeing_right_after_a_send_keeps_the_message_exact(simplex):
    # send_bytes returns once the last pipe-full is in; the writer closes and
    # its memory is reused while the reader may still be taking that part.
    reader, writer = simplex
    size = 8 * MiB
    raise_mmap_threshold()
    outgoing = [payload(33, size)]
    scribbled = []

    def send():
        writer.send_bytes(outgoing.pop(), timeout=WAIT)
        writer.close()
        scribbled.append(churn(size))

    got = exchange(recv_one(reader), send)
    assert writer.spliced_bytes > 0
    assert got == payload(33, size)


def test_a_stdlib_reader_gets_spliced_messages_exactly():
    size = 5 * MiB
    with reader_child("fork", _children.stdlib_reader, size, 40, as_fd=True) as (writer, results):
        writer.send_bytes(payload(40, size), timeout=WAIT)
        assert writer.spliced_bytes > 0
        assert results.recv(timeout=WAIT) is True
