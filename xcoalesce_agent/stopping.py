"""A stop asked for while a run may be acting on the host (SIGTERM: `systemctl stop`, an RPM upgrade).

The signal handler only sets a flag. A run notices it between steps: the step under way ends as it
would anyway, its host change undone and dropped from the journal, and no further step begins;
waits for the storage manager's GC end early. Ctrl-C keeps its own path (KeyboardInterrupt).
"""
import threading

REASON = "the agent is stopping"

_REQUESTED = threading.Event()


def request():
    """Ask every run in this process to stop after its current step (safe in a signal handler)."""
    _REQUESTED.set()


def requested():
    return _REQUESTED.is_set()


def sleep(seconds):
    """Sleep, but no longer than until a stop is asked for."""
    _REQUESTED.wait(seconds)
