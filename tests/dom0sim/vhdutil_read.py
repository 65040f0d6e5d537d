"""`vhd-util read`: the BAT, bitmaps, batmap, extents and content of one VHD, and the `-p` headers
(vhdutil_dump), one action after the other in the tool's order."""
import errno

from tests.dom0sim import vhdfile, vhdformat
from tests.dom0sim.vhdformat import SECTOR_SIZE, UNUSED, VhdError
from tests.dom0sim.vhdutil_disk import Disk
from tests.dom0sim.vhdutil_dump import dump_raw_headers, print_headers
from tests.dom0sim.vhdutil_libc import c_strtoul, conv
from tests.dom0sim.vhdutil_options import CommandLine

READ_USAGE = ("options:\n-h          help\n-n          name\n-p          print VHD headers\n"
              "-t sec      translate logical sector to VHD location\n-b blk      print bat entry\n"
              "-B          print entire bat as a bitmap\n-m blk      print bitmap\n"
              "-i sec      test bitmap for logical sector\n"
              "-e sec      output extent list of allocated logical sectors\n-a          print batmap\n"
              "-j blk      test batmap for block\n-d blk      print data\n-c num      num units\n"
              "-r sec      read num sectors at sec\n-R byte     read num bytes at byte\n-x          print in hex\n")


def cmd_read(args, out):
    """`vhd-util read -n NAME [-x] [-c num] ACTIONS...`: the actions run in the tool's fixed order."""
    line = CommandLine(args, "n:pt:b:Bm:i:e:aj:d:c:r:R:xCh", "read", out, READ_USAGE)
    if line.incomplete("n"):
        return line.usage()
    count = c_strtoul(line.get("c")) & 0xFFFFFFFF if line.given("c") else 1
    actions = {opt: True if value is None else c_strtoul(value)
               for opt, value in line.values.items() if opt in "pBatbmiejdrR"}
    return read_disk(line.get("n"), actions, count, line.given("x"), out)


def read_disk(name, actions, count, hex_mode, out):
    """Run the `actions` ({option: argument}) on one disk; the first failure's negative errno, or 0."""
    try:
        disk = Disk.open(name)
    except VhdError as exc:
        out.write("Failed to open {}: {}\n".format(name, -exc.errno))
        dump_raw_headers(out, name, hex_mode)
        return -exc.errno
    try:
        disk.load_bat()
    except VhdError as exc:
        out.write("Failed to get bat for {}: {}\n".format(name, -exc.errno))
        return -exc.errno
    steps = (("p", lambda _: print_headers(out, disk, hex_mode)),
             ("t", lambda sector: read_translate(out, disk, sector, count, hex_mode)),
             ("b", lambda block: read_bat(out, disk, block, count, hex_mode)),
             ("B", lambda _: read_bat_bitmap(out, disk)),
             ("m", lambda block: read_blocks(out, disk, block, count, hex_mode, disk.block_bitmap)),
             ("i", lambda sector: read_test_bitmap(out, disk, sector, count, hex_mode)),
             ("e", lambda sector: read_extents(out, disk, sector, count, hex_mode)),
             ("a", lambda _: read_batmap(out, disk)),
             ("j", lambda block: read_test_batmap(out, disk, block, count, hex_mode)),
             ("d", lambda block: read_blocks(out, disk, block, count, hex_mode, disk.block_data)),
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
    """-ERANGE, said on stderr, when blocks up to `end` pass the BAT; else 0."""
    if end > disk.header.max_bat_size:
        out.error("block {} past end of file\n".format(conv(hex_mode, end)))
        return -errno.ERANGE
    return 0


def _sector_range_error(out, disk, sector, count, hex_mode):
    """-ERANGE, said on stdout, when the sectors pass the virtual size; else 0."""
    if (sector + count) * SECTOR_SIZE > disk.footer.current_size:
        out.write("sector {} past end of file\n".format(conv(hex_mode, sector)))
        return -errno.ERANGE
    return 0


def _batmap(disk):
    """The raw batmap; EINVAL for a disk without one."""
    data = disk.batmap
    if data is None:
        raise VhdError(errno.EINVAL, "no batmap")
    return data


def read_translate(out, disk, sector, count, hex_mode):
    """read -t: where each logical sector lives in the file."""
    if (sector + count) * SECTOR_SIZE > disk.footer.current_size:
        out.error("sector {} past end of file\n".format(conv(hex_mode, sector + count)))
        return -errno.ERANGE
    for cur in range(sector, sector + count):
        block, offset_in = divmod(cur, disk.spb)
        entry = disk.bat[block]
        where = "not allocated" if entry == UNUSED else conv(hex_mode, (entry + offset_in + 1) * SECTOR_SIZE)
        out.write("logical sector {}: block number: {}, sector offset: {}, file offset: {}\n".format(
            conv(hex_mode, cur), conv(hex_mode, block), conv(hex_mode, offset_in), where))
    return 0


def read_bat(out, disk, block, count, hex_mode):
    """read -b: the BAT entries as byte offsets."""
    err = _block_range_error(out, disk, block + count, hex_mode)
    if err:
        return err
    bat = disk.bat
    for cur in range(block, block + min(count, len(bat))):
        entry = bat[cur]
        out.write("block: {}: offset: {}\n".format(
            conv(hex_mode, cur), "not allocated" if entry == UNUSED else conv(hex_mode, entry * SECTOR_SIZE)))
    return 0


def read_bat_bitmap(out, disk):
    """read -B: bit i set when the file's own BAT entry i is in use, MSB-first, whole blocks only."""
    total = disk.footer.current_size // disk.header.block_size
    bitmap = bytearray((total + 7) // 8)
    bat = disk.bat
    for block in range(total):
        if block < len(bat) and bat[block] != UNUSED:
            bitmap[block >> 3] |= 0x80 >> (block & 7)
    out.write(bytes(bitmap))
    return 0


def _sector_bits(disk, sector, count):
    """(sector, block, offset in block, bit) for each sector, bits from this file's bitmaps only."""
    cached_block, bitmap = None, None
    for cur in range(sector, sector + count):
        block, offset_in = divmod(cur, disk.spb)
        if block != cached_block:
            cached_block = block
            bitmap = disk.block_bitmap(block) if disk.bat[block] != UNUSED else None
        yield cur, block, offset_in, bool(bitmap is not None and vhdformat.bit_is_set(bitmap, offset_in))


def read_test_bitmap(out, disk, sector, count, hex_mode):
    """read -i: each sector's bit in its block's bitmap."""
    err = _sector_range_error(out, disk, sector, count, hex_mode)
    if err:
        return err
    for _, block, offset_in, bit in _sector_bits(disk, sector, count):
        out.write("block {}: sec: {}: {}\n".format(conv(hex_mode, block), conv(hex_mode, offset_in), int(bit)))
    return 0


def read_extents(out, disk, sector, count, hex_mode):
    """read -e: runs of written sectors as "start length" lines."""
    err = _sector_range_error(out, disk, sector, count, hex_mode)
    if err:
        return err
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
    """read -a: the raw batmap."""
    try:
        data = _batmap(disk)
    except VhdError as exc:
        out.write("failed to read batmap: {}\n".format(-exc.errno))
        return -exc.errno
    out.write(data)
    return 0


def read_test_batmap(out, disk, block, count, hex_mode):
    """read -j: each block's batmap bit, on stderr as the real tool prints it."""
    err = _block_range_error(out, disk, block + count, hex_mode)
    if err:
        return err
    try:
        _batmap(disk)
    except VhdError as exc:
        out.error("failed to get batmap\n")
        return -exc.errno
    for cur in range(block, block + count):
        out.error("batmap for block {}: {}\n".format(conv(hex_mode, cur), int(disk.block_full(cur))))
    return 0


def read_blocks(out, disk, block, count, hex_mode, raw_of):
    """read -m / -d: `raw_of(block)` (the bitmap or the data) of each allocated block."""
    err = _block_range_error(out, disk, block + count, hex_mode)
    if err:
        return err
    for cur in range(block, block + count):
        if disk.bat[cur] == UNUSED:
            out.write("block {} not allocated\n".format(conv(hex_mode, cur)))
            continue
        out.write(raw_of(cur))
    return 0


def read_content(out, disk, offset, length):
    """read -r / -R: the virtual content through the whole chain."""
    if offset + length > disk.footer.current_size:
        return -errno.ERANGE
    out.write(vhdfile.read_chain(disk.path, offset, length))
    return 0
