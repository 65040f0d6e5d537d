"""The images of one inspection's SRs and their block bitmaps: where each image is (a file, an LV's
device, or only extents on a PV when the LV is not active here), and its bitmap read the cheapest
way that is exact: the cache, SM's `sm_config:vhd-blocks`, `vhd-util read -B` or the QCOW2 tools,
or the image's own tables through the PV.

Bitmaps of hidden images are cached across inspections: a hidden image changes only when a child
is merged into it, which also changes its children.
"""
import logging
import os

from . import lvmread, qcow2images, qcow2meta, vhdmeta, vhdtree, vhdutil

LOG = logging.getLogger(__name__)

FILE_SR_TYPES = ("ext", "nfs", "smb")
LVM_SR_TYPES = ("lvm", "lvmoiscsi", "lvmohba")


class BitmapCache(object):
    """Block bitmaps by key; `prune()` after an inspection keeps only the keys it used."""

    def __init__(self):
        self._entries = {}
        self._used = set()

    def get(self, key):
        value = self._entries.get(key)
        if value is not None:
            self._used.add(key)
        return value

    def put(self, key, value):
        self._entries[key] = value
        self._used.add(key)

    def prune(self):
        for key in set(self._entries) - self._used:
            del self._entries[key]
        self._used = set()

    def __len__(self):
        return len(self._entries)


class SrImages(object):
    """The images of the SRs of one inspection, one SR at a time (its LVs listed once per SR).

    `error(stage, sr, message)` records what kept something unread in the inspection's errors.
    """

    def __init__(self, config, tools, bitmaps, error):
        self.config = config
        self.tools = tools
        self.bitmaps = bitmaps
        self.error = error
        self._volumes = {}   # the current LVM SR's LVs (lvm_volumes)

    def image_path(self, sr, uuid):
        if sr["type"] in LVM_SR_TYPES:
            return os.path.join(self.config.storage.lvm_device_dir, vhdutil.lvm_vg_name(sr["uuid"]),
                                vhdtree.LV_PREFIX + uuid)
        return os.path.join(self.config.storage.sr_mount_dir, sr["uuid"], uuid + vhdtree.FILE_SUFFIX)

    def lvm_volumes(self, sr):
        """{LV name: lvmread.LogicalVolume} of the SR's volume group: one `vgs` and one `lvs` per SR
        and inspection, or the error that kept them unread (recorded once)."""
        if sr["uuid"] not in self._volumes:
            vg_name = vhdutil.lvm_vg_name(sr["uuid"])
            try:
                extent_size, pe_starts = lvmread.parse_vgs(self.tools.run_lvm("vgs", lvmread.vgs_arguments(vg_name)))
                volumes = lvmread.parse_lvs(self.tools.run_lvm("lvs", lvmread.lvs_arguments(vg_name)),
                                            extent_size, pe_starts)
            except (vhdutil.VhdUtilError, lvmread.LvmReportError) as error:
                self.error("lvs", sr, "its LVs cannot be listed: {}".format(error))
                volumes = error
            self._volumes = {sr["uuid"]: volumes}
        return self._volumes[sr["uuid"]]

    def image_source(self, sr):
        """The qcow2images.ImageSource of the SR, or the error that kept its LVs unlisted."""
        if sr["type"] not in LVM_SR_TYPES:
            return qcow2images.ImageSource(sr_dir=os.path.join(self.config.storage.sr_mount_dir, sr["uuid"]))
        volumes = self.lvm_volumes(sr)
        if isinstance(volumes, Exception):
            return volumes
        return qcow2images.ImageSource(vg_name=vhdutil.lvm_vg_name(sr["uuid"]), volumes=volumes,
                                       device_dir=self.config.storage.lvm_device_dir)

    def read_bitmaps(self, sr, nodes, vhd_blocks, source):
        """{uuid: bitmap, or the exception that kept it unread} of these nodes.

        A hidden image's comes from the cache when it has it; on an LVM SR, a hidden parent's from
        SM's `sm_config:vhd-blocks` when that holds a well-formed bitmap (`vhd_blocks`: {uuid:
        value}). The others are read with the tools (VHD: `vhd-util read -B`; QCOW2: the helper or
        qemu-img) where the image has a path (a file, an LV active here), from the image's own
        tables where it has none (through the PV) or where no QCOW2 tool is installed.
        """
        lvm = sr["type"] in LVM_SR_TYPES
        bitmaps, keys, wanted = {}, {}, {}
        for node in nodes:
            qcow2 = node.record.qcow2
            path = source.path(node.uuid) if qcow2 else self.image_path(sr, node.uuid)
            if node.record.hidden:
                if node.uuid in vhd_blocks:
                    try:
                        bitmaps[node.uuid] = _decode_vhd_blocks(vhd_blocks[node.uuid], node.record)
                        continue
                    except (vhdmeta.VhdMetadataError, qcow2meta.Qcow2Error) as error:
                        LOG.debug("SR %s: %s: %s; reading the image instead", sr["uuid"], node.uuid, error)
                keys[node.uuid] = self.cache_key(sr, node, path, lvm)
                cached = self.bitmaps.get(keys[node.uuid]) if keys[node.uuid] is not None else None
                if cached is not None:
                    bitmaps[node.uuid] = cached
                    continue
            wanted[path] = node
        vhds = {path: node for path, node in wanted.items() if not node.record.qcow2}
        read = self.read_vhd_bitmaps(sr, vhds, lvm)
        read.update((path, self.read_qcow2_bitmap(source, node)) for path, node in sorted(wanted.items())
                    if node.record.qcow2)
        for path, node in wanted.items():
            bitmaps[node.uuid] = read[path]
            if keys.get(node.uuid) is not None and not isinstance(read[path], Exception):
                self.bitmaps.put(keys[node.uuid], read[path])
        return bitmaps

    def read_vhd_bitmaps(self, sr, wanted, lvm):
        """{path: bitmap or exception} of VHDs: `read -B` where the path exists, else the PV."""
        on_device = sorted(path for path in wanted if not lvm or os.path.exists(path))
        read = self.tools.read_bitmaps([(path, wanted[path].record.virtual_size) for path in on_device])
        missed = {node.uuid: read.get(path) for path, node in wanted.items()
                  if path not in read or isinstance(read[path], Exception)}
        if lvm and missed:
            read.update(self.read_through_pv(sr, {uuid: (self.image_path(sr, uuid), error)
                                                  for uuid, error in missed.items()}, wanted))
        return read

    def read_qcow2_bitmap(self, source, node):
        """A QCOW2 image's own cluster bitmap, or the exception that kept it unread."""
        header = node.record.qcow2
        try:
            if source.on_device(node.uuid):
                bitmap = self.tools.qcow2_bitmap(source.path(node.uuid), header)
                if bitmap is not None:
                    return bitmap
            return source.bitmap(node.uuid, header)
        except vhdutil.VhdUtilError as error:
            return error
        except qcow2meta.Qcow2Error as error:
            return qcow2meta.Qcow2Error("{}: {}".format(node.uuid, error))
        except OSError as error:
            return qcow2meta.Qcow2Error("{}: cannot be read: {}".format(
                node.uuid, os.strerror(error.errno) if error.errno else error))

    def cache_key(self, sr, node, path, lvm):
        """What a hidden image's cached bitmap is kept under: it changes when a child merges into it.

        A file's mtime is part of it; an LV's device (when there is one) has no meaningful mtime.
        """
        try:
            stamp = None if lvm else os.stat(path).st_mtime_ns
        except OSError:
            return None
        return (sr["uuid"], node.uuid, node.record.size, stamp, tuple(sorted(child.uuid for child in node.children)))

    def read_through_pv(self, sr, missed, wanted):
        """{path: bitmap or exception} of LVs `read -B` did not read ({uuid: (path, its error or None)}).

        The SR's `lvs` and `vgs`; an LV that `lvs` shows active here keeps the error of `read -B` on
        its device, the others are read from their PV extents.
        """
        vg_name = vhdutil.lvm_vg_name(sr["uuid"])
        volumes = self.lvm_volumes(sr)
        if isinstance(volumes, Exception):
            return {path: error_ or volumes for path, error_ in missed.values()}
        results = {}
        with lvmread.PhysicalVolumes() as physical:
            for uuid, (path, device_error) in sorted(missed.items()):
                lv = volumes.get(vhdtree.LV_PREFIX + uuid)
                if device_error is not None and (lv is None or lv.active):
                    results[path] = device_error
                elif lv is None:
                    results[path] = vhdmeta.VhdMetadataError("{}{}: no such LV in `lvs` {}".format(
                        vhdtree.LV_PREFIX, uuid, vg_name))
                else:
                    try:
                        results[path] = lvmread.read_bitmap(physical, lv, wanted[path].record.virtual_size)
                    except vhdmeta.VhdMetadataError as error:
                        results[path] = error
        return results


def _decode_vhd_blocks(value, record):
    """SM's `sm_config:vhd-blocks` of a hidden image, in the bitmap order its format's reader gives."""
    if record.qcow2 is None:
        return vhdmeta.decode_vhd_blocks(value, record.virtual_size)
    if not record.qcow2.whole_helper_bitmap():
        raise qcow2meta.Qcow2Error("sm-config:vhd-blocks leaves out the last clusters of this image")
    return qcow2meta.decode_vhd_blocks(value, record.qcow2)
