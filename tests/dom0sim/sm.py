"""The storage manager of the simulated host: SR.scan, the garbage collector (GC) of each SR, the
`coalesce-leaf` plugin and the speed log, as either SM generation a host may run.

It behaves as SM's `cleanup.py` does (see shared/reference/sm-real-behaviour.md, which corrects
storage-manager.md): the GC deletes garbage, coalesces hidden single-child parents, leaf-coalesces live
(I/O frozen) or through snapshot-coalesce (each round's internal snapshot pauses the leaf too), gives
up on leaves written faster than they merge, checks free space first, renames the parent to the
leaf's UUID after a leaf coalesce, and keeps xapi's records in step. Every merge really copies data
(vhdfile.coalesce) and lasts bytes / SR speed; on a file SR it stops with ENOSPC where the SR's free
space ends, and the failure is reported as SM reports it.

Generations (`StorageManager(generation=...)`, `SimHost(..., sm="3.2"|"4.1")`; smgenerations.py says
what differs): "3.2" is what XCP-ng 8.3 ships (the default), "4.1" is XenServer 8's SM from 4.1.10.

This module is the StorageManager of the host and the VMs that keep writing; its parts live in:
    smimages.py       the VHDs of an SR as the GC sees them (Image, Forest)
    smstore.py        file and LVM stores of an SR's VHDs, SM's size arithmetic, merges out of room
    smrecords.py      SM's lookups in xapi and the VDI / SR records it keeps in step
    smgc.py           one GC run over one SR (GcPass): coalesce, leaf coalesce, snapshot-coalesce
    smgenerations.py  what differs per SM generation: flags and give-up rules (GENERATIONS)
    smmerge.py        timed merges, the speed log, merge faults, coalesce error messages
    smunits.py        the SMGC@<sr> unit, the cleanup process, background GCs, SM's locks
    smpause.py        tap-pause of a VDI, the internal snapshot of snapshot-coalesce, unpause faults
    smgates.py        the steps tests hold (`sm.gate(name)`: the list is there)
    smplugin.py       the coalesce-leaf plugin
    smlogfile.py      SMlog as SM writes it
The names tests use from these modules are also names of this one.
"""
import contextlib
import os
import threading
import time

from tests.dom0sim import lvm, smlogfile, vhdfile
from tests.dom0sim.smgates import Gates
from tests.dom0sim.smgc import DRY_RUN_PERIOD, LIVE_LEAF_COALESCE_TIMEOUT, GcPass
from tests.dom0sim.smgenerations import (DEFAULT_GENERATION, GENERATIONS, CoalesceTracker, CoalesceTrackerV41,
                                         get_generation)
from tests.dom0sim.smimages import MIB, Forest, Image
from tests.dom0sim.smmerge import SPEED_LOG_KEEP, Merges, read_speed, record_speed
from tests.dom0sim.smpause import DEFAULT_SNAPSHOT_SECONDS, Pausing
from tests.dom0sim.smplugin import PLUGIN_NAME, LeafCoalescePlugin
from tests.dom0sim.smrecords import Records, VdiRecords
from tests.dom0sim.smstore import (BLOCK_COST, MAX_FAST_RESIZE_SIZE, FileStore, LvmStore, SmError, full_lv_size,
                                   is_lvm_type, lv_size_for, make_store, overhead_bitmap, overhead_empty)
from tests.dom0sim.smunits import UNIT_POLL_PERIOD, GcUnits, write_cleanup_script
from tests.dom0sim.xapi import vm

__all__ = [
    "BLOCK_COST", "DEFAULT_GENERATION", "DEFAULT_SNAPSHOT_SECONDS", "GENERATIONS", "MAX_FAST_RESIZE_SIZE", "MIB",
    "SPEED_LOG_KEEP", "CoalesceTracker", "CoalesceTrackerV41", "FileStore", "Forest", "GcPass", "Image", "LvmStore",
    "SmError", "StorageManager", "VmWriter", "full_lv_size", "get_generation", "is_lvm_type", "lv_size_for",
    "overhead_bitmap", "overhead_empty", "read_speed", "record_speed",
]


class VmWriter(threading.Thread):
    """A running VM writing `rate` bytes/s of fresh data sequentially into its disk's leaf from
    `start_offset`, going round the whole disk: each leaf SM puts on top while it runs holds every
    block written since, as on a real host, and the disk's size bounds what the VM can fill."""

    CHUNK = 256 * 1024

    def __init__(self, sm, vm_uuid, sr_uuid, vdi_uuid, rate, start_offset=0):
        threading.Thread.__init__(self, name="writer-" + vm_uuid[:8])
        self.daemon = True
        self.sm = sm
        self.vm_uuid = vm_uuid
        self.sr_uuid = sr_uuid
        self.vdi_uuid = vdi_uuid
        self.rate = float(rate)
        self.start_offset = start_offset
        self.written = 0
        self._stop_event = threading.Event()

    @classmethod
    def chunk(cls, number):
        """The data of the VM's `number`-th write."""
        return (b"%015x\n" % number) * (cls.CHUNK // 16)

    def offset(self, number, virtual_size):
        return (self.start_offset + number * self.CHUNK) % virtual_size

    def writes(self, virtual_size):
        """[(offset, data)] of every write made so far, in order."""
        return [(self.offset(number, virtual_size), self.chunk(number))
                for number in range(self.written // self.CHUNK)]

    def stop(self):
        self._stop_event.set()
        self.join()

    def run(self):
        interval = self.CHUNK / self.rate
        deadline = time.monotonic()
        while not (self.sm.stopping.is_set() or self._stop_event.is_set()):
            deadline = max(deadline + interval, time.monotonic())
            delay = deadline - time.monotonic()
            if delay > 0 and self._stop_event.wait(delay):
                return
            self.write_chunk()

    def write_chunk(self):
        """One write while the VM runs and its disk is attached (checked under the I/O lock: a VM that
        stopped writes no more; an LV is not written before its device node is there)."""
        path = self.sm.store(self.sr_uuid).path(self.vdi_uuid)
        with self.sm.io_lock(self.vdi_uuid):
            if self.sm.vm_power_state(self.vm_uuid) != "Running" or not os.path.exists(path):
                return
            with vhdfile.Vhd.open(path, writable=True) as vhd:
                number = self.written // self.CHUNK
                vhd.write(self.offset(number, int(vhd.virtual_size)), self.chunk(number))
        self.written += self.CHUNK


class StorageManager(smlogfile.SmLogCalls, Gates, GcUnits, Merges, VdiRecords, Pausing, LeafCoalescePlugin):
    """SM on the simulated host: SR.scan, the SMGC unit and GC of each SR, the coalesce-leaf plugin,
    writing VMs. `generation` is "3.2" or "4.1" (GENERATIONS); `snapshot_seconds` is how long each
    internal VDI.snapshot of a snapshot-coalesce round keeps the leaf paused."""

    def __init__(self, state_dir, db, host_uuid, speeds=None, live_timeout=LIVE_LEAF_COALESCE_TIMEOUT,
                 gc_quiet_seconds=0.0, generation=DEFAULT_GENERATION, snapshot_seconds=DEFAULT_SNAPSHOT_SECONDS):
        self.state_dir = os.path.abspath(state_dir)
        self.db = db
        self.records = Records(db, host_uuid)
        self.generation = get_generation(generation)
        self.speeds = dict(speeds or {})
        self.live_timeout = float(live_timeout)
        self.gc_quiet_seconds = float(gc_quiet_seconds)
        self.snapshot_seconds = float(snapshot_seconds)
        self.dry_run_period = DRY_RUN_PERIOD
        self.unit_poll_period = UNIT_POLL_PERIOD
        self._gc_ran = set()
        self.run_dir = os.path.join(self.state_dir, "run")
        self.lock_dir = os.path.join(self.state_dir, "lock", "sm")
        self.unit_dir = os.path.join(self.run_dir, "systemd", "units")
        self.cleanup_path = os.path.join(self.state_dir, "bin", "cleanup")
        self.log_path = os.path.join(self.state_dir, "SMlog")
        self.smlog = smlogfile.SmLog(self.log_path)   # smlog.max_bytes: rotate past that size
        self._unpause_faults = set()
        self._coalesce_faults = {}
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._gcs = {}              # sr_uuid -> the thread of its SMGC unit or background GC
        self._io_locks = {}
        self._vdi_locks = {}
        self._sr_locks = {}
        self._sm_locks = {}
        self._gates = {}
        self._writers = []
        self._room_faults = {}      # sr_uuid -> bytes the next merge may still append (fail_merge_after)
        for directory in (self.run_dir, self.lock_dir, self.unit_dir, os.path.dirname(self.cleanup_path)):
            if not os.path.isdir(directory):
                os.makedirs(directory)
        write_cleanup_script(self.cleanup_path)

    def store(self, sr_uuid):
        sr_ref = self.records.sr_ref(sr_uuid)
        store = make_store(self.state_dir, sr_uuid, self.db.get_field("SR", sr_ref, "type"),
                           int(self.db.get_field("SR", sr_ref, "physical_size")))
        if store is not None and store.lvm:
            store.on_chain_change = lambda: self.sync_activation(sr_uuid)
        return store

    # -- LVM activation of attached VDIs --

    def attached_vdis(self, sr_uuid):
        """UUIDs of the SR's VDIs attached on this host: VDIs of VMs running or paused here."""
        host_ref = self.records.host_ref()
        sr_ref = self.records.sr_ref(sr_uuid)
        found = []
        for vm_ref in self.db.find("VM", resident_on=host_ref):
            if self.db.get_field("VM", vm_ref, "power_state") not in (vm.RUNNING, vm.PAUSED):
                continue
            for vbd_ref in self.db.get_field("VM", vm_ref, "VBDs"):
                vdi_ref = self.db.get_field("VBD", vbd_ref, "VDI")
                if self.db.exists("VDI", vdi_ref) and self.db.get_field("VDI", vdi_ref, "SR") == sr_ref:
                    found.append(self.db.get_field("VDI", vdi_ref, "uuid"))
        return found

    def sync_activation(self, sr_uuid):
        """On an LVM SR, exactly the chains of the VDIs attached on this host are held by "attach"."""
        store = make_store(self.state_dir, sr_uuid, "lvm", 0)
        if not store.exists():
            return
        names = set()
        for vdi_uuid in self.attached_vdis(sr_uuid):
            names.update(store.lv_name(uuid) for uuid in store.chain(vdi_uuid))
        store.vg.set_held(names, lvm.HOLDER_ATTACH)

    def vm_power_changed(self, vm_ref):
        """A VM started, stopped, suspended or resumed: its disks' LVs follow, their I/O held meanwhile
        (a write in flight ends first; none lands in a device node being filled or emptied)."""
        sr_uuids, vdi_uuids = set(), set()
        for vbd_ref in self.db.get_field("VM", vm_ref, "VBDs"):
            vdi_ref = self.db.get_field("VBD", vbd_ref, "VDI")
            if not self.db.exists("VDI", vdi_ref):
                continue
            vdi_uuids.add(self.db.get_field("VDI", vdi_ref, "uuid"))
            sr_ref = self.db.get_field("VDI", vdi_ref, "SR")
            if is_lvm_type(self.db.get_field("SR", sr_ref, "type")):
                sr_uuids.add(self.db.get_field("SR", sr_ref, "uuid"))
        with contextlib.ExitStack() as held:
            for vdi_uuid in sorted(vdi_uuids):
                held.enter_context(self.io_lock(vdi_uuid))
            for sr_uuid in sorted(sr_uuids):
                self.sync_activation(sr_uuid)
    def vm_power_state(self, vm_uuid):
        ref = self.records.by_uuid("VM", vm_uuid)
        return self.db.get_field("VM", ref, "power_state") if ref else None
    # -- VMs that keep writing --

    def start_writer(self, vm_uuid, sr_uuid, vdi_uuid, rate, start_offset=0):
        writer = VmWriter(self, vm_uuid, sr_uuid, vdi_uuid, rate, start_offset)
        self._writers.append(writer)
        writer.start()
        return writer

    def stop(self, timeout=30.0):
        """Stop the writers and let the GCs finish their current step."""
        self.stopping.set()
        for writer in self._writers:
            writer.stop()
        self.wait_idle(timeout)

    # -- xapi's hooks --

    def install(self):
        """Plug SR.scan and the coalesce-leaf plugin into the simulated xapi."""
        self.db.register_sr_scan(self.sr_scan)
        self.db.register_power_handler(self.vm_power_changed)
        self.db.register_plugin(PLUGIN_NAME, "leaf-coalesce", self.coalesce_leaf_plugin)
