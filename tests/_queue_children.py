"""Code that runs in the child processes of tests/test_queue_kill.py and
tests/test_queue_noshm.py: producers, consumers and the items they move.

Every target is a module-level function here, so that children started
with ``spawn`` or ``forkserver`` can import it: the test modules call
``make_importable_in_children()`` before any child starts.

Items are tuples ``(producer_id, seq, payload)``. The payload's size and
bytes are a function of ``(producer_id, seq)`` alone (``size_for``,
``make_payload``), so whoever receives an item can check it without being
told what was sent: ``check_item`` recomputes the length and compares the
contents (all of them for small payloads, the head, tail, middle and a
stride of 8-byte words for large ones; every word holds its own index, so
a shifted, truncated or mixed-up payload does not pass).

Children talk to the parent over a stdlib ``multiprocessing`` Pipe (the
"control" connection), never over the queue under test, so the parent's
bookkeeping does not depend on the code it checks. A consumer reports
every item as soon as it has it; a victim producer reports each put before
and after the call. Every wait a child makes is bounded: a child that
finds itself waiting too long reports an error and exits non-zero.
"""

import contextlib
import json
import multiprocessing
import multiprocessing.connection
import os
import queue
import random
import sys
import threading
import time
import traceback

import numpy as np

import bigipc

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

KiB = 1 << 10
MiB = 1 << 20

# The longest any child lives; far above what a test run needs. A child
# still running after that gives up with an error instead of lingering.
CHILD_LIFETIME = 900.0
# Bound for one put() on a bounded queue: consumers are always running when
# producers put, so a put that waits this long means a deadlock.
PUT_BOUND = 60.0
# How long a consumer's get() waits before it looks around again.
GET_POLL = 0.2


def make_importable_in_children():
    """Make this directory importable in children of every start method
    (the same directory as tests/_children.py, which does the work)."""
    if TESTS_DIR not in sys.path:
        sys.path.insert(0, TESTS_DIR)
    import _children

    _children.make_importable_in_children()


# --------------------------------------------------------------------------
# items that check themselves

BIG = 64 * MiB
# Payloads from this size on are 8-byte words (numpy); smaller ones are
# random bytes from a seeded generator.
WORDS_FROM = 128 * KiB
_MASK64 = (1 << 64) - 1
_WORD_STEP = 0x9E3779B97F4A7C15  # odd: every word of a payload differs

# Producer id ranges and the size mix of their items: (share of ~64 MiB
# items, of ~1 MiB items, of items within 8 KiB of the queue's inline limit,
# largest of the remaining small items).
MIXES = {
    "light": (0.01, 0.06, 0.06, 4 * KiB),
    "heavy": (0.20, 0.15, 0.10, 4 * KiB),
    "tiny": (0.0, 0.0, 0.0, 1 * KiB),
}
LIGHT_PRODUCERS = range(0, 100)  # survivor producers with mostly small items
HEAVY_PRODUCERS = range(100, 200)  # survivor producers with many large items
TINY_PRODUCERS = range(200, 300)  # put_many producers: small items only
FIXED_PRODUCERS = range(300, 400)  # tests/test_queue_noshm.py: a fixed list
ALTERNATING_PRODUCERS = range(400, 500)  # odd seqs ~64 MiB arrays, even seqs small
PARENT_IDS = range(900, 1000)  # items the parent puts itself
VICTIM_BASE = 1000  # victim producers: 1000 + trial number, heavy mix
TINY_VICTIM_BASE = 100000  # put_many victims: 100000 + trial number, tiny mix

# Sizes of the items of FIXED_PRODUCERS by seq; the others are small. Seq 4
# is a 2 MiB bytes payload, seq 5 a 3 MiB numpy array, seq 7 ~64 KiB of
# bytes, seq 9 a ~1 MiB array, seq 11 just past the inline limit (so it
# travels through a pipe of its own; which of the others do depends on the
# socket buffer the queue got).
FIXED_SIZES = {4: 2 * MiB, 5: 3 * MiB, 7: 64 * KiB + 8, 9: MiB + 8, 11: "edge"}
FIXED_COUNT = 12

_inline_edge = None


def inline_edge():
    """The inline limit of a default queue on this machine (every process
    finds the same): items bigger than that go through a pipe."""
    global _inline_edge
    if _inline_edge is None:
        q = bigipc.Queue()
        _inline_edge = q.inline_limit
        q.close()
    return _inline_edge


def mix_for(pid):
    if pid in LIGHT_PRODUCERS or pid in PARENT_IDS:
        return "light"
    if pid in TINY_PRODUCERS or pid >= TINY_VICTIM_BASE:
        return "tiny"
    if pid in FIXED_PRODUCERS:
        return "fixed"
    if pid in ALTERNATING_PRODUCERS:
        return "alternating"
    return "heavy"


def _seed(pid, seq):
    return ((pid * 1000003 + seq) * 0xD6E8FEB86659FD93 + 0x632BE59BD9B4E019) & _MASK64


def size_for(pid, seq):
    """The payload size of item ``seq`` of producer ``pid``."""
    mix = mix_for(pid)
    rng = random.Random(_seed(pid, seq))
    if mix == "fixed":
        size = FIXED_SIZES.get(seq, rng.randrange(0, 2 * KiB))
        return _edge_size(inline_edge() + 4 * KiB) if size == "edge" else size
    if mix == "alternating":
        return BIG + 8 * rng.randrange(1024) if seq % 2 else rng.randrange(0, 2 * KiB)
    p_big, p_mib, p_edge, small = MIXES[mix]
    r = rng.random()
    if r < p_big:
        return BIG + 8 * rng.randrange(1024)
    r -= p_big
    if r < p_mib:
        return MiB - 4 * KiB + 8 * rng.randrange(1024)
    r -= p_mib
    if r < p_edge:
        return _edge_size(inline_edge() - 8 * KiB + rng.randrange(16 * KiB))
    return rng.randrange(0, small + 1)


def _edge_size(size):
    # Word payloads (from WORDS_FROM on) are a whole number of words.
    return size - size % 8 if size >= WORDS_FROM else size


def is_large(size):
    """May be too big to travel inside a datagram (then a pipe of its own
    carries it). Lenient around the limit, where the pickle's overhead
    decides."""
    return size > inline_edge() - 8 * KiB


def _words(pid, seq, start, stop):
    idx = np.arange(start, stop, dtype=np.uint64)
    idx *= np.uint64(_WORD_STEP)
    idx += np.uint64(_seed(pid, seq))
    return idx


def make_payload(pid, seq):
    """Small: random bytes. Large: words ``i * step + seed``, as bytes for
    even ``seq`` (pickled in band) and as a numpy array for odd ``seq``
    (sent out of band)."""
    size = size_for(pid, seq)
    if size < WORDS_FROM:
        return random.Random(_seed(pid, seq)).randbytes(size)
    words = _words(pid, seq, 0, size // 8)
    if seq % 2:
        return words
    return words.tobytes()


def make_item(pid, seq):
    return (pid, seq, make_payload(pid, seq))


def check_item(item):
    """(pid, seq, None) for an intact item, (pid, seq, error) for a damaged
    one; ValueError when it is not an item at all."""
    if type(item) is not tuple or len(item) != 3:
        raise ValueError("not an item: %r" % (type(item),))
    pid, seq, payload = item
    if type(pid) is not int or type(seq) is not int:
        raise ValueError("not an item: ids %r, %r" % (pid, seq))
    try:
        _check_payload(pid, seq, payload)
    except ValueError as exc:
        return pid, seq, str(exc)
    return pid, seq, None


def _check_payload(pid, seq, payload):
    size = size_for(pid, seq)
    if size < WORDS_FROM:
        if type(payload) is not bytes:
            raise ValueError("payload is %s, expected bytes" % type(payload).__name__)
        if len(payload) != size:
            raise ValueError("payload has %d bytes, expected %d" % (len(payload), size))
        if payload != random.Random(_seed(pid, seq)).randbytes(size):
            raise ValueError("payload contents differ")
        return
    n = size // 8
    if seq % 2:
        if not isinstance(payload, np.ndarray):
            raise ValueError("payload is %s, expected a numpy array" % type(payload).__name__)
        if payload.dtype != np.uint64 or payload.shape != (n,):
            raise ValueError("array is %s%r, expected uint64(%d,)" % (payload.dtype, payload.shape, n))
        words = payload
    else:
        if type(payload) is not bytes:
            raise ValueError("payload is %s, expected bytes" % type(payload).__name__)
        if len(payload) != size:
            raise ValueError("payload has %d bytes, expected %d" % (len(payload), size))
        words = np.frombuffer(payload, dtype=np.uint64)
    edge = min(n, 8192)
    for start, stop, step in ((0, edge, 1), (n - edge, n, 1), (max(0, n // 2 - 4096), n // 2 + 4096, 1)):
        stop = min(stop, n)
        if not np.array_equal(words[start:stop:step], _words(pid, seq, start, stop)[::step]):
            raise ValueError("payload words %d..%d differ" % (start, stop))
    idx = np.arange(0, n, 4099, dtype=np.int64)
    expected = idx.astype(np.uint64) * np.uint64(_WORD_STEP) + np.uint64(_seed(pid, seq))
    if not np.array_equal(words[idx], expected):
        raise ValueError("payload words differ (sampled every 4099)")


MAX_BATCH = 30  # items in one put_many call of the campaign's producers


def batch_len(pid, k):
    """How many items the ``k``-th put_many call of producer ``pid`` carries.
    Small enough that each call is one datagram (at most MAX_BATCH items of
    at most 1 KiB)."""
    return 1 + random.Random(_seed(pid, 1 << 40 | k)).randrange(MAX_BATCH)


# --------------------------------------------------------------------------
# helpers


def _hello(ctl, role, ident):
    ctl.send(("hello", role, ident, os.getpid(), bigipc.IMPLEMENTATION))


def _fail(ctl, what):
    """Report the current exception to the parent (best effort) and exit 1."""
    with contextlib.suppress(BaseException):
        ctl.send(("error", "%s: %s" % (what, traceback.format_exc())))
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)


def _throttle(q, limit, deadline):
    """Keep at most about ``limit`` items waiting in an unbounded queue, so
    that producers cannot outrun the consumers by gigabytes."""
    while limit and q.qsize() > limit:
        if time.monotonic() > deadline:
            raise TimeoutError("the queue did not drain below %d items" % limit)
        time.sleep(0.001)


# --------------------------------------------------------------------------
# child targets: the kill campaign


def producer(q, ctl, pid, throttle, pace, many):
    """A producer that survives: puts its items (``put_many`` batches with
    ``many``) until the parent sends "stop", then reports how many it put,
    closes the queue and waits for its feeder to hand everything over."""
    try:
        _hello(ctl, "producer", pid)
        deadline = time.monotonic() + CHILD_LIFETIME
        seq = k = 0
        while not (ctl.poll() and ctl.recv() == "stop"):
            if time.monotonic() > deadline:
                raise TimeoutError("never told to stop")
            _throttle(q, throttle, deadline)
            if many:
                n = batch_len(pid, k)
                q.put_many([make_item(pid, s) for s in range(seq, seq + n)], timeout=PUT_BOUND)
                seq += n
                k += 1
            else:
                try:
                    q.put(make_item(pid, seq), timeout=PUT_BOUND)
                except queue.Full:
                    raise TimeoutError("put() found no room for %s s: deadlock" % PUT_BOUND) from None
                seq += 1
            if pace:
                time.sleep(pace)
        ctl.send(("done", seq))
        q.close()
        q.join_thread()
        ctl.send(("flushed", seq))
    except BaseException:
        _fail(ctl, "producer %d" % pid)


def put_and_linger(q, ctl, pid, seqs):
    """Put items ``seqs`` of ``pid``, reporting ("sent", seq) after each
    put() returns, then wait to be killed."""
    try:
        _hello(ctl, "victim-producer", pid)
        for seq in seqs:
            q.put(make_item(pid, seq))
            ctl.send(("sent", seq, 1))
        ctl.poll(CHILD_LIFETIME)
        raise TimeoutError("never killed")
    except BaseException:
        _fail(ctl, "producer %d" % pid)


def victim_producer(q, ctl, pid, throttle, pace, many):
    """A producer that is killed: reports ("put", seq, n) before and
    ("sent", seq, n) after every put (n items from seq on), forever."""
    try:
        _hello(ctl, "victim-producer", pid)
        deadline = time.monotonic() + CHILD_LIFETIME
        seq = k = 0
        while time.monotonic() < deadline:
            _throttle(q, throttle, deadline)
            if many:
                n = batch_len(pid, k)
                items = [make_item(pid, s) for s in range(seq, seq + n)]
                ctl.send(("put", seq, n))
                q.put_many(items, timeout=PUT_BOUND)
                k += 1
            else:
                n = 1
                item = make_item(pid, seq)
                ctl.send(("put", seq, 1))
                try:
                    q.put(item, timeout=PUT_BOUND)
                except queue.Full:
                    raise TimeoutError("put() found no room for %s s: deadlock" % PUT_BOUND) from None
            ctl.send(("sent", seq, n))
            seq += n
            if pace:
                time.sleep(pace)
        raise TimeoutError("victim producer was never killed")
    except BaseException:
        _fail(ctl, "victim producer %d" % pid)


def consumer(q, ctl, name, joinable, many, seed):
    """Gets items until it gets the sentinel ``None`` and reports each one
    at once as ("got", pid, seq, error or None). With ``many``, takes them
    with ``get_many`` (up to ``many`` at a time). On a JoinableQueue every
    item, the sentinel included, is marked done before it is reported."""
    try:
        _hello(ctl, "consumer", name)
        deadline = time.monotonic() + CHILD_LIFETIME
        rng = random.Random(seed)
        count = 0
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError("no sentinel came")
            try:
                if many:
                    items = q.get_many(rng.randint(1, many), timeout=GET_POLL)
                else:
                    items = [q.get(timeout=GET_POLL)]
            except queue.Empty:
                continue
            stop = False
            for item in items:
                if item is None:
                    if stop:
                        raise AssertionError("two sentinels in one get_many")
                    stop = True
                    if joinable:
                        q.task_done()
                    continue
                pid, seq, error = check_item(item)
                del item
                if joinable:
                    q.task_done()
                ctl.send(("got", pid, seq, error))
                count += 1
            if stop:
                break
        ctl.send(("bye", count))
        q.close()
    except BaseException:
        _fail(ctl, "consumer %s" % name)


# --------------------------------------------------------------------------
# tests/test_queue_noshm.py: everything below runs inside a mount namespace
# whose /dev/shm is read-only


def _noop():
    pass


def noshm_producer(q, ctl, pid, count, wait_for_go):
    """Put items 0..count-1 of ``pid``; report "put-all"; with
    ``wait_for_go``, stay (feeder alive) until the parent says "go"."""
    try:
        _hello(ctl, "producer", pid)
        for seq in range(count):
            q.put(make_item(pid, seq), timeout=PUT_BOUND)
        ctl.send(("put-all", count))
        if wait_for_go:
            if not ctl.poll(PUT_BOUND):
                raise TimeoutError("no go from the parent")
            if ctl.recv() != "go":
                raise AssertionError("expected go")
        q.close()
        q.join_thread()
        ctl.send(("flushed", count))
    except BaseException:
        _fail(ctl, "producer %d" % pid)


def _recv_bounded(ctl, timeout, what):
    if not ctl.poll(timeout):
        raise TimeoutError("%s: nothing within %s s" % (what, timeout))
    msg = ctl.recv()
    if msg[0] == "error":
        raise AssertionError("a child failed while %s:\n%s" % (what, msg[1]))
    return msg


def _noshm_case(ctx, kind):
    """Two producers and two consumers on one queue of ``kind``, every item
    accounted for; returns what the parent observed."""
    if kind == "Queue":
        q = bigipc.Queue()
    elif kind == "bounded":
        q = bigipc.Queue(maxsize=3)
    elif kind == "SimpleQueue":
        q = bigipc.SimpleQueue()
    else:
        q = bigipc.JoinableQueue()
    joinable = kind == "JoinableQueue"
    # Queue/JoinableQueue: producers put everything before any consumer runs
    # (their feeders hold the large items); bounded: producers fill the
    # queue and wait for room; SimpleQueue: put() writes large items in the
    # caller, so consumers run from the start.
    consumers_first = kind == "SimpleQueue"
    wait_for_go = kind in ("Queue", "JoinableQueue")
    pids = [FIXED_PRODUCERS[0], FIXED_PRODUCERS[1]]
    total = FIXED_COUNT * len(pids)
    procs = []
    out = {"kind": kind}

    def start(target, *args):
        mine, theirs = ctx.Pipe()
        p = ctx.Process(target=target, args=(q, theirs, *args), daemon=True)
        p.start()
        theirs.close()
        procs.append(p)
        return p, mine

    try:
        cons = []
        if consumers_first:
            cons = [start(consumer, "c%d" % i, joinable, 0, i) for i in range(2)]
        prods = [start(noshm_producer, pid, FIXED_COUNT, wait_for_go) for pid in pids]
        impls = []
        for _, ctl in prods:
            msg = _recv_bounded(ctl, 60, "starting a producer")
            assert msg[0] == "hello", msg
            impls.append(msg[4])
        if wait_for_go:
            for _, ctl in prods:
                assert _recv_bounded(ctl, 120, "putting")[0] == "put-all"
            out["qsize_all_put"] = _wait_qsize(q, total)
            out["empty_all_put"] = q.empty()
            for _, ctl in prods:
                ctl.send("go")
        elif kind == "bounded":
            out["qsize_full"] = _wait_qsize(q, 3)
            out["full"] = q.full()
        if not consumers_first:
            cons = [start(consumer, "c%d" % i, joinable, 0, i) for i in range(2)]
        received = {}
        errors = []
        for _, ctl in cons:
            msg = _recv_bounded(ctl, 60, "starting a consumer")
            assert msg[0] == "hello", msg
            impls.append(msg[4])
        out["child_implementations"] = sorted(set(impls))
        for _, ctl in prods:
            msg = _recv_bounded(ctl, 120, "handing items over")
            if msg[0] == "put-all":
                msg = _recv_bounded(ctl, 120, "handing items over")
            assert msg == ("flushed", FIXED_COUNT), msg
        # Everything is handed over; the consumers report each item at once.
        got = 0
        deadline = time.monotonic() + 120
        pending = [ctl for _, ctl in cons]
        while got < total:
            ready = multiprocessing.connection.wait(pending, max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("only %d of %d items arrived" % (got, total))
            for ctl in ready:
                msg = ctl.recv()
                if msg[0] == "error":
                    raise AssertionError("a consumer failed:\n%s" % msg[1])
                assert msg[0] == "got", msg
                _, pid, seq, error = msg
                received[(pid, seq)] = received.get((pid, seq), 0) + 1
                got += 1
                if error:
                    errors.append("%d/%d: %s" % (pid, seq, error))
        if joinable:
            q.join(timeout=60)
            out["join"] = "returned"
        out["qsize_drained"] = q.qsize()
        out["empty_drained"] = q.empty()
        _stop_consumers(q, [ctl for _, ctl in cons])
        for p in procs:
            p.join(60)
        out["exitcodes"] = [p.exitcode for p in procs]
        expected = {(pid, seq) for pid in pids for seq in range(FIXED_COUNT)}
        out["items"] = total
        out["received"] = sum(received.values())
        out["missing"] = sorted(expected - set(received))
        out["unexpected"] = sorted(set(received) - expected)
        out["duplicates"] = sorted(k for k, v in received.items() if v > 1)
        out["errors"] = errors
        if joinable:
            q.join(timeout=60)
        # The queue still works in this process: a 64 MiB array through it,
        # put by a thread (SimpleQueue.put writes it while it is read).
        items = [make_item(PARENT_IDS[0], 1), make_item(ALTERNATING_PRODUCERS[0], 1)]
        putter = threading.Thread(target=_put_all, args=(q, items))
        putter.start()
        try:
            back = [q.get(timeout=60), q.get(timeout=60)]
        finally:
            putter.join(60)
        items = None
        out["roundtrip"] = [check_item(item)[2] for item in back]
        if joinable:
            q.task_done()
            q.task_done()
            q.join(timeout=60)
        return out
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(10)
        q.close()


def _put_all(q, items):
    for item in items:
        q.put(item, timeout=PUT_BOUND)


def _stop_consumers(q, ctls, timeout=60.0):
    """Put one sentinel per consumer, one at a time: each consumer stops at
    the first it gets, so the next goes in once one has said bye."""
    left = list(ctls)
    while left:
        q.put(None)
        msg = None
        while msg is None:
            ready = multiprocessing.connection.wait(left, timeout)
            if not ready:
                raise TimeoutError("no consumer took the sentinel within %s s" % timeout)
            for ctl in ready:
                msg = ctl.recv()
                if msg[0] == "error":
                    raise AssertionError("a consumer failed:\n%s" % msg[1])
                if msg[0] != "bye":
                    raise AssertionError("item after all were counted: %r" % (msg,))
                left.remove(ctl)
                break


def _wait_qsize(q, want, timeout=60.0):
    """Wait (bounded) for qsize() to reach ``want``; return what it showed."""
    deadline = time.monotonic() + timeout
    while True:
        n = q.qsize()
        if n == want or time.monotonic() > deadline:
            return n
        time.sleep(0.01)


def noshm_main(method):
    """Run inside the namespace: prove /dev/shm is unusable and the stdlib
    queues fail, then run every bigipc queue kind with ``method`` children.
    Prints one JSON line; exits 0 when the run itself completed."""
    import errno

    result = {"method": method, "implementation": bigipc.IMPLEMENTATION, "stdlib": {}}
    try:
        fd = os.open("/dev/shm/bigipc-noshm-probe", os.O_CREAT | os.O_WRONLY, 0o600)
    except OSError as exc:
        result["dev_shm"] = errno.errorcode.get(exc.errno, str(exc.errno))
    else:
        os.close(fd)
        os.unlink("/dev/shm/bigipc-noshm-probe")
        result["dev_shm"] = "writable"
    for name in ("Queue", "SimpleQueue", "JoinableQueue"):
        try:
            getattr(multiprocessing, name)()
        except OSError as exc:
            result["stdlib"][name] = "OSError: %s" % exc
        else:
            result["stdlib"][name] = "created"
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        # Whether forkserver works here at all, bigipc aside.
        try:
            p = ctx.Process(target=_noop)
            p.start()
            p.join(60)
            if p.exitcode != 0:
                raise RuntimeError("exit code %r" % p.exitcode)
        except Exception as exc:
            result["skip"] = "forkserver does not work in this namespace: %r" % (exc,)
            print(json.dumps(result))
            return
    result["cases"] = [
        _noshm_case(ctx, kind) for kind in ("Queue", "bounded", "SimpleQueue", "JoinableQueue")
    ]
    print(json.dumps(result))
