"""Before a run acts on the host: the state directory must take what a run writes there.

A run journals every host change before making it and records its outcome after; a change that
could not be journalled must not be made. So the directory is tried first, before the host lock:
a probe file as large as what one run writes is written, synced and removed, and the files that
only grow (the run log) must have that much room left under the process's file-size limit
(RLIMIT_FSIZE). Read-only, full, over the limit or not a directory: `StateDirUnusable`, one line.
"""
import errno
import os
import resource

from .errors import StateDirUnusable

PROBE_FILE = ".write-probe"
# What one run may add: journal rewrites, one run-log line per VDI, the totals (a few KiB each).
RUN_WRITE_BYTES = 64 * 1024
GROWING_FILES = ("runs.jsonl",)


def require_writable(state_dir):
    """Raise `StateDirUnusable` naming the path and the cause unless a run can write `state_dir`."""
    try:
        if os.path.lexists(state_dir) and not os.path.isdir(state_dir):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        os.makedirs(state_dir, 0o700, exist_ok=True)
        _probe(os.path.join(state_dir, PROBE_FILE))
        _check_room_to_grow(state_dir)
    except OSError as error:
        raise StateDirUnusable("state directory {} cannot be written: {}".format(
            state_dir, error.strerror or error)) from None


def _probe(path):
    try:
        with open(path, "wb") as stream:
            stream.write(bytes(RUN_WRITE_BYTES))
            stream.flush()
            os.fsync(stream.fileno())
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def _check_room_to_grow(state_dir):
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit == resource.RLIM_INFINITY:
        return
    for name in GROWING_FILES:
        try:
            size = os.path.getsize(os.path.join(state_dir, name))
        except FileNotFoundError:
            continue
        if size + RUN_WRITE_BYTES > limit:
            raise OSError(errno.EFBIG, "{} ({} bytes) is near the file-size limit of {} bytes".format(
                name, size, limit))
