"""Code that runs in child processes started by tests/test_connection.py.

Every target is a module-level function of this module, so that children
started with ``spawn`` or ``forkserver`` can import it: the test modules put
this directory on ``sys.path`` and on ``PYTHONPATH`` (see
``make_importable_in_children``) before any child is started.

Children never block without a bound either: every receive carries a
timeout (or, on a stdlib Connection, is preceded by a bounded ``poll``), so a
bug makes a child fail with a traceback and a non-zero exit code, which the
test asserts on, instead of hanging.
"""

import hashlib
import multiprocessing
import multiprocessing.connection
import os
import select
import struct
import sys
import time

import bigipc

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

# Bound for any wait a child makes for something that should happen soon.
CHILD_WAIT = 60.0

KiB = 1 << 10
MiB = 1 << 20


def make_importable_in_children():
    """Make this directory importable in every kind of child process.

    ``spawn`` children get the parent's ``sys.path``. The ``forkserver``
    server does not apply it (Python 3.11 ignores the ``sys_path`` it is
    given), so the directory also goes into ``PYTHONPATH``, which the server
    inherits when it starts. A server already running without it is
    stopped, so that the next forkserver child starts a fresh one.
    """
    if TESTS_DIR not in sys.path:
        sys.path.insert(0, TESTS_DIR)
    entries = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if TESTS_DIR in entries:
        return
    os.environ["PYTHONPATH"] = os.pathsep.join([TESTS_DIR] + entries)
    try:
        from multiprocessing import forkserver
    except ImportError:  # pragma: no cover - no forkserver on this platform
        return
    server = forkserver._forkserver
    if getattr(server, "_forkserver_pid", None) is not None and hasattr(server, "_stop"):
        server._stop()


# --------------------------------------------------------------------------
# message contents that check themselves


def pattern(n, seed=0):
    """``n`` deterministic bytes that differ with ``seed`` and along the
    message, so a truncated, shifted or mixed-up message does not compare
    equal."""
    if n == 0:
        return b""
    block = hashlib.sha256(b"bigipc-%d" % seed).digest() + bytes(range(256))
    reps = n // len(block) + 1
    data = block * reps
    return data[:n]


def tagged_message(tag, seq, size):
    """A message that names its sender and sequence number and whose payload
    is derived from them: ``check_tagged`` recognises any damage."""
    head = struct.pack("!III", tag, seq, size)
    return head + pattern(size, seed=tag * 100003 + seq)


def check_tagged(message):
    """(tag, seq) of a message made by ``tagged_message``; ValueError if damaged."""
    if len(message) < 12:
        raise ValueError("message too short: %d bytes" % len(message))
    tag, seq, size = struct.unpack_from("!III", message)
    if len(message) != 12 + size:
        raise ValueError("message %d/%d has %d bytes, expected %d" % (tag, seq, len(message), 12 + size))
    if bytes(message[12:]) != pattern(size, seed=tag * 100003 + seq):
        raise ValueError("message %d/%d has wrong contents" % (tag, seq))
    return tag, seq


def digest(data):
    return (len(data), hashlib.sha256(data).hexdigest())


# --------------------------------------------------------------------------
# helpers that work on a bigipc or a stdlib Connection


def recv_bytes_any(conn, timeout=CHILD_WAIT):
    """recv_bytes with a bound on either kind of Connection."""
    if isinstance(conn, bigipc.Connection):
        return conn.recv_bytes(timeout=timeout)
    if not conn.poll(timeout):
        raise TimeoutError("nothing arrived within %s s" % timeout)
    return conn.recv_bytes()


def recv_any(conn, timeout=CHILD_WAIT):
    """recv with a bound on either kind of Connection."""
    if isinstance(conn, bigipc.Connection):
        return conn.recv(timeout=timeout)
    if not conn.poll(timeout):
        raise TimeoutError("nothing arrived within %s s" % timeout)
    return conn.recv()


def recv_message_any(conn, timeout=CHILD_WAIT):
    """The next message as it came: bytes for a plain message, the list of
    parts for a bigipc multipart one (an object sent with its large buffers
    out of band). A stdlib Connection only ever gets plain ones."""
    if isinstance(conn, bigipc.Connection):
        return conn.recv_message(timeout=timeout)
    return recv_bytes_any(conn, timeout)


def send_message_any(conn, message):
    """Send back what ``recv_message_any`` returned, in the same form."""
    if type(message) is list:
        conn.send_multipart(message)
    else:
        conn.send_bytes(message)


def object_digest(obj):
    """What a child reports about a received object: its type and, for a
    bytes-like object, the digest of its bytes."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return (type(obj).__name__,) + digest(bytes(obj))
    if hasattr(obj, "__array_interface__"):  # a numpy array
        return (type(obj).__name__,) + digest(obj.tobytes())
    return (type(obj).__name__, repr(obj)[:200])


def write_all(fd, data):
    """Write all of ``data`` to ``fd``, blocking or not."""
    view = memoryview(data).cast("B")
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [], CHILD_WAIT)
            continue
        view = view[written:]


def frame_header(length):
    """The multiprocessing wire header for a ``length``-byte payload."""
    if length <= 0x7FFFFFFF:
        return struct.pack("!i", length)
    return struct.pack("!iQ", -1, length)


def describe(conn):
    """What a child reports about a Connection it was given."""
    return {
        "type": "%s.%s" % (type(conn).__module__, type(conn).__qualname__),
        "is_bigipc": isinstance(conn, bigipc.Connection),
        "readable": conn.readable,
        "writable": conn.writable,
        "closed": conn.closed,
        "fileno_is_int": type(conn.fileno()) is int,
        "max_message_size": getattr(conn, "max_message_size", None),
        "implementation": bigipc.IMPLEMENTATION,
    }


# --------------------------------------------------------------------------
# child targets


def echo(conn, stop=b"STOP"):
    """Send every message back unchanged (plain or multipart) until ``stop``;
    works on either kind of Connection. Sends ``describe(conn)`` first."""
    conn.send(describe(conn))
    while True:
        message = recv_message_any(conn)
        if message == stop:
            break
        send_message_any(conn, message)
    conn.close()


def echo_between(reader, writer, stop=b"STOP"):
    """Echo from a receive-only to a send-only Connection; reports both ends
    first."""
    writer.send((describe(reader), describe(writer)))
    while True:
        message = recv_message_any(reader)
        if message == stop:
            break
        send_message_any(writer, message)
    reader.close()
    writer.close()


def report(conn):
    """Report ``describe(conn)`` and exit."""
    conn.send(describe(conn))
    conn.close()


def send_messages(conn, messages, linger=0.0):
    """Send each bytes message, optionally wait, then exit (closing ``conn``)."""
    for message in messages:
        conn.send_bytes(message)
    if linger:
        time.sleep(linger)
    conn.close()


def send_objects_slowly(conn, tag, count, delay):
    """Like CPython's TestWait: ``count`` objects (tag, i, pid), then exit."""
    for i in range(count):
        if delay:
            time.sleep(delay * ((i * 7 + tag) % 5) / 4)
        conn.send((tag, i, os.getpid()))
    conn.close()


def exit_at_once(*conns):
    """Exit without sending anything."""
    for conn in conns:
        conn.close()


def receive_and_report(reader, out, kinds):
    """Receive one message per entry of ``kinds`` ("bytes": recv_bytes,
    "object": recv) and send back their digests (``digest`` for bytes,
    ``object_digest`` for objects)."""
    digests = []
    for kind in kinds:
        if kind == "bytes":
            digests.append(digest(recv_bytes_any(reader)))
        else:
            digests.append(object_digest(recv_any(reader)))
    out.send(digests)
    out.close()
    reader.close()


def validate_tagged(reader, out, count, objects=False):
    """Receive ``count`` tagged messages, check each, report (tag, seq) list
    and the errors found."""
    seen = []
    errors = []
    for _ in range(count):
        if objects:
            tag, seq, body = reader.recv(timeout=CHILD_WAIT)
            message = body
        else:
            message = reader.recv_bytes(timeout=CHILD_WAIT)
        try:
            got = check_tagged(message)
            if objects and got != (tag, seq):
                raise ValueError("object (%d, %d) carries message %r" % (tag, seq, got))
            seen.append(got)
        except ValueError as exc:
            errors.append(str(exc))
    out.send((seen, errors))


def send_tagged(writer, tags, count_per_tag, sizes, stops=0, objects=False):
    """Send ``count_per_tag`` tagged messages per tag, then ``stops`` STOP
    messages; with ``objects``, each as ``send(bytearray(message))`` (large
    ones go out of band)."""
    i = 0
    for seq in range(count_per_tag):
        for tag in tags:
            message = tagged_message(tag, seq, sizes[i % len(sizes)])
            if objects:
                writer.send(bytearray(message))
            else:
                writer.send_bytes(message)
            i += 1
    for _ in range(stops):
        if objects:
            writer.send(b"STOP")
        else:
            writer.send_bytes(b"STOP")
    writer.close()


def write_frame_slowly(raw, control, length, chunk, delay, after=b"done", steps=()):
    """Write one ``length``-byte plain frame (payload ``pattern(length, 7)``)
    through the raw descriptor of ``raw`` (a stdlib Connection) in stages
    the parent releases with "go" (see ``write_staged``), then a small frame
    ``after``."""
    data = frame_header(length) + pattern(length, seed=7)
    first = len(frame_header(length)) + min(chunk, 32 * KiB, length)
    write_staged(raw, control, data, first, steps, chunk, delay)
    write_all(raw.fileno(), frame_header(len(after)) + after)
    raw.close()


def big_object():
    """An object with large buffers: bigipc sends it as a multipart message."""
    return {
        "blob": bytearray(pattern(8 * MiB, seed=31)),
        "other": bytearray(pattern(3 * MiB + 5, seed=32)),
        "meta": ["small", 1, 2.5, None],
    }


def multipart_frame(obj):
    """The bigipc multipart frame (docs/protocol.md) ``Connection.send``
    makes of ``obj``: part 0 the protocol-5 pickle, then each buffer."""
    import pickle

    buffers = []

    def out_of_band(buffer):
        buffers.append(buffer.raw())
        return False

    parts = [memoryview(pickle.dumps(obj, protocol=5, buffer_callback=out_of_band))] + buffers
    lengths = b"".join(struct.pack("!Q", part.nbytes | ((1 << 63) if part.readonly else 0)) for part in parts)
    return struct.pack("!iI", -2, len(parts)) + lengths + b"".join(bytes(part) for part in parts)


def write_multipart_slowly(raw, control, chunk, delay, after=b"done", steps=()):
    """Like ``write_frame_slowly`` for the multipart frame of ``big_object()``."""
    data = multipart_frame(big_object())
    write_staged(raw, control, data, 32 * KiB, steps, chunk, delay)
    write_all(raw.fileno(), frame_header(len(after)) + after)
    raw.close()


def write_staged(raw, control, data, first, steps, chunk, delay):
    """Write ``data`` to the raw descriptor of ``raw`` in stages:

    * at once: the first ``first`` bytes (little enough for an unread pipe),
      then "started" on ``control``;
    * for each size in ``steps``: after a "go", that many more bytes;
    * after a last "go": the rest;

    every stage in ``chunk``-byte writes ``delay`` seconds apart. While the
    child waits for a "go" the message is certainly incomplete."""
    fd = raw.fileno()
    done = min(first, len(data))
    write_all(fd, data[:done])
    control.send("started")
    for stage_end in [done + step for step in _cumulative(steps)] + [len(data)]:
        if recv_any(control) != "go":
            raise RuntimeError("expected go")
        stage_end = min(stage_end, len(data))
        while done < stage_end:
            if delay:
                time.sleep(delay)
            piece = data[done : min(done + chunk, stage_end)]
            write_all(fd, piece)
            done += len(piece)


def _cumulative(sizes):
    total = 0
    out = []
    for size in sizes:
        total += size
        out.append(total)
    return out


def write_partial_frame(raw, control, announced, written, how):
    """Announce ``announced`` payload bytes, write ``written`` of them through
    the raw descriptor, then die: ``how`` is "exit" (os._exit at once) or
    "kill" (wait to be SIGKILLed)."""
    fd = raw.fileno()
    data = frame_header(announced) + pattern(max(0, written), seed=3)
    if written < 0:
        # A header cut short: only its first -written bytes.
        data = frame_header(announced)[:-written]
    control.send("writing")
    write_all(fd, data)
    control.send("written")
    if how == "exit":
        os._exit(0)
    time.sleep(CHILD_WAIT)
    os._exit(3)


def read_a_little_then_exit(reader, control, nbytes):
    """Read ``nbytes`` raw bytes from the descriptor, then exit: the writer
    is left with a dead reader in the middle of its message."""
    fd = reader.fileno()
    got = 0
    deadline = time.monotonic() + CHILD_WAIT
    while got < nbytes:
        select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        try:
            got += len(os.read(fd, nbytes - got))
        except BlockingIOError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("no data")
    control.send(got)
    os._exit(0)


def receive_connections(control):
    """Get Connections sent over ``control`` by a running parent and use them:
    for ("echo", conn) echo once over it; for ("write", conn) send a greeting;
    for ("read", conn) read one message and send it back over ``control``."""
    control.send("ready")
    while True:
        item = control.recv(timeout=CHILD_WAIT)
        if item is None:
            break
        what, conn = item
        control.send(describe(conn))
        if what == "echo":
            conn.send_bytes(conn.recv_bytes(timeout=CHILD_WAIT))
        elif what == "write":
            conn.send(("hello from", os.getpid()))
        elif what == "read":
            control.send(conn.recv(timeout=CHILD_WAIT))
        conn.close()
    control.close()


def start_method_probe(out):
    """Report how this child was started: whether it sees a module attribute
    the parent set at run time (only fork copies it) and who its parent is."""
    import _children

    out.send(
        {
            "marker": getattr(_children, "RUNTIME_MARKER", None),
            "ppid": os.getppid(),
            "start_method": multiprocessing.get_start_method(allow_none=True),
        }
    )
    out.close()


def recv_after_fork(conn, out):
    """Under fork: receive on a Connection whose receive lock a parent thread
    held when this process was forked."""
    try:
        result = ("ok", conn.recv(timeout=10))
    except BaseException as exc:  # reported, the parent asserts on it
        result = ("error", "%s: %s" % (type(exc).__name__, exc))
    out.send(result)


def threads_contend_after_fork(conn, out):
    """Under fork: two threads of this child receive on an inherited
    Connection. While one holds the receive side (blocked on the empty
    channel), the other must wait for it like in any process, not take the
    side as if its holder were a thread of the parent."""
    import threading

    holder_result = []

    def holder():
        try:
            holder_result.append(("ok", conn.recv_bytes(timeout=10)))
        except BaseException as exc:  # reported below
            holder_result.append(("error", type(exc).__name__))

    thread = threading.Thread(target=holder, daemon=True)
    thread.start()
    time.sleep(0.3)  # let it take the receive side and block
    try:
        conn.recv_bytes(timeout=0.3)
        second = "received"
    except TimeoutError as exc:
        second = str(exc)
    out.send(("second", second))  # the parent now sends the holder its message
    thread.join(20)
    out.send(("holder", holder_result))


def numpy_echo(conn):
    """Receive an array as an object and as raw bytes, send both back."""
    import numpy as np

    arr = conn.recv(timeout=CHILD_WAIT)
    conn.send(arr)
    out = np.empty(arr.shape, dtype=arr.dtype)
    n = conn.recv_bytes_into(out, timeout=CHILD_WAIT)
    if n != out.nbytes:
        raise RuntimeError("got %d bytes, expected %d" % (n, out.nbytes))
    conn.send_bytes(out)
    conn.close()


def detach_and_exit(conn):
    """Take the raw descriptor out of an inherited Connection, then exit."""
    fd = conn.detach()
    os.close(fd)


# --------------------------------------------------------------------------
# tests/test_vmsplice.py


def seeded_payload(seed, size):
    """Deterministic bytes, different for every seed, freshly allocated."""
    import random

    return random.Random(seed).randbytes(size)


def slow_reader(conn, seeds, size, results):
    """Take each message late, so the sender has long returned and reused
    its memory; report which ones arrived exactly."""
    ok = []
    for seed in seeds:
        time.sleep(0.02)
        got = conn.recv_bytes(timeout=CHILD_WAIT)
        ok.append(digest(got) == digest(seeded_payload(seed, size)))
    results.send(ok)


def stdlib_reader(fd, size, seed, results):
    """Read one message from ``fd`` with the stdlib's Connection."""
    if not os.get_blocking(fd):
        # The stdlib's reads would fail with BlockingIOError whenever the
        # writer falls behind: a mistake of the test, reported as such.
        results.send("the descriptor is non-blocking")
        return
    conn = multiprocessing.connection.Connection(fd, writable=False)
    if not conn.poll(CHILD_WAIT):
        results.send("nothing arrived")
        return
    results.send(conn.recv_bytes() == seeded_payload(seed, size))
