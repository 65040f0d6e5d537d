"""Stand-in for XCP-ng's `/opt/xensource/libexec/qcow2_helper` (sm 3.2.12-17.2+, qcow2/qcow2_helper.c).

    qcow2_helper allocated <path>   bytes allocated in the image's own L2 tables, as "%lu\\n"
    qcow2_helper bitmap <path>      one bit per cluster of the virtual size, least-significant bit first,
                                    (size / cluster size) >> 3 bytes, raw on stdout

Only the image itself counts (its L1/L2 tables), never its backing chain. Like the C program it checks
nothing but the magic: it reads the first 104 header bytes (what a short file lacks reads as zeros),
the L1 table and each L2 table that an L1 entry points to (zeros past the end of the file). An L2 entry
is allocated when its "copied" bit or its offset is set; with extended L2 entries `allocated` counts
subclusters (cluster size / 32 each) and `bitmap` marks a cluster with any. Exit codes and messages
as the real one: 1 with "Need an argument" (not exactly two arguments), "Opening file ... failed with
error ..." (open fails), "Failed reading file" (the header cannot be read), "Cluster is compressed",
"Command X is unknown."; a file without the QCOW2 magic gives "MAGIC is wrong" on stderr, nothing on
stdout and exit code 0.

Run as `python -m tests.dom0sim.qcow2_helper allocated|bitmap PATH`.
"""
import errno
import os
import struct
import sys

from tests.dom0sim.qcow2file import (ALLOCATED_BIT, COMPRESSED_BIT, HEADER_FIELDS, HEADER_READ,
                                     INCOMPATIBLE_EXTENDED_L2, L2_OFFSET_MASK, MAGIC, V2_HEADER_LENGTH)


class HelperExit(Exception):
    def __init__(self, message, code=1):
        Exception.__init__(self, message)
        self.code = code


def _pread(fd, length, offset):
    """pread into a buffer of `length` bytes: what the file lacks stays zero."""
    return os.pread(fd, length, offset).ljust(length, b"\0")


def _l2_units(fd, offset, cluster_size, entries, extended):
    """[(slot, units)] of the allocated entries of the L2 table at `offset`."""
    words = 2 if extended else 1
    values = struct.unpack(">{}Q".format(entries * words), _pread(fd, cluster_size, offset)[:entries * words * 8])
    found = []
    for slot in range(entries):
        low = values[slot * words]
        if low & COMPRESSED_BIT:
            raise HelperExit("Cluster is compressed\n")
        if extended:
            units = bin(values[slot * 2 + 1] & 0xFFFFFFFF).count("1")
        else:
            units = 1 if (low & ALLOCATED_BIT or low & L2_OFFSET_MASK) else 0
        if units:
            found.append((slot, units))
    return found


def run(command, path, out):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise HelperExit("Opening file {} failed with error {} ({})\n".format(
            path, os.strerror(exc.errno), exc.errno)) from None
    try:
        try:
            header = _pread(fd, HEADER_READ, 0)
        except OSError:
            raise HelperExit("Failed reading file\n") from None
        (magic, version, _, _, cluster_bits, size, _, l1_size, l1_offset, _, _, _, _) = struct.unpack(
            HEADER_FIELDS, header[:V2_HEADER_LENGTH])
        incompatible = struct.unpack(">Q", header[72:80])[0]
        if magic != MAGIC:
            raise HelperExit("MAGIC is wrong\n", code=0)
        cluster_size = (1 << cluster_bits) & 0xFFFFFFFF
        extended = version == 3 and bool(incompatible & INCOMPATIBLE_EXTENDED_L2)
        entries = cluster_size // (16 if extended else 8)
        try:
            l1 = struct.unpack(">{}Q".format(l1_size), _pread(fd, 8 * l1_size, l1_offset))
        except OSError as exc:
            raise HelperExit("Couldn't read L1 table: {} ({})\nCouldn't read L1 Table\n".format(
                os.strerror(exc.errno), exc.errno)) from None
        tables = [(index, entry & L2_OFFSET_MASK) for index, entry in enumerate(l1) if entry & L2_OFFSET_MASK]
        if command == "bitmap":
            bitmap = bytearray((size // cluster_size) >> 3 if cluster_size else 0)
            per_l1 = entries // 8
            for index, offset in tables:
                for slot, _ in _l2_units(fd, offset, cluster_size, entries, extended):
                    position = index * per_l1 + slot // 8
                    if position < len(bitmap):
                        bitmap[position] |= 1 << (slot % 8)
            out.write(bytes(bitmap))
        elif command == "allocated":
            units = 0
            for _, offset in tables:
                units += sum(count for _, count in _l2_units(fd, offset, cluster_size, entries, extended))
            unit_size = cluster_size // 32 if extended else cluster_size
            out.write("{}\n".format(units * unit_size).encode("ascii"))
        else:
            raise HelperExit("Command {} is unknown.\n".format(command))
    finally:
        os.close(fd)
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    out = sys.stdout.buffer
    try:
        if len(argv) != 2:
            raise HelperExit("Need an argument\n")
        code = run(argv[0], argv[1], out)
    except HelperExit as exc:
        sys.stderr.write(str(exc))
        code = exc.code
    except OSError as exc:   # a read failing part-way (EIO): the C program's pread error paths
        sys.stderr.write("Couldn't read L2 table: {} ({})\n".format(os.strerror(exc.errno or errno.EIO),
                                                                    exc.errno or errno.EIO))
        code = 1
    out.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
