"""QCOW2 images of the simulated host, read and edited in Python as XCP-ng's SM does (qcow2util.py).

What SM does itself rather than through qemu-img: read the header (backing name, cluster size, virtual
size), keep its "hidden" flag in a header extension of its own (type 0x76617465, "vate", 8 bytes, first
byte 1 = hidden; added when missing, the backing name moved 16 bytes further to make room), and walk an
image's own L1/L2 tables (not the backing chain) for the allocated bytes and the cluster bitmap that its
`qcow2_helper` prints. `write_image` lays out a whole valid image in one go (header, refcounts, L1/L2
tables, data), for scenarios that need many images fast; `qemu-img check` accepts what it writes.

Layout (docs/interop/qcow2.txt of QEMU): big-endian header; v3 headers say their length at byte 100;
header extensions follow it (type, length, data padded to 8 bytes) up to an end marker of type 0; the
backing file name (not NUL-terminated) lies after them, inside the first cluster.
"""
import os
import struct

MAGIC = 0x514649FB
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 112                  # with the compression type byte and its padding (QEMU 5.1+)
HEADER_FIELDS = ">IIQIIQIIQQIIQ"         # the 72 bytes every version has
V3_FIELDS = ">QQQII"                     # features, refcount order, header length (bytes 72..103)
HEADER_READ = 104                        # what SM's reader and qcow2_helper read of the header
HIDDEN_EXTENSION = 0x76617465            # "vate"
HIDDEN_EXTENSION_LENGTH = 8
BACKING_FORMAT_EXTENSION = 0xE2792ACA
END_OF_EXTENSIONS = 0
BACKING_FILE_OFFSET_FIELD = 8
DEFAULT_CLUSTER_BITS = 16               # 64 KiB clusters
INCOMPATIBLE_DIRTY = 1 << 0
INCOMPATIBLE_EXTENDED_L2 = 1 << 4
KNOWN_INCOMPATIBLE = 0x1F               # dirty, corrupt, external data, compression type, extended L2
L2_OFFSET_MASK = 0x00FFFFFFFFFFFF00     # bits 9-55 (as SM and its helper mask both L1 and L2 entries)
ALLOCATED_BIT = 1 << 63                 # "copied": refcount exactly one
COMPRESSED_BIT = 1 << 62
REFCOUNT_ORDER = 4                      # 16-bit refcounts, QEMU's default


class Qcow2Error(Exception):
    """Not a QCOW2 image this simulation can read: the reason, as one line."""


class Header(object):
    """The header fields SM uses, its extensions and the backing file name."""

    def __init__(self, data, file_size):
        if len(data) < V2_HEADER_LENGTH:
            raise Qcow2Error("truncated header: {} bytes".format(len(data)))
        (magic, self.version, self.backing_offset, self.backing_size, self.cluster_bits, self.size,
         self.crypt_method, self.l1_size, self.l1_offset, self.refcount_table_offset,
         self.refcount_table_clusters, self.nb_snapshots, self.snapshots_offset) = struct.unpack(
            HEADER_FIELDS, data[:V2_HEADER_LENGTH])
        if magic != MAGIC:
            raise Qcow2Error("not a QCOW2 image (bad magic)")
        if self.version not in (2, 3):
            raise Qcow2Error("unsupported QCOW2 version {}".format(self.version))
        if not 9 <= self.cluster_bits <= 21:
            raise Qcow2Error("bad cluster bits {}".format(self.cluster_bits))
        self.incompatible = self.compatible = self.autoclear = 0
        self.refcount_order = REFCOUNT_ORDER
        self.header_length = V2_HEADER_LENGTH
        if self.version == 3:
            if len(data) < HEADER_READ:
                raise Qcow2Error("truncated header: {} bytes".format(len(data)))
            (self.incompatible, self.compatible, self.autoclear, self.refcount_order,
             self.header_length) = struct.unpack(V3_FIELDS, data[V2_HEADER_LENGTH:HEADER_READ])
        if self.header_length < V2_HEADER_LENGTH or self.header_length > self.cluster_size:
            raise Qcow2Error("bad header length {}".format(self.header_length))
        self.extensions = []        # [(type, data offset, length)]
        self.end_marker = None      # offset of the end-of-extensions marker
        self._read_extensions(data)
        self.backing_name = None
        if self.backing_offset:
            end = self.backing_offset + self.backing_size
            if self.backing_size > 1023 or end > min(len(data), self.cluster_size):
                raise Qcow2Error("backing file name out of the first cluster")
            self.backing_name = data[self.backing_offset:end].decode("utf-8", "replace")
        if file_size < self.l1_offset + 8 * self.l1_size:
            raise Qcow2Error("truncated image: L1 table beyond the end")
        self.raw = data

    def _read_extensions(self, data):
        offset = self.header_length
        limit = min(len(data), self.cluster_size)
        while offset + 8 <= limit:
            ext_type, length = struct.unpack(">II", data[offset:offset + 8])
            if ext_type == END_OF_EXTENSIONS:
                self.end_marker = offset
                return
            if offset + 8 + length > limit:
                break
            self.extensions.append((ext_type, offset + 8, length))
            offset += 8 + (length + 7) // 8 * 8
        raise Qcow2Error("header extensions run past the first cluster")

    @property
    def cluster_size(self):
        return 1 << self.cluster_bits

    @property
    def extended_l2(self):
        return self.version == 3 and bool(self.incompatible & INCOMPATIBLE_EXTENDED_L2)

    @property
    def l2_entries(self):
        """Guest clusters one L2 table maps (an extended entry takes 16 bytes)."""
        return self.cluster_size // (16 if self.extended_l2 else 8)

    @property
    def unknown_incompatible(self):
        return self.incompatible & ~KNOWN_INCOMPATIBLE

    def extension(self, ext_type):
        for found, offset, length in self.extensions:
            if found == ext_type:
                return offset, length
        return None

    @property
    def hidden(self):
        """The "vate" flag: True/False, None when the image has no such extension (SM adds it)."""
        found = self.extension(HIDDEN_EXTENSION)
        if found is None:
            return None
        return self.raw[found[0]:found[0] + 1] != b"\0"


def read_header(path):
    """The Header of the image at `path` (read-only); Qcow2Error when it is not a readable QCOW2."""
    with open(path, "rb") as handle:
        return _read_header(handle)


def _read_header(handle):
    handle.seek(0, os.SEEK_END)
    file_size = handle.tell()
    handle.seek(0)
    first = handle.read(HEADER_READ)
    if len(first) < 20:
        raise Qcow2Error("truncated header: {} bytes".format(len(first)))
    cluster_bits = struct.unpack(">I", first[20:24])[0] if len(first) >= 24 else 0
    handle.seek(0)
    data = handle.read(1 << cluster_bits if 9 <= cluster_bits <= 21 else HEADER_READ)
    return Header(data, file_size)


# ---- the hidden flag, as SM writes it ----------------------------------------------------------

def set_hidden(path, hidden):
    """SM's setHidden: the "vate" extension's first byte; the extension is added before the end
    marker when missing, the backing file name moving 16 bytes further (its offset in the header
    updated)."""
    with open(path, "r+b") as handle:
        header = _read_header(handle)
        found = header.extension(HIDDEN_EXTENSION)
        if found is None:
            found = _add_hidden_extension(handle, header)
        handle.seek(found[0])
        handle.write(b"\1" if hidden else b"\0")


def _add_hidden_extension(handle, header):
    extension = struct.pack(">IIQ", HIDDEN_EXTENSION, HIDDEN_EXTENSION_LENGTH, 0)
    end = header.end_marker + len(extension) + 8
    if header.backing_offset:
        if header.backing_offset < header.end_marker + 8:
            raise Qcow2Error("backing file name inside the header extensions")
        end = max(end, header.backing_offset + len(extension) + header.backing_size)
    if end > header.cluster_size:
        raise Qcow2Error("no room for the hidden flag in the first cluster")
    if header.backing_offset:
        handle.seek(header.backing_offset)
        name = handle.read(header.backing_size)
        handle.seek(header.backing_offset)
        handle.write(bytes(len(name)))
        moved = header.backing_offset + len(extension)
        handle.seek(moved)
        handle.write(name)
        handle.seek(BACKING_FILE_OFFSET_FIELD)
        handle.write(struct.pack(">Q", moved))
    handle.seek(header.end_marker)
    handle.write(extension)
    return header.end_marker + 8, HIDDEN_EXTENSION_LENGTH


# ---- an image's own allocation (qcow2_helper) ----------------------------------------------------

class CompressedCluster(Qcow2Error):
    """An L2 entry describes a compressed cluster, which SM's helper refuses."""


def _l1_entries(handle, header):
    handle.seek(header.l1_offset)
    data = handle.read(8 * header.l1_size).ljust(8 * header.l1_size, b"\0")
    return struct.unpack(">{}Q".format(header.l1_size), data)


def own_allocation(path_or_header, path=None):
    """{guest cluster index: allocated units} of the image's own L2 tables (not the backing chain):
    units are 1 for a normal cluster, the number of allocated subclusters (of 32) with extended L2.
    An L2 entry is allocated when its "copied" bit or its offset is set, as qcow2_helper counts;
    CompressedCluster for a compressed one."""
    header = path_or_header if isinstance(path_or_header, Header) else read_header(path_or_header)
    path = path or path_or_header
    found = {}
    per_table = header.l2_entries
    words = 2 if header.extended_l2 else 1
    with open(path, "rb") as handle:
        for index, entry in enumerate(_l1_entries(handle, header)):
            offset = entry & L2_OFFSET_MASK
            if not offset:
                continue
            handle.seek(offset)
            table = handle.read(header.cluster_size).ljust(header.cluster_size, b"\0")
            values = struct.unpack(">{}Q".format(per_table * words), table[:per_table * words * 8])
            for slot in range(per_table):
                low = values[slot * words]
                if low & COMPRESSED_BIT:
                    raise CompressedCluster("Cluster is compressed")
                if words == 2:
                    units = bin(values[slot * 2 + 1] & 0xFFFFFFFF).count("1")
                else:
                    units = 1 if (low & ALLOCATED_BIT or low & L2_OFFSET_MASK) else 0
                if units:
                    found[index * per_table + slot] = units
    return found


def allocated_bytes(path):
    """qcow2_helper `allocated`: allocated clusters (or subclusters) x their size."""
    header = read_header(path)
    units = sum(own_allocation(header, path).values())
    return units * (header.cluster_size // 32 if header.extended_l2 else header.cluster_size)


def cluster_bitmap(path):
    """qcow2_helper `bitmap`: one bit per cluster of the virtual size (rounded down to whole bytes),
    least-significant bit first."""
    header = read_header(path)
    return bitmap_of(header, own_allocation(header, path))


def bitmap_of(header, allocation):
    size = (header.size // header.cluster_size) >> 3
    bitmap = bytearray(size)
    for cluster in allocation:
        if cluster >> 3 < size:
            bitmap[cluster >> 3] |= 1 << (cluster & 7)
    return bytes(bitmap)


# ---- writing a whole image at once -----------------------------------------------------------------

def write_image(path, virtual_size, clusters=(), backing=None, hidden=False, cluster_bits=DEFAULT_CLUSTER_BITS,
                incompatible=0, data=None):
    """A QCOW2 v3 image (16-bit refcounts) with guest clusters `clusters` allocated: filled from
    `data[cluster]` when given, else left as holes (reads as zeros, costs nothing). `backing` is the
    backing file name as written (format qcow2); the "vate" flag says `hidden`. `incompatible` sets
    feature bits as they are (for hostile images)."""
    cluster = 1 << cluster_bits
    data = data or {}
    wanted = sorted(set(clusters) | set(data))
    if wanted and (wanted[0] < 0 or wanted[-1] >= -(-virtual_size // cluster)):
        raise ValueError("cluster out of the virtual size")
    per_l2 = cluster // 8
    l1_size = max(1, -(-virtual_size // (cluster * per_l2)))
    l1_clusters = -(-l1_size * 8 // cluster)
    tables = sorted(set(index // per_l2 for index in wanted))
    fixed = 1 + l1_clusters + len(tables) + len(wanted)        # header, L1, L2s, data
    refcount_blocks, table_clusters = 1, 1
    per_block = cluster * 8 // (1 << REFCOUNT_ORDER)
    while True:
        total = fixed + refcount_blocks + table_clusters
        blocks = -(-total // per_block)
        needed_table = -(-blocks * 8 // cluster)
        if blocks == refcount_blocks and needed_table == table_clusters:
            break
        refcount_blocks, table_clusters = blocks, needed_table
    table_at = 1
    blocks_at = table_at + table_clusters
    l1_at = blocks_at + refcount_blocks
    l2_at = l1_at + l1_clusters
    data_at = l2_at + len(tables)
    total = data_at + len(wanted)

    with open(path, "wb") as handle:
        handle.truncate(total * cluster)
        handle.write(_header_cluster(virtual_size, cluster_bits, l1_size, l1_at * cluster, table_at * cluster,
                                     table_clusters, backing, hidden, incompatible))
        handle.seek(table_at * cluster)
        handle.write(struct.pack(">{}Q".format(refcount_blocks),
                                 *[(blocks_at + number) * cluster for number in range(refcount_blocks)]))
        counts = struct.pack(">H", 1) * total
        handle.seek(blocks_at * cluster)
        handle.write(counts)
        l1 = [0] * l1_size
        for number, table in enumerate(tables):
            l1[table] = ((l2_at + number) * cluster) | ALLOCATED_BIT
        handle.seek(l1_at * cluster)
        handle.write(struct.pack(">{}Q".format(l1_size), *l1))
        l2 = dict((table, [0] * per_l2) for table in tables)
        for number, index in enumerate(wanted):
            offset = (data_at + number) * cluster
            l2[index // per_l2][index % per_l2] = offset | ALLOCATED_BIT
            if index in data:
                handle.seek(offset)
                handle.write(data[index][:cluster])
        for number, table in enumerate(tables):
            handle.seek((l2_at + number) * cluster)
            handle.write(struct.pack(">{}Q".format(per_l2), *l2[table]))


def _header_cluster(virtual_size, cluster_bits, l1_size, l1_offset, refcount_offset, refcount_clusters, backing,
                    hidden, incompatible):
    extensions = b""
    if backing is not None:
        extensions += struct.pack(">II", BACKING_FORMAT_EXTENSION, 5) + b"qcow2\0\0\0"
    extensions += struct.pack(">IIQ", HIDDEN_EXTENSION, HIDDEN_EXTENSION_LENGTH, (1 << 56) if hidden else 0)
    extensions += struct.pack(">II", END_OF_EXTENSIONS, 0)
    name = backing.encode("utf-8") if backing is not None else b""
    backing_offset = V3_HEADER_LENGTH + len(extensions) if backing is not None else 0
    header = struct.pack(HEADER_FIELDS, MAGIC, 3, backing_offset, len(name), cluster_bits, virtual_size, 0,
                         l1_size, l1_offset, refcount_offset, refcount_clusters, 0, 0)
    header += struct.pack(V3_FIELDS, incompatible, 0, 0, REFCOUNT_ORDER, V3_HEADER_LENGTH)
    header += bytes(V3_HEADER_LENGTH - len(header))         # compression type zlib, padding
    return header + extensions + name
