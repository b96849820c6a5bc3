"""bigipc's queues where /dev/shm cannot be used.

``multiprocessing.Queue`` needs a named semaphore, which lives in /dev/shm;
where that is read-only (some containers, AWS Lambda) the stdlib queues
cannot even be created. bigipc's queues use a socket pair, pipes and a
memfd only. Each test here runs a child Python inside a private user and
mount namespace whose /dev/shm is a read-only tmpfs, and there:

* checks that /dev/shm really refuses writes and that the stdlib's
  ``Queue``, ``SimpleQueue`` and ``JoinableQueue`` fail with ``OSError``
  (the environment bites);
* runs two producers and two consumers (started with the method under
  test) through a ``Queue``, a bounded ``Queue(maxsize=3)``, a
  ``SimpleQueue`` and a ``JoinableQueue``, with items from a few bytes to a
  2 MiB ``bytes`` and a 3 MiB numpy array, every item accounted for
  exactly once and checked, ``qsize()``, ``empty()``, ``full()`` and
  ``join()`` observed; then a 64 MiB array through each queue in the
  parent.

The child code is ``_queue_children.noshm_main``; it prints a JSON report
that the test asserts on. The child imports bigipc from wherever this
process imported it (the tree under test or an installed wheel) and keeps
``BIGIPC_PUREPYTHON``, so tests/test_both_cores.py can re-run this file on
the pure-Python core.
"""

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys

import pytest

import bigipc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _queue_children

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
# Bound for one run in the namespace (it takes a few seconds).
RUN_TIMEOUT = 240
START_METHODS = [m for m in ("fork", "spawn", "forkserver") if m in multiprocessing.get_all_start_methods()]
KINDS = ["Queue", "bounded", "SimpleQueue", "JoinableQueue"]

pytestmark = pytest.mark.timeout(RUN_TIMEOUT + 60)

# Mount a read-only tmpfs over /dev/shm in a new mount namespace (entered
# as root of a new user namespace, so no privileges are needed), then run
# the given command there.
_NAMESPACE = ["unshare", "--user", "--map-root-user", "--mount"]
_SHADOW_SHM = 'mount -t tmpfs -o ro none /dev/shm && exec "$@"'


def _in_namespace(argv):
    return [*_NAMESPACE, "sh", "-c", _SHADOW_SHM, "sh", *argv]


def _child_env():
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(bigipc.__file__)))
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([package_root, TESTS_DIR, *rest])
    return env


def _run(argv, timeout):
    """(exit code, stdout, stderr) of ``argv`` in a session of its own; the
    whole session is killed if it outlives ``timeout``."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_child_env(),
        cwd=TESTS_DIR,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(
            "%r did not finish within %d s\nstdout:\n%s\nstderr:\n%s"
            % (argv, timeout, out.decode(errors="replace")[-4000:], err.decode(errors="replace")[-8000:])
        )
    finally:
        if proc.poll() is None:  # pragma: no cover - an exception above
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


_namespace_checked = {}


def _require_namespace():
    """Skip (with the reason) where the namespace cannot be made."""
    if "reason" not in _namespace_checked:
        reason = None
        if not sys.platform.startswith("linux"):
            reason = "mount namespaces are Linux only"
        elif shutil.which("unshare") is None:
            reason = "no unshare(1) on this system"
        else:
            code, _, err = _run(_in_namespace(["true"]), 60)
            if code != 0:
                reason = "cannot mount a read-only /dev/shm in a user+mount namespace here: %s" % (
                    err.strip() or "exit code %d" % code
                )
        _namespace_checked["reason"] = reason
    if _namespace_checked["reason"]:
        pytest.skip(_namespace_checked["reason"])


@pytest.mark.parametrize("method", START_METHODS)
def test_queues_work_without_dev_shm(method):
    _require_namespace()
    script = "import _queue_children as c; c.noshm_main(%r)" % method
    code, out, err = _run(_in_namespace([sys.executable, "-c", script]), RUN_TIMEOUT)
    assert code == 0, "the run in the namespace failed (exit %d):\n%s\n%s" % (code, out[-4000:], err[-8000:])
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, "no report from the run in the namespace:\n%s\n%s" % (out, err[-8000:])
    report = json.loads(lines[-1])

    # The environment bites: nothing can be created in /dev/shm, and the
    # stdlib's queues fail for that reason.
    assert report["dev_shm"] in ("EROFS", "EACCES", "EPERM"), report["dev_shm"]
    for name in ("Queue", "SimpleQueue", "JoinableQueue"):
        assert report["stdlib"][name].startswith("OSError"), (name, report["stdlib"][name])
    if "skip" in report:
        pytest.skip(report["skip"])
    # The core in the namespace is the one this process runs.
    assert report["implementation"] == bigipc.IMPLEMENTATION

    cases = {case["kind"]: case for case in report["cases"]}
    assert sorted(cases) == sorted(KINDS)
    total = 2 * _queue_children.FIXED_COUNT
    for kind, case in cases.items():
        where = "%s under %s" % (kind, method)
        assert case["exitcodes"] == [0, 0, 0, 0], where
        assert case["errors"] == [], where
        assert case["missing"] == [], where
        assert case["unexpected"] == [], where
        assert case["duplicates"] == [], where
        assert case["received"] == total, where
        assert case["qsize_drained"] == 0, where
        assert case["empty_drained"] is True, where
        assert case["roundtrip"] == [None, None], where
        assert case["child_implementations"] == [bigipc.IMPLEMENTATION], where
    # With everything put and nothing taken, qsize() counts every item.
    for kind in ("Queue", "JoinableQueue"):
        assert cases[kind]["qsize_all_put"] == total, cases[kind]
        assert cases[kind]["empty_all_put"] is False, cases[kind]
    assert cases["bounded"]["qsize_full"] == 3
    assert cases["bounded"]["full"] is True
    assert cases["JoinableQueue"]["join"] == "returned"
    print(
        "\nno /dev/shm [%s, %s core]: stdlib Queue -> %s; bigipc: %s, %d items each, all delivered"
        % (method, report["implementation"], report["stdlib"]["Queue"], ", ".join(KINDS), total)
    )
