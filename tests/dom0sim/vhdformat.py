"""The VHD format as blktap 4.0.8's libvhd (`vhd-util`) lays it out, byte for byte: the constants, the
footer, the dynamic header with its parent locators and the batmap header (encode and decode, with
the checks libvhd makes), and the small arithmetic of sectors, bitmaps and geometry.

Dynamic and differencing disks: a footer copy at 0, the dynamic header at 512, the BAT at 1536
(padded to a sector), the batmap header and the batmap right after the BAT, the parent locators
after the batmap, then the data blocks in allocation order (a sector bitmap placed so that the
2 MiB of data starts on a 4 KiB boundary) and the footer at the end of data. Fixed disks are the
raw data followed by a footer.
"""
import errno
import os
import re
import struct
import uuid as uuidlib

SECTOR_SIZE = 512
BLOCK_SIZE = 2 * 1024 * 1024
SECTORS_PER_BLOCK = BLOCK_SIZE // SECTOR_SIZE
BITMAP_BYTES = 4096
"""What a block costs on disk besides its data: the 512-byte sector bitmap plus the alignment gap."""
PAGE_SECTORS = 8
MIB = 1024 * 1024

DISK_FIXED = 2
DISK_DYNAMIC = 3
DISK_DIFF = 4
DISK_TYPE_NAMES = {
    0: "None", 1: "Reserved (deprecated)", 2: "Fixed hard disk", 3: "Dynamic hard disk",
    4: "Differencing hard disk", 5: "Reserved (deprecated)", 6: "Reserved (deprecated)",
}

UNUSED = 0xFFFFFFFF
NO_OFFSET = 0xFFFFFFFFFFFFFFFF
VHD_EPOCH = 946684800
FOOTER_COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"
BATMAP_COOKIE = b"tdbatmap"
FEATURES_RESERVED = 0x00000002
FORMAT_VERSION = 0x00010000
HEADER_VERSION = 0x00010000
CREATOR_APP = b"tap\0"
CREATOR_VERSION = 0x00010003
CREATOR_OS = 0
BATMAP_VERSION = 0x00010002
TABLE_OFFSET = 3 * SECTOR_SIZE

PLAT_CODE_NONE = 0
PLAT_CODE_NAMES = {
    0x00000000: "PLAT_CODE_NONE",
    0x57693272: "PLAT_CODE_WI2R",
    0x5769326B: "PLAT_CODE_WI2K",
    0x57327275: "PLAT_CODE_W2RU",
    0x57326B75: "PLAT_CODE_W2KU",
    0x4D616320: "PLAT_CODE_MAC",
    0x4D616358: "PLAT_CODE_MACX",
}
PLAT_CODE_MACX = 0x4D616358
PLAT_CODE_W2KU = 0x57326B75
PLAT_CODE_W2RU = 0x57327275

_FOOTER = struct.Struct(">8sIIQI4sIIQQIII16sBB426s")
HEADER_STRUCT = struct.Struct(">8sQQIIII16sII512s192s256s")
_LOCATOR = struct.Struct(">IIIIQ")
_BATMAP_HEADER = struct.Struct(">8sQIIIB")


class VhdError(Exception):
    """An invalid or unusable VHD; `errno` is the positive errno libvhd would report negated."""

    def __init__(self, errno_value, message):
        super(VhdError, self).__init__(message)
        self.errno = errno_value
        self.message = message

    def __str__(self):
        return self.message


# ---------------------------------------------------------------------------------------------
# Pure helpers: checksums, geometry, padding, bit runs, locator encodings


def checksum(raw):
    """Ones' complement of the byte sum, as the VHD spec and libvhd compute it."""
    return ~sum(bytearray(raw)) & 0xFFFFFFFF


def chs_geometry(size):
    """(cylinders, heads, sectors per track) for a disk of `size` bytes, as libvhd's vhd_chs."""
    secs = max(1, -(-size // SECTOR_SIZE))
    secs = min(secs, 65535 * 16 * 255)
    if secs >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = secs // spt
    else:
        spt = 17
        cth = secs // spt
        heads = max(4, (cth + 1023) // 1024)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = secs // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = secs // spt
    return cth // heads, heads, spt


def encode_geometry(chs):
    cyl, heads, spt = chs
    return (cyl << 16) | (heads << 8) | spt


def padded(nbytes):
    """`nbytes` rounded up to whole sectors."""
    return -(-nbytes // SECTOR_SIZE) * SECTOR_SIZE


def sectors_no_zero(nbytes):
    """Sectors needed for `nbytes`, at least one (libvhd's secs_round_up_no_zero)."""
    return max(1, -(-nbytes // SECTOR_SIZE))


def vhd_time(unix_seconds):
    return (int(unix_seconds) - VHD_EPOCH) & 0xFFFFFFFF


def bit_runs(mask, nbits):
    """(first, count) runs of set bits in `mask`, bit 0 being the most significant of `nbits`."""
    text = format(mask, "0{}b".format(nbits))
    return [(m.start(), m.end() - m.start()) for m in re.finditer("1+", text)]


def range_mask(first, count, nbits):
    """Mask with bits [first, first+count) set, MSB-first over `nbits`."""
    return ((1 << count) - 1) << (nbits - first - count)


def set_bit_range(bitmap, first, count):
    """Set bits [first, first+count) of a MSB-first bytearray bitmap."""
    end = first + count
    while first < end and first & 7:
        bitmap[first >> 3] |= 0x80 >> (first & 7)
        first += 1
    whole = (end - first) >> 3
    if whole > 0:
        bitmap[first >> 3:(first >> 3) + whole] = b"\xff" * whole
        first += whole << 3
    while first < end:
        bitmap[first >> 3] |= 0x80 >> (first & 7)
        first += 1


def bit_is_set(bitmap, index):
    return bool(bitmap[index >> 3] & (0x80 >> (index & 7)))


def relative_locator_path(child_path, parent_path):
    """The relative path libvhd stores in locators: `./x.vhd`, or `../dir/x.vhd` across directories."""
    child_dir = os.path.dirname(os.path.realpath(child_path))
    rel = os.path.relpath(os.path.realpath(parent_path), child_dir)
    return rel if rel.startswith("../") else "./" + rel


def encode_parent_name(name):
    """The header's 512-byte UTF-16BE parent name field."""
    encoded = name.encode("utf-16-be")
    if not name or len(encoded) > 512:
        raise VhdError(errno.EINVAL, "invalid parent name {!r}".format(name))
    return encoded.ljust(512, b"\0")


def encode_locator(code, relative):
    """Locator payload: MACX is a UTF-8 `file://` URL, W2KU/W2RU UTF-16LE with `.\\` and backslashes."""
    if code == PLAT_CODE_MACX:
        return ("file://" + relative).encode("ascii")
    if relative.startswith("/"):
        text = relative
    else:
        text = ".\\" + (relative[2:] if relative.startswith("./") else relative)
    return text.replace("/", "\\").encode("utf-16-le")


def decode_locator(code, payload):
    """The parent path a locator names, or None where libvhd could not decode it."""
    try:
        if code == PLAT_CODE_MACX:
            text = payload.decode("ascii")
            return text[len("file://"):] if text.startswith("file://") else None
        if code in (PLAT_CODE_W2KU, PLAT_CODE_W2RU):
            text = payload.decode("utf-16-le")
            text.encode("ascii")
            text = text.replace("\\", "/")
            return text[2:] if text[:2] in ("C:", "c:") else text
    except (UnicodeDecodeError, UnicodeEncodeError):
        return None
    return None


# ---------------------------------------------------------------------------------------------
# On-disk structures


class _Checksummed(object):
    """A structure whose checksum field covers its own packed bytes (footer and header)."""

    def computed_checksum(self):
        return checksum(self.pack(with_checksum=0))

    def sealed(self):
        """Bytes with a freshly computed checksum (and the checksum field updated)."""
        self.checksum = self.computed_checksum()
        return self.pack()


class Footer(_Checksummed):
    """The 512-byte hd_ftr, with blktap's `hidden` byte after `saved_state`."""

    def __init__(self, cookie=FOOTER_COOKIE, features=FEATURES_RESERVED, format_version=FORMAT_VERSION,
                 data_offset=NO_OFFSET, timestamp=0, creator_app=CREATOR_APP,
                 creator_version=CREATOR_VERSION, creator_os=CREATOR_OS, original_size=0,
                 current_size=0, geometry=0, disk_type=DISK_DYNAMIC, checksum=0,
                 uuid="00000000-0000-0000-0000-000000000000", saved_state=0, hidden=0,
                 reserved=bytes(426)):
        self.cookie = cookie
        self.features = features
        self.format_version = format_version
        self.data_offset = data_offset
        self.timestamp = timestamp
        self.creator_app = creator_app
        self.creator_version = creator_version
        self.creator_os = creator_os
        self.original_size = original_size
        self.current_size = current_size
        self.geometry = geometry
        self.disk_type = disk_type
        self.checksum = checksum
        self.uuid = uuid
        self.saved_state = saved_state
        self.hidden = hidden
        self.reserved = reserved

    @classmethod
    def unpack(cls, raw):
        f = _FOOTER.unpack(bytes(raw[:_FOOTER.size]))
        return cls(f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9], f[10], f[11], f[12],
                   str(uuidlib.UUID(bytes=f[13])), f[14], f[15], f[16])

    def pack(self, with_checksum=None):
        value = self.checksum if with_checksum is None else with_checksum
        return _FOOTER.pack(self.cookie, self.features, self.format_version, self.data_offset,
                            self.timestamp, self.creator_app, self.creator_version, self.creator_os,
                            self.original_size, self.current_size, self.geometry, self.disk_type,
                            value, uuidlib.UUID(self.uuid).bytes, self.saved_state, self.hidden,
                            self.reserved)

    @property
    def chs(self):
        return (self.geometry >> 16) & 0xFFFF, (self.geometry >> 8) & 0xFF, self.geometry & 0xFF

    def problem(self):
        """Why libvhd would reject this footer, or None."""
        if self.cookie != FOOTER_COOKIE:
            return "invalid cookie"
        if self.checksum != self.computed_checksum():
            return "invalid checksum"
        return None


class Locator(object):
    """One of the header's 8 parent locator entries; `name` is the decoded parent path."""

    def __init__(self, code=PLAT_CODE_NONE, data_space=0, data_len=0, reserved=0, data_offset=0,
                 name=None):
        self.code = code
        self.data_space = data_space
        self.data_len = data_len
        self.reserved = reserved
        self.data_offset = data_offset
        self.name = name

    @property
    def code_name(self):
        return PLAT_CODE_NAMES.get(self.code, "UNKNOWN")

    @property
    def size(self):
        """Bytes the locator occupies: data_space is bytes when >= 512 (MSFT habit), else sectors."""
        if self.data_space < SECTOR_SIZE:
            return self.data_space * SECTOR_SIZE
        if self.data_space % SECTOR_SIZE == 0:
            return self.data_space
        return 0

    def pack(self):
        return _LOCATOR.pack(self.code, self.data_space, self.data_len, self.reserved, self.data_offset)


class Header(_Checksummed):
    """The 1024-byte dynamic disk header (dd_hdr)."""

    def __init__(self, cookie=HEADER_COOKIE, data_offset=NO_OFFSET, table_offset=TABLE_OFFSET,
                 header_version=HEADER_VERSION, max_bat_size=0, block_size=BLOCK_SIZE, checksum=0,
                 parent_uuid="00000000-0000-0000-0000-000000000000", parent_timestamp=0,
                 reserved1=0, parent_name_raw=bytes(512), locators=None, reserved2=bytes(256)):
        self.cookie = cookie
        self.data_offset = data_offset
        self.table_offset = table_offset
        self.header_version = header_version
        self.max_bat_size = max_bat_size
        self.block_size = block_size
        self.checksum = checksum
        self.parent_uuid = parent_uuid
        self.parent_timestamp = parent_timestamp
        self.reserved1 = reserved1
        self.parent_name_raw = parent_name_raw
        self.locators = locators if locators is not None else [Locator() for _ in range(8)]
        self.reserved2 = reserved2

    @classmethod
    def unpack(cls, raw):
        h = HEADER_STRUCT.unpack(bytes(raw[:HEADER_STRUCT.size]))
        locators = [Locator(*_LOCATOR.unpack(h[11][i * 24:(i + 1) * 24])) for i in range(8)]
        return cls(h[0], h[1], h[2], h[3], h[4], h[5], h[6], str(uuidlib.UUID(bytes=h[7])), h[8], h[9],
                   h[10], locators, h[12])

    def pack(self, with_checksum=None):
        value = self.checksum if with_checksum is None else with_checksum
        return HEADER_STRUCT.pack(self.cookie, self.data_offset, self.table_offset, self.header_version,
                            self.max_bat_size, self.block_size, value,
                            uuidlib.UUID(self.parent_uuid).bytes, self.parent_timestamp,
                            self.reserved1, self.parent_name_raw,
                            b"".join(loc.pack() for loc in self.locators), self.reserved2)

    @property
    def parent_name(self):
        """The UTF-16BE parent name up to its first NUL (libvhd decodes it as a C string)."""
        try:
            text = self.parent_name_raw.decode("utf-16-be")
        except UnicodeDecodeError:
            return None
        return text.split("\0", 1)[0]

    def problem(self):
        """Why libvhd would reject this header, or None."""
        if self.cookie != HEADER_COOKIE:
            return "invalid cookie"
        if self.header_version != HEADER_VERSION:
            return "invalid header version"
        if self.data_offset != NO_OFFSET:
            return "invalid data offset"
        if any(loc.code not in PLAT_CODE_NAMES for loc in self.locators):
            return "invalid parent locator code"
        if self.checksum != self.computed_checksum():
            return "invalid checksum"
        return None


class BatmapHeader(object):
    """blktap's batmap header sector: cookie, map offset/size/version, map checksum, marker."""

    def __init__(self, cookie=BATMAP_COOKIE, batmap_offset=0, batmap_size=0,
                 batmap_version=BATMAP_VERSION, checksum=0, marker=0, rest=bytes(SECTOR_SIZE - 29)):
        self.cookie = cookie
        self.batmap_offset = batmap_offset
        self.batmap_size = batmap_size
        self.batmap_version = batmap_version
        self.checksum = checksum
        self.marker = marker
        self.rest = rest

    @classmethod
    def unpack(cls, raw):
        fields = _BATMAP_HEADER.unpack(bytes(raw[:_BATMAP_HEADER.size]))
        return cls(*fields, rest=bytes(raw[_BATMAP_HEADER.size:SECTOR_SIZE]))

    def pack(self):
        return _BATMAP_HEADER.pack(self.cookie, self.batmap_offset, self.batmap_size,
                                   self.batmap_version, self.checksum, self.marker) + self.rest

    @property
    def keyhash(self):
        """Hex of the key hash when one is set (cookie byte after the marker), else ''."""
        raw = self.rest
        return raw[33:65].hex() if raw[:1] == b"\x01" else ""

    def problem(self):
        if self.cookie != BATMAP_COOKIE or self.batmap_version > BATMAP_VERSION:
            return "invalid batmap header"
        return None
