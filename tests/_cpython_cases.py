"""CPython's own Connection tests (test._test_multiprocessing), on bigipc.Pipe.

The test classes are built the way CPython's ``install_tests_in_module_dict``
builds them (base class + ProcessesMixin + unittest.TestCase), with a mixin
whose ``Pipe`` is ``bigipc.Pipe``, once per start method.

They live in this plain module, not in the pytest test file, because the
children those tests start under spawn and forkserver unpickle their target
(a classmethod of the generated class) by module and class name: the module
must be importable by name in a fresh interpreter, which a test file
imported by pytest's importlib mode is not. tests/test_cpython_suite.py puts
this directory on sys.path and PYTHONPATH and re-exports the classes so that
pytest collects them.
"""

import multiprocessing
import unittest

import bigipc

# The classes taken from CPython, with the reason for any that is left out.
BASES = ("_TestConnection", "_TestPoll", "_TestPicklingConnections")
START_METHODS = tuple(m for m in ("fork", "spawn", "forkserver") if m in multiprocessing.get_all_start_methods())

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


def _class_name(base_name, method):
    # As install_tests_in_module_dict: "_TestConnection" -> "WithProcessesTestConnection",
    # plus the start method.
    return "WithProcesses%sOn%s" % (base_name[1:], method.capitalize())


def _make_classes():
    classes = {}
    if cpython_tests is None:
        return classes
    for method in START_METHODS:
        context = multiprocessing.get_context(method)
        mixin = type(
            "BigipcProcessesMixin" + method.capitalize(),
            (cpython_tests.ProcessesMixin,),
            {
                "Pipe": staticmethod(bigipc_pipe),
                # The context's Process class: the start method applies even
                # if something changes the global one meanwhile.
                "Process": context.Process,
                "__module__": __name__,
            },
        )
        classes[mixin.__name__] = mixin
        for base_name in BASES:
            base = getattr(cpython_tests, base_name)
            assert "processes" in base.ALLOWED_TYPES, base_name
            name = _class_name(base_name, method)
            cls = type(
                name,
                (StartMethodGuard, base, mixin, unittest.TestCase),
                {"start_method": method, "__module__": __name__, "__qualname__": name},
            )
            classes[name] = cls
    return classes


CLASSES = _make_classes()
TEST_CLASSES = {name: cls for name, cls in CLASSES.items() if issubclass(cls, unittest.TestCase)}
globals().update(CLASSES)
