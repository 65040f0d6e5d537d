"""A QCOW2 image's header, hidden flag, backing name and cluster allocation, from its bytes.

Pure: a `read(offset, length)` function in (a file opened read-only, an LV's device, or an
inactive LV's PV extents through lvmread), plain objects out. Nothing here writes: SM's own
reader adds its hidden-flag extension to an image that lacks it, this one only looks for it.

The cluster bitmap has one bit per cluster of the virtual size, least-significant bit first (as
`qcow2_helper bitmap` prints it and SM keeps it in `sm_config:vhd-blocks`): bit j of byte k is
cluster 8k + j, set when the image's OWN L2 entry maps it (not its backing chain's). Anything
malformed is a `Qcow2Error` with a one-line reason, never a bitmap of zeros.
"""
import json
import struct

from . import vhdmeta

MAGIC = b"QFI\xfb"
HIDDEN_EXTENSION = 0x76617465          # "vate": SM's hidden flag, 8 bytes, first byte 1 = hidden
END_OF_EXTENSIONS = 0
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21
MAX_BACKING_NAME = 1023
FIRST_READ = 4096
WRITE_ALIGNMENT_BITS = 12              # qemu-img commit writes whole 4 KiB pages into the parent

# Incompatible feature bits: what reading the allocation of an image with each one means.
DIRTY, CORRUPT, EXTERNAL_DATA, COMPRESSION_TYPE, EXTENDED_L2 = (1 << bit for bit in range(5))
KNOWN_INCOMPATIBLE = DIRTY | CORRUPT | EXTERNAL_DATA | COMPRESSION_TYPE | EXTENDED_L2

# Version 2 header (72 bytes): magic, version, backing offset and size, cluster bits, virtual size,
# encryption, L1 entries and offset, refcount table offset and clusters, snapshots.
_HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
# Version 3 additions: incompatible, compatible, autoclear features, refcount order, header length.
_HEADER_V3 = struct.Struct(">QQQII")
_EXTENSION = struct.Struct(">II")

# L2 entry, big-endian: bit 63 "copied", bit 62 compressed, bits 9..55 the host offset.
_OFFSET_BYTES = (1, 2, 3, 4, 5)                          # bits 48..55 down to 16..23
_BIT_SET = bytes([0] + [1] * 255)                        # bytes.translate: 1 where the byte is not 0
_TOP_BITS = bytes([1 if byte & 0xC0 else 0 for byte in range(256)])     # copied or compressed
_OFFSET_LOW = bytes([1 if byte & 0xFE else 0 for byte in range(256)])   # bits 9..15


class Qcow2Error(ValueError):
    """An image whose header or tables cannot be trusted; the message is one line."""


class Header(object):
    """What the agent uses of a QCOW2 header."""

    __slots__ = ("version", "cluster_bits", "virtual_size", "l1_offset", "l1_entries", "refcount_order",
                 "incompatible", "backing_name", "hidden", "refcount_table")

    def __init__(self, version, cluster_bits, virtual_size, l1_offset, l1_entries, refcount_order=4,
                 incompatible=0, backing_name="", hidden=False):
        self.version = version
        self.cluster_bits = cluster_bits
        self.virtual_size = virtual_size
        self.l1_offset = l1_offset
        self.l1_entries = l1_entries
        self.refcount_order = refcount_order
        self.incompatible = incompatible
        self.backing_name = backing_name
        self.hidden = hidden
        self.refcount_table = (0, 0)    # (offset, bytes)

    @property
    def cluster_size(self):
        return 1 << self.cluster_bits

    @property
    def extended_l2(self):
        return bool(self.incompatible & EXTENDED_L2)

    @property
    def l2_entries(self):
        """Clusters one L2 table maps."""
        return self.cluster_size // (16 if self.extended_l2 else 8)

    @property
    def clusters(self):
        """Clusters of the virtual size, the last one possibly partial."""
        return -(-self.virtual_size // self.cluster_size)

    @property
    def refcounts_per_block(self):
        return self.cluster_size * 8 >> self.refcount_order

    def bitmap_length(self):
        return (self.clusters + 7) // 8

    def helper_bitmap_length(self):
        """Bytes `qcow2_helper bitmap` prints: whole bytes of whole clusters (it drops the rest)."""
        return self.virtual_size // self.cluster_size // 8

    def whole_helper_bitmap(self):
        """The helper's bitmap covers every cluster only when they fill whole bytes."""
        return self.helper_bitmap_length() == self.bitmap_length() and self.virtual_size % self.cluster_size == 0


def read_header(read, image_size):
    """The Header of the image `read` reads, `image_size` bytes long (file or LV size).

    The header, its extensions and the backing name lie in the first cluster: one read of 4 KiB,
    a second of that cluster when they reach further.
    """
    raw = read(0, min(FIRST_READ, image_size))
    try:
        return parse_header(raw, image_size)
    except _NeedMore as more:
        return parse_header(read(0, min(more.length, image_size)), image_size, complete=True)


class _NeedMore(Exception):
    def __init__(self, length):
        Exception.__init__(self, length)
        self.length = length


def parse_header(raw, image_size, complete=False):
    """Header from the image's first bytes; unless they are `complete` (the whole first cluster, or
    image), raises _NeedMore(length) when they stop short of what the first cluster holds;
    Qcow2Error for anything a reader must not trust."""
    if len(raw) < _HEADER_V2.size:
        raise Qcow2Error("header cut short: {} of {} bytes".format(len(raw), _HEADER_V2.size))
    (magic, version, backing_offset, backing_size, cluster_bits, virtual_size, _, l1_entries, l1_offset,
     refcount_offset, refcount_clusters, _, _) = _HEADER_V2.unpack_from(raw)
    if magic != MAGIC:
        raise Qcow2Error("invalid magic {!r} (not a QCOW2 image)".format(magic))
    if version not in (2, 3):
        raise Qcow2Error("version {} is neither 2 nor 3".format(version))
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise Qcow2Error("cluster_bits {} is out of range {}..{}".format(cluster_bits, MIN_CLUSTER_BITS,
                                                                         MAX_CLUSTER_BITS))
    cluster_size = 1 << cluster_bits
    more = 0 if complete else cluster_size
    incompatible, refcount_order, header_length = 0, 4, _HEADER_V2.size
    if version == 3:
        _need(raw, _HEADER_V2.size + _HEADER_V3.size, more, "version 3 header")
        incompatible, _, _, refcount_order, header_length = _HEADER_V3.unpack_from(raw, _HEADER_V2.size)
        if not _HEADER_V2.size + _HEADER_V3.size <= header_length <= cluster_size or header_length % 8:
            raise Qcow2Error("header length {} is not a multiple of 8 within 104..{}".format(
                header_length, cluster_size))
        if refcount_order > 6:
            raise Qcow2Error("refcount order {} is over 6".format(refcount_order))
    _check_features(incompatible)
    header = Header(version, cluster_bits, virtual_size, l1_offset, l1_entries, refcount_order, incompatible)
    header.refcount_table = (refcount_offset, refcount_clusters * cluster_size)
    if l1_offset % cluster_size or l1_offset + 8 * l1_entries > image_size or l1_offset == 0:
        raise Qcow2Error("L1 table of {} entries at {} is misplaced in the {}-byte image".format(
            l1_entries, l1_offset, image_size))
    if l1_entries * header.l2_entries < header.clusters:
        raise Qcow2Error("L1 table of {} entries maps less than the virtual size {}".format(l1_entries, virtual_size))
    header.hidden = _hidden_flag(raw, header_length, more)
    header.backing_name = _backing_name(raw, backing_offset, backing_size, cluster_size, image_size,
                                        more)
    return header


def _check_features(incompatible):
    unknown = incompatible & ~KNOWN_INCOMPATIBLE
    if unknown:
        raise Qcow2Error("unknown incompatible feature bits {:#x}: left alone".format(unknown))
    if incompatible & CORRUPT:
        raise Qcow2Error("marked corrupt (incompatible feature bit 1)")
    if incompatible & EXTERNAL_DATA:
        raise Qcow2Error("its data lies in an external data file")


def _need(raw, end, more, what):
    """`raw` reaches `end`; else _NeedMore(more) when more is to be read (`more` > 0), or Qcow2Error."""
    if len(raw) < end:
        if end <= more:
            raise _NeedMore(more)
        raise Qcow2Error("{} cut short: {} of {} bytes".format(what, len(raw), end))


def _hidden_flag(raw, offset, more):
    """SM's hidden flag from the header extensions (absent: not hidden), which end in the first cluster."""
    while True:
        _need(raw, offset + _EXTENSION.size, more, "header extensions")
        kind, length = _EXTENSION.unpack_from(raw, offset)
        if kind == END_OF_EXTENSIONS:
            return False
        data = offset + _EXTENSION.size
        _need(raw, data + length, more, "header extension {:#x}".format(kind))
        if kind == HIDDEN_EXTENSION:
            if length < 1:
                raise Qcow2Error("hidden-flag extension of {} bytes".format(length))
            return raw[data] == 1
        offset = data + (length + 7) // 8 * 8


def _backing_name(raw, offset, size, cluster_size, image_size, more):
    if offset == 0:
        return ""
    if size == 0 or size > MAX_BACKING_NAME or offset + size > min(cluster_size, image_size):
        raise Qcow2Error("backing file name of {} bytes at {} is out of bounds".format(size, offset))
    _need(raw, offset + size, more, "backing file name")
    try:
        name = raw[offset:offset + size].decode("utf-8")
    except UnicodeDecodeError:
        raise Qcow2Error("backing file name is not UTF-8") from None
    if not name.isprintable():
        raise Qcow2Error("backing file name holds control characters")
    return name


def cluster_bitmap(read, header, image_size):
    """The image's own cluster bitmap, from its L1 table and the L2 tables it points to."""
    entry_size = 16 if header.extended_l2 else 8
    l1_needed = -(-header.clusters // header.l2_entries)
    raw_l1 = read(header.l1_offset, 8 * l1_needed)
    if len(raw_l1) < 8 * l1_needed:
        raise Qcow2Error("L1 table cut short: {} of {} bytes".format(len(raw_l1), 8 * l1_needed))
    table_bytes = header.l2_entries * entry_size
    pieces = []
    for index, (entry,) in enumerate(struct.iter_unpack(">Q", raw_l1)):
        offset = entry & 0x00FFFFFFFFFFFE00
        if offset == 0:
            pieces.append(bytes(header.l2_entries // 8))
            continue
        if offset % header.cluster_size or offset + table_bytes > image_size:
            raise Qcow2Error("L1 entry {} points at {}, outside the {}-byte image".format(index, offset, image_size))
        table = read(offset, table_bytes)
        if len(table) < table_bytes:
            raise Qcow2Error("L2 table at {} cut short".format(offset))
        pieces.append(_allocated(table, header.l2_entries, header.extended_l2))
    return _trimmed(b"".join(pieces), header)


def _allocated(table, entries, extended):
    """One bit per L2 entry (LSB first): allocated in this image (data, or compressed data)."""
    if extended:   # the low 32 bits of the second word flag the allocated subclusters
        flags = table[0::16].translate(_TOP_BITS)
        words = [table[byte::16].translate(_BIT_SET) for byte in (12, 13, 14, 15)]
    else:
        flags = table[0::8].translate(_TOP_BITS)
        words = [table[byte::8].translate(_BIT_SET) for byte in _OFFSET_BYTES] + [table[6::8].translate(_OFFSET_LOW)]
    used = int.from_bytes(flags, "big")
    for word in words:
        used |= int.from_bytes(word, "big")
    return _pack(used.to_bytes(entries, "big"))


def _pack(per_entry):
    """Bytes of 0/1 per entry (a multiple of 8 of them) → bits, entry 8k + j as bit j of byte k."""
    packed = 0
    for bit in range(8):
        packed |= int.from_bytes(per_entry[bit::8], "big") << bit
    return packed.to_bytes(len(per_entry) // 8, "big")


def _trimmed(bitmap, header):
    """The bitmap cut to the virtual size's clusters, pad bits 0."""
    length = header.bitmap_length()
    bitmap = bytearray(bitmap[:length].ljust(length, b"\0"))
    spare = length * 8 - header.clusters
    if spare:
        bitmap[-1] &= 0xFF >> spare
    return bytes(bitmap)


def image_end(read, header, image_size):
    """Where the image's clusters in use end: past the last cluster with a refcount. An image in an
    LV grows from there, whatever the LV's size."""
    offset, length = header.refcount_table
    if offset % header.cluster_size or offset == 0 or offset + length > image_size:
        raise Qcow2Error("refcount table of {} bytes at {} is misplaced in the {}-byte image".format(
            length, offset, image_size))
    table = read(offset, length)
    used = len(table.rstrip(b"\0"))
    if not used:
        raise Qcow2Error("refcount table is empty")
    index = (used - 1) // 8
    (block,) = struct.unpack_from(">Q", table, index * 8)
    block &= ~(header.cluster_size - 1) & 0x00FFFFFFFFFFFFFF
    if block == 0 or block + header.cluster_size > image_size:
        raise Qcow2Error("refcount block at {} is outside the {}-byte image".format(block, image_size))
    counts = read(block, header.cluster_size).rstrip(b"\0")
    if not counts:
        raise Qcow2Error("last refcount block at {} counts no cluster".format(block))
    bits = 1 << header.refcount_order
    last = (len(counts) * 8 - 1) // bits   # a sub-byte refcount counts its whole byte: an upper bound
    return (index * header.refcounts_per_block + last + 1) * header.cluster_size


def regrid(bitmap, header, cluster_bits):
    """The clusters a commit of `header`'s image writes into a parent with clusters of
    2**cluster_bits bytes: qemu writes each of the image's clusters whole, widened to 4 KiB."""
    if cluster_bits == header.cluster_bits and cluster_bits >= WRITE_ALIGNMENT_BITS:
        return bitmap
    size = 1 << cluster_bits
    clusters = -(-header.virtual_size // size)
    own = int.from_bytes(bitmap, "little")
    unit = max(header.cluster_bits, WRITE_ALIGNMENT_BITS)
    result = 0
    for cluster in range(header.clusters):
        if own >> cluster & 1:
            start = (cluster << header.cluster_bits) >> unit << unit
            end = -(-((cluster + 1) << header.cluster_bits) >> unit) << unit
            first, last = start >> cluster_bits, min(clusters, -(-end // size))
            result |= ((1 << (last - first)) - 1) << first
    return result.to_bytes((clusters + 7) // 8, "little")


def helper_bitmap(output, header, source):
    """The bitmap `qcow2_helper bitmap` printed, checked against its length for this header."""
    expected = header.helper_bitmap_length()
    if len(output) != expected:
        raise Qcow2Error("{} printed {} bytes where a {}-byte bitmap was expected".format(
            source, len(output), expected))
    return output


def map_bitmap(text, header):
    """The bitmap of `qemu-img map --output=json` of the image alone (`"data": true` ranges)."""
    try:
        ranges = json.loads(text)
        bitmap = 0
        size = header.cluster_size
        for item in ranges:
            if item.get("data") is True and item.get("depth", 0) == 0:
                first, end = int(item["start"]) // size, -(-(int(item["start"]) + int(item["length"])) // size)
                bitmap |= ((1 << (end - first)) - 1) << first
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise Qcow2Error("qemu-img map printed what it never prints: {}".format(error)) from None
    if bitmap >> header.clusters:
        raise Qcow2Error("qemu-img map shows data past the virtual size")
    return bitmap.to_bytes(header.bitmap_length(), "little")


def decode_vhd_blocks(value, header):
    """SM's `sm_config:vhd-blocks` of a QCOW2 image: base64 of zlib of `qcow2_helper bitmap`."""
    try:
        return vhdmeta.inflate_vhd_blocks(value, header.helper_bitmap_length())
    except vhdmeta.VhdMetadataError as error:
        raise Qcow2Error(str(error)) from None
