"""The pure VHD metadata reader on bytes of VHDs the simulated host's writer makes, and on hostile bytes.

The bitmap must be exactly what the `vhd-util` stand-in's `read -B` prints (byte for byte the real tool).
"""
import base64
import struct
import zlib

import pytest

from tests.dom0sim import vhdfile, vhdutil_cli
from xcoalesce_agent.inspect import vhdmeta

MIB = 1024 * 1024


def read_b(path):
    out = vhdutil_cli.Output()
    assert vhdutil_cli.run(["read", "-B", "-n", path], out) == 0
    return bytes(out.out)


def image(path):
    with open(path, "rb") as stream:
        return stream.read()


def bitmap_of(data, image_size=None):
    return vhdmeta.block_bitmap(lambda offset, length: data[offset:offset + length],
                                len(data) if image_size is None else image_size)


def written(tmp_path, name, size_mib, blocks, parent=None):
    path = str(tmp_path / name)
    if parent:
        vhdfile.snapshot(path, parent)
    else:
        vhdfile.create(path, size_mib)
    with vhdfile.Vhd.open(path, writable=True) as vhd:
        for block in blocks:
            vhd.write(block * vhdfile.BLOCK_SIZE + 4096, b"\x5a" * 512)
    return path


@pytest.mark.parametrize("size_mib, blocks", [
    (64, [0, 1, 2, 31]), (100, [0, 7, 8, 15, 49]), (2, []), (6, [2]), (4096, [0, 640, 2047]),
])
def test_bitmap_is_read_b_of_a_dynamic_vhd(tmp_path, size_mib, blocks):
    path = written(tmp_path, "base.vhd", size_mib, blocks)
    bitmap = bitmap_of(image(path))
    assert bitmap == read_b(path)
    assert [index for index in range(len(bitmap) * 8) if bitmap[index >> 3] & (0x80 >> (index & 7))] == blocks


def test_bitmap_of_a_differencing_vhd_is_its_own_bat(tmp_path):
    base = written(tmp_path, "base.vhd", 64, [0, 1, 2, 31])
    leaf = written(tmp_path, "leaf.vhd", 0, [0, 5, 10], parent=base)
    assert bitmap_of(image(leaf)) == read_b(leaf) == bytes([0x84, 0x20, 0, 0])


def test_image_larger_than_the_vhd_like_an_lv(tmp_path):
    path = written(tmp_path, "base.vhd", 64, [3])
    data = image(path).ljust(12 * MIB, b"\0")   # the LV's end is not the VHD's footer
    assert bitmap_of(data) == read_b(path)


def test_sm_vhd_blocks_as_sm_writes_it(tmp_path):
    path = written(tmp_path, "base.vhd", 100, [0, 7, 8, 15, 49])
    value = base64.b64encode(zlib.compress(read_b(path))).decode("ascii")
    assert vhdmeta.decode_vhd_blocks(value, 100 * MIB) == read_b(path)


@pytest.mark.parametrize("value, reason", [
    ("not base64!", "not base64 of zlib data"),
    (base64.b64encode(b"plain bytes").decode(), "not base64 of zlib data"),
    (base64.b64encode(zlib.compress(b"\xff" * 3)).decode(), "holds 3 bytes where a 4-byte bitmap was expected"),
    (base64.b64encode(zlib.compress(b"\xff" * 5)).decode(), "holds more than the 4-byte bitmap expected"),
    (base64.b64encode(zlib.compress(b"\0" * 10 ** 7)).decode(), "holds more than the 4-byte bitmap expected"),
    (base64.b64encode(zlib.compress(b"\xff" * 4)[:-3]).decode(), "is cut short"),
    (base64.b64encode(zlib.compress(b"\xff" * 4) + b"junk").decode(), "has bytes after its zlib data"),
    ("\u00e9t\u00e9", "not base64 of zlib data"),
])
def test_malformed_vhd_blocks_is_a_clear_reason(value, reason):
    with pytest.raises(vhdmeta.VhdMetadataError) as raised:
        vhdmeta.decode_vhd_blocks(value, 64 * MIB)
    assert reason in str(raised.value) and "\n" not in str(raised.value)


def reseal(data, at, length, checksum_at):
    """Recompute the checksum of the structure at `at` after a hostile edit, so only the edit is wrong."""
    raw = bytearray(data[at:at + length])
    raw[checksum_at:checksum_at + 4] = bytes(4)
    raw[checksum_at:checksum_at + 4] = struct.pack(">I", vhdfile.checksum(raw))
    data[at:at + length] = raw


def edited(path, footer=None, header=None):
    """The image with fields of its footer copy / header replaced ({offset: packed bytes}), resealed."""
    data = bytearray(image(path))
    for at, value in (footer or {}).items():
        data[at:at + len(value)] = value
    if footer:
        reseal(data, 0, 512, 64)
    for at, value in (header or {}).items():
        data[512 + at:512 + at + len(value)] = value
    if header:
        reseal(data, 512, 1024, 36)
    return bytes(data)


def hostile_cases(path):
    data = image(path)
    corrupt = bytearray(data)
    corrupt[100] ^= 1
    header_bad = bytearray(data)
    header_bad[600] ^= 1
    return [
        ("empty", b"", None, "footer cut short: 0 of 512 bytes"),
        ("truncated footer", data[:300], None, "footer cut short: 300 of 512 bytes"),
        ("truncated header", data[:1000], 64 * MIB, "header cut short: 488 of 1024 bytes"),
        ("truncated BAT", data[:1600], 64 * MIB, "BAT cut short: 64 of 128 bytes"),
        ("zeros", bytes(4096), None, "footer: invalid cookie"),
        ("footer checksum", bytes(corrupt), None, "footer: invalid checksum"),
        ("header checksum", bytes(header_bad), None, "header: invalid checksum"),
        ("fixed disk", edited(path, footer={60: struct.pack(">I", 2)}), None, "disk type 2 is neither"),
        ("header beyond", edited(path, footer={16: struct.pack(">Q", 1 << 40)}), None,
         "header offset 1099511627776 is beyond the"),
        ("virtual size beyond 2 TiB", edited(path, footer={48: struct.pack(">Q", 1 << 50)}), None,
         "beyond the 2 TiB"),
        ("header cookie", edited(path, header={0: b"cxsparsf"}), None, "header: invalid cookie"),
        ("block size", edited(path, header={32: struct.pack(">I", 4096)}), None, "block size 4096 is not 2 MiB"),
        ("too few entries", edited(path, header={28: struct.pack(">I", 8)}), None, "8 table entries for 32 blocks"),
        ("BAT beyond the LV", edited(path, header={16: struct.pack(">Q", 64 * MIB)}), None,
         "BAT of 32 entries at 67108864 is beyond the"),
        ("huge max_table_entries", edited(path, header={28: struct.pack(">I", 0xFFFFFFFF)}), 8 * MIB,
         "BAT of 4294967295 entries at 1536 is beyond the 8388608-byte image"),
    ]


def test_hostile_bytes_give_one_clear_line_and_bounded_reads(tmp_path):
    path = written(tmp_path, "base.vhd", 64, [0, 1])
    for name, data, image_size, reason in hostile_cases(path):
        asked = []

        def read(offset, length, data=data, asked=asked):
            asked.append(length)
            return data[offset:offset + length]
        try:
            vhdmeta.block_bitmap(read, len(data) if image_size is None else image_size)
        except vhdmeta.VhdMetadataError as error:
            message = str(error)
        else:
            pytest.fail("{}: no VhdMetadataError".format(name))
        assert reason in message and "\n" not in message, (name, message)
        assert max(asked) <= 1024, name


def test_bat_read_is_bounded_by_the_virtual_size_not_max_table_entries(tmp_path):
    """LVHD preallocates a BAT for 2 TiB (a million entries): only the virtual size's entries are read."""
    path = written(tmp_path, "base.vhd", 64, [5])
    data = bytearray(edited(path, header={28: struct.pack(">I", 1 << 20)}))
    data = bytes(data.ljust(1536 + 4 * MIB + 4096, b"\xff"))
    asked = []

    def read(offset, length):
        asked.append((offset, length))
        return data[offset:offset + length]
    assert vhdmeta.block_bitmap(read, len(data)) == read_b(path)
    assert asked == [(0, 512), (512, 1024), (1536, 512)]


def test_largest_bitmap_matches_a_bit_by_bit_reference():
    entries = 1 << 20
    used = [index for index in range(0, entries, 7)] + [entries - 1]
    bat = bytearray(b"\xff" * (entries * 4))
    for index in used:
        bat[index * 4:index * 4 + 4] = struct.pack(">I", 0xFF00 + index % 3)   # any byte may be 0xFF
    reference = bytearray((entries + 7) // 8)
    for index in used:
        reference[index >> 3] |= 0x80 >> (index & 7)
    assert vhdmeta.allocation_bitmap(bytes(bat), entries) == bytes(reference)
    assert vhdmeta.allocation_bitmap(bytes(bat), 13) == bytes(reference[:1]) + bytes([reference[1] & 0xF8])


def test_blocks_allocated_out_of_order_match_read_b(tmp_path):
    path = written(tmp_path, "base.vhd", 200, [index * 37 % 100 for index in range(30)])
    assert bitmap_of(image(path)) == read_b(path)
