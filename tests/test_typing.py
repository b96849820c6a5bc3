"""The core's type stub, ``bigipc/_core.pyi``, matches both cores.

The stub is the one written-down interface of the core (DESIGN.md). These
tests read it with ``ast`` (from the installed package: it ships in the wheel)
and compare it with what the compiled ``bigipc._core`` and the pure-Python
``bigipc._purecore`` really have: every public module constant, every method
and property of each class (``Channel``, ``QueueEnds``), both ways; for each method the parameter names,
kinds (positional or keyword-only) and defaults; for each property whether it
can be set.

How signatures are read from the compiled core: Cython's ``binding=True``
(the Cython 3 default) makes ``inspect.signature`` work on every ``def``
method. ``__init__`` of a ``cdef class`` is a slot wrapper without a
signature, so its parameters come from the signature that
``embedsignature=True`` writes into the class docstring; that rendering puts
the ``*`` of keyword-only parameters in the wrong place, so keyword-only-ness
of ``__init__`` parameters is checked by calling it.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import types
from pathlib import Path
from typing import Any, NamedTuple

import pytest

import bigipc

STUB = Path(bigipc.__file__).with_name("_core.pyi")


class Param(NamedTuple):
    name: str
    kind: str  # "positional" (positional or keyword), "keyword", "*args", "**kwargs"
    default: Any  # NO_DEFAULT when there is none


class _NoDefault:
    def __repr__(self) -> str:
        return "<no default>"


NO_DEFAULT: Any = _NoDefault()

_KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: "positional-only",
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
    inspect.Parameter.VAR_POSITIONAL: "*args",
    inspect.Parameter.KEYWORD_ONLY: "keyword",
    inspect.Parameter.VAR_KEYWORD: "**kwargs",
}


class ClassStub(NamedTuple):
    methods: dict[str, tuple[Param, ...]]  # name -> parameters after self
    properties: dict[str, bool]  # name -> settable


class Stub(NamedTuple):
    constants: frozenset[str]
    classes: dict[str, ClassStub]

    @property
    def channel(self) -> ClassStub:
        return self.classes["Channel"]


def _stub_params(function: ast.FunctionDef) -> tuple[Param, ...]:
    args = function.args
    positional = args.posonlyargs + args.args
    defaults = [NO_DEFAULT] * (len(positional) - len(args.defaults)) + [
        ast.literal_eval(d) for d in args.defaults
    ]
    params = [
        Param(a.arg, "positional-only" if a in args.posonlyargs else "positional", d)
        for a, d in zip(positional, defaults)
    ]
    if args.vararg:
        params.append(Param(args.vararg.arg, "*args", NO_DEFAULT))
    for a, d in zip(args.kwonlyargs, args.kw_defaults):
        params.append(Param(a.arg, "keyword", NO_DEFAULT if d is None else ast.literal_eval(d)))
    if args.kwarg:
        params.append(Param(args.kwarg.arg, "**kwargs", NO_DEFAULT))
    assert params and params[0].name == "self", function.name
    return tuple(params[1:])


def _is_type_alias(node: ast.stmt) -> bool:
    """``Name: TypeAlias = ...``: a name for type checkers only."""
    return (
        isinstance(node, ast.AnnAssign)
        and isinstance(node.annotation, ast.Name)
        and node.annotation.id == "TypeAlias"
    )


def read_stub() -> Stub:
    tree = ast.parse(STUB.read_text(encoding="utf-8"), str(STUB))
    constants = set()
    classes: dict[str, ClassStub] = {}
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and not _is_type_alias(node):
            constants.add(node.target.id)
        elif isinstance(node, ast.Assign):  # an untyped alias would hide from this test
            raise AssertionError("%s:%d: give module names an annotation" % (STUB.name, node.lineno))
        elif isinstance(node, ast.ClassDef):
            classes[node.name] = _read_class(node)
    assert "Channel" in classes
    return Stub(frozenset(c for c in constants if not c.startswith("_")), classes)


def _read_class(node: ast.ClassDef) -> ClassStub:
    methods: dict[str, tuple[Param, ...]] = {}
    properties: dict[str, bool] = {}
    for item in node.body:
        if not isinstance(item, ast.FunctionDef):
            continue
        decorators = [ast.unparse(d) for d in item.decorator_list]
        if decorators == ["property"]:
            properties[item.name] = False
        elif decorators == ["%s.setter" % item.name]:
            properties[item.name] = True
        else:
            assert not decorators, "%s: unexpected decorators %s" % (item.name, decorators)
            methods[item.name] = _stub_params(item)
    return ClassStub(methods, properties)


def _runtime_params(function: Any) -> tuple[Param, ...]:
    signature = inspect.signature(function)
    params = [
        Param(
            p.name,
            _KINDS[p.kind],
            NO_DEFAULT if p.default is inspect.Parameter.empty else p.default,
        )
        for p in signature.parameters.values()
    ]
    assert params and params[0].name == "self"
    return tuple(params[1:])


def _embedded_init_params(cls: type) -> tuple[Param, ...]:
    """Parameters of ``cls.__init__`` from Cython's embedded signature.

    The C-style rendering reads ``Channel(int fd, bool readable=True, ...,
    max_message_size=None, *)``: names, C types and defaults, with the ``*``
    misplaced, so every parameter is reported as "positional" here and
    keyword-only ones are checked by calling.
    """
    first_line = (cls.__doc__ or "").splitlines()[0] if cls.__doc__ else ""
    match = re.fullmatch(r"%s\((.*)\)" % cls.__name__, first_line.strip())
    assert match, "no embedded signature in %s.__doc__: %r" % (cls.__name__, first_line)
    params = []
    for text in match.group(1).split(","):
        text = text.strip()
        if not text or text == "*":
            continue
        declaration, _, default = text.partition("=")
        name = declaration.split()[-1].lstrip("*")
        params.append(Param(name, "positional", ast.literal_eval(default) if default else NO_DEFAULT))
    return tuple(params)


def _positional_view(params: tuple[Param, ...]) -> tuple[Param, ...]:
    return tuple(p._replace(kind="positional") if p.kind == "keyword" else p for p in params)


def _core_module(name: str) -> types.ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if name == "bigipc._core" and os.environ.get("BIGIPC_PUREPYTHON", "") not in ("", "0"):
            pytest.skip("BIGIPC_PUREPYTHON=1: compiled core not required (%s)" % exc)
        raise


def _own_public_names(module: types.ModuleType) -> set[str]:
    """Public classes and functions defined in ``module`` (not imported into it)."""
    names = set(getattr(module, "__all__", ()))
    for name, value in vars(module).items():
        if name.startswith("_"):
            continue
        if isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType)) and (
            getattr(value, "__module__", None) == module.__name__
        ):
            names.add(name)
    return names


def _public_members(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def interface_differences(module: types.ModuleType) -> set[str]:
    """Every way ``module`` differs from the stub, one line each; names
    missing from the module are the bare (dotted) name."""
    stub = read_stub()
    problems: set[str] = set()
    for name in stub.constants | set(stub.classes):
        if not hasattr(module, name):
            problems.add(name)
    for name in _own_public_names(module) - stub.constants - set(stub.classes):
        problems.add("%s: not in the stub" % name)
    for class_name, declared in stub.classes.items():
        cls = getattr(module, class_name, None)
        if cls is not None:
            problems |= _class_differences(class_name, cls, declared)
    return problems


def _class_differences(class_name: str, cls: type, stub: ClassStub) -> set[str]:
    problems: set[str] = set()
    compiled = not isinstance(cls.__init__, types.FunctionType)
    declared = set(stub.methods) | set(stub.properties)
    for name in _public_members(cls) - declared:
        problems.add("%s.%s: not in the stub" % (class_name, name))
    for name, params in stub.methods.items():
        if name != "__init__" and not callable(getattr(cls, name, None)):
            problems.add("%s.%s" % (class_name, name))
            continue
        if name == "__init__" and compiled:
            actual = _embedded_init_params(cls)
            params = _positional_view(params)
        else:
            actual = _runtime_params(getattr(cls, name))
        if actual != params:
            problems.add("%s.%s%s: the stub says %s" % (class_name, name, actual, params))
    for name in stub.properties:
        if name not in dir(cls):
            problems.add("%s.%s" % (class_name, name))
        elif callable(getattr(cls, name)):
            problems.add("%s.%s: a method, the stub says a property" % (class_name, name))
    return problems


@pytest.fixture
def pipe_channel(request: pytest.FixtureRequest) -> Any:
    """A factory: ``make(module)`` gives a Channel on a fresh pipe's read end."""
    made = []

    def make(module: types.ModuleType) -> Any:
        read_fd, write_fd = os.pipe()
        os.close(write_fd)
        try:
            channel = module.Channel(read_fd, True, False)
        except BaseException:
            os.close(read_fd)
            raise
        made.append(channel)
        return channel

    yield make
    for channel in made:
        channel.close()


def test_stub_parses_and_declares_the_interface() -> None:
    stub = read_stub()
    assert {"LONG_HEADER", "MULTIPART_HEADER", "MAX_SHORT_LENGTH", "MAX_PARTS"} <= stub.constants
    channel = stub.channel
    assert {"__init__", "send_bytes", "recv_bytes", "recv_bytes_into", "poll"} <= set(channel.methods)
    assert "close" in channel.methods
    assert channel.properties["max_message_size"] is True
    assert channel.properties["closed"] is False
    assert {"__init__", "add", "send_inline", "recv"} <= set(stub.classes["QueueEnds"].methods)


def test_stub_matches_compiled_core() -> None:
    module = _core_module("bigipc._core")
    assert interface_differences(module) == set()


def test_stub_matches_pure_core() -> None:
    module = _core_module("bigipc._purecore")
    assert interface_differences(module) == set()


@pytest.mark.parametrize("name", ["bigipc._core", "bigipc._purecore"])
def test_property_setters_match_stub(name: str, pipe_channel: Any) -> None:
    """A property the stub gives a setter can be set; the others cannot."""
    channel = pipe_channel(_core_module(name))
    for prop, settable in read_stub().channel.properties.items():
        value = getattr(channel, prop)
        if settable:
            setattr(channel, prop, value)
            assert getattr(channel, prop) == value
        else:
            with pytest.raises(AttributeError):
                setattr(channel, prop, value)


@pytest.mark.parametrize("name", ["bigipc._core", "bigipc._purecore"])
def test_init_keyword_only_parameters(name: str) -> None:
    """``__init__``'s keyword-only parameters in the stub are keyword-only in
    the core: passing one more positional argument is a TypeError."""
    module = _core_module(name)
    params = read_stub().channel.methods["__init__"]
    positional = [p for p in params if p.kind == "positional"]
    keyword = [p for p in params if p.kind == "keyword"]
    assert keyword, "the stub's __init__ has keyword-only parameters"
    read_fd, write_fd = os.pipe()
    try:
        args: list[Any] = [read_fd, True, False][: len(positional)]
        with pytest.raises(TypeError):
            module.Channel(*args, *[p.default for p in keyword])
        channel = module.Channel(*args, **{p.name: p.default for p in keyword})
        channel.detach()
    finally:
        os.close(read_fd)
        os.close(write_fd)
