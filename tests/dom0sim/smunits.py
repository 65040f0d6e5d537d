"""How a GC runs on the simulated host, as on a real one: SR.scan ends by starting the systemd unit
`SMGC@<sr>` (the `systemctl` stand-in of tests/dom0sim/systemd.py answers `is-active` for it), which
runs the process `<state>/bin/cleanup -g -u <sr>`; the GC holds the POSIX lock
`<state>/lock/sm/<sr>/gc_active` for its whole loop and `running` for each iteration (both in
/proc/locks), and a "Garbage Collection" task exists while it has work. A second GC of the same SR
finds `gc_active` taken and exits at once. Also SM's other locks: the SR lock, each VDI's lock (held:
the VDI is busy) and the I/O lock of its tapdisk.
"""
import contextlib
import fcntl
import os
import subprocess
import threading
import time
import traceback

from tests.dom0sim.smgc import Aborted, GcPass
from tests.dom0sim.smstore import SmError

CLEANUP_SCRIPT = """#!/bin/sh
# Stands for SM's `cleanup.py -g -u <sr>` run by the unit SMGC@<sr> while the simulated GC works on
# that SR: it lives until the storage manager closes its stdin, and exits with the last line it read.
code=0
while read -r line; do code=$line; done
exit "$code"
"""
SMGC_UNIT = "SMGC@{}.service"
UNIT_POLL_PERIOD = 0.02          # wait_for_completion polls the unit every 5 s on a real host


def write_cleanup_script(path):
    """The `cleanup` executable the SMGC units run."""
    with open(path, "w") as handle:
        handle.write(CLEANUP_SCRIPT)
    os.chmod(path, 0o755)


class SmLock(object):
    """One of SM's lock files (lock.py): a POSIX fcntl lock on the file while held, seen in /proc/locks.
    POSIX locks do not exclude threads of one process, so a thread lock goes with it; only the holder
    opens the file (closing any descriptor of it would drop the process's lock)."""

    def __init__(self, path):
        self.path = path
        self._thread_lock = threading.Lock()
        self._handle = None

    def acquire_noblock(self):
        if not self._thread_lock.acquire(False):
            return False
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            os.makedirs(directory)
        handle = open(self.path, "a")
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (IOError, OSError):
            handle.close()
            self._thread_lock.release()
            return False
        self._handle = handle
        return True

    def held(self):
        return self._handle is not None

    def release(self):
        handle, self._handle = self._handle, None
        fcntl.lockf(handle, fcntl.LOCK_UN)
        handle.close()
        self._thread_lock.release()


class GcUnits(object):
    """The StorageManager's GC runs (SMGC units, background GCs) and SM's locks."""

    # -- SR.scan and the GC threads --

    def sr_scan(self, sr_ref):
        """The SR.scan hook: refresh the records, then kick the GC, as the SM drivers' scan does."""
        sr_uuid = self.db.get_field("SR", sr_ref, "uuid")
        self.refresh_sr(sr_uuid)
        self.kick(sr_uuid)

    def kick(self, sr_uuid):
        """_kickGC: `systemctl --no-block start SMGC@<sr>` unless the SR is not attached here or this host
        is not its master; a unit that is already activating is left as it is. False when it may not run."""
        sr_ref = self.records.sr_ref(sr_uuid)
        host_ref = self.records.host_ref()
        if self.store(sr_uuid) is None:
            return False
        if not self.records.is_plugged_on(sr_ref, host_ref):
            self.log("SR {} not attached on this host".format(sr_uuid))
            return False
        if not self.records.is_master(sr_ref, host_ref):
            self.log("This host is NOT master, will not run")
            return False
        self.log("Kicking SMGC@{}...".format(sr_uuid), ident="SM")
        with self._lock:
            if self.unit_state(sr_uuid) == "activating":
                return True
            self._set_unit_state(sr_uuid, "activating")
        self.start_gc_thread(sr_uuid, self._unit_main, "smgc-")
        return True

    def start_gc_thread(self, sr_uuid, target, prefix, *args):
        thread = threading.Thread(target=target, args=(sr_uuid,) + args, name=prefix + sr_uuid[:8])
        thread.daemon = True
        with self._lock:
            self._gcs.setdefault(sr_uuid, []).append(thread)
        thread.start()

    def unit_path(self, sr_uuid):
        """The state file the systemctl stand-in reads for the unit SMGC@<sr> (its escaped name)."""
        return os.path.join(self.unit_dir, SMGC_UNIT.format(sr_uuid.replace("-", "\\x2d")))

    def _set_unit_state(self, sr_uuid, state):
        tmp = self.unit_path(sr_uuid) + ".tmp"
        with open(tmp, "w") as handle:
            handle.write(state + "\n")
        os.rename(tmp, self.unit_path(sr_uuid))

    def unit_state(self, sr_uuid):
        """What `systemctl is-active SMGC@<sr>` says: activating, inactive, failed or unknown."""
        try:
            with open(self.unit_path(sr_uuid)) as handle:
                return handle.read().strip()
        except (IOError, OSError):
            return "unknown"

    def _unit_main(self, sr_uuid):
        """The unit's oneshot service: `cleanup -g -u <sr>` running the GC in the foreground."""
        process = subprocess.Popen([self.cleanup_path, "-g", "-u", sr_uuid], stdin=subprocess.PIPE, close_fds=True)
        code = 1
        try:
            code = self.gc(sr_uuid)
        finally:
            process.stdin.write("{}\n".format(code).encode("ascii"))
            process.stdin.close()
            process.wait()
            with self._lock:
                self._set_unit_state(sr_uuid, "inactive" if code == 0 else "failed")

    def gc_in_background(self, sr_uuid, quiet_seconds):
        """SM 3.2's gc(inBackground=True): `=== SR` from the caller's process, a double fork (the first
        child says which pid the daemon has and exits; the caller, having waited for it, says the
        first child's pid), then the daemon's GC run under its own pid, not immediate (the quiet
        period), logging whatever stops it."""
        self.log("=== SR {}: gc ===".format(sr_uuid))
        forked = []
        first_child_gone = threading.Event()
        self.start_gc_thread(sr_uuid, self._daemon_main, "gc-", quiet_seconds, forked, first_child_gone)
        first_child_gone.wait()
        self.log("New PID [{}]".format(forked[0]))

    def _daemon_main(self, sr_uuid, quiet_seconds, forked, first_child_gone):
        daemon_pid = self.smlog.pid()
        with self.smlog.forked(-1) as first_child:
            self.log("Will finish as PID [{}]".format(daemon_pid))
        forked.append(first_child)
        first_child_gone.set()
        self.run_gc(sr_uuid, quiet_seconds=quiet_seconds)

    def gc(self, sr_uuid, dry_run=False, quiet_seconds=0.0, raise_errors=False):
        """cleanup.gc in the foreground (the SMGC unit's `cleanup -g`, SM 3.2's plugin): `=== SR <uuid>:
        gc ===`, then one GC run in this thread; its exit status 0, 1 (error) or 2 (aborted).

        SM 4.1 goes through run_gc, which logs a fatal error; SM 3.2 lets it go to stderr (the
        journal) or, with `raise_errors`, to its caller."""
        self.log("=== SR {}: gc ===".format(sr_uuid))
        if self.generation.logs_fatal_errors:
            return self.run_gc(sr_uuid, dry_run, quiet_seconds)
        try:
            self.gc_pass(sr_uuid, dry_run, quiet_seconds)
            return 0
        except Exception:
            if raise_errors:
                raise
            traceback.print_exc()   # the unit's stderr: the journal, not SMlog
            return 1

    def run_gc(self, sr_uuid, dry_run=False, quiet_seconds=0.0):
        """cleanup.run_gc (SM 4.1; SM 3.2's daemon does the same): one GC run with no `=== SR` line,
        logging what stops it (`Aborted`, or the `gc` exception and `* * * * * SR <uuid>: ERROR`); its
        exit status 0, 1 (error) or 2 (aborted)."""
        try:
            self.gc_pass(sr_uuid, dry_run, quiet_seconds)
            return 0
        except Aborted:
            self.log("Aborted")
            return 2
        except Exception as exc:  # SM's logException: the GC reports what stopped it
            self.log_exception("gc", exc)
            self.log("* * * * * SR {}: ERROR\n".format(sr_uuid))
            return 1

    def gc_pass(self, sr_uuid, dry_run=False, quiet_seconds=0.0):
        """cleanup._gc: one GC run, the SR's usage brought up to date after it."""
        try:
            GcPass(self, sr_uuid, quiet_seconds, dry_run).run()
        finally:
            self._gc_ran.add(sr_uuid)
            self.update_sr_usage(sr_uuid)

    def gc_running(self, sr_uuid):
        """Some GC of the SR holds gc_active."""
        return self.sm_lock(sr_uuid, "gc_active").held()

    def wait_gc(self, sr_uuid, timeout=None):
        """Wait for the SR's SMGC units and background GCs; False if one still runs after `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            threads = list(self._gcs.get(sr_uuid, []))
        for thread in threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in threads)

    def wait_idle(self, timeout=60.0):
        """Wait for every SMGC unit and background GC to finish; False if one still runs after `timeout`
        seconds."""
        deadline = time.monotonic() + timeout
        for sr_uuid in list(self._gcs):
            if not self.wait_gc(sr_uuid, max(0.0, deadline - time.monotonic())):
                return False
        return True

    def wait_for_completion(self, sr_uuid):
        """cleanup.wait_for_completion (SM 4.1.10+): poll `systemctl is-active SMGC@<sr>` while it says
        activating."""
        while self.unit_state(sr_uuid) == "activating" and not self.stopping.is_set():
            time.sleep(self.unit_poll_period)
    def sr_lock(self, sr_uuid):
        """SM's SR lock: scans and the GC's changes to the SR's VHDs and records take turns."""
        with self._lock:
            return self._sr_locks.setdefault(sr_uuid, threading.RLock())

    def io_lock(self, vdi_uuid):
        """The lock a VDI's I/O path (its tapdisk) holds for each write; SM takes it to pause I/O."""
        with self._lock:
            return self._io_locks.setdefault(vdi_uuid, threading.Lock())

    def vdi_lock(self, vdi_uuid):
        """SM's lock of one VDI, held by SM operations on it (attach, activate, ...): while a test holds
        it the VDI is busy, and a pause with failfast fails at once."""
        with self._lock:
            return self._vdi_locks.setdefault(vdi_uuid, threading.Lock())

    def sm_lock(self, sr_uuid, name):
        """The SmLock <lock dir>/<sr>/<name> (gc_active, running)."""
        with self._lock:
            key = (sr_uuid, name)
            if key not in self._sm_locks:
                self._sm_locks[key] = SmLock(os.path.join(self.lock_dir, sr_uuid, name))
            return self._sm_locks[key]

    @contextlib.contextmanager
    def held(self, sm_lock):
        """cleanup.py's lockGCRunning around one iteration (it is free unless SM is aborting)."""
        if not sm_lock.acquire_noblock():
            raise SmError("Unable to acquire GC running lock.")
        try:
            yield
        finally:
            sm_lock.release()
