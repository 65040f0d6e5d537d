"""The leaf-coalesce run history: every finished run in a log, and running totals for the exporter.

`RunHistory(state_dir)` keeps in the agent's state directory `runs.jsonl`, one JSON line per
finished run (append-only), and `totals.json`, the counters Prometheus reads (reclaimed bytes and
runs per SR, the freeze-time histogram), rewritten atomically after each run so they survive
restarts. Several processes may record (the service and `--now`): a lock file serialises them, and
`totals()` rereads the file when another process changed it.

The log is bounded: past `MAX_LOG_BYTES` it becomes `runs.jsonl.1` (replacing the one before),
and `totals-rotated.json` keeps the totals of every run no longer in `runs.jsonl`, so that totals
rebuilt from the log (when `totals.json` is lost) lose nothing. A line that cannot be read (bytes
that are not UTF-8, a line cut short by a crash) is skipped and counted, never fatal, and the next
record starts on a line of its own.
"""
import copy
import errno
import fcntl
import json
import os

from . import plans
from ..jsonfile import fsync_dir
from .plans import RunRecord

# What a run recorded may have taken and come to.
STRATEGIES = plans.STRATEGY_ORDER
RESULTS = plans.RUN_RESULTS

# Upper bounds (seconds) of the guest freeze histogram: live coalesce freezes I/O for seconds,
# the plugin suspends the VM for up to minutes.
FREEZE_BUCKETS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

FORMAT = 1
RUNS_FILE = "runs.jsonl"
ROTATED_RUNS_FILE = RUNS_FILE + ".1"
TOTALS_FILE = "totals.json"
ROTATED_TOTALS_FILE = "totals-rotated.json"
LOCK_FILE = "history.lock"
# About 3,000 runs a file: a few years of nightly runs on a host with a dozen VMs.
MAX_LOG_BYTES = 1 << 20


def empty_totals():
    """Totals of no run at all.

    `srs`: {sr_uuid: {"reclaimed_bytes": int, "runs": {strategy: {result: count}}}};
    `frozen_seconds`: {strategy: {"buckets": [count per FREEZE_BUCKETS bound, not cumulative,
    then one for +Inf], "count": int, "sum": float}}; `runs`: how many runs in all.
    """
    return {"format": FORMAT, "runs": 0, "srs": {}, "frozen_seconds": {}}


def add_run(totals, run):
    """Count one finished run (a `plans.RunRecord`) into `totals` (in place)."""
    sr = totals["srs"].setdefault(run.sr_uuid, {"reclaimed_bytes": 0, "runs": {}})
    results = sr["runs"].setdefault(run.strategy, {})
    results[run.result] = results.get(run.result, 0) + 1
    sr["reclaimed_bytes"] += int(run.reclaimed_bytes or 0)
    totals["runs"] += 1
    frozen = run.frozen_seconds
    if run.result != plans.SKIPPED and frozen is not None:
        histogram = totals["frozen_seconds"].setdefault(
            run.strategy, {"buckets": [0] * (len(FREEZE_BUCKETS) + 1), "count": 0, "sum": 0.0})
        histogram["buckets"][_bucket_index(float(frozen))] += 1
        histogram["count"] += 1
        histogram["sum"] += float(frozen)


def _bucket_index(seconds):
    for index, bound in enumerate(FREEZE_BUCKETS):
        if seconds <= bound:
            return index
    return len(FREEZE_BUCKETS)


def check_run(run):
    """Raise ValueError naming what is wrong with a run record (a `plans.RunRecord`)."""
    if run.strategy not in STRATEGIES:
        raise ValueError("unknown strategy {!r} (expected {})".format(run.strategy, ", ".join(STRATEGIES)))
    if run.result not in RESULTS:
        raise ValueError("unknown result {!r} (expected {})".format(run.result, ", ".join(RESULTS)))
    if not run.sr_uuid:
        raise ValueError("run record has no sr_uuid")
    if int(run.reclaimed_bytes or 0) < 0:
        raise ValueError("reclaimed_bytes is negative: {!r}".format(run.reclaimed_bytes))


class RunHistory(object):
    """The runs recorded under one state directory."""

    def __init__(self, state_dir):
        self.state_dir = state_dir
        self._runs_path = os.path.join(state_dir, RUNS_FILE)
        self._totals_path = os.path.join(state_dir, TOTALS_FILE)
        self._rotated_totals_path = os.path.join(state_dir, ROTATED_TOTALS_FILE)
        self._lock_path = os.path.join(state_dir, LOCK_FILE)
        self._cached = (None, None)  # (stamp of totals.json when read, totals)
        self._corrupt = (None, 0)  # (stamp of runs.jsonl when read, its unreadable lines)

    def record(self, run):
        """Append one finished run (a `plans.RunRecord`) to the log and count it into the totals on disk."""
        check_run(run)
        line = (run.to_log() + "\n").encode("utf-8")
        _make_dirs(self.state_dir)
        with _Locked(self._lock_path):
            totals = self._read_totals()
            with open(self._runs_path, "a+b") as stream:
                if stream.seek(0, os.SEEK_END) and _last_byte(stream) != b"\n":
                    line = b"\n" + line  # the line a crash cut short stays a line of its own
                stream.write(line)
                stream.flush()
                os.fsync(stream.fileno())
                log_bytes = stream.tell()
            add_run(totals, run)
            _write_atomically(self._totals_path, json.dumps(totals, sort_keys=True))
            self._cached = (_stamp(self._totals_path), totals)
            if log_bytes > MAX_LOG_BYTES:
                self._rotate(totals)

    def _rotate(self, totals):
        """`runs.jsonl` becomes `runs.jsonl.1`; the totals of its runs go to `totals-rotated.json`
        first, naming the log they cover, so that a crash between the two steps counts nothing twice."""
        rotated = {"format": FORMAT, "totals": totals, "log_inode": os.stat(self._runs_path).st_ino}
        _write_atomically(self._rotated_totals_path, json.dumps(rotated, sort_keys=True))
        os.replace(self._runs_path, os.path.join(self.state_dir, ROTATED_RUNS_FILE))
        fsync_dir(self.state_dir)

    def totals(self):
        """The totals as on disk now (see `empty_totals` for their shape); a copy the caller may keep."""
        stamp = _stamp(self._totals_path)
        cached_stamp, totals = self._cached
        if totals is None or stamp is None or stamp != cached_stamp:
            totals = self._read_totals()
            self._cached = (stamp, totals)
        return copy.deepcopy(totals)

    def version(self):
        """Changes whenever the totals or the log on disk change; a cheap stat, for caches."""
        return _stamp(self._totals_path), _stamp(self._runs_path)

    def runs(self):
        """Every run in the current log (`plans.RunRecord`s), oldest first; unreadable lines are left out."""
        return _read_log(self._runs_path)[0]

    def corrupt_lines(self):
        """How many lines of the current log could not be read (and were skipped)."""
        stamp = _stamp(self._runs_path)
        if stamp != self._corrupt[0]:
            self._corrupt = (stamp, _read_log(self._runs_path)[1])
        return self._corrupt[1]

    def _read_totals(self):
        """Totals from disk; rebuilt from the rotated totals and the run log when the totals file is
        missing or unreadable."""
        totals = _read_versioned(self._totals_path)
        if totals is not None:
            return totals
        rotated = _read_versioned(self._rotated_totals_path) or {}
        totals = rotated.get("totals") or empty_totals()
        log = _stamp(self._runs_path)
        if log is not None and log[0] != rotated.get("log_inode"):
            for run in _read_log(self._runs_path)[0]:
                add_run(totals, run)
        return totals


def _read_versioned(path):
    """A JSON object of this FORMAT from `path`, or None when missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as stream:
            value = json.load(stream)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) and value.get("format") == FORMAT else None


def _read_log(path):
    """(runs, unreadable lines) of a run log; a missing log (or state directory) is empty."""
    try:
        with open(path, "rb") as stream:
            lines = stream.read().split(b"\n")
    except OSError as error:
        if error.errno in (errno.ENOENT, errno.ENOTDIR):
            return [], 0
        raise
    runs, corrupt = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            run = RunRecord.from_log(line.decode("utf-8"))
            check_run(run)
        except (ValueError, TypeError):
            corrupt += 1
            continue
        runs.append(run)
    return runs, corrupt


def _last_byte(stream):
    stream.seek(-1, os.SEEK_END)
    return stream.read(1)


def _stamp(path):
    try:
        status = os.stat(path)
    except OSError:
        return None
    return (status.st_ino, status.st_size, status.st_mtime_ns)


def _make_dirs(path):
    try:
        os.makedirs(path, 0o750)
    except OSError as error:
        if error.errno != errno.EEXIST:
            raise


def _write_atomically(path, content):
    """Write a sibling temporary file, flush it to disk, rename it over `path`, sync the directory."""
    temporary = "{}.{}.tmp".format(path, os.getpid())
    with open(temporary, "w", encoding="utf-8") as stream:
        stream.write(content)
        stream.flush()
        os.fsync(stream.fileno())
    os.rename(temporary, path)
    fsync_dir(os.path.dirname(path) or ".")


class _Locked(object):
    """An exclusive flock on a file, for the time of a `with` block."""

    def __init__(self, path):
        self._path = path
        self._fd = None

    def __enter__(self):
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o640)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc_info):
        os.close(self._fd)
