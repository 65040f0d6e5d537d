"""Where an SR's VHDs live, as SM handles them: a file SR's directory or an LVM SR's volume group
(tests/dom0sim/lvm.py), the size arithmetic SM does for both (lvhdutil / vhdutil), and a merge that runs
out of room part-way on a file SR. qcow2store.py builds the stores of an SR holding QCOW2 images too on
these classes.
"""
import contextlib
import errno
import os

from tests.dom0sim import lvm, vhdfile, vhdformat
from tests.dom0sim.smimages import MIB, VHD_BLOCK_SIZE, Image

LVM_SIZE_INCREMENT = 4 * MIB
MAX_FAST_RESIZE_SIZE = 2 * 1024 * 1024 * MIB      # LVHD preallocates metadata for 2 TiB
LVM_TYPES = ("lvm", "lvmoiscsi", "lvmohba", "lvhd", "lvhdoiscsi", "lvhdohba")
FILE_TYPES = ("ext", "nfs", "smb", "ocfsoiscsi", "ocfsohba", "file")
BLOCK_COST = vhdformat.BLOCK_SIZE + vhdformat.BITMAP_BYTES
OTHER_DATA_FILE = "other-data.img"


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
                if entry == vhdformat.UNUSED:
                    continue
                if parent.bat[block] == vhdformat.UNUSED:
                    if grown + BLOCK_COST > room:
                        raise OutOfRoom(parent.path, copied * vhdformat.SECTOR_SIZE)
                    grown += BLOCK_COST
                mask = int.from_bytes(child.block_bitmap(block)[:child.spb // 8], "big")
                for first, count in vhdformat.bit_runs(mask, child.spb):
                    offset = (block * child.spb + first) * vhdformat.SECTOR_SIZE
                    parent.write(offset, child.read_own(offset, count * vhdformat.SECTOR_SIZE))
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
        return vhdfile.coalesce(child_path) * vhdformat.SECTOR_SIZE


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
        return coalesce_within(child_path, room) * vhdformat.SECTOR_SIZE

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
                parent = vhd.header.parent_name if vhd.disk_type == vhdformat.DISK_DIFF else None
        except (lvm.LvmError, vhdformat.VhdError):
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
