"""`/var/log/SMlog` as rsyslog writes it for SM on a real host: `Mon DD HH:MM:SS host IDENT: [pid] text`,
each newline of a message its own record, rotated to `SMlog.1` (the older one gzipped) past a size.

SM's processes are the simulated SM's threads: each gets a pid of its own; `child()` stands for the
process SM forks to run a VHD coalesce, `forked()` for any other process a thread stands for.
`label(image)` prints a VHD as SM's GC does; SmLogCalls are the StorageManager's calls that write SMlog.
"""
import gzip
import os
import shutil
import threading
import time
import traceback

HOSTNAME = "xcp-ng-sim"
FIRST_PID = 3802739
PREFIX = (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10))
BANNER = "*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*"
# The classes SM's exceptions have, by the simulated SM's exception names.
EXCEPTION_CLASSES = {"SmError": "util.SMException", "CommandException": "util.CommandException",
                     "Aborted": "cleanup.AbortException",
                     "OutOfRoom": "util.CommandException", "OSError": "util.CommandException",
                     "VhdError": "util.CommandException", "LvmError": "util.CommandException"}


def num2str(number):
    """SM's Util.num2str: `65.000G`, `1.200M`, bytes below 1 KiB as they are."""
    for suffix, size in PREFIX:
        if number >= size:
            return "%.3f%s" % (float(number) / size, suffix)
    return "%s" % number


def label(image, lvm=False):
    """str(VDI) of SM's GC: `*85ff84a8(65.000G/1.200G/1.201G)` on file SRs,
    `*85ff84a8[VHD](65.000G//1.200G/1.204G|a)` on LVM SRs (`*`: hidden)."""
    hidden = "*" if image.hidden else ""
    allocated = num2str(image.allocated_size) if not image.scan_error else "?"
    if lvm:
        return "%s%s[VHD](%s/%s/%s/%s|%s)" % (hidden, image.uuid[:8], num2str(image.virtual_size),
                                              num2str(image.vhd_size), allocated, num2str(image.lv_size or 0), "a")
    return "%s%s(%s/%s/%s)" % (hidden, image.uuid[:8], num2str(image.virtual_size), num2str(image.vhd_size),
                               allocated)


class SmLog(object):
    """The log file; `max_bytes` (None: no limit) makes it rotate as Dom0's logrotate does."""

    def __init__(self, path, max_bytes=None, hostname=HOSTNAME):
        self.path = path
        self.max_bytes = max_bytes
        self.hostname = hostname
        self.rotations = 0
        self._lock = threading.Lock()
        self._process = threading.local()
        self._processes = 0
        self._children = {}

    def pid(self):
        """The pid of the calling thread's process (its forked process's while `child()` or `forked()` lasts)."""
        ident = threading.current_thread().ident
        with self._lock:
            if ident in self._children:
                return self._children[ident]
            if not hasattr(self._process, "pid"):    # a thread's own: a new thread is a new process
                self._process.pid = FIRST_PID + 7 * self._processes
                self._processes += 1
            return self._process.pid

    def child(self):
        """A context in which the thread logs as the child SM forks (runAbortable)."""
        return self.forked(1)

    def forked(self, offset):
        """A context in which the thread logs as the process `offset` pids from its own: the child SM
        forks (runAbortable, +1), the first process of a daemonising double fork (-1)."""
        log = self

        class _Forked(object):
            def __enter__(self):
                pid = log.pid() + offset
                with log._lock:
                    log._children[threading.current_thread().ident] = pid
                return pid

            def __exit__(self, *exc_info):
                with log._lock:
                    log._children.pop(threading.current_thread().ident, None)
        return _Forked()

    def write(self, text, ident="SMGC"):
        """One message: a record per line, as syslog splits it."""
        now = time.localtime()
        head = "{} {:>2} {} {} {}: [{}] ".format(time.strftime("%b", now), now.tm_mday, time.strftime("%H:%M:%S", now),
                                                 self.hostname, ident, self.pid())
        data = "".join(head + line + "\n" for line in text.split("\n"))
        with self._lock:
            with open(self.path, "a") as handle:
                handle.write(data)
                size = handle.tell()
            if self.max_bytes is not None and size >= self.max_bytes:
                self.rotate()

    def rotate(self):
        """logrotate: SMlog.1 goes to SMlog.2.gz, SMlog to SMlog.1, a new SMlog."""
        rotated = self.path + ".1"
        if os.path.exists(rotated):
            with open(rotated, "rb") as source, gzip.open(self.path + ".2.gz", "wb") as target:
                shutil.copyfileobj(source, target)
        os.rename(self.path, rotated)
        open(self.path, "a").close()
        self.rotations += 1

    def exception(self, tag, exc):
        """Util.logException: the banner, `<tag>: EXCEPTION <class '...'>, message`, the traceback."""
        name = type(exc).__name__
        cls = EXCEPTION_CLASSES.get(name, "{}.{}".format(type(exc).__module__, name))
        trace = "".join(traceback.format_tb(exc.__traceback__)) if exc.__traceback__ else ""
        for line in (BANNER, "         ***********************", "         *  E X C E P T I O N  *",
                     "         ***********************", "{}: EXCEPTION <class '{}'>, {}".format(tag, cls, exc),
                     trace, BANNER):
            self.write(line)


class SmLogCalls(object):
    """The StorageManager's ways of writing SMlog (its `smlog`)."""

    def log(self, text, ident="SMGC"):
        """A message SM logs through syslog into SMlog (smlogfile.py: the real format, rotation)."""
        self.smlog.write(text, ident)

    def log_exception(self, tag, exc):
        """cleanup.py's Util.logException into SMlog."""
        self.smlog.exception(tag, exc)

    def label(self, image):
        """A VHD as SM's GC prints it (8 hex digits of its UUID and its sizes)."""
        return label(image, lvm=image.lv_size is not None)

    def sm_log(self, text):
        """A line SM's util.SMlog writes (ident SM)."""
        self.log(text, ident="SM")
