"""A VHD's block allocation bitmap from its metadata bytes, and from SM's `sm_config:vhd-blocks`.

Pure: bytes in, the bitmap `vhd-util read -B` prints out (bit i set when the VHD's own BAT entry i
is in use, MSB first, one bit per whole 2 MiB block of the virtual size, pad bits 0), so estimates
made from it follow the same code path. The metadata read is the one libvhd reads for an image
whose end is not the VHD's end (an LV): the footer copy at offset 0, the dynamic header at the
footer's data offset, and of the BAT at the header's table offset only the entries the virtual
size covers, which bounds the read to 4 MiB (a 2 TiB VHD). Anything malformed is a
`VhdMetadataError` with a one-line reason, never a bitmap of zeros.
"""
import base64
import binascii
import struct
import zlib

SECTOR_SIZE = 512
FOOTER_SIZE = 512
HEADER_SIZE = 1024
BLOCK_SIZE = 2 * 1024 * 1024
MAX_VIRTUAL_SIZE = 2 * 1024 * 1024 * 1024 * 1024   # LVHD's largest VHD: its BAT is 4 MiB
NO_OFFSET = 0xFFFFFFFFFFFFFFFF
HEADER_VERSION = 0x00010000
DISK_DYNAMIC, DISK_DIFFERENCING = 3, 4

# Footer: cookie, data offset, current size, disk type, checksum (and what lies between, skipped).
_FOOTER = struct.Struct(">8s8xQ24xQ4xII")
_FOOTER_CHECKSUM_AT = 64
# Header: cookie, data offset, table offset, version, max table entries, block size, checksum.
_HEADER = struct.Struct(">8sQQIIII")
_HEADER_CHECKSUM_AT = 36
# bytes.translate table: 1 for a byte of a BAT entry other than 0xFF, 0 for 0xFF.
_IN_USE = bytes([1] * 255 + [0])


class VhdMetadataError(ValueError):
    """A VHD whose metadata cannot give its block bitmap; the message is one line."""


class Table(object):
    """Where the BAT entries of the virtual size lie: `length` bytes at `offset` hold `entries`."""

    __slots__ = ("offset", "length", "entries")

    def __init__(self, offset, entries):
        self.offset = offset
        self.entries = entries
        self.length = _round_up(entries * 4, SECTOR_SIZE)


def block_bitmap(read, image_size):
    """The bitmap of the VHD in an image of `image_size` bytes that `read(offset, length)` reads.

    `read` may return fewer bytes than asked (an image cut short): that is a VhdMetadataError too.
    """
    header_offset, virtual_size = parse_footer(read(0, FOOTER_SIZE), image_size)
    table = parse_header(read(header_offset, HEADER_SIZE), virtual_size, image_size)
    return allocation_bitmap(read(table.offset, table.length), table.entries)


def parse_footer(raw, image_size):
    """(offset of the dynamic header, virtual size) from the footer copy at offset 0."""
    _need(raw, FOOTER_SIZE, "footer")
    cookie, header_offset, virtual_size, disk_type, stored = _FOOTER.unpack_from(raw)
    if cookie != b"conectix":
        raise VhdMetadataError("footer: invalid cookie {!r} (not a VHD)".format(cookie))
    _check_sum(raw, FOOTER_SIZE, _FOOTER_CHECKSUM_AT, stored, "footer")
    if disk_type not in (DISK_DYNAMIC, DISK_DIFFERENCING):
        raise VhdMetadataError("footer: disk type {} is neither dynamic nor differencing".format(disk_type))
    if virtual_size > MAX_VIRTUAL_SIZE:
        raise VhdMetadataError("footer: virtual size {} is beyond the 2 TiB a VHD holds".format(virtual_size))
    if header_offset + HEADER_SIZE > image_size:
        raise VhdMetadataError("footer: header offset {} is beyond the {}-byte image".format(
            header_offset, image_size))
    return header_offset, virtual_size


def parse_header(raw, virtual_size, image_size):
    """The Table of the BAT entries covering `virtual_size`, from the dynamic header."""
    _need(raw, HEADER_SIZE, "header")
    cookie, data_offset, table_offset, version, max_entries, block_size, stored = _HEADER.unpack_from(raw)
    if cookie != b"cxsparse":
        raise VhdMetadataError("header: invalid cookie {!r}".format(cookie))
    _check_sum(raw, HEADER_SIZE, _HEADER_CHECKSUM_AT, stored, "header")
    if version != HEADER_VERSION or data_offset != NO_OFFSET:
        raise VhdMetadataError("header: unknown version {:#x} or data offset {:#x}".format(version, data_offset))
    if block_size != BLOCK_SIZE:
        raise VhdMetadataError("header: block size {} is not 2 MiB".format(block_size))
    entries = virtual_size // BLOCK_SIZE
    if max_entries < entries:
        raise VhdMetadataError("header: {} table entries for {} blocks".format(max_entries, entries))
    if table_offset + max_entries * 4 > image_size:
        raise VhdMetadataError("header: BAT of {} entries at {} is beyond the {}-byte image".format(
            max_entries, table_offset, image_size))
    return Table(table_offset, entries)


def allocation_bitmap(raw, entries):
    """Bit i (MSB first) set when BAT entry i is in use (not 0xFFFFFFFF), for `entries` entries.

    Done with bytes operations at C speed: a 2 TiB VHD has a million entries.
    """
    _need(raw, entries * 4, "BAT")
    length = (entries + 7) // 8
    flags = raw[:entries * 4].translate(_IN_USE)
    used = 0
    for byte in range(4):  # an entry is in use when any of its 4 bytes is not 0xFF
        used |= int.from_bytes(flags[byte::4], "big")
    per_entry = used.to_bytes(entries, "big").ljust(length * 8, b"\0")   # 0 or 1 per entry
    bitmap = 0
    for bit in range(8):  # entries 8k+bit become bit (7 - bit) of byte k
        bitmap |= int.from_bytes(per_entry[bit::8], "big") << (7 - bit)
    return bitmap.to_bytes(length, "big")


def decode_vhd_blocks(value, virtual_size):
    """The bitmap SM keeps in `sm_config:vhd-blocks` (base64 of zlib of `vhd-util read -B` output).

    Its length must be the one `read -B` prints for `virtual_size`.
    """
    return inflate_vhd_blocks(value, (virtual_size // BLOCK_SIZE + 7) // 8)


def inflate_vhd_blocks(value, expected):
    """The `expected` bytes an `sm_config:vhd-blocks` value (base64 of zlib of a bitmap, VHD or
    QCOW2) must hold; decompression stops past them. VhdMetadataError for anything else."""
    try:
        compressed = base64.b64decode(value.encode("ascii"), validate=True)
        inflater = zlib.decompressobj()
        bitmap = inflater.decompress(compressed, expected + 1)
    except (UnicodeEncodeError, binascii.Error, zlib.error) as error:
        raise VhdMetadataError("sm-config:vhd-blocks is not base64 of zlib data: {}".format(error)) from None
    if len(bitmap) > expected:
        problem = "holds more than the {}-byte bitmap expected".format(expected)
    elif not inflater.eof:
        problem = "is cut short"
    elif len(bitmap) < expected:
        problem = "holds {} bytes where a {}-byte bitmap was expected".format(len(bitmap), expected)
    elif inflater.unused_data:
        problem = "has bytes after its zlib data"
    else:
        return bitmap
    raise VhdMetadataError("sm-config:vhd-blocks " + problem)


def _need(raw, length, what):
    if len(raw) < length:
        raise VhdMetadataError("{} cut short: {} of {} bytes".format(what, len(raw), length))


def _check_sum(raw, length, at, stored, what):
    """The VHD checksum: ones' complement of the byte sum, the checksum field counted as zeros."""
    computed = ~(sum(raw[:length]) - sum(raw[at:at + 4])) & 0xFFFFFFFF
    if computed != stored:
        raise VhdMetadataError("{}: invalid checksum {:#010x} (computed {:#010x})".format(what, stored, computed))


def _round_up(value, unit):
    return -(-value // unit) * unit
