"""QueueEnds, the per-item fast paths of bigipc.Queue, in both cores.

bigipc/queues.py owns the sockets, the counters and the record format; these
tests drive QueueEnds directly on a real datagram socket pair and a real
int64 counter block, as the queue does, and check the contract written in
bigipc/_core.pyi: what is sent and counted, what is reported back instead.
"""

import array
import os
import socket
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _signals import Interrupted, alarm, raise_interrupted  # noqa: E402

HEADER = b"BQ\x01\x01\x00\x00\x00\x01"
PUTS, GETS, PENDING = 0, 1, 3
SLOT = 8  # a slot starting at int64 index 8, as queues.py lays them out
WAIT = 30.0


@pytest.fixture
def pair():
    recv_sock, send_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    yield recv_sock, send_sock
    recv_sock.close()
    send_sock.close()


@pytest.fixture
def counters():
    return memoryview(bytearray(8 * 64)).cast("q")


@pytest.fixture
def ends(core, pair, counters):
    return core.QueueEnds(pair[0], pair[1], counters, HEADER, PUTS, GETS, PENDING)


def test_constructor_rejects_bad_header_and_counters(core, pair, counters):
    with pytest.raises(ValueError):
        core.QueueEnds(pair[0], pair[1], counters, HEADER[:7], PUTS, GETS, PENDING)
    with pytest.raises(ValueError):
        core.QueueEnds(pair[0], pair[1], bytearray(64), HEADER, PUTS, GETS, PENDING)
    with pytest.raises((ValueError, TypeError, BufferError)):
        core.QueueEnds(pair[0], pair[1], bytes(64), HEADER, PUTS, GETS, PENDING)


def test_send_inline_sends_one_record_and_counts_it(ends, pair, counters):
    assert ends.send_inline(SLOT, b"payload") is True
    assert pair[0].recv(100) == HEADER + b"payload"
    assert (counters[SLOT + PUTS], counters[SLOT + PENDING]) == (1, 0)


def test_send_inline_without_room_counts_nothing(core, pair, counters):
    recv_sock, send_sock = pair
    send_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ends = core.QueueEnds(recv_sock, send_sock, counters, HEADER, PUTS, GETS, PENDING)
    sent = 0
    while ends.send_inline(SLOT, b"x" * 512):
        sent += 1
        assert sent < 100000, "the socket never filled"
    assert (counters[SLOT + PUTS], counters[SLOT + PENDING]) == (sent, 0)
    recv_sock.recv(4096)
    assert ends.send_inline(SLOT, b"y") is True


def test_send_inline_error_restores_pending(core, pair, counters):
    recv_sock, send_sock = pair
    ends = core.QueueEnds(recv_sock, send_sock, counters, HEADER, PUTS, GETS, PENDING)
    recv_sock.close()
    with pytest.raises(OSError):
        ends.send_inline(SLOT, b"nobody listens")
    assert (counters[SLOT + PUTS], counters[SLOT + PENDING]) == (0, 0)


def test_recv_inline_is_counted_and_sized(ends, pair, counters):
    pair[1].send(HEADER + b"abc")
    buf = bytearray(64)
    assert ends.recv(buf, SLOT, False) == len(HEADER) + 3
    assert bytes(buf[:11]) == HEADER + b"abc"
    assert counters[SLOT + GETS] == 1


def test_recv_nothing_there(ends, counters):
    assert ends.recv(bytearray(64), SLOT, False) == -1
    assert counters[SLOT + GETS] == 0


@pytest.mark.parametrize(
    "datagram",
    [b"BQ\x01\x02\x00\x00\x00\x02rest", b"short", b"XX" + HEADER[2:] + b"abc"],
    ids=["other-kind", "short", "bad-magic"],
)
def test_other_records_come_back_uncounted(ends, pair, counters, datagram):
    pair[1].send(datagram)
    buf = bytearray(64)
    got = ends.recv(buf, SLOT, False)
    assert got[0] == len(datagram) and got[1] == []
    assert bytes(buf[: len(datagram)]) == datagram
    assert counters[SLOT + GETS] == 0


def test_a_truncated_record_is_reported_with_its_flag(ends, pair, counters):
    pair[1].send(HEADER + b"z" * 100)
    _, fds, flags = ends.recv(bytearray(16), SLOT, False)
    assert flags & socket.MSG_TRUNC and fds == []
    assert counters[SLOT + GETS] == 0


def test_descriptors_are_handed_over_close_on_exec(ends, pair, counters):
    r, w = os.pipe()
    try:
        pair[1].sendmsg([HEADER], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
        n, fds, _ = ends.recv(bytearray(64), SLOT, False)
        assert n == len(HEADER) and len(fds) == 1 and fds[0] != r
        if hasattr(socket, "MSG_CMSG_CLOEXEC"):
            assert not os.get_inheritable(fds[0])
        os.write(w, b"through")
        assert os.read(fds[0], 16) == b"through"
        os.close(fds[0])
        assert counters[SLOT + GETS] == 0
    finally:
        os.close(r)
        os.close(w)


def test_recv_waits_for_the_next_record(ends, pair):
    timer = threading.Timer(0.2, lambda: pair[1].send(HEADER + b"late"))
    timer.start()
    started = time.monotonic()
    try:
        assert ends.recv(bytearray(64), SLOT, True) == len(HEADER) + 4
    finally:
        timer.join(WAIT)
    assert time.monotonic() - started < WAIT


def test_a_raising_signal_handler_interrupts_a_wait_with_nothing_taken(ends, pair, counters):
    with alarm(raise_interrupted, 0.2), pytest.raises(Interrupted):
        ends.recv(bytearray(64), SLOT, True)
    pair[1].send(HEADER + b"next")
    assert ends.recv(bytearray(64), SLOT, False) == len(HEADER) + 4
    assert counters[SLOT + GETS] == 1


def test_add_is_exact_across_threads(ends, counters):
    def work():
        for _ in range(20000):
            ends.add(SLOT + GETS, 1)
            ends.add(SLOT + PUTS, -1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert (counters[SLOT + GETS], counters[SLOT + PUTS]) == (80000, -80000)
    assert ends.add(SLOT + GETS, 5) == 80005


@pytest.mark.parametrize("index", [-1, 64])
def test_add_and_slots_out_of_range(ends, index):
    with pytest.raises(ValueError):
        ends.add(index, 1)
    with pytest.raises(ValueError):
        ends.send_inline(index, b"x")
    with pytest.raises(ValueError):
        ends.recv(bytearray(64), index, False)
