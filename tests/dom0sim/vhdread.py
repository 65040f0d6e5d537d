"""An open VHD file read as libvhd reads it (VhdReader: footer, header, BAT, batmap, sizes, the parent
found through the locators), and the virtual contents of a VHD read through its chain of parents:
each sector from the nearest layer that has it. vhdfile.Vhd adds the write path.
"""
import errno
import hashlib
import os
import struct

from tests.dom0sim.vhdformat import (
    BLOCK_SIZE, CREATOR_APP, DISK_DIFF, DISK_DYNAMIC, HEADER_STRUCT, PLAT_CODE_MACX, PLAT_CODE_NONE,
    PLAT_CODE_W2KU, PLAT_CODE_W2RU, SECTOR_SIZE, UNUSED, BatmapHeader, Footer, Header, VhdError, bit_is_set,
    bit_runs, checksum, decode_locator, padded, range_mask, sectors_no_zero,
)


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

class VhdReader(object):
    """One open VHD file, read. Use `VhdReader.open(path)` as a context manager.

    `fast=True` reads the footer copy at offset 0 and the header only, as libvhd's VHD_OPEN_FAST
    (`scan -f`); a fixed disk then fails with EINVAL like the real tool. `open_window` reads a
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
    # -- loading --------------------------------------------------------------------------------

    def _load(self, fast):
        if fast:
            self.footer = self._footer_at(0)
        else:
            self.footer = self._read_footer()
        if self.is_dynamic:
            self.header = Header.unpack(self._pread(self.footer.data_offset, HEADER_STRUCT.size))
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
        end = max(self.footer.data_offset + HEADER_STRUCT.size,
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
        return read_layers([self], offset, length)

    def _own_runs(self, block, mask):
        """Copy plan for `mask` sectors of `block` present in this file: [(sector, count, file offset)]."""
        entry = self._entry(block)
        if entry == UNUSED:
            return []
        data_start = (entry + self.bm_secs) * SECTOR_SIZE
        return [(first, count, data_start + first * SECTOR_SIZE)
                for first, count in bit_runs(self._bitmap_mask(block) & mask, self.spb)]


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


def open_parents(vhd):
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
            current = VhdReader.open(path)
            parents.append(current)
    except BaseException:
        for parent in parents:
            parent.close()
        raise
    return parents


def read_layers(chain, offset, length):
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
        top = VhdReader.open(path)
        try:
            self.layers = [top] + open_parents(top)
        except BaseException:
            top.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        for vhd in self.layers:
            vhd.close()


def read_chain(path, offset=0, length=None):
    """Virtual content through the whole chain (libvhd's read: nearest layer with the sector wins)."""
    with _Chain(path) as chain:
        top = chain.layers[0]
        if length is None:
            length = top.virtual_size - offset
        return read_layers(chain.layers, offset, length)


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
                digest.update(read_layers(chain.layers, start, count))
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
