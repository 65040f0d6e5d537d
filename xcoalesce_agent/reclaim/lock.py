"""The host-wide lock: one run (the daemon's or `--now`) acts on the host at a time."""
import errno
import fcntl
import os

from ..errors import LockHeld

FILE_NAME = "run.lock"


class HostLock(object):
    """`with HostLock(state_dir):` holds an exclusive `flock` on the lock file, without waiting.

    The holder's pid is written into the file so that the error can name it. The kernel drops
    the lock when the process dies, so a crash never leaves it held.
    """

    def __init__(self, state_dir):
        self.path = os.path.join(state_dir, FILE_NAME)
        self._descriptor = None

    def acquire(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _read_pid(descriptor)
            os.close(descriptor)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LockHeld("another run already holds the host lock {}{}".format(
                    self.path, " (pid {})".format(holder) if holder else "")) from None
            raise
        os.ftruncate(descriptor, 0)
        os.write(descriptor, "{}\n".format(os.getpid()).encode("ascii"))
        self._descriptor = descriptor

    def release(self):
        if self._descriptor is not None:
            os.ftruncate(self._descriptor, 0)
            fcntl.flock(self._descriptor, fcntl.LOCK_UN)
            os.close(self._descriptor)
            self._descriptor = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc_info):
        self.release()


def _read_pid(descriptor):
    text = os.pread(descriptor, 32, 0).decode("ascii", "replace").strip()
    return text if text.isdigit() else ""
