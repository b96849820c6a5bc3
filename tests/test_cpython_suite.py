"""CPython's own tests of Connection objects, run against bigipc.Pipe.

_TestConnection, _TestPoll and _TestPicklingConnections from
test._test_multiprocessing (the copy installed with the running Python),
for the 'processes' type, under the fork, spawn and forkserver start
methods. The classes are generated in tests/_cpython_cases.py (see there
why) and collected here by pytest as ordinary unittest.TestCase classes.
The functions at the end check that the generated classes really use
bigipc's Pipe and the start method they are named after.
"""

import multiprocessing
import os
import sys
import unittest

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _children  # noqa: E402

_children.make_importable_in_children()

import _cpython_cases  # noqa: E402

import bigipc  # noqa: E402

if _cpython_cases.SKIP_REASON:
    pytest.skip(_cpython_cases.SKIP_REASON, allow_module_level=True)

pytestmark = pytest.mark.timeout(120)

LONG = 30.0

# What pytest collects: the generated unittest.TestCase classes.
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
        base = next(b for b in cls.__mro__ if b.__name__ in _cpython_cases.BASES)
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
