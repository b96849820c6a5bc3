"""The core interface: one framed byte stream on one file descriptor.

Two implementations satisfy it: the compiled ``bigipc._core`` (src/_core.pyx)
and the pure-Python ``bigipc._purecore``. ``bigipc._backend`` picks one.
The core knows frames, buffers, deadlines and errno; it knows nothing of
pickle, of locks between processes, or of multiprocessing.

Wire format (docs/protocol.md): a 4-byte big-endian signed length, then the
payload. A length of -1 means an 8-byte big-endian unsigned length follows;
it is used for payloads of 2**31 bytes and more. These "plain" messages are
exactly multiprocessing's. A length of -2 starts a multipart message
(bigipc's own): a 4-byte big-endian part count k (1..MAX_PARTS), k 8-byte
big-endian part lengths (top bit: the part was sent from read-only memory),
then the parts back to back. Any other negative value is a framing error.

Timeouts: ``timeout=None`` blocks, a number is seconds for the whole call
(one absolute monotonic deadline, however many syscalls and signals it
takes), and ``0`` or a negative number never blocks. On expiry the call
raises ``TimeoutError`` and the stream stays in sync:

* a receive that got part of a message keeps it; the next receive (of any
  kind) completes that same message;
* a send that wrote part of a message keeps the unsent rest (copied, unless
  the payload is an immutable ``bytes``, so the caller may reuse its
  buffer) and writes it before anything sent later; ``flush()`` finishes it
  with a deadline of its own. A send that wrote nothing sends nothing.

The same holds when a Python signal handler raises (``KeyboardInterrupt``)
in the middle of a call. A handler that returns lets the call go on.
"""

import socket
from typing import Any

from typing_extensions import TypeAlias

# Every timeout is keyword-only, so that the positional parameters stay
# exactly those of multiprocessing.connection.Connection.

# Any object that exports a C-contiguous buffer (bytes, bytearray,
# memoryview, array.array, mmap, numpy arrays, ...).
ReadableBuffer: TypeAlias = Any
WritableBuffer: TypeAlias = Any

# The 4-byte header value announcing an 8-byte length.
LONG_HEADER: int
# The 4-byte header value that starts a multipart message.
MULTIPART_HEADER: int
# Largest payload that still gets the 4-byte header (2**31 - 1).
MAX_SHORT_LENGTH: int
# Most parts a multipart message may have.
MAX_PARTS: int
# True when send_bytes may hand large bytes objects to a pipe by page
# reference (vmsplice; Linux, compiled core, BIGIPC_VMSPLICE not "0").
VMSPLICE: bool

class Channel:
    """One end of a framed byte stream; owns its file descriptor.

    Non-socket descriptors (pipes, FIFOs, ttys) are put in non-blocking mode
    (``O_NONBLOCK``, which is shared with every duplicate of the descriptor);
    ``detach()`` restores the flags. Sockets keep their flags: the core uses
    ``MSG_DONTWAIT`` per call instead, so code that does its own blocking I/O
    on ``fileno()`` (``multiprocessing.reduction.recv_handle``) still works.

    Thread-safe: one lock per direction. Sends from several threads never
    interleave frames; receives from several threads each get whole
    messages. Waiting for the lock counts against the call's deadline.
    """

    def __init__(
        self,
        fd: int,
        readable: bool = True,
        writable: bool = True,
        *,
        max_message_size: int | None = None,
    ) -> None:
        """Take ownership of ``fd``.

        ``ValueError`` for a negative fd or when neither direction is
        enabled; ``OSError`` (EBADF) for a descriptor that is not open.
        ``max_message_size`` (``None``: no limit) caps the length a received
        header may announce.
        """
    @property
    def closed(self) -> bool: ...
    @property
    def readable(self) -> bool: ...
    @property
    def writable(self) -> bool: ...
    @property
    def is_socket(self) -> bool: ...
    @property
    def max_message_size(self) -> int | None: ...
    @max_message_size.setter
    def max_message_size(self, value: int | None) -> None: ...
    @property
    def send_pending(self) -> int:
        """Bytes (header included) of a timed-out send still to be written."""
    @property
    def spliced_bytes(self) -> int:
        """Payload bytes this end has sent into its pipe by page reference
        (vmsplice) instead of by copy; 0 where that is not used."""
    @property
    def recv_in_progress(self) -> bool:
        """True while a partly received message is held for the next receive."""
    def fileno(self) -> int:
        """The descriptor; ``OSError("handle is closed")`` once closed."""
    def close(self) -> None:
        """Close the descriptor. Idempotent. Unsent rest of a timed-out send is
        dropped (the peer then sees a truncated message)."""
    def detach(self) -> int:
        """Give up ownership without closing: restore the descriptor's flags
        and return it. The channel is closed afterwards."""
    def send_bytes(
        self,
        data: ReadableBuffer,
        offset: int = 0,
        size: int | None = None,
        *,
        timeout: float | None = None,
    ) -> None:
        """Send ``data[offset:offset+size]`` (in bytes) as one message.

        Header and payload go out together (``writev``/``sendmsg``) from the
        caller's memory. ``ValueError`` for a bad offset or size, exactly as
        ``multiprocessing`` words it. ``BrokenPipeError`` when the reader is
        gone.
        """
    def send_parts(self, parts: Any, *, timeout: float | None = None) -> None:
        """Send the concatenation of the buffers in the sequence ``parts`` as
        one message, without joining them in memory."""
    def send_multipart(self, parts: Any, *, timeout: float | None = None) -> None:
        """Send the buffers of ``parts`` (1 to MAX_PARTS of them) as one
        multipart message, written from their own memory with one gather
        write; ``recv_message`` returns them as separate objects."""
    def send_many(self, messages: Any, *, timeout: float | None = None) -> None:
        """Send each buffer of ``messages`` as its own plain message, written
        together with as few system calls as possible. Interrupted once some
        bytes are out, the unsent rest of the whole batch is pending as one
        unit (``send_pending``, ``flush()``)."""
    def flush(self, *, timeout: float | None = None) -> None:
        """Write the rest of a send that timed out. No-op when none."""
    def recv_bytes(self, maxlength: int | None = None, *, timeout: float | None = None) -> bytes:
        """Receive one plain message as ``bytes``, read straight into the result.

        ``MultipartMessageError`` when the next message is multipart (it
        stays pending); ``ValueError`` for a negative ``maxlength``; ``MessageTooLong`` when
        the message is longer (it stays pending); ``EOFError`` at end of
        stream on a frame boundary; ``TruncatedMessageError`` and
        ``FrameError`` for a broken stream.
        """
    def recv_message(self, maxlength: int | None = None, *, timeout: float | None = None) -> Any:
        """Receive one message of either kind: ``bytes`` for a plain message;
        for a multipart one a list of its parts, each read straight into its
        own new object (``bytes`` for parts sent from read-only memory,
        ``bytearray`` otherwise). ``maxlength`` bounds the total size."""
    def recv_many(self, max_bytes: int = 65536, *, timeout: float | None = None) -> list[Any]:
        """Receive every message completed within the next ``max_bytes`` bytes
        of the stream: at least one, waiting up to ``timeout`` for it. Items
        are as ``recv_message`` returns them. Reads ahead only within the
        batch: a message cut by its end stays held like an interrupted
        receive, and no complete message is ever held back, so ``poll()``,
        ``wait()`` and selectors stay truthful. ``ValueError`` below 16;
        values above 1 MiB read 1 MiB. Messages completed before a framing
        error are returned; the next receive raises the error."""
    def recv_begin(self, maxlength: int | None = None, *, timeout: float | None = None) -> int:
        """Start streaming the next plain message; return how many of its
        bytes are still to be taken (all of them unless an earlier stream of
        it was interrupted). Until they are all taken with
        ``recv_chunk_into``, other receives raise ``ValueError``."""
    def recv_chunk_into(self, buffer: WritableBuffer, *, timeout: float | None = None) -> int:
        """Copy the next bytes (at least one, at most ``len(buffer)``) of the
        message being streamed into ``buffer``; return the count. After the
        last byte the message is done. ``ValueError`` when no message is
        being streamed."""
    def recv_bytes_into(
        self, buffer: WritableBuffer, offset: int = 0, *, timeout: float | None = None
    ) -> int:
        """Receive one message into ``buffer`` at byte ``offset``; return its
        length. When it does not fit, the whole message is consumed and
        ``multiprocessing.BufferTooShort(message_bytes)`` is raised, as the
        stdlib does. ``ValueError`` for a negative or too large offset."""
    def poll(self, timeout: float | None = 0.0) -> bool:
        """True when a receive can make progress now: data or end of file on
        the descriptor (or a broken stream whose error the receive reports).
        Never reads."""

class QueueEnds:
    """The per-item fast paths of ``bigipc.Queue``: the two ends of its
    datagram socket pair and its shared counters (bigipc/queues.py owns all
    three; this only uses them). ``header`` is the 8-byte inline record
    header; ``puts``, ``gets`` and ``pending`` are the offsets of those
    counters within a process's slot (int64 units). Every counter update
    made through one QueueEnds (``add``, and the counting in ``send_inline``
    and ``recv``) is atomic with respect to the others, in all threads. ``ValueError`` for a
    header of another size or counters that are not writable int64."""

    def __init__(
        self,
        recv_sock: socket.socket,
        send_sock: socket.socket,
        counters: WritableBuffer,
        header: bytes,
        puts: int,
        gets: int,
        pending: int,
    ) -> None: ...
    def add(self, index: int, delta: int) -> int:
        """Add ``delta`` to the counter at ``index`` (int64 units); return
        the new value. ``ValueError`` for an index out of range."""
    def send_inline(self, slot_at: int, data: ReadableBuffer) -> bool:
        """Send ``header + data`` as one datagram if the socket takes it now,
        without blocking: True when sent (counted as put; pending while in
        flight), False when the socket has no room (nothing counted).
        ``slot_at`` is the start of the caller's slot. Other errors raise
        ``OSError``. The caller keeps its own threads from interleaving
        sends with its other bookkeeping."""
    def recv(self, buffer: WritableBuffer, slot_at: int, wait: bool) -> int | tuple[int, list[int], int]:
        """Receive one datagram into ``buffer``, waiting for it if ``wait``
        (with the GIL released). An inline record (the header, no
        descriptors, not truncated) is counted as a get in the slot at
        ``slot_at`` and its length returned. -1: nothing there and ``wait``
        is false. Any other datagram is returned, uncounted, as
        ``(length, descriptors, flags)``; the
        descriptors it carried (close-on-exec where the system allows) now
        belong to the caller. A signal handler that raises interrupts a wait
        with nothing received."""
