"""Messages of 2 GiB and more: the 12-byte header, memory, and deadlines in
the middle of a multi-gigabyte transfer.

These move several GiB each and need about 9 GiB of memory; they are marked
``huge``. They run by default (CI has 24 GiB); ``-m "not huge"`` skips them.
"""

import multiprocessing
import os
import resource
import sys
import time

import numpy as np
import pytest

import bigipc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _signals import Interrupted, alarm, raise_interrupted  # noqa: E402

pytestmark = [pytest.mark.huge, pytest.mark.timeout(600)]

GiB = 1 << 30
# More than 4 GiB, and not a multiple of anything convenient.
HUGE = 4 * GiB + 8 * 4099
CHUNK_WORDS = 8 << 20  # compare 64 MiB at a time


def _pattern(start_word, words):
    # Word i of the message holds i * 2654435761 (mod 2**64): every 8 bytes
    # differ from their neighbours, so a lost, repeated or shifted byte shows.
    return np.arange(start_word, start_word + words, dtype=np.uint64) * np.uint64(2654435761)


def _message(nbytes):
    return _pattern(0, nbytes // 8)


def _check(buffer, nbytes):
    data = np.frombuffer(buffer, dtype=np.uint64, count=nbytes // 8)
    for start in range(0, nbytes // 8, CHUNK_WORDS):
        words = min(CHUNK_WORDS, nbytes // 8 - start)
        if not np.array_equal(data[start : start + words], _pattern(start, words)):
            bad = np.nonzero(data[start : start + words] != _pattern(start, words))[0][0]
            raise AssertionError("message differs at byte %d" % ((start + bad) * 8))


def _send_bytes_child(conn, nbytes):
    conn.send_bytes(_message(nbytes))
    conn.close()


def _send_object_child(conn, nbytes):
    conn.send(_message(nbytes))
    conn.close()


_children = []


@pytest.fixture(autouse=True)
def _no_stray_children():
    yield
    # A failed test must not leave a child blocked on a full pipe.
    while _children:
        child = _children.pop()
        if child.is_alive():
            child.kill()
        child.join(10)


def _start(target, *args):
    process = multiprocessing.get_context("fork").Process(target=target, args=args, daemon=True)
    process.start()
    _children.append(process)
    return process


def _join(process):
    process.join(120)
    assert process.exitcode == 0


def _rss_growth(before_kib):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before_kib * 1024


def test_recv_bytes_over_4gib():
    reader, writer = bigipc.Pipe(duplex=False)
    child = _start(_send_bytes_child, writer, HUGE)
    writer.close()
    data = reader.recv_bytes(timeout=300)
    _join(child)
    assert len(data) == HUGE
    _check(data, HUGE)


def test_recv_bytes_into_over_4gib_on_socket():
    receiver, sender = bigipc.Pipe(duplex=True)
    child = _start(_send_bytes_child, sender, HUGE)
    sender.close()
    target = np.empty(HUGE // 8 + 16, dtype=np.uint64)
    assert receiver.recv_bytes_into(target, 64, timeout=300) == HUGE
    _join(child)
    _check(memoryview(target).cast("B")[64 : 64 + HUGE], HUGE)


def test_object_over_4gib_out_of_band():
    reader, writer = bigipc.Pipe(duplex=False)
    child = _start(_send_object_child, writer, HUGE)
    writer.close()
    array = reader.recv(timeout=300)
    _join(child)
    assert array.dtype == np.uint64 and array.nbytes == HUGE and array.flags.writeable
    _check(array, HUGE)


def test_receiver_memory_is_message_plus_a_little():
    # The receiver allocates the message once and reads into it: its peak
    # memory grows by N plus a small constant, not 2N as with a BytesIO.
    nbytes = 2 * GiB + 4096
    reader, writer = bigipc.Pipe(duplex=False)
    child = _start(_send_bytes_child, writer, nbytes)
    writer.close()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    data = reader.recv_bytes(timeout=300)
    growth = _rss_growth(before)
    _join(child)
    assert len(data) == nbytes
    assert growth <= nbytes + 64 * (1 << 20), growth


def test_timeout_takes_effect_mid_transfer_and_resumes():
    # A 3 GiB message flowing at full speed: a receive with a short deadline
    # ends within about that deadline, not after the whole message, and the
    # next receive completes the same message.
    nbytes = 3 * GiB
    reader, writer = bigipc.Pipe(duplex=False)
    child = _start(_send_bytes_child, writer, nbytes)
    writer.close()
    # The child takes a moment to build the message; wait for its first bytes.
    assert reader.poll(120)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        reader.recv_bytes(timeout=0.3)
    elapsed = time.monotonic() - started
    assert reader.recv_in_progress
    assert elapsed < 5, elapsed
    data = reader.recv_bytes(timeout=300)
    _join(child)
    assert len(data) == nbytes
    _check(data, nbytes)


def test_signal_interrupts_mid_transfer_and_stream_stays_in_sync():
    nbytes = 2 * GiB + 12345 * 8
    reader, writer = bigipc.Pipe(duplex=False)
    child = _start(_send_bytes_child, writer, nbytes)
    writer.close()

    assert reader.poll(120)
    with alarm(raise_interrupted, 0.3), pytest.raises(Interrupted):
        reader.recv_bytes(timeout=60)
    assert reader.recv_in_progress
    data = reader.recv_bytes(timeout=300)
    _join(child)
    assert len(data) == nbytes
    _check(data, nbytes)
