"""The VHDs of an SR as SM's GC (cleanup.py) sees them: each image's facts read from its footer, and the
forest they make, with what the GC looks for in it (garbage, coalesceable parents, leaf-coalesceable
leaves). tests/dom0sim/qcow2store.py's Qcow2Image is the same for a QCOW2 image.
"""
import base64
import zlib

from tests.dom0sim import vhdfile, vhdformat

MIB = 1024 * 1024
VHD_BLOCK_SIZE = 2 * MIB
TMP_RENAME_PREFIX = "OLD_"


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
                self.parent_footer_uuid = str(vhd.parent_uuid) if vhd.disk_type == vhdformat.DISK_DIFF else None
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
                self._blocks = frozenset(index for index, entry in enumerate(vhd.bat) if entry != vhdformat.UNUSED)
        return self._blocks

    def block_bitmap(self):
        """What `vhd-util read -B` prints for this VHD: its BAT as a bitmap, MSB first."""
        with self.opener() as vhd:
            count = int(vhd.virtual_size) // vhdformat.BLOCK_SIZE
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
