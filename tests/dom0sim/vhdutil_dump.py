"""`vhd-util read -p`: the footer, header, parent locators and batmap header as text, and the raw
dump of whatever headers an invalid file holds."""
import os
import time

from tests.dom0sim import vhdformat
from tests.dom0sim.vhdformat import PLAT_CODE_NONE, SECTOR_SIZE, Footer, Header, VhdError
from tests.dom0sim.vhdutil_disk import read_at
from tests.dom0sim.vhdutil_libc import conv


def vhd_time_string(timestamp):
    """libvhd's vhd_time_to_string: ctime() of seconds since 2000-01-01, without the newline."""
    return time.ctime(timestamp + vhdformat.VHD_EPOCH)


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
        "Disk type           : {}".format(vhdformat.DISK_TYPE_NAMES.get(footer.disk_type, "Unknown type!\n")),
        "Checksum            : {}".format(_checksum(footer.checksum, footer.computed_checksum())),
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
        "Checksum            : {}".format(_checksum(header.checksum, header.computed_checksum())),
        "",
    ]
    out.write("\n".join(lines) + "\n")


def _c_string(raw, limit):
    """A fixed-size field printed with %s: up to its first NUL."""
    return bytes(raw[:limit]).split(b"\0", 1)[0].decode("latin-1")


def _checksum(stored, computed):
    return "0x{:x}|0x{:x} ({})".format(stored, computed, "Good!" if stored == computed else "Bad!")


def print_locators(out, disk, hex_mode):
    out.write("VHD Parent Locators:\n--------------------\n")
    for index, locator in enumerate(disk.header.locators):
        if locator.code == PLAT_CODE_NONE:
            continue
        out.write("locator:            : {}\n".format(index))
        out.write("       code         : {}\n".format(vhdformat.PLAT_CODE_NAMES.get(locator.code, "UNKOWN")))
        out.write("       data_space   : {}\n".format(conv(hex_mode, locator.data_space)))
        out.write("       data_length  : {}\n".format(conv(hex_mode, locator.data_len)))
        out.write("       data_offset  : {}\n".format(conv(hex_mode, locator.data_offset)))
        try:
            out.write("       decoded name : {}\n".format(disk.locator_text(locator)))
        except VhdError:
            out.write("failed to read parent name\n")
        out.write("\n")


def print_batmap_header(out, disk, header, hex_mode):
    out.write("VHD Batmap Summary:\n-------------------\n")
    out.write("Batmap offset       : {}\n".format(conv(hex_mode, header.batmap_offset)))
    out.write("Batmap size (secs)  : {}\n".format(conv(hex_mode, header.batmap_size)))
    out.write("Batmap version      : 0x{:08x}\n".format(header.batmap_version))
    if header.rest[:1] == b"\x01":
        out.write("Batmap keyhash nonce: {}\n".format(header.rest[1:33].hex()))
        out.write("Batmap keyhash hash : {}\n".format(header.rest[33:65].hex()))
    out.write("Checksum            : {}\n\n".format(_checksum(header.checksum, disk.batmap_computed_checksum())))


def print_headers(out, disk, hex_mode):
    """vhd_print_headers: footer, then header, locators and batmap header as the disk has them."""
    print_footer(out, disk.footer, hex_mode)
    if not disk.is_dynamic:
        return
    print_header(out, disk.header, hex_mode)
    if disk.differencing:
        print_locators(out, disk, hex_mode)
    if disk.has_batmap:
        try:
            header = disk.batmap_header
        except VhdError:
            out.write("failed to get batmap header\n")
            return
        print_batmap_header(out, disk, header, hex_mode)


def dump_raw_headers(out, name, hex_mode):
    """vhd_dump_headers: whatever footer and header bytes are there, valid or not."""
    out.write("\n{} appears invalid; dumping headers\n\n".format(name))
    try:
        with open(name, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            raw_footer = read_at(handle, max(size - SECTOR_SIZE, 0), SECTOR_SIZE) if size >= SECTOR_SIZE else b""
            footer = Footer.unpack(raw_footer.ljust(SECTOR_SIZE, b"\0"))
            if footer.problem():
                footer = Footer.unpack(read_at(handle, 0, SECTOR_SIZE).ljust(SECTOR_SIZE, b"\0"))
            raw_header = b""
            if footer.data_offset < size:
                raw_header = read_at(handle, footer.data_offset, 1024)
            header = Header.unpack(raw_header if len(raw_header) == 1024 else bytes(1024))
    except (IOError, OSError):
        return
    print_footer(out, footer, hex_mode)
    print_header(out, header, hex_mode)
