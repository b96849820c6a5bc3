"""Run the API-level tests once more against the pure-Python core.

bigipc picks its core once, at import (bigipc._backend), so the pure core
cannot be swapped in within this process. When this process runs the
compiled core, tests/test_connection.py, tests/test_cpython_suite.py and
the queue tests (tests/test_queues.py, tests/test_queue_kill.py,
tests/test_queue_noshm.py) are run again in a child pytest with
BIGIPC_PUREPYTHON=1, under a bounded timeout, and must pass there too;
their child processes inherit the variable and run the pure core as well.
(tests/test_core.py covers both cores in one process by itself.)
"""

import os
import re
import signal
import subprocess
import sys

import pytest

import bigipc

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)
FILES = [
    "test_connection.py",
    "test_cpython_suite.py",
    "test_queues.py",
    "test_queue_kill.py",
    "test_queue_noshm.py",
]
# Far above the few minutes the two files take on the pure core.
SUBPROCESS_TIMEOUT = 1500


def _package_root():
    # The directory bigipc was imported from, so the child tests the same copy.
    return os.path.dirname(os.path.dirname(os.path.abspath(bigipc.__file__)))


@pytest.mark.timeout(SUBPROCESS_TIMEOUT + 60)
def test_api_tests_pass_on_the_pure_python_core(request):
    if bigipc.IMPLEMENTATION != "cython":
        pytest.skip("this process already runs the pure-Python core (BIGIPC_PUREPYTHON=1)")
    env = dict(os.environ)
    env["BIGIPC_PUREPYTHON"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        [_package_root()] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    command = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider"]
    markexpr = request.config.getoption("markexpr", default="")
    if markexpr:
        command += ["-m", markexpr]
    command += [os.path.join(TESTS_DIR, name) for name in FILES]
    # A session of its own, so that on timeout the whole tree (pytest and the
    # children its tests started) can be killed.
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(
            "pure-core run did not finish within %d s:\n%s"
            % (SUBPROCESS_TIMEOUT, output.decode("utf-8", "replace")[-6000:])
        )
    text = output.decode("utf-8", "replace")
    summary = text.strip().splitlines()[-1] if text.strip() else ""
    failures = [line for line in text.splitlines() if line.startswith(("FAILED", "ERROR"))]
    assert proc.returncode == 0, "pure-core run failed (exit %d): %s\n%s\n\n%s" % (
        proc.returncode,
        summary,
        "\n".join(failures),
        text[-6000:],
    )
    assert re.search(r"\d+ passed", summary), summary
