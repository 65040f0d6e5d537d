"""The simulated host's `vhd-util`: the commands SM and the agent use, with blktap 4.0.8's exact
stdout, stderr, ordering, exit codes and quirks (see shared reference vhd-util.md).

Run as `python -m tests.dom0sim.vhdutil_cli COMMAND ARGS...`. The VHD structures come from
vhdfile.py; this module adds what libvhd's vhd_open gives a command (fast and full opens, BAT,
batmap, bitmaps, parent lookup) and the commands' own text.
"""
import errno
import os
import re
import resource
import signal
import stat
import subprocess
import sys
import time

from tests.dom0sim import lvm, vhdfile
from tests.dom0sim.vhdfile import (
    DISK_DIFF, DISK_DYNAMIC, DISK_FIXED, PLAT_CODE_MACX, PLAT_CODE_NONE, PLAT_CODE_W2KU,
    PLAT_CODE_W2RU, SECTOR_SIZE, UNUSED, Footer, Header, VhdError,
)

COMMANDS = ("create", "snapshot", "query", "read", "set", "repair", "resize", "fill", "coalesce",
            "modify", "scan", "check", "revert")
PARENT_LOCATOR_CODES = (PLAT_CODE_MACX, PLAT_CODE_W2KU, PLAT_CODE_W2RU)
NULL_UUID = "00000000-0000-0000-0000-000000000000"
TIMESTAMP_MAX_SLACK = 1800


class Abort(Exception):
    """libvhd hit an ASSERT: the process dies by SIGABRT and its buffered stdout is lost."""


class Output(object):
    """stdout and stderr of one run, written at exit (stdout is a pipe: fully buffered, like C)."""

    def __init__(self):
        self.out = bytearray()
        self.err = bytearray()

    def write(self, text):
        self.out += text if isinstance(text, (bytes, bytearray)) else text.encode("utf-8", "surrogateescape")

    def error(self, text):
        self.err += text.encode("utf-8", "surrogateescape")


# ---------------------------------------------------------------------------------------------
# C library behaviour the tool relies on


def c_basename(path):
    """POSIX basename(3) from libgen.h: "" gives ".", trailing slashes are ignored."""
    if not path:
        return "."
    stripped = path.rstrip("/")
    if not stripped:
        return "/"
    return stripped.rsplit("/", 1)[-1]


def c_strtoul(text):
    """strtoul/strtoull(text, NULL, 10): leading digits, 0 when there are none."""
    match = re.match(r"\s*([+-]?)(\d+)", text)
    if not match:
        return 0
    value = int(match.group(2))
    return (-value) & 0xFFFFFFFFFFFFFFFF if match.group(1) == "-" else value


def c_strtol(text):
    match = re.match(r"\s*([+-]?\d+)", text)
    return int(match.group(1)) if match else 0


def c_hex(value):
    """printf("%#" PRIx64): 0 is "0", everything else 0x..."""
    return "0" if value == 0 else "0x{:x}".format(value)


def conv(hex_mode, value):
    return c_hex(value) if hex_mode else str(value)


def vhd_time_string(timestamp):
    """libvhd's vhd_time_to_string: ctime() of seconds since 2000-01-01, without the newline."""
    return time.ctime(timestamp + vhdfile.VHD_EPOCH)


def getopt(args, optstring, prog, output):
    """glibc getopt() with argument permutation. Returns (options, operands); '?' marks an error."""
    takes_arg = {}
    for index, char in enumerate(optstring):
        if char != ":":
            takes_arg[char] = optstring[index + 1:index + 2] == ":"
    options, operands = [], []
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if arg == "--":
            operands.extend(args[index:])
            break
        if not arg.startswith("-") or arg == "-":
            operands.append(arg)
            continue
        position = 1
        while position < len(arg):
            char = arg[position]
            position += 1
            if char not in takes_arg or char == "-":
                output.error("{}: invalid option -- '{}'\n".format(prog, char))
                options.append(("?", None))
                continue
            if not takes_arg[char]:
                options.append((char, None))
                continue
            if position < len(arg):
                options.append((char, arg[position:]))
            elif index < len(args):
                options.append((char, args[index]))
                index += 1
            else:
                output.error("{}: option requires an argument -- '{}'\n".format(prog, char))
                options.append(("?", None))
            break
    return options, operands


def has_magic(text):
    return re.search(r"[*?\[]", text) is not None


class Pattern(object):
    """fnmatch(3) with FNM_PATHNAME (wildcards never match '/'), FNM_EXTMATCH and FNM_PERIOD."""

    def __init__(self, pattern, period=False):
        self.regex = re.compile(self._parts(pattern, 0, len(pattern)) + r"\Z", re.DOTALL)
        self.hides_dot_files = period and not pattern.startswith(".")

    def match(self, name):
        if self.hides_dot_files and name.startswith("."):
            return False
        return self.regex.match(name) is not None

    def _parts(self, pattern, start, end):
        out = []
        index = start
        while index < end:
            char = pattern[index]
            if char in "?*+@!" and index + 1 < end and pattern[index + 1] == "(":
                close = self._closing(pattern, index + 1, end)
                if close is not None:
                    alternatives = "|".join(self._parts(pattern, a, b)
                                            for a, b in self._split(pattern, index + 2, close))
                    rest = self._parts(pattern, close + 1, end)
                    group = "(?:" + alternatives + ")"
                    if char == "!":
                        out.append("(?:(?!" + group + rest + r"\Z)[^/]*)")
                    else:
                        out.append(group + {"?": "?", "*": "*", "+": "+", "@": ""}[char])
                    out.append(rest)
                    return "".join(out)
            if char == "*":
                out.append("[^/]*")
            elif char == "?":
                out.append("[^/]")
            elif char == "\\" and index + 1 < end:
                index += 1
                out.append(re.escape(pattern[index]))
            elif char == "[":
                close = pattern.find("]", index + 2 if pattern[index + 1:index + 2] in ("!", "^", "]") else index + 1)
                if close == -1 or close >= end:
                    out.append(re.escape(char))
                else:
                    body = pattern[index + 1:close]
                    negate = body[:1] in ("!", "^")
                    if negate:
                        body = body[1:]
                    body = body.replace("\\", "\\\\").replace("^", "\\^")
                    out.append("[" + ("^/" if negate else "") + body + "]")
                    index = close
            else:
                out.append(re.escape(char))
            index += 1
        return "".join(out)

    @staticmethod
    def _closing(pattern, open_index, end):
        depth = 0
        for index in range(open_index, end):
            if pattern[index] == "(":
                depth += 1
            elif pattern[index] == ")":
                depth -= 1
                if depth == 0:
                    return index
        return None

    @staticmethod
    def _split(pattern, start, end):
        depth, begin = 0, start
        for index in range(start, end):
            if pattern[index] == "(":
                depth += 1
            elif pattern[index] == ")":
                depth -= 1
            elif pattern[index] == "|" and depth == 0:
                yield begin, index
                begin = index + 1
        yield begin, end


GLOB_OK, GLOB_ABORTED, GLOB_NOMATCH = 0, 2, 3


class Glob(object):
    """glob(3) with GLOB_BRACE (and GLOB_NOSORT when asked), calling `errfunc(path, errno)` on
    directories that cannot be read, as glibc does. `last_errno` is what errno holds afterwards."""

    def __init__(self, nosort, errfunc):
        self.nosort = nosort
        self.errfunc = errfunc
        self.last_errno = 0
        self.paths = []

    def run(self, pattern):
        before = len(self.paths)
        status = self._brace(pattern)
        if status == GLOB_OK and len(self.paths) == before:
            return GLOB_NOMATCH
        return status

    def _brace(self, pattern):
        begin = self._find_brace(pattern)
        if begin is None:
            return self._glob(pattern)
        end = self._matching_brace(pattern, begin)
        if end is None:
            return self._glob(pattern)
        prefix, rest = pattern[:begin], pattern[end + 1:]
        for alternative in self._alternatives(pattern[begin + 1:end]):
            status = self._brace(prefix + alternative + rest)
            if status not in (GLOB_OK, GLOB_NOMATCH):
                return status
        return GLOB_OK

    @staticmethod
    def _find_brace(pattern):
        index = 0
        while index < len(pattern):
            if pattern[index] == "\\":
                index += 2
                continue
            if pattern[index] == "{":
                return index
            index += 1
        return None

    @staticmethod
    def _matching_brace(pattern, begin):
        depth = 0
        for index in range(begin, len(pattern)):
            if pattern[index] == "{":
                depth += 1
            elif pattern[index] == "}":
                depth -= 1
                if depth == 0:
                    return index
        return None

    @staticmethod
    def _alternatives(body):
        depth, start, parts = 0, 0, []
        for index, char in enumerate(body):
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
            elif char == "," and depth == 0:
                parts.append(body[start:index])
                start = index + 1
        parts.append(body[start:])
        return parts

    def _glob(self, pattern):
        """One brace-free pattern; its matches are appended (sorted among themselves)."""
        results = []
        status = self._expand(pattern, results)
        if status == GLOB_ABORTED:
            return status
        if not self.nosort:
            results.sort(key=lambda path: path.encode("utf-8", "surrogateescape"))
        self.paths.extend(results)
        return GLOB_OK if results else GLOB_NOMATCH

    def _expand(self, pattern, results):
        if "/" in pattern:
            dirname, filename = pattern.rsplit("/", 1)
            if dirname == "":
                dirname = "/"
        else:
            dirname, filename = None, pattern
        if dirname is not None and has_magic(dirname):
            directories = []
            status = self._expand(dirname, directories)
            if status == GLOB_ABORTED:
                return status
            for directory in directories:
                if os.path.isdir(directory):
                    if self._in_dir(filename, directory, results) == GLOB_ABORTED:
                        return GLOB_ABORTED
            return GLOB_OK
        return self._in_dir(filename, dirname, results)

    def _in_dir(self, filename, directory, results):
        def join(name):
            if directory is None:
                return name
            return directory + name if directory.endswith("/") else directory + "/" + name

        if not has_magic(filename):
            try:
                os.lstat(join(filename))
            except OSError as exc:
                self.last_errno = exc.errno
                return GLOB_OK
            results.append(join(filename))
            return GLOB_OK
        try:
            names = os.listdir(directory if directory is not None else ".")
        except OSError as exc:
            if exc.errno != errno.ENOTDIR and self.errfunc(directory or ".", exc.errno):
                return GLOB_ABORTED
            return GLOB_OK
        matcher = Pattern(filename, period=True)
        results.extend(join(name) for name in names if matcher.match(name))
        return GLOB_OK


# ---------------------------------------------------------------------------------------------
# What libvhd's vhd_open gives a command


def _read_at(handle, offset, length):
    handle.seek(offset)
    return handle.read(length)


class Disk(object):
    """An open VHD as a vhd-util command sees it (vhdfile.Vhd), plus the lookups the commands add.

    `fast` is libvhd's VHD_OPEN_FAST: the footer copy at 0 and the header only."""

    def __init__(self, path, fast=False):
        self.path = path
        try:
            self.size = os.path.getsize(path)
        except OSError as exc:
            raise VhdError(exc.errno, "opening {}".format(path)) from None
        self.vhd = vhdfile.Vhd.open(path, fast=fast)
        self.footer = self.vhd.footer
        self.header = self.vhd.header

    def close(self):
        self.vhd.close()

    @property
    def dynamic(self):
        return self.vhd.is_dynamic

    @property
    def differencing(self):
        return self.footer.disk_type == DISK_DIFF

    @property
    def spb(self):
        return self.vhd.spb

    @property
    def bm_secs(self):
        return self.vhd.bm_secs

    def bat(self):
        """The BAT entries (vhd_get_bat); EINVAL for fixed disks."""
        return self.vhd.bat

    def has_batmap(self):
        return self.vhd.has_batmap

    def batmap_header(self):
        return self.vhd.batmap_header

    def batmap(self):
        return self.vhd.batmap

    def batmap_full(self, block):
        return self.vhd.block_full(block)

    def bitmap(self, block):
        """The raw sector bitmap of an allocated block (vhd_read_bitmap)."""
        return self.vhd.block_bitmap(block)

    def block_data(self, block):
        """The raw data of an allocated block, whatever its bitmap says."""
        offset = (self.bat()[block] + self.bm_secs) * SECTOR_SIZE
        with open(self.path, "rb") as handle:
            return _read_at(handle, offset, self.header.block_size)

    def marker(self):
        return self.vhd.marker

    def keyhash(self):
        header = self.vhd.batmap_header
        return header.keyhash if header is not None else ""

    @staticmethod
    def locator_text(locator):
        """vhd_parent_locator_read: the decoded locator, or EINVAL."""
        if locator.name is None:
            raise VhdError(errno.EINVAL, "undecodable parent locator")
        return locator.name

    def scan_locator(self):
        """The locator `vhd-util scan` reads: MACX first, else the last W2RU, else the first set."""
        found = None
        for locator in self.header.locators:
            if locator.code == PLAT_CODE_MACX:
                return locator
            if locator.code == PLAT_CODE_W2RU:
                found = locator
            if found is None and locator.code != PLAT_CODE_NONE:
                found = locator
        return found

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

    def parent_path(self):
        """vhd_parent_locator_get: the first locator that resolves to an existing file."""
        return self.vhd.parent_path()

    def parent_raw(self):
        return self.header is None or self.header.parent_uuid == NULL_UUID

    def chain_depth(self):
        """vhd_chain_depth: 1 for a disk without parent, +1 per ancestor."""
        depth, path = 1, None
        disk = self
        while disk.differencing and not disk.parent_raw():
            path = disk.parent_path()
            if disk is not self:
                disk.close()
            disk = Disk(path)
            depth += 1
        if disk is not self:
            disk.close()
        return depth

    def end_of_headers(self):
        return self.vhd.end_of_headers()

    def physical_size(self):
        """vhd_get_phys_size: end of data plus the footer."""
        return self.vhd.physical_size


def open_volume(path, lv_size):
    """Open the VHD stored in an LV as `scan -l` reads it from the device: the first 1536 bytes
    (zeros where the LV holds nothing) must carry a valid footer copy and header. Returns
    (disk, None) or (None, (negative errno, error message))."""
    try:
        with open(path, "rb") as handle:
            first = handle.read(1536)
    except (IOError, OSError):
        first = b""
    first = first.ljust(1536, b"\0")
    footer = Footer.unpack(first)
    if footer.problem():
        return None, (-errno.EINVAL, "invalid footer")
    if footer.disk_type in (DISK_DYNAMIC, DISK_DIFF) and footer.data_offset == SECTOR_SIZE:
        if Header.unpack(first[SECTOR_SIZE:]).problem():
            return None, (-errno.EINVAL, "reading header")
    try:
        disk = Disk(path, fast=True)
    except VhdError as exc:
        return None, (-exc.errno, "reading header")
    disk.size = lv_size
    return disk, None


def open_error(exc):
    """The negative errno a failed open reports."""
    return -getattr(exc, "errno", errno.EIO)


# ---------------------------------------------------------------------------------------------
# read -p: the metadata dump


def print_footer(out, footer, hex_mode):
    cyl, heads, spt = footer.chs
    chs = cyl * heads * spt
    features = footer.features
    lines = [
        "VHD Footer Summary:", "-------------------",
        "Cookie              : {}".format(_c_string(footer.cookie, 8)),
        "Features            : (0x{:08x}) {}{}".format(features, "<TEMP>" if features & 1 else "",
                                                       "<RESV>" if features & 2 else ""),
        "File format version : Major: {}, Minor: {}".format(footer.format_version >> 16,
                                                           footer.format_version & 0xFFFF),
        "Data offset         : {}".format(conv(hex_mode, footer.data_offset)),
        "Timestamp           : {}".format(vhd_time_string(footer.timestamp)),
        "Creator Application : '{}'".format(_c_string(footer.creator_app, 4)),
        "Creator version     : Major: {}, Minor: {}".format(footer.creator_version >> 16,
                                                           footer.creator_version & 0xFFFF),
        "Creator OS          : {}".format({0x5769326B: "Windows", 0x4D616320: "Macintosh"}.get(
            footer.creator_os, "Unknown!")),
        "Original disk size  : {} MB ({} Bytes)".format(conv(hex_mode, footer.original_size >> 20),
                                                        conv(hex_mode, footer.original_size)),
        "Current disk size   : {} MB ({} Bytes)".format(conv(hex_mode, footer.current_size >> 20),
                                                        conv(hex_mode, footer.current_size)),
        "Geometry            : Cyl: {}, Hds: {}, Sctrs: {}".format(conv(hex_mode, cyl), conv(hex_mode, heads),
                                                                  conv(hex_mode, spt)),
        "                    : = {} MB ({} Bytes)".format(conv(hex_mode, chs >> 11), conv(hex_mode, chs << 9)),
        "Disk type           : {}".format(vhdfile.DISK_TYPE_NAMES.get(footer.disk_type, "Unknown type!\n")),
        "Checksum            : 0x{:x}|0x{:x} ({})".format(
            footer.checksum, footer.computed_checksum(),
            "Good!" if footer.checksum == footer.computed_checksum() else "Bad!"),
        "UUID                : {}".format(footer.uuid),
        "Saved state         : {}".format("No" if footer.saved_state == 0 else "Yes"),
        "Hidden              : {}".format(footer.hidden),
        "",
    ]
    out.write("\n".join(lines) + "\n")


def print_header(out, header, hex_mode):
    name = header.parent_name
    lines = [
        "VHD Header Summary:", "-------------------",
        "Cookie              : {}".format(_c_string(header.cookie, 8)),
        "Data offset (unusd) : {}".format(conv(hex_mode, header.data_offset)),
        "Table offset        : {}".format(conv(hex_mode, header.table_offset)),
        "Header version      : 0x{:08x}".format(header.header_version),
        "Max BAT size        : {}".format(conv(hex_mode, header.max_bat_size)),
        "Block size          : {} ({} MB)".format(conv(hex_mode, header.block_size),
                                                  conv(hex_mode, header.block_size >> 20)),
        "Parent name         : {}".format("failed to read name" if name is None else name),
        "Parent UUID         : {}".format(header.parent_uuid),
        "Parent timestamp    : {}".format(vhd_time_string(header.parent_timestamp)),
        "Checksum            : 0x{:x}|0x{:x} ({})".format(
            header.checksum, header.computed_checksum(),
            "Good!" if header.checksum == header.computed_checksum() else "Bad!"),
        "",
    ]
    out.write("\n".join(lines) + "\n")


def _c_string(raw, limit):
    return bytes(raw[:limit]).split(b"\0", 1)[0].decode("latin-1")


def print_locators(out, disk, hex_mode):
    out.write("VHD Parent Locators:\n--------------------\n")
    for index, locator in enumerate(disk.header.locators):
        if locator.code == PLAT_CODE_NONE:
            continue
        out.write("locator:            : {}\n".format(index))
        out.write("       code         : {}\n".format(vhdfile.PLAT_CODE_NAMES.get(locator.code, "UNKOWN")))
        out.write("       data_space   : {}\n".format(conv(hex_mode, locator.data_space)))
        out.write("       data_length  : {}\n".format(conv(hex_mode, locator.data_len)))
        out.write("       data_offset  : {}\n".format(conv(hex_mode, locator.data_offset)))
        try:
            out.write("       decoded name : {}\n".format(disk.locator_text(locator)))
        except VhdError:
            out.write("failed to read parent name\n")
        out.write("\n")


def print_batmap_header(out, disk, hex_mode):
    header = disk.batmap_header()
    out.write("VHD Batmap Summary:\n-------------------\n")
    out.write("Batmap offset       : {}\n".format(conv(hex_mode, header.batmap_offset)))
    out.write("Batmap size (secs)  : {}\n".format(conv(hex_mode, header.batmap_size)))
    out.write("Batmap version      : 0x{:08x}\n".format(header.batmap_version))
    if header.rest[:1] == b"\x01":
        out.write("Batmap keyhash nonce: {}\n".format(header.rest[1:33].hex()))
        out.write("Batmap keyhash hash : {}\n".format(header.rest[33:65].hex()))
    computed = disk.vhd.batmap_computed_checksum()
    out.write("Checksum            : 0x{:x}|0x{:x} ({})\n\n".format(
        header.checksum, computed, "Good!" if header.checksum == computed else "Bad!"))


def print_headers(out, disk, hex_mode):
    """vhd_print_headers; returns a negative errno when the batmap header cannot be read."""
    print_footer(out, disk.footer, hex_mode)
    if not disk.dynamic:
        return 0
    print_header(out, disk.header, hex_mode)
    if disk.differencing:
        print_locators(out, disk, hex_mode)
    if disk.has_batmap():
        try:
            disk.batmap_header()
        except VhdError as exc:
            out.write("failed to get batmap header\n")
            return -exc.errno
        print_batmap_header(out, disk, hex_mode)
    return 0


def dump_raw_headers(out, name, hex_mode):
    """vhd_dump_headers: whatever footer and header bytes are there, valid or not."""
    out.write("\n{} appears invalid; dumping headers\n\n".format(name))
    try:
        with open(name, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            raw_footer = _read_at(handle, max(size - SECTOR_SIZE, 0), SECTOR_SIZE) if size >= SECTOR_SIZE else b""
            footer = Footer.unpack(raw_footer.ljust(SECTOR_SIZE, b"\0"))
            if footer.problem():
                footer = Footer.unpack(_read_at(handle, 0, SECTOR_SIZE).ljust(SECTOR_SIZE, b"\0"))
            raw_header = b""
            if footer.data_offset < size:
                raw_header = _read_at(handle, footer.data_offset, 1024)
            header = Header.unpack(raw_header if len(raw_header) == 1024 else bytes(1024))
    except (IOError, OSError) as exc:
        return -exc.errno
    print_footer(out, footer, hex_mode)
    print_header(out, header, hex_mode)
    return 0


# ---------------------------------------------------------------------------------------------
# scan

SCAN_FAST, SCAN_PRETTY, SCAN_VOLUME, SCAN_NOFAIL, SCAN_VERBOSE, SCAN_PARENTS, SCAN_MARKERS = (
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40)
TYPE_RAW_FILE, TYPE_VHD_FILE, TYPE_RAW_VOLUME, TYPE_VHD_VOLUME = 0x01, 0x02, 0x04, 0x08
SCAN_USAGE = ("usage: [OPTIONS] FILES\noptions: [-m match filter] [-f fast] [-c continue on failure] "
              "[-l LVM volume] [-p pretty print] [-a scan parents] [-v verbose] [-h help] [-M show markers]\n")
VGS_COMMAND = ("vgs {} --noheadings --nosuffix --units=b --options=vg_name,vg_extent_size,lv_count,pv_count,"
               "pv_name,pe_start --unbuffered 2> /dev/null")
LVS_COMMAND = ("lvs {} --noheadings --nosuffix --units=b --options=lv_name,lv_size,segtype,seg_count,seg_start,"
               "seg_size,devices --unbuffered 2> /dev/null")


class Target(object):
    """One thing to scan; a zeroed Target is the slot a failed init leaves behind."""

    def __init__(self, name="", size=0, kind=0, path=None, linear=True):
        self.name = name
        self.size = size
        self.kind = kind
        self.path = path
        self.linear = linear

    @property
    def volume(self):
        return self.kind in (TYPE_RAW_VOLUME, TYPE_VHD_VOLUME)

    @property
    def vhd(self):
        return self.kind in (TYPE_VHD_FILE, TYPE_VHD_VOLUME)


class Image(object):
    def __init__(self, target):
        self.target = target
        self.name = target.name
        self.parent = None
        self.capacity = 0
        self.size = 0
        self.hidden = 0
        self.marker = 0
        self.keyhash = ""
        self.error = 0
        self.message = None
        self.children = []
        self.parent_image = None
        self.printed = False


class LogicalVolume(object):
    def __init__(self, name, size, linear, device):
        self.name = name
        self.size = size
        self.linear = linear
        self.device = device


def lvm_scan_vg(vg_name):
    """lvm_scan_vg: run `vgs` and `lvs` through the shell as libvhd's popen does; list the LVs."""
    vgs = _popen_lines(VGS_COMMAND.format(vg_name))
    if not vgs:
        raise VhdError(errno.EINVAL, "no vgs data")
    lv_count = None
    for line in vgs:
        fields = line.split()
        if len(fields) < 6 or fields[0] != vg_name or not all(f.isdigit() for f in fields[1:4]):
            raise VhdError(errno.EINVAL, "bad vgs line")
        lv_count = int(fields[2])
    lvs = []
    for line in _popen_lines(LVS_COMMAND.format(vg_name)):
        if len(lvs) >= lv_count:
            break
        fields = line.split()
        if len(fields) < 7 or not fields[1].isdigit():
            raise VhdError(errno.EINVAL, "bad lvs line")
        if fields[4] != "0":
            continue
        device = re.split(r"[,()]", fields[6])[0]
        lvs.append(LogicalVolume(fields[0], int(fields[1]), fields[2] == "linear", device))
    return lvs


def _popen_lines(command):
    try:
        process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, universal_newlines=True)
    except OSError as exc:
        raise VhdError(exc.errno, "popen") from None
    text, _ = process.communicate()
    return [line for line in text.split("\n") if line.strip()]


def extract_volume_name(name):
    """The LV name inside a device-mapper name (`VG--x-VHD--y` -> `VHD-y`); Abort as libvhd's ASSERT."""
    tail = name[name.rfind("/"):] if "/" in name else name
    converted = re.sub(r"--|-", lambda m: "-" if m.group(0) == "--" else "/", tail)
    if "/" not in converted:
        raise Abort()
    return converted[converted.rfind("/") + 1:]


class Scanner(object):
    """vhd-util scan: targets from a glob or the VG's LVs, then one line (or tree) per image."""

    def __init__(self, flags, out, vg_name=None):
        self.flags = flags
        self.out = out
        self.vg_name = vg_name
        self.lvs = []
        self.pretty_images = []
        self.pretty_names = set()

    def flag(self, bit):
        return bool(self.flags & bit)

    # -- targets

    def file_targets(self, filter_pattern, names):
        """(error, targets) as vhd_util_scan_find_file_targets."""
        paths = []
        if filter_pattern is not None:
            matcher = Glob(self.flag(SCAN_FAST), self.scan_error)
            status = matcher.run(filter_pattern)
            err = {GLOB_ABORTED: -errno.EIO, GLOB_NOMATCH: -matcher.last_errno}.get(status, 0)
            if err:
                self.scan_error(filter_pattern, err)
                return err, []
            paths = matcher.paths
        targets = []
        for path in list(paths) + list(names):
            try:
                target = self.file_target(path, TYPE_VHD_FILE)
            except OSError as exc:
                self.scan_error(path, -exc.errno)
                if not self.flag(SCAN_NOFAIL):
                    return -exc.errno, []
                target = Target()
            targets.append(target)
        return 0, targets

    @staticmethod
    def file_target(path, kind):
        return Target(path, os.stat(path).st_size, kind, path)

    def volume_targets(self, filter_pattern, names):
        try:
            self.lvs = lvm_scan_vg(self.vg_name)
        except VhdError as exc:
            self.out.error("lvm_scan_vg failed {}\n".format(-exc.errno))
            return -exc.errno, []
        total = self.sort_volumes(self.lvs, 0, filter_pattern) if filter_pattern is not None else 0
        for name in names:
            total += self.sort_volumes(self.lvs, total, name)
        targets = []
        for lv in self.lvs[:total]:
            try:
                target = self.volume_target(lv, TYPE_VHD_VOLUME)
            except VhdError as exc:
                self.scan_error(lv.name, -exc.errno)
                if not self.flag(SCAN_NOFAIL):
                    return -exc.errno, []
                target = Target()
            targets.append(target)
        return 0, targets

    @staticmethod
    def sort_volumes(lvs, start, pattern):
        """Move the LVs matching `pattern` to the front of lvs[start:], as swap_volume does."""
        matcher = Pattern(pattern)
        matches = 0
        for index in range(start, len(lvs)):
            if matcher.match(lvs[index].name):
                dst = start + matches
                lvs[dst], lvs[index] = lvs[index], lvs[dst]
                matches += 1
        return matches

    def volume_target(self, lv, kind):
        if not lv.linear:
            raise VhdError(errno.ENOSYS, "not linear")
        path = lvm.VolumeGroup(lvm.root_from_env(), self.vg_name).lv_path(lv.name)
        return Target(lv.name, lv.size, kind, path)

    # -- scanning

    def run(self, targets):
        """vhd_util_scan_targets: returns the error that stopped the scan (0 with -c)."""
        queue = list(targets)
        err = 0
        index = 0
        while index < len(queue):
            target = queue[index]
            index += 1
            image, disk, err = self.inspect(target)
            self.print_image(image)
            if self.flag(SCAN_PARENTS) and image.parent:
                self.add_parent(queue, disk, image)
            if disk is not None:
                disk.close()
            if err and not self.flag(SCAN_NOFAIL):
                break
        if self.flag(SCAN_PRETTY):
            self.print_tree()
        return 0 if self.flag(SCAN_NOFAIL) else err

    def inspect(self, target):
        """Open one target and fill its image; (image, disk, negative errno or 0)."""
        image = Image(target)
        disk = None
        try:
            disk = self.open(image)
            image.size = target.size
            image.capacity = disk.footer.current_size if target.vhd else target.size
            image.hidden = disk.footer.hidden if target.vhd else 1
            if self.flag(SCAN_MARKERS) and target.vhd:
                image.message = "checking markers"
                image.marker, image.keyhash = disk.marker(), disk.keyhash()
            image.message = None
            if disk is not None and disk.footer.disk_type == DISK_DIFF:
                image.message = "getting parent"
                image.parent = self.parent_of(disk, image)
                image.message = None
        except VhdError as exc:
            image.error = -exc.errno
            image.parent = None
            return image, disk, image.error
        return image, disk, 0

    def open(self, image):
        target = image.target
        if not target.volume and self.flag(SCAN_PRETTY):
            image.message = "resolving name"
            if not target.name or not os.path.exists(target.name):
                raise VhdError(errno.ENOENT, "resolving name")
            image.name = os.path.realpath(target.name)
        if target.volume:
            return self.open_volume(image)
        if not target.vhd:
            image.message = None
            return _NoDisk()
        image.message = "opening file"
        disk = Disk(target.path, fast=self.flag(SCAN_FAST))
        image.message = None
        return disk

    @staticmethod
    def open_volume(image):
        target = image.target
        if target.size < 4096:
            image.message = "device too small"
            raise VhdError(errno.EINVAL, "device too small")
        disk, failure = open_volume(target.path, target.size)
        if failure:
            image.message = failure[1]
            raise VhdError(-failure[0], failure[1])
        return disk

    def parent_of(self, disk, image):
        if image.target.volume:
            name = disk.header.parent_name if self.flag(SCAN_FAST) else None
            if name is None:
                locator = disk.scan_locator()
                if locator is None:
                    raise VhdError(errno.EINVAL, "no locator")
                name = disk.locator_text(locator)
            return extract_volume_name(name)
        if self.flag(SCAN_FAST):
            if disk.header.parent_name is not None:
                return disk.header.parent_name
        else:
            try:
                return disk.parent_path()
            except VhdError:
                pass
        locator = disk.scan_locator()
        if locator is None:
            raise VhdError(errno.EINVAL, "no locator")
        return disk.locator_text(locator)

    def add_parent(self, queue, disk, image):
        """vhd_util_scan_add_parent: queue the parent; errors print a line but never fail the scan."""
        volume = image.target.volume
        if disk.parent_raw():
            kind = TYPE_RAW_VOLUME if volume else TYPE_RAW_FILE
        else:
            kind = TYPE_VHD_VOLUME if volume else TYPE_VHD_FILE
        try:
            if volume:
                if any(image.parent == target.name for target in queue):
                    return
                matcher = Pattern(image.parent)
                lv = next((lv for lv in self.lvs if matcher.match(lv.name)), None)
                if lv is None:
                    raise VhdError(errno.ENOENT, "no such LV")
                queue.append(self.volume_target(lv, kind))
            else:
                wanted = c_basename(image.parent)
                if any(c_basename(target.name) == wanted for target in queue):
                    return
                try:
                    queue.append(self.file_target(image.parent, kind))
                except OSError as exc:
                    raise VhdError(exc.errno, "stat") from None
        except VhdError as exc:
            self.scan_error(image.parent, -exc.errno)

    # -- output

    def scan_error(self, name, code):
        """vhd_util_scan_error: an error line for a target; returns `code` (glob's errfunc aborts on it)."""
        image = Image(Target(name))
        image.error = code
        image.message = "failure scanning target"
        self.print_image(image)
        return code

    def print_image(self, image):
        if not image.error and self.flag(SCAN_PRETTY):
            if image.name not in self.pretty_names:
                self.pretty_names.add(image.name)
                self.pretty_images.append(image)
            return
        self.print_line(image, 0)

    def print_line(self, image, indent):
        pad = " " * indent
        if image.error:
            self.out.write("{}vhd={} scan-error={} error-message='{}'\n".format(
                pad, image.name, image.error, image.message))
            return
        name, parent = image.name, image.parent or "none"
        if not self.flag(SCAN_VERBOSE):
            name = c_basename(image.name)
            if image.parent:
                parent = c_basename(image.parent)
        note = " (not found in scan)" if self.flag(SCAN_PRETTY) and image.parent and not image.parent_image else ""
        markers = " marker={} keyhash={}".format(image.marker, image.keyhash) if self.flag(SCAN_MARKERS) else ""
        self.out.write("{}vhd={} capacity={} size={} hidden={}{} parent={}{}\n".format(
            pad, name, image.capacity, image.size, image.hidden, markers, parent, note))

    def print_tree(self):
        images = sorted(self.pretty_images, key=lambda img: img.name.encode("utf-8", "surrogateescape"))
        by_name = dict((img.name, img) for img in images)
        for image in images:
            image.parent_image = by_name.get(image.parent) if image.parent else None
            if image.parent_image is not None:
                image.parent_image.children.append(image)
        for image in images:
            if image.parent_image is None and image.hidden:
                self.print_subtree(image, 0)
        for image in images:
            if not image.printed and image.parent_image is None:
                self.print_subtree(image, 0)
        for image in images:
            if not image.printed:
                self.print_subtree(image, 0)

    def print_subtree(self, image, depth):
        self.print_line(image, depth * 3)
        image.printed = True
        for hidden in (False, True):
            for child in image.children:
                if bool(child.hidden) == hidden:
                    self.print_subtree(child, depth + 1)


class _NoDisk(object):
    """A target that is not a VHD (a raw parent, or a zeroed slot): no footer to read."""

    class footer(object):
        current_size = 0
        hidden = 0
        disk_type = 0

    @staticmethod
    def parent_raw():
        return True

    def close(self):
        pass


def cmd_scan(args, out):
    options, operands = getopt(args, "m:fcl:pavMh", "scan", out)
    flags, filter_pattern, vg_name = 0, None, None
    bits = {"f": SCAN_FAST, "c": SCAN_NOFAIL, "p": SCAN_PRETTY, "a": SCAN_PARENTS, "v": SCAN_VERBOSE,
            "M": SCAN_MARKERS}
    for opt, value in options:
        if opt == "m":
            filter_pattern = value
        elif opt == "l":
            vg_name = value
            flags |= SCAN_VOLUME
        elif opt in bits:
            flags |= bits[opt]
        else:
            out.write(SCAN_USAGE)
            return 0 if opt == "h" else -errno.EINVAL
    if filter_pattern is None and not operands:
        out.write(SCAN_USAGE)
        return -errno.EINVAL
    if flags & SCAN_PRETTY:
        flags &= ~SCAN_FAST
    scanner = Scanner(flags, out, vg_name)
    if flags & SCAN_VOLUME:
        err, targets = scanner.volume_targets(filter_pattern, operands)
    else:
        err, targets = scanner.file_targets(filter_pattern, operands)
    if err:
        out.error("scan failed: {}. Check syslog for details\n".format(err))
        return err
    if not targets:
        return 0
    return scanner.run(targets)


# ---------------------------------------------------------------------------------------------
# query

QUERY_USAGE = ("options: <-n name> [-v print virtual size (in MB)] [-s print physical utilization (bytes)] "
               "[-p print parent] [-f print fields] [-m print marker] [-d print chain depth] "
               "[-S print max virtual size (MB) for fast resize] [-a print allocated block count] "
               "[-u don't resolve parent path] [-h help]\n")


def cmd_query(args, out):
    options, operands = getopt(args, "n:vspfdSmauh", "query", out)
    name, wanted, resolve = None, set(), True
    for opt, value in options:
        if opt == "n":
            name = value
        elif opt == "u":
            resolve = False
        elif opt in "vspfdSma":
            wanted.add(opt)
        else:
            out.write(QUERY_USAGE)
            return 0 if opt == "h" else -errno.EINVAL
    if name is None or operands:
        out.write(QUERY_USAGE)
        return -errno.EINVAL
    try:
        disk = Disk(name)
    except VhdError as exc:
        out.write("error opening {}: {}\n".format(name, open_error(exc)))
        return open_error(exc)
    err = 0
    if "v" in wanted:
        out.write("{}\n".format(disk.footer.current_size >> 20))
    if "s" in wanted:
        try:
            out.write("{}\n".format(disk.physical_size()))
        except VhdError as exc:
            out.write("failed to get physical size: {}\n".format(-exc.errno))
            err = -exc.errno
    if "p" in wanted:
        ret = 0
        if not disk.differencing:
            out.write("{} has no parent\n".format(name))
        else:
            try:
                out.write("{}\n".format(disk.parent_path() if resolve else disk.unresolved_parent()))
            except VhdError as exc:
                out.write("query failed\n")
                ret = -exc.errno
        err = err or ret
    if "f" in wanted:
        out.write("hidden: {}\n".format(disk.footer.hidden))
    if "m" in wanted:
        try:
            out.write("marker: {}\n".format(disk.marker()))
        except VhdError as exc:
            out.write("error checking 'marker' field: {}\n".format(-exc.errno))
            err = err or -exc.errno
    if "d" in wanted:
        try:
            out.write("chain depth: {}\n".format(disk.chain_depth()))
        except VhdError as exc:
            out.write("error checking chain depth: {}\n".format(-exc.errno))
            err = err or -exc.errno
    if "a" in wanted:
        try:
            out.write("{}\n".format(sum(1 for entry in disk.bat() if entry != UNUSED)))
        except VhdError as exc:
            out.write("error reading bat: {}\n".format(-exc.errno))
            err = err or -exc.errno
    if "S" in wanted:
        out.write("{}\n".format((disk.header.max_bat_size if disk.header else 0) << 1))
    return err


# ---------------------------------------------------------------------------------------------
# read

READ_USAGE = ("options:\n-h          help\n-n          name\n-p          print VHD headers\n"
              "-t sec      translate logical sector to VHD location\n-b blk      print bat entry\n"
              "-B          print entire bat as a bitmap\n-m blk      print bitmap\n"
              "-i sec      test bitmap for logical sector\n"
              "-e sec      output extent list of allocated logical sectors\n-a          print batmap\n"
              "-j blk      test batmap for block\n-d blk      print data\n-c num      num units\n"
              "-r sec      read num sectors at sec\n-R byte     read num bytes at byte\n-x          print in hex\n")


def cmd_read(args, out):
    options, operands = getopt(args, "n:pt:b:Bm:i:e:aj:d:c:r:R:xCh", "read", out)
    name, hex_mode, count, actions = None, False, 1, {}
    for opt, value in options:
        if opt == "n":
            name = value
        elif opt == "x":
            hex_mode = True
        elif opt == "c":
            count = c_strtoul(value) & 0xFFFFFFFF
        elif opt in ("p", "B", "a"):
            actions[opt] = True
        elif opt == "C":
            pass
        elif opt in "tbmiejdrR":
            actions[opt] = c_strtoul(value)
        else:
            out.write(READ_USAGE)
            return errno.EINVAL
    if name is None or operands:
        out.write(READ_USAGE)
        return errno.EINVAL
    return read_disk(name, actions, count, hex_mode, out)


def read_disk(name, actions, count, hex_mode, out):
    try:
        disk = Disk(name)
    except VhdError as exc:
        out.write("Failed to open {}: {}\n".format(name, open_error(exc)))
        dump_raw_headers(out, name, hex_mode)
        return open_error(exc)
    try:
        disk.bat()
    except VhdError as exc:
        out.write("Failed to get bat for {}: {}\n".format(name, -exc.errno))
        return -exc.errno
    steps = (("p", lambda _: print_headers(out, disk, hex_mode) and 0),
             ("t", lambda sector: read_translate(out, disk, sector, count, hex_mode)),
             ("b", lambda block: read_bat(out, disk, block, count, hex_mode)),
             ("B", lambda _: read_bat_bitmap(out, disk)),
             ("m", lambda block: read_bitmaps(out, disk, block, count, hex_mode)),
             ("i", lambda sector: read_test_bitmap(out, disk, sector, count, hex_mode)),
             ("e", lambda sector: read_extents(out, disk, sector, count, hex_mode)),
             ("a", lambda _: read_batmap(out, disk)),
             ("j", lambda block: read_test_batmap(out, disk, block, count, hex_mode)),
             ("d", lambda block: read_blocks(out, disk, block, count, hex_mode)),
             ("r", lambda sector: read_content(out, disk, sector * SECTOR_SIZE, count * SECTOR_SIZE)),
             ("R", lambda offset: read_content(out, disk, offset, count)))
    for key, step in steps:
        if key in actions:
            try:
                err = step(actions[key])
            except VhdError as exc:
                err = -exc.errno
            if err:
                return err
    return 0


def _block_range_error(out, disk, end, hex_mode):
    if end > disk.header.max_bat_size:
        out.error("block {} past end of file\n".format(conv(hex_mode, end)))
        return -errno.ERANGE
    return 0


def read_translate(out, disk, sector, count, hex_mode):
    if (sector + count) * SECTOR_SIZE > disk.footer.current_size:
        out.error("sector {} past end of file\n".format(conv(hex_mode, sector + count)))
        return -errno.ERANGE
    for cur in range(sector, sector + count):
        block, offset_in = divmod(cur, disk.spb)
        entry = disk.bat()[block]
        where = "not allocated" if entry == UNUSED else conv(hex_mode, (entry + offset_in + 1) * SECTOR_SIZE)
        out.write("logical sector {}: block number: {}, sector offset: {}, file offset: {}\n".format(
            conv(hex_mode, cur), conv(hex_mode, block), conv(hex_mode, offset_in), where))
    return 0


def read_bat(out, disk, block, count, hex_mode):
    err = _block_range_error(out, disk, block + count, hex_mode)
    if err:
        return err
    bat = disk.bat()
    for cur in range(block, block + min(count, len(bat))):
        entry = bat[cur]
        out.write("block: {}: offset: {}\n".format(
            conv(hex_mode, cur), "not allocated" if entry == UNUSED else conv(hex_mode, entry * SECTOR_SIZE)))
    return 0


def read_bat_bitmap(out, disk):
    """read -B: bit i set when the file's own BAT entry i is in use, MSB-first, whole blocks only."""
    total = disk.footer.current_size // disk.header.block_size
    bitmap = bytearray((total + 7) // 8)
    bat = disk.bat()
    for block in range(total):
        if block < len(bat) and bat[block] != UNUSED:
            bitmap[block >> 3] |= 0x80 >> (block & 7)
    out.write(bytes(bitmap))
    return 0


def read_bitmaps(out, disk, block, count, hex_mode):
    err = _block_range_error(out, disk, block + count, hex_mode)
    if err:
        return err
    for cur in range(block, block + count):
        if disk.bat()[cur] == UNUSED:
            out.write("block {} not allocated\n".format(conv(hex_mode, cur)))
            continue
        out.write(disk.bitmap(cur))
    return 0


def _sector_bits(disk, sector, count):
    """(sector, block, offset in block, bit) for each sector, bits from this file's bitmaps only."""
    cached_block, bitmap = None, None
    for cur in range(sector, sector + count):
        block, offset_in = divmod(cur, disk.spb)
        if block != cached_block:
            cached_block = block
            bitmap = disk.bitmap(block) if disk.bat()[block] != UNUSED else None
        yield cur, block, offset_in, bool(bitmap is not None and vhdfile.bit_is_set(bitmap, offset_in))


def read_test_bitmap(out, disk, sector, count, hex_mode):
    if (sector + count) * SECTOR_SIZE > disk.footer.current_size:
        out.write("sector {} past end of file\n".format(conv(hex_mode, sector)))
        return -errno.ERANGE
    for _, block, offset_in, bit in _sector_bits(disk, sector, count):
        out.write("block {}: sec: {}: {}\n".format(conv(hex_mode, block), conv(hex_mode, offset_in), int(bit)))
    return 0


def read_extents(out, disk, sector, count, hex_mode):
    if (sector + count) * SECTOR_SIZE > disk.footer.current_size:
        out.write("sector {} past end of file\n".format(conv(hex_mode, sector)))
        return -errno.ERANGE
    start, run = None, 0
    for cur, _, _, bit in _sector_bits(disk, sector, count):
        if bit:
            if run == 0:
                start = cur
            run += 1
        elif run:
            out.write("{} {}\n".format(conv(hex_mode, start), conv(hex_mode, run)))
            run = 0
    if run:
        out.write("{} {}\n".format(conv(hex_mode, start), conv(hex_mode, run)))
    return 0


def read_batmap(out, disk):
    try:
        data = disk.batmap()
        if data is None:
            raise VhdError(errno.EINVAL, "no batmap")
    except VhdError as exc:
        out.write("failed to read batmap: {}\n".format(-exc.errno))
        return -exc.errno
    out.write(data)
    return 0


def read_test_batmap(out, disk, block, count, hex_mode):
    err = _block_range_error(out, disk, block + count, hex_mode)
    if err:
        return err
    try:
        if disk.batmap() is None:
            raise VhdError(errno.EINVAL, "no batmap")
    except VhdError as exc:
        out.error("failed to get batmap\n")
        return -exc.errno
    for cur in range(block, block + count):
        out.error("batmap for block {}: {}\n".format(conv(hex_mode, cur), int(disk.batmap_full(cur))))
    return 0


def read_blocks(out, disk, block, count, hex_mode):
    err = _block_range_error(out, disk, block + count, hex_mode)
    if err:
        return err
    for cur in range(block, block + count):
        if disk.bat()[cur] == UNUSED:
            out.write("block {} not allocated\n".format(conv(hex_mode, cur)))
            continue
        out.write(disk.block_data(cur))
    return 0


def read_content(out, disk, offset, length):
    """read -r / -R: the virtual content through the whole chain."""
    if offset + length > disk.footer.current_size:
        return -errno.ERANGE
    out.write(vhdfile.read_chain(disk.path, offset, length))
    return 0


# ---------------------------------------------------------------------------------------------
# check

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
            disk = Disk(name)
        except VhdError as exc:
            raise CheckFailure(-exc.errno) from None
        self.check_differencing_header(disk)
        self.check_bat(disk, size)
        if disk.has_batmap():
            self.check_batmap(disk, size)
        if disk.differencing:
            self.check_parent_locators(disk, size)
        if not self.opts.get("s"):
            self.out.write("{} is valid\n".format(name))

    def validate_footer(self, footer):
        if footer.cookie != vhdfile.FOOTER_COOKIE:
            return "invalid cookie"
        if footer.checksum != footer.computed_checksum():
            return "invalid checksum"
        if not footer.features & 2:
            return "invalid 'reserved' feature"
        if footer.features & ~3:
            return "invalid extra features"
        if footer.format_version != vhdfile.FORMAT_VERSION:
            return "invalid file format version"
        if footer.disk_type not in (DISK_DYNAMIC, DISK_DIFF) and footer.data_offset != vhdfile.NO_OFFSET:
            return "invalid data offset"
        if not self.opts.get("t") and footer.timestamp > vhdfile.vhd_time(time.time()) + TIMESTAMP_MAX_SLACK:
            return "creation time in future"
        if footer.creator_app[:3] == b"tap" and footer.creator_version > vhdfile.CREATOR_VERSION:
            return "unsupported tap creator version"
        if vhdfile.encode_geometry(vhdfile.chs_geometry(footer.current_size)) < footer.geometry:
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
            raw = _read_at(handle, size - length, SECTOR_SIZE)
            if len(raw) != length:
                self.fail("error reading primary footer: {}".format(-errno.EIO), -errno.EIO)
            primary = Footer.unpack(raw.ljust(SECTOR_SIZE, b"\0"))
            problem = self.validate_footer(primary)
            if problem:
                self.fail("primary footer invalid: {}".format(problem))
            if primary.disk_type == DISK_FIXED:
                return primary
            raw = _read_at(handle, 0, SECTOR_SIZE)
        if len(raw) != SECTOR_SIZE:
            self.fail("error reading backup footer: {}".format(-errno.EIO), -errno.EIO)
        backup = Footer.unpack(raw)
        problem = self.validate_footer(backup)
        if problem:
            self.fail("backup footer invalid: {}".format(problem))
        if primary.pack() != backup.pack():
            self.fail("primary and backup footers do not match")
        return primary

    def check_header(self, name, footer, size):
        with open(name, "rb") as handle:
            raw = _read_at(handle, footer.data_offset, 1024)
        if len(raw) != 1024:
            self.fail("error reading header: {}".format(-errno.EIO), -errno.EIO)
        header = Header.unpack(raw)
        problem = None
        if header.cookie != vhdfile.HEADER_COOKIE:
            problem = "invalid cookie"
        elif header.checksum != header.computed_checksum():
            problem = "invalid checksum"
        elif header.header_version != vhdfile.HEADER_VERSION:
            problem = "invalid header version"
        elif header.data_offset != vhdfile.NO_OFFSET:
            problem = "invalid data offset"
        elif (header.table_offset <= 0 or header.table_offset % SECTOR_SIZE
              or header.table_offset + header.max_bat_size * 4 > size - SECTOR_SIZE):
            problem = "invalid table offset"
        elif bin(header.block_size).count("1") != 1:
            problem = "invalid block size"
        elif header.reserved1 or any(bytearray(header.reserved2)):
            problem = "invalid reserved bits"
        if problem:
            self.fail("header is invalid: {}".format(problem))

    def check_differencing_header(self, disk):
        header = disk.header
        problem = None
        if disk.differencing:
            if not self.opts.get("t") and header.parent_timestamp > vhdfile.vhd_time(time.time()) + TIMESTAMP_MAX_SLACK:
                problem = "parent creation time in future"
            elif header.parent_name is None:
                problem = "invalid parent name"
        elif any(bytearray(header.parent_name_raw)):
            problem = "invalid non-null parent name"
        elif any(loc.code or loc.data_space or loc.data_len or loc.reserved or loc.data_offset
                 for loc in header.locators):
            problem = "invalid non-null parent locators"
        elif header.parent_uuid != NULL_UUID:
            problem = "invalid non-null parent uuid"
        elif header.parent_timestamp:
            problem = "invalid non-zero parent timestamp"
        if problem:
            self.fail("differencing header is invalid: {}".format(problem))

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
            bat = disk.bat()
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
        bitmap = disk.bitmap(block)
        if stats is not None:
            stats["allocated"] += disk.spb
        data = disk.block_data(block) if self.opts.get("b") else None
        failed = False
        for sector in range(disk.spb):
            bit = vhdfile.bit_is_set(bitmap, sector)
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
            header = disk.batmap_header()
        except VhdError as exc:
            self.fail("error reading batmap: {}".format(-exc.errno), -exc.errno)
        problem = None
        if header.cookie != vhdfile.BATMAP_COOKIE:
            problem = "invalid cookie"
        elif header.batmap_version > vhdfile.BATMAP_VERSION:
            problem = "unsupported batmap version"
        elif header.checksum != disk.vhd.batmap_computed_checksum():
            problem = "invalid checksum"
        elif not header.batmap_size:
            problem = "invalid size zero"
        elif header.batmap_size << 12 < disk.header.max_bat_size:
            problem = "batmap-BAT size mismatch"
        elif not header.batmap_offset or header.batmap_offset % SECTOR_SIZE:
            problem = "invalid batmap offset"
        elif header.batmap_offset + header.batmap_size * SECTOR_SIZE > size - SECTOR_SIZE:
            problem = "invalid batmap size"
        if problem:
            self.fail("batmap is invalid: {}".format(problem))
        for block in range(disk.footer.current_size >> 21):
            if disk.batmap_full(block) and disk.bat()[block] == UNUSED:
                self.fail("batmap shows unallocated block {} full".format(block))

    def check_parent_locators(self, disk, size):
        parent_name = disk.header.parent_name
        if parent_name is None:
            self.fail("error decoding parent name: {}".format(-errno.EINVAL))
        seen, found = set(), 0
        for index, locator in enumerate(disk.header.locators):
            problem = self.validate_locator(locator, size)
            if problem:
                self.fail("invalid parent locator {}: {}".format(index, problem))
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
            if not os.access(location, os.R_OK) and locator.code == PLAT_CODE_MACX:
                self.fail("parent locator {} points to missing file {} (resolved to {})".format(
                    index, path, location), -errno.ENOENT)
            problem = self.validate_parent(disk, location)
            if problem:
                self.fail("invalid parent {}: {}".format(location, problem))
            found += 1
        if not found:
            self.fail("could not find parent {}".format(parent_name))

    @staticmethod
    def validate_locator(locator, size):
        if locator.code not in vhdfile.PLAT_CODE_NAMES:
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

    def validate_parent(self, disk, location):
        if disk.parent_raw() or self.opts.get("I"):
            return None
        try:
            parent = Disk(location)
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
                disk = Disk(current)
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


def _check_name(path):
    return path.rsplit("/", 1)[-1]


def _pct(num, den):
    return 0.0 if not den else float(num) / float(den) * 100.0


def cmd_check(args, out):
    options, operands = getopt(args, "n:iItpbBsh", "check", out)
    name, opts = None, {}
    for opt, value in options:
        if opt == "n":
            name = value
        elif opt in "iItpbBs":
            opts[opt] = True
        else:
            out.write(CHECK_USAGE)
            return 0 if opt == "h" else -errno.EINVAL
    if name is None or operands or ((opts.get("s") or opts.get("b")) and opts.get("B")):
        out.write(CHECK_USAGE)
        return -errno.EINVAL
    checker = Checker(out, opts)
    err = checker.check(name)
    if err:
        return err
    if opts.get("p"):
        err = checker.check_parents(name)
    if opts.get("s"):
        checker.print_stats()
    return err


# ---------------------------------------------------------------------------------------------
# coalesce, set, create, snapshot

COALESCE_USAGE = "options: <-n name> [-s sparse] [-p progress] [-h help]\n"
SET_USAGE = "options: <-n name> <-f field> <-v value> [-h help]\n"
CREATE_USAGE = ("options: <-n name> <-s size (MB)> [-r reserve] [-h help] "
                "[<-S size (MB) for metadata preallocation (see vhd-util resize)>]\n")
SNAPSHOT_USAGE = ("options: <-n name> <-p parent name> [-l snapshot depth limit] [-m parent_is_raw] "
                  "[-S size (MB) for metadata preallocation (see vhd-util resize)] "
                  "[-e link to supplied parent name even if it's empty] [-h help]\n")


def cmd_coalesce(args, out):
    options, operands = getopt(args, "n:o:a:x:sph", "coalesce", out)
    name, sparse, progress = None, False, False
    for opt, value in options:
        if opt == "n":
            name = value
        elif opt == "s":
            sparse = True
        elif opt == "p":
            progress = True
        elif opt not in "oax":
            out.write(COALESCE_USAGE)
            return -errno.EINVAL
    if name is None or operands:
        out.write(COALESCE_USAGE)
        return -errno.EINVAL
    result = coalesce(name, sparse, progress, out)
    if result < 0:
        out.write("error coalescing: {}\n".format(result))
        return result
    out.write("Coalesced {} sectors".format(result))
    return 0


def coalesce(name, sparse, progress, out):
    """vhd_util_coalesce_parent: sectors copied into the parent, or a negative errno."""
    try:
        disk = Disk(name)
    except VhdError as exc:
        out.write("error opening {}: {}\n".format(name, open_error(exc)))
        return open_error(exc)
    if not disk.differencing:
        out.write("coalescing of non-differencing disks is not supported\n")
        return -errno.EINVAL
    try:
        parent = disk.parent_path()
    except VhdError as exc:
        out.write("error finding {} parent: {}\n".format(name, -exc.errno))
        return -exc.errno
    if sparse:
        out.write("opening for sparse writes\n")
    try:
        Disk(parent)
    except VhdError as exc:
        out.write("error opening {}: {}\n".format(parent, open_error(exc)))
        return open_error(exc)
    sectors = vhdfile.coalesce(name)
    if progress:
        entries = len(disk.bat())
        for index in range(entries):
            out.write("\r{:6.2f}%".format(float(index) / float(entries) * 100.0))
        out.write("\r100.00%\n")
    return sectors


def cmd_set(args, out):
    options, operands = getopt(args, "n:f:v:h", "set", out)
    name, field, value = None, None, None
    for opt, arg in options:
        if opt == "n":
            name = arg
        elif opt == "f":
            field = arg
        elif opt == "v":
            value = c_strtol(arg)
        else:
            out.write(SET_USAGE)
            return -errno.EINVAL
    if name is None or field is None or operands or value is None:
        out.write(SET_USAGE)
        return -errno.EINVAL
    if len(field) >= 25:
        out.write("invalid field\n" + SET_USAGE)
        return -errno.EINVAL
    if field not in ("hidden", "marker"):
        out.write("invalid field {}\n{}".format(field, SET_USAGE))
        return -errno.EINVAL
    if value < 0 or value > 255:
        out.write("invalid value {}\n{}".format(value, SET_USAGE))
        return -errno.EINVAL
    try:
        vhd = vhdfile.Vhd.open(name, writable=True)
    except VhdError as exc:
        out.write("error opening {}: {}\n".format(name, open_error(exc)))
        return open_error(exc)
    try:
        if field == "hidden":
            vhd.set_hidden(value)
        else:
            vhd.set_marker(value)
    except VhdError as exc:
        return -exc.errno
    finally:
        vhd.close()
    return 0


def cmd_create(args, out):
    options, operands = getopt(args, "n:s:S:rh", "create", out)
    name, size, max_size, fixed, err = None, 0, 0, False, -errno.EINVAL
    for opt, value in options:
        if opt == "n":
            name = value
        elif opt == "s":
            size, err = c_strtoul(value), 0
        elif opt == "S":
            max_size, err = c_strtoul(value), 0
        elif opt == "r":
            fixed = True
        else:
            out.write(CREATE_USAGE)
            return -errno.EINVAL
    if err or name is None or operands:
        out.write(CREATE_USAGE)
        return -errno.EINVAL
    if max_size and max_size < size:
        out.write("Error: <-S size> must be greater than <-s size>\n")
        return -errno.EINVAL
    try:
        vhdfile.create(name, size, fixed=fixed)
    except VhdError as exc:
        return -exc.errno
    return 0


def cmd_snapshot(args, out):
    options, operands = getopt(args, "n:p:S:l:meh", "snapshot", out)
    name, parent, limit, check_empty = None, None, 0, True
    for opt, value in options:
        if opt == "n":
            name = value
        elif opt == "p":
            parent = value
        elif opt == "l":
            limit = c_strtol(value)
        elif opt == "e":
            check_empty = False
        elif opt in "Sm":
            pass
        else:
            out.write(SNAPSHOT_USAGE)
            return 0 if opt == "h" else -errno.EINVAL
    if name is None or parent is None or operands:
        out.write(SNAPSHOT_USAGE)
        return -errno.EINVAL
    if not os.path.exists(parent):
        return -errno.ENOENT
    parent = os.path.realpath(parent)
    try:
        backing = vhdfile.snapshot_target(parent) if check_empty else parent
        if limit:
            try:
                depth = Disk(backing).chain_depth()
            except VhdError as exc:
                out.write("error checking snapshot depth: {}\n".format(-exc.errno))
                return -exc.errno
            if depth + 1 > limit:
                out.write("snapshot depth exceeded: current depth: {}, limit: {}\n".format(depth, limit))
                return -errno.ENOSPC
        vhdfile.snapshot(name, backing, skip_empty_parents=False)
    except VhdError as exc:
        return -exc.errno
    except (IOError, OSError) as exc:
        return -exc.errno
    return 0


MODIFY_USAGE = ("*** Dangerous operations, use with care ***\noptions: <-n name> [-p NEW_PARENT set parent [-m raw]] "
                "[-s NEW_SIZE set size] [-z zero (kill data)] [-h help]\n")


def cmd_modify(args, out):
    """`modify -n child -p parent`: re-point a child (SM's setParent); -s, -z and -m are not simulated."""
    options, operands = getopt(args, "n:s:p:mzh", "modify", out)
    name, parent = None, None
    for opt, value in options:
        if opt == "n":
            name = value
        elif opt == "p":
            parent = value
        elif opt in "smz":
            out.error("vhd-util modify -{}: not available on the simulated host\n".format(opt))
            return -errno.ENOSYS
        else:
            out.write(MODIFY_USAGE)
            return -errno.EINVAL
    if name is None or operands:
        out.write(MODIFY_USAGE)
        return -errno.EINVAL
    try:
        Disk(name).close()
    except VhdError as exc:
        out.write("error opening {}: {}\n".format(name, open_error(exc)))
        return open_error(exc)
    if parent is None:
        return 0
    try:
        if not os.path.exists(parent):
            raise VhdError(errno.ENOENT, "no parent")
        vhdfile.set_parent(name, parent)
    except VhdError as exc:
        out.write("failed to set parent to '{}': {}\n".format(parent, -exc.errno))
        return -exc.errno
    return 0


# ---------------------------------------------------------------------------------------------
# main


HANDLERS = {"scan": cmd_scan, "query": cmd_query, "read": cmd_read, "check": cmd_check,
            "coalesce": cmd_coalesce, "set": cmd_set, "create": cmd_create, "snapshot": cmd_snapshot,
            "modify": cmd_modify}


def usage(out):
    out.write("usage: vhd-util COMMAND [OPTIONS]\nCOMMAND := { " + " | ".join(COMMANDS) + " }\n")


def run(argv, out):
    """One invocation; returns the exit status."""
    if not argv:
        usage(out)
        return 0
    command = argv[0]
    if command not in COMMANDS:
        out.error("invalid COMMAND {}\n".format(command))
        usage(out)
        return 0
    handler = HANDLERS.get(command)
    if handler is None:
        out.error("vhd-util {}: not available on the simulated host\n".format(command))
        return errno.ENOSYS
    args = [arg for arg in argv[1:] if arg != "--debug"]
    ret = handler(args, out)
    return ret if ret >= 0 else -ret


def die_by_abort():
    """What an ASSERT does: SIGABRT, no core file, nothing of the buffered stdout."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGABRT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGABRT)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    out = Output()
    try:
        status = run(argv, out)
    except Abort:
        sys.stdout.flush()
        die_by_abort()
        return 134
    except VhdError as exc:
        out.error("vhd-util: {}\n".format(exc))
        status = exc.errno or errno.EIO
    except (IOError, OSError) as exc:
        out.error("vhd-util: {}\n".format(exc))
        status = exc.errno or errno.EIO
    except lvm.LvmError as exc:
        out.error("vhd-util: {}\n".format(exc))
        status = exc.code
    except Exception as exc:  # noqa: BLE001 - the tool never shows a traceback
        out.error("vhd-util: internal error: {}: {}\n".format(type(exc).__name__, exc))
        status = errno.EIO
    stdout = getattr(sys.stdout, "buffer", sys.stdout)
    stdout.write(bytes(out.out))
    stdout.flush()
    sys.stderr.write(out.err.decode("utf-8", "replace"))
    sys.stderr.flush()
    return status & 0xFF


if __name__ == "__main__":
    sys.exit(main())
