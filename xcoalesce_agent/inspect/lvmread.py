"""Block bitmaps of VHDs in LVs that are not active on this host, read from the PV extents.

SM activates an LV only while it needs it on a host (and counts its activations): the agent
never activates one, nor takes an LVM or SM lock. As `vhd-util scan -l` does, it reads the VHD's
metadata straight from the physical volume, where `lvs` and `vgs` say the LV's extents lie:
one `lvs` and one `vgs` per volume group and inspection, then a few reads per VHD
(vhdmeta.block_bitmap: footer copy, header, the BAT entries of the virtual size).

The PV is opened read-only with O_DIRECT, through page-aligned buffers, so that this host's page
cache never answers for blocks another host wrote through its own device of the LV; where
O_DIRECT is refused (EINVAL), the cached pages of the range are dropped before a plain read.
"""
import errno
import mmap
import os
import re
from collections import OrderedDict

from . import vhdmeta

LVS_FIELDS = "lv_name,lv_attr,lv_size,segtype,seg_start_pe,seg_size_pe,devices"
VGS_FIELDS = "pv_name,vg_extent_size,pe_start"
SEPARATOR = "|"
ALIGNMENT = 4096      # O_DIRECT offsets and lengths: a multiple of any disk's logical block size
FIRST_READ = 65536    # footer copy, header and the BAT of a VHD up to 31 GiB in one read


def lvs_arguments(vg_name):
    """`lvs` arguments: one line per segment of each LV of the VG, sizes in bytes."""
    return [vg_name, "--noheadings", "--nosuffix", "--units", "b", "--separator", SEPARATOR,
            "-o", LVS_FIELDS, "--segments"]


def vgs_arguments(vg_name):
    """`vgs` arguments: one line per PV of the VG, with the extent size and where its extents start."""
    return [vg_name, "--noheadings", "--nosuffix", "--units", "b", "--separator", SEPARATOR, "-o", VGS_FIELDS]


class LvmReportError(ValueError):
    """`lvs` or `vgs` printed what this reader does not understand; the message is one line."""


class Segment(object):
    """`length` bytes of an LV from its byte `start`, held by `pv` from byte `pv_offset`."""

    __slots__ = ("start", "length", "pv", "pv_offset")

    def __init__(self, start, length, pv, pv_offset):
        self.start = start
        self.length = length
        self.pv = pv
        self.pv_offset = pv_offset


class LogicalVolume(object):
    """One LV of `lvs`: active on this host or not, its size, and its segments in LV order.

    `problem` says why it cannot be read from the PV (a segment that is not linear), else "".
    """

    __slots__ = ("name", "active", "size", "segments", "problem")

    def __init__(self, name, active, size):
        self.name = name
        self.active = active
        self.size = size
        self.segments = []
        self.problem = ""


def parse_vgs(text):
    """(extent size, {pv: byte where its extents start}) from `vgs` run with vgs_arguments."""
    extent_size, starts = None, {}
    for line in _lines(text):
        fields = line.split(SEPARATOR)
        if len(fields) != 3:
            raise LvmReportError("vgs: unexpected line: {}".format(_clip(line)))
        pv, size, start = fields[0].strip(), _number(fields[1], "vgs"), _number(fields[2], "vgs")
        if size <= 0 or (extent_size is not None and size != extent_size):
            raise LvmReportError("vgs: unexpected extent size: {}".format(_clip(line)))
        extent_size, starts[pv] = size, start
    if extent_size is None:
        raise LvmReportError("vgs printed no physical volume")
    return extent_size, starts


# One `lvs` row: seven fields, of which lv_size, seg_start_pe and seg_size_pe are numbers.
_LVS_ROW_SHAPE = re.compile(r"^(?= *[^|\n]*\|[^|\n]*\| *\d+ *\|[^|\n]*\| *\d+ *\| *\d+ *\|[^|\n]*$)", re.M)
_NON_BLANK_LINE = re.compile(r"^(?=[ \t]*\S)", re.M)


def parse_lvs(text, extent_size, pe_starts):
    """The LvsReport of `lvs` run with lvs_arguments; LvmReportError for a row it never prints."""
    if len(_LVS_ROW_SHAPE.findall(text)) != len(_NON_BLANK_LINE.findall(text)):
        bad = next(line for line in text.splitlines() if line.strip() and not _LVS_ROW_SHAPE.match(line))
        raise LvmReportError("lvs: unexpected line: {}".format(_clip(bad)))
    return LvsReport(text, extent_size, pe_starts)


class LvsReport(object):
    """The rows `lvs` printed for one VG, kept as printed: an SR holds thousands of LVs and an
    inspection needs the segments of a few (those read through the PV), so an LV becomes a
    LogicalVolume only when asked for."""

    def __init__(self, text, extent_size, pe_starts):
        self.text = text
        self.extent_size = extent_size
        self.pe_starts = pe_starts

    def names(self, prefix):
        """The names of the LVs whose name starts with `prefix`, in `lvs` order."""
        return list(OrderedDict.fromkeys(re.findall(r"^ *({}[^|\n]*?) *\|".format(re.escape(prefix)),
                                                    self.text, re.M)))

    def volumes(self, names):
        """{name: LogicalVolume} of those of `names` (a set) that `lvs` lists, segments mapped to PV bytes."""
        volumes = {}
        pvs = {pv: pv for pv in self.pe_starts}
        for line in self.text.split("\n") if names else ():
            name = line[:line.find("|")].strip()
            if name not in names:
                continue
            name, attr, size, segtype, start, extents, devices = (field.strip() for field in line.split(SEPARATOR))
            volume = volumes.get(name)
            if volume is None:
                volume = volumes[name] = LogicalVolume(name, attr[4:5] == "a", int(size))
            if volume.problem:
                continue
            if segtype != "linear":
                volume.problem = "segment at extent {} is {}, not linear".format(start, segtype)
                continue
            pv, _, pv_extent = devices.rpartition("(")
            pv = pvs.get(pv)
            if not pv_extent.endswith(")") or not pv_extent[:-1].isdigit() or pv is None:
                volume.problem = "segment at extent {} lies on {!r}, not a PV of the VG".format(start, devices)
                continue
            volume.segments.append(Segment(int(start) * self.extent_size, int(extents) * self.extent_size,
                                           pv, self.pe_starts[pv] + int(pv_extent[:-1]) * self.extent_size))
        for volume in volumes.values():
            volume.segments.sort(key=lambda segment: segment.start)
            if not volume.problem and sum(segment.length for segment in volume.segments) < volume.size:
                volume.problem = "its segments cover less than its {} bytes".format(volume.size)
        return volumes


def pv_ranges(segments, offset, length):
    """[(pv, pv offset, length)] holding bytes [offset, offset + length) of an LV, in order."""
    ranges = []
    end = offset + length
    for segment in segments:
        first, last = max(offset, segment.start), min(end, segment.start + segment.length)
        if first < last:
            ranges.append((segment.pv, segment.pv_offset + first - segment.start, last - first))
    return ranges


class PhysicalVolumes(object):
    """The PVs of one volume group, opened read-only as needed; use as a context manager.

    No lock of any kind is taken on them: a VHD changed while it is read gives a bitmap of one
    moment or a VhdMetadataError, never a write.
    """

    def __init__(self):
        self._files = {}   # pv path: (fd, O_DIRECT in use)
        self._buffer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        for fd, _ in self._files.values():
            os.close(fd)
        self._files = {}
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None

    def read(self, pv, offset, length):
        """`length` bytes of `pv` from `offset` (both multiples of ALIGNMENT); fewer at its end."""
        fd, direct = self._open(pv)
        if direct:
            try:
                return self._read_direct(fd, offset, length)
            except OSError as error:
                if error.errno != errno.EINVAL:
                    raise
                self._files[pv] = (fd, False)
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, length, offset)

    def _open(self, pv):
        opened = self._files.get(pv)
        if opened is None:
            try:
                opened = (os.open(pv, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC), True)
            except OSError as error:
                if error.errno != errno.EINVAL:
                    raise
                opened = (os.open(pv, os.O_RDONLY | os.O_CLOEXEC), False)
            self._files[pv] = opened
        return opened

    def _read_direct(self, fd, offset, length):
        if self._buffer is None or len(self._buffer) < length:
            if self._buffer is not None:
                self._buffer.close()
            self._buffer = mmap.mmap(-1, max(length, FIRST_READ))   # anonymous maps are page-aligned
        view = memoryview(self._buffer)
        try:
            os.lseek(fd, offset, os.SEEK_SET)
            count = os.readv(fd, [view[:length]])
            return bytes(view[:count])
        finally:
            view.release()


def read_bitmap(volumes, lv, virtual_size):
    """The block bitmap of the VHD in `lv` (a LogicalVolume), read from `volumes` (PhysicalVolumes).

    Raises vhdmeta.VhdMetadataError, naming the LV, for a VHD or an LV that cannot be read.
    """
    if lv.problem:
        raise vhdmeta.VhdMetadataError("{}: {}".format(lv.name, lv.problem))
    window = _Window(volumes, lv)
    try:
        bitmap = vhdmeta.block_bitmap(window.read, lv.size)
    except vhdmeta.VhdMetadataError as error:
        raise vhdmeta.VhdMetadataError("{} (read from its PV extents): {}".format(lv.name, error)) from None
    except OSError as error:
        raise vhdmeta.VhdMetadataError("{}: reading its PV extents failed: {}".format(
            lv.name, os.strerror(error.errno) if error.errno else error)) from None
    expected = (virtual_size // vhdmeta.BLOCK_SIZE + 7) // 8
    if len(bitmap) != expected:
        raise vhdmeta.VhdMetadataError("{}: a {}-byte bitmap where the scan's virtual size gives {} bytes".format(
            lv.name, len(bitmap), expected))
    return bitmap


def lv_reader(volumes, lv):
    """A `read(offset, length)` of `lv`'s bytes from its PV extents (fewer bytes past its end)."""
    if lv.problem:
        raise vhdmeta.VhdMetadataError("{}: {}".format(lv.name, lv.problem))
    return _Window(volumes, lv).read


class _Window(object):
    """Reads of one LV in aligned pieces, the last piece kept: the footer and the header that
    follows it come from one read."""

    def __init__(self, volumes, lv):
        self.volumes = volumes
        self.lv = lv
        self.start = 0
        self.data = b""

    def read(self, offset, length):
        if not (self.start <= offset and offset + length <= self.start + len(self.data)):
            first = offset // ALIGNMENT * ALIGNMENT
            last = min(self.lv.size, max(first + FIRST_READ, -(-(offset + length) // ALIGNMENT) * ALIGNMENT))
            self.start, self.data = first, self._read(first, max(0, last - first))
        return self.data[offset - self.start:offset - self.start + length]

    def _read(self, offset, length):
        pieces = []
        for pv, pv_offset, count in pv_ranges(self.lv.segments, offset, length):
            piece = self.volumes.read(pv, pv_offset, count)
            pieces.append(piece)
            if len(piece) < count:
                break   # the PV ends early: the caller sees the bytes cut short
        return b"".join(pieces)


def _lines(text):
    return [line for line in text.splitlines() if line.strip()]


def _number(text, tool):
    try:
        value = int(text.strip())
    except ValueError:
        raise LvmReportError("{}: {!r} is not a number of bytes or extents".format(tool, _clip(text))) from None
    if value < 0:
        raise LvmReportError("{}: negative number {}".format(tool, value))
    return value


def _clip(text):
    printable = "".join(char if char.isprintable() else "?" for char in text.strip())
    return printable if len(printable) <= 120 else printable[:117] + "..."
