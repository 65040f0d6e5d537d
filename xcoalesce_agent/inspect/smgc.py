"""The storage manager's garbage collector of one SR as SM shows it: is it running, wait for it,
kick a pass.

Every merge a run asks for is done by this GC (or by SM's plugin): the agent only starts and waits.
A GC shows itself in up to four ways, and any one of them counts:

- SM's locks `gc_active` (held for the whole GC loop) and `running` (each iteration), POSIX locks
  on `<sm_lock_dir>/<sr-uuid>/<name>`, seen in `/proc/locks` by the files' device and inode. The
  agent only `stat`s the lock files: it never opens them and never takes or tests the locks, since
  a GC that finds `gc_active` taken, even for an instant, exits. The GC the `coalesce-leaf` plugin
  runs inside its own process shows itself only this way (and by its task, when it has work);
- the systemd unit `SMGC@<sr-uuid>` (SM >= 3.2.2 starts every GC so), `activating` while it runs:
  this covers the moment between the unit's start and its first lock;
- a `cleanup ... -u <sr-uuid>` process (a GC started by older SM or by hand);
- xapi's "Garbage Collection" task of the SR (`other_config:applies_to` = the SR's ref), pending.
"""
import logging
import os
import shutil
import subprocess
import time

import XenAPI

from .. import progress, stopping

LOG = logging.getLogger(__name__)

GC_TASK_LABEL = "Garbage Collection"
GC_LOCKS = ("gc_active", "running")
PROC_LOCKS = "/proc/locks"
PROC_DIR = "/proc"
POLL_SECONDS = 0.1
# While waiting, how often the GC task's progress is read from xapi.
TASK_PROGRESS_SECONDS = 1.0
# After SR.scan, how long the GC may take to show up before it is taken as already done.
GC_START_SECONDS = 1.0
SYSTEMCTL_TIMEOUT_SECONDS = 10
# What `systemctl is-active` prints for a unit whose process may still run (a oneshot: activating).
UNIT_RUNNING_STATES = ("activating", "active", "deactivating", "reloading")


class GcBusy(Exception):
    """The SR's GC outlasted the configured wait; the message is the reason of the run it stops."""


# ---- the four signs ------------------------------------------------------------------------

def held_locks(path=PROC_LOCKS):
    """{(major, minor, inode): pid} of every lock held on this host, from one read of /proc/locks.

    A line reads `1: POSIX  ADVISORY  WRITE 12345 fd:01:1835018 0 EOF` (major and minor in hex);
    lines of processes waiting for a lock (`1: -> POSIX ...`) hold nothing and are left out.
    """
    try:
        with open(path) as stream:
            lines = stream.read().splitlines()
    except OSError as error:
        LOG.debug("cannot read %s: %s", path, error)
        return {}
    held = {}
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] == "->":
            continue
        device = fields[5].split(":")
        try:
            key = (int(device[0], 16), int(device[1], 16), int(device[2]))
            held[key] = int(fields[4])
        except (IndexError, ValueError):
            continue
    return held


def lock_holders(config, sr_uuids, held=None):
    """{sr_uuid: pid} of the SRs one of whose GC locks is held; `held` from `held_locks()`.

    An absent lock file is a lock nobody holds. The files are only `stat`ed.
    """
    held = held_locks() if held is None else held
    holders = {}
    if not held:
        return holders
    for sr_uuid in sr_uuids:
        for name in GC_LOCKS:
            try:
                status = os.stat(os.path.join(config.storage.sm_lock_dir, sr_uuid, name))
            except OSError:
                continue
            pid = held.get((os.major(status.st_dev), os.minor(status.st_dev), status.st_ino))
            if pid is not None:
                holders[sr_uuid] = pid
                break
    return holders


def cleanup_processes(proc_dir=PROC_DIR, now=None):
    """{sr_uuid: seconds running} of SM's GC processes (`cleanup ... -u <sr>`)."""
    now = time.time() if now is None else now
    boot_time = _boot_time(proc_dir)
    running = {}
    for pid in os.listdir(proc_dir):
        if not pid.isdigit():
            continue
        try:
            with open(os.path.join(proc_dir, pid, "cmdline"), "rb") as stream:
                cmdline = stream.read().decode("utf-8", "replace").split("\0")
        except OSError:
            continue
        if not any(os.path.basename(arg).startswith("cleanup") for arg in cmdline):
            continue
        seconds = _process_age(proc_dir, pid, boot_time, now)
        if seconds is None:
            continue
        for index, arg in enumerate(cmdline[:-1]):
            if arg in ("-u", "--uuid"):
                running[cmdline[index + 1]] = max(running.get(cmdline[index + 1], 0.0), seconds)
    return running


def _process_age(proc_dir, pid, boot_time, now):
    """Seconds since process `pid` started, or None when it is gone."""
    try:
        with open(os.path.join(proc_dir, str(pid), "stat")) as stream:
            start_ticks = int(stream.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None
    return max(0.0, now - boot_time - start_ticks / float(os.sysconf("SC_CLK_TCK")))


def _boot_time(proc_dir):
    try:
        with open(os.path.join(proc_dir, "stat")) as stream:
            for line in stream:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0.0


def unit_name(sr_uuid):
    """The GC's systemd unit as SM names it: `-` in the SR's UUID escaped as systemd does."""
    return "SMGC@" + sr_uuid.replace("-", "\\x2d")


def unit_state(config, sr_uuid):
    """What `systemctl is-active` says of the SR's GC unit when that means it runs, else "".

    No `systemctl` on `[tools] path`, an unknown unit, a failing or hanging `systemctl`: "".
    """
    systemctl = shutil.which("systemctl", path=config.tools.path)
    if systemctl is None:
        return ""
    try:
        result = subprocess.run([systemctl, "is-active", unit_name(sr_uuid)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, universal_newlines=True,
                                timeout=SYSTEMCTL_TIMEOUT_SECONDS)
    except (OSError, subprocess.SubprocessError) as error:
        LOG.warning("systemctl is-active %s: %s", unit_name(sr_uuid), error)
        return ""
    state = result.stdout.strip()
    return state if state in UNIT_RUNNING_STATES else ""


def gc_task_progress(session, sr_uuid):
    """The `progress` (0 to 1) of the SR's pending "Garbage Collection" task in xapi, or None
    when there is none."""
    sr_ref = session.xenapi.SR.get_by_uuid(sr_uuid)
    tasks = session.xenapi.task.get_all_records_where(
        'field "name__label" = "{}" and field "status" = "pending"'.format(GC_TASK_LABEL))
    fractions = [float(task.get("progress") or 0.0) for task in tasks.values()
                 if (task.get("other_config") or {}).get("applies_to") == sr_ref]
    return max(fractions) if fractions else None


def gc_task_pending(session, sr_uuid):
    """True while xapi holds a pending "Garbage Collection" task of the SR."""
    return gc_task_progress(session, sr_uuid) is not None


# ---- what the agent asks -------------------------------------------------------------------

def running_gcs(config, sr_uuids):
    """{sr_uuid: seconds running} of the SRs whose GC runs, for an inspection's report.

    Only the locks (one read of /proc/locks for all SRs) and the `cleanup` processes: no
    `systemctl` per SR and no xapi call. Every GC holds `gc_active` while it works, so this misses
    only a unit that has not yet taken it. The age is that of the process holding the lock (for the
    plugin's GC, the plugin's) or of the `cleanup` process.
    """
    now = time.time()
    running = {uuid: seconds for uuid, seconds in cleanup_processes(now=now).items() if uuid in sr_uuids}
    boot_time = None
    for sr_uuid, pid in lock_holders(config, sr_uuids).items():
        boot_time = _boot_time(PROC_DIR) if boot_time is None else boot_time
        seconds = _process_age(PROC_DIR, pid, boot_time, now) if pid > 0 else None
        running[sr_uuid] = max(running.get(sr_uuid, 0.0), seconds or 0.0)
    return running


def foreign_gc(config, sr_uuid):
    """What shows a GC on the SR other than one running inside the `coalesce-leaf` plugin's process
    (its unit or a `cleanup` process), or ""."""
    if sr_uuid in cleanup_processes():
        return "a cleanup process"
    state = unit_state(config, sr_uuid)
    return "{} {}".format(unit_name(sr_uuid), state) if state else ""


def gc_activity(config, session, sr_uuid):
    """What shows SM's GC working on the SR now (one line), or "" when it is idle.

    The cheapest signs first: one read of /proc/locks, the process table, `systemctl`, then xapi.
    """
    pid = lock_holders(config, [sr_uuid]).get(sr_uuid)
    if pid is not None:
        return "SM's GC lock held by pid {}".format(pid)
    seen = foreign_gc(config, sr_uuid)
    if seen:
        return seen
    if gc_task_pending(session, sr_uuid):
        return "its xapi task"
    return ""


def gc_running(config, session, sr_uuid):
    """True while SM's GC works on the SR, however it was started."""
    return bool(gc_activity(config, session, sr_uuid))


def wait_gc_idle(config, session, sr_uuid, timeout):
    """Wait (bounded, and no longer once the agent is stopping) until the SR's GC is not running;
    True if it is idle."""
    started = time.monotonic()
    busy = gc_activity(config, session, sr_uuid)
    if busy:
        LOG.info("SR %s: waiting up to %g s for the storage manager's GC to finish (%s)", sr_uuid, timeout, busy)
        progress.step("waiting for the GC of SR {}".format(_sr_name(session, sr_uuid)))
        task_look = progress.Throttle(TASK_PROGRESS_SECONDS)
        fraction = None
        try:
            while gc_running(config, session, sr_uuid):
                elapsed = time.monotonic() - started
                if elapsed >= timeout or stopping.requested():
                    return False
                if task_look.due():
                    fraction = gc_task_progress(session, sr_uuid)
                progress.update(None, _gc_wait_detail(fraction, elapsed, timeout))
                stopping.sleep(POLL_SECONDS)
        finally:
            progress.done()
    return True


def _gc_wait_detail(fraction, elapsed, timeout):
    """`task 40%, about 30 s left, 20 s of at most 3600 s`: what is known of a GC being waited for."""
    parts = []
    if fraction is not None:
        parts.append("task {:.0f}%".format(100.0 * fraction))
        left = progress.time_left(elapsed, fraction)
        if left is not None:
            parts.append("about {:.0f} s left".format(left))
    parts.append(progress.waited(elapsed, timeout))
    return ", ".join(parts)


def _sr_name(session, sr_uuid):
    """The SR's name for people, else its UUID."""
    try:
        return session.xenapi.SR.get_name_label(session.xenapi.SR.get_by_uuid(sr_uuid)) or sr_uuid
    except XenAPI.Failure:  # a name only decorates the progress line
        return sr_uuid


def require_gc_idle(config, session, sr_uuid):
    """Wait up to gc_wait_seconds for the SR's GC to be idle; `GcBusy` when it is not."""
    timeout = config.coalesce.gc_wait_seconds
    if stopping.requested() or not wait_gc_idle(config, session, sr_uuid, timeout):
        raise GcBusy(stopping.REASON if stopping.requested() else
                     "the SR's garbage collector is still busy after {:g} s".format(timeout))


def gc_pass(config, session, sr_uuid):
    """Kick the SR's GC with SR.scan and wait for it to finish; `GcBusy` when it outlasts gc_wait_seconds."""
    timeout = config.coalesce.gc_wait_seconds
    require_gc_idle(config, session, sr_uuid)
    session.xenapi.SR.scan(session.xenapi.SR.get_by_uuid(sr_uuid))
    appear_by = time.monotonic() + GC_START_SECONDS
    while not gc_running(config, session, sr_uuid) and time.monotonic() < appear_by:
        time.sleep(POLL_SECONDS)
    if not wait_gc_idle(config, session, sr_uuid, timeout):
        raise GcBusy(stopping.REASON if stopping.requested() else
                     "the SR's garbage collector did not finish within {:g} s".format(timeout))
