"""What libvhd's vhd_open gives a `vhd-util` command: the VHD structures of vhdfile.py plus the
parent lookups, chain walks and raw reads the commands add, and the open of a VHD inside an LV."""
import errno
import os

from tests.dom0sim import vhdfile
from tests.dom0sim.vhdformat import (
    DISK_DIFF, DISK_DYNAMIC, PLAT_CODE_MACX, PLAT_CODE_NONE, PLAT_CODE_W2KU, PLAT_CODE_W2RU, SECTOR_SIZE,
    Footer, Header, VhdError,
)

PARENT_LOCATOR_CODES = (PLAT_CODE_MACX, PLAT_CODE_W2KU, PLAT_CODE_W2RU)
NULL_UUID = "00000000-0000-0000-0000-000000000000"


class Abort(Exception):
    """libvhd hit an ASSERT: the process dies by SIGABRT and its buffered stdout is lost."""


def read_at(handle, offset, length):
    """Up to `length` bytes at `offset` of an open file (short at its end, as read(2))."""
    handle.seek(offset)
    return handle.read(length)


class Disk(vhdfile.Vhd):
    """An open VHD as a vhd-util command sees it. `Disk.open(path, fast=True)` is libvhd's
    VHD_OPEN_FAST: the footer copy at 0 and the header only."""

    @property
    def differencing(self):
        return self.footer.disk_type == DISK_DIFF

    def load_bat(self):
        """vhd_get_bat: read the BAT now, failing as libvhd does (EINVAL for a fixed disk)."""
        return self.bat

    def block_data(self, block):
        """The raw data of an allocated block, whatever its bitmap says."""
        offset = (self.bat[block] + self.bm_secs) * SECTOR_SIZE
        with open(self.path, "rb") as handle:
            return read_at(handle, offset, self.header.block_size)

    @property
    def keyhash(self):
        header = self.batmap_header
        return header.keyhash if header is not None else ""

    @staticmethod
    def locator_text(locator):
        """vhd_parent_locator_read: the decoded locator, or EINVAL."""
        if locator.name is None:
            raise VhdError(errno.EINVAL, "undecodable parent locator")
        return locator.name

    def scan_parent_name(self):
        """The parent name `vhd-util scan` reads from the locators: MACX first, else the last W2RU,
        else the first one set; EINVAL when none is set or it cannot be decoded."""
        found = None
        for locator in self.header.locators:
            if locator.code == PLAT_CODE_MACX:
                found = locator
                break
            if locator.code == PLAT_CODE_W2RU:
                found = locator
            if found is None and locator.code != PLAT_CODE_NONE:
                found = locator
        if found is None:
            raise VhdError(errno.EINVAL, "no locator")
        return self.locator_text(found)

    def unresolved_parent(self):
        """vhd_parent_locator_unresolved_get: the first readable locator's raw text."""
        for locator in self.header.locators:
            if locator.code in PARENT_LOCATOR_CODES and locator.name is not None:
                return locator.name
        raise VhdError(errno.EINVAL, "no parent locator")

    def find_parent(self, name):
        """vhd_find_parent: an absolute name as is, else relative to the child's real directory."""
        if name.startswith("/") and os.access(name, os.R_OK):
            return name
        location = os.path.dirname(os.path.realpath(self.path)) + "/" + name
        if os.access(location, os.R_OK):
            return os.path.realpath(location)
        raise VhdError(errno.ENOENT, "error resolving {}".format(name))

    def parent_raw(self):
        """A differencing disk whose parent is a raw image (no parent UUID)."""
        return self.header.parent_uuid == NULL_UUID

    def chain_depth(self):
        """vhd_chain_depth: 1 for a disk without parent, +1 per ancestor."""
        depth = 1
        disk = self
        while disk.differencing and not disk.parent_raw():
            path = disk.parent_path()
            if disk is not self:
                disk.close()
            disk = Disk.open(path)
            depth += 1
        if disk is not self:
            disk.close()
        return depth


def open_volume(path, lv_size, window=None):
    """Open the VHD stored in an LV as `scan -l` reads it from the PV: the first 1536 bytes (zeros
    where the LV holds nothing) must carry a valid footer copy and header. `path` and `window` say
    where the LV's bytes are (lvm.VolumeGroup.locate). VhdError's message is the one scan prints."""
    if lv_size < 4096:
        raise VhdError(errno.EINVAL, "device too small")
    offset, length = window or (0, 1536)
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            first = handle.read(min(1536, length))
    except (IOError, OSError):
        first = b""
    first = first.ljust(1536, b"\0")
    footer = Footer.unpack(first)
    if footer.problem():
        raise VhdError(errno.EINVAL, "invalid footer")
    if footer.disk_type in (DISK_DYNAMIC, DISK_DIFF) and footer.data_offset == SECTOR_SIZE:
        if Header.unpack(first[SECTOR_SIZE:]).problem():
            raise VhdError(errno.EINVAL, "reading header")
    try:
        return Disk.open(path, fast=True, window=window)
    except VhdError as exc:
        raise VhdError(exc.errno, "reading header") from None


def open_failed(out, name, exc):
    """Print libvhd's "error opening" line for a failed open; returns the negative errno."""
    out.write("error opening {}: {}\n".format(name, -exc.errno))
    return -exc.errno
