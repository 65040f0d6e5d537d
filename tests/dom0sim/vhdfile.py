"""VHD files made and changed as blktap 4.0.8's libvhd (`vhd-util`) does: `Vhd`, an open VHD with
libvhd's write path (partial sectors, bitmaps, batmap "full" bits, block order and file sizes come out as
the real tool makes them), and the image operations: create, snapshot, relink, coalesce.

The format itself is vhdformat.py, the reading (a file, a chain's virtual contents) vhdread.py; the
names tests use from them are also names of this module.
"""
import errno
import os
import struct
import time
import uuid as uuidlib

from tests.dom0sim.vhdformat import (
    BITMAP_BYTES, BLOCK_SIZE, DISK_DIFF, DISK_DYNAMIC, DISK_FIXED, MIB, NO_OFFSET, PAGE_SECTORS, PLAT_CODE_MACX,
    PLAT_CODE_W2KU, PLAT_CODE_W2RU, SECTOR_SIZE, TABLE_OFFSET, UNUSED, BatmapHeader, Footer, Header, Locator,
    VhdError, bit_runs, checksum, chs_geometry, decode_locator, encode_geometry, encode_locator, encode_parent_name,
    padded, range_mask, relative_locator_path, sectors_no_zero, set_bit_range, vhd_time,
)
from tests.dom0sim.vhdread import VhdReader, chain_digest, open_parents, read_chain, read_layers

__all__ = [
    "BITMAP_BYTES", "BLOCK_SIZE", "DISK_DIFF", "DISK_DYNAMIC", "DISK_FIXED", "SECTOR_SIZE", "UNUSED", "Footer",
    "Header", "Vhd", "VhdError", "allocated_blocks", "chain_digest", "checksum", "chs_geometry", "coalesce", "create",
    "dynamic_layout", "encode_geometry", "read_chain", "resolve_parent", "rounded_size", "set_parent", "snapshot",
    "snapshot_target", "vhd_time",
]


class Vhd(VhdReader):
    """One open VHD file. Use `Vhd.open(path, writable=False)` as a context manager.

    `fast=True` reads the footer copy at offset 0 and the header only, as libvhd's VHD_OPEN_FAST
    (`scan -f`); a fixed disk then fails with EINVAL like the real tool. `Vhd.open_window` reads a
    VHD stored inside a larger file (an LV's extents of a PV), read-only.
    """
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
        chain = [self] + open_parents(self)
        try:
            return read_layers(chain, offset, length)
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
            ancestors = open_parents(parent)
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
        parent._store(base, read_layers(chain, base, block_bytes))
        return child.spb
    copied = 0
    for start, count, file_offset in child._own_runs(block, range_mask(0, child.spb, child.spb)):
        parent._store(base + start * SECTOR_SIZE, child._pread(file_offset, count * SECTOR_SIZE))
        copied += count
    return copied
