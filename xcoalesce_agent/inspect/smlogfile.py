"""Follows `/var/log/SMlog` (`[storage] smlog_path`) across inspections: only the bytes written since
the last one are read, into the GC's account (smlog.py).

Where it stopped (inode, offset) and what it has read so far are kept in `<state_dir>/smlog.json`, so
that they survive a restart and `--report` and the service share them. A new inode is a rotation:
the rest of the old file is read once from `SMlog.1` (never the `.gz` ones), then the new file from
its start; a file shorter than the offset was truncated and is read from its start. Time and memory
are bounded whatever the file holds: at most MAX_BYTES_PER_READ per inspection (a first read takes
the file's tail), CHUNK_BYTES at a time, lines cut at MAX_LINE_BYTES; bytes that are not UTF-8 and
lines not in syslog's form are counted.
"""
import logging
import os

from .. import jsonfile
from . import smlog

LOG = logging.getLogger(__name__)

STATE_FILE = "smlog.json"
# The state is written SR by SR (file, log, srs): its text is never whole in memory.
STATE_LARGE_LEVELS = 3
MAX_BYTES_PER_READ = 128 << 20
CHUNK_BYTES = 128 << 10
MAX_LINE_BYTES = 64 << 10
ROTATED_SUFFIX = ".1"
# A file's first bytes tell it from another that got the same inode number (a file replaced whole).
HEAD_BYTES = 64

OK, MISSING, UNREADABLE = "ok", "missing", "unreadable"


def state_path(config):
    return os.path.join(config.agent.state_dir, STATE_FILE)


def read(config, now=None, max_bytes=MAX_BYTES_PER_READ):
    """(GcLog with everything read so far, health dict) after reading what SMlog gained; the state is
    saved when the state directory takes it."""
    path = state_path(config)
    saved = jsonfile.read_json(path, {})
    saved = saved if isinstance(saved, dict) else {}
    follower = Follower(config.storage.smlog_path, saved.get("file"), saved.get("health"))
    log = smlog.GcLog(saved.get("log"), now=now)
    follower.read(log, max_bytes)
    if (not follower.health["bytes_read"] and log.state is saved.get("log") and follower.position == saved.get("file")
            and follower.health == saved.get("health")):
        return log, follower.health   # nothing new: the saved state says it all already
    try:
        jsonfile.write_json(path, {"file": follower.position, "log": log.state, "health": follower.health},
                            large_levels=STATE_LARGE_LEVELS)
    except OSError as error:
        LOG.debug("cannot keep where SMlog was read in %s: %s", path, error)
    return log, follower.health


class Follower(object):
    """Where in which file the reader stands: `position` {inode, offset, skip}; `health` its counters."""

    def __init__(self, path, position=None, health=None):
        self.path = path
        self.position = position if isinstance(position, dict) and "inode" in position else None
        health = health if isinstance(health, dict) else {}
        self.health = {"path": path, "status": OK, "error": "", "bytes_read": 0, "behind_bytes": 0,
                       "rotations": int(health.get("rotations", 0)), "truncations": int(health.get("truncations", 0))}

    def read(self, log, max_bytes):
        try:
            status = os.stat(self.path)
        except OSError as error:
            self._fail(MISSING if isinstance(error, FileNotFoundError) else UNREADABLE, error)
            return
        budget = max_bytes
        position = self.position
        if position is not None and position["inode"] != status.st_ino:
            self.health["rotations"] += 1
            budget -= self._rotated_tail(log, position, budget)
            position = {"inode": status.st_ino, "offset": 0, "skip": False}
        elif position is not None and status.st_size < position["offset"]:
            self.health["truncations"] += 1
            position = {"inode": status.st_ino, "offset": 0, "skip": False}
        elif position is None:   # the first read: the file's tail, from a line's start
            start = max(0, status.st_size - budget)
            position = {"inode": status.st_ino, "offset": start, "skip": start > 0}
        try:
            self.position = self._read_file(self.path, position, log, budget)
        except OSError as error:
            self._fail(UNREADABLE, error)

    def _rotated_tail(self, log, position, budget):
        """Read once what the rotated file gained after `position`; the bytes read."""
        rotated = self.path + ROTATED_SUFFIX
        try:
            if os.stat(rotated).st_ino != position["inode"]:
                return 0
            before = self.health["bytes_read"]
            self._read_file(rotated, position, log, budget)
            return self.health["bytes_read"] - before
        except OSError as error:
            LOG.debug("cannot read the rest of %s: %s", rotated, error)
            return 0

    def _fail(self, status, error):
        self.health["status"] = status
        self.health["error"] = getattr(error, "strerror", None) or str(error)

    def _read_file(self, path, position, log, budget):
        """Read complete lines of `path` from `position`, at most `budget` bytes; the new position."""
        offset, skip = position["offset"], position.get("skip", False)
        with open(path, "rb") as stream:
            inode = os.fstat(stream.fileno()).st_ino
            if inode != position["inode"]:   # replaced between stat and open: its start next time
                return {"inode": inode, "offset": 0, "skip": False}
            head = stream.read(HEAD_BYTES).decode("latin-1")
            saved = position.get("head", "")
            if offset and not (head.startswith(saved) or saved.startswith(head)):
                self.health["truncations"] += 1   # another file under the same inode number
                offset, skip = 0, False
            stream.seek(offset)
            pending = b""
            while budget > 0:
                chunk = stream.read(min(CHUNK_BYTES, budget))
                if not chunk:
                    break
                budget -= len(chunk)
                self.health["bytes_read"] += len(chunk)
                data = pending + chunk
                end = data.rfind(b"\n")
                if end < 0:
                    if skip:   # more of a line already cut
                        offset += len(data)
                        pending = b""
                    elif len(data) > MAX_LINE_BYTES:   # one line longer than any SM writes: cut
                        self._feed(log, data[:MAX_LINE_BYTES], cut=True)
                        offset += len(data)
                        pending, skip = b"", True
                    else:
                        pending = data
                    continue
                if skip:
                    first = data.find(b"\n")
                    data, skip = data[first + 1:], False
                    offset += first + 1
                    end = data.rfind(b"\n")
                if end >= 0:
                    self._feed(log, data[:end])
                    offset += end + 1
                pending = data[end + 1:]
            self.health["behind_bytes"] = max(0, os.fstat(stream.fileno()).st_size - offset)
        return {"inode": inode, "offset": offset, "skip": skip, "head": head}

    def _feed(self, log, data, cut=False):
        """Complete lines (joined by newlines, without the last one) into the log: decoded whole, unless
        bytes that are not UTF-8 or a line longer than MAX_LINE_BYTES make it go line by line."""
        counts = log.state["lines"]
        if cut:
            counts["cut"] += 1
        try:
            text = data.decode("utf-8") if _lines_within(data, MAX_LINE_BYTES) else None
        except UnicodeDecodeError:
            text = None
        log.feed_text(_careful_text(counts, data) if text is None else text)


def _lines_within(data, limit):
    """No line of `data` is longer than `limit` bytes: found in a few steps of `limit` bytes, not line by line."""
    position = 0
    while len(data) - position > limit:
        newline = data.rfind(b"\n", position, position + limit + 1)
        if newline < 0:
            return False
        position = newline + 1
    return True


def _careful_text(counts, data):
    """The lines of `data` one by one: bytes that are not UTF-8 replaced, lines cut at MAX_LINE_BYTES
    characters, both counted."""
    lines = []
    for raw in data.split(b"\n"):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            counts["not_utf8"] += 1
            line = raw.decode("utf-8", "replace")
        if len(line) > MAX_LINE_BYTES:
            counts["cut"] += 1
            line = line[:MAX_LINE_BYTES]
        lines.append(line)
    return "\n".join(lines)
