"""The installed distribution: one version, typing markers shipped.

The version lives in ``bigipc/_version.py`` alone; ``pyproject.toml`` reads
it from there (``[tool.setuptools.dynamic]``), so the metadata pip records
and ``bigipc.__version__`` cannot disagree.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from pathlib import Path

import pytest

import bigipc

PACKAGE = Path(bigipc.__file__).resolve().parent
# PEP 440, public versions (what a release may carry).
_PEP440 = re.compile(
    r"^([1-9][0-9]*!)?(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*((a|b|rc)(0|[1-9][0-9]*))?"
    r"(\.post(0|[1-9][0-9]*))?(\.dev(0|[1-9][0-9]*))?$"
)


def _installed_distribution() -> importlib.metadata.Distribution:
    """The distribution that provided the imported bigipc; skip when bigipc
    is imported from a source tree instead."""
    try:
        dist = importlib.metadata.distribution("bigipc")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("bigipc is not installed (imported from %s)" % PACKAGE)
    located = Path(str(dist.locate_file("bigipc/__init__.py"))).resolve()
    if located != PACKAGE / "__init__.py":
        pytest.skip("the imported bigipc (%s) is not the installed one (%s)" % (PACKAGE, located.parent))
    return dist


def test_version_is_pep440() -> None:
    assert _PEP440.match(bigipc.__version__), bigipc.__version__


def test_version_matches_installed_metadata() -> None:
    dist = _installed_distribution()
    assert bigipc.__version__ == dist.version == importlib.metadata.version("bigipc")


def test_version_defined_once() -> None:
    """Only _version.py assigns __version__; the rest import it."""
    assigning = sorted(
        path.name
        for path in PACKAGE.glob("*.py")
        if re.search(r"^__version__\s*=", path.read_text(encoding="utf-8"), re.MULTILINE)
    )
    assert assigning == ["_version.py"]


def test_pyproject_reads_version_from_package() -> None:
    pyproject = PACKAGE.parent / "pyproject.toml"
    if not pyproject.is_file():
        # An installed package: pyproject.toml stays in the sdist or checkout.
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("no pyproject.toml next to the tests")
    text = pyproject.read_text(encoding="utf-8")
    assert re.search(r'^dynamic\s*=\s*\[[^]]*"version"', text, re.MULTILINE)
    assert re.search(
        r'^version\s*=\s*\{\s*attr\s*=\s*"bigipc\._version\.__version__"\s*\}', text, re.MULTILINE
    )
    assert not re.search(r'^version\s*=\s*"', text, re.MULTILINE), "a literal version in pyproject.toml"


def test_typing_markers_installed() -> None:
    """py.typed and the compiled core's stub ship with the package."""
    assert (PACKAGE / "py.typed").is_file()
    assert (PACKAGE / "_core.pyi").is_file()


def test_no_sources_in_installed_package() -> None:
    """An installed bigipc holds no generated C or Cython sources."""
    dist = _installed_distribution()
    files = [str(f) for f in dist.files or ()]
    stray = [f for f in files if f.endswith((".c", ".pyx", ".pxi", ".pxd"))]
    assert not stray, stray
    assert os.path.basename(bigipc.__file__) == "__init__.py"
