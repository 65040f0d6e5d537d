"""VHD files laid out byte for byte as blktap 4.0.8's libvhd (`vhd-util`) writes them.

Dynamic and differencing disks: a footer copy at 0, the dynamic header at 512, the BAT at 1536
(padded to a sector), the batmap header and the batmap right after the BAT, the parent locators
after the batmap, then the data blocks in allocation order (a sector bitmap placed so that the
2 MiB of data starts on a 4 KiB boundary) and the footer at the end of data. Fixed disks are the
raw data followed by a footer. Writes follow libvhd's write path, so partial sectors, bitmaps,
batmap "full" bits, block order and file sizes come out as the real tool makes them.
"""
import errno
import hashlib
import os
import re
import struct
import time
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
_HEADER = struct.Struct(">8sQQIIII16sII512s192s256s")
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
        h = _HEADER.unpack(bytes(raw[:_HEADER.size]))
        locators = [Locator(*_LOCATOR.unpack(h[11][i * 24:(i + 1) * 24])) for i in range(8)]
        return cls(h[0], h[1], h[2], h[3], h[4], h[5], h[6], str(uuidlib.UUID(bytes=h[7])), h[8], h[9],
                   h[10], locators, h[12])

    def pack(self, with_checksum=None):
        value = self.checksum if with_checksum is None else with_checksum
        return _HEADER.pack(self.cookie, self.data_offset, self.table_offset, self.header_version,
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


# ---------------------------------------------------------------------------------------------
# An open VHD file


def _footer_field(name, doc=None):
    """A read-only Vhd attribute that reads one field of its footer."""
    def read(vhd):
        return getattr(vhd.footer, name)
    return property(read, doc=doc or "The footer's `{}`.".format(name))


def _header_field(name, required=False):
    """A read-only Vhd attribute that reads one field of its dynamic header.

    Without a header (a fixed disk) it is None, or EINVAL when the field is `required`.
    """
    def read(vhd):
        if required:
            return getattr(vhd._need_header(), name)
        return getattr(vhd.header, name) if vhd.header else None
    return property(read, doc="The header's `{}`.".format(name))


class Vhd(object):
    """One open VHD file. Use `Vhd.open(path, writable=False)` as a context manager.

    `fast=True` reads the footer copy at offset 0 and the header only, as libvhd's VHD_OPEN_FAST
    (`scan -f`); a fixed disk then fails with EINVAL like the real tool. `Vhd.open_window` reads a
    VHD stored inside a larger file (an LV's extents of a PV), read-only.
    """

    def __init__(self, path, fd, writable, window=None):
        self.path = path
        self.writable = writable
        self._fd = fd
        self._base, self._length = window or (0, None)
        self.footer = None
        self.header = None
        self._bat = None
        self._bat_tail = b""
        self._batmap_header = None
        self._batmap = None
        self._end_of_data = None

    @classmethod
    def open(cls, path, writable=False, fast=False, window=None):
        try:
            fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        except OSError as exc:
            raise VhdError(exc.errno, "opening {}: {}".format(path, exc.strerror)) from None
        vhd = cls(path, fd, writable, window)
        try:
            vhd._load(fast)
        except OSError as exc:
            vhd.close()
            raise VhdError(exc.errno, "{}: {}".format(path, exc.strerror)) from None
        except BaseException:
            vhd.close()
            raise
        return vhd

    @classmethod
    def open_window(cls, path, offset, length, fast=False):
        """The VHD held in bytes [offset, offset+length) of `path`, read-only (its parent cannot be
        followed: the locators name paths outside the window)."""
        return cls.open(path, fast=fast, window=(int(offset), int(length)))

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- raw I/O --------------------------------------------------------------------------------

    def _file_size(self):
        return os.fstat(self._fd).st_size if self._length is None else self._length

    def _raw_pread(self, length, offset):
        """os.pread within the window: nothing past its end."""
        if self._length is not None:
            length = max(0, min(length, self._length - offset))
        return os.pread(self._fd, length, self._base + offset)

    def _pread(self, offset, length):
        """Exactly `length` bytes, failing like libvhd: nothing there is EPIPE, a short read EIO."""
        try:
            data = self._raw_pread(length, offset)
        except OSError as exc:
            raise VhdError(exc.errno, "{}: {}".format(self.path, exc.strerror)) from None
        if len(data) == length:
            return data
        if not data:
            raise VhdError(errno.EPIPE, "{}: nothing to read at {}".format(self.path, offset))
        raise VhdError(errno.EIO, "{}: short read at {}".format(self.path, offset))

    def _pwrite(self, offset, data):
        view = memoryview(data)
        while len(view):
            done = os.pwrite(self._fd, view, offset)
            view = view[done:]
            offset += done

    def _zero_fill(self, start, end):
        """Make [start, end) read as zeros: overwrite what the file already holds, extend with a hole."""
        size = self._file_size()
        pos = start
        while pos < min(size, end):
            count = min(BLOCK_SIZE, min(size, end) - pos)
            self._pwrite(pos, bytes(count))
            pos += count
        if size < end:
            os.ftruncate(self._fd, end)

    # -- loading --------------------------------------------------------------------------------

    def _load(self, fast):
        if fast:
            self.footer = self._footer_at(0)
        else:
            self.footer = self._read_footer()
        if self.is_dynamic:
            self.header = Header.unpack(self._pread(self.footer.data_offset, _HEADER.size))
            problem = self.header.problem()
            if problem:
                raise VhdError(errno.EINVAL, "{}: header {}".format(self.path, problem))
            for loc in self.header.locators:
                loc.name = self._decode_locator(loc)

    def _footer_at(self, offset):
        footer = Footer.unpack(self._pread(offset, SECTOR_SIZE))
        problem = footer.problem()
        if problem:
            raise VhdError(errno.EINVAL, "{}: footer {}".format(self.path, problem))
        return footer

    def _read_footer(self):
        """The footer at the end, else the 511-byte short footer, else the copy at 0 (libvhd order)."""
        size = self._file_size()
        for offset in (size - SECTOR_SIZE, size - SECTOR_SIZE + 1):
            if offset < 0:
                continue
            raw = self._raw_pread(SECTOR_SIZE, offset).ljust(SECTOR_SIZE, b"\0")
            footer = Footer.unpack(raw)
            if footer.problem() is None:
                return footer
        return self._footer_at(0)

    def _decode_locator(self, loc):
        if loc.code not in (PLAT_CODE_MACX, PLAT_CODE_W2KU, PLAT_CODE_W2RU) or loc.size <= 0:
            return None
        raw = self._raw_pread(loc.size, loc.data_offset)
        if len(raw) < loc.size:
            return None
        return decode_locator(loc.code, raw[:loc.data_len])

    # -- footer fields --------------------------------------------------------------------------

    @property
    def is_dynamic(self):
        return self.footer.disk_type in (DISK_DYNAMIC, DISK_DIFF)

    disk_type = _footer_field("disk_type")
    uuid = _footer_field("uuid")
    hidden = _footer_field("hidden")
    virtual_size = _footer_field("current_size")
    original_size = _footer_field("original_size")
    geometry = _footer_field("chs")
    timestamp = _footer_field(
        "timestamp", "Footer timestamp in VHD seconds (since 2000-01-01 UTC); add VHD_EPOCH for Unix time.")
    creator_version = _footer_field("creator_version")
    creator_os = _footer_field("creator_os")

    @property
    def creator_app(self):
        return self.footer.creator_app.rstrip(b"\0").decode("latin-1")

    # -- header fields --------------------------------------------------------------------------

    def _need_header(self):
        if self.header is None:
            raise VhdError(errno.EINVAL, "{}: not a dynamic or differencing disk".format(self.path))
        return self.header

    parent_uuid = _header_field("parent_uuid")
    parent_timestamp = _header_field("parent_timestamp")
    max_bat_size = _header_field("max_bat_size", required=True)
    block_size = _header_field("block_size", required=True)

    @property
    def parent_name(self):
        return self.header.parent_name if self.footer.disk_type == DISK_DIFF else None

    @property
    def parent_locators(self):
        """The locators in use (code other than NONE), in header order."""
        if self.header is None:
            return []
        return [loc for loc in self.header.locators if loc.code != PLAT_CODE_NONE]

    @property
    def spb(self):
        return self._need_header().block_size // SECTOR_SIZE

    @property
    def bm_secs(self):
        return sectors_no_zero(self.spb >> 3)

    # -- BAT and batmap -------------------------------------------------------------------------

    @property
    def bat(self):
        """BAT entries for the blocks of the virtual size (sector offsets or UNUSED)."""
        if self._bat is None:
            header = self._need_header()
            entries = self.footer.current_size // header.block_size
            if header.max_bat_size < entries:
                raise VhdError(errno.EINVAL, "{}: more blocks than BAT entries".format(self.path))
            raw = self._pread(header.table_offset, padded(entries * 4))
            self._bat = list(struct.unpack(">{}I".format(entries), raw[:entries * 4]))
            self._bat_tail = raw[entries * 4:]
        return self._bat

    @property
    def has_batmap(self):
        """blktap writes a batmap into tap-created disks from version 1.2 on."""
        if not self.is_dynamic or self.footer.creator_app != CREATOR_APP:
            return False
        if self.footer.creator_version >= 0x00010002:
            return True
        if self.footer.creator_version <= 0x00000001:
            return False
        return self._read_batmap_header().problem() is None

    def _batmap_header_offset(self):
        return self.header.table_offset + padded(self.header.max_bat_size * 4)

    def _batmap_map_bytes(self):
        return sectors_no_zero(self.footer.current_size >> 24) * SECTOR_SIZE

    def _read_batmap_header(self):
        return BatmapHeader.unpack(self._pread(self._batmap_header_offset(), SECTOR_SIZE))

    @property
    def batmap_header(self):
        """The batmap header, or None for disks without a batmap."""
        if self._batmap_header is None and self.has_batmap:
            header = self._read_batmap_header()
            if header.problem():
                raise VhdError(errno.EINVAL, "{}: {}".format(self.path, header.problem()))
            self._batmap_header = header
        return self._batmap_header

    @property
    def batmap(self):
        """The raw batmap (bit i = block i is fully written, MSB-first), or None."""
        loaded = self._loaded_batmap()
        return bytes(loaded) if loaded is not None else None

    def _loaded_batmap(self):
        """The batmap as a mutable bytearray, read and checked once."""
        header = self.batmap_header
        if header is None:
            return None
        if self._batmap is None:
            self._batmap = bytearray(self._pread(header.batmap_offset, self._batmap_map_bytes()))
            if checksum(self._batmap) != header.checksum:
                raise VhdError(errno.EINVAL, "{}: invalid batmap checksum".format(self.path))
        return self._batmap

    def batmap_computed_checksum(self):
        """Checksum of the batmap as stored, without rejecting a bad one (for `read -p`)."""
        header = self.batmap_header
        if header is None:
            return None
        return checksum(self._pread(header.batmap_offset, self._batmap_map_bytes()))

    @property
    def marker(self):
        header = self.batmap_header
        return header.marker if header is not None else 0

    def block_full(self, block):
        """True when the batmap marks `block` as fully written."""
        header = self.batmap_header
        if header is None or block >= header.batmap_size * SECTOR_SIZE * 8:
            return False
        return bit_is_set(self._loaded_batmap(), block)

    def block_bitmap(self, block):
        """The raw 512-byte sector bitmap of an allocated block."""
        entry = self._entry(block)
        if entry == UNUSED:
            raise VhdError(errno.EINVAL, "{}: block {} is not allocated".format(self.path, block))
        return self._pread(entry * SECTOR_SIZE, self.bm_secs * SECTOR_SIZE)

    def _entry(self, block):
        bat = self.bat
        if not 0 <= block < len(bat):
            raise VhdError(errno.ERANGE, "{}: block {} out of range".format(self.path, block))
        return bat[block]

    def _bitmap_mask(self, block):
        return int.from_bytes(self.block_bitmap(block)[:self.spb // 8], "big")

    # -- sizes ----------------------------------------------------------------------------------

    def end_of_headers(self):
        header = self._need_header()
        end = max(self.footer.data_offset + _HEADER.size,
                  header.table_offset + padded(header.max_bat_size * 4))
        batmap = self.batmap_header
        if batmap is not None:
            end = max(end, self._batmap_header_offset() + SECTOR_SIZE,
                      batmap.batmap_offset + batmap.batmap_size * SECTOR_SIZE)
        for loc in header.locators:
            if loc.code != PLAT_CODE_NONE:
                end = max(end, loc.data_offset + loc.size)
        return end

    def end_of_data(self):
        """First byte after the last block (or the metadata): where libvhd puts the footer."""
        if not self.is_dynamic:
            return self._file_size() - SECTOR_SIZE
        if self._end_of_data is None:
            end = self.end_of_headers() // SECTOR_SIZE
            used = [entry for entry in self.bat if entry != UNUSED]
            if used:
                end = max(end, max(used) + self.spb + self.bm_secs)
            self._end_of_data = end * SECTOR_SIZE
        return self._end_of_data

    @property
    def physical_size(self):
        """End of data + the footer, as `vhd-util query -s` reports it."""
        return self.end_of_data() + SECTOR_SIZE

    # -- parent -----------------------------------------------------------------------------------

    def parent_path(self):
        """Absolute path of the parent found through the locators; None without a parent."""
        if self.footer.disk_type != DISK_DIFF:
            return None
        if self._length is not None:
            raise VhdError(errno.ENOENT, "{}: a VHD read inside a window has no parent path".format(self.path))
        err = errno.EINVAL
        for loc in self.header.locators:
            if loc.name is None:
                continue
            found, err = _find_parent(self.path, loc.name)
            if found:
                return found
        raise VhdError(err, "{}: parent not found ({})".format(self.path, os.strerror(err)))

    # -- reading ----------------------------------------------------------------------------------

    def read_own(self, offset, length):
        """This file's own data: sectors whose bitmap bit is set, zeros elsewhere (no parent)."""
        return _read_layers([self], offset, length)

    def _own_runs(self, block, mask):
        """Copy plan for `mask` sectors of `block` present in this file: [(sector, count, file offset)]."""
        entry = self._entry(block)
        if entry == UNUSED:
            return []
        data_start = (entry + self.bm_secs) * SECTOR_SIZE
        return [(first, count, data_start + first * SECTOR_SIZE)
                for first, count in bit_runs(self._bitmap_mask(block) & mask, self.spb)]

    # -- writing ----------------------------------------------------------------------------------

    def _need_writable(self):
        if not self.writable or self._length is not None:
            raise VhdError(errno.EBADF, "{}: opened read-only".format(self.path))

    def write(self, offset, data):
        """Write bytes at any offset through libvhd's path: partial sectors merged with the chain."""
        self._need_writable()
        data = bytes(data)
        end = offset + len(data)
        if offset < 0 or end > self.virtual_size:
            raise VhdError(errno.ERANGE, "{}: write beyond the virtual size".format(self.path))
        if not data:
            return
        if not self.is_dynamic:
            self._store(offset, data)
            return
        first_sec, last_sec = offset // SECTOR_SIZE, -(-end // SECTOR_SIZE)
        head, tail = offset % SECTOR_SIZE, end % SECTOR_SIZE
        if head:
            new = min(SECTOR_SIZE - head, len(data))
            sector = bytearray(self._read_chain(first_sec * SECTOR_SIZE, SECTOR_SIZE))
            sector[head:head + new] = data[:new]
            self._write_aligned(first_sec * SECTOR_SIZE, sector)
            data, offset = data[new:], offset + new
        if tail and (last_sec - first_sec > 1 or not head):
            sector = bytearray(self._read_chain((last_sec - 1) * SECTOR_SIZE, SECTOR_SIZE))
            sector[:tail] = data[len(data) - tail:]
            self._write_aligned((last_sec - 1) * SECTOR_SIZE, sector)
            data = data[:len(data) - tail]
        if data:
            self._write_aligned(offset, data)
        self._write_footer()

    def _read_chain(self, offset, length):
        chain = [self] + _open_parents(self)
        try:
            return _read_layers(chain, offset, length)
        finally:
            for vhd in chain[1:]:
                vhd.close()

    def _store(self, offset, data):
        """Sector-aligned data into this disk: raw for fixed disks, through the BAT otherwise."""
        if self.is_dynamic:
            self._write_aligned(offset, data)
        else:
            self._pwrite(offset, data)

    def _write_aligned(self, offset, data):
        """Sector-aligned write split per block: allocate, write data, set bits, mark full blocks."""
        block_bytes = self.spb * SECTOR_SIZE
        view = memoryview(data)
        while len(view):
            block, blk_off = divmod(offset, block_bytes)
            count = min(block_bytes - blk_off, len(view))
            if self._entry(block) == UNUSED:
                self._allocate(block, zero=count < block_bytes)
            self._pwrite((self.bat[block] + self.bm_secs) * SECTOR_SIZE + blk_off, view[:count])
            self._mark_written(block, blk_off // SECTOR_SIZE, count // SECTOR_SIZE)
            view, offset = view[count:], offset + count

    def _mark_written(self, block, first, count):
        if self.has_batmap and self.block_full(block):
            return
        bitmap = bytearray(self.block_bitmap(block))
        set_bit_range(bitmap, first, count)
        self._pwrite(self.bat[block] * SECTOR_SIZE, bitmap)
        if self.has_batmap and int.from_bytes(bytes(bitmap[:self.spb // 8]), "big") == (1 << self.spb) - 1:
            set_bit_range(self._loaded_batmap(), block, 1)
            self._write_batmap()

    def _allocate(self, block, zero=True):
        """Append `block` at the end of data, its data starting on a 4 KiB boundary.

        Like libvhd, the gap, bitmap and data are zeroed first unless the caller is about to
        write the whole block; then whatever lay there (the old footer) stays in the gap.
        """
        eod = self.end_of_data()
        first = eod // SECTOR_SIZE
        bitmap_sector = first + (-(first + self.bm_secs)) % PAGE_SECTORS
        if bitmap_sector > UNUSED - 1:
            raise VhdError(errno.EIO, "{}: file too large for the BAT".format(self.path))
        data_start = (bitmap_sector + self.bm_secs) * SECTOR_SIZE
        if zero:
            self._pwrite(eod, bytes(data_start - eod))
            self._zero_fill(data_start, data_start + self.spb * SECTOR_SIZE)
        self.bat[block] = bitmap_sector
        self._end_of_data = data_start + self.spb * SECTOR_SIZE
        self._write_bat_entry(block)

    def allocate_block(self, block, sectors=None):
        """Allocate `block` with its data left a hole (zeros) and mark sectors written.

        `sectors` is None for all of them, a count (the first N) or an iterable of sector numbers.
        Meant for big simulated disks where the content does not matter.
        """
        self._need_writable()
        if self._entry(block) == UNUSED:
            self._allocate(block)
        if sectors is None:
            runs = [(0, self.spb)]
        elif isinstance(sectors, int):
            runs = [(0, sectors)] if sectors else []
        else:
            mask = 0
            for sector in sectors:
                mask |= 1 << (self.spb - 1 - sector)
            runs = bit_runs(mask, self.spb)
        for first, count in runs:
            self._mark_written(block, first, count)
        self._write_footer()

    def _write_bat_entry(self, block):
        """Rewrite the BAT sector holding `block` (libvhd rewrites the whole BAT: same bytes)."""
        bat = self.bat
        first = block - block % (SECTOR_SIZE // 4)
        last = min(first + SECTOR_SIZE // 4, len(bat))
        raw = struct.pack(">{}I".format(last - first), *bat[first:last])
        if last == len(bat):
            raw += self._bat_tail
        self._pwrite(self.header.table_offset + first * 4, raw)

    def _write_batmap(self):
        header = self.batmap_header
        header.checksum = checksum(self._batmap)
        self._pwrite(header.batmap_offset, bytes(self._batmap))
        self._pwrite(self._batmap_header_offset(), header.pack())

    def _write_footer(self):
        """Footer at the end of data (file cut there) and, for dynamic disks, the copy at 0."""
        raw = self.footer.sealed()
        offset = self.end_of_data()
        self._pwrite(offset, raw)
        os.ftruncate(self._fd, offset + SECTOR_SIZE)
        if self.is_dynamic:
            self._pwrite(0, raw)

    def set_parent(self, parent_path):
        """Re-link to `parent_path` as libvhd's vhd_change_parent (`vhd-util modify -p`) does."""
        self._need_writable()
        if self.disk_type != DISK_DIFF:
            raise VhdError(errno.EINVAL, "{}: would-be child is not a differencing disk".format(self.path))
        target = os.path.realpath(parent_path)
        try:
            mtime = os.stat(target).st_mtime
        except OSError as exc:
            raise VhdError(exc.errno, "{}: {}".format(parent_path, exc.strerror)) from None
        with Vhd.open(target) as parent:
            self.header.parent_uuid = parent.uuid
        self.header.parent_name_raw = encode_parent_name(os.path.basename(target))
        self.header.parent_timestamp = vhd_time(mtime)
        relative = relative_locator_path(self.path, target)
        self._end_of_data = None
        for i, loc in enumerate(self.header.locators):
            if loc.code not in (PLAT_CODE_MACX, PLAT_CODE_W2KU, PLAT_CODE_W2RU):
                continue
            payload = encode_locator(loc.code, relative)
            space = padded(len(payload))
            if space > loc.size:
                raise VhdError(errno.ENAMETOOLONG, "{}: parent path too long".format(self.path))
            self._pwrite(loc.data_offset, payload.ljust(space, b"\0"))
            self.header.locators[i] = Locator(loc.code, space, len(payload), 0, loc.data_offset,
                                              decode_locator(loc.code, payload))
        self._pwrite(self.footer.data_offset, self.header.sealed())

    def set_hidden(self, flag):
        """`vhd-util set -f hidden -v N`: rewrite both footers with the new byte."""
        self._need_writable()
        self.footer.hidden = int(flag)
        self._write_footer()

    def set_marker(self, value):
        """`vhd-util set -f marker -v N`: the batmap header's marker byte."""
        self._need_writable()
        header = self.batmap_header
        if header is None:
            raise VhdError(errno.ENOSYS, "{}: no batmap".format(self.path))
        header.marker = int(value)
        self._pwrite(self._batmap_header_offset(), header.pack())


# ---------------------------------------------------------------------------------------------
# Chains


def _find_parent(child_path, name):
    """libvhd's vhd_find_parent: an absolute name as is, else relative to the child's directory."""
    if name.startswith("/") and os.access(name, os.R_OK):
        return name, 0
    location = os.path.dirname(os.path.realpath(child_path)) + "/" + name
    if os.access(location, os.R_OK):
        return os.path.realpath(location), 0
    return None, errno.ENOENT


def _open_parents(vhd):
    """Open the ancestors of `vhd` read-only, nearest first."""
    parents = []
    seen = {os.path.realpath(vhd.path)}
    current = vhd
    try:
        while current.disk_type == DISK_DIFF:
            path = current.parent_path()
            if path in seen or len(seen) > 256:
                raise VhdError(errno.ELOOP, "{}: parent chain loops".format(vhd.path))
            seen.add(path)
            current = Vhd.open(path)
            parents.append(current)
    except BaseException:
        for parent in parents:
            parent.close()
        raise
    return parents


def _read_layers(chain, offset, length):
    """Bytes [offset, offset+length) of the virtual disk seen through `chain` (child first)."""
    top = chain[0]
    if offset < 0 or length < 0 or offset + length > top.virtual_size:
        raise VhdError(errno.ERANGE, "{}: read beyond the virtual size".format(top.path))
    out = bytearray(length)
    pos = offset
    while pos < offset + length:
        block_bytes = top.spb * SECTOR_SIZE if top.is_dynamic else BLOCK_SIZE
        block, blk_off = divmod(pos, block_bytes)
        count = min(block_bytes - blk_off, offset + length - pos)
        first = blk_off // SECTOR_SIZE
        secs = -(-(blk_off + count) // SECTOR_SIZE) - first
        chunk = _read_block_sectors(chain, block, first, secs, block_bytes)
        skip = blk_off - first * SECTOR_SIZE
        out[pos - offset:pos - offset + count] = chunk[skip:skip + count]
        pos += count
    return bytes(out)


def _read_block_sectors(chain, block, first, secs, block_bytes):
    """Sectors [first, first+secs) of `block`: each from the nearest layer that has it, else zeros."""
    spb = block_bytes // SECTOR_SIZE
    buf = bytearray(secs * SECTOR_SIZE)
    need = range_mask(first, secs, spb)
    for layer in chain:
        if not need:
            break
        layer_secs = layer.virtual_size // SECTOR_SIZE - block * spb
        if layer_secs < spb:
            beyond = (1 << max(0, spb - max(0, layer_secs))) - 1
            need &= ~beyond
        if not layer.is_dynamic:
            runs = [(f, c, (block * spb + f) * SECTOR_SIZE) for f, c in bit_runs(need, spb)]
        elif block < len(layer.bat):
            runs = layer._own_runs(block, need)
        else:
            runs = []
        for start, count, file_offset in runs:
            data = layer._raw_pread(count * SECTOR_SIZE, file_offset)
            at = (start - first) * SECTOR_SIZE
            buf[at:at + len(data)] = data
            need &= ~range_mask(start, count, spb)
        if layer.disk_type != DISK_DIFF:
            break
    return buf


class _Chain(object):
    """A VHD and its ancestors opened read-only, closed together."""

    def __init__(self, path):
        top = Vhd.open(path)
        try:
            self.layers = [top] + _open_parents(top)
        except BaseException:
            top.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        for vhd in self.layers:
            vhd.close()


# ---------------------------------------------------------------------------------------------
# Creating disks


def _new_footer(size, disk_type, uuid, created):
    """A fresh footer; `uuid` and `created` (Unix seconds) default to a random UUID and now."""
    return Footer(data_offset=NO_OFFSET if disk_type == DISK_FIXED else SECTOR_SIZE,
                  timestamp=vhd_time(time.time() if created is None else created),
                  original_size=size, current_size=size, geometry=encode_geometry(chs_geometry(size)),
                  disk_type=disk_type, uuid=str(uuidlib.UUID(uuid) if uuid else uuidlib.uuid4()))


def dynamic_layout(footer, parent=None):
    """[(offset, bytes)] of a new dynamic/differencing disk, as __vhd_create writes it.

    `parent` is (parent_uuid, parent_timestamp, parent_name, relative_locator_path) or None.
    """
    max_bat = -(-footer.current_size // BLOCK_SIZE)
    header = Header(max_bat_size=max_bat)
    bat_bytes = padded(max_bat * 4)
    batmap_header_offset = TABLE_OFFSET + bat_bytes
    batmap_secs = sectors_no_zero((max_bat + 7) >> 3)
    batmap_map = bytes(batmap_secs * SECTOR_SIZE)
    map_checked = bytes(sectors_no_zero(footer.current_size >> 24) * SECTOR_SIZE)
    batmap = BatmapHeader(batmap_offset=batmap_header_offset + SECTOR_SIZE, batmap_size=batmap_secs,
                          checksum=checksum(map_checked))
    pieces = [
        (batmap.batmap_offset, batmap_map),
        (batmap_header_offset, batmap.pack()),
        (TABLE_OFFSET, (b"\xff\xff\xff\xff" * max_bat).ljust(bat_bytes, b"\0")),
    ]
    if parent is not None:
        parent_uuid, parent_timestamp, parent_name, relative = parent
        header.parent_uuid = parent_uuid
        header.parent_timestamp = parent_timestamp
        header.parent_name_raw = encode_parent_name(parent_name)
        offset = batmap.batmap_offset + batmap_secs * SECTOR_SIZE
        for i, code in enumerate((PLAT_CODE_MACX, PLAT_CODE_W2KU, PLAT_CODE_W2RU)):
            payload = encode_locator(code, relative)
            space = padded(len(payload))
            header.locators[i] = Locator(code, space, len(payload), 0, offset)
            pieces.append((offset, payload.ljust(space, b"\0")))
            offset += space
    raw_footer = footer.sealed()
    pieces.append((0, raw_footer))
    pieces.append((SECTOR_SIZE, header.sealed()))
    end = max(off + len(data) for off, data in pieces)
    pieces.append((end, raw_footer))
    return pieces


def _write_new_file(path, pieces, size=None):
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as exc:
        raise VhdError(exc.errno, "creating {}: {}".format(path, exc.strerror)) from None
    try:
        if size is not None:
            os.ftruncate(fd, size)
        for offset, data in pieces:
            os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def rounded_size(size_mib):
    """`vhd-util create -s N`: N MiB rounded up to whole 2 MiB blocks, in bytes."""
    return -(-size_mib * MIB // BLOCK_SIZE) * BLOCK_SIZE


def create(path, size_mib, fixed=False, uuid=None, created=None):
    """`vhd-util create -n path -s size_mib [-r]`: an empty dynamic (or fixed) disk.

    `uuid` and `created` (Unix seconds) pin what the real tool draws at random / from the clock.
    """
    if size_mib <= 0:
        raise VhdError(errno.EINVAL, "invalid size {}".format(size_mib))
    size = rounded_size(size_mib)
    if fixed:
        footer = _new_footer(size, DISK_FIXED, uuid, created)
        _write_new_file(path, [(size, footer.sealed())], size=size)
    else:
        _write_new_file(path, dynamic_layout(_new_footer(size, DISK_DYNAMIC, uuid, created)))


def snapshot_target(parent_path):
    """The disk `vhd-util snapshot` really links to: empty differencing parents are skipped."""
    target, seen = parent_path, set()
    while True:
        with Vhd.open(target) as vhd:
            if vhd.disk_type != DISK_DIFF or any(entry != UNUSED for entry in vhd.bat):
                return target
            seen.add(os.path.realpath(target))
            target = vhd.parent_path()
        if target in seen:
            raise VhdError(errno.ELOOP, "{}: parent chain loops".format(parent_path))


def snapshot(child_path, parent_path, skip_empty_parents=True, uuid=None, created=None):
    """`vhd-util snapshot -n child -p parent` (`skip_empty_parents=False` is `-e`).

    The parent timestamp is the parent's mtime, as libvhd records it.
    """
    target = snapshot_target(parent_path) if skip_empty_parents else parent_path
    with Vhd.open(target) as parent:
        size = parent.virtual_size
        parent_uuid = parent.uuid
    parent_name = os.path.basename(target)
    parent_ts = vhd_time(os.stat(target).st_mtime)
    relative = relative_locator_path(child_path, target)
    pieces = dynamic_layout(_new_footer(size, DISK_DIFF, uuid, created),
                            (parent_uuid, parent_ts, parent_name, relative))
    _write_new_file(child_path, pieces)


# ---------------------------------------------------------------------------------------------
# Whole-file operations


def allocated_blocks(path):
    """Indices of the BAT entries in use (what `vhd-util read -B` shows)."""
    with Vhd.open(path) as vhd:
        return [i for i, entry in enumerate(vhd.bat) if entry != UNUSED]


def resolve_parent(path):
    """Absolute parent path through the locators, None for a disk without parent.

    Raises VhdError(ENOENT) when the locators name a parent that does not exist.
    """
    with Vhd.open(path) as vhd:
        return vhd.parent_path()


def set_parent(child_path, parent_path):
    """`vhd-util modify -n child -p parent`: point the child at another parent."""
    with Vhd.open(child_path, writable=True) as child:
        child.set_parent(parent_path)


def read_chain(path, offset=0, length=None):
    """Virtual content through the whole chain (libvhd's read: nearest layer with the sector wins)."""
    with _Chain(path) as chain:
        top = chain.layers[0]
        if length is None:
            length = top.virtual_size - offset
        return _read_layers(chain.layers, offset, length)


def chain_digest(path):
    """sha256 hex of the whole virtual content, block by block; unallocated blocks cost no I/O."""
    digest = hashlib.sha256()
    with _Chain(path) as chain:
        top = chain.layers[0]
        size = top.virtual_size
        step = top.spb * SECTOR_SIZE if top.is_dynamic else BLOCK_SIZE
        zeros = bytes(step)
        for start in range(0, size, step):
            count = min(step, size - start)
            if _block_unallocated(chain.layers, start // step):
                digest.update(zeros[:count])
            else:
                digest.update(_read_layers(chain.layers, start, count))
    return digest.hexdigest()


def _block_unallocated(layers, block):
    for layer in layers:
        if not layer.is_dynamic:
            return False
        if block < len(layer.bat) and layer.bat[block] != UNUSED:
            return False
        if layer.disk_type != DISK_DIFF:
            break
    return True


def coalesce(child_path):
    """`vhd-util coalesce -n child`: copy the child's sectors into its parent; the child is untouched.

    Returns the sector count the real tool prints: the set bits of the child's bitmaps, 4096 for a
    block the batmap marks full.
    """
    with Vhd.open(child_path) as child:
        if child.disk_type != DISK_DIFF:
            raise VhdError(errno.EINVAL, "coalescing of non-differencing disks is not supported")
        parent_path = child.parent_path()
        with Vhd.open(parent_path, writable=True) as parent:
            ancestors = _open_parents(parent)
            try:
                chain = [child, parent] + ancestors
                copied = sum(_coalesce_block(chain, block)
                             for block, entry in enumerate(child.bat) if entry != UNUSED)
            finally:
                for vhd in ancestors:
                    vhd.close()
            parent._write_footer()
    return copied


def _coalesce_block(chain, block):
    """Copy one child block into the parent: whole if the batmap says full, else its runs of set bits."""
    child, parent = chain[0], chain[1]
    block_bytes = child.spb * SECTOR_SIZE
    base = block * block_bytes
    if child.block_full(block):
        parent._store(base, _read_layers(chain, base, block_bytes))
        return child.spb
    copied = 0
    for start, count, file_offset in child._own_runs(block, range_mask(0, child.spb, child.spb)):
        parent._store(base + start * SECTOR_SIZE, child._pread(file_offset, count * SECTOR_SIZE))
        copied += count
    return copied
