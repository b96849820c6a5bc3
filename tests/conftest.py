"""Fixtures shared by the core tests: the two core implementations and
channels built on real pipes and socket pairs.

Every test that takes ``core`` runs once per implementation. The compiled
core must be importable: a missing or broken extension fails the "cython"
run instead of silently testing only the pure-Python core, unless
``BIGIPC_PUREPYTHON=1`` says the pure core is all that is wanted.
"""

import importlib
import os
import socket

import pytest

CORE_MODULES = {"cython": "bigipc._core", "python": "bigipc._purecore"}


def _pure_python_forced():
    # Same reading of the variable as bigipc._backend.
    return os.environ.get("BIGIPC_PUREPYTHON", "") not in ("", "0")


@pytest.fixture(params=sorted(CORE_MODULES))
def core(request):
    """The core module under test: ``bigipc._core`` or ``bigipc._purecore``."""
    name = request.param
    try:
        return importlib.import_module(CORE_MODULES[name])
    except ImportError as exc:
        if name == "cython" and _pure_python_forced():
            pytest.skip("BIGIPC_PUREPYTHON=1: compiled core not required (%s)" % (exc,))
        pytest.fail("cannot import %s: %s" % (CORE_MODULES[name], exc), pytrace=False)


class RawFd:
    """A bare descriptor the test writes or reads with os calls; closed once."""

    def __init__(self, fd):
        self.fd = fd

    @property
    def closed(self):
        return self.fd is None

    def write(self, data):
        """Write all of ``data`` (blocking descriptor)."""
        view = memoryview(data).cast("B")
        while view:
            written = os.write(self.fd, view)
            view = view[written:]

    def close(self):
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


class ChannelFactory:
    """Builds channels on fresh descriptors and closes them all at teardown.

    Tests that need more than one pair (or a pair per Hypothesis example)
    use it directly; closing early is fine since ``close()`` is idempotent.
    """

    def __init__(self, core):
        self.core = core
        self._channels = []
        self._raw = []

    def channel(self, fd, readable=True, writable=True, **kwargs):
        try:
            chan = self.core.Channel(fd, readable, writable, **kwargs)
        except BaseException:
            os.close(fd)
            raise
        self._channels.append(chan)
        return chan

    def raw(self, fd):
        raw = RawFd(fd)
        self._raw.append(raw)
        return raw

    def pipe(self, pipe_size=None, **kwargs):
        """(reader Channel, writer Channel) on a new os.pipe()."""
        rfd, wfd = os.pipe()
        if pipe_size is not None:
            import fcntl

            # fcntl has the name F_SETPIPE_SZ from Python 3.10 on (Linux ABI value).
            fcntl.fcntl(wfd, getattr(fcntl, "F_SETPIPE_SZ", 1031), pipe_size)
        reader = self.channel(rfd, True, False, **kwargs)
        writer = self.channel(wfd, False, True, **kwargs)
        return reader, writer

    def socketpair(self, **kwargs):
        """Two duplex Channels owning the fds of a socket.socketpair()."""
        left, right = socket.socketpair()
        # detach() hands the fds over without closing them; the sockets
        # objects become inert.
        fd_left, fd_right = left.detach(), right.detach()
        try:
            a = self.channel(fd_left, **kwargs)
        except BaseException:
            os.close(fd_right)
            raise
        b = self.channel(fd_right, **kwargs)
        return a, b

    def pair(self, kind, **kwargs):
        """(receiving end, sending end) of the given kind."""
        if kind == "pipe":
            return self.pipe(**kwargs)
        if kind == "socket":
            return self.socketpair(**kwargs)
        raise ValueError(kind)

    def raw_writer(self, **kwargs):
        """(reader Channel, RawFd write end): the test writes bytes by hand."""
        rfd, wfd = os.pipe()
        raw = self.raw(wfd)
        return self.channel(rfd, True, False, **kwargs), raw

    def raw_reader(self, **kwargs):
        """(writer Channel, RawFd read end): the test reads bytes by hand."""
        rfd, wfd = os.pipe()
        raw = self.raw(rfd)
        return self.channel(wfd, False, True, **kwargs), raw

    def close_all(self):
        for chan in self._channels:
            chan.close()
        for raw in self._raw:
            raw.close()
        self._channels.clear()
        self._raw.clear()


@pytest.fixture
def channels(core):
    """A ChannelFactory for ``core``; everything it made is closed at teardown."""
    factory = ChannelFactory(core)
    yield factory
    factory.close_all()


@pytest.fixture
def pipe_pair(channels):
    """(reader, writer): Channels on the two ends of an os.pipe()."""
    return channels.pipe()


@pytest.fixture
def socket_pair(channels):
    """Two duplex Channels on a socket.socketpair()."""
    return channels.socketpair()


@pytest.fixture(params=["pipe", "socket"])
def pair(request, channels):
    """(receiving end, sending end) on a pipe or on a socket pair."""
    return channels.pair(request.param)


@pytest.fixture
def raw_writer(channels):
    """(reader Channel, RawFd): a pipe whose write end the test drives with os.write."""
    return channels.raw_writer()


@pytest.fixture
def raw_reader(channels):
    """(writer Channel, RawFd): a pipe whose read end the test drives with os.read."""
    return channels.raw_reader()
