"""The storage manager of the simulated host: SR.scan, the garbage collector (GC) of each SR, the
`coalesce-leaf` plugin and the speed log, as either SM generation a host may run.

It behaves as SM's `cleanup.py` does (see shared/reference/sm-real-behaviour.md, which corrects
storage-manager.md): the GC deletes garbage, coalesces hidden single-child parents, leaf-coalesces live
(I/O frozen) or through snapshot-coalesce (each round's internal snapshot pauses the leaf too), gives
up on leaves written faster than they merge, checks free space first, renames the parent to the
leaf's UUID after a leaf coalesce, and keeps xapi's records in step. Every merge really copies data
(vhdfile.coalesce) and lasts bytes / SR speed; on a file SR it stops with ENOSPC where the SR's free
space ends, and the failure is reported as SM reports it.

Generations (`StorageManager(generation=...)`, `SimHost(..., sm="3.2"|"4.1")`; GENERATIONS says what
differs): "3.2" is what XCP-ng 8.3 ships (the default), "4.1" is XenServer 8's SM from 4.1.10.

How a GC is seen, as on a real host: SR.scan ends by starting the systemd unit `SMGC@<sr>` (the
`systemctl` stand-in of tests/dom0sim/systemd.py answers `is-active` for it), which runs the process
`<state>/bin/cleanup -g -u <sr>`; the GC holds the POSIX lock `<state>/lock/sm/<sr>/gc_active` for its
whole loop and `running` for each iteration (both in /proc/locks), and a "Garbage Collection" task
exists while it has work. A second GC of the same SR finds `gc_active` taken and exits at once. The
coalesce-leaf plugin runs its GC passes inside the plugin call: no process, no unit.

Steps tests can hold (`gate = sm.gate(name)`; the next thread to reach the step waits there until
`gate.release()`; `gate.wait_reached(timeout)` tells whether one got there; stopping SM releases all):
    gc.loop-start          a GC holds gc_active, before its first scan
    gc.before-merge        before any merge of a VHD into its parent (coalesce, snapshot-coalesce, leaf)
    gc.before-snapshot     before a snapshot-coalesce round's internal VDI.snapshot
    gc.snapshot-paused     inside that snapshot: the leaf paused, the base copy's record made
    plugin.start           the plugin call has begun, before its first GC pass
    plugin.before-suspend  the plugin is about to suspend the VM
    plugin.dry-run-loop    each round of the plugin's final dry run that found a candidate (4.1)
A busy VDI (SM's pause with failfast fails at once): hold `sm.vdi_lock(vdi_uuid)`.
"""
import base64
import collections
import contextlib
import errno
import fcntl
import os
import subprocess
import threading
import time
import traceback
import uuid as uuidlib
import zlib

from tests.dom0sim import lvm, smlogfile, vhdfile
from tests.dom0sim.xapi import tasks, vm, wire
from tests.dom0sim.xapi.errors import XapiError

MIB = 1024 * 1024
VHD_BLOCK_SIZE = 2 * MIB
LVM_SIZE_INCREMENT = 4 * MIB
MAX_FAST_RESIZE_SIZE = 2 * 1024 * 1024 * MIB      # LVHD preallocates metadata for 2 TiB
LIVE_LEAF_COALESCE_MAX_SIZE = 20 * MIB
LIVE_LEAF_COALESCE_TIMEOUT = 10.0
TIMEOUT_SAFETY_MARGIN = 0.5
SPEED_LOG_KEEP = 10
DEFAULT_SPEED = 200 * MIB
TMP_RENAME_PREFIX = "OLD_"
LVM_TYPES = ("lvm", "lvmoiscsi", "lvmohba", "lvhd", "lvhdoiscsi", "lvhdohba")
FILE_TYPES = ("ext", "nfs", "smb", "ocfsoiscsi", "ocfsohba", "file")
LEAF_COALESCE_KEY = "leaf-coalesce"
GC_NO_SPACE_KEY = "gc_no_space"
COALESCE_LAST_ERROR_KEY = "last-coalesce-error"
COALESCE_ERROR_RATE_KEY = "coalesce-error-rate"
DEFAULT_COALESCE_ERROR_RATE = 1.0 / 60          # xapi messages per minute about failed merges
COALESCE_ERROR_BODIES = {errno.ENOSPC: "Run out of space while coalescing.",
                         errno.EIO: "I/O error while coalescing."}
BLOCK_COST = vhdfile.BLOCK_SIZE + vhdfile.BITMAP_BYTES
OTHER_DATA_FILE = "other-data.img"
VHD_BLOCKS_KEY = "vhd-blocks"
GC_TASK_LABEL = "Garbage Collection"

PLUGIN_NAME = "coalesce-leaf"
RET_SUCCESS, RET_NOTHING_TODO, RET_NO_SUCH_VM, RET_ERROR_VM, RET_ERROR_XAPI, RET_ERROR_OTHER = range(6)
RET_MSG = {
    RET_SUCCESS: "Success",
    RET_NOTHING_TODO: "VM has no leaf-coalesceable VDIs",
    RET_NO_SUCH_VM: "VM not found",
    RET_ERROR_VM: "Failed to suspend the VM",
    RET_ERROR_XAPI: "XAPI error",
    RET_ERROR_OTHER: "Error",
}

CLEANUP_SCRIPT = """#!/bin/sh
# Stands for SM's `cleanup.py -g -u <sr>` run by the unit SMGC@<sr> while the simulated GC works on
# that SR: it lives until the storage manager closes its stdin, and exits with the last line it read.
code=0
while read -r line; do code=$line; done
exit "$code"
"""
SMGC_UNIT = "SMGC@{}.service"
GC_LOCKS = ("gc_active", "running")
DRY_RUN_PERIOD = 0.02            # seconds between the rounds of a dry run that finds work
UNIT_POLL_PERIOD = 0.02          # wait_for_completion polls the unit every 5 s on a real host
DEFAULT_SNAPSHOT_SECONDS = 0.03  # how long an internal VDI.snapshot keeps the leaf paused


class SmError(Exception):
    """An SM operation that failed; the GC logs it and skips the VDI, as SMException."""


class OutOfRoom(Exception):
    """A merge stopped by ENOSPC once `copied` bytes were in the parent."""

    def __init__(self, parent_path, copied):
        Exception.__init__(self, "{}: {}".format(parent_path, os.strerror(errno.ENOSPC)))
        self.parent_path = parent_path
        self.copied = copied


# ---- merging within the room the storage has left ----------------------------------------

def merge_growth(child_path):
    """Bytes the parent grows by when `child_path` is coalesced into it: a block for each it lacks."""
    parent_blocks = set(vhdfile.allocated_blocks(vhdfile.resolve_parent(child_path)))
    return len(set(vhdfile.allocated_blocks(child_path)) - parent_blocks) * BLOCK_COST


def coalesce_within(child_path, room):
    """`vhd-util coalesce` on storage with `room` bytes left: the child's blocks go into the parent in
    order until the next block the parent lacks does not fit (OutOfRoom). The parent keeps what was
    copied, which changes nothing the chain reads: the child holds every sector copied. Returns the
    sectors copied when everything fitted."""
    copied = 0
    with vhdfile.Vhd.open(child_path) as child:
        with vhdfile.Vhd.open(child.parent_path(), writable=True) as parent:
            grown = 0
            for block, entry in enumerate(child.bat):
                if entry == vhdfile.UNUSED:
                    continue
                if parent.bat[block] == vhdfile.UNUSED:
                    if grown + BLOCK_COST > room:
                        raise OutOfRoom(parent.path, copied * vhdfile.SECTOR_SIZE)
                    grown += BLOCK_COST
                mask = int.from_bytes(child.block_bitmap(block)[:child.spb // 8], "big")
                for first, count in vhdfile.bit_runs(mask, child.spb):
                    offset = (block * child.spb + first) * vhdfile.SECTOR_SIZE
                    parent.write(offset, child.read_own(offset, count * vhdfile.SECTOR_SIZE))
                    copied += count
    return copied


# ---- SM's size arithmetic (lvhdutil / vhdutil) -------------------------------------------

def roundup(divisor, value):
    return (value + divisor - 1) // divisor * divisor


def overhead_empty(virtual_size):
    """Metadata of an empty VHD: footers, header, locators, BAT and batmap."""
    blocks = virtual_size // MIB // 2
    overhead = roundup(512, 3 * 1024 + blocks * 4)
    return roundup(4096, overhead + blocks // 8)


def overhead_bitmap(virtual_size):
    return roundup(VHD_BLOCK_SIZE, virtual_size) // VHD_BLOCK_SIZE * 4096


def lv_size_for(vhd_size):
    """An LV holding `vhd_size` bytes of VHD (calcSizeLV)."""
    return roundup(LVM_SIZE_INCREMENT, vhd_size)


def full_lv_size(virtual_size):
    """A fully inflated VHD LV (calcSizeVHDLV): data, bitmaps and metadata for 2 TiB."""
    return lv_size_for(virtual_size + overhead_empty(MAX_FAST_RESIZE_SIZE) + overhead_bitmap(virtual_size))


def is_lvm_type(sr_type):
    return sr_type in LVM_TYPES


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


# ---- the VHD forest of one SR, as cleanup.py sees it ------------------------------------

class Image(object):
    """One VHD of an SR: its VHD facts, its place in the tree, what the GC decides about it.
    (tests/dom0sim/qcow2store.py's Qcow2Image is the same for a QCOW2 image.)"""

    vdi_type = "vhd"
    sm_config_keys = {}

    def __init__(self, uuid, path, opener=None):
        self.uuid = uuid
        self.path = path
        self.opener = opener or (lambda: vhdfile.Vhd.open(path))     # how SM reads it (LVM: the PV view)
        self.scan_error = True
        self.footer_uuid = None
        self.parent_footer_uuid = None
        self.hidden = False
        self.virtual_size = 0
        self.vhd_size = 0            # the VHD's physical size (file size / end of data)
        self.lv_size = None          # LVM SRs: the LV's size
        self.parent = None
        self.children = []
        self._blocks = None

    def load(self):
        try:
            with self.opener() as vhd:
                self.footer_uuid = str(vhd.uuid)
                self.parent_footer_uuid = str(vhd.parent_uuid) if vhd.disk_type == vhdfile.DISK_DIFF else None
                self.hidden = bool(vhd.hidden)
                self.virtual_size = int(vhd.virtual_size)
                self.vhd_size = int(vhd.physical_size)
            self.scan_error = False
        except Exception:  # anything that is not a readable VHD is a scan error, as vhd-util says
            self.scan_error = True
        return self

    @property
    def blocks(self):
        if self._blocks is None:
            with self.opener() as vhd:
                self._blocks = frozenset(index for index, entry in enumerate(vhd.bat) if entry != vhdfile.UNUSED)
        return self._blocks

    def block_bitmap(self):
        """What `vhd-util read -B` prints for this VHD: its BAT as a bitmap, MSB first."""
        with self.opener() as vhd:
            count = int(vhd.virtual_size) // vhdfile.BLOCK_SIZE
        bitmap = bytearray((count + 7) // 8)
        for block in self.blocks:
            if block < count:
                bitmap[block >> 3] |= 0x80 >> (block & 7)
        return bytes(bitmap)

    def block_info(self):
        """sm-config:vhd-blocks: base64 of the zlib-compressed bitmap."""
        return base64.b64encode(zlib.compress(self.block_bitmap())).decode("ascii")

    @property
    def allocated_size(self):
        return len(self.blocks) * VHD_BLOCK_SIZE

    @property
    def physical_bytes(self):
        return self.vhd_size if self.lv_size is None else self.lv_size

    def is_coalesceable(self):
        return (not self.scan_error and self.parent is not None and len(self.parent.children) == 1
                and self.hidden and len(self.children) > 0)

    def is_leaf_coalesceable(self):
        return (not self.scan_error and self.parent is not None and len(self.parent.children) == 1
                and not self.hidden and not self.children)

    def prunable(self):
        """This image's subtree part that is garbage: hidden VHDs with no live descendant."""
        if not self.children:
            return [self] if (not self.scan_error and self.hidden) else []
        found = []
        whole = True
        for child in self.children:
            below = child.prunable()
            found.extend(below)
            if child not in below:
                whole = False
        if whole and not self.scan_error:
            found.append(self)
        return found

    def root(self):
        node = self
        while node.parent is not None:
            node = node.parent
        return node

    def height(self):
        return 1 + max([child.height() for child in self.children] or [0])

    def depth(self):
        depth, node = 1, self
        while node.parent is not None:
            depth, node = depth + 1, node.parent
        return depth

    def coalesced_data_size(self):
        return len(self.blocks | self.parent.blocks) * VHD_BLOCK_SIZE


class Forest(object):
    """All VHDs of an SR linked into trees; `orphans` are children whose parent is missing."""

    def __init__(self, images):
        self.images = dict((image.uuid, image) for image in images)
        by_footer = dict((image.footer_uuid, image) for image in images if not image.scan_error)
        self.roots = []
        self.orphans = []
        for image in sorted(images, key=lambda item: item.uuid):
            parent = by_footer.get(image.parent_footer_uuid) if image.parent_footer_uuid else None
            if parent is not None:
                image.parent = parent
                parent.children.append(image)
            else:
                self.roots.append(image)
                if image.parent_footer_uuid and not image.uuid.startswith(TMP_RENAME_PREFIX):
                    self.orphans.append(image)

    def get(self, uuid):
        return self.images.get(uuid)

    def garbage(self):
        found = []
        for root in self.roots:
            found.extend(root.prunable())
        return found

    def coalesceable(self):
        return sorted((image for image in self.images.values() if image.is_coalesceable()),
                      key=lambda image: (-image.root().height(), image.uuid))

    def leaf_coalesceable(self):
        return sorted((image for image in self.images.values() if image.is_leaf_coalesceable()),
                      key=lambda image: image.uuid)


# ---- where an SR's VHDs live --------------------------------------------------------------

class VhdOperations(object):
    """What SM does to one VHD of a store (its LV active, on LVM)."""

    def set_hidden(self, uuid, hidden):
        with vhdfile.Vhd.open(self.path(uuid), writable=True) as vhd:
            vhd.set_hidden(hidden)

    def set_parent(self, uuid, parent_uuid):
        vhdfile.set_parent(self.path(uuid), self.link_path(parent_uuid))

    def coalesce(self, child_path):
        """`vhd-util coalesce`: bytes merged into the parent."""
        return vhdfile.coalesce(child_path) * vhdfile.SECTOR_SIZE


class FileStore(VhdOperations):
    """A file SR: DIR/sr-mount/<sr>/<uuid>.vhd."""

    lvm = False

    def __init__(self, state_dir, sr_uuid, physical_size):
        self.sr_uuid = sr_uuid
        self.directory = os.path.join(state_dir, "sr-mount", sr_uuid)
        self.physical_size = physical_size

    def exists(self):
        return os.path.isdir(self.directory)

    def path(self, uuid):
        return os.path.join(self.directory, uuid + ".vhd")

    def link_path(self, uuid):
        """The path a child VHD names this one by."""
        return self.path(uuid)

    def image(self, uuid):
        return Image(uuid, self.path(uuid)).load()

    @contextlib.contextmanager
    def working_on(self, uuids):
        """File SRs need no activation."""
        yield

    def set_readonly(self, uuid, readonly):
        """File SRs have no read-only flag of their own."""

    def scan(self):
        images = []
        for name in sorted(os.listdir(self.directory)):
            if name.endswith(".vhd"):
                images.append(Image(name[:-len(".vhd")], os.path.join(self.directory, name)).load())
        return images

    def utilisation(self):
        total = 0
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if os.path.isfile(path):
                total += os.path.getsize(path)
        return total

    def free_space(self):
        return self.physical_size - self.utilisation()

    def take_room(self, nbytes):
        """Another writer on the same storage uses `nbytes` more (a sparse file in the SR here)."""
        path = os.path.join(self.directory, OTHER_DATA_FILE)
        size = os.path.getsize(path) if os.path.exists(path) else 0
        with open(path, "ab") as handle:
            handle.truncate(size + max(0, int(nbytes)))

    def create_base(self, uuid, size_mib):
        vhdfile.create(self.path(uuid), size_mib)

    def create_leaf(self, uuid, parent_uuid, virtual_size, skip_empty_parents=True, inflated=True):
        vhdfile.snapshot(self.path(uuid), self.path(parent_uuid), skip_empty_parents)

    def remove(self, uuid):
        os.unlink(self.path(uuid))

    def rename(self, old, new):
        if os.path.exists(self.path(new)):
            raise SmError("{} exists".format(self.path(new)))
        os.rename(self.path(old), self.path(new))

    def inflate(self, uuid, size):
        """File SRs grow on demand."""

    def deflate(self, uuid):
        """File SRs hold no slack."""

    def merge_growth(self, child_path):
        return merge_growth(child_path)

    def coalesce_within(self, child_path, room):
        return coalesce_within(child_path, room) * vhdfile.SECTOR_SIZE

    def extra_for_coalesce(self, image):
        data = image.coalesced_data_size()
        merged = data + overhead_bitmap(data) + overhead_empty(image.virtual_size)
        return merged - image.parent.vhd_size

    def extra_for_leaf_coalesce(self, image):
        return self.extra_for_coalesce(image)

    def extra_for_snapshot_coalesce(self, image):
        return self.extra_for_coalesce(image) + overhead_empty(image.virtual_size)


class LvmStore(VhdOperations):
    """An LVM SR: VG_XenStorage-<sr> with LVs VHD-<uuid> (tests/dom0sim/lvm.py).

    Scans read every LV through its PV view, as `vhd-util scan -l` (no activation). Whatever reads
    blocks, writes, inflates, deflates or relinks a VHD activates the LVs first, held by `holder`,
    and lets go after (`transient=False` while a scenario is built: what it touches stays active).
    `on_chain_change` is called before letting go, so that attached chains stay active as they change.
    """

    lvm = True
    PREFIX = "VHD-"

    def __init__(self, state_dir, sr_uuid, holder=None, transient=True):
        self.sr_uuid = sr_uuid
        self.vg = lvm.VolumeGroup.for_sr(state_dir, sr_uuid)
        self.holder = holder or lvm.HOLDER_GC
        self.transient = transient
        self.on_chain_change = None
        self._held = []         # the LV name sets of the working_on blocks in progress

    def exists(self):
        return self.vg.exists()

    def lv_name(self, uuid):
        return self.PREFIX + uuid

    def path(self, uuid):
        """The LV's device node (/dev/<VG>/VHD-<uuid>), present while the LV is active."""
        return self.vg.lv_path(self.lv_name(uuid))

    def opener(self, uuid):
        return lambda: self.vg.open_vhd(self.PREFIX + uuid)

    def image(self, uuid):
        image = Image(uuid, self.path(uuid), self.opener(uuid)).load()
        image.lv_size = self.vg.lv_size(self.PREFIX + uuid)
        return image

    def scan(self):
        images = []
        with self.vg.reading():
            for lv in self.vg.lvs():
                if lv["name"].startswith(self.PREFIX):
                    uuid = lv["name"][len(self.PREFIX):]
                    image = Image(uuid, self.path(uuid), self.opener(uuid)).load()
                    image.lv_size = lv["size"]
                    images.append(image)
        return images

    def chain(self, uuid):
        """[uuid, its parent, ...]: the LVs a VHD needs active to be read, from the parent names in
        the headers (read through the PV view)."""
        found = []
        while uuid is not None and uuid not in found:
            parent, readable = self.parent_of(uuid)
            if not readable:
                break
            found.append(uuid)
            uuid = parent
        return found

    def parent_of(self, uuid):
        """(the parent's uuid or None, whether the image could be read) from its header."""
        try:
            with self.vg.open_vhd(self.PREFIX + uuid, fast=True) as vhd:
                parent = vhd.header.parent_name if vhd.disk_type == vhdfile.DISK_DIFF else None
        except (lvm.LvmError, vhdfile.VhdError):
            return None, False
        name = lvm.lv_name_of(parent) if parent else None
        return (name[len(self.PREFIX):] if name and name.startswith(self.PREFIX) else None), True

    @contextlib.contextmanager
    def holding(self, names, chain_changes=False):
        """These LVs active (held by `holder`) for the block; `chain_changes`: the block may change
        chains, so attached chains are brought in line before letting go."""
        names = set(names)
        self.vg.activate(names, self.holder)
        self._held.append(names)
        try:
            yield
        finally:
            self._held.remove(names)
            if chain_changes and self.on_chain_change is not None:
                self.on_chain_change()
            if self.transient:
                self.vg.deactivate(names, self.holder)

    def working_on(self, uuids):
        """The chains of these VHDs active for the block (lvhd's activateChain)."""
        names = set()
        for uuid in uuids:
            names.update(self.lv_name(link) for link in self.chain(uuid))
        return self.holding(names, chain_changes=True)

    def utilisation(self):
        return sum(lv["size"] for lv in self.vg.lvs())

    def free_space(self):
        free = self.vg.free_bytes()
        return free if free is not None else 1 << 60

    def link_path(self, uuid):
        """The LV's device node under its device-mapper name (`VG_XenStorage--<sr>-VHD--<uuid>`), which
        children name their parent by."""
        return self.vg.dm_path(self.PREFIX + uuid)

    def create_base(self, uuid, size_mib):
        """A new writable VHD in a fully inflated LV."""
        name = self.PREFIX + uuid
        self.vg.create_lv(name, full_lv_size(vhdfile.rounded_size(size_mib)), holder=self.holder)
        vhdfile.create(self.path(uuid), size_mib)
        if self.transient:
            self.vg.deactivate([name], self.holder)

    def create_leaf(self, uuid, parent_uuid, virtual_size, skip_empty_parents=True, inflated=True):
        """A new child of `parent_uuid`: a writable leaf (fully inflated) or, for a snapshot VDI that
        nobody writes to, an LV just big enough for the empty VHD."""
        size = full_lv_size(virtual_size) if inflated else lv_size_for(overhead_empty(virtual_size) + 4096)
        name = self.PREFIX + uuid
        with self.working_on([parent_uuid]):
            self.vg.create_lv(name, size, holder=self.holder)
            vhdfile.snapshot(self.path(uuid), self.link_path(parent_uuid), skip_empty_parents)
            if self.transient:
                self.vg.deactivate([name], self.holder)

    def remove(self, uuid):
        self.vg.remove_lv(self.lv_name(uuid))

    def rename(self, old, new):
        """lvrename (the LV keeps its prefix); the holds SM has on the LV follow it (lvActivator.replace)."""
        old_name = self.lv_name(old)
        new_name = old_name[:-len(old)] + new
        self.vg.rename_lv(old_name, new_name)
        for names in self._held:
            if old_name in names:
                names.discard(old_name)
                names.add(new_name)

    def set_readonly(self, uuid, readonly):
        self.vg.set_readonly(self.lv_name(uuid), readonly)

    def inflate(self, uuid, size):
        """Grow the LV to `size` (rounded to 4 MiB) if it is smaller; LvmError when the VG is full."""
        name = self.lv_name(uuid)
        with self.holding([name]):
            if lv_size_for(size) > self.vg.lv_size(name):
                self.vg.resize_lv(name, lv_size_for(size))

    def deflate(self, uuid):
        """Shrink the LV to its VHD's physical size rounded up to 4 MiB."""
        name = self.PREFIX + uuid
        with self.holding([name]):
            with vhdfile.Vhd.open(self.path(uuid)) as vhd:
                wanted = lv_size_for(int(vhd.physical_size))
            if wanted < self.vg.lv_size(name):
                self.vg.resize_lv(name, wanted)

    def full_size(self, image):
        """The LV size of the image fully inflated (calcSizeVHDLV)."""
        return full_lv_size(image.virtual_size)

    def extra_for_coalesce(self, image):
        return full_lv_size(image.coalesced_data_size()) - image.parent.lv_size

    def extra_for_leaf_coalesce(self, image):
        deflate_gain = image.lv_size - lv_size_for(image.vhd_size)
        return self.extra_for_coalesce(image) - deflate_gain

    def extra_for_snapshot_coalesce(self, image):
        return self.extra_for_coalesce(image) + lv_size_for(image.vhd_size)


def make_store(state_dir, sr_uuid, sr_type, physical_size):
    """The SR's store, holding its VHDs and QCOW2 images (qcow2store builds on this module)."""
    from tests.dom0sim import qcow2store
    if is_lvm_type(sr_type):
        return qcow2store.LvmSrStore(state_dir, sr_uuid)
    if sr_type in FILE_TYPES:
        return qcow2store.FileSrStore(state_dir, sr_uuid, physical_size)
    return None


# ---- what SM reads and writes in xapi -------------------------------------------------------

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


# ---- one GC pass over one SR ---------------------------------------------------------------

class CoalesceTracker(object):
    """When SM 3.2 gives up snapshot-coalescing a leaf that does not shrink: a round whose leaf ends no
    bigger than it started counts as progress; one that ends bigger counts against it, and the leaf is
    given up after too many such rounds, too many rounds in all (judged only after a round without
    progress), or a second bump past 1.2 x the smallest size seen. `log` gets the lines SM writes to
    SMlog."""

    GRACE_ITERATIONS = 2
    MAX_ITERATIONS_NO_PROGRESS = 3
    MAX_ITERATIONS = 10
    MAX_INCREASE_FROM_MINIMUM = 1.2

    def __init__(self, log=None, sm_log=None):
        self.log = log or (lambda text: None)
        self.sm_log = sm_log or self.log
        self.iterations = 0
        self.no_progress = 0
        self.minimum = float("inf")
        self.grace = self.GRACE_ITERATIONS
        self.history = []
        self.reason = ""
        self.start_size = None
        self.finish_size = None

    def give_up(self, before, after):
        self.iterations += 1
        self.history.append("Iteration: {} -- Initial size {} --> Final size {}".format(
            self.iterations, before, after))
        self.finish_size = after
        if self.start_size is None:
            self.start_size = before
        self.minimum = min(self.minimum, before, after)
        if self.made_progress(before, after):
            return False
        self.no_progress += 1
        self.log("No progress, attempt: {}".format(self.no_progress))
        return self.exhausted(after)

    def made_progress(self, before, after):
        return self.iterations == 1 or before >= after

    def exhausted(self, after):
        if self.iterations > self.MAX_ITERATIONS:
            self.reason = "Max iterations ({}) exceeded".format(self.MAX_ITERATIONS)
            return True
        if self.no_progress > self.MAX_ITERATIONS_NO_PROGRESS:
            self.reason = "No progress made for {} iterations".format(self.MAX_ITERATIONS_NO_PROGRESS)
            return True
        if after > self.MAX_INCREASE_FROM_MINIMUM * self.minimum:
            self.grace -= 1
            if self.grace == 0:
                self.reason = "Unexpected bump in size, compared to minimum achieved"
                return True
        return False

    def log_sizes(self):
        self.log("Starting size was         {}".format(self.start_size))
        self.log("Final size was            {}".format(self.finish_size))
        self.log("Minimum size achieved was {}".format(self.minimum))

    def log_reasoning(self):
        """Why the leaf was given up, round by round."""
        self.log("Aborted coalesce")
        for line in self.history + [self.reason]:
            self.log(line)
        self.log_sizes()

    def log_summary(self):
        """After snapshot-coalesce rounds that shrank the leaf enough for a live merge."""
        if self.iterations:
            self.log("Coalesce summary")
            self.log("Performed {} iterations".format(self.iterations))
            self.log_sizes()


class CoalesceTrackerV41(CoalesceTracker):
    """SM 4.1.10+: up to 20 rounds, no judgement before the fourth, and a round also counts as progress
    when the leaf ends below the mean of every round's final size (logged by SM as "Calculated moving
    average", under the SM ident)."""

    MAX_ITERATIONS = 20
    FIRST_JUDGED_ITERATION = 4

    def __init__(self, log=None, sm_log=None):
        CoalesceTracker.__init__(self, log, sm_log)
        self.final_sizes = []

    def give_up(self, before, after):
        self.final_sizes.append(after)
        return CoalesceTracker.give_up(self, before, after)

    def made_progress(self, before, after):
        if self.iterations < self.FIRST_JUDGED_ITERATION or before >= after:
            return True
        average = sum(self.final_sizes) / len(self.final_sizes)
        self.sm_log("Calculated moving average as {}".format(average))
        return after < average


class Generation(object):
    """What differs between the SM generations the simulated host can run."""

    def __init__(self, name, tracker, plugin_waits_for_gc, plugin_final_dry_run, keeps_vhd_parent,
                 logs_fatal_errors):
        self.name = name
        self.tracker = tracker                            # the CoalesceTracker class
        self.plugin_waits_for_gc = plugin_waits_for_gc    # wait_for_completion after the first pass
        self.plugin_final_dry_run = plugin_final_dry_run  # else a background GC with the quiet period
        self.keeps_vhd_parent = keeps_vhd_parent          # sm_config:vhd-parent left on the old parent
        self.logs_fatal_errors = logs_fatal_errors        # run_gc logs them; 3.2 raises (the journal)


GENERATIONS = {
    # XCP-ng 8.3: v3.2.12 (xcp-ng/sm 3.2.12-8.3)
    "3.2": Generation("3.2", CoalesceTracker, plugin_waits_for_gc=False, plugin_final_dry_run=False,
                      keeps_vhd_parent=False, logs_fatal_errors=False),
    # XenServer 8: v4.1.10 and later
    "4.1": Generation("4.1", CoalesceTrackerV41, plugin_waits_for_gc=True, plugin_final_dry_run=True,
                      keeps_vhd_parent=True, logs_fatal_errors=True),
}
DEFAULT_GENERATION = "3.2"


def get_generation(name):
    """The Generation called `name` ("3.2" or "4.1"); ValueError for any other."""
    try:
        return GENERATIONS[str(name)]
    except KeyError:
        raise ValueError("unknown SM generation {!r}: one of {}".format(
            name, ", ".join(sorted(GENERATIONS)))) from None


class CommandException(SmError):
    """A command SM runs failed (util.CommandException)."""


class Aborted(SmError):
    """The GC was told to stop (SM stopping): cleanup.py's AbortException."""


class GcPass(object):
    """cleanup.py's _gcLoop for one SR: garbage, then one coalesce or one leaf coalesce, rescan, repeat.

    A dry run (`dry_run`) logs what it would do and changes nothing, so it keeps going round while
    there is work, as SM's does."""

    def __init__(self, sm, sr_uuid, quiet_seconds=0.0, dry_run=False):
        self.sm = sm
        self.quiet_seconds = quiet_seconds
        self.dry_run = dry_run
        self.task = None
        self.done = 0
        self.records = sm.records
        self.sr_uuid = sr_uuid
        self.sr_ref = self.records.sr_ref(sr_uuid)
        self.store = sm.store(sr_uuid)
        self.failed = set()
        self.no_space = {}
        self.log = sm.log

    # -- the loop --

    def run(self):
        """One GC run: gc_active for the whole run (or exit at once), a "Garbage Collection" task only
        while there is work."""
        if not self.enabled():
            return
        gc_active = self.sm.sm_lock(self.sr_uuid, "gc_active")
        with self.sm.sr_lock(self.sr_uuid):      # LockActive: not while another holds the SR lock
            acquired = gc_active.acquire_noblock()
        if not acquired:
            self.log("Another GC instance already active, exiting")
            return
        try:
            self.sm.step("gc.loop-start")
            try:
                self.run_locked()
            finally:
                self.log("GC process exiting, no work left")
        finally:
            gc_active.release()
            self.report_no_space()

    def run_locked(self):
        if not self.has_work(self.scan()):
            self.log("No work, exiting")
            return
        self.task = tasks.create(self.sm.db, GC_TASK_LABEL, "Garbage collection for SR " + self.sr_uuid,
                                 other_config={"applies_to": self.sr_ref})
        try:
            self.pause()
            self.loop()
        finally:
            self.sm.db.destroy("task", self.task)

    def has_work(self, forest):
        return bool(forest.garbage() or self.find_coalesceable(forest) or self.find_leaf_coalesceable(forest))

    def pause(self):
        """The quiet period a background GC (not immediate) keeps before working once the SR had a GC."""
        if self.quiet_seconds > 0:
            self.log("GC active, about to go quiet")
            self.sm.stopping.wait(self.quiet_seconds)
            self.log("GC active, quiet period ended")

    def loop(self):
        while True:
            if self.sm.stopping.is_set():
                self.log("Term requested")
                return
            if not self.has_work(self.scan()):
                self.log("No work, exiting")
                return
            with self.sm.held(self.sm.sm_lock(self.sr_uuid, "running")):
                self.iteration()
            if self.dry_run:
                self.sm.step("plugin.dry-run-loop")
                self.sm.stopping.wait(self.sm.dry_run_period)

    def iteration(self):
        forest = self.scan()
        if not self.dry_run:
            self.update_block_info(forest)
        self.report_progress(forest)
        garbage = forest.garbage()
        if garbage:
            self.log("Found {} VDIs for deletion:".format(len(garbage)))
            for image in garbage:
                self.log("  {}".format(self.sm.label(image)))
            if not self.dry_run:
                for image in garbage:
                    self.log("Deleting unlinked VDI {}".format(self.sm.label(image)))
                    self.delete(image)
            forest = self.scan()
        candidate = self.find_coalesceable(forest)
        if candidate is not None:
            self.log("Coalescing {} -> {}".format(self.sm.label(candidate), self.sm.label(candidate.parent)))
            if not self.dry_run:
                self.coalesce(candidate)
            self.done += 1
            return
        candidate = self.find_leaf_coalesceable(forest)
        if candidate is not None:
            self.log("Leaf-coalescing {} -> {}".format(self.sm.label(candidate), self.sm.label(candidate.parent)))
            if not self.dry_run:
                self.coalesce_leaf(candidate)
            self.done += 1

    def report_progress(self, forest):
        """The task's progress counts pairs, as SM's does: done / (done + coalesceable now)."""
        pending = len(forest.coalesceable()) + len(forest.leaf_coalesceable())
        if self.task is not None and self.done + pending:
            tasks.set_progress(self.sm.db, self.task, float(self.done) / (self.done + pending))

    def enabled(self):
        if self.switch("gc") == "false":
            self.log("GC is disabled for this SR, abort")
            return False
        return True

    def switch(self, key):
        return self.sr_field("other_config").get(key)

    def sr_field(self, name):
        return self.sm.db.get_field("SR", self.sr_ref, name)

    def scan(self):
        forest = Forest(self.store.scan())
        if forest.orphans:
            orphan = forest.orphans[0]
            raise SmError("Parent VDI {} of {} not found".format(orphan.parent_footer_uuid, orphan.uuid))
        return forest

    def update_block_info(self, forest):
        """SR.updateBlockInfo: every VHD with children gets sm-config:vhd-blocks if it lacks it."""
        for image in forest.images.values():
            if not image.scan_error and image.children and self.vdi_setting(image, "sm_config",
                                                                            VHD_BLOCKS_KEY) is None:
                self.sm.record_block_info(image)

    def vdi_setting(self, image, field, key=None):
        record = self.records.vdi_config(image.uuid)
        if record is None:
            return None
        return record[field].get(key) if key else record[field]

    # -- candidates --

    def find_coalesceable(self, forest):
        if self.switch("coalesce") == "false":
            self.log("Coalesce disabled for this SR")
            return None
        free = self.store.free_space()
        for candidate in forest.coalesceable():
            if candidate.uuid in self.failed:
                continue
            if self.store.extra_for_coalesce(candidate) <= free:
                self.log("Coalesce candidate: {} (tree height {})".format(self.sm.label(candidate),
                                                                          candidate.root().height()))
                self.no_space.pop(candidate.uuid, None)
                return candidate
            self.no_space[candidate.uuid] = candidate
            self.log("No space to coalesce {} (free space: {})".format(self.sm.label(candidate), free))
        return None

    def find_leaf_coalesceable(self, forest):
        if self.switch("coalesce") == "false":
            self.log("Coalesce disabled for this SR")
            return None
        if self.switch(LEAF_COALESCE_KEY) == "false":
            self.log("Leaf-coalesce disabled for this SR")
            return None
        free = self.store.free_space()
        for candidate in forest.leaf_coalesceable():
            if candidate.uuid in self.failed or not self.leaf_allowed(candidate):
                continue
            needed = self.store.extra_for_snapshot_coalesce(candidate)
            needed_live = needed
            if needed > free:
                needed_live = self.store.extra_for_leaf_coalesce(candidate)
                if self.can_live_coalesce(candidate):
                    needed = needed_live
            if needed <= free:
                self.log("Leaf-coalesce candidate: {}".format(self.sm.label(candidate)))
                self.no_space.pop(candidate.uuid, None)
                return candidate
            self.log("No space to leaf-coalesce {} (free space: {})".format(self.sm.label(candidate), free))
            if needed_live <= free:
                self.log("...but enough space if skip snap-coalesce")
                self.set_leaf_coalesce(candidate.uuid, "offline")
            self.no_space[candidate.uuid] = candidate
        return None

    def leaf_allowed(self, image):
        record = self.records.vdi_config(image.uuid)
        if record is None:
            return False
        if record["on_boot"] == "reset":
            self.log("Skipping reset-on-boot {}".format(self.sm.label(image)))
            return False
        if record["allow_caching"]:
            self.log("Skipping allow_caching=true {}".format(self.sm.label(image)))
            return False
        if record["other_config"].get(LEAF_COALESCE_KEY) == "false":
            self.log("Leaf-coalesce disabled for {}".format(self.sm.label(image)))
            return False
        return True

    def forced(self, image):
        return self.vdi_setting(image, "other_config", LEAF_COALESCE_KEY) == "force"

    def can_live_coalesce(self, image):
        """VDI.canLiveCoalesce: floor(allocated / speed) strictly under half the timeout, or without a
        speed figure under 20 MiB allocated; a forced leaf always."""
        speed = read_speed(self.sm.speed_log(self.sr_uuid))
        allowed = TIMEOUT_SAFETY_MARGIN * self.sm.live_timeout
        if speed:
            feasible = image.allocated_size // speed < allowed
        else:
            feasible = image.allocated_size < LIVE_LEAF_COALESCE_MAX_SIZE
        return feasible or self.forced(image)

    # -- deleting, coalescing a hidden parent --

    def delete(self, image):
        with self.sm.sr_lock(self.sr_uuid):
            self.store.remove(image.uuid)
            self.sm.forget_vdi(image.uuid)

    def coalesce(self, image):
        """Merge a hidden single-child VHD into its parent, relink its children, delete it."""
        self.sm.step("gc.before-merge")
        parent = image.parent
        try:
            with self.store.working_on([image.uuid] + [child.uuid for child in image.children]):
                self.coalesce_onto_parent(image)
            with self.sm.sr_lock(self.sr_uuid):
                for child in image.children:
                    self.log("  Relinking {} from {} to {}".format(child.uuid, image.uuid, parent.uuid))
                    with self.store.working_on([child.uuid]), self.sm.io_lock(child.uuid):
                        self.store.set_parent(child.uuid, parent.uuid)
                    self.sm.update_vdi(self.sr_uuid, child.uuid, parent_uuid=parent.uuid)
                self.delete(image)
                self.sm.update_vdi(self.sr_uuid, parent.uuid)
        except Aborted:
            raise
        except (SmError, lvm.LvmError, vhdfile.VhdError, OSError) as exc:
            self.failed.add(image.uuid)
            self.sm.log_exception("coalesce", exc)
            self.log("Coalesce failed, skipping")

    def coalesce_onto_parent(self, image):
        """_doCoalesce: the parent made writable and inflated, the merge, the parent deflated, read-only
        again and its vhd-blocks brought up to date."""
        parent = image.parent
        self.store.set_readonly(parent.uuid, False)
        try:
            if self.store.lvm:
                extra = self.store.extra_for_coalesce(image)
                if extra > 0:
                    self.store.inflate(parent.uuid, parent.lv_size + extra)
            try:
                with self.sm.smlog.child():
                    self.log("  Running VHD coalesce on {}".format(self.sm.label(image)))
                self.sm.timed_merge(self.sr_uuid, image.path)
                self.log("  Child process completed successfully")
            finally:
                self.store.deflate(parent.uuid)
        finally:
            self.store.set_readonly(parent.uuid, True)
        self.sm.record_block_info(self.store.image(parent.uuid))

    # -- leaf coalesce --

    def set_leaf_coalesce(self, vdi_uuid, value):
        ref = self.records.vdi_ref(vdi_uuid)
        if ref:
            self.records.set_map_key("VDI", ref, "other_config", LEAF_COALESCE_KEY, value)

    def coalesce_leaf(self, image):
        vdi_uuid = image.uuid
        try:
            tracker = self.sm.generation.tracker(self.log, self.sm.sm_log)
            while not self.can_live_coalesce(image):
                if self.sm.stopping.is_set():
                    raise Aborted("Aborting due to signal")
                before = image.vhd_size
                image = self.snapshot_coalesce(image)
                if image is None:
                    return
                if tracker.give_up(before, image.vhd_size):
                    tracker.log_reasoning()
                    raise SmError("VDI {} could not be coalesced".format(vdi_uuid))
            tracker.log_summary()
            self.live_leaf_coalesce(vdi_uuid)
        except Aborted:
            raise
        except (SmError, lvm.LvmError, vhdfile.VhdError, OSError) as exc:
            self.failed.add(vdi_uuid)
            self.sm.log_exception("leaf-coalesce", exc)
            self.log("Leaf-coalesce failed on {}, skipping".format(self.sm.label(image) if image else vdi_uuid[:8]))
        finally:
            self.set_leaf_coalesce(vdi_uuid, None)

    def snapshot_coalesce(self, image):
        """Single-snapshot the leaf, coalesce the temporary snapshot away; the leaf as it is now, or None."""
        self.log("Single-snapshotting {}".format(self.sm.label(image)))
        self.sm.step("gc.before-snapshot")
        temp_uuid = self.sm.internal_snapshot(self.sr_uuid, image)
        self.log("Single-snapshot returned: {}".format(self.records.vdi_ref(temp_uuid)))
        forest = self.scan()
        temp = forest.get(temp_uuid)
        if temp is None or not temp.is_coalesceable():
            self.log("The VDI appears to have been concurrently snapshotted")
            return None
        self.log("Coalescing parent {}".format(self.sm.label(temp)))
        self.coalesce(temp)
        leaf = self.scan().get(image.uuid)
        if leaf is None or not leaf.is_leaf_coalesceable():
            self.log("The VDI tree appears to have been altered since")
            return None
        return leaf

    def live_leaf_coalesce(self, vdi_uuid):
        """Pause the VDI (failing at once if it is busy), merge the leaf into its parent, give the parent
        the leaf's name. The leaf's vhd-parent goes when there is no grandparent; otherwise SM 4.1 leaves
        it naming the old parent (until the next SR.scan) and SM 3.2 deletes it all the same."""
        self.sm.step("gc.before-merge")
        image = self.scan().get(vdi_uuid)
        if image is None or not image.is_leaf_coalesceable():
            self.log("The VDI is no longer leaf-coalesceable")
            return
        parent = image.parent
        timeout = None if self.forced(image) else self.sm.live_timeout
        if timeout is None:
            self.log("Leaf-coalesce forced, will not use timeout")
        old_uuid = TMP_RENAME_PREFIX + vdi_uuid
        with self.sm.sr_lock(self.sr_uuid), self.store.working_on([vdi_uuid]), self.sm.frozen(vdi_uuid, failfast=True):
            self.store.set_readonly(parent.uuid, False)
            if self.store.lvm:
                self.store.deflate(vdi_uuid)
                self.store.inflate(parent.uuid, self.store.full_size(parent))
            self.set_hidden(parent.uuid, False)
            try:
                self.sm.timed_merge(self.sr_uuid, image.path, timeout)
            except SmError as exc:
                if str(exc) == "Timed out":
                    self.sm.log_exception("_doCoalesceLeaf", exc)
                    self.log("*** UNDO LEAF-COALESCE")
                self.set_hidden(parent.uuid, True)
                self.store.deflate(parent.uuid)
                self.store.set_readonly(parent.uuid, True)
                if str(exc) == "Timed out":
                    self.log("*** leaf-coalesce undo successful")
                raise
            self.store.rename(vdi_uuid, old_uuid)
            self.store.rename(parent.uuid, vdi_uuid)
            self.set_hidden(old_uuid, True)
            self.sm.forget_vdi(parent.uuid)
            keep = parent.parent is not None and self.sm.generation.keeps_vhd_parent
            self.sm.update_vdi(self.sr_uuid, vdi_uuid, parent_uuid=None if keep else "")
        with self.sm.sr_lock(self.sr_uuid):
            self.store.remove(old_uuid)
            self.sm.update_vdi(self.sr_uuid, vdi_uuid)
        self.sm.unpaused(vdi_uuid)

    def set_hidden(self, uuid, hidden):
        self.store.set_hidden(uuid, hidden)

    # -- reporting a lack of space --

    def report_no_space(self):
        self.sm.report_no_space(self.sr_ref, self.sr_uuid, sorted(self.no_space))


# ---- the storage manager of the host -------------------------------------------------------

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


class Gate(object):
    """A step of the simulated SM a test holds: the next thread to reach it waits until release()."""

    def __init__(self, name, stopping):
        self.name = name
        self._stopping = stopping
        self._reached = threading.Event()
        self._released = threading.Event()

    def wait_reached(self, timeout=10.0):
        """True once a thread waits at (or went through) the step."""
        return self._reached.wait(timeout)

    def release(self):
        self._released.set()

    def pass_through(self):
        self._reached.set()
        while not (self._released.wait(0.05) or self._stopping.is_set()):
            pass


class StorageManager(object):
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
        with open(self.cleanup_path, "w") as handle:
            handle.write(CLEANUP_SCRIPT)
        os.chmod(self.cleanup_path, 0o755)

    # -- small services --

    def log(self, text, ident="SMGC"):
        """A message SM logs through syslog into SMlog (smlogfile.py: the real format, rotation)."""
        self.smlog.write(text, ident)

    def log_exception(self, tag, exc):
        """cleanup.py's Util.logException into SMlog."""
        self.smlog.exception(tag, exc)

    def label(self, image):
        """A VHD as SM's GC prints it (8 hex digits of its UUID and its sizes)."""
        return smlogfile.label(image, lvm=image.lv_size is not None)

    def sm_log(self, text):
        """A line SM's util.SMlog writes (ident SM)."""
        self.log(text, ident="SM")

    # -- steps tests hold --

    def gate(self, name):
        """Hold the step `name` (see the module docstring) for the next thread that reaches it."""
        gate = Gate(name, self.stopping)
        with self._lock:
            self._gates[name] = gate
        return gate

    def step(self, name):
        with self._lock:
            gate = self._gates.pop(name, None)
        if gate is not None:
            gate.pass_through()

    def speed_log(self, sr_uuid):
        return speed_log_path(self.run_dir, sr_uuid)

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

    def record_block_info(self, image):
        """VDI.updateBlockInfo: sm-config:vhd-blocks = base64 of the zlib-compressed `read -B` bitmap."""
        ref = self.records.vdi_ref(image.uuid)
        if ref is not None:
            self.records.set_map_key("VDI", ref, "sm_config", VHD_BLOCKS_KEY, image.block_info())

    def vm_power_state(self, vm_uuid):
        ref = self.records.by_uuid("VM", vm_uuid)
        return self.db.get_field("VM", ref, "power_state") if ref else None

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

    def fail_coalesce(self, sr_uuid, message="Input/output error"):
        """Fault: the next merge on the SR fails as `vhd-util coalesce` failing does (CommandException,
        reported as an I/O error)."""
        self._coalesce_faults[sr_uuid] = message

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

    def _background_main(self, sr_uuid, quiet_seconds):
        """gc(inBackground=True): a daemonised GC, not immediate (the quiet period once the SR had a GC)."""
        self.gc(sr_uuid, quiet_seconds=quiet_seconds)

    def gc(self, sr_uuid, dry_run=False, quiet_seconds=0.0, raise_errors=False):
        """cleanup.gc / run_gc in this thread: one GC run; its exit status 0, 1 (error) or 2 (aborted).

        A fatal error is logged by SM 4.1; SM 3.2 lets it go to stderr (the journal) or, with
        `raise_errors`, to its caller."""
        self.log("=== SR {}: gc ===".format(sr_uuid))
        try:
            GcPass(self, sr_uuid, quiet_seconds, dry_run).run()
            return 0
        except Aborted:
            self.log("Aborted")
            return 2 if self.generation.logs_fatal_errors else 1
        except Exception as exc:  # SM's logException: the GC reports what stopped it
            if not self.generation.logs_fatal_errors:
                if raise_errors:
                    raise
                traceback.print_exc()   # the unit's stderr: the journal, not SMlog
                return 1
            self.log_exception("gc", exc)
            self.log("* * * * * SR {}: ERROR\n".format(sr_uuid))
            return 1
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

    # -- the coalesce-leaf plugin --

    def coalesce_leaf_plugin(self, host_ref, args):
        """host.call_plugin(host, "coalesce-leaf", "leaf-coalesce", {"vm_uuid": ...}), run on `host_ref`.

        Failures are plain Exceptions, so the client sees XENAPI_PLUGIN_FAILURE [fn, "Exception", text]
        as XenAPIPlugin reports them.
        """
        status, messages = self.vm_leaf_coalesce(host_ref, args.get("vm_uuid", ""))
        text = RET_MSG[status]
        if messages:
            text += "\nNote:\n" + "\n".join(messages)
        elif status == RET_NOTHING_TODO:
            status = RET_SUCCESS
        if status != RET_SUCCESS:
            raise Exception(text)
        return text

    def vm_leaf_coalesce(self, host_ref, vm_uuid):
        self.step("plugin.start")
        messages = []
        vm_ref = self.records.by_uuid("VM", vm_uuid)
        if vm_ref is None:
            self.log("Error: VM {} not found".format(vm_uuid))
            return RET_NO_SUCH_VM, messages
        vdis = collections.OrderedDict()
        for vbd_ref in self.db.get_field("VM", vm_ref, "VBDs"):
            vdi_ref = self.db.get_field("VBD", vbd_ref, "VDI")
            if not self.db.exists("VDI", vdi_ref):
                continue
            vdi = self.db.get("VDI", vdi_ref)
            sr = self.db.get("SR", vdi["SR"])
            if sr["type"].startswith("lv"):
                self.log("VDI to consider: {}".format(vdi["uuid"]))
                vdis.setdefault(sr["uuid"], []).append(vdi["uuid"])
            else:
                self.log("Skipping non-LVM VDI: {}".format(vdi["uuid"]))
        status = RET_SUCCESS
        coalesceable = collections.OrderedDict()
        for sr_uuid, vdi_uuids in vdis.items():
            master, attached = self.records.sr_master_uuid(self.records.sr_ref(sr_uuid))
            prefix = "Unable to check VDIs on SR {} because ".format(sr_uuid)
            if not attached:
                messages.append(prefix + "it is not attached")
                continue
            if master != self.db.get_field("host", host_ref, "uuid"):
                messages.append(prefix + "this host is not its master. Run on host {} to check that SR".format(master))
                continue
            try:
                found = self.coalesceable_leaves(sr_uuid, vdi_uuids)
            except SmError as exc:
                text = "Error: {}, skipping SR {}".format(exc, sr_uuid)
                self.log(text)
                messages.append(text)
                status = RET_ERROR_OTHER
                continue
            if found:
                coalesceable[sr_uuid] = found
        if not coalesceable:
            self.log("The VM has no VDIs that could be leaf-coalesced")
            return RET_NOTHING_TODO, messages
        for sr_uuid in coalesceable:
            self.plugin_gc(sr_uuid)
        if self.generation.plugin_waits_for_gc:
            for sr_uuid in coalesceable:
                self.wait_for_completion(sr_uuid)
        self.step("plugin.before-suspend")
        suspended = False
        if self.db.get_field("VM", vm_ref, "power_state") == "Running":
            self.log("Suspending VM {}".format(vm_uuid))
            try:
                vm.run(self.db, vm_ref, "suspend")
            except XapiError:
                self.log("Failed to suspend the VM")
                return RET_ERROR_VM, messages
            suspended = True
        try:
            self.force_leaf_coalesce(host_ref, coalesceable)
        finally:
            if suspended:
                self.log("Resuming VM {}".format(vm_uuid))
                vm.run(self.db, vm_ref, "resume")
            for sr_uuid in coalesceable:
                self.plugin_final_pass(sr_uuid)
        return status, messages

    def plugin_gc(self, sr_uuid, dry_run=False):
        """A GC pass inside the plugin (SM 3.2's gc(inBackground=False), 4.1's run_gc(immediate=True)):
        it exits at once while another GC holds gc_active."""
        self.gc(sr_uuid, dry_run=dry_run, raise_errors=True)

    def plugin_final_pass(self, sr_uuid):
        """SM 4.1: a dry run in the plugin, going round while it finds work. SM 3.2: gc(inBackground=True),
        a daemonised GC that keeps the quiet period once the SR had a GC, and the plugin returns."""
        if self.generation.plugin_final_dry_run:
            self.plugin_gc(sr_uuid, dry_run=True)
        else:
            quiet = self.gc_quiet_seconds if sr_uuid in self._gc_ran else 0.0
            self.start_gc_thread(sr_uuid, self._background_main, "gc-", quiet)

    def coalesceable_leaves(self, sr_uuid, vdi_uuids):
        forest = GcPass(self, sr_uuid).scan()
        return [uuid for uuid in vdi_uuids if forest.get(uuid) is not None and forest.get(uuid).is_leaf_coalesceable()]

    def force_leaf_coalesce(self, host_ref, coalesceable):
        for sr_uuid, vdi_uuids in coalesceable.items():
            self.log("Processing VDIs: {}".format(vdi_uuids))
            for vdi_uuid in vdi_uuids:
                ref = self.records.vdi_ref(vdi_uuid)
                if ref is None or self.db.get_field("VDI", ref, "other_config").get(LEAF_COALESCE_KEY):
                    continue
                self.records.set_map_key("VDI", ref, "other_config", LEAF_COALESCE_KEY, "force")
            self.log("Coalescing all in SR {}...".format(sr_uuid))
            self.plugin_gc(sr_uuid)
