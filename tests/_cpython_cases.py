"""CPython's own Connection and queue tests (test._test_multiprocessing),
on bigipc.Pipe and bigipc's queues.

The test classes are built the way CPython's ``install_tests_in_module_dict``
builds them (base class + ProcessesMixin + unittest.TestCase), with a mixin
whose ``Pipe``, ``Queue``, ``JoinableQueue`` and ``SimpleQueue`` are
bigipc's, once per start method.

Some of the queue tests do not go through the mixin: they call
``multiprocessing.Queue()`` (or ``JoinableQueue``, ``SimpleQueue``)
directly. While each queue test runs, those names (the module's and every
context's) make bigipc queues too, and CPython's ``close_queue`` helper
closes bigipc queues; everything is put back when the test ends. Tests that
rely on internals of the stdlib's queues, which bigipc's queues do not
have, are skipped by name (``QUEUE_SKIPS``), each with the reason.

They live in this plain module, not in the pytest test file, because the
children those tests start under spawn and forkserver unpickle their target
(a classmethod of the generated class) by module and class name: the module
must be importable by name in a fresh interpreter, which a test file
imported by pytest's importlib mode is not. tests/test_cpython_suite.py puts
this directory on sys.path and PYTHONPATH and re-exports the classes so that
pytest collects them.
"""

import multiprocessing
import multiprocessing.context
import sys
import unittest

import bigipc

# The classes taken from CPython.
CONNECTION_BASES = ("_TestConnection", "_TestPoll", "_TestPicklingConnections")
QUEUE_BASES = ("_TestQueue", "TestSimpleQueue")
BASES = CONNECTION_BASES + QUEUE_BASES
START_METHODS = tuple(
    m for m in ("fork", "spawn", "forkserver") if m in multiprocessing.get_all_start_methods()
)

# Queue tests that cannot apply to bigipc's queues: (base, test) -> what of
# the stdlib's queue implementation the test depends on.
QUEUE_SKIPS = {
    ("_TestQueue", "test_queue_feeder_on_queue_feeder_error"): (
        "subclasses multiprocessing.queues.Queue to override its _on_queue_feeder_error hook"
    ),
    ("_TestQueue", "test_queue_feeder_donot_stop_onexc"): (
        "expects put() to accept an unpicklable object and drop it later; bigipc pickles in"
        " put(), so the error is raised to the caller and nothing is enqueued (by design)"
    ),
    ("TestSimpleQueue", "test_closed"): (
        "inspects the stdlib SimpleQueue's _reader and _writer Connection attributes"
    ),
}

SKIP_REASON = None
try:
    from test import _test_multiprocessing as cpython_tests
except unittest.SkipTest as exc:  # e.g. sem_open broken, ASAN build
    cpython_tests = None
    SKIP_REASON = "CPython's multiprocessing tests skip themselves here: %s" % (exc,)
except ImportError as exc:  # a Python installed without its test package
    cpython_tests = None
    SKIP_REASON = "test._test_multiprocessing is not installed: %s" % (exc,)


def bigipc_pipe(duplex=True):
    """``bigipc.Pipe`` as the tests call ``self.Pipe``."""
    return bigipc.Pipe(duplex)


# While not None, every queue the patched constructors and the mixins make
# is appended here (test_cpython_suite.py checks what the tests really ran on).
made_queues = None


def _new(cls, *args, **kwargs):
    queue = cls(*args, **kwargs)
    if made_queues is not None:
        made_queues.append(queue)
    return queue


def _queue_factories(context):
    """``Queue``, ``JoinableQueue`` and ``SimpleQueue`` with the signatures
    of the stdlib's, making bigipc queues tied to ``context``."""

    def Queue(maxsize=0):
        return _new(bigipc.Queue, maxsize, ctx=context)

    def JoinableQueue(maxsize=0):
        return _new(bigipc.JoinableQueue, maxsize, ctx=context)

    def SimpleQueue():
        return _new(bigipc.SimpleQueue, ctx=context)

    return {"Queue": Queue, "JoinableQueue": JoinableQueue, "SimpleQueue": SimpleQueue}


class _BigipcContextQueues:
    """Replacements for the stdlib context's queue methods (on BaseContext,
    so every context has them): bigipc queues for the context they are
    called on. ``get_context()`` resolves the default context to the one of
    the global start method at call time, as the stdlib's methods do."""

    def Queue(self, maxsize=0):
        return _new(bigipc.Queue, maxsize, ctx=self.get_context())

    def JoinableQueue(self, maxsize=0):
        return _new(bigipc.JoinableQueue, maxsize, ctx=self.get_context())

    def SimpleQueue(self):
        return _new(bigipc.SimpleQueue, ctx=self.get_context())


def close_bigipc_queue(queue):
    """What CPython's ``close_queue`` helper does for a stdlib queue, for a
    bigipc one too: close it and wait for its feeder thread."""
    if isinstance(queue, bigipc.Queue) and not isinstance(queue, bigipc.SimpleQueue):
        queue.close()
        queue.join_thread()
    else:
        ORIGINALS["close_queue"](queue)


# The stdlib names patch_stdlib_queues() replaces, and what they were (taken
# at import, before any patch).
QUEUE_NAMES = ("Queue", "JoinableQueue", "SimpleQueue")
ORIGINALS = {}
if cpython_tests is not None:
    ORIGINALS["close_queue"] = cpython_tests.close_queue
for _name in QUEUE_NAMES:
    ORIGINALS["multiprocessing." + _name] = getattr(multiprocessing, _name)
    ORIGINALS["BaseContext." + _name] = multiprocessing.context.BaseContext.__dict__[_name]


def patch_stdlib_queues():
    """Make the stdlib's queue constructors (module-level and every
    context's) and CPython's close_queue helper use bigipc; returns the
    function that puts everything back."""
    saved = []

    def replace(owner, name, value):
        saved.append((owner, name, owner.__dict__[name]))
        setattr(owner, name, value)

    try:
        default_context = multiprocessing.context._default_context
        for name in QUEUE_NAMES:
            method = _BigipcContextQueues.__dict__[name]
            replace(multiprocessing.context.BaseContext, name, method)
            # multiprocessing.Queue is the default context's bound method,
            # taken when multiprocessing was imported: rebind it.
            replace(multiprocessing, name, method.__get__(default_context))
        replace(cpython_tests, "close_queue", close_bigipc_queue)
    except BaseException:
        restore(saved)
        raise
    return lambda: restore(saved)


def restore(saved):
    for owner, name, value in reversed(saved):
        setattr(owner, name, value)
    saved.clear()


class StartMethodGuard:
    """First in the MRO of every generated class: sets the class's start
    method as the global one for the duration of the class (as CPython's
    setUpModule does for the whole module) and puts the old one back, even
    for bases whose tearDownClass does not call super()."""

    start_method = None

    @classmethod
    def setUpClass(cls):
        cls._saved_start_method = multiprocessing.get_start_method(allow_none=True)
        multiprocessing.set_start_method(cls.start_method, force=True)
        try:
            super().setUpClass()
        except BaseException:
            multiprocessing.set_start_method(cls._saved_start_method, force=True)
            raise

    @classmethod
    def tearDownClass(cls):
        try:
            super().tearDownClass()
        finally:
            multiprocessing.set_start_method(cls._saved_start_method, force=True)


# Modules a queue test writes and imports to run queue code at import time.
# Imported once, a module stays in sys.modules and the next class's run of
# that test would import nothing: each run starts without it.
FRESH_IMPORTS = ("imported_by_an_imported_module",)


class BigipcQueuesGuard(StartMethodGuard):
    """For the queue classes: the stdlib's queue constructors make bigipc
    queues for the duration of each test (see ``patch_stdlib_queues``)."""

    def setUp(self):
        for module in FRESH_IMPORTS:
            sys.modules.pop(module, None)
        self.addCleanup(patch_stdlib_queues())
        super().setUp()


def _class_name(base_name, method):
    # As install_tests_in_module_dict: "_TestConnection" -> "WithProcessesTestConnection"
    # and plain TestCase classes keep their name; plus the start method.
    if base_name.startswith("_"):
        return "WithProcesses%sOn%s" % (base_name[1:], method.capitalize())
    return "%sOn%s" % (base_name, method.capitalize())


def _skipped(base_name, base):
    """Overrides that skip the tests of ``base`` listed in QUEUE_SKIPS."""
    overrides = {}
    for (skip_base, test_name), reason in QUEUE_SKIPS.items():
        if skip_base == base_name and hasattr(base, test_name):
            overrides[test_name] = unittest.skip(reason)(getattr(base, test_name))
    return overrides


def _make_classes():
    classes = {}
    if cpython_tests is None:
        return classes
    for method in START_METHODS:
        context = multiprocessing.get_context(method)
        attrs = {
            "Pipe": staticmethod(bigipc_pipe),
            # The context's Process class: the start method applies even
            # if something changes the global one meanwhile.
            "Process": context.Process,
            "__module__": __name__,
        }
        attrs.update((name, staticmethod(f)) for name, f in _queue_factories(context).items())
        mixin = type("BigipcProcessesMixin" + method.capitalize(), (cpython_tests.ProcessesMixin,), attrs)
        classes[mixin.__name__] = mixin
        for base_name in BASES:
            base = getattr(cpython_tests, base_name)
            assert "processes" in getattr(base, "ALLOWED_TYPES", ("processes",)), base_name
            name = _class_name(base_name, method)
            guard = BigipcQueuesGuard if base_name in QUEUE_BASES else StartMethodGuard
            body = {
                "start_method": method,
                "cpython_base": base_name,
                "__module__": __name__,
                "__qualname__": name,
            }
            body.update(_skipped(base_name, base))
            cls = type(name, (guard, base, mixin, unittest.TestCase), body)
            classes[name] = cls
    return classes


CLASSES = _make_classes()
TEST_CLASSES = {name: cls for name, cls in CLASSES.items() if issubclass(cls, unittest.TestCase)}
globals().update(CLASSES)
