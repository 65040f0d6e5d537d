"""What SM reads and writes in xapi: the lookups cleanup.py makes (Records), and the VDI and SR records
SM keeps in step with the VHDs (VdiRecords, part of the StorageManager): SR.scan's refresh, one VDI's
update after a change, vhd-blocks, VDI.destroy, the SM_GC_NO_SPACE message.
"""
import uuid as uuidlib

from tests.dom0sim.smimages import Forest
from tests.dom0sim.xapi import wire
from tests.dom0sim.xapi.errors import XapiError

GC_NO_SPACE_KEY = "gc_no_space"
VHD_BLOCKS_KEY = "vhd-blocks"


class Records(object):
    """SM's view of the xapi database: the few lookups and updates cleanup.py makes."""

    def __init__(self, db, host_uuid):
        self.db = db
        self.host_uuid = host_uuid

    def find(self, cls, **match):
        return self.db.find(cls, **match)

    def by_uuid(self, cls, uuid):
        """The ref of the object with this uuid, or None."""
        try:
            return self.db.ref_of(cls, uuid)
        except XapiError:
            return None

    def host_ref(self):
        return self.by_uuid("host", self.host_uuid)

    def sr_ref(self, sr_uuid):
        return self.by_uuid("SR", sr_uuid)

    def vdi_ref(self, vdi_uuid):
        return self.by_uuid("VDI", vdi_uuid)

    def vdi_config(self, vdi_uuid):
        ref = self.vdi_ref(vdi_uuid)
        return self.db.get("VDI", ref) if ref else None

    def attached_pbds(self, sr_ref):
        return [self.db.get("PBD", ref) for ref in self.find("PBD", SR=sr_ref)
                if self.db.get_field("PBD", ref, "currently_attached")]

    def pool_master(self):
        pools = self.db.all("pool")
        return self.db.get_field("pool", pools[0], "master") if pools else None

    def sr_master_uuid(self, sr_ref):
        """(uuid of the SR's master, attached there?) as the coalesce-leaf plugin works it out."""
        shared = self.db.get_field("SR", sr_ref, "shared")
        master_ref = self.pool_master() if shared else None
        for pbd_ref in self.find("PBD", SR=sr_ref):
            pbd = self.db.get("PBD", pbd_ref)
            if not shared or pbd["host"] == master_ref:
                return self.db.get_field("host", pbd["host"], "uuid"), bool(pbd["currently_attached"])
        return None, False

    def is_master(self, sr_ref, host_ref):
        """cleanup.py's rule: the pool master for shared SRs, the one attached host for local ones."""
        if self.db.get_field("SR", sr_ref, "shared"):
            return self.pool_master() == host_ref
        pbds = self.attached_pbds(sr_ref)
        return len(pbds) == 1 and pbds[0]["host"] == host_ref

    def is_plugged_on(self, sr_ref, host_ref):
        return any(pbd["host"] == host_ref for pbd in self.attached_pbds(sr_ref))

    def set_map_key(self, cls, ref, field, key, value):
        """add_to_<field> / remove_from_<field> (value None)."""
        current = dict(self.db.get_field(cls, ref, field))
        if value is None:
            current.pop(key, None)
        else:
            current[key] = value
        self.db.update(cls, ref, **{field: current})

    def running_vm_of_vdi(self, vdi_uuid):
        """The uuid of the running VM whose attached VBD uses this VDI, or None."""
        ref = self.vdi_ref(vdi_uuid)
        if ref is None:
            return None
        for vbd_ref in self.db.get_field("VDI", ref, "VBDs"):
            vm_ref = self.db.get_field("VBD", vbd_ref, "VM")
            if self.db.exists("VM", vm_ref) and self.db.get_field("VM", vm_ref, "power_state") == "Running":
                return self.db.get_field("VM", vm_ref, "uuid")
        return None


class VdiRecords(object):
    """The StorageManager's side of xapi's records: VDIs and SR usage brought in line with the store."""

    def record_block_info(self, image):
        """VDI.updateBlockInfo: sm-config:vhd-blocks = base64 of the zlib-compressed `read -B` bitmap."""
        ref = self.records.vdi_ref(image.uuid)
        if ref is not None:
            self.records.set_map_key("VDI", ref, "sm_config", VHD_BLOCKS_KEY, image.block_info())
    # -- xapi records --

    def vdi_fields(self, image, parent_uuid, sm_config):
        config = dict(sm_config)
        config.setdefault("vdi_type", image.vdi_type)
        config.update(image.sm_config_keys)
        if parent_uuid:
            config["vhd-parent"] = parent_uuid
        elif parent_uuid is not None:
            config.pop("vhd-parent", None)
        return {"virtual_size": image.virtual_size, "physical_utilisation": image.physical_bytes,
                "managed": not image.hidden, "sm_config": config}

    def upsert_vdi(self, sr_ref, image, parent_uuid):
        ref = self.records.vdi_ref(image.uuid)
        if ref is None:
            fields = self.vdi_fields(image, parent_uuid, {})
            fields.update(uuid=image.uuid, location=image.uuid, SR=sr_ref, read_only=image.hidden,
                          name_label="base copy" if image.hidden else "")
            self.db.create("VDI", **fields)
        else:
            current = self.db.get_field("VDI", ref, "sm_config")
            self.db.update("VDI", ref, **self.vdi_fields(image, parent_uuid, current))

    def update_vdi(self, sr_uuid, vdi_uuid, parent_uuid=None):
        """Bring one VDI record in line with its VHD (parent_uuid "" = no parent, None = unchanged)."""
        store = self.store(sr_uuid)
        image = store.image(vdi_uuid)
        if not image.scan_error:
            self.upsert_vdi(self.records.sr_ref(sr_uuid), image, parent_uuid)
        self.update_sr_usage(sr_uuid)

    def forget_vdi(self, vdi_uuid):
        ref = self.records.vdi_ref(vdi_uuid)
        if ref is not None:
            self.db.destroy("VDI", ref)

    def update_sr_usage(self, sr_uuid):
        store = self.store(sr_uuid)
        if store is not None and store.exists():
            self.db.update("SR", self.records.sr_ref(sr_uuid), physical_utilisation=store.utilisation())

    def refresh_sr(self, sr_uuid):
        """What SR.scan does to xapi: VDI records for every VHD, vhd-parent, sizes, SR utilisation."""
        with self.sr_lock(sr_uuid):
            self._refresh_sr(sr_uuid)

    def _refresh_sr(self, sr_uuid):
        sr_ref = self.records.sr_ref(sr_uuid)
        store = self.store(sr_uuid)
        if store is None or not store.exists():
            return
        images = store.scan()
        forest = Forest(images)
        present = set()
        for image in images:
            present.add(image.uuid)
            if not image.scan_error:
                parent_uuid = image.parent.uuid if image.parent is not None else (
                    None if image in forest.orphans else "")
                self.upsert_vdi(sr_ref, image, parent_uuid)
        for ref in self.records.find("VDI", SR=sr_ref):
            record = self.db.get("VDI", ref)
            if record["sm_config"].get("vdi_type", "vhd") in ("vhd", "qcow2") and record["uuid"] not in present:
                self.db.destroy("VDI", ref)
        allocation = sum(int(self.db.get_field("VDI", ref, "virtual_size"))
                         for ref in self.records.find("VDI", SR=sr_ref))
        self.db.update("SR", sr_ref, physical_utilisation=store.utilisation(), virtual_allocation=allocation)

    def report_no_space(self, sr_ref, sr_uuid, candidates):
        """SM_GC_NO_SPACE while some merge lacks room; the message goes once everything fits."""
        message = self.db.get_field("SR", sr_ref, "sm_config").get(GC_NO_SPACE_KEY)
        if candidates:
            if message is None or not self.db.exists("message", message):
                self.log("Could not coalesce due to a lack of space in SR {}".format(sr_uuid))
                message = self.db.create("message", uuid=str(uuidlib.uuid4()), name="SM_GC_NO_SPACE", priority=3,
                                         cls="SR", obj_uuid=sr_uuid, timestamp=wire.now(),
                                         body="Unable to perform data coalesce due to a lack of space in SR "
                                              + sr_uuid)
                self.records.set_map_key("SR", sr_ref, "sm_config", GC_NO_SPACE_KEY, message)
            for vdi_uuid in candidates:
                ref = self.records.vdi_ref(vdi_uuid)
                if ref:
                    self.records.set_map_key("VDI", ref, "sm_config", GC_NO_SPACE_KEY, message)
        elif message is not None and self.db.exists("message", message):
            self.db.destroy("message", message)

    def delete_vdi(self, vdi_uuid):
        """VDI.destroy as SM's vdi_delete does it: the VHD goes (or is hidden while it has children), its
        record and VBDs go, and the SR's GC is kicked."""
        ref = self.records.vdi_ref(vdi_uuid)
        sr_uuid = self.db.get_field("SR", self.db.get_field("VDI", ref, "SR"), "uuid")
        store = self.store(sr_uuid)
        with self.sr_lock(sr_uuid):
            image = Forest(store.scan()).get(vdi_uuid)
            if image is not None and image.children:
                with store.working_on([vdi_uuid]):
                    store.set_hidden(vdi_uuid, True)
            elif image is not None:
                store.remove(vdi_uuid)
            for vbd in self.db.get_field("VDI", ref, "VBDs"):
                self.db.destroy("VBD", vbd)
            self.db.destroy("VDI", ref)
            self.update_sr_usage(sr_uuid)
        self.kick(sr_uuid)
