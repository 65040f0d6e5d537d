"""`vhd-util check`: footer, header, BAT, batmap, bitmaps and parent locators validated with the
real tool's messages, ancestors with -p, sector statistics with -s; an invalid file gets the
`read -p` dump."""
import errno
import os
import stat
import time

from tests.dom0sim import vhdformat
from tests.dom0sim.vhdformat import (
    DISK_DIFF, DISK_DYNAMIC, DISK_FIXED, PLAT_CODE_NONE, SECTOR_SIZE, UNUSED, Footer, Header, VhdError,
)
from tests.dom0sim.vhdutil_disk import NULL_UUID, PARENT_LOCATOR_CODES, Disk, read_at
from tests.dom0sim.vhdutil_libc import c_basename
from tests.dom0sim.vhdutil_options import CommandLine
from tests.dom0sim.vhdutil_read import read_disk

TIMESTAMP_MAX_SLACK = 1800

CHECK_USAGE = ("options: -n <file> [-i ignore missing primary footers] [-I ignore parent uuids] "
               "[-t ignore timestamps] [-B do not check BAT for overlapping (precludes -s, -b)] "
               "[-p check parents] [-b check bitmaps] [-s stats] [-h help]\n")


class CheckFailure(Exception):
    """A check failed; its message is already printed; `code` is the negative errno."""

    def __init__(self, code):
        Exception.__init__(self, code)
        self.code = code


class Checker(object):
    """vhd-util check: footer, header, BAT, batmap and parent locators, with the real messages."""

    def __init__(self, out, opts):
        self.out = out
        self.opts = opts
        self.stats = []

    def fail(self, message, code=-errno.EINVAL):
        self.out.write(message + "\n")
        raise CheckFailure(code)

    def fail_on(self, problem, what):
        """Fail with "<what>: <problem>" when there is a problem."""
        if problem:
            self.fail("{}: {}".format(what, problem))

    def from_future(self, timestamp):
        """A VHD timestamp past now and the allowed slack (never, with -t)."""
        return not self.opts.get("t") and timestamp > vhdformat.vhd_time(time.time()) + TIMESTAMP_MAX_SLACK

    def check(self, name):
        """vhd_util_check_vhd: returns 0 or a negative errno (having dumped the metadata)."""
        try:
            st = os.stat(name)
        except OSError as exc:
            self.out.write("cannot stat {}: {}\n".format(name, exc.errno))
            return -exc.errno
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            self.out.write("{} is not a regular file or block device\n".format(name))
            return -errno.EINVAL
        try:
            self.check_vhd(name, st.st_size)
        except CheckFailure as failure:
            self.out.write("{} appears invalid; dumping metadata\n".format(name))
            read_disk(name, {"p": True}, 1, False, self.out)
            return failure.code
        return 0

    def check_vhd(self, name, size):
        footer = self.check_footer(name, size)
        if footer.disk_type not in (DISK_DYNAMIC, DISK_DIFF):
            return
        self.check_header(name, footer, size)
        try:
            disk = Disk.open(name)
        except VhdError as exc:
            raise CheckFailure(-exc.errno) from None
        self.fail_on(self.differencing_header_problem(disk), "differencing header is invalid")
        self.check_bat(disk, size)
        if disk.has_batmap:
            self.check_batmap(disk, size)
        if disk.differencing:
            self.check_parent_locators(disk, size)
        if not self.opts.get("s"):
            self.out.write("{} is valid\n".format(name))

    def footer_problem(self, footer):
        if footer.cookie != vhdformat.FOOTER_COOKIE:
            return "invalid cookie"
        if footer.checksum != footer.computed_checksum():
            return "invalid checksum"
        if not footer.features & 2:
            return "invalid 'reserved' feature"
        if footer.features & ~3:
            return "invalid extra features"
        if footer.format_version != vhdformat.FORMAT_VERSION:
            return "invalid file format version"
        if footer.disk_type not in (DISK_DYNAMIC, DISK_DIFF) and footer.data_offset != vhdformat.NO_OFFSET:
            return "invalid data offset"
        if self.from_future(footer.timestamp):
            return "creation time in future"
        if footer.creator_app[:3] == b"tap" and footer.creator_version > vhdformat.CREATOR_VERSION:
            return "unsupported tap creator version"
        if vhdformat.encode_geometry(vhdformat.chs_geometry(footer.current_size)) < footer.geometry:
            return "geometry too large"
        if footer.disk_type not in (DISK_FIXED, DISK_DYNAMIC, DISK_DIFF):
            return "invalid type"
        if footer.saved_state not in (0, 1):
            return "invalid 'saved' state"
        if footer.hidden not in (0, 1):
            return "invalid 'hidden' state"
        if any(bytearray(footer.reserved)):
            return "invalid 'reserved' bits"
        if footer.uuid == NULL_UUID:
            return "invalid (NULL) uuid"
        return None

    def check_footer(self, name, size):
        with open(name, "rb") as handle:
            length = 511 if size % SECTOR_SIZE else SECTOR_SIZE
            if size < length:
                self.fail("error calculating end of file: {}".format(-errno.EINVAL))
            raw = read_at(handle, size - length, SECTOR_SIZE)
            if len(raw) != length:
                self.fail("error reading primary footer: {}".format(-errno.EIO), -errno.EIO)
            primary = Footer.unpack(raw.ljust(SECTOR_SIZE, b"\0"))
            self.fail_on(self.footer_problem(primary), "primary footer invalid")
            if primary.disk_type == DISK_FIXED:
                return primary
            raw = read_at(handle, 0, SECTOR_SIZE)
        if len(raw) != SECTOR_SIZE:
            self.fail("error reading backup footer: {}".format(-errno.EIO), -errno.EIO)
        backup = Footer.unpack(raw)
        self.fail_on(self.footer_problem(backup), "backup footer invalid")
        if primary.pack() != backup.pack():
            self.fail("primary and backup footers do not match")
        return primary

    def check_header(self, name, footer, size):
        with open(name, "rb") as handle:
            raw = read_at(handle, footer.data_offset, 1024)
        if len(raw) != 1024:
            self.fail("error reading header: {}".format(-errno.EIO), -errno.EIO)
        self.fail_on(_header_problem(Header.unpack(raw), size), "header is invalid")

    def differencing_header_problem(self, disk):
        header = disk.header
        if disk.differencing:
            if self.from_future(header.parent_timestamp):
                return "parent creation time in future"
            if header.parent_name is None:
                return "invalid parent name"
            return None
        if any(bytearray(header.parent_name_raw)):
            return "invalid non-null parent name"
        if any(loc.code or loc.data_space or loc.data_len or loc.reserved or loc.data_offset
               for loc in header.locators):
            return "invalid non-null parent locators"
        if header.parent_uuid != NULL_UUID:
            return "invalid non-null parent uuid"
        if header.parent_timestamp:
            return "invalid non-zero parent timestamp"
        return None

    def check_bat(self, disk, size):
        stats = None
        if self.opts.get("s"):
            stats = {"name": disk.path, "allocated": 0, "written": 0, "bits": set()}
            self.stats.insert(0, stats)
        if size % SECTOR_SIZE:
            if size % SECTOR_SIZE != 511:
                self.fail("invalid file size: 0x{:x}".format(size))
            size += 1
        try:
            bat = disk.bat
        except VhdError as exc:
            self.fail("error reading bat: {}".format(-exc.errno), -exc.errno)
        eof = (size - SECTOR_SIZE) // SECTOR_SIZE
        eoh = disk.end_of_headers() // SECTOR_SIZE
        block_secs = disk.spb + disk.bm_secs
        blocks = disk.footer.current_size >> 21
        if blocks > disk.header.max_bat_size:
            self.fail("VHD size ({} blocks) exceeds BAT size ({})".format(blocks, disk.header.max_bat_size))
        for index in range(blocks):
            offset = bat[index]
            if offset == UNUSED:
                continue
            if offset < eoh:
                self.fail("block {} (offset 0x{:x}) clobbers headers".format(index, offset))
            if offset + block_secs > eof:
                self.fail("block {} (offset 0x{:x}) clobbers footer".format(index, offset))
            if not self.opts.get("B"):
                for other_index in range(blocks):
                    other = bat[other_index]
                    if other_index == index or other == UNUSED:
                        continue
                    if (offset == other or other < offset < other + block_secs
                            or other < offset + block_secs < other + block_secs):
                        self.fail("block {} (offset 0x{:x}) clobbers block {} (offset 0x{:x})".format(
                            index, offset, other_index, other))
            if self.opts.get("b") or stats is not None:
                self.check_bitmap(disk, index, stats)

    def check_bitmap(self, disk, block, stats):
        bitmap = disk.block_bitmap(block)
        if stats is not None:
            stats["allocated"] += disk.spb
        data = disk.block_data(block) if self.opts.get("b") else None
        failed = False
        for sector in range(disk.spb):
            bit = vhdformat.bit_is_set(bitmap, sector)
            if stats is not None and bit:
                stats["written"] += 1
                stats["bits"].add(block * disk.spb + sector)
            if data is not None and not bit and any(bytearray(data[sector * 512:(sector + 1) * 512])):
                self.out.write("sector 0x{:x} of block 0x{:x} has data where bitmap is clear\n".format(
                    sector, block))
                failed = True
        if failed:
            raise CheckFailure(-errno.EINVAL)

    def check_batmap(self, disk, size):
        try:
            header = disk.batmap_header
        except VhdError as exc:
            self.fail("error reading batmap: {}".format(-exc.errno), -exc.errno)
        self.fail_on(_batmap_problem(disk, header, size), "batmap is invalid")
        for block in range(disk.footer.current_size >> 21):
            if disk.block_full(block) and disk.bat[block] == UNUSED:
                self.fail("batmap shows unallocated block {} full".format(block))

    def check_parent_locators(self, disk, size):
        parent_name = disk.header.parent_name
        if parent_name is None:
            self.fail("error decoding parent name: {}".format(-errno.EINVAL))
        seen, found = set(), 0
        for index, locator in enumerate(disk.header.locators):
            self.fail_on(_locator_problem(locator, size), "invalid parent locator {}".format(index))
            if locator.code == PLAT_CODE_NONE:
                continue
            if locator.code in seen:
                self.fail("duplicate platform code in locator {}: 0x{:x}".format(index, locator.code))
            seen.add(locator.code)
            if locator.code not in PARENT_LOCATOR_CODES:
                continue
            try:
                path = disk.locator_text(locator)
            except VhdError as exc:
                self.fail("error reading parent locator {}: {}".format(index, -exc.errno), -exc.errno)
            if c_basename(path) != parent_name:
                self.fail("parent locator {} name ({}) does not match header name ({})".format(
                    index, c_basename(path), parent_name))
            try:
                location = disk.find_parent(path)
            except VhdError as exc:
                self.fail("error resolving {}: {}".format(path, -exc.errno), -exc.errno)
            self.fail_on(self.parent_problem(disk, location), "invalid parent {}".format(location))
            found += 1
        if not found:
            self.fail("could not find parent {}".format(parent_name))

    def parent_problem(self, disk, location):
        if disk.parent_raw() or self.opts.get("I"):
            return None
        try:
            parent = Disk.open(location)
        except VhdError:
            return "error opening parent"
        if parent.footer.uuid != disk.header.parent_uuid:
            return "invalid parent uuid"
        return None

    def check_parents(self, name):
        """vhd_util_check_parents: check each ancestor by its resolved path."""
        current = name
        err = 0
        while True:
            try:
                disk = Disk.open(current)
            except VhdError as exc:
                err = -exc.errno
                break
            if not disk.differencing or disk.parent_raw():
                break
            try:
                current = disk.parent_path()
            except VhdError as exc:
                err = -exc.errno
                self.out.write("error getting parent: {}\n".format(err))
                break
            err = self.check(current)
            if err:
                break
        if err:
            self.out.write("error checking parents: {}\n".format(err))
        return err

    def print_stats(self):
        if not self.stats:
            return
        head = self.stats[0]
        self.out.write("{}: secs allocated: 0x{:x} secs written: 0x{:x} ({:.2f}%)\n".format(
            _check_name(head["name"]), head["allocated"], head["written"], _pct(head["written"], head["allocated"])))
        chain_bits = set(head["bits"])
        previous = head
        for current in self.stats[1:]:
            not_in_parent = len(current["bits"] - previous["bits"])
            not_in_chain = len(current["bits"] - chain_bits)
            chain_bits |= current["bits"]
            self.out.write(
                "{}: secs allocated: 0x{:x} secs written: 0x{:x} ({:.2f}%) secs not in parent: 0x{:x} ({:.2f}%)"
                " secs not in ancestors: 0x{:x} ({:.2f}%)\n".format(
                    _check_name(current["name"]), current["allocated"], current["written"],
                    _pct(current["written"], current["allocated"]), not_in_parent,
                    _pct(not_in_parent, current["written"]), not_in_chain, _pct(not_in_chain, current["written"])))
            previous = current


def _header_problem(header, size):
    if header.cookie != vhdformat.HEADER_COOKIE:
        return "invalid cookie"
    if header.checksum != header.computed_checksum():
        return "invalid checksum"
    if header.header_version != vhdformat.HEADER_VERSION:
        return "invalid header version"
    if header.data_offset != vhdformat.NO_OFFSET:
        return "invalid data offset"
    if (header.table_offset <= 0 or header.table_offset % SECTOR_SIZE
            or header.table_offset + header.max_bat_size * 4 > size - SECTOR_SIZE):
        return "invalid table offset"
    if bin(header.block_size).count("1") != 1:
        return "invalid block size"
    if header.reserved1 or any(bytearray(header.reserved2)):
        return "invalid reserved bits"
    return None


def _batmap_problem(disk, header, size):
    if header.cookie != vhdformat.BATMAP_COOKIE:
        return "invalid cookie"
    if header.batmap_version > vhdformat.BATMAP_VERSION:
        return "unsupported batmap version"
    if header.checksum != disk.batmap_computed_checksum():
        return "invalid checksum"
    if not header.batmap_size:
        return "invalid size zero"
    if header.batmap_size << 12 < disk.header.max_bat_size:
        return "batmap-BAT size mismatch"
    if not header.batmap_offset or header.batmap_offset % SECTOR_SIZE:
        return "invalid batmap offset"
    if header.batmap_offset + header.batmap_size * SECTOR_SIZE > size - SECTOR_SIZE:
        return "invalid batmap size"
    return None


def _locator_problem(locator, size):
    if locator.code not in vhdformat.PLAT_CODE_NAMES:
        return "invalid platform code"
    if locator.code == PLAT_CODE_NONE:
        if locator.data_space or locator.data_len or locator.reserved or locator.data_offset:
            return "non-zero locator"
        return None
    if not locator.data_offset:
        return "invalid data offset"
    if not locator.data_space:
        return "invalid data space"
    if not locator.data_len:
        return "invalid data length"
    if locator.data_offset + locator.size > size - SECTOR_SIZE:
        return "invalid size"
    if locator.reserved:
        return "invalid reserved bits"
    return None


def _check_name(path):
    return path.rsplit("/", 1)[-1]


def _pct(num, den):
    return 0.0 if not den else float(num) / float(den) * 100.0


def cmd_check(args, out):
    """`vhd-util check -n NAME [-iItpbBs]`: returns 0 or the first failure's negative errno."""
    line = CommandLine(args, "n:iItpbBsh", "check", out, CHECK_USAGE, help_succeeds=True)
    opts = {opt: True for opt in line.values if opt in "iItpbBs"}
    if line.incomplete("n") or ((opts.get("s") or opts.get("b")) and opts.get("B")):
        return line.usage()
    name = line.get("n")
    checker = Checker(out, opts)
    err = checker.check(name)
    if err:
        return err
    if opts.get("p"):
        err = checker.check_parents(name)
    if opts.get("s"):
        checker.print_stats()
    return err
