"""Exceptions of bigipc, defined once and shared by both cores and the API.

Each one subclasses the builtin that existing code already catches, so an
``except OSError`` or ``except EOFError`` written for ``multiprocessing``
keeps working.
"""

from __future__ import annotations

from multiprocessing import BufferTooShort

__all__ = [
    "BufferTooShort",
    "FrameError",
    "MessageTooLong",
    "MultipartMessageError",
    "TruncatedMessageError",
]


class FrameError(OSError):
    """The byte stream does not hold a valid frame here.

    Raised for a header the protocol does not allow (a negative length
    other than the escape value), a length above the connection's
    ``max_message_size``, or a message cut short by end of file. The stream
    cannot be resynchronised after it, so the connection's receive side is
    marked broken: every later receive raises the same error again.
    """


class TruncatedMessageError(FrameError):
    """End of file arrived in the middle of a frame (the writer died or closed
    its end while sending)."""


class MessageTooLong(OSError):
    """The next message is longer than the ``maxlength`` the caller gave.

    Nothing is lost: the message stays pending, and a receive with a large
    enough ``maxlength`` (or none) returns it. ``length`` is its size.
    """

    def __init__(self, length: int, maxlength: int) -> None:
        super().__init__("bad message length: %d bytes, maxlength %d" % (length, maxlength))
        self.length = length
        self.maxlength = maxlength

    def __reduce__(self) -> tuple[type[MessageTooLong], tuple[int, int]]:  # pragma: no cover - trivial
        return (type(self), (self.length, self.maxlength))


class MultipartMessageError(OSError):
    """The next message is a multipart message (an object sent with its
    buffers out of band), and the call can only take a plain one.

    Nothing is lost: the message stays pending for ``recv()`` (on a
    Connection) or ``recv_message()`` (on the core).
    """
