"""Building a scenario (tests/dom0sim/scenarios.py) on the simulated host: the hosts, pool and SRs in the
xapi database, the SRs' directories or volume groups, each disk's VHD or QCOW2 chain replayed step by
step (writes, snapshots, deletions, a lost parent), VM snapshots, garbage files and hostile images;
the same UUIDs on every build with the same salt (none: the README's). The test suite salts each host
with its directory, as simulated hosts on one machine share its process table: a GC's
`cleanup -u <sr>` process of one host would be seen by the agent of another whose SR had the same
UUID (two suites run at once), which no real host sees.
"""
import contextlib
import os
import uuid as uuidlib

from tests.dom0sim import lvm, qcow2file, qcow2store, sm, smmerge, smstore, vhdfile
from tests.dom0sim.xapi import wire
from tests.dom0sim.xapi.schema import NULL_REF

MIB = 1024 * 1024
CD_SLOT = 3
UUID_NAMESPACE = uuidlib.UUID("6c6e0d5a-2f0e-4a55-9b49-64f3a3c1a0de")


def stable_uuid(*parts):
    """The same UUID for the same parts (salt, scenario, object) on every build."""
    return str(uuidlib.uuid5(UUID_NAMESPACE, ":".join(str(part) for part in parts)))


def disk_slot(position):
    """The VBD slot (userdevice) of a VM's disk at `position`: 0, 1, 2, then past the CD drive's."""
    return position if position < CD_SLOT else position + 1


def pattern(label, mib):
    """1 MiB of data that says which disk, step and MiB it belongs to."""
    line = "{} MiB {}\n".format(label, mib).encode("ascii").ljust(64, b".")[:63] + b"\n"
    return line * (MIB // 64)


class Builder(object):
    """Turns a scenario into files under the state directory and objects in the xapi database."""

    def __init__(self, host):
        self.host = host
        self.db = host.db
        self.scenario = host.scenario
        self.name = self.scenario["name"]
        self.salt = (host.uuid_salt,) if host.uuid_salt else ()
        self.host_refs = {}
        self.snapshot_vdis = {}     # (VM name, snapshot name) -> [VDI ref]
        self.stores = {}            # SR uuid -> its store

    def uuid(self, *parts):
        return stable_uuid(*self.salt + (self.name,) + parts)

    def build(self):
        db = self.db
        for index, name in enumerate(self.scenario["hosts"]):
            self.host_refs[name] = db.create("host", uuid=self.uuid("host", name), name_label=name,
                                             name_description="Default install", hostname=name,
                                             address="10.0.0.{}".format(index + 11))
        master = self.host_refs[self.scenario["master"]]
        db.create("pool", uuid=self.uuid("pool"), name_label=self.scenario["name"] + "-pool", master=master)
        self.host.host_uuid = self.uuid("host", self.scenario["this_host"])
        self.host.sm = sm.StorageManager(self.host.state_dir, db, self.host.host_uuid,
                                         live_timeout=self.scenario["live_timeout"],
                                         gc_quiet_seconds=self.scenario["gc_quiet_seconds"],
                                         generation=self.host.sm_generation,
                                         snapshot_seconds=self.host.snapshot_seconds)
        for name, ref in self.host_refs.items():
            db.create("VM", name_label="Control domain on host: " + name, is_control_domain=True,
                      power_state="Running", resident_on=ref, domid=0)
        for spec in self.scenario["srs"]:
            self.build_sr(spec)
        with contextlib.ExitStack() as batches:
            for vg in self.volume_groups():
                batches.enter_context(vg.batch())
            for spec in self.scenario["vms"]:
                self.build_vm(spec)
            for spec in self.scenario["loose"]:
                self.build_garbage_file(spec)
            self.build_vm_snapshots()
        for vg in self.volume_groups():
            self.end_activation(vg)
        for spec in self.scenario["srs"]:
            if spec["attached"]:
                self.host.sm.refresh_sr(self.host.srs[spec["key"]])

    def volume_groups(self):
        return [self.store(self.host.srs[spec["key"]]).vg for spec in self.scenario["srs"]
                if spec["attached"] and smstore.is_lvm_type(spec["type"])]

    def store(self, sr_uuid):
        """The SR's store as the build uses it: on LVM, whatever it touches stays active until the end."""
        if sr_uuid not in self.stores:
            store = self.host.sm.store(sr_uuid)
            if store.lvm:
                store.holder, store.transient, store.on_chain_change = lvm.HOLDER_BUILD, False, None
            self.stores[sr_uuid] = store
        return self.stores[sr_uuid]

    def end_activation(self, vg):
        """The build's LVs end as on a real host: only the chains of VDIs attached here stay active."""
        self.host.sm.sync_activation(vg.name[len(lvm.sr_vg_name("")):])
        vg.set_held((), lvm.HOLDER_BUILD)

    # -- SRs --

    def build_sr(self, spec):
        db = self.db
        sr_uuid = self.uuid("sr", spec["key"])
        size = spec["size_mib"] * MIB
        lvm_sr = smstore.is_lvm_type(spec["type"])
        sr_ref = db.create("SR", uuid=sr_uuid, name_label=spec["name"], type=spec["type"], shared=spec["shared"],
                           content_type="user", physical_size=size, other_config=spec["other_config"],
                           sm_config={"allocation": "thick"} if lvm_sr else {})
        self.host.srs[spec["key"]] = sr_uuid
        self.host.sm.speeds[sr_uuid] = spec["speed_mib"] * MIB
        hosts = self.scenario["hosts"] if spec["shared"] else [spec["host"] or self.scenario["master"]]
        for name in hosts:
            db.create("PBD", host=self.host_refs[name], SR=sr_ref, currently_attached=spec["attached"],
                      device_config=self.device_config(spec))
        if not spec["attached"]:
            return
        if lvm_sr:
            vg = lvm.VolumeGroup.for_sr(self.host.state_dir, sr_uuid, create=True, pv_size=size + lvm.PE_START)
            vg.create_lv("MGT", lvm.EXTENT_SIZE, holder=lvm.HOLDER_SR)
            with open(vg.lv_path("MGT"), "wb") as handle:
                handle.write(b"SR metadata\n".ljust(4096, b"\0"))
        else:
            os.makedirs(os.path.join(self.host.sr_mount, sr_uuid))
        if spec["seed_speed_log"]:
            smmerge.record_speed(self.host.sm.speed_log(sr_uuid), spec["speed_mib"] * MIB)

    @staticmethod
    def device_config(spec):
        if spec["type"] == "nfs":
            return {"server": "nfs.example.lan", "serverpath": "/export/" + spec["key"]}
        if spec["type"] == "lvmoiscsi":
            return {"target": "10.0.0.200", "targetIQN": "iqn.2026-01.lan.example:" + spec["key"],
                    "SCSIid": "36001405" + spec["key"].encode("ascii").hex()}
        return {"device": "/dev/disk/by-id/scsi-" + spec["key"]}

    def build_garbage_file(self, spec):
        store = self.store(self.host.srs[spec["sr"]])
        if store.lvm:
            uuid = spec["name"][:-len(".vhd")] if spec["name"].endswith(".vhd") else spec["name"]
            store.vg.create_lv(store.PREFIX + uuid, spec["size"], holder=store.holder)
            path = store.path(uuid)
        else:
            path = os.path.join(store.directory, spec["name"])
        with open(path, "wb") as handle:
            handle.write(b"this is not a VHD\n".ljust(spec["size"], b"\0"))

    # -- VMs and disks --

    def build_vm(self, spec):
        db = self.db
        running = spec["power_state"] in ("Running", "Paused")
        host_ref = self.host_refs[spec["host"] or self.scenario["master"]]
        vm_uuid = self.uuid("vm", spec["name"])
        vm_ref = db.create("VM", uuid=vm_uuid, name_label=spec["name"], power_state=spec["power_state"],
                           resident_on=host_ref if running else NULL_REF, affinity=host_ref,
                           domid=db.next_domid() if running else -1, tags=spec["tags"],
                           ha_restart_priority=spec["ha_restart_priority"])
        self.host.vms[spec["name"]] = vm_uuid
        for position, disk in enumerate(spec["disks"]):
            vdi_ref = self.build_disk(spec, disk)
            if vdi_ref is not None:
                slot = disk_slot(position)
                db.create("VBD", VM=vm_ref, VDI=vdi_ref, device="xvd" + "abcdefghi"[slot],
                          userdevice=str(slot), bootable=position == 0, currently_attached=running)
        self.build_cd_drive(vm_ref, currently_attached=running)

    def build_cd_drive(self, vm_ref, currently_attached=False):
        """The empty CD drive every VM made from a template has (read-only, in slot 3)."""
        self.db.create("VBD", VM=vm_ref, VDI=NULL_REF, type="CD", mode="RO", empty=True, device="xvdd",
                       userdevice=str(CD_SLOT), currently_attached=currently_attached)

    def build_disk(self, vm_spec, disk):
        db = self.db
        sr_spec = self.sr_spec(disk["sr"])
        sr_uuid = self.host.srs[disk["sr"]]
        vdi_uuid = self.uuid("vdi", disk["key"])
        self.host.vdis[disk["key"]] = vdi_uuid
        qcow2 = disk["vdi_type"] == qcow2store.QCOW2
        size = disk_size(disk)
        vdi_ref = db.create("VDI", uuid=vdi_uuid, name_label=disk["name"], SR=self.host.sr_ref(disk["sr"]),
                            virtual_size=size, location=vdi_uuid, other_config=disk["other_config"],
                            on_boot=disk["on_boot"], allow_caching=disk["allow_caching"],
                            sm_config=sm_config_of(disk))
        if not sr_spec["attached"]:
            return vdi_ref
        store = self.store(sr_uuid)
        if disk.get("hostile"):
            _Hostile(self, store, vdi_uuid, size).build(disk["hostile"])
            return vdi_ref
        if qcow2 and disk.get("bulk"):
            qcow2store.write_bulk(store, vdi_uuid, size, ())
        elif qcow2:
            store.create_qcow2(vdi_uuid, size)
        elif disk["vdi_type"] != "vhd":
            self.build_other_format(store, disk, vdi_uuid, size)
            return vdi_ref
        else:
            store.create_base(vdi_uuid, disk["size_mib"])
        chain = _DiskHistory(self, vm_spec, disk, store, vdi_uuid, vdi_ref)
        for number, step in enumerate(disk["steps"]):
            chain.apply(number, step)
        self.host.parents[disk["key"]] = chain.parent
        return None if chain.deleted else vdi_ref

    def build_other_format(self, store, disk, vdi_uuid, size):
        if store.lvm:
            store.vg.create_lv("LV-" + vdi_uuid, size, holder=store.holder)
            return
        with open(os.path.join(store.directory, vdi_uuid + ".raw"), "wb") as handle:
            handle.truncate(size)

    def sr_spec(self, key):
        for spec in self.scenario["srs"]:
            if spec["key"] == key:
                return spec
        raise KeyError("scenario {}: no SR {!r}".format(self.name, key))

    def build_vm_snapshots(self):
        db = self.db
        for (vm_name, snap_name), vdi_refs in sorted(self.snapshot_vdis.items()):
            live = [ref for ref in vdi_refs if db.exists("VDI", ref)]
            if not live:
                continue
            vm_ref = db.ref_of("VM", self.host.vms[vm_name])
            snap_ref = db.create("VM", name_label=snap_name, is_a_snapshot=True, snapshot_of=vm_ref,
                                 snapshot_time=wire.now(), power_state="Halted")
            for position, vdi_ref in enumerate(live):
                slot = disk_slot(position)
                db.create("VBD", VM=snap_ref, VDI=vdi_ref, device="xvd" + "abcdefghi"[slot],
                          userdevice=str(slot))
            self.build_cd_drive(snap_ref)


class _DiskHistory(object):
    """Replays one disk's steps on its files and records."""

    def __init__(self, builder, vm_spec, disk, store, vdi_uuid, vdi_ref):
        self.builder = builder
        self.db = builder.db
        self.vm_spec = vm_spec
        self.disk = disk
        self.store = store
        self.vdi_uuid = vdi_uuid
        self.vdi_ref = vdi_ref
        self.snapshots = {}
        self.parent = ""
        self.deleted = False
        self.bulk_clusters = {}     # QCOW2 images written whole (sparse steps): uuid -> clusters
        self.bulk_parents = {}

    def apply(self, number, step):
        getattr(self, "step_" + step[0])(number, *step[1:])

    @property
    def qcow2(self):
        return self.disk["vdi_type"] == qcow2store.QCOW2

    def step_write(self, number, offset_mib, length_mib):
        label = "{} step {}".format(self.disk["key"], number)
        if self.qcow2:
            data = b"".join(pattern(label, mib) for mib in range(offset_mib, offset_mib + length_mib))
            qcow2store.write(self.store.path(self.vdi_uuid), offset_mib * MIB, data)
            return
        with vhdfile.Vhd.open(self.store.path(self.vdi_uuid), writable=True) as vhd:
            for mib in range(offset_mib, offset_mib + length_mib):
                vhd.write(mib * MIB, pattern(label, mib))

    def step_sparse(self, number, first_block, count):
        """Blocks of 2 MiB allocated without data; on QCOW2 the first cluster of each (a disk written
        whole, `bulk`, gets it without data; others get a sector of zeros written)."""
        if self.qcow2 and not self.disk.get("bulk"):
            for block in range(first_block, first_block + count):
                qcow2store.write(self.store.path(self.vdi_uuid), block * vhdfile.BLOCK_SIZE, bytes(512))
            return
        if self.qcow2:
            per_block = vhdfile.BLOCK_SIZE // qcow2store.DEFAULT_CLUSTER_SIZE
            clusters = set(block * per_block for block in range(first_block, first_block + count))
            self.bulk_clusters[self.vdi_uuid] = self.bulk_clusters.get(self.vdi_uuid, set()) | clusters
            self.rewrite(self.vdi_uuid)
            return
        with vhdfile.Vhd.open(self.store.path(self.vdi_uuid), writable=True) as vhd:
            for block in range(first_block, first_block + count):
                vhd.allocate_block(block)

    def rewrite(self, uuid, hidden=False):
        """A QCOW2 image of this disk written again whole, with the clusters it has now."""
        parent = self.bulk_parents.get(uuid)
        backing = None
        if parent:
            backing = self.store.path(parent) if self.store.lvm else parent + qcow2store.SUFFIX
        qcow2file.write_image(self.store.path(uuid), disk_size(self.disk), self.bulk_clusters.get(uuid, ()),
                              backing=backing, hidden=hidden)

    def step_snapshot(self, number, name):
        """xapi's VDI.snapshot on a VHD SR: the leaf becomes a hidden base of two new leaves."""
        base = self.builder.uuid("base", self.disk["key"], name)
        snap = self.builder.uuid("snapshot", self.disk["key"], name)
        size = disk_size(self.disk)
        self.store.rename(self.vdi_uuid, base)
        if self.qcow2 and self.disk.get("bulk"):
            self.snapshot_bulk(base, snap)
        else:
            self.store.set_hidden(base, True)
            self.store.deflate(base)
            self.store.set_readonly(base, True)
            self.store.create_leaf(self.vdi_uuid, base, size, skip_empty_parents=False)
            self.store.create_leaf(snap, base, size, skip_empty_parents=False, inflated=False)
        record = self.db.get("VDI", self.vdi_ref)
        ref = self.db.create("VDI", uuid=snap, name_label=record["name_label"], SR=record["SR"],
                             virtual_size=size, location=snap, is_a_snapshot=True, snapshot_of=self.vdi_ref,
                             snapshot_time=wire.now(), sm_config=sm_config_of(self.disk), read_only=False)
        self.snapshots[name] = snap
        self.builder.snapshot_vdis.setdefault((self.vm_spec["name"], name), []).append(ref)
        self.parent = base

    def snapshot_bulk(self, base, snap):
        """A QCOW2 snapshot of images written whole: the base hidden, two empty children over it."""
        self.bulk_clusters[base] = self.bulk_clusters.pop(self.vdi_uuid, set())
        if self.vdi_uuid in self.bulk_parents:
            self.bulk_parents[base] = self.bulk_parents.pop(self.vdi_uuid)
        self.rewrite(base, hidden=True)
        self.store.set_readonly(base, True)
        for uuid in (self.vdi_uuid, snap):
            qcow2store.write_bulk(self.store, uuid, disk_size(self.disk), (), backing_uuid=base)
            self.bulk_parents[uuid] = base

    def step_delete_snapshot(self, number, name):
        snap = self.snapshots.pop(name)
        self.store.remove(snap)
        self.db.destroy("VDI", self.db.ref_of("VDI", snap))

    def step_delete_disk(self, number):
        self.store.remove(self.vdi_uuid)
        self.db.destroy("VDI", self.vdi_ref)
        self.deleted = True

    def step_lose_parent(self, number):
        """The parent VHD vanishes behind xapi's back: the leaf's record still names it."""
        self.store.remove(self.parent)
        self.db.update("VDI", self.vdi_ref, sm_config=dict(sm_config_of(self.disk), **{"vhd-parent": self.parent}))


def disk_size(disk):
    """A disk's virtual size: `size_mib` rounded as VHDs are (whole 2 MiB blocks)."""
    return vhdfile.rounded_size(disk["size_mib"])


def sm_config_of(disk):
    """A new VDI's sm_config: its vdi_type, and the image format on QCOW2 (XCP-ng 8.3)."""
    if disk["vdi_type"] == qcow2store.QCOW2:
        return {"vdi_type": qcow2store.QCOW2, "image-format": qcow2store.QCOW2}
    return {"vdi_type": disk["vdi_type"]}


class _Hostile(object):
    """QCOW2 images a real SR may hold that no tool should trust (scenario disk `hostile`)."""

    def __init__(self, builder, store, vdi_uuid, size):
        self.builder = builder
        self.store = store
        self.uuid = vdi_uuid
        self.size = size

    def path(self, uuid):
        return self.store.qcow2_path(uuid)

    def build(self, kind):
        getattr(self, "build_" + kind.replace("-", "_"))()

    def build_truncated_header(self):
        """The first 64 bytes of a header: the L1 table and everything after it are gone."""
        qcow2file.write_image(self.path(self.uuid), self.size, [0])
        with open(self.path(self.uuid), "r+b") as handle:
            handle.truncate(64)

    def build_backing_loop(self):
        """This image's backing file is a second one whose backing file is this one."""
        other = self.builder.uuid("loop-partner", self.uuid)
        qcow2file.write_image(self.path(self.uuid), self.size, [0], backing=other + qcow2store.SUFFIX)
        qcow2file.write_image(self.path(other), self.size, [1], backing=self.uuid + qcow2store.SUFFIX)

    def build_backing_outside(self):
        """The backing file lies outside the SR, by a relative path climbing out of it."""
        outside = os.path.join(os.path.dirname(self.store.directory), "outside.qcow2")
        qcow2file.write_image(outside, self.size, [0])
        qcow2file.write_image(self.path(self.uuid), self.size, [1], backing="../outside.qcow2")

    def build_unknown_feature(self):
        """An incompatible feature bit no reader knows (bit 63): qemu-img refuses to open it."""
        qcow2file.write_image(self.path(self.uuid), self.size, [0], incompatible=1 << 63)
