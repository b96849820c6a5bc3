"""Build the one extension, bigipc._core, from src/.

Environment:
    BIGIPC_DEBUG=1      assertions, line tracing and an annotated HTML listing
    BIGIPC_SANITIZE=1   AddressSanitizer + UndefinedBehaviorSanitizer
    BIGIPC_PUREPYTHON=1 skip the extension (the package runs on its pure core)

A failed compile does not fail the install: bigipc then runs on its
pure-Python core and warns at import.
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _flag(name):
    return os.environ.get(name, "") not in ("", "0")


DEBUG = _flag("BIGIPC_DEBUG")
SANITIZE = _flag("BIGIPC_SANITIZE")

# The kind of build. A build of another kind in the same tree must not reuse
# what the last one left in build/: cythonize keeps a generated .c that is
# newer than the .pyx, and setuptools skips an extension whose .so is newer
# than its sources, so a plain build after a sanitizer build would ship the
# ASan-linked core (which then fails to import). A changed kind forces both.
BUILD_KIND = "debug=%d sanitize=%d" % (DEBUG, SANITIZE)
_BUILD_KIND_STAMP = os.path.join("build", "bigipc-build-kind.txt")


def _build_kind_changed():
    try:
        with open(_BUILD_KIND_STAMP) as f:
            return f.read() != BUILD_KIND
    except OSError:
        return True


BUILD_KIND_CHANGED = _build_kind_changed()

# Compiler directives live here and nowhere else.
DIRECTIVES = {
    "language_level": 3,
    "embedsignature": True,
    "auto_pickle": False,
    "boundscheck": DEBUG,
    "wraparound": False,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "linetrace": DEBUG,
    "profile": False,
}


class OptionalBuildExt(build_ext):
    """Let the install succeed without a working compiler."""

    def run(self):
        if BUILD_KIND_CHANGED:
            self.force = True
        try:
            super().run()
        except Exception as exc:  # no compiler, no headers, ...
            self._skip(exc)
            return
        os.makedirs(os.path.dirname(_BUILD_KIND_STAMP), exist_ok=True)
        with open(_BUILD_KIND_STAMP, "w") as f:
            f.write(BUILD_KIND)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._skip(exc)

    def _skip(self, exc):
        if _flag("BIGIPC_REQUIRE_EXTENSION"):
            raise exc
        sys.stderr.write(
            "WARNING: bigipc._core could not be compiled (%s); "
            "bigipc will run on its pure-Python core.\n" % (exc,)
        )


def extensions():
    if _flag("BIGIPC_PUREPYTHON") or sys.platform == "win32":
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        if _flag("BIGIPC_REQUIRE_EXTENSION"):
            raise
        sys.stderr.write("WARNING: Cython not found; building without bigipc._core\n")
        return []
    cflags = ["-Wall", "-Wno-unused-function"]
    ldflags = []
    macros = []
    if DEBUG:
        cflags += ["-O0", "-g3", "-UNDEBUG"]
        macros += [("CYTHON_TRACE_NOGIL", "1"), ("CYTHON_TRACE", "1")]
    else:
        cflags += ["-O2"]
    if SANITIZE:
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
        cflags += [*san, "-g", "-O1"]
        ldflags += san
    ext = Extension(
        "bigipc._core",
        sources=["src/_core.pyx"],
        depends=[os.path.join("src", name) for name in os.listdir("src") if name.endswith(".pxi")],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
        define_macros=macros,
    )
    return cythonize(
        [ext],
        compiler_directives=DIRECTIVES,
        annotate=DEBUG,
        build_dir="build/cython",
        force=DEBUG or SANITIZE or BUILD_KIND_CHANGED,
    )


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
