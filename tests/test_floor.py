"""The benchmark's C floor: ``bigipc._core._floor_write``/``_floor_read`` and
the "C read/write loop" transport built on them.

The floor is what bigipc's ratios are measured against, so it has to move
exactly the bytes it claims, and fail loudly (not hang, not undercount)
when the pipe misbehaves.
"""

import contextlib
import os
import signal
import sys
import threading

import pytest

from bigipc import _bench

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _signals import Interrupted, alarm, raise_interrupted  # noqa: E402

_core = pytest.importorskip("bigipc._core", reason="the C floor lives in the compiled core")

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pipe():
    r, w = os.pipe()
    ends = {"r": r, "w": w}
    yield ends
    for fd in ends.values():
        with contextlib.suppress(OSError):
            os.close(fd)


def _close(ends, which):
    os.close(ends.pop(which))


def _reader(fd, total, into):
    def run():
        data = bytearray()
        while len(data) < total:
            chunk = os.read(fd, total - len(data))
            if not chunk:
                break
            data += chunk
        into.append(bytes(data))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_write_cycles_through_the_messages_from_start(pipe):
    messages = [bytes([i]) * (3 + i) for i in range(3)]  # 3, 4 and 5 bytes
    got = []
    # From message 2: 2, 0, 1, 2, 0 (5 + 3 + 4 + 5 + 3 bytes).
    thread = _reader(pipe["r"], 20, got)
    _core._floor_write(pipe["w"], messages, 2, 5)
    thread.join(10)
    assert got == [messages[2] + messages[0] + messages[1] + messages[2] + messages[0]]


def test_write_of_more_than_a_pipe_full_is_whole(pipe):
    message = os.urandom(1 << 20)  # partial writes: the pipe holds 64 KiB
    got = []
    thread = _reader(pipe["r"], 2 << 20, got)
    _core._floor_write(pipe["w"], [message], 0, 2)
    thread.join(10)
    assert got == [message * 2]


def test_read_leaves_the_last_message_in_the_buffer(pipe):
    messages = [os.urandom(300 * 1024) for _ in range(3)]  # each bigger than the pipe
    thread = threading.Thread(target=lambda: [os.write(pipe["w"], m) for m in messages], daemon=True)
    thread.start()
    buffer = bytearray(300 * 1024)
    _core._floor_read(pipe["r"], buffer, 3)
    thread.join(10)
    assert buffer == messages[2]


def test_read_fails_at_end_of_file_inside_a_message(pipe):
    os.write(pipe["w"], b"x" * 150)
    _close(pipe, "w")
    with pytest.raises(EOFError, match="50 bytes before the end"):
        _core._floor_read(pipe["r"], bytearray(100), 2)


def test_write_to_a_closed_reader_raises_broken_pipe(pipe):
    _close(pipe, "r")
    previous = signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        with pytest.raises(BrokenPipeError):
            _core._floor_write(pipe["w"], [b"x"], 0, 1)
    finally:
        signal.signal(signal.SIGPIPE, previous)


def test_bad_arguments_are_refused_before_anything_is_written(pipe):
    with pytest.raises(TypeError, match="bytes objects"):
        _core._floor_write(pipe["w"], [b"ok", bytearray(b"no")], 0, 1)
    with pytest.raises(ValueError):
        _core._floor_write(pipe["w"], [], 0, 1)
    with pytest.raises(ValueError):
        _core._floor_write(pipe["w"], [b"x"], 0, -1)
    with pytest.raises(ValueError):
        _core._floor_read(pipe["r"], bytearray(1), -1)
    with pytest.raises(BufferError):
        _core._floor_read(pipe["r"], b"read-only", 1)
    os.set_blocking(pipe["r"], False)
    with pytest.raises(BlockingIOError):
        os.read(pipe["r"], 1)  # nothing was written


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs setitimer")
def test_a_signal_handler_that_raises_ends_a_blocked_read(pipe):
    with alarm(raise_interrupted, 0.2), pytest.raises(Interrupted):
        _core._floor_read(pipe["r"], bytearray(10), 1)  # nothing ever comes


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs setitimer")
def test_a_signal_handler_that_returns_lets_the_read_go_on(pipe):
    calls = []
    # Interrupt the blocked read, then let the message come.
    timer = threading.Timer(0.4, os.write, (pipe["w"], b"late"))
    buffer = bytearray(4)
    with alarm(lambda signum, frame: calls.append(signum), 0.1):
        timer.start()
        _core._floor_read(pipe["r"], buffer, 1)
    timer.join()
    assert calls and buffer == b"late"


@pytest.mark.parametrize("case", ["bytes-100B", "bytes-1MiB"])
def test_the_c_loop_transport_moves_checked_runs(case):
    transport, case = _bench.TRANSPORTS["c-loop"], _bench.CASES[case]
    assert transport.unavailable() is None
    with _bench.Session(transport, case, timeout=60) as session:
        for _ in range(2):  # the second run starts where the first stopped
            measurement = session.run(case.message_count(quick=True)).raise_for_error()
            assert measurement.messages_per_s > 0


def test_a_wrong_last_message_fails_the_run():
    case = _bench.BytesCase("t-floor", "test", 100, 10, 10, max_slots=4)
    good = _bench.BytesCase.build_message(case, 0, 2)  # message #7 is slot 2
    checker = case.checker()
    assert _bench._receive_run_checked(lambda n: bytearray(good), checker, 7) is None
    checker = case.checker()
    problem = _bench._receive_run_checked(lambda n: bytearray(case.build_message(0, 1)), checker, 7)
    assert problem is not None and problem.startswith("message #7: ")
