"""Tests of bigipc.Queue, SimpleQueue and JoinableQueue: the API, their
failure modes, and real producer and consumer processes.

They run against whichever core this process loaded; tests/test_both_cores.py
re-runs this file with BIGIPC_PUREPYTHON=1. Every get carries a timeout and
every join is bounded, so a bug fails a test instead of hanging the run.
CPython's own queue tests run in tests/test_cpython_suite.py; the kill
campaign is tests/test_queue_kill.py, the no-/dev/shm proof
tests/test_queue_noshm.py.
"""

import contextlib
import errno
import gc
import multiprocessing
import os
import pickle
import queue
import select
import signal
import socket
import sys
import threading
import time

import pytest

import bigipc
from bigipc import FrameError, queues

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _children
import _queue_api_children as kids
from _queue_api_children import check, item
from _signals import Interrupted, alarm, raise_interrupted

_children.make_importable_in_children()

pytestmark = pytest.mark.timeout(120)

KiB = 1 << 10
MiB = 1 << 20
LONG = 30.0
JOIN = 60.0
SHORT = 0.2

START_METHODS = [m for m in ("fork", "spawn", "forkserver") if m in multiprocessing.get_all_start_methods()]
QUEUE_CLASSES = [bigipc.Queue, bigipc.SimpleQueue, bigipc.JoinableQueue]
# Sizes that take every path: inline, at the inline limit, one pipe-full,
# and a pipe that the consumer must drain while the producer writes.
SIZES = [0, 10, 60 * KiB, 70 * KiB, 1 * MiB, 5 * MiB]


class Children:
    def __init__(self):
        self.procs = []

    def start(self, method, target, *args):
        proc = multiprocessing.get_context(method).Process(target=target, args=args, daemon=True)
        proc.start()
        self.procs.append(proc)
        return proc

    def finish(self, proc, exitcode=0, timeout=JOIN):
        proc.join(timeout)
        assert proc.exitcode is not None, "child did not exit within %s s" % timeout
        assert proc.exitcode == exitcode, "child exited with %s" % proc.exitcode

    def cleanup(self):
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
            proc.join(10)


@pytest.fixture
def children():
    c = Children()
    yield c
    c.cleanup()


@pytest.fixture(params=START_METHODS)
def method(request):
    return request.param


@pytest.fixture(params=QUEUE_CLASSES, ids=lambda c: c.__name__)
def qclass(request):
    return request.param


def make(qclass, maxsize=0):
    if qclass is bigipc.SimpleQueue:
        return qclass()
    return qclass(maxsize)


@contextlib.contextmanager
def alarm_raises_after(seconds):
    """Expect ``Interrupted`` from the body: a SIGALRM handler raises it
    ``seconds`` after the body starts."""
    with alarm(raise_interrupted, seconds), pytest.raises(Interrupted):
        yield


def drain(q, n, timeout=LONG):
    return [q.get(timeout=timeout) for _ in range(n)]


# --------------------------------------------------------------------------
# the API in one process


def test_exports_and_stdlib_exceptions():
    assert bigipc.Queue is queues.Queue
    assert queues.Empty is queue.Empty and queues.Full is queue.Full
    assert issubclass(bigipc.JoinableQueue, bigipc.Queue)


@pytest.mark.parametrize("size", SIZES)
def test_items_of_every_size_arrive_whole_and_in_order(qclass, size):
    q = make(qclass)
    if qclass is bigipc.SimpleQueue and size >= MiB:
        # SimpleQueue writes a large item while its consumer reads it.
        t = threading.Thread(target=lambda: [q.put(item(1, s, size)) for s in range(3)])
        t.start()
        got = drain(q, 3)
        t.join(JOIN)
    else:
        for s in range(3):
            q.put(item(1, s, size))
        got = drain(q, 3)
    assert [g[1] for g in got] == [0, 1, 2]
    assert all(check(g) for g in got)
    assert q.empty()


def test_get_nowait_and_timeouts_on_an_empty_queue(qclass):
    q = make(qclass)
    with pytest.raises(queue.Empty):
        q.get_nowait()
    with pytest.raises(queue.Empty):
        q.get(False)
    with pytest.raises(queue.Empty):
        q.get(timeout=SHORT)
    with pytest.raises(ValueError):
        q.get(timeout=-1)


def test_qsize_empty_full_work(qclass):
    q = make(qclass)
    assert q.qsize() == 0 and q.empty() and not q.full()
    for i in range(5):
        q.put(i)
    assert q.qsize() == 5 and not q.empty()
    assert drain(q, 5) == list(range(5))
    assert q.qsize() == 0 and q.empty()


def test_unpicklable_item_raises_from_put_and_nothing_is_enqueued(qclass):
    q = make(qclass)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        q.put(lambda: None)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        q.put([1, 2, threading.Lock()])
    assert q.qsize() == 0 and q.empty()
    q.put("after")
    assert q.get(timeout=LONG) == "after"


def test_put_many_with_one_bad_item_enqueues_nothing():
    q = bigipc.Queue()
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        q.put_many([1, 2, lambda: None, 4])
    assert q.qsize() == 0
    with pytest.raises(queue.Empty):
        q.get(timeout=SHORT)


@pytest.mark.parametrize("size", [100, 8 * MiB])
def test_the_consumer_gets_the_object_as_it_was_at_put_time(size):
    np = pytest.importorskip("numpy")
    q = bigipc.Queue()
    a = np.arange(size // 8, dtype=np.float64)
    b = bytearray(b"x" * size)
    q.put(a)
    q.put(b)
    a[:] = -1
    b[:] = b"y" * size
    got_a = q.get(timeout=LONG)
    got_b = q.get(timeout=LONG)
    assert got_a[0] == 0 and got_a[-1] == size // 8 - 1
    assert got_b == b"x" * size


def test_objects_as_they_were_even_when_the_feeder_holds_them():
    np = pytest.importorskip("numpy")
    q = bigipc.Queue()
    arrays = [np.full(MiB // 8, i, dtype=np.float64) for i in range(100)]
    for a in arrays:  # far more than the open-pipe limit: some wait, copied
        q.put(a)
    for a in arrays:
        a[:] = -1
    for i in range(100):
        got = q.get(timeout=LONG)
        assert got[0] == i and got[-1] == i


def test_numpy_and_big_bytes_round_trip(qclass):
    np = pytest.importorskip("numpy")
    q = make(qclass)
    a = np.random.default_rng(1).random(MiB // 8)
    blob = os.urandom(3 * MiB)
    t = threading.Thread(target=lambda: (q.put(a), q.put(blob), q.put({"a": a, "b": blob})))
    t.start()
    got = drain(q, 3)
    t.join(JOIN)
    assert (got[0] == a).all() and got[1] == blob
    assert (got[2]["a"] == a).all() and got[2]["b"] == blob


def test_inline_limit_boundaries():
    q = bigipc.Queue(inline_limit=4096)
    assert q.inline_limit == 4096
    for n in range(3900, 4200, 7):
        q.put(b"z" * n)
    for n in range(3900, 4200, 7):
        assert q.get(timeout=LONG) == b"z" * n
    with pytest.raises(ValueError):
        bigipc.Queue(inline_limit=10)


def test_closed_queue_raises_value_error(qclass):
    q = make(qclass)
    q.put(1)
    q.close()
    q.close()  # twice is fine
    with pytest.raises(ValueError, match="closed"):
        q.put(2)
    with pytest.raises(ValueError, match="closed"):
        q.get(timeout=SHORT)


def test_join_thread_needs_close():
    q = bigipc.Queue()
    with pytest.raises(ValueError):
        q.join_thread()
    q.close()
    q.join_thread()


def test_pickling_outside_process_start_is_refused(qclass):
    q = make(qclass)
    with pytest.raises(RuntimeError):
        pickle.dumps(q)


def test_a_garbage_datagram_raises_frame_error_and_the_queue_goes_on():
    q = bigipc.Queue()
    q._wsock.send(b"nonsense record")
    q.put("good")
    with pytest.raises(FrameError):
        q.get(timeout=LONG)
    assert q.get(timeout=LONG) == "good"


def test_many_threads_put_and_get_in_one_process():
    q = bigipc.Queue()
    got = []
    lock = threading.Lock()

    def producer(p):
        for s in range(300):
            q.put(item(p, s, [10, 100 * KiB][s % 2]))

    def consumer():
        for _ in range(300):
            it = q.get(timeout=LONG)
            with lock:
                got.append(it)

    threads = [threading.Thread(target=producer, args=(p,)) for p in range(4)]
    threads += [threading.Thread(target=consumer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN)
        assert not t.is_alive()
    assert sorted((g[0], g[1]) for g in got) == [(p, s) for p in range(4) for s in range(300)]
    assert all(check(g) for g in got)
    for p in range(4):  # per-producer order, as a single consumer per thread saw it
        assert len({g[1] for g in got if g[0] == p}) == 300


# --------------------------------------------------------------------------
# put_many / get_many


def test_put_many_get_many_keep_order_across_every_kind_of_record():
    q = bigipc.Queue()
    sizes = [10, 10, 10, 200 * KiB, 10, 70 * KiB] * 20
    objs = [item(1, s, sizes[s]) for s in range(len(sizes))]
    q.put_many(objs)
    assert q.qsize() == len(objs)
    got = q.get_many(7, timeout=LONG)
    assert 1 <= len(got) <= 7
    while len(got) < len(objs):
        got += q.get_many(50, timeout=LONG)
    assert [g[1] for g in got] == list(range(len(objs)))
    assert all(check(g) for g in got)
    with pytest.raises(queue.Empty):
        q.get_many(10, timeout=SHORT)


def test_get_returns_the_rest_of_a_batch_first_and_qsize_counts_it():
    q = bigipc.Queue()
    q.put_many(range(100))
    q.put("after")
    assert q.get(timeout=LONG) == 0
    assert q.qsize() == 100 and not q.empty()
    assert q.get_many(10) == list(range(1, 11))
    rest = []
    while len(rest) < 90:
        rest += q.get_many(1000, timeout=LONG)
    assert rest == [*list(range(11, 100)), "after"]


def test_get_many_argument_checks():
    q = bigipc.Queue()
    with pytest.raises(ValueError):
        q.get_many(0)
    q.put_many([])
    assert q.qsize() == 0


# --------------------------------------------------------------------------
# bounded queues


def test_bounded_queue_blocks_times_out_and_takes_room_back():
    q = bigipc.Queue(maxsize=3)
    for i in range(3):
        q.put(i)
    assert q.full() and q.qsize() == 3
    with pytest.raises(queue.Full):
        q.put_nowait(9)
    with pytest.raises(queue.Full):
        q.put(9, timeout=SHORT)
    assert q.get(timeout=LONG) == 0
    q.put(3, timeout=LONG)
    assert drain(q, 3) == [1, 2, 3]
    assert not q.full()


def test_bounded_put_many_takes_all_its_room_at_once():
    q = bigipc.Queue(maxsize=4)
    with pytest.raises(ValueError):
        q.put_many(range(5))
    q.put_many(range(3))
    with pytest.raises(queue.Full):
        q.put_many(range(2), timeout=SHORT)
    q.put_many([3])
    assert q.full()
    got = q.get_many(10, timeout=LONG)
    while len(got) < 4:
        got += q.get_many(10, timeout=LONG)
    assert got == [0, 1, 2, 3]


def test_a_bounded_producer_process_waits_for_a_consumer(children, method):
    q = bigipc.Queue(maxsize=2)
    r, w = bigipc.Pipe(duplex=False)
    proc = children.start(method, kids.bounded_putter, q, 50, w)
    got = []
    for _ in range(50):
        it = q.get(timeout=LONG)
        assert q.qsize() <= 2
        got.append(it[1])
    assert r.recv(timeout=LONG) == 50
    children.finish(proc)
    assert got == list(range(50))


def test_unbounded_put_never_blocks_when_nobody_reads():
    q = bigipc.Queue()
    for s in range(20000):
        q.put(item(1, s, 10))
    for s in range(20000, 20300):
        q.put(item(1, s, 200 * KiB))  # 60 MiB no one is reading yet
    # put() returned at all, with nobody reading, which is the point (a
    # block would hang until pytest-timeout); drain and check the order.
    got = drain(q, 20300)
    assert [g[1] for g in got] == list(range(20300))
    assert all(check(g) for g in got[-300:])


# --------------------------------------------------------------------------
# timeouts, partial items, signals


def test_timeout_with_a_partial_item_keeps_it_whole(children, method):
    q = bigipc.Queue()
    ready_r, ready_w = bigipc.Pipe(duplex=False)
    go_r, go_w = bigipc.Pipe(duplex=False)
    size = 32 * MiB
    proc = children.start(method, kids.put_then_wait, q, size, ready_w, go_r)
    assert ready_r.recv(timeout=LONG) == "put"
    os.kill(proc.pid, signal.SIGSTOP)  # its feeder cannot write the rest now
    try:
        with pytest.raises(queue.Empty):
            q.get(timeout=0.5)
        # The partly read item stays here, whole: counted, not lost.
        assert q.qsize() == 1 and not q.empty()
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    got = q.get(timeout=LONG)
    assert got[0] == 7 and len(got[2]) == size and check(got)
    go_w.send("exit")
    children.finish(proc)


def test_a_signal_handler_that_raises_mid_item_loses_nothing(children):
    q = bigipc.Queue()
    ready_r, ready_w = bigipc.Pipe(duplex=False)
    go_r, go_w = bigipc.Pipe(duplex=False)
    proc = children.start("fork", kids.put_then_wait, q, 32 * MiB, ready_w, go_r)
    assert ready_r.recv(timeout=LONG) == "put"
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        with alarm_raises_after(0.3):
            q.get(timeout=LONG)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    got = q.get(timeout=LONG)
    assert len(got[2]) == 32 * MiB and check(got)
    go_w.send("exit")
    children.finish(proc)


def test_a_signal_during_a_blocking_get_on_an_empty_queue():
    q = bigipc.Queue()

    with alarm_raises_after(0.1):
        q.get(timeout=LONG)
    q.put("still works")
    assert q.get(timeout=LONG) == "still works"


def test_a_consumer_that_exits_mid_item_costs_only_that_item(children, method):
    q = bigipc.Queue()
    report_r, report_w = bigipc.Pipe(duplex=False)
    q.put(item(1, 0, 64 * MiB))  # the feeder writes it as it is read
    q.put(item(1, 1, 10))
    # A consumer that gives up on the first item after a moment and exits.
    proc = children.start(method, kids.get_or_empty, q, 0.0001, report_w)
    report = report_r.recv(timeout=LONG)
    children.finish(proc)
    rest = []
    while True:
        try:
            rest.append(q.get(timeout=2.0))
        except queue.Empty:
            break
    seqs = [r[1] for r in rest]
    if report == "empty":  # it took the big item with it, partly read
        assert seqs == [1]
    else:
        assert report[1:] == (1, 0, True) and seqs == [1]
    assert all(check(r) for r in rest)


# --------------------------------------------------------------------------
# processes


@pytest.mark.parametrize("nprod,ncons", [(1, 1), (3, 2)])
def test_many_producers_and_consumers_exact_accounting(qclass, method, children, nprod, ncons):
    q = make(qclass)
    n = 60
    sizes = [10, 100, 80 * KiB, 2 * MiB]
    report_r, report_w = bigipc.Pipe(duplex=False)
    total = nprod * n
    shares = [total // ncons + (1 if i < total % ncons else 0) for i in range(ncons)]
    procs = [children.start(method, kids.produce, q, p, n, sizes) for p in range(nprod)]
    procs += [
        children.start(method, kids.consume, q, share, report_w, qclass is bigipc.JoinableQueue)
        for share in shares
    ]
    got = []
    for _ in range(ncons):
        got += report_r.recv(timeout=JOIN)
    for proc in procs:
        children.finish(proc)
    assert sorted((p, s) for p, s, _ in got) == [(p, s) for p in range(nprod) for s in range(n)]
    assert all(ok for _, _, ok in got)
    if qclass is bigipc.JoinableQueue:
        q.join(timeout=LONG)
    assert q.qsize() == 0


def test_one_consumer_sees_each_producers_order(method, children):
    q = bigipc.Queue()
    procs = [children.start(method, kids.produce, q, p, 200, [10, 70 * KiB, 10]) for p in range(3)]
    got = drain(q, 600)
    for proc in procs:
        children.finish(proc)
    for p in range(3):
        assert [g[1] for g in got if g[0] == p] == list(range(200))


def test_put_many_from_processes(method, children):
    q = bigipc.Queue()
    procs = [children.start(method, kids.produce_many, q, p, 3000, 50, 100) for p in range(2)]
    got = []
    while len(got) < 6000:
        got += q.get_many(1000, timeout=LONG)
    for proc in procs:
        children.finish(proc)
    for p in range(2):
        assert [g[1] for g in got if g[0] == p] == list(range(3000))


def test_items_put_by_an_exiting_process_are_not_lost(method, children):
    # The child puts far more than the socket and pipes hold and exits at
    # once; its feeder hands everything over while the parent drains.
    q = bigipc.Queue()
    proc = children.start(method, kids.put_unread_and_exit, q, 300, 200 * KiB, False)
    got = drain(q, 300)
    children.finish(proc)
    assert [g[1] for g in got] == list(range(300)) and all(check(g) for g in got)


def test_close_and_join_thread_hand_everything_over(children):
    q = bigipc.Queue()
    r, w = bigipc.Pipe(duplex=False)
    proc = children.start("fork", kids.produce, q, 4, 100, [300 * KiB], w, True)
    got = drain(q, 100)
    assert r.recv(timeout=LONG) == "done"
    children.finish(proc)
    assert [g[1] for g in got] == list(range(100))


def test_cancel_join_thread_lets_a_process_exit_with_items_unread(method, children):
    # Nobody reads: without cancel_join_thread the child would wait at exit
    # for its feeder, as the stdlib's does.
    q = bigipc.Queue()
    proc = children.start(method, kids.put_unread_and_exit, q, 200, 200 * KiB, True)
    children.finish(proc)
    # What the kernel already held is still there, whole, in order.
    got = []
    while True:
        try:
            got.append(q.get(timeout=1.0))
        except queue.Empty:
            break
    assert [g[1] for g in got] == list(range(len(got)))
    assert all(check(g) for g in got)


def test_fork_while_the_feeder_runs_sends_nothing_twice(children):
    q = bigipc.Queue()
    for s in range(30):
        q.put(item(1, s, 4 * MiB))  # the feeder holds 3 MiB of each
    assert q._feeder is not None and q._feeder.is_alive()
    proc = children.start("fork", kids.produce, q, 2, 50, [10])
    got = drain(q, 80)
    children.finish(proc)
    assert [g[1] for g in got if g[0] == 1] == list(range(30))
    assert all(check(g) for g in got)
    assert [g[1] for g in got if g[0] == 2] == list(range(50))
    with pytest.raises(queue.Empty):
        q.get(timeout=SHORT)


def test_a_closed_queue_does_not_keep_others_from_being_reset_in_a_forked_child():
    # Every live queue is reset in a forked child by the at-fork hook. A
    # queue closed earlier (its shared block already released) must not
    # stop the hook before it reaches the others: a child left with the
    # parent's process state (its feeder, its counter slot) could not hand
    # its items over.
    # Several of each: the hook meets them in no fixed order.
    closed = [bigipc.Queue() for _ in range(4)]
    for c in closed:
        c.close()
    live = [bigipc.Queue() for _ in range(4)]
    q = live[0]
    q.put("parent")
    assert q.get(timeout=LONG) == "parent"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            fresh = all(x._pid == os.getpid() and x._feeder is None for x in live)
            for i in range(3):
                q.put(("child", i))
            q.close()
            q.join_thread()
            os.write(w, b"ok" if fresh else b"stale")
        finally:
            os._exit(0)
    os.close(w)
    try:
        got = [q.get(timeout=LONG) for _ in range(3)]
        assert got == [("child", i) for i in range(3)]
        ready, _, _ = select.select([r], [], [], LONG)
        assert ready and os.read(r, 16) == b"ok"
    finally:
        os.close(r)
        _reap(pid)
    del closed


def test_a_queue_whose_fork_reset_fails_is_set_up_again_at_its_first_use(monkeypatch):
    # If resetting one queue in the at-fork hook raises, the hook still
    # resets the others, and the failed queue does not run on its parent's
    # state: its first put or get in the child sets it up again.
    queues = [bigipc.Queue() for _ in range(4)]
    for x in queues:
        x.put("parent")
        assert x.get(timeout=LONG) == "parent"
    victim = queues[1]
    real = type(victim)._after_fork
    failed = []

    def flaky(self):
        if self is victim and not failed:
            failed.append(True)
            raise OSError(errno.EMFILE, "simulated failure in the fork hook")
        real(self)

    monkeypatch.setattr(type(victim), "_after_fork", flaky)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            me = os.getpid()
            others = all(x._pid == me for x in queues if x is not victim)
            marked = victim._pid != me and victim._slot < 0
            for x in queues:
                x.put(("child", queues.index(x)))
            for x in queues:
                x.close()
                x.join_thread()
            fresh = victim._pid == me
            os.write(w, b"ok" if (failed and others and marked and fresh) else b"bad")
        finally:
            os._exit(0)
    os.close(w)
    try:
        for i, x in enumerate(queues):
            assert x.get(timeout=LONG) == ("child", i)
        ready, _, _ = select.select([r], [], [], LONG)
        assert ready and os.read(r, 16) == b"ok"
    finally:
        os.close(r)
        _reap(pid)


def _reap(pid):
    deadline = time.monotonic() + LONG
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the forked child did not exit")


# --------------------------------------------------------------------------
# JoinableQueue


def test_task_done_too_many_times():
    q = bigipc.JoinableQueue()
    with pytest.raises(ValueError):
        q.task_done()
    q.put(1)
    q.get(timeout=LONG)
    q.task_done()
    with pytest.raises(ValueError):
        q.task_done()
    q.join(timeout=LONG)


def test_join_waits_for_workers_in_other_processes(method, children):
    q = bigipc.JoinableQueue()
    for i in range(40):
        q.put(i)
    with pytest.raises(TimeoutError):
        q.join(timeout=SHORT)
    procs = [children.start(method, kids.task_worker, q, 20) for _ in range(2)]
    q.join(timeout=JOIN)
    for proc in procs:
        children.finish(proc)
    assert q.qsize() == 0


def test_a_dropped_queue_releases_its_descriptors():
    before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    for _ in range(50):
        q = bigipc.Queue()
        q.put(b"x" * MiB)  # starts a feeder
        q.get(timeout=LONG)
        del q
    deadline = time.monotonic() + LONG
    while before is not None:
        gc.collect()
        now = len(os.listdir("/proc/self/fd"))
        if now <= before + 5 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if before is not None:
        assert now <= before + 5


def test_queue_socket_is_a_datagram_socket():
    q = bigipc.Queue()
    assert q._rsock.type == socket.SOCK_DGRAM


@pytest.mark.parametrize("size", [100 * KiB, 1 * MiB, 3 * MiB])
def test_buffer_types_survive_the_trip(size):
    np = pytest.importorskip("numpy")
    q = bigipc.Queue()
    a = np.arange(size // 8, dtype=np.float64)
    objs = [b"b" * size, bytearray(b"a" * size), a, [a, b"c" * size], pickle.PickleBuffer(b"d" * size)]
    for obj in objs:
        q.put(obj)
    got = drain(q, len(objs))
    assert type(got[0]) is bytes and got[0] == objs[0]
    assert type(got[1]) is bytearray and got[1] == objs[1]
    assert got[2].flags.writeable and got[2].flags.aligned and (got[2] == a).all()
    assert (got[3][0] == a).all() and type(got[3][1]) is bytes
    assert bytes(got[4]) == b"d" * size
    got[2][0] = 5  # the receiver's own memory
    assert a[0] == 0


def test_counts_stay_exact_across_every_record_kind():
    np = pytest.importorskip("numpy")
    q = bigipc.JoinableQueue()
    items = [b"a", b"b" * 70 * KiB, np.ones(300_000), np.ones(MiB), bytearray(3 * MiB)]
    t = threading.Thread(target=lambda: [q.put(i) for i in items])
    t.start()
    for _ in items:
        q.get(timeout=LONG)
        q.task_done()
    t.join(JOIN)
    q.put_many([*list(range(10)), b"c" * 70 * KiB])
    got = []
    while len(got) < 11:
        got += q.get_many(20, timeout=LONG)
    for _ in got:
        q.task_done()
    assert q.qsize() == 0
    q.join(timeout=LONG)
    with pytest.raises(ValueError):
        q.task_done()


def test_without_memfd_the_shared_block_is_an_unlinked_temporary_file(monkeypatch, children):
    # What macOS and other systems without memfd_create get.
    monkeypatch.delattr(os, "memfd_create", raising=False)
    q = bigipc.JoinableQueue(maxsize=3)
    target = os.readlink("/proc/self/fd/%d" % q._shm_fd) if os.path.isdir("/proc/self/fd") else ""
    assert "memfd" not in target and "/dev/shm" not in target
    for i in range(3):
        q.put(i)
    assert q.qsize() == 3 and q.full()
    proc = children.start("fork", kids.task_worker, q, 3)
    q.join(timeout=JOIN)
    children.finish(proc)
    assert q.qsize() == 0 and not q.full()


def test_a_feeder_that_goes_idle_never_strands_later_items():
    # The feeder exits when it has nothing left; puts racing with its exit
    # must either reach it or start a new one. Large items (a pipe each,
    # most of it left to the feeder) start and stop it on every round.
    q = bigipc.Queue()
    size = q.inline_limit + MiB
    for round_ in range(100):
        t = threading.Thread(target=lambda r=round_: [q.put(item(r, s, size)) for s in range(2)])
        t.start()
        got = drain(q, 2)
        t.join(JOIN)
        assert [(g[0], g[1]) for g in got] == [(round_, 0), (round_, 1)]
    assert all(check(g) for g in got)


def test_state_queries_on_a_closed_queue(qclass):
    q = make(qclass)
    q.close()
    for call in (q.qsize, lambda: q.put_nowait(1), q.get_nowait):
        with pytest.raises(bigipc.QueueClosedError, match="closed"):
            call()
    assert issubclass(bigipc.QueueClosedError, ValueError)
    assert issubclass(bigipc.QueueClosedError, OSError)
