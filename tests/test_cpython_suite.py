"""CPython's own tests of Connection objects and queues, run against
bigipc.Pipe and bigipc's Queue, JoinableQueue and SimpleQueue.

_TestConnection, _TestPoll, _TestPicklingConnections, _TestQueue and
TestSimpleQueue from test._test_multiprocessing (the copy installed with
the running Python), for the 'processes' type, under the fork, spawn and
forkserver start methods. The classes are generated in
tests/_cpython_cases.py (see there why, and for the queue tests that are
skipped and why) and collected here by pytest as ordinary
unittest.TestCase classes. The functions at the end check that the
generated classes really use bigipc's objects and the start method they
are named after.
"""

import multiprocessing
import multiprocessing.context
import os
import sys
import unittest

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _children

_children.make_importable_in_children()

import _cpython_cases  # noqa: E402

import bigipc  # noqa: E402

if _cpython_cases.SKIP_REASON:
    pytest.skip(_cpython_cases.SKIP_REASON, allow_module_level=True)

pytestmark = pytest.mark.timeout(120)

LONG = 30.0

# Each CPython queue test takes well under a second on bigipc's queues
# (a whole class about three seconds); a hang fails the test, not the run.
QUEUE_TEST_TIMEOUT = 30

# What pytest collects: the generated unittest.TestCase classes (and only
# under their own names: pytest collects any TestCase class it finds).
for _cls in _cpython_cases.TEST_CLASSES.values():
    if _cls.cpython_base in _cpython_cases.QUEUE_BASES:
        pytest.mark.timeout(QUEUE_TEST_TIMEOUT)(_cls)
del _cls
globals().update(_cpython_cases.TEST_CLASSES)


@pytest.fixture(autouse=True)
def _in_a_scratch_directory(tmp_path, monkeypatch):
    # The fd-transfer tests write os_helper.TESTFN into the current directory.
    monkeypatch.chdir(tmp_path)


def _cases():
    return sorted(_cpython_cases.TEST_CLASSES.items())


def test_every_class_and_start_method_was_generated():
    expected = {
        _cpython_cases._class_name(base, method)
        for base in _cpython_cases.BASES
        for method in _cpython_cases.START_METHODS
    }
    assert set(_cpython_cases.TEST_CLASSES) == expected
    assert set(_cpython_cases.START_METHODS) == {"fork", "spawn", "forkserver"} & set(
        multiprocessing.get_all_start_methods()
    )
    collected = globals()
    for name, cls in _cpython_cases.TEST_CLASSES.items():
        assert collected[name] is cls
        assert issubclass(cls, unittest.TestCase)
        assert cls.TYPE == "processes"
        assert cls.__module__ == "_cpython_cases"
        tests = unittest.defaultTestLoader.getTestCaseNames(cls)
        assert tests, name
        base = getattr(_cpython_cases.cpython_tests, cls.cpython_base)
        assert base in cls.__mro__
        assert set(tests) == {n for n in dir(base) if n.startswith("test")}


@pytest.mark.parametrize("name,cls", _cases(), ids=[n for n, _ in _cases()])
def test_generated_class_pipe_is_bigipc(name, cls):
    case = cls(unittest.defaultTestLoader.getTestCaseNames(cls)[0])
    for duplex in (True, False):
        a, b = case.Pipe(duplex=duplex)
        try:
            assert type(a) is bigipc.Connection and type(b) is bigipc.Connection
            assert (a.readable, a.writable, b.readable, b.writable) == (
                (True, True, True, True) if duplex else (True, False, False, True)
            )
        finally:
            a.close()
            b.close()
    a, b = case.Pipe()
    with a, b:
        assert type(a) is bigipc.Connection


def test_cpython_test_runs_on_bigipc_connections(monkeypatch):
    # Run one of CPython's tests through unittest with a Pipe that records
    # what it hands out: the test passes, and on bigipc objects.
    cls = _cpython_cases.TEST_CLASSES[_cpython_cases._class_name("_TestConnection", "fork")]
    made = []

    def recording_pipe(duplex=True):
        pair = bigipc.Pipe(duplex)
        made.extend(pair)
        return pair

    monkeypatch.setattr(cls, "Pipe", staticmethod(recording_pipe))
    suite = unittest.TestSuite([cls("test_duplex_false"), cls("test_sendbytes"), cls("test_context")])
    result = unittest.TestResult()
    cls.setUpClass()
    try:
        suite.run(result)
    finally:
        cls.tearDownClass()
    assert result.wasSuccessful(), result.errors + result.failures
    assert result.testsRun == 3
    assert len(made) == 6 and all(type(c) is bigipc.Connection for c in made)


@pytest.mark.parametrize("method", _cpython_cases.START_METHODS)
def test_generated_class_uses_its_start_method(method):
    # fork copies a module attribute set at run time, spawn and forkserver
    # start from a fresh interpreter; forkserver children are not children of
    # this process but of the server.
    cls = _cpython_cases.TEST_CLASSES[_cpython_cases._class_name("_TestPoll", method)]
    before = multiprocessing.get_start_method(allow_none=True)
    cls.setUpClass()
    try:
        assert multiprocessing.get_start_method() == method
        _children.RUNTIME_MARKER = "set in the parent at run time"
        reader, writer = cls.Pipe(duplex=False)
        with reader, writer:
            proc = cls.Process(target=_children.start_method_probe, args=(writer,))
            proc.daemon = True
            proc.start()
            writer.close()
            try:
                report = reader.recv(timeout=LONG)
            finally:
                proc.join(LONG)
            assert proc.exitcode == 0
    finally:
        del _children.RUNTIME_MARKER
        cls.tearDownClass()
    assert multiprocessing.get_start_method(allow_none=True) == before
    assert report["start_method"] == method
    if method == "fork":
        assert report["marker"] == "set in the parent at run time"
        assert report["ppid"] == os.getpid()
    elif method == "spawn":
        assert report["marker"] is None
        assert report["ppid"] == os.getpid()
    else:
        assert report["marker"] is None
        assert report["ppid"] != os.getpid()


# --------------------------------------------------------------------------
# the queue classes


def _queue_cases():
    return sorted(
        (n, c) for n, c in _cpython_cases.TEST_CLASSES.items() if c.cpython_base in _cpython_cases.QUEUE_BASES
    )


def _stdlib_queue_names():
    """What the names patch_stdlib_queues() replaces are right now."""
    names = {"close_queue": _cpython_cases.cpython_tests.close_queue}
    for name in _cpython_cases.QUEUE_NAMES:
        names["multiprocessing." + name] = getattr(multiprocessing, name)
        names["BaseContext." + name] = multiprocessing.context.BaseContext.__dict__[name]
    return names


def _run(cls, test_names):
    """Run tests of a generated class through unittest, as pytest would."""
    result = unittest.TestResult()
    cls.setUpClass()
    try:
        unittest.TestSuite([cls(n) for n in test_names]).run(result)
    finally:
        cls.tearDownClass()
    return result


@pytest.mark.parametrize("name,cls", _queue_cases(), ids=[n for n, _ in _queue_cases()])
def test_generated_class_queues_are_bigipc(name, cls):
    case = cls(unittest.defaultTestLoader.getTestCaseNames(cls)[0])
    made = [case.Queue(maxsize=3), case.JoinableQueue(2), case.SimpleQueue(), case.Queue()]
    try:
        types = [bigipc.Queue, bigipc.JoinableQueue, bigipc.SimpleQueue, bigipc.Queue]
        assert [type(q) for q in made] == types
        assert [q.maxsize for q in made] == [3, 2, 0, 0]
    finally:
        for q in made:
            q.close()
    assert cls.TYPE == "processes"
    assert [m.name for m in cls.pytestmark] == ["timeout"]


def test_stdlib_queue_names_make_bigipc_queues_while_patched():
    originals = _stdlib_queue_names()
    assert originals == _cpython_cases.ORIGINALS
    undo = _cpython_cases.patch_stdlib_queues()
    made = []
    try:
        made += [multiprocessing.Queue(), multiprocessing.Queue(maxsize=4), multiprocessing.JoinableQueue(5)]
        made.append(multiprocessing.SimpleQueue())
        for method in _cpython_cases.START_METHODS:
            ctx = multiprocessing.get_context(method)
            made += [ctx.Queue(2), ctx.JoinableQueue(maxsize=1), ctx.SimpleQueue()]
        per_context = [bigipc.Queue, bigipc.JoinableQueue, bigipc.SimpleQueue]
        expected = [bigipc.Queue, bigipc.Queue, bigipc.JoinableQueue, bigipc.SimpleQueue]
        expected += per_context * len(_cpython_cases.START_METHODS)
        assert [type(q) for q in made] == expected
        assert [q.maxsize for q in made[:4]] == [0, 4, 5, 0]
        q = made[0]
        _cpython_cases.cpython_tests.close_queue(q)
        with pytest.raises(ValueError, match="is closed"):
            q.put(1)
    finally:
        undo()
        for q in made:
            q.close()
    assert _stdlib_queue_names() == originals
    q = multiprocessing.Queue()
    assert type(q) is multiprocessing.queues.Queue
    q.close()


def test_cpython_queue_tests_run_on_bigipc_queues(monkeypatch):
    # Run some of CPython's queue tests through unittest and record every
    # queue they make: all are bigipc's, including those the tests make with
    # multiprocessing.Queue() (directly or in a module they import), and
    # close_queue closes them. Afterwards the stdlib names are the stdlib's.
    originals = _stdlib_queue_names()
    made = []
    monkeypatch.setattr(_cpython_cases, "made_queues", made)
    fork = _cpython_cases.START_METHODS[0]
    queue_tests = _cpython_cases.TEST_CLASSES[_cpython_cases._class_name("_TestQueue", fork)]
    simple_tests = _cpython_cases.TEST_CLASSES[_cpython_cases._class_name("TestSimpleQueue", fork)]
    expected = {
        (queue_tests, "test_qsize"): [bigipc.Queue],
        (queue_tests, "test_timeout"): [bigipc.Queue],
        (queue_tests, "test_no_import_lock_contention"): [bigipc.Queue],
        (queue_tests, "test_closed_queue_put_get_exceptions"): [bigipc.Queue, bigipc.JoinableQueue],
        (simple_tests, "test_close"): [bigipc.SimpleQueue],
    }
    for (cls, test_name), types in expected.items():
        for _ in range(2):  # the second run makes its queues anew too
            del made[:]
            result = _run(cls, [test_name])
            assert result.wasSuccessful(), (test_name, result.errors + result.failures)
            assert result.testsRun == 1 and not result.skipped, test_name
            assert [type(q) for q in made] == types, test_name
            if test_name in ("test_qsize", "test_timeout"):
                # close_queue(q) at the end of the test closed the bigipc queue.
                with pytest.raises(ValueError, match="is closed"):
                    made[0].put(1)
            assert _stdlib_queue_names() == originals
    for q in made:
        q.close()


def test_queue_skip_list():
    # Every entry names a test CPython has, and the generated classes skip
    # exactly those, with the reason; every other queue test runs.
    for (base_name, test_name), reason in _cpython_cases.QUEUE_SKIPS.items():
        assert base_name in _cpython_cases.QUEUE_BASES
        assert hasattr(getattr(_cpython_cases.cpython_tests, base_name), test_name)
        assert reason
    for name, cls in _queue_cases():
        skipped = {
            test_name: getattr(cls, test_name).__unittest_skip_why__
            for test_name in unittest.defaultTestLoader.getTestCaseNames(cls)
            if getattr(getattr(cls, test_name), "__unittest_skip__", False)
        }
        assert skipped == {
            test_name: reason
            for (base_name, test_name), reason in _cpython_cases.QUEUE_SKIPS.items()
            if base_name == cls.cpython_base
        }, name
        result = _run(cls, sorted(skipped))
        assert sorted(reason for _, reason in result.skipped) == sorted(skipped.values())
        assert result.wasSuccessful() and result.testsRun == len(skipped)
