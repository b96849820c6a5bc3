"""Measuring code shared by ``python -m bigipc bench`` and benchmarks/.

A measurement moves a fixed number of messages of one *case* (what is sent)
through one *transport* (how it travels) from a producer process to a
consumer process and times it: from the producer's first send to the
consumer's last receive, both read on the system-wide monotonic clock.
Every message received is checked against what was sent.

Both registries are open: ``register_transport`` and ``register_case`` add
entries (bigipc's queues are registered like any other), and the runner,
the command line and the pytest-benchmark suite pick them up.

Everything a child process needs travels as arguments (transports and cases
are plain picklable objects, channel ends pickle the way ``multiprocessing``
hands them over), so the code works under the fork, spawn and forkserver
start methods alike.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import itertools
import json
import os
import pickle
import platform
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from multiprocessing import connection as _mp_connection
from multiprocessing import reduction as _reduction
from typing import Any, Callable, Protocol, TextIO, TypeVar

__all__ = [
    "CASES",
    "TRANSPORTS",
    "BenchError",
    "Case",
    "Measurement",
    "Progress",
    "Session",
    "Transport",
    "VerificationError",
    "default_start_method",
    "register_case",
    "register_transport",
    "run_bench",
    "summarize",
]

MiB = 1 << 20

# time.monotonic() reads CLOCK_MONOTONIC on Linux and mach_absolute_time on
# macOS: one clock for the whole machine, so a time taken in the producer
# and one taken in the consumer can be subtracted.
_now = time.monotonic


class BenchError(Exception):
    """A measurement could not be made (a child crashed, hung or failed)."""


class VerificationError(BenchError):
    """A message arrived different from the one sent."""


def default_start_method() -> str:
    """fork on Linux (cheap, and what the figures in the docs use); spawn
    elsewhere (macOS: fork is unsafe with system frameworks loaded)."""
    return "fork" if sys.platform.startswith("linux") else "spawn"


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux and the BSDs report KiB, macOS reports bytes.
    return peak if sys.platform == "darwin" else peak * 1024


def _module_missing(name: str) -> str | None:
    try:
        __import__(name)
    except ImportError as exc:
        return "%s is not installed (%s)" % (name, exc)
    return None


# ---------------------------------------------------------------------------
# Cases: what is sent, and how each message is checked on arrival.
#
# A producer cycles through a pool of distinct messages ("slots") built
# before the clock starts, so nothing is generated or copied while it runs.
# The consumer identifies each message's slot from its first bytes and
# expects the slots in order, so swapped, lost or repeated messages show as
# a slot out of sequence. Producer p of n uses its own slots, so several
# producers interleaving on one queue are checked per producer.
#
# Content: small messages (and dicts) are compared whole. Large ones, by
# default, are checked by length, first and last bytes, one 4 KiB window,
# and a strided sample of 4096 bytes spread over the whole message, its
# offset moving from message to message: truncation, shifted, repeated or
# lost chunks, and any damaged region longer than size/4096 bytes are
# caught, at a cost of microseconds per message; a lone flipped byte
# usually is not. The "full" check compares every byte (memcmp speed, which
# lowers the figures of the fastest transports; for hunting bugs, not for
# measuring).

# Pool memory a producer may spend per case (at least two slots are made).
_POOL_BUDGET = 64 * MiB
# Messages up to this size are compared whole; larger ones are sampled.
_FULL_CHECK_MAX = 4096
# Large payloads repeat a random block of this many bytes. A prime, so a
# payload shifted by any power-of-two amount (a lost or repeated pipe-full)
# no longer matches the pattern.
_BLOCK = 4093
# Bytes (or array elements) in the strided sample of each large message.
_STRIDED_SAMPLES = 4096


def _sample_stride(length: int) -> int:
    """Stride of the strided sample: about _STRIDED_SAMPLES positions, and
    never a multiple of _BLOCK, so the sample walks through every phase of
    the repeated block."""
    stride = max(1, length // _STRIDED_SAMPLES)
    return stride + 1 if stride % _BLOCK == 0 else stride


class Case:
    """What is sent in one measurement. Subclasses fill in the pool and the check.

    ``kind`` is ``"bytes"`` (moved with ``send_bytes``/``recv_bytes`` where
    a transport has them) or ``"object"`` (``send``/``recv``, pickled).
    ``size`` is the payload bytes one message counts for in MB/s.
    ``messages`` and ``quick_messages`` are how many messages one
    measurement moves in a full and a quick run; ``producers`` how many
    processes send them (transports that cannot take several writers skip
    such cases).
    """

    kind = "bytes"
    requires: tuple[str, ...] = ()

    def __init__(
        self,
        name: str,
        label: str,
        size: int,
        messages: int,
        quick_messages: int,
        max_slots: int = 64,
        producers: int = 1,
    ) -> None:
        self.name = name
        self.label = label
        self.size = size
        self.messages = messages
        self.quick_messages = quick_messages
        self.producers = producers
        self.slots = max(2, min(max_slots, _POOL_BUDGET // max(size, 1)))

    def __repr__(self) -> str:
        return "<Case %s>" % self.name

    def unavailable(self) -> str | None:
        """Why this case cannot run here, or None."""
        for module in self.requires:
            reason = _module_missing(module)
            if reason:
                return reason
        return None

    def message_count(self, quick: bool) -> int:
        count = self.quick_messages if quick else self.messages
        # Every producer sends the same number.
        return max(self.producers, count - count % self.producers)

    def build_message(self, producer: int, slot: int) -> Any:
        """Message number ``slot`` of the ones producer ``producer`` cycles through."""
        raise NotImplementedError

    def checker(self, full: bool = False) -> Checker:
        """A fresh ``Checker`` for the consumer; ``full`` compares every byte."""
        raise NotImplementedError


class Checker:
    """Consumer side: identifies each message's slot and checks it in order."""

    def __init__(self, case: Case, full: bool = False) -> None:
        self.case = case
        self.full = full
        self.received = 0
        self._next = [0] * case.producers
        self._expected: dict[int, Any] = {}

    def _expected_message(self, slot_id: int) -> Any:
        """The whole message of ``slot_id``, made once (for full checks)."""
        message = self._expected.get(slot_id)
        if message is None:
            producer, slot = divmod(slot_id, self.case.slots)
            message = self._expected[slot_id] = self.case.build_message(producer, slot)
        return message

    def _in_sequence(self, slot_id: int) -> str | None:
        """Check that ``slot_id`` is what its producer was due to send next."""
        producer, slot = divmod(slot_id, self.case.slots)
        due = self._next[producer]
        self._next[producer] = due + 1
        if slot != due % self.case.slots:
            return "out of order: producer %d's message #%d arrived where #%d was due (mod %d)" % (
                producer,
                slot,
                due % self.case.slots,
                self.case.slots,
            )
        return None

    def check(self, message: Any) -> str | None:
        """None when ``message`` is the one due, else what is wrong with it."""
        raise NotImplementedError

    def due_in_order(self) -> Iterator[Any] | None:
        """The messages due from now on, in order, where each is checked by
        comparing it whole with its entry; None where ``check()`` must look
        at each message. After using it, ``advance()`` by the messages it
        accepted."""
        return None

    def advance(self, count: int) -> None:
        """Account for ``count`` messages accepted through ``due_in_order()``."""
        self.received += count
        self._next[0] += count


class BytesCase(Case):
    """Byte strings of one size, sent with ``send_bytes`` (or ``put``)."""

    def __init__(
        self, name: str, label: str, size: int, messages: int, quick_messages: int, **kwargs: Any
    ) -> None:
        if size < 16:
            raise ValueError("byte messages of at least 16 bytes are needed to tell them apart")
        kwargs.setdefault("max_slots", 1024 if size <= _FULL_CHECK_MAX else 64)
        super().__init__(name, label, size, messages, quick_messages, **kwargs)

    def _seed(self, producer: int, slot: int) -> bytes:
        # Deterministic, so the consumer can replay it: the whole message
        # when it is small, else the block the message repeats.
        rng = random.Random("%s/%d/%d" % (self.name, producer, slot))
        return rng.randbytes(_BLOCK if self.size > _FULL_CHECK_MAX else self.size)

    def build_message(self, producer: int, slot: int) -> bytes:
        seed = self._seed(producer, slot)
        if self.size <= _FULL_CHECK_MAX:
            return seed
        # One allocation of the exact size (``seed * n`` then a slice would
        # make and copy a second large object).
        whole, rest = divmod(self.size, _BLOCK)
        return b"".join([seed] * whole + [seed[:rest]])

    def checker(self, full: bool = False) -> Checker:
        return _BytesChecker(self, full)


class _BytesChecker(Checker):
    def __init__(self, case: BytesCase, full: bool = False) -> None:
        super().__init__(case, full)
        self._slot_of_head: dict[bytes, int] = {}
        self._blocks: list[bytes] = []
        self._tails: list[bytes] = []
        self._strided: list[bytes] = []
        size = case.size
        self._stride = stride = _sample_stride(size)
        # The sample at offset o is message[o::stride], whose k-th byte is
        # block[(o + k*stride) % _BLOCK]. With t[k] = block[(k*stride) %
        # _BLOCK] that is t[j + k] for j = o / stride (mod _BLOCK), so one
        # slice of t (repeated to cover j + the sample's length) is the
        # expected sample.
        self._inverse_stride = pow(stride, -1, _BLOCK) if size > _FULL_CHECK_MAX else 0
        self._sample_length = -(-size // stride)
        repeats = -(-(_BLOCK + self._sample_length) // _BLOCK)
        for producer in range(case.producers):
            for seed in (case._seed(producer, slot) for slot in range(case.slots)):
                if size <= _FULL_CHECK_MAX:
                    head, tail = seed[:16], seed
                else:
                    head = seed[:16]
                    tail = bytes(seed[(size - 16 + i) % _BLOCK] for i in range(16))
                if head in self._slot_of_head:  # 2**-128: never, but cheap to rule out
                    raise RuntimeError("two slots of case %s share a head" % case.name)
                self._slot_of_head[head] = len(self._blocks)
                if size <= _FULL_CHECK_MAX:
                    self._blocks.append(seed)
                else:
                    # Doubled, so any window of _BLOCK bytes is one slice of it.
                    self._blocks.append(seed + seed)
                    walk = bytes(seed[(k * stride) % _BLOCK] for k in range(_BLOCK))
                    self._strided.append(walk * repeats)
                self._tails.append(tail)

    def due_in_order(self) -> Iterator[bytes] | None:
        if self.case.size > _FULL_CHECK_MAX or len(self._next) != 1:
            return None
        start = self._next[0] % self.case.slots
        return itertools.cycle(self._blocks[start:] + self._blocks[:start])

    def check(self, message: Any) -> str | None:
        self.received += 1
        size = self.case.size
        if size <= _FULL_CHECK_MAX and len(self._next) == 1:
            # Fast path for small messages from one producer: the message
            # due is known, one comparison settles it.
            due = self._next[0]
            if message == self._blocks[due % self.case.slots]:
                self._next[0] = due + 1
                return None
        if len(message) != size:
            return "length %d, expected %d (truncated or merged)" % (len(message), size)
        slot_id = self._slot_of_head.get(bytes(message[:16]))
        if slot_id is None:
            return "first 16 bytes match no message that was sent (corrupt)"
        problem = self._in_sequence(slot_id)
        if problem:
            return problem
        if size <= _FULL_CHECK_MAX:
            if message != self._blocks[slot_id]:
                return "content differs from what was sent"
            return None
        if self.full:
            if message != self._expected_message(slot_id):
                return "content differs from what was sent"
            return None
        if message[-16:] != self._tails[slot_id]:
            return "last 16 bytes differ from what was sent"
        block = self._blocks[slot_id]
        # Positions vary from message to message, so a long run covers
        # the whole payload.
        start = (self.received * 2654435761) % (size - _BLOCK)
        phase = start % _BLOCK
        if message[start : start + _BLOCK] != block[phase : phase + _BLOCK]:
            return "bytes %d to %d differ from what was sent" % (start, start + _BLOCK)
        offset = (self.received * 40503) % self._stride
        sample = message[offset :: self._stride]
        if isinstance(sample, memoryview):
            sample = sample.tobytes()
        first = (offset % _BLOCK) * self._inverse_stride % _BLOCK
        if sample != self._strided[slot_id][first : first + len(sample)]:
            return "the bytes at %d + k*%d differ from what was sent" % (offset, self._stride)
        return None


class NumpyCase(Case):
    """A float64 numpy array sent as an object (``send``/``recv``)."""

    kind = "object"
    requires = ("numpy",)

    def __init__(
        self, name: str, label: str, size: int, messages: int, quick_messages: int, **kwargs: Any
    ) -> None:
        super().__init__(name, label, size, messages, quick_messages, **kwargs)
        self.length = size // 8
        if self.length > 1 << 21:
            raise ValueError("arrays up to 2**21 elements keep the tags exact")

    def _tag(self, slot_id: int) -> float:
        # a[j] = tag + j is exact in float64 while tag + j < 2**53; tags are
        # multiples of 2**21 so a[0] names the slot and a[j] - a[0] == j.
        return float((slot_id + 1) << 21)

    def build_message(self, producer: int, slot: int) -> Any:
        import numpy

        return numpy.arange(self.length, dtype=numpy.float64) + self._tag(producer * self.slots + slot)

    def checker(self, full: bool = False) -> Checker:
        return _NumpyChecker(self, full)


class _NumpyChecker(Checker):
    case: NumpyCase

    # Elements compared as one window per array (besides single elements).
    _WINDOW = 512

    def __init__(self, case: NumpyCase, full: bool = False) -> None:
        super().__init__(case, full)
        import numpy

        self._numpy = numpy
        self._ndarray = numpy.ndarray
        self._float64 = numpy.dtype(numpy.float64)
        total = case.producers * case.slots
        self._slot_of_tag = {case._tag(slot_id): slot_id for slot_id in range(total)}

    def check(self, message: Any) -> str | None:
        self.received += 1
        length = self.case.length
        if not isinstance(message, self._ndarray):
            return "got %s, expected a numpy array" % type(message).__name__
        if message.dtype != self._float64 or message.shape != (length,):
            return "got %s%s, expected float64(%d,)" % (message.dtype, message.shape, length)
        tag = float(message[0])
        slot_id = self._slot_of_tag.get(tag)
        if slot_id is None:
            return "element 0 is %r: matches no array that was sent" % tag
        problem = self._in_sequence(slot_id)
        if problem:
            return problem
        numpy = self._numpy
        if self.full:
            if not numpy.array_equal(message, self._expected_message(slot_id)):
                return "content differs from what was sent"
            return None
        start = (self.received * 2654435761) % (length - self._WINDOW)
        window = numpy.arange(start, start + self._WINDOW, dtype=numpy.float64) + tag
        if not numpy.array_equal(message[start : start + self._WINDOW], window):
            return "elements %d to %d differ from what was sent" % (start, start + self._WINDOW)
        if message[length - 1] != tag + length - 1:
            return "the last element differs from what was sent"
        stride = _sample_stride(length)
        offset = (self.received * 40503) % stride
        expected = numpy.arange(offset, length, stride, dtype=numpy.float64) + tag
        if not numpy.array_equal(message[offset::stride], expected):
            return "the elements at %d + k*%d differ from what was sent" % (offset, stride)
        return None


class DictCase(Case):
    """A dict of small values (ints, floats, short strings) sent as an object."""

    kind = "object"

    def __init__(
        self, name: str, label: str, entries: int, messages: int, quick_messages: int, **kwargs: Any
    ) -> None:
        self.entries = entries
        kwargs.setdefault("max_slots", 64)
        super().__init__(name, label, 1, messages, quick_messages, **kwargs)
        # MB/s counts the pickled size (protocol 5, as bigipc sends it).
        self.size = len(pickle.dumps(self._make(0), protocol=5))

    def _make(self, slot_id: int) -> dict[str, Any]:
        value: dict[str, Any] = {"id": slot_id}
        for j in range(1, self.entries):
            if j % 3 == 0:
                value["key%03d" % j] = j * 1000 + slot_id
            elif j % 3 == 1:
                value["key%03d" % j] = j + slot_id / 8.0
            else:
                value["key%03d" % j] = "value-%d-%d" % (j, slot_id)
        return value

    def build_message(self, producer: int, slot: int) -> dict[str, Any]:
        return self._make(producer * self.slots + slot)

    def checker(self, full: bool = False) -> Checker:
        # Always compared whole: a dict is small.
        return _DictChecker(self, full)


class _DictChecker(Checker):
    def __init__(self, case: DictCase, full: bool = False) -> None:
        super().__init__(case, full)
        self._dicts = [case._make(slot_id) for slot_id in range(case.producers * case.slots)]

    def check(self, message: Any) -> str | None:
        self.received += 1
        if not isinstance(message, dict):
            return "got %s, expected a dict" % type(message).__name__
        slot_id = message.get("id")
        if not isinstance(slot_id, int) or not 0 <= slot_id < len(self._dicts):
            return "its 'id' is %r: matches no dict that was sent" % (slot_id,)
        problem = self._in_sequence(slot_id)
        if problem:
            return problem
        if message != self._dicts[slot_id]:
            return "content differs from what was sent"
        return None


CASES: dict[str, Case] = {}


def register_case(case: Case) -> Case:
    """Add ``case`` to the registry (by ``case.name``); returns it."""
    CASES[case.name] = case
    return case


# Message counts: a full run moves about 1 GB per measurement for the large
# sizes (long enough that process start-up and scheduling noise stay small)
# and takes 5-8 minutes on 2 cores; a quick run moves a tenth or less and
# takes under a minute, most of it in the 256 MiB case.
register_case(BytesCase("bytes-100B", "bytes, 100 B", 100, 200_000, 20_000))
register_case(BytesCase("bytes-1MiB", "bytes, 1 MiB", MiB, 768, 64))
register_case(BytesCase("bytes-16MiB", "bytes, 16 MiB", 16 * MiB, 48, 4))
register_case(BytesCase("bytes-256MiB", "bytes, 256 MiB", 256 * MiB, 4, 1))
register_case(NumpyCase("numpy-8MiB", "numpy float64, 8 MiB, send/recv", 8 * MiB, 96, 6))
register_case(DictCase("dict-100", "dict of 100 small values, send/recv", 100, 30_000, 2_000))
# Four producers on one queue (only transports that take several writers).
register_case(BytesCase("bytes-100B-4p", "bytes, 100 B, 4 producers", 100, 200_000, 20_000, producers=4))
register_case(BytesCase("bytes-1MiB-4p", "bytes, 1 MiB, 4 producers", MiB, 768, 64, producers=4))


# ---------------------------------------------------------------------------
# Transports: how messages travel. A transport is a recipe, made in the
# parent and pickled into the children; ``open`` makes one link (the
# producer's and the consumer's end), the children turn their end into a
# sender or a receiver.


class _FdEnd:
    """A bare file descriptor that can travel to a child process.

    Under fork the child simply inherits it; under spawn and forkserver
    ``DupFd`` passes a duplicate the way multiprocessing passes its own
    connections.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Callable[[Any], _FdEnd], tuple[Any]]:
        return _rebuild_fd_end, (_reduction.DupFd(self.fd),)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _rebuild_fd_end(dup: Any) -> _FdEnd:
    return _FdEnd(dup.detach())


class Link:
    """One producer-consumer channel made by ``Transport.open``.

    ``producer_end`` and ``consumer_end`` go to the child processes;
    ``release()`` drops the parent's copies once the children have them,
    ``cleanup()`` removes anything left (temporary files) at the end.
    """

    def __init__(
        self,
        producer_end: Any,
        consumer_end: Any,
        release: Callable[[], None] | None = None,
        cleanup: Callable[[], None] | None = None,
    ) -> None:
        self.producer_end = producer_end
        self.consumer_end = consumer_end
        self._release = release
        self._cleanup = cleanup

    def release(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release()

    def cleanup(self) -> None:
        self.release()
        if self._cleanup is not None:
            cleanup, self._cleanup = self._cleanup, None
            cleanup()


def _one_at_a_time(fetch: Callable[[], list[Any]]) -> Callable[[], Any]:
    """One message per call, from a function that returns a batch of them.

    A C-level iterator (the ``__next__`` of a chain over the batches), so a
    message costs the consumer no Python-level call, just as the one-by-one
    transports hand it their bound methods; each message is still checked
    on its own."""
    return itertools.chain.from_iterable(iter(fetch, None)).__next__


class Endpoint:
    """A child's side of a link: ``send(message)`` or ``recv()``, and ``close()``.

    ``flush()`` runs after the last send of every run, inside the timed
    part: a sender that batches messages writes out what it holds there.
    """

    # The callables themselves, not wrapped: they run once per message.
    send: Callable[[Any], object]
    recv: Callable[[], Any]
    # A floor that moves a whole run in one call instead: send_run(pool,
    # start, count) sends pool[(start + i) % len(pool)] for i < count;
    # recv_run(count) receives count messages and returns the last.
    send_run: Callable[[list[Any], int, int], object] | None = None
    recv_run: Callable[[int], Any] | None = None

    def __init__(
        self,
        send: Callable[[Any], object] | None = None,
        recv: Callable[[], Any] | None = None,
        close: Callable[[], object] | None = None,
        flush: Callable[[], object] | None = None,
        send_run: Callable[[list[Any], int, int], object] | None = None,
        recv_run: Callable[[int], Any] | None = None,
    ) -> None:
        if send is not None:
            self.send = send
        if recv is not None:
            self.recv = recv
        self.send_run = send_run
        self.recv_run = recv_run
        self._flush = flush
        self._close = close

    def flush(self) -> None:
        if self._flush is not None:
            self._flush()

    def close(self) -> None:
        if self._close is not None:
            self._close()


class Transport:
    """How messages travel from producer to consumer.

    ``name`` is the short id used on the command line, ``label`` what the
    table shows. ``compare_to`` names the transports this one's median is
    divided by in the summary (the ratios the README quotes).
    """

    name = ""
    label = ""
    short = ""  # for the ratio column; the label when empty
    family = ""  # "bigipc", "stdlib", "third-party" or "floor"
    multi_producer = False
    compare_to: tuple[str, ...] = ()
    module: str | None = None

    def __repr__(self) -> str:
        return "<Transport %s>" % self.name

    def unavailable(self) -> str | None:
        """Why this transport cannot run here, or None."""
        if self.module:
            reason = _module_missing(self.module)
            if reason:
                return reason
        return None

    def supports(self, case: Case) -> bool:
        return case.producers == 1 or self.multi_producer

    def open(self, case: Case, context: Any) -> Link:
        """Make a link in the parent (``context``: the multiprocessing context)."""
        raise NotImplementedError

    def sender(self, end: Any, case: Case) -> Endpoint:
        raise NotImplementedError

    def receiver(self, end: Any, case: Case) -> Endpoint:
        raise NotImplementedError


class _PipeTransport(Transport):
    """``Pipe()`` of bigipc or multiprocessing; the same code drives both."""

    def __init__(
        self,
        name: str,
        label: str,
        family: str,
        duplex: bool,
        compare_to: tuple[str, ...] = (),
        short: str = "",
    ) -> None:
        self.name = name
        self.label = label
        self.short = short
        self.family = family
        self.duplex = duplex
        self.compare_to = compare_to

    def _pipe_factory(self) -> Callable[[bool], tuple[Any, Any]]:
        if self.family == "bigipc":
            import bigipc

            return bigipc.Pipe
        import multiprocessing

        return multiprocessing.Pipe

    def open(self, case: Case, context: Any) -> Link:
        first, second = self._pipe_factory()(self.duplex)
        if self.duplex:
            producer, consumer = first, second
        else:
            consumer, producer = first, second  # Pipe(False) is (reader, writer)

        def release() -> None:
            producer.close()
            consumer.close()

        return Link(producer, consumer, release)

    def sender(self, end: Any, case: Case) -> Endpoint:
        send = end.send_bytes if case.kind == "bytes" else end.send
        return Endpoint(send=send, close=end.close)

    def receiver(self, end: Any, case: Case) -> Endpoint:
        recv = end.recv_bytes if case.kind == "bytes" else end.recv
        return Endpoint(recv=recv, close=end.close)


class _BigipcBatchTransport(_PipeTransport):
    """bigipc's batch API: ``send_many`` of a few hundred messages per call,
    ``recv_many`` of everything complete in the next 256 KiB."""

    _BATCH_MESSAGES = 256
    _BATCH_BYTES = 256 * 1024

    def __init__(self) -> None:
        super().__init__(
            "bigipc-batch",
            "bigipc send_many/recv_many",
            "bigipc",
            False,
            ("mp-simplex", "raw-pipe"),
        )

    def unavailable(self) -> str | None:
        import bigipc

        if not hasattr(bigipc.Connection, "send_many"):
            return "this bigipc has no batch API (send_many/recv_many)"
        return None

    def supports(self, case: Case) -> bool:
        return case.kind == "bytes" and case.size <= 64 * 1024 and case.producers == 1

    def sender(self, end: Any, case: Case) -> Endpoint:
        batch = []
        limit = max(1, min(self._BATCH_MESSAGES, self._BATCH_BYTES // case.size))
        send_many = end.send_many

        def send(message: Any) -> None:
            batch.append(message)
            if len(batch) >= limit:
                send_many(batch)
                batch.clear()

        def flush() -> None:
            if batch:
                send_many(batch)
                batch.clear()

        return Endpoint(send=send, flush=flush, close=end.close)

    def receiver(self, end: Any, case: Case) -> Endpoint:
        return Endpoint(
            recv=_one_at_a_time(functools.partial(end.recv_many, self._BATCH_BYTES)), close=end.close
        )


class _MpQueueTransport(Transport):
    family = "stdlib"
    multi_producer = True

    def __init__(self, name: str, label: str, simple: bool) -> None:
        self.name = name
        self.label = label
        self.simple = simple

    def open(self, case: Case, context: Any) -> Link:
        queue = context.SimpleQueue() if self.simple else context.Queue()
        return Link(queue, queue)

    def sender(self, end: Any, case: Case) -> Endpoint:
        if self.simple:
            return Endpoint(send=end.put, close=end.close)

        def close() -> None:
            # Returns once the feeder thread has written everything.
            end.close()
            end.join_thread()

        return Endpoint(send=end.put, close=close)

    def receiver(self, end: Any, case: Case) -> Endpoint:
        return Endpoint(recv=end.get, close=end.close)


class _BigipcQueueTransport(Transport):
    """bigipc's Queue or SimpleQueue, one item per put/get, or (``batch``)
    ``put_many``/``get_many`` of a few hundred items per call."""

    family = "bigipc"
    multi_producer = True
    _BATCH = 256

    def __init__(self, name: str, label: str, kind: str, compare_to: tuple[str, ...]) -> None:
        self.name = name
        self.label = label
        self.kind = kind  # "queue", "simple" or "batch"
        self.compare_to = compare_to

    def supports(self, case: Case) -> bool:
        return not (self.kind == "batch" and case.size > 64 * 1024)

    def open(self, case: Case, context: Any) -> Link:
        import bigipc

        queue: Any = bigipc.SimpleQueue() if self.kind == "simple" else bigipc.Queue()
        return Link(queue, queue)

    def sender(self, end: Any, case: Case) -> Endpoint:
        def close() -> None:
            end.close()
            if self.kind != "simple":
                end.join_thread()

        if self.kind != "batch":
            return Endpoint(send=end.put, close=close)
        batch: list[Any] = []
        put_many, limit = end.put_many, self._BATCH

        def send(message: Any) -> None:
            batch.append(message)
            if len(batch) >= limit:
                put_many(batch)
                batch.clear()

        def flush() -> None:
            if batch:
                put_many(batch)
                batch.clear()

        return Endpoint(send=send, flush=flush, close=close)

    def receiver(self, end: Any, case: Case) -> Endpoint:
        if self.kind != "batch":
            return Endpoint(recv=end.get, close=end.close)
        return Endpoint(
            recv=_one_at_a_time(functools.partial(end.get_many, self._BATCH * 4)), close=end.close
        )


class _FasterFifoTransport(Transport):
    name = "faster-fifo"
    label = "faster_fifo.Queue"
    family = "third-party"
    module = "faster_fifo"
    multi_producer = True

    # faster-fifo's calls time out after 10 s by default; a measurement
    # must not, the runner has its own deadline.
    _FOREVER = 1e7

    def open(self, case: Case, context: Any) -> Link:
        import faster_fifo

        # Its circular buffer in shared memory must hold a whole pickled
        # message, with room for the next one to be written meanwhile.
        capacity = max(32 * MiB, 2 * case.size + MiB)
        queue = faster_fifo.Queue(max_size_bytes=capacity)
        return Link(queue, queue)

    def sender(self, end: Any, case: Case) -> Endpoint:
        forever = self._FOREVER
        return Endpoint(send=lambda message: end.put(message, timeout=forever))

    def receiver(self, end: Any, case: Case) -> Endpoint:
        forever = self._FOREVER
        return Endpoint(recv=lambda: end.get(timeout=forever))


class _ZmqTransport(Transport):
    name = "pyzmq"
    label = "pyzmq PUSH/PULL ipc://"
    family = "third-party"
    module = "zmq"
    multi_producer = True
    # Below this, copying into a zmq message is cheaper than tracking a
    # zero-copy frame (pyzmq's own advice).
    _ZERO_COPY_MIN = 64 * 1024

    def open(self, case: Case, context: Any) -> Link:
        folder = tempfile.mkdtemp(prefix="bigipc-bench-")
        address = "ipc://" + os.path.join(folder, "link")
        return Link(address, address, cleanup=lambda: shutil.rmtree(folder, ignore_errors=True))

    def sender(self, address: Any, case: Case) -> Endpoint:
        import zmq

        # A context must be made in the process that uses it (not forked).
        context = zmq.Context()
        sock = context.socket(zmq.PUSH)
        sock.connect(address)

        def close() -> None:
            sock.close(linger=-1)  # wait until everything is delivered
            context.term()

        if case.kind == "bytes":
            copy = case.size < self._ZERO_COPY_MIN
            return Endpoint(send=lambda message: sock.send(message, copy=copy), close=close)
        return Endpoint(send=lambda obj: sock.send_pyobj(obj, protocol=5), close=close)

    def receiver(self, address: Any, case: Case) -> Endpoint:
        import zmq

        context = zmq.Context()
        sock = context.socket(zmq.PULL)
        sock.bind(address)

        def close() -> None:
            sock.close(linger=0)
            context.term()

        if case.kind == "object":
            return Endpoint(recv=sock.recv_pyobj, close=close)
        if case.size < self._ZERO_COPY_MIN:
            return Endpoint(recv=sock.recv, close=close)
        # The frame's own buffer: one copy, from the kernel into zmq's message.
        return Endpoint(recv=lambda: sock.recv(copy=False).buffer, close=close)


class _RawPipeTransport(Transport):
    """os.write/os.read over an os.pipe() of bigipc's size: the kernel's floor.

    No framing (both sides know the size), no allocation per message (the
    reader fills one reused buffer), blocking descriptors.
    """

    name = "raw-pipe"
    label = "raw pipe (os.read/os.write)"
    short = "raw pipe"
    family = "floor"

    def supports(self, case: Case) -> bool:
        return case.kind == "bytes" and case.producers == 1

    def open(self, case: Case, context: Any) -> Link:
        from bigipc import _platform

        read_fd, write_fd = os.pipe()
        _platform.set_pipe_size(write_fd, None)  # what bigipc.Pipe(False) asks for
        producer, consumer = _FdEnd(write_fd), _FdEnd(read_fd)

        def release() -> None:
            producer.close()
            consumer.close()

        return Link(producer, consumer, release)

    def sender(self, end: Any, case: Case) -> Endpoint:
        fd, write = end.fd, os.write

        def send(message: Any) -> None:
            written = write(fd, message)
            if written < len(message):
                view = memoryview(message)[written:]
                while view:
                    view = view[write(fd, view) :]

        return Endpoint(send=send, close=end.close)

    def receiver(self, end: Any, case: Case) -> Endpoint:
        fd, size = end.fd, case.size
        if size <= 64 * 1024:
            read = os.read

            def recv() -> bytes:
                message = read(fd, size)
                while len(message) < size:
                    more = read(fd, size - len(message))
                    if not more:
                        raise EOFError("raw pipe closed mid-message")
                    message += more
                return message

            return Endpoint(recv=recv, close=end.close)

        buffer = bytearray(size)
        view = memoryview(buffer)
        readv = os.readv

        def recv_into_buffer() -> bytearray:
            have = 0
            while have < size:
                got = readv(fd, [view[have:]])
                if not got:
                    raise EOFError("raw pipe closed mid-message")
                have += got
            return buffer

        return Endpoint(recv=recv_into_buffer, close=end.close)


class _CLoopTransport(_RawPipeTransport):
    """write(2)/read(2) in C loops over an os.pipe() of bigipc's size.

    The same pipe and blocking descriptors as the raw pipe, but each side
    moves a whole run in one call into the compiled core
    (``bigipc._core._floor_write``/``_floor_read``), so no Python runs per
    message: what the kernel costs, and nothing else. Every message is read
    into one buffer, so only the last one of a run can be checked.
    """

    name = "c-loop"
    label = "C read/write loop (pipe)"
    short = "C loop"

    def unavailable(self) -> str | None:
        try:
            core = self._core()
        except ImportError as exc:
            return "needs bigipc's compiled core (%s)" % exc
        if not hasattr(core, "_floor_read"):
            return "this build of bigipc's compiled core has no C loop"
        return None

    @staticmethod
    def _core() -> Any:
        # Any: the floor is not part of the core interface in _core.pyi.
        return importlib.import_module("bigipc._core")

    def sender(self, end: Any, case: Case) -> Endpoint:
        return Endpoint(send_run=functools.partial(self._core()._floor_write, end.fd), close=end.close)

    def receiver(self, end: Any, case: Case) -> Endpoint:
        buffer = bytearray(case.size)
        read = self._core()._floor_read

        def recv_run(count: int) -> bytearray:
            read(end.fd, buffer, count)
            return buffer

        return Endpoint(recv_run=recv_run, close=end.close)


TRANSPORTS: dict[str, Transport] = {}


def register_transport(transport: Transport) -> Transport:
    """Add ``transport`` to the registry (by ``transport.name``); returns it."""
    TRANSPORTS[transport.name] = transport
    return transport


register_transport(
    _PipeTransport("bigipc-duplex", "bigipc.Pipe()", "bigipc", True, ("mp-duplex", "raw-pipe", "c-loop"))
)
register_transport(
    _PipeTransport(
        "bigipc-simplex", "bigipc.Pipe(duplex=False)", "bigipc", False, ("mp-simplex", "raw-pipe", "c-loop")
    )
)
register_transport(_BigipcBatchTransport())
register_transport(_PipeTransport("mp-duplex", "multiprocessing.Pipe()", "stdlib", True, short="mp.Pipe()"))
register_transport(
    _PipeTransport(
        "mp-simplex", "multiprocessing.Pipe(duplex=False)", "stdlib", False, short="mp.Pipe(duplex=False)"
    )
)
register_transport(_BigipcQueueTransport("bigipc-queue", "bigipc.Queue", "queue", ("mp-queue",)))
register_transport(
    _BigipcQueueTransport("bigipc-simplequeue", "bigipc.SimpleQueue", "simple", ("mp-simplequeue",))
)
register_transport(
    _BigipcQueueTransport("bigipc-queue-batch", "bigipc.Queue put_many/get_many", "batch", ("mp-queue",))
)
register_transport(_MpQueueTransport("mp-queue", "multiprocessing.Queue", simple=False))
register_transport(_MpQueueTransport("mp-simplequeue", "multiprocessing.SimpleQueue", simple=True))
register_transport(_FasterFifoTransport())
register_transport(_ZmqTransport())
register_transport(_RawPipeTransport())
register_transport(_CLoopTransport())


# ---------------------------------------------------------------------------
# Child processes. Each one talks to the parent over a control connection:
# it reports "ready", then obeys ("run", n) and ("stop",) commands.


def _report_failure(control: Any) -> None:
    with contextlib.suppress(Exception):
        control.send(("error", traceback.format_exc()))


def _producer_main(transport: Transport, case: Case, end: Any, control: Any, producer: int) -> None:
    try:
        sender = transport.sender(end, case)
        control.send(("ready", max_rss_bytes()))
        send_run = sender.send_run
        send = sender.send if send_run is None else None
        slots, sent = case.slots, 0
        pool: list[Any] = []
        while True:
            command = control.recv()
            if command[0] == "stop":
                break
            count = command[1]
            # The messages this run needs are made before the clock starts
            # (a run of one 256 MiB message makes one, not the whole pool).
            while len(pool) < min(slots, sent + count):
                pool.append(case.build_message(producer, len(pool)))
            started = _now()
            if send is None:
                send_run(pool, sent, count)  # type: ignore[misc]
            else:
                for index in range(sent, sent + count):
                    send(pool[index % slots])
            sender.flush()
            control.send(("sent", started, _now()))
            sent += count
        sender.close()
        control.send(("stopped", max_rss_bytes()))
    except BaseException:
        _report_failure(control)
        raise SystemExit(1) from None


def receive_checked(recv: Callable[[], Any], checker: Checker, count: int) -> str | None:
    """Receive ``count`` messages with ``recv`` and check each one; None if
    all were right, else what was wrong with the first bad one (the rest
    are received unchecked, so the producer can finish)."""
    done = 0
    due = checker.due_in_order()
    if due is not None:
        # Small messages from one producer: one comparison with the message
        # due settles each, with no Python-level call. The check is the
        # benchmark's own cost, paid by every transport alike, so the less
        # it costs the closer the ratios are to the transports' own.
        following = due.__next__
        for done in range(count):  # noqa: B007 (the count is used after a break)
            message = recv()
            if message != following():
                break
        else:
            checker.advance(count)
            return None
        checker.advance(done)
        problem = checker.check(message) or "content differs from what was sent"
    else:
        check = checker.check
        problem = None
        for done in range(count):  # noqa: B007 (the count is used after a break)
            message = recv()
            problem = check(message)
            # Drop the message before the next receive, so the peak memory
            # measured is what receiving one message costs.
            message = None
            if problem is not None:
                break
        else:
            return None
    for _ in range(count - done - 1):
        recv()
    return "message #%d: %s" % (checker.received, problem)


def _receive_run_checked(recv_run: Callable[[int], Any], checker: Checker, count: int) -> str | None:
    """A floor's whole run in one call: only its last message is left to
    check (the floor reads every message into the same buffer)."""
    if count == 0:
        return None
    last = recv_run(count)
    checker.advance(count - 1)
    problem = checker.check(last)
    return None if problem is None else "message #%d: %s" % (checker.received, problem)


def _consumer_main(transport: Transport, case: Case, end: Any, control: Any, full_check: bool) -> None:
    try:
        receiver = transport.receiver(end, case)
        checker = case.checker(full_check)
        control.send(("ready", max_rss_bytes()))
        while True:
            command = control.recv()
            if command[0] == "stop":
                break
            if receiver.recv_run is None:
                problem = receive_checked(receiver.recv, checker, command[1])
            else:
                problem = _receive_run_checked(receiver.recv_run, checker, command[1])
            control.send(("received", _now(), max_rss_bytes(), problem))
        receiver.close()
        control.send(("stopped", max_rss_bytes()))
    except BaseException:
        _report_failure(control)
        raise SystemExit(1) from None


class Measurement:
    """One timed run: ``count`` messages of ``case`` through ``transport``."""

    def __init__(
        self,
        case: Case,
        transport: Transport,
        count: int,
        seconds: float,
        rss_start: int,
        rss_peak: int,
        error: str | None = None,
        repetition: int | None = None,
    ) -> None:
        self.repetition = repetition
        self.case = case
        self.transport = transport
        self.count = count
        self.seconds = seconds
        self.rss_start = rss_start
        self.rss_peak = rss_peak
        self.error = error

    @property
    def bytes(self) -> int:
        return self.count * self.case.size

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds else 0.0

    @property
    def messages_per_s(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

    def raise_for_error(self) -> Measurement:
        if self.error:
            raise VerificationError("%s, %s: %s" % (self.case.name, self.transport.name, self.error))
        return self

    def as_dict(self) -> dict[str, Any]:
        return {
            "case": self.case.name,
            "transport": self.transport.name,
            "repetition": self.repetition,
            "messages": self.count,
            "bytes": self.bytes,
            "seconds": self.seconds,
            "mb_per_s": self.mb_per_s,
            "messages_per_s": self.messages_per_s,
            "consumer_rss_start_bytes": self.rss_start,
            "consumer_rss_peak_bytes": self.rss_peak,
            "ok": self.error is None,
            "error": self.error,
        }


class Session:
    """A producer and a consumer process joined by one transport.

    ``run(n)`` moves ``n`` more messages and returns a ``Measurement``;
    the processes and the link live until ``close()`` (or the ``with``
    block ends), so pytest-benchmark can time many rounds on one link.
    A run that takes longer than ``timeout`` seconds (a hang, a lost
    message) ends the session with ``BenchError``.
    """

    def __init__(
        self,
        transport: Transport,
        case: Case,
        *,
        start_method: str | None = None,
        timeout: float = 120.0,
        full_check: bool = False,
    ) -> None:
        import multiprocessing

        self.transport = transport
        self.case = case
        self.timeout = timeout
        self.full_check = full_check
        # Any: typeshed's BaseContext lacks Process (each concrete context has it).
        self._context: Any = multiprocessing.get_context(start_method or default_start_method())
        self._link: Link | None = None
        # (process, control connection) of each child.
        self._producers: list[tuple[Any, Any]] = []
        self._consumer: tuple[Any, Any] | None = None
        self.rss_start = 0

    # -- lifetime -----------------------------------------------------------

    def __enter__(self) -> Session:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _spawn(self, target: Callable[..., None], end: Any, *extra: Any) -> tuple[Any, Any]:
        ours, theirs = self._context.Pipe()
        process = self._context.Process(
            target=target, args=(self.transport, self.case, end, theirs, *extra), daemon=True
        )
        process.start()
        theirs.close()
        return process, ours

    def start(self) -> None:
        """Start both processes and wait until each is ready."""
        case, transport = self.case, self.transport
        self._link = transport.open(case, self._context)
        try:
            self._consumer = self._spawn(_consumer_main, self._link.consumer_end, self.full_check)
            for index in range(case.producers):
                self._producers.append(self._spawn(_producer_main, self._link.producer_end, index))
            # The children hold their ends now; the parent's copies must go
            # or the readers would never see the writers leave.
            self._link.release()
            deadline = _now() + max(self.timeout, 60.0)
            self.rss_start = self._expect(self._consumer, "ready", deadline)[1]
            for producer in self._producers:
                self._expect(producer, "ready", deadline)
        except BaseException:
            self.close(force=True)
            raise

    def close(self, force: bool = False) -> None:
        """Stop the processes (killing any that do not stop) and drop the link."""
        children = ([self._consumer] if self._consumer else []) + self._producers
        if not force:
            for _process, control in children:
                with contextlib.suppress(OSError):
                    control.send(("stop",))
        deadline = _now() + (0 if force else 30.0)
        for process, control in children:
            process.join(max(0.0, deadline - _now()))
            if process.is_alive():
                process.kill()
                process.join(5)
            control.close()
        self._consumer, self._producers = None, []
        if self._link is not None:
            link, self._link = self._link, None
            link.cleanup()

    # -- running ------------------------------------------------------------

    def _expect(self, child: tuple[Any, Any], what: str, deadline: float) -> Any:
        """The next report of ``child``, which must be ``what``."""
        process, control = child
        while True:
            ready = _mp_connection.wait([control, process.sentinel], max(0.0, deadline - _now()))
            if control in ready:
                try:
                    report = control.recv()
                except EOFError:
                    report = None
                break
            if process.sentinel in ready:
                report = None
                break
            if not ready:
                raise BenchError(
                    "%s, %s: no %r from a child process within %.0f s (a hang or a lost message)"
                    % (self.case.name, self.transport.name, what, self.timeout)
                )
        if report is None:
            process.join(1)
            raise BenchError(
                "%s, %s: a child process exited (code %s) before reporting %r"
                % (self.case.name, self.transport.name, process.exitcode, what)
            )
        where = "%s, %s" % (self.case.name, self.transport.name)
        if report[0] == "error":
            raise BenchError("%s: a child process failed:\n%s" % (where, report[1]))
        if report[0] != what:
            raise BenchError("%s: expected %r, got %r" % (where, what, report[0]))
        return report

    def run(self, count: int) -> Measurement:
        """Move ``count`` messages (split among the producers) and time it."""
        if self._consumer is None:
            raise BenchError("session is not running")
        producers = len(self._producers)
        per_producer = count // producers
        count = per_producer * producers
        deadline = _now() + self.timeout
        try:
            self._consumer[1].send(("run", count))
            for _, control in self._producers:
                control.send(("run", per_producer))
            starts = [self._expect(producer, "sent", deadline)[1] for producer in self._producers]
            _, finished, rss_peak, problem = self._expect(self._consumer, "received", deadline)
        except BaseException:
            self.close(force=True)
            raise
        return Measurement(
            self.case, self.transport, count, finished - min(starts), self.rss_start, rss_peak, problem
        )


# ---------------------------------------------------------------------------
# The side-by-side comparison.


class Progress:
    """One status line on stderr: rewritten in place on a terminal, plain
    lines when stderr is a file or a pipe (CI logs)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.live = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._width = 0

    def show(self, text: str) -> None:
        if self.live:
            columns = shutil.get_terminal_size((100, 20)).columns - 1
            text = text[:columns]
            self.stream.write("\r" + text + " " * max(0, self._width - len(text)))
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """A line that stays (a skipped transport, a failure)."""
        self.clear()
        self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.live and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


class _Available(Protocol):
    def unavailable(self) -> str | None: ...


_EntryT = TypeVar("_EntryT", bound=_Available)


def _format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return "%d:%02d" % (seconds // 60, seconds % 60)


def _select(
    registry: dict[str, _EntryT], names: list[str] | None, kind: str, notes: list[str]
) -> list[_EntryT]:
    """The entries of ``registry`` named (all by default) that can run here;
    a note in ``notes`` for each one that cannot."""
    chosen = []
    for name in names or list(registry):
        if name not in registry:
            raise KeyError("unknown %s %r (known: %s)" % (kind, name, ", ".join(registry)))
        entry = registry[name]
        reason = entry.unavailable()
        if reason:
            notes.append("%s %s skipped: %s" % (kind, name, reason))
        else:
            chosen.append(entry)
    return chosen


def plan(
    case_names: list[str] | None = None, transport_names: list[str] | None = None
) -> tuple[list[Case], list[Transport], list[str]]:
    """(cases, transports, notes): what can run here, and why the rest cannot."""
    notes: list[str] = []
    cases = _select(CASES, case_names, "case", notes)
    transports = _select(TRANSPORTS, transport_names, "transport", notes)
    return cases, transports, notes


def run_bench(
    cases: list[Case],
    transports: list[Transport],
    *,
    quick: bool = False,
    repeat: int = 5,
    start_method: str | None = None,
    timeout: float | None = None,
    progress: Progress | None = None,
    full_check: bool = False,
) -> tuple[list[Measurement], list[str]]:
    """Run every supported (case, transport) pair ``repeat`` times.

    Within each repetition of a case the transports take turns (each
    repetition starting one further along), so drift in the machine's
    state spreads over all of them instead of favouring one. Returns the
    list of ``Measurement`` objects and the list of failures (text).
    """
    progress = progress or Progress()
    results, failures = [], []
    jobs = sum(repeat * sum(1 for t in transports if t.supports(c)) for c in cases)
    done = 0
    began = _now()
    for case in cases:
        runnable = [t for t in transports if t.supports(case)]
        count = case.message_count(quick)
        # Generous: a slow transport must finish, a hang must not stall CI.
        limit = timeout or 60.0 + count * case.size / 20e6 + count * 200e-6
        for rep in range(repeat):
            shift = rep % len(runnable) if runnable else 0
            for transport in runnable[shift:] + runnable[:shift]:
                done += 1
                elapsed = _format_duration(_now() - began)
                progress.show(
                    "[%d/%d %s] %s | %s | run %d/%d"
                    % (done, jobs, elapsed, case.label, transport.label, rep + 1, repeat)
                )
                try:
                    with Session(
                        transport, case, start_method=start_method, timeout=limit, full_check=full_check
                    ) as session:
                        measurement = session.run(count)
                except BenchError as exc:
                    failures.append(str(exc))
                    progress.note("FAILED: %s" % exc)
                    continue
                measurement.repetition = rep + 1
                results.append(measurement)
                if measurement.error:
                    failure = "%s through %s: %s" % (case.label, transport.label, measurement.error)
                    failures.append(failure)
                    progress.note("MISMATCH: " + failure)
    progress.clear()
    return results, failures


def summarize(results: list[Measurement]) -> list[dict[str, Any]]:
    """Per (case, transport): median, min and max of the runs, and ratios.

    Returns a list of dicts in the order the cases and transports were run.
    """
    grouped: dict[tuple[str, str], list[Measurement]] = {}
    for m in results:
        if m.error is None:
            grouped.setdefault((m.case.name, m.transport.name), []).append(m)
    rows: list[dict[str, Any]] = []
    medians: dict[tuple[str, str], float] = {}
    for (case_name, transport_name), runs in grouped.items():
        speeds = [m.mb_per_s for m in runs]
        rates = [m.messages_per_s for m in runs]
        row: dict[str, Any] = {
            "case": case_name,
            "transport": transport_name,
            "label": runs[0].transport.label,
            "runs": len(runs),
            "messages": runs[0].count,
            "message_bytes": runs[0].case.size,
            "mb_per_s_median": statistics.median(speeds),
            "mb_per_s_min": min(speeds),
            "mb_per_s_max": max(speeds),
            "messages_per_s_median": statistics.median(rates),
            "messages_per_s_min": min(rates),
            "messages_per_s_max": max(rates),
            "consumer_rss_peak_bytes": max(m.rss_peak for m in runs),
            "consumer_rss_start_bytes": min(m.rss_start for m in runs),
            "ratios": {},
        }
        medians[(case_name, transport_name)] = row["mb_per_s_median"]
        rows.append(row)
    for row in rows:
        for other in TRANSPORTS[row["transport"]].compare_to if row["transport"] in TRANSPORTS else ():
            reference = medians.get((row["case"], other))
            if reference:
                row["ratios"][other] = row["mb_per_s_median"] / reference
    return rows


def _si(value: float) -> str:
    if value >= 1e6:
        return "%.2fM" % (value / 1e6)
    if value >= 1e4:
        return "%.0fk" % (value / 1e3)
    if value >= 1e3:
        return "%.1fk" % (value / 1e3)
    return "%.0f" % value


def _mb(value: float) -> str:
    return "%.0f" % value if value >= 100 else "%.1f" % value


def format_table(rows: list[dict[str, Any]], cases: list[Case], repeat: int) -> str:
    """The human-readable report."""
    lines = []
    header = "%-34s %9s %15s %9s %15s  %s" % (
        "transport",
        "MB/s",
        "min-max MB/s",
        "msg/s",
        "peak RSS (+grew)",
        "median MB/s ratio",
    )
    for case in cases:
        case_rows = [r for r in rows if r["case"] == case.name]
        if not case_rows:
            continue
        lines.append("")
        lines.append(
            "== %s: %d messages of %s per run, median of %d runs"
            % (case.label, case_rows[0]["messages"], _size(case.size), repeat)
        )
        lines.append(header)
        for row in case_rows:
            ratios = ", ".join("%.2fx %s" % (value, _short(name)) for name, value in row["ratios"].items())
            peak = row["consumer_rss_peak_bytes"] / MiB
            growth = (row["consumer_rss_peak_bytes"] - row["consumer_rss_start_bytes"]) / MiB
            lines.append(
                "%-34s %9s %15s %9s %15s  %s"
                % (
                    row["label"][:34],
                    _mb(row["mb_per_s_median"]),
                    "%s-%s" % (_mb(row["mb_per_s_min"]), _mb(row["mb_per_s_max"])),
                    _si(row["messages_per_s_median"]),
                    "%.0fM (+%.0f)" % (peak, growth),
                    ratios,
                )
            )
    return "\n".join(lines)


def _short(name: str) -> str:
    transport = TRANSPORTS.get(name)
    if transport is None:
        return name
    return transport.short or transport.label


def _size(n: int) -> str:
    if n >= MiB and n % MiB == 0:
        return "%d MiB" % (n // MiB)
    return "%d B" % n


def environment() -> dict[str, Any]:
    """What the figures were measured on."""
    import bigipc
    from bigipc import _platform

    return {
        "bigipc_version": bigipc.__version__,
        "implementation": bigipc.IMPLEMENTATION,
        "python": sys.version,
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "pipe_size": _platform.default_pipe_size(),
    }


def write_json(
    path: str,
    results: list[Measurement],
    rows: list[dict[str, Any]],
    failures: list[str],
    settings: dict[str, Any],
) -> None:
    document = {
        "environment": environment(),
        "settings": settings,
        "units": {"mb_per_s": "10**6 bytes per second", "rss": "bytes"},
        "runs": [m.as_dict() for m in results],
        "summary": rows,
        "failures": failures,
    }
    with open(path, "w") as f:
        json.dump(document, f, indent=2)
        f.write("\n")


_CHART_COLORS = {"bigipc": "tab:blue", "floor": "tab:green"}


def draw_chart(path: str, rows: list[dict[str, Any]], cases: list[Case]) -> str | None:
    """A PNG with one panel per case; returns None or why it was not drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return "matplotlib is not installed (%s)" % exc
    shown = [c for c in cases if any(r["case"] == c.name for r in rows)]
    if not shown:
        return "no results to draw"
    height = 2.2 + 0.45 * len(TRANSPORTS) * len(shown)
    figure, axes = plt.subplots(len(shown), 1, figsize=(9, height), squeeze=False)
    for axis, case in zip(axes[:, 0], shown):
        case_rows = [r for r in rows if r["case"] == case.name]
        labels = [r["label"] for r in case_rows]
        medians = [r["mb_per_s_median"] for r in case_rows]
        low = [r["mb_per_s_median"] - r["mb_per_s_min"] for r in case_rows]
        high = [r["mb_per_s_max"] - r["mb_per_s_median"] for r in case_rows]
        families = [getattr(TRANSPORTS.get(r["transport"]), "family", "") for r in case_rows]
        colors = [_CHART_COLORS.get(family, "tab:gray") for family in families]
        positions = range(len(case_rows))
        axis.barh(positions, medians, xerr=[low, high], color=colors, capsize=3)
        axis.set_yticks(list(positions))
        axis.set_yticklabels(labels, fontsize=8)
        axis.invert_yaxis()
        axis.set_title(case.label, fontsize=10)
        axis.set_xlabel(
            "MB/s: median, bars from min to max (blue: bigipc, green: raw pipe floor)", fontsize=8
        )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return None
