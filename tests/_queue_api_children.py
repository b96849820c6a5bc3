"""Child-process targets for tests/test_queues.py.

Module-level functions, importable by name in spawn and forkserver children
(tests/_children.make_importable_in_children puts this directory on the
path). Every wait is bounded, so a bug shows as a failing exit code.
"""

import os
import queue
import time
import zlib

WAIT = 60.0


def item(producer, seq, size):
    """A deterministic item: its payload can be checked by the receiver."""
    if size <= 0:
        return (producer, seq, b"")
    unit = b"%d:%d;" % (producer, seq)
    payload = (unit * (size // len(unit) + 1))[:size]
    return (producer, seq, payload)


def check(it):
    producer, seq, payload = it
    expected = item(producer, seq, len(payload))[2]
    return zlib.crc32(payload) == zlib.crc32(expected)


def produce(q, producer, n, sizes, done_conn=None, close=False):
    for seq in range(n):
        q.put(item(producer, seq, sizes[seq % len(sizes)]))
    if close:
        q.close()
        q.join_thread()
    if done_conn is not None:
        done_conn.send("done")


def produce_many(q, producer, n, size, chunk):
    seq = 0
    while seq < n:
        k = min(chunk, n - seq)
        q.put_many([item(producer, s, size) for s in range(seq, seq + k)])
        seq += k


def consume(q, n, report, joinable=False):
    """Get ``n`` items; send back (producer, seq, ok) triples in one list."""
    got = []
    for _ in range(n):
        it = q.get(timeout=WAIT)
        got.append((it[0], it[1], check(it)))
        if joinable:
            q.task_done()
    report.send(got)


def put_then_wait(q, size, ready, go):
    """Put one large item, say so, then wait to be told to exit."""
    q.put(item(7, 0, size))
    ready.send("put")
    if not go.poll(WAIT):
        os._exit(3)


def put_unread_and_exit(q, n, size, cancel):
    """Put items nobody reads yet; exit with or without waiting for them."""
    for seq in range(n):
        q.put(item(3, seq, size))
    if cancel:
        q.cancel_join_thread()


def bounded_putter(q, n, report):
    """Put ``n`` items into a bounded queue; report how many went in."""
    for seq in range(n):
        q.put(item(5, seq, 10), timeout=WAIT)
    report.send(n)


def task_worker(q, n):
    for _ in range(n):
        q.get(timeout=WAIT)
        time.sleep(0.001)
        q.task_done()


def get_or_empty(q, timeout, report):
    try:
        it = q.get(timeout=timeout)
    except queue.Empty:
        report.send("empty")
    else:
        report.send(("item", it[0], it[1], check(it)))
