"""``python -m bigipc selfcheck``: is this installation of bigipc sound?

A handful of end-to-end checks with real processes and real pipes, each
bounded in time: which core is loaded, round trips through both kinds of
``Pipe``, timeouts in both directions, and a stdlib ``multiprocessing``
Connection at the other end. Prints PASS or FAIL per check; the command
exits non-zero if any check fails.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable, TextIO, cast

import bigipc
from bigipc import _platform
from bigipc._bench import default_start_method

__all__ = ["run_selfcheck"]

# Message sizes of the round trips: empty, one byte, one past a default
# Linux pipe (64 KiB) and a message far larger than any kernel buffer.
ROUND_TRIP_SIZES = (0, 1, 64 * 1024 + 1, 16 * 1024 * 1024)
# Every receive in the parent is bounded, so a broken build fails, not hangs.
_PATIENCE = 60.0


class CheckFailed(Exception):
    pass


def _payload(size: int, salt: int) -> bytes:
    # Distinct content per message, so a swapped or stale echo shows.
    block = bytes((i * 131 + salt * 17) & 0xFF for i in range(251))
    return (block * (size // len(block) + 1))[:size]


def _echo_child(receiver: Any, sender: Any, count: int) -> None:
    """Child process: send back ``count`` byte messages, then one object."""
    for _ in range(count):
        sender.send_bytes(receiver.recv_bytes())
    sender.send(receiver.recv())


def _links(library: str, duplex: bool) -> tuple[Any, Any, Any, Any]:
    """(parent_recv, parent_send, child_recv, child_send).

    The parent's ends are always bigipc; the child's are bigipc or, for
    ``library == "multiprocessing"``, unmodified stdlib Connections whose
    partners were taken over with ``bigipc.Connection.adopt``.
    """
    # Typed loosely on purpose: the ends are of either library.
    make: Callable[[bool], tuple[Any, Any]]
    adopt: Callable[[Any], Any]
    if library == "bigipc":
        make, adopt = bigipc.Pipe, (lambda conn: conn)
    else:
        make, adopt = multiprocessing.Pipe, cast("Callable[[Any], Any]", bigipc.Connection.adopt)
    if duplex:
        mine, theirs = make(True)
        mine = adopt(mine)
        return mine, mine, theirs, theirs
    child_recv, parent_send = make(False)
    parent_recv, child_send = make(False)
    return adopt(parent_recv), adopt(parent_send), child_recv, child_send


def _round_trip(library: str, duplex: bool) -> str:
    parent_recv, parent_send, child_recv, child_send = _links(library, duplex)
    if library == "multiprocessing":
        # A stdlib peer reads plain messages only: objects with large
        # buffers must not go out of band (multipart) to it.
        parent_send.out_of_band_threshold = None
    # Any: typeshed's BaseContext lacks Process (each concrete context has it).
    context: Any = multiprocessing.get_context(default_start_method())
    child = context.Process(
        target=_echo_child, args=(child_recv, child_send, len(ROUND_TRIP_SIZES)), daemon=True
    )
    child.start()
    # The child has its ends now (inherited or passed); ours must go, or
    # the child would not see the parent hang up.
    child_recv.close()
    child_send.close()  # the same object when duplex: close() is idempotent
    try:
        for salt, size in enumerate(ROUND_TRIP_SIZES):
            sent = _payload(size, salt)
            parent_send.send_bytes(sent, timeout=_PATIENCE)
            echoed = parent_recv.recv_bytes(timeout=_PATIENCE)
            if echoed != sent:
                raise CheckFailed(
                    "%d-byte message came back as %d bytes%s"
                    % (size, len(echoed), " with different content" if len(echoed) == size else "")
                )
        # The 1 MiB buffer goes out of band (a multipart message) between
        # bigipc ends, in band to a stdlib peer.
        obj = {
            "sizes": ROUND_TRIP_SIZES,
            "text": "h\u00e9llo",
            "nested": [1.5, None, (2, 3)],
            "blob": bytearray(_payload(1 << 20, 7)),
        }
        parent_send.send(obj, timeout=_PATIENCE)
        if parent_recv.recv(timeout=_PATIENCE) != obj:
            raise CheckFailed("an object came back different")
    finally:
        parent_send.close()
        parent_recv.close()
        child.join(_PATIENCE)
        if child.is_alive():
            child.kill()
            child.join()
    if child.exitcode != 0:
        raise CheckFailed("the child process exited with code %s" % child.exitcode)
    sizes = ", ".join(str(s) for s in ROUND_TRIP_SIZES)
    return "bytes of %s and an object holding 1 MiB, there and back" % sizes


def _expect_timeout(call: Callable[[], object], timeout: float, what: str) -> float:
    started = time.monotonic()
    try:
        call()
    except TimeoutError:
        elapsed = time.monotonic() - started
    else:
        raise CheckFailed("%s returned instead of raising TimeoutError" % what)
    # Never early; late only by scheduling noise.
    if not timeout <= elapsed + 0.002 or elapsed > timeout + 2.0:
        raise CheckFailed("%s with timeout=%g raised after %.3f s" % (what, timeout, elapsed))
    return elapsed


def _check_receive_timeout() -> str:
    reader, writer = bigipc.Pipe(duplex=False)
    with reader, writer:
        elapsed = _expect_timeout(lambda: reader.recv_bytes(timeout=0.2), 0.2, "recv_bytes on an empty pipe")
        _expect_timeout(lambda: reader.recv_bytes(timeout=0), 0.0, "recv_bytes(timeout=0) on an empty pipe")
        writer.send_bytes(b"after the timeout", timeout=5)
        if reader.recv_bytes(timeout=5) != b"after the timeout":
            raise CheckFailed("the connection did not work after a TimeoutError")
    return "TimeoutError after %.3f s for timeout=0.2; the connection works afterwards" % elapsed


def _check_partial_receive() -> str:
    # Part of a frame in the pipe: the receive times out holding it, and the
    # next receive completes the same message.
    read_fd, write_fd = os.pipe()
    reader = bigipc.Connection(read_fd, writable=False)
    try:
        message = _payload(200_000, 3)
        frame = len(message).to_bytes(4, "big") + message
        # 30,000 bytes fit in any pipe; the rest is written by a thread
        # while the second receive reads.
        os.write(write_fd, frame[:30_000])
        _expect_timeout(
            lambda: reader.recv_bytes(timeout=0.2), 0.2, "recv_bytes with part of a message in the pipe"
        )
        writer = threading.Thread(target=_write_all, args=(write_fd, frame[30_000:]), daemon=True)
        writer.start()
        received = reader.recv_bytes(timeout=_PATIENCE)
        writer.join(_PATIENCE)
        if received != message:
            raise CheckFailed("the message received after a timeout mid-message is not the one sent")
    finally:
        reader.close()
        os.close(write_fd)
    return "a receive that timed out mid-message was completed by the next one"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _check_partial_send() -> str:
    reader, writer = bigipc.Pipe(duplex=False)
    with reader, writer:
        pipe_size = _platform.set_pipe_size(writer.fileno(), 0) or 64 * 1024
        big = _payload(4 * max(pipe_size, 1 << 20), 5)
        _expect_timeout(lambda: writer.send_bytes(big, timeout=0.2), 0.2, "send_bytes with nobody reading")
        if not writer.send_pending:
            raise CheckFailed("a send that timed out part way kept no pending rest")
        received: list[Any] = []

        def drain() -> None:
            try:
                received.append(reader.recv_bytes(timeout=_PATIENCE))
                received.append(reader.recv_bytes(timeout=_PATIENCE))
            except Exception as exc:  # reported below
                received.append(exc)

        thread = threading.Thread(target=drain, daemon=True)
        thread.start()
        writer.send_bytes(b"the next message", timeout=_PATIENCE)
        thread.join(_PATIENCE)
        if thread.is_alive():
            raise CheckFailed("the reader did not get both messages")
        if len(received) != 2 or isinstance(received[-1], Exception):
            raise CheckFailed("receiving after a partial send failed: %r" % (received[-1],))
        if received[0] != big:
            raise CheckFailed(
                "the message whose send timed out arrived damaged (%d bytes)" % len(received[0])
            )
        if received[1] != b"the next message":
            raise CheckFailed("the message sent after it arrived damaged")
    return "a send that timed out part way was finished, intact, before the next message"


def _check_implementation(out: TextIO) -> str:
    expect_compiled = os.environ.get("BIGIPC_PUREPYTHON", "") in ("", "0")
    required = os.environ.get("BIGIPC_REQUIRE_EXTENSION", "") not in ("", "0")
    if bigipc.IMPLEMENTATION == "python" and expect_compiled:
        try:
            importlib.import_module("bigipc._core")
        except ImportError as exc:
            reason = str(exc)
        else:  # pragma: no cover - the backend would have taken it
            reason = "unknown"
        bar = "!" * 78
        out.write(
            "%s\nWARNING: bigipc is running on its pure-Python core, although the compiled\n"
            "core was expected (BIGIPC_PUREPYTHON is not set). bigipc works, but far more\n"
            "slowly. The extension failed to import: %s\n"
            "Reinstall with a C compiler and the Python headers present to build it.\n%s\n"
            % (bar, reason, bar)
        )
        if required:
            raise CheckFailed("BIGIPC_REQUIRE_EXTENSION is set but the compiled core is not loaded")
        return "pure-Python core (compiled core missing: see the warning above)"
    return "%s core" % bigipc.IMPLEMENTATION


CHECKS: list[tuple[str, Callable[[], str] | None]] = [
    ("core", None),  # _check_implementation, which also writes the warning
    ("round trip, bigipc.Pipe()", lambda: _round_trip("bigipc", True)),
    ("round trip, bigipc.Pipe(duplex=False)", lambda: _round_trip("bigipc", False)),
    ("receive timeout", _check_receive_timeout),
    ("receive resumed after a timeout", _check_partial_receive),
    ("send resumed after a timeout", _check_partial_send),
    ("multiprocessing.Pipe() at the other end", lambda: _round_trip("multiprocessing", True)),
    ("multiprocessing.Pipe(duplex=False) at the other end", lambda: _round_trip("multiprocessing", False)),
]


def run_selfcheck(out: TextIO | None = None) -> int:
    """Run every check, print the results; return the number of failures."""
    out = out or sys.stdout
    out.write(
        "bigipc %s, %s core, Python %s on %s\n"
        % (bigipc.__version__, bigipc.IMPLEMENTATION, sys.version.split()[0], sys.platform)
    )
    core_module = sys.modules.get("bigipc._core") or sys.modules.get("bigipc._purecore")
    if core_module is not None:
        out.write("core module: %s\n" % getattr(core_module, "__file__", "?"))
    out.flush()
    failures = 0
    for name, check in CHECKS:
        started = time.monotonic()
        try:
            detail = _check_implementation(out) if check is None else check()
        except Exception as exc:
            failures += 1
            if isinstance(exc, CheckFailed):
                reason = str(exc)
            else:
                reason = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            out.write("FAIL  %s: %s\n" % (name, reason))
        else:
            out.write("PASS  %s (%.2f s): %s\n" % (name, time.monotonic() - started, detail))
        out.flush()
    out.write("selfcheck: %d of %d checks passed\n" % (len(CHECKS) - failures, len(CHECKS)))
    out.flush()
    return failures
