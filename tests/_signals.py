"""SIGALRM for tests: a handler that fires after a delay, installed so that
pytest-timeout's own SIGALRM handler and timer survive it."""

import signal
import time
from contextlib import contextmanager


class Interrupted(Exception):
    """What the test signal handlers raise (a KeyboardInterrupt stand-in)."""


def raise_interrupted(signum, frame):
    raise Interrupted()


@contextmanager
def alarm(handler, delay, interval=0.0):
    """Install a SIGALRM handler and fire it after ``delay`` s (then every
    ``interval`` s). pytest-timeout's own SIGALRM handler and timer are
    saved and put back afterwards."""
    old_handler = signal.signal(signal.SIGALRM, handler)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, 0)
    start = time.monotonic()
    try:
        signal.setitimer(signal.ITIMER_REAL, delay, interval)
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay:
            remaining = max(0.001, old_delay - (time.monotonic() - start))
            signal.setitimer(signal.ITIMER_REAL, remaining, old_interval)
