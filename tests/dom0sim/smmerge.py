"""Merges as SM times and reports them: `vhd-util coalesce` lasting bytes / the SR's speed (and
abandoned at a live leaf coalesce's timeout), the speed log SM keeps of each SR's merges, a file SR
filling up during a merge (ENOSPC part-way), the faults tests inject into merges, and the xapi
message SM sends, rate-limited, when a merge fails.
"""
import errno
import os
import time
import uuid as uuidlib

from tests.dom0sim.smimages import MIB
from tests.dom0sim.smstore import OutOfRoom, SmError
from tests.dom0sim.xapi import wire

SPEED_LOG_KEEP = 10
DEFAULT_SPEED = 200 * MIB
COALESCE_LAST_ERROR_KEY = "last-coalesce-error"
COALESCE_ERROR_RATE_KEY = "coalesce-error-rate"
DEFAULT_COALESCE_ERROR_RATE = 1.0 / 60          # xapi messages per minute about failed merges
COALESCE_ERROR_BODIES = {errno.ENOSPC: "Run out of space while coalescing.",
                         errno.EIO: "I/O error while coalescing."}


# ---- the speed log -----------------------------------------------------------------------

def speed_log_path(run_dir, sr_uuid):
    return os.path.join(run_dir, "{}.speed_log".format(sr_uuid))


def read_speed(path):
    """Mean of the logged merge speeds (bytes/s) as SR.getStorageSpeed reads them, or None: no file, no
    line, a line that is not a number (a blank one included) or a mean that is not positive."""
    try:
        with open(path) as handle:
            values = [float(line) for line in handle.readlines()]
    except (IOError, OSError, ValueError):
        return None
    if not values:
        return None
    speed = sum(values) / float(len(values))
    return speed if speed > 0 else None


def record_speed(path, speed):
    """SR.writeSpeedToFile: append `str(speed)`, dropping the first line once there are more than
    SPEED_LOG_KEEP (one line only: a longer log stays longer), replaced atomically."""
    lines = []
    if os.path.isfile(path):
        with open(path) as handle:
            lines = handle.readlines()
    lines.append(str(float(speed)) + "\n")
    if len(lines) > SPEED_LOG_KEEP:
        del lines[0]
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        handle.write("".join(lines))
    os.rename(tmp, path)


class CommandException(SmError):
    """A command SM runs failed (util.CommandException)."""


class Merges(object):
    """The StorageManager's merges: timed, logged to the speed log, failing as the faults say."""

    def speed_log(self, sr_uuid):
        return speed_log_path(self.run_dir, sr_uuid)
    def fail_coalesce(self, sr_uuid, message="Input/output error"):
        """Fault: the next merge on the SR fails as `vhd-util coalesce` failing does (CommandException,
        reported as an I/O error)."""
        self._coalesce_faults[sr_uuid] = message
    def timed_merge(self, sr_uuid, child_path, timeout=None):
        """`vhd-util coalesce` of child_path at the SR's speed; logs the speed; bytes merged.

        With a timeout the merge is abandoned once it has taken that long (SmError "Timed out"). A
        file SR running out of room stops it part-way with ENOSPC, reported as SM reports it.
        """
        start = time.monotonic()
        failure = self._coalesce_faults.pop(sr_uuid, None)
        if failure is not None:
            self.report_coalesce_error(sr_uuid, errno.EIO)
            raise CommandException(failure)
        try:
            merged = self.merge_within_room(sr_uuid, child_path)
        except OutOfRoom as exc:
            self.wait_for_merge(sr_uuid, exc.copied, start, timeout)
            self.report_coalesce_error(sr_uuid, errno.ENOSPC)
            self.log("Coalesce failed on {}, attempting repair on parent {}".format(
                os.path.basename(child_path), exc.parent_path))
            raise SmError(str(exc)) from None
        self.wait_for_merge(sr_uuid, merged, start, timeout)
        elapsed = time.monotonic() - start
        if merged and elapsed > 0:
            record_speed(self.speed_log(sr_uuid), merged / elapsed)
        return merged

    def wait_for_merge(self, sr_uuid, merged, start, timeout):
        """Let a merge of `merged` bytes that began at `start` last as long as the SR's speed makes it."""
        duration = merged / float(self.speeds.get(sr_uuid, DEFAULT_SPEED))
        if timeout is not None and duration > timeout:
            self.stopping.wait(max(0.0, timeout - (time.monotonic() - start)))
            raise SmError("Timed out")
        remaining = duration - (time.monotonic() - start)
        if remaining > 0:
            self.stopping.wait(remaining)

    def merge_within_room(self, sr_uuid, child_path):
        """Bytes merged; on a file SR only as far as its free space goes (OutOfRoom beyond). LVM SRs
        inflate the parent LV before merging, so their merges never run out of room part-way."""
        store = self.store(sr_uuid)
        if store.lvm:
            return store.coalesce(child_path)
        room = store.free_space()
        left = self._room_faults.pop(sr_uuid, None)
        if left is not None and left < room:
            store.take_room(room - left)
            room = left
        if store.merge_growth(child_path) <= room:
            return store.coalesce(child_path)
        return store.coalesce_within(child_path, room)

    def fail_merge_after(self, sr_uuid, nbytes):
        """Fault: the storage of a file SR fills up during its next merge. Another writer takes all its
        free space but `nbytes`, so the merge stops with ENOSPC once the parent has grown by that much
        (whole blocks) and the SR stays full."""
        if self.store(sr_uuid).lvm:
            raise ValueError("SR {} is an LVM SR: its merges cannot run out of room part-way".format(sr_uuid))
        self._room_faults[sr_uuid] = int(nbytes)

    def report_coalesce_error(self, sr_uuid, number):
        """VDI._reportCoalesceError: an SMlog line and, at most at the SR's error rate, an xapi message
        named after the error."""
        name = os.strerror(number)
        body = COALESCE_ERROR_BODIES.get(number, "")
        self.log("Coalesce failed on SR {}: {} ({})".format(sr_uuid, name, body))
        sr_ref = self.records.sr_ref(sr_uuid)
        if self.coalesce_error_message_due(sr_ref):
            self.db.create("message", uuid=str(uuidlib.uuid4()), name=name, priority=3, cls="SR",
                           obj_uuid=sr_uuid, body=body, timestamp=wire.now())

    def coalesce_error_message_due(self, sr_ref):
        """SR other-config:coalesce-error-rate messages per minute (0: every time, < 0: never); the time
        of the last one is kept in SR sm-config:last-coalesce-error."""
        rate = float(self.db.get_field("SR", sr_ref, "other_config").get(COALESCE_ERROR_RATE_KEY,
                                                                         DEFAULT_COALESCE_ERROR_RATE))
        if rate <= 0:
            return rate == 0
        now = time.time()
        last = self.db.get_field("SR", sr_ref, "sm_config").get(COALESCE_LAST_ERROR_KEY)
        if last is not None and now - float(last) < 60.0 / rate:
            return False
        self.records.set_map_key("SR", sr_ref, "sm_config", COALESCE_LAST_ERROR_KEY, str(int(now)))
        return True
