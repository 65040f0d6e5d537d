"""QCOW2 VDIs beside VHDs on the simulated host's SRs, as XCP-ng 8.3's SM keeps them (qcow2util.py).

File SRs: `<sr-mount>/<sr>/<uuid>.qcow2`, a snapshot's backing file named relatively (`<parent>.qcow2`);
the GC relinks children to the absolute path of their new parent, as cleanup.py's setParent passes it.
LVM SRs: LV `QCOW2-<uuid>`, backing path `<lvm dir>/VG_XenStorage-<sr>/QCOW2-<parent>` (the host's
/dev/<VG>/<LV>), sized as lvmcowutil.calcVolumeSize (virtual size + `qemu-img measure` overhead) and
never deflated (SM takes a QCOW2 LV's physical size from the block device: the LV's size).

Images are made and changed with Debian's real `qemu-img` / `qemu-io`: create, snapshot (`create -b`
with the parent's cluster size), writes, `rebase -u` for relinks and `commit -f qcow2 <leaf> -d` for
merges. The hidden flag is SM's own header extension (qcow2file.set_hidden). SM reads headers in
Python: on LVM it activates each QCOW2 LV for the read and lets go after (qcow2util._getInfoLV), so
an inactive LV is never read through the PV.
"""
import base64
import contextlib
import json
import os
import subprocess
import zlib

from tests.dom0sim import qcow2file, smimages, smstore

QCOW2 = "qcow2"
SUFFIX = ".qcow2"
LV_PREFIX = "QCOW2-"
QEMU_IMG = "qemu-img"
QEMU_IO = "qemu-io"
DEFAULT_CLUSTER_SIZE = 1 << qcow2file.DEFAULT_CLUSTER_BITS
VHD_BLOCKS_SKIPPED = "skipped"
# The sm_config value the simulated xapi takes for vhd-blocks; SM writes "skipped" for a QCOW2 bitmap
# it cannot store (cleanup.py updateBlockInfo). The real limit is xapi's; this one is the simulation's.
VHD_BLOCKS_MAX_CHARS = 1 << 20
_MEASURED = {}


class QemuError(smstore.SmError):
    """qemu-img / qemu-io failed: their stderr, as SM's ioretry reports a CommandException."""


def run(*args):
    """Run a QEMU tool; its stdout (text)."""
    process = subprocess.Popen(list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = process.communicate()
    if process.returncode != 0:
        raise QemuError("{} failed ({}): {}".format(" ".join(args[:2]), process.returncode,
                                                     err.decode("utf-8", "replace").strip()))
    return out.decode("utf-8", "replace")


def uuid_of(name):
    """SM's extractUuid for a QCOW2 path: the base name without `QCOW2-` or `.qcow2`."""
    base = os.path.basename(name)
    if base.startswith(LV_PREFIX):
        base = base[len(LV_PREFIX):]
    if base.endswith(SUFFIX):
        base = base[:-len(SUFFIX)]
    return base


def overhead_empty(virtual_size, cluster_size=DEFAULT_CLUSTER_SIZE):
    """calcOverheadEmpty for QCOW2: `qemu-img measure` of an empty image of that size ("required")."""
    key = (virtual_size, cluster_size)
    if key not in _MEASURED:
        out = run(QEMU_IMG, "measure", "-O", "qcow2", "--output", "json", "-o",
                  "cluster_size={}".format(cluster_size), "--size", str(virtual_size))
        _MEASURED[key] = int(json.loads(out)["required"])
    return _MEASURED[key]


def volume_size(virtual_size):
    """lvmcowutil.calcVolumeSize for QCOW2: the data plus the metadata of an image at least one cluster big."""
    return smstore.lv_size_for(virtual_size + overhead_empty(max(virtual_size, DEFAULT_CLUSTER_SIZE)))


# ---- the images ---------------------------------------------------------------------------------

def create(path, virtual_size, cluster_size=None):
    """qcow2util.create: `qemu-img create`, then the hidden flag (cleared) added."""
    args = [QEMU_IMG, "create", "-q", "-f", QCOW2, path, str(virtual_size)]
    if cluster_size:
        args[5:5] = ["-o", "cluster_size={}".format(cluster_size)]
    run(*args)
    qcow2file.set_hidden(path, False)


def snapshot(path, backing, parent_path):
    """qcow2util.snapshot: a new image over `backing` (the name written in its header), with the
    parent's cluster size; the hidden flag added."""
    cluster = qcow2file.read_header(parent_path).cluster_size
    run(QEMU_IMG, "create", "-q", "-f", QCOW2, "-F", QCOW2, "-b", backing, "-o",
        "cluster_size={}".format(cluster), path)
    qcow2file.set_hidden(path, False)


def write(path, offset, data):
    """A guest write through qemu-io (the data passed as a pattern file)."""
    scratch = path + ".write"
    with open(scratch, "wb") as handle:
        handle.write(data)
    try:
        run(QEMU_IO, "-f", QCOW2, "-c", "write -q -s {} {} {}".format(scratch, offset, len(data)), path)
    finally:
        os.unlink(scratch)


def set_parent(path, backing):
    """qcow2util.setParent: `qemu-img rebase -u` (the header only)."""
    run(QEMU_IMG, "rebase", "-u", "-f", QCOW2, "-F", QCOW2, "-b", backing, path)


def commit(path):
    """`qemu-img commit -f qcow2 <leaf> -d` with the output of XCP-ng's patched qemu-img: a last
    `(n/total)` line before "Image committed." (n the bytes committed)."""
    committed = len(qcow2file.own_allocation(path)) * qcow2file.read_header(path).cluster_size
    out = run(QEMU_IMG, "commit", "-f", QCOW2, path, "-d")
    return "({0}/{0})\n{1}".format(committed, out)


def committed_bytes(output):
    """What qcow2util.coalesce makes of that output: n of the `(n/total)` line; SmError without one."""
    lines = output.splitlines()
    line = lines[-2] if len(lines) > 1 and lines[-1].startswith("Image committed.") else (lines or [""])[-1]
    parts = line.strip("()").split("/") if line.startswith("(") and line.endswith(")") else []
    if len(parts) == 2 and all(part.isdigit() for part in parts):
        return int(parts[0])
    raise smstore.SmError("Couldn't get commited size from qemu-img commit call")


class Qcow2Image(smimages.Image):
    """One QCOW2 image of an SR, read as SM reads it: header and hidden flag in Python (adding the
    flag when it is missing, as getHidden does), allocation from its own L2 tables. `access` is a
    context manager making the image readable at `path` (an LVM SR activates its LV)."""

    vdi_type = QCOW2
    sm_config_keys = {"image-format": QCOW2}

    def __init__(self, uuid, path, access=None):
        smimages.Image.__init__(self, uuid, path)
        self.access = access or contextlib.suppress
        self.cluster_size = DEFAULT_CLUSTER_SIZE
        self.backing_name = None
        self.error = None

    def load(self):
        try:
            with self.access():
                header = qcow2file.read_header(self.path)
                if header.hidden is None:
                    qcow2file.set_hidden(self.path, False)
                    header = qcow2file.read_header(self.path)
                self.vhd_size = os.path.getsize(self.path)
            self.footer_uuid = self.uuid
            self.backing_name = header.backing_name
            self.parent_footer_uuid = uuid_of(header.backing_name) if header.backing_name else None
            self.hidden = bool(header.hidden)
            self.virtual_size = header.size
            self.cluster_size = header.cluster_size
            self.scan_error = False
        except (qcow2file.Qcow2Error, OSError) as exc:
            self.error = str(exc)
            self.scan_error = True
        return self

    @property
    def blocks(self):
        if self._blocks is None:
            with self.access():
                self._blocks = frozenset(qcow2file.own_allocation(self.path))
        return self._blocks

    def block_bitmap(self):
        """What qcow2_helper `bitmap` prints for the image."""
        with self.access():
            header = qcow2file.read_header(self.path)
        return qcow2file.bitmap_of(header, self.blocks)

    def block_info(self):
        value = smimages.Image.block_info(self)
        return value if len(value) <= VHD_BLOCKS_MAX_CHARS else VHD_BLOCKS_SKIPPED

    @property
    def allocated_size(self):
        return len(self.blocks) * self.cluster_size

    def coalesced_data_size(self):
        return len(self.blocks | self.parent.blocks) * self.cluster_size


def merge_growth(child_path, parent_path):
    """Bytes a QCOW2 parent file grows by when the child is committed into it: a cluster for each
    cluster new to it, and one per L2 table it newly needs (refcount blocks aside)."""
    child = qcow2file.read_header(child_path)
    clusters = set(qcow2file.own_allocation(child, child_path))
    present = set(qcow2file.own_allocation(parent_path))
    per_table = child.l2_entries
    tables = set(index // per_table for index in clusters) - set(index // per_table for index in present)
    return (len(clusters - present) + len(tables)) * child.cluster_size


def bitmap_value(bitmap):
    return base64.b64encode(zlib.compress(bitmap)).decode("ascii")


# ---- file SRs --------------------------------------------------------------------------------------

class FileSrStore(smstore.FileStore):
    """A file SR holding VHDs (`<uuid>.vhd`) and QCOW2 images (`<uuid>.qcow2`)."""

    def qcow2_path(self, uuid):
        return os.path.join(self.directory, uuid + SUFFIX)

    def is_qcow2(self, uuid):
        return os.path.exists(self.qcow2_path(uuid))

    def path(self, uuid):
        return self.qcow2_path(uuid) if self.is_qcow2(uuid) else smstore.FileStore.path(self, uuid)

    def image(self, uuid):
        if self.is_qcow2(uuid):
            return Qcow2Image(uuid, self.qcow2_path(uuid)).load()
        return smstore.FileStore.image(self, uuid)

    def scan(self):
        images = smstore.FileStore.scan(self)
        for name in sorted(os.listdir(self.directory)):
            if name.endswith(SUFFIX):
                images.append(Qcow2Image(name[:-len(SUFFIX)], os.path.join(self.directory, name)).load())
        return images

    def create_qcow2(self, uuid, virtual_size, cluster_size=None):
        create(self.qcow2_path(uuid), virtual_size, cluster_size)

    def create_leaf(self, uuid, parent_uuid, virtual_size, skip_empty_parents=True, inflated=True):
        if not self.is_qcow2(parent_uuid):
            return smstore.FileStore.create_leaf(self, uuid, parent_uuid, virtual_size, skip_empty_parents, inflated)
        snapshot(self.qcow2_path(uuid), parent_uuid + SUFFIX, self.qcow2_path(parent_uuid))

    def rename(self, old, new):
        if not self.is_qcow2(old):
            return smstore.FileStore.rename(self, old, new)
        if os.path.exists(self.path(new)) or os.path.exists(self.qcow2_path(new)):
            raise smstore.SmError("{} exists".format(self.qcow2_path(new)))
        os.rename(self.qcow2_path(old), self.qcow2_path(new))

    def set_hidden(self, uuid, hidden):
        if not self.is_qcow2(uuid):
            return smstore.FileStore.set_hidden(self, uuid, hidden)
        qcow2file.set_hidden(self.qcow2_path(uuid), hidden)

    def set_parent(self, uuid, parent_uuid):
        if not self.is_qcow2(uuid):
            return smstore.FileStore.set_parent(self, uuid, parent_uuid)
        set_parent(self.qcow2_path(uuid), self.qcow2_path(parent_uuid))

    def coalesce(self, child_path):
        if not child_path.endswith(SUFFIX):
            return smstore.FileStore.coalesce(self, child_path)
        return committed_bytes(commit(child_path))

    def merge_growth(self, child_path):
        if not child_path.endswith(SUFFIX):
            return smstore.FileStore.merge_growth(self, child_path)
        return merge_growth(child_path, self.qcow2_path(uuid_of(qcow2file.read_header(child_path).backing_name)))

    def coalesce_within(self, child_path, room):
        """A commit that would not fit stops with ENOSPC before it starts: the parent keeps what it had."""
        if not child_path.endswith(SUFFIX):
            return smstore.FileStore.coalesce_within(self, child_path, room)
        raise smstore.OutOfRoom(self.qcow2_path(uuid_of(qcow2file.read_header(child_path).backing_name)), 0)

    def extra_for_coalesce(self, image):
        if image.vdi_type != QCOW2:
            return smstore.FileStore.extra_for_coalesce(self, image)
        return image.coalesced_data_size() + overhead_empty(image.virtual_size) - image.parent.vhd_size

    def extra_for_snapshot_coalesce(self, image):
        if image.vdi_type != QCOW2:
            return smstore.FileStore.extra_for_snapshot_coalesce(self, image)
        return self.extra_for_coalesce(image) + overhead_empty(image.virtual_size)


# ---- LVM SRs ---------------------------------------------------------------------------------------

class LvmSrStore(smstore.LvmStore):
    """An LVM SR holding VHD LVs (`VHD-<uuid>`) and QCOW2 LVs (`QCOW2-<uuid>`)."""

    def lv_name(self, uuid):
        name = LV_PREFIX + uuid
        return name if self.vg.has_lv(name) else smstore.LvmStore.lv_name(self, uuid)

    def is_qcow2(self, uuid):
        return self.vg.has_lv(LV_PREFIX + uuid)

    def access(self, uuid):
        """Activate the LV for the block, as qcow2util._getInfoLV does around its read."""
        return lambda: self.holding([LV_PREFIX + uuid])

    def image(self, uuid):
        if not self.is_qcow2(uuid):
            return smstore.LvmStore.image(self, uuid)
        image = Qcow2Image(uuid, self.path(uuid), self.access(uuid)).load()
        image.lv_size = image.vhd_size = self.vg.lv_size(LV_PREFIX + uuid)
        return image

    def scan(self):
        images = smstore.LvmStore.scan(self)
        names = [lv["name"] for lv in self.vg.lvs() if lv["name"].startswith(LV_PREFIX)]
        with self.holding(names):
            for name in names:
                uuid = name[len(LV_PREFIX):]
                image = Qcow2Image(uuid, self.path(uuid)).load()
                image.access = self.access(uuid)
                image.lv_size = image.vhd_size = self.vg.lv_size(name)
                images.append(image)
        return images

    def parent_of(self, uuid):
        name = LV_PREFIX + uuid
        if not self.vg.has_lv(name):
            return smstore.LvmStore.parent_of(self, uuid)
        data = self.vg.read_lv(name, 0, DEFAULT_CLUSTER_SIZE)
        try:
            header = qcow2file.Header(data, 1 << 62)
        except qcow2file.Qcow2Error:
            return None, False
        return (uuid_of(header.backing_name) if header.backing_name else None), True

    def create_qcow2(self, uuid, virtual_size, cluster_size=None):
        name = LV_PREFIX + uuid
        self.vg.create_lv(name, volume_size(virtual_size), holder=self.holder)
        create(self.path(uuid), virtual_size, cluster_size)
        if self.transient:
            self.vg.deactivate([name], self.holder)

    def create_leaf(self, uuid, parent_uuid, virtual_size, skip_empty_parents=True, inflated=True):
        """A QCOW2 child: a writable leaf in a full-size LV, a snapshot VDI in an LV for its empty image."""
        if not self.is_qcow2(parent_uuid):
            return smstore.LvmStore.create_leaf(self, uuid, parent_uuid, virtual_size, skip_empty_parents, inflated)
        size = volume_size(virtual_size) if inflated else smstore.lv_size_for(overhead_empty(virtual_size))
        name = LV_PREFIX + uuid
        with self.working_on([parent_uuid]):
            self.vg.create_lv(name, size, holder=self.holder)
            snapshot(self.path(uuid), self.path(parent_uuid), self.path(parent_uuid))
            if self.transient:
                self.vg.deactivate([name], self.holder)

    def set_hidden(self, uuid, hidden):
        if not self.is_qcow2(uuid):
            return smstore.LvmStore.set_hidden(self, uuid, hidden)
        with self.holding([LV_PREFIX + uuid]):
            qcow2file.set_hidden(self.path(uuid), hidden)

    def set_parent(self, uuid, parent_uuid):
        if not self.is_qcow2(uuid):
            return smstore.LvmStore.set_parent(self, uuid, parent_uuid)
        set_parent(self.path(uuid), self.path(parent_uuid))

    def deflate(self, uuid):
        """QCOW2 LVs keep their size: SM's physical size of one is its LV's."""
        if not self.is_qcow2(uuid):
            smstore.LvmStore.deflate(self, uuid)

    def full_size(self, image):
        if image.vdi_type != QCOW2:
            return smstore.LvmStore.full_size(self, image)
        return volume_size(image.virtual_size)

    def coalesce(self, child_path):
        if not os.path.basename(child_path).startswith(LV_PREFIX):
            return smstore.LvmStore.coalesce(self, child_path)
        return committed_bytes(commit(child_path))

    def extra_for_coalesce(self, image):
        if image.vdi_type != QCOW2:
            return smstore.LvmStore.extra_for_coalesce(self, image)
        return volume_size(image.coalesced_data_size()) - image.parent.lv_size


def write_bulk(store, uuid, virtual_size, clusters, backing_uuid=None, hidden=False):
    """A QCOW2 image written in one go by qcow2file (scenarios with many images): its LV created first
    on an LVM SR (full size for a leaf)."""
    if store.lvm:
        name = LV_PREFIX + uuid
        store.vg.create_lv(name, volume_size(virtual_size), holder=store.holder)
        path = store.path(uuid)
        backing = store.path(backing_uuid) if backing_uuid else None
    else:
        path = store.qcow2_path(uuid)
        backing = backing_uuid + SUFFIX if backing_uuid else None
    qcow2file.write_image(path, virtual_size, clusters, backing=backing, hidden=hidden)
