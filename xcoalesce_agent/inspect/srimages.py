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
        self._lvs = {}   # the current LVM SR's `lvs` (lvs_report)

    def vhd_paths(self, sr):
        """A function from a VHD's UUID to its path in the SR: its file, or its LV's device."""
        if sr["type"] in LVM_SR_TYPES:
            head = os.path.join(self.config.storage.lvm_device_dir, vhdutil.lvm_vg_name(sr["uuid"]), vhdtree.LV_PREFIX)
            return lambda uuid: head + uuid
        head = os.path.join(self.config.storage.sr_mount_dir, sr["uuid"], "")
        return lambda uuid: head + uuid + vhdtree.FILE_SUFFIX

    def lvs_report(self, sr):
        """The lvmread.LvsReport of the SR's volume group: one `vgs` and one `lvs` per SR and
        inspection, or the error that kept them unread (recorded once)."""
        if sr["uuid"] not in self._lvs:
            vg_name = vhdutil.lvm_vg_name(sr["uuid"])
            try:
                extent_size, pe_starts = lvmread.parse_vgs(self.tools.run_lvm("vgs", lvmread.vgs_arguments(vg_name)))
                report = lvmread.parse_lvs(self.tools.run_lvm("lvs", lvmread.lvs_arguments(vg_name)),
                                           extent_size, pe_starts)
            except (vhdutil.VhdUtilError, lvmread.LvmReportError) as error:
                self.error("lvs", sr, "its LVs cannot be listed: {}".format(error))
                report = error
            self._lvs = {sr["uuid"]: report}
        return self._lvs[sr["uuid"]]

    def image_source(self, sr):
        """The qcow2images.ImageSource of the SR, or the error that kept its LVs unlisted."""
        if sr["type"] not in LVM_SR_TYPES:
            return qcow2images.ImageSource(sr_dir=os.path.join(self.config.storage.sr_mount_dir, sr["uuid"]))
        lvs = self.lvs_report(sr)
        if isinstance(lvs, Exception):
            return lvs
        return qcow2images.ImageSource(vg_name=vhdutil.lvm_vg_name(sr["uuid"]),
                                       volumes=lvs.volumes(set(lvs.names(qcow2images.LV_PREFIX))),
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
        vhd_path = self.vhd_paths(sr)
        bitmaps, keys, wanted = {}, {}, []
        for node in nodes:
            if node.record.hidden:
                if node.uuid in vhd_blocks:
                    try:
                        bitmaps[node.uuid] = _decode_vhd_blocks(vhd_blocks[node.uuid], node.record)
                        continue
                    except (vhdmeta.VhdMetadataError, qcow2meta.Qcow2Error) as error:
                        LOG.debug("SR %s: %s: %s; reading the image instead", sr["uuid"], node.uuid, error)
                path = None if lvm else source.path(node.uuid) if node.record.qcow2 else vhd_path(node.uuid)
                keys[node.uuid] = self.cache_key(sr, node, path)
                cached = self.bitmaps.get(keys[node.uuid]) if keys[node.uuid] is not None else None
                if cached is not None:
                    bitmaps[node.uuid] = cached
                    continue
            wanted.append(node)
        read = self.read_vhd_bitmaps(sr, [node for node in wanted if not node.record.qcow2], vhd_path)
        read.update((node.uuid, self.read_qcow2_bitmap(source, node))
                    for node in sorted(wanted, key=lambda node: node.uuid) if node.record.qcow2)
        for node in wanted:
            bitmaps[node.uuid] = read[node.uuid]
            if keys.get(node.uuid) is not None and not isinstance(read[node.uuid], Exception):
                self.bitmaps.put(keys[node.uuid], read[node.uuid])
        return bitmaps

    def read_vhd_bitmaps(self, sr, nodes, vhd_path):
        """{uuid: bitmap or exception} of VHDs: `read -B` where the path exists, else the PV."""
        lvm = sr["type"] in LVM_SR_TYPES
        on_device = {}
        for node in nodes:
            path = vhd_path(node.uuid)
            if not lvm or os.path.exists(path):
                on_device[path] = node
        read = self.tools.read_bitmaps([(path, on_device[path].record.virtual_size) for path in sorted(on_device)])
        results = {node.uuid: read[path] for path, node in on_device.items() if path in read}
        missed = {node.uuid: results.get(node.uuid) for node in nodes
                  if node.uuid not in results or isinstance(results[node.uuid], Exception)}
        if lvm and missed:
            results.update(self.read_through_pv(sr, missed, {node.uuid: node for node in nodes}))
        return results

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

    def cache_key(self, sr, node, path):
        """What a hidden image's cached bitmap is kept under: it changes when a child merges into it.

        A file's mtime (`path` given) is part of it; an LV's device (when there is one) has no
        meaningful mtime.
        """
        try:
            stamp = None if path is None else os.stat(path).st_mtime_ns
        except OSError:
            return None
        return (sr["uuid"], node.uuid, node.record.size, stamp, tuple(sorted(child.uuid for child in node.children)))

    def read_through_pv(self, sr, missed, nodes):
        """{uuid: bitmap or exception} of LVs `read -B` did not read ({uuid: its error or None};
        `nodes`: {uuid: node}).

        The SR's `lvs` and `vgs`; an LV that `lvs` shows active here keeps the error of `read -B` on
        its device, the others are read from their PV extents.
        """
        vg_name = vhdutil.lvm_vg_name(sr["uuid"])
        lvs = self.lvs_report(sr)
        if isinstance(lvs, Exception):
            return {uuid: error_ or lvs for uuid, error_ in missed.items()}
        volumes = lvs.volumes({vhdtree.LV_PREFIX + uuid for uuid in missed})
        results = {}
        with lvmread.PhysicalVolumes() as physical:
            for uuid, device_error in sorted(missed.items()):
                lv = volumes.get(vhdtree.LV_PREFIX + uuid)
                if device_error is not None and (lv is None or lv.active):
                    results[uuid] = device_error
                elif lv is None:
                    results[uuid] = vhdmeta.VhdMetadataError("{}{}: no such LV in `lvs` {}".format(
                        vhdtree.LV_PREFIX, uuid, vg_name))
                else:
                    try:
                        results[uuid] = lvmread.read_bitmap(physical, lv, nodes[uuid].record.virtual_size)
                    except vhdmeta.VhdMetadataError as error:
                        results[uuid] = error
        return results


def _decode_vhd_blocks(value, record):
    """SM's `sm_config:vhd-blocks` of a hidden image, in the bitmap order its format's reader gives."""
    if record.qcow2 is None:
        return vhdmeta.decode_vhd_blocks(value, record.virtual_size)
    if not record.qcow2.whole_helper_bitmap():
        raise qcow2meta.Qcow2Error("sm-config:vhd-blocks leaves out the last clusters of this image")
    return qcow2meta.decode_vhd_blocks(value, record.qcow2)
