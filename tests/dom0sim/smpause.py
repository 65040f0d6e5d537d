"""Pausing a VDI a VM may be using, as SM does (tap-pause): its I/O frozen and recorded as downtime of
its running VM, sm-config:paused while it lasts, failing at once on a busy VDI with failfast; the
internal VDI.snapshot of a snapshot-coalesce round, made under such a pause; and the fault of an
unpause that fails.
"""
import contextlib
import uuid as uuidlib

from tests.dom0sim.smstore import SmError
from tests.dom0sim.xapi import wire

DEFAULT_SNAPSHOT_SECONDS = 0.03  # how long an internal VDI.snapshot keeps the leaf paused


class Pausing(object):
    """The StorageManager's pauses of a VDI."""

    @contextlib.contextmanager
    def frozen(self, vdi_uuid, failfast=False):
        """tap-pause: the VDI's I/O stops (recorded as downtime of its running VM) until the block ends.
        With `failfast` a busy VDI (vdi_lock held) fails at once, as vdi.pause(failfast=True)."""
        vm_uuid = self.records.running_vm_of_vdi(vdi_uuid)
        ref = self.records.vdi_ref(vdi_uuid)
        busy = self.vdi_lock(vdi_uuid)
        if not busy.acquire(not failfast):
            raise SmError("Failed to pause VDI {}".format(vdi_uuid))
        busy.release()
        with self.io_lock(vdi_uuid):
            if vm_uuid:
                self.db.freeze_io(vm_uuid)
            if ref:
                self.records.set_map_key("VDI", ref, "sm_config", "paused", "true")
            try:
                yield
            finally:
                ref = self.records.vdi_ref(vdi_uuid)
                if ref:
                    self.records.set_map_key("VDI", ref, "sm_config", "paused", None)
                if vm_uuid:
                    self.db.thaw_io(vm_uuid)

    def fail_unpause(self, vdi_uuid):
        """Fault: the unpause of the VDI's tapdisk after its next live leaf coalesce fails (its VM would
        lose the disk; here its I/O goes on, so nothing else is at stake): the merge is done, SM logs the
        failure, raises "failed to unpause tapdisk" and the leaf coalesce ends in an SMException."""
        self._unpause_faults.add(vdi_uuid)

    def unpaused(self, vdi_uuid):
        """After a live leaf coalesce: the unpause fault of the VDI, when one was set (fail_unpause)."""
        if vdi_uuid not in self._unpause_faults:
            return
        self._unpause_faults.discard(vdi_uuid)
        sr_uuid = self.db.get_field("SR", self.db.get_field("VDI", self.records.vdi_ref(vdi_uuid), "SR"), "uuid")
        self.log("ERROR: Failed to unpause VDI {}".format(vdi_uuid[:8]))
        self.db.create("message", uuid=str(uuidlib.uuid4()), name="failed to unpause tapdisk", priority=4, cls="SR",
                       obj_uuid=sr_uuid, timestamp=wire.now(),
                       body="Failed to unpause tapdisk for VDI {}, VMs using this tapdisk have lost access to the "
                            "corresponding disk(s)".format(vdi_uuid))
        raise SmError("Failed to unpause VDIs")
    def internal_snapshot(self, sr_uuid, image):
        """VDI.snapshot(leaf, {"type": "internal"}): the leaf is paused (sm_config:paused, its VM's I/O
        frozen) for `snapshot_seconds` while it becomes a hidden base copy under a new empty leaf of the
        same UUID; xapi marks the base copy's record is_a_snapshot. Returns the base copy's UUID."""
        temp_uuid = str(uuidlib.uuid4())
        store = self.store(sr_uuid)
        with self.sr_lock(sr_uuid), store.working_on([image.uuid]), self.frozen(image.uuid):
            self.stopping.wait(self.snapshot_seconds)
            store.rename(image.uuid, temp_uuid)
            store.set_hidden(temp_uuid, True)
            store.deflate(temp_uuid)
            store.create_leaf(image.uuid, temp_uuid, image.virtual_size)
            store.set_readonly(temp_uuid, True)
            self.update_vdi(sr_uuid, temp_uuid, parent_uuid=image.parent.uuid)
            self.update_vdi(sr_uuid, image.uuid, parent_uuid=temp_uuid)
            temp_ref = self.records.vdi_ref(temp_uuid)
            if temp_ref:
                self.db.update("VDI", temp_ref, is_a_snapshot=True, snapshot_of=self.records.vdi_ref(image.uuid),
                               snapshot_time=wire.now())
            self.step("gc.snapshot-paused")
        return temp_uuid
