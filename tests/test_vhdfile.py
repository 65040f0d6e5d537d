"""vhdfile against the real vhd-util transcripts: sizes, layout, bitmaps, checksums, content, coalesce."""
import calendar
import errno
import hashlib
import os
import random
import struct

import pytest

from tests.dom0sim import vhdfile
from tests.dom0sim.vhdfile import UNUSED, Vhd, VhdError

MIB = 1024 * 1024

# 1-chain.txt: `vhd-write FILE OFFSET LENGTH BYTE`
BASE_WRITES = [(0, MIB, 0xAA), (5242980, 3000, 0xBB), (66060288, MIB, 0xCC), (4193304, 2000, 0xDD)]
LEAF_WRITES = [(524288, 4096, 0x11), (10485760, 2 * MIB, 0x22), (20971527, 10, 0x33), (4194004, 600, 0x44)]
CHAIN_SHA256 = "f424f3dbc4ca6e80ae2e0c184d3f234fa51f9746b97e65b0e38210cf68394dae"
BASE_SHA256 = "7f1c67dc369d03b7224e4e930671546ae0343776b33b2dcef163254518da7d81"


def write_all(path, writes):
    with Vhd.open(path, writable=True) as vhd:
        for offset, length, byte in writes:
            vhd.write(offset, bytes([byte]) * length)


def bat_bitmap(path):
    """What `vhd-util read -B` prints: one MSB-first bit per block of the virtual size."""
    with Vhd.open(path) as vhd:
        out = bytearray((len(vhd.bat) + 7) // 8)
        for block, entry in enumerate(vhd.bat):
            if entry != UNUSED:
                out[block >> 3] |= 0x80 >> (block & 7)
        return bytes(out)


def extents(path):
    """What `vhd-util read -e 0 -c ALL` prints: runs of written sectors, joined across blocks."""
    runs = []
    with Vhd.open(path) as vhd:
        for block, entry in enumerate(vhd.bat):
            if entry == UNUSED:
                continue
            bitmap = vhd.block_bitmap(block)
            for sector in range(vhd.spb):
                if bitmap[sector >> 3] & (0x80 >> (sector & 7)):
                    absolute = block * vhd.spb + sector
                    if runs and runs[-1][0] + runs[-1][1] == absolute:
                        runs[-1][1] += 1
                    else:
                        runs.append([absolute, 1])
    return [tuple(run) for run in runs]


def file_sha256(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The transcript's base + leaf, with file sizes recorded at each step, before coalesce."""
    sr = tmp_path_factory.mktemp("sr")
    base, leaf = str(sr / "base.vhd"), str(sr / "leaf.vhd")
    sizes = {}
    vhdfile.create(base, 64)
    sizes["base created"] = os.path.getsize(base)
    write_all(base, BASE_WRITES)
    sizes["base written"] = os.path.getsize(base)
    vhdfile.snapshot(leaf, base)
    sizes["leaf created"] = os.path.getsize(leaf)
    with Vhd.open(base, writable=True) as vhd:
        vhd.set_hidden(True)
    write_all(leaf, LEAF_WRITES)
    sizes["leaf written"] = os.path.getsize(leaf)
    return base, leaf, sizes


def test_file_sizes_at_each_step_match_the_transcript(chain):
    assert chain[2] == {"base created": 3584, "base written": 8405504,
                        "leaf created": 5120, "leaf written": 10510848}


def test_bat_bitmaps_match_read_B(chain):
    base, leaf, _ = chain
    assert bat_bitmap(base) == bytes.fromhex("e0000001")
    assert bat_bitmap(leaf) == bytes.fromhex("e4200000")
    assert vhdfile.allocated_blocks(leaf) == [0, 1, 2, 5, 10]


def test_block_offsets_match_read_b_and_read_t(chain):
    with Vhd.open(chain[1]) as leaf:
        offsets = {b: e * 512 for b, e in enumerate(leaf.bat) if e != UNUSED}
        assert offsets == {0: 7680, 1: 6311424, 2: 8412672, 5: 2108928, 10: 4210176}
        assert (leaf.bat[2] + leaf.bm_secs) * 512 == 8413184


def test_sector_extents_match_read_e(chain):
    base, leaf, _ = chain
    assert extents(leaf) == [(1024, 8), (8191, 2), (20480, 4096), (40960, 1)]
    assert extents(base) == [(0, 2048), (8190, 4), (10240, 7), (129024, 2048)]


def test_batmap_marks_only_the_full_block(chain):
    with Vhd.open(chain[1]) as leaf:
        assert leaf.batmap == b"\x04" + bytes(511)
        assert leaf.batmap_header.checksum == 0xFFFFFFFB == leaf.batmap_computed_checksum()
        assert leaf.block_full(5) and not leaf.block_full(0)
    with Vhd.open(chain[0]) as base:
        assert base.batmap_header.checksum == 0xFFFFFFFF


def test_read_p_fields_of_the_leaf(chain):
    base_path, leaf_path, _ = chain
    with Vhd.open(base_path) as base, Vhd.open(leaf_path) as leaf:
        assert (leaf.footer.features, leaf.footer.format_version, leaf.footer.data_offset) == (2, 0x10000, 512)
        assert (leaf.creator_app, leaf.creator_version, leaf.creator_os) == ("tap", 0x00010003, 0)
        assert leaf.virtual_size == leaf.original_size == 67108864
        assert leaf.geometry == (963, 8, 17)
        assert leaf.disk_type == vhdfile.DISK_DIFF and base.disk_type == vhdfile.DISK_DYNAMIC
        assert leaf.footer.checksum == leaf.footer.computed_checksum()
        assert (leaf.header.data_offset, leaf.header.table_offset) == (2 ** 64 - 1, 1536)
        assert (leaf.header.header_version, leaf.max_bat_size, leaf.block_size) == (0x10000, 32, 2 * MIB)
        assert leaf.header.checksum == leaf.header.computed_checksum()
        assert leaf.parent_name == "base.vhd" and base.header.parent_name == ""
        assert leaf.parent_uuid == base.uuid
        assert leaf.parent_timestamp == vhdfile.vhd_time(os.stat(base_path).st_mtime)
        assert (leaf.hidden, base.hidden, leaf.marker) == (0, 1, 0)
        locators = [(loc.code_name, loc.data_space, loc.data_len, loc.data_offset, loc.name)
                    for loc in leaf.parent_locators]
        assert locators == [("PLAT_CODE_MACX", 512, 17, 3072, "./base.vhd"),
                            ("PLAT_CODE_W2KU", 512, 20, 3584, "./base.vhd"),
                            ("PLAT_CODE_W2RU", 512, 20, 4096, "./base.vhd")]
        batmap = leaf.batmap_header
        assert (batmap.batmap_offset, batmap.batmap_size, batmap.batmap_version) == (2560, 1, 0x00010002)
        assert leaf.physical_size == 10510848 and base.physical_size == 8405504


def test_chain_content_matches_libvhd(chain):
    base, leaf, _ = chain
    assert vhdfile.chain_digest(leaf) == CHAIN_SHA256
    assert vhdfile.chain_digest(base) == BASE_SHA256
    assert hashlib.sha256(vhdfile.read_chain(leaf)).hexdigest() == CHAIN_SHA256


def test_partial_sector_write_keeps_parent_bytes_in_the_child(chain):
    with Vhd.open(chain[1]) as leaf:
        own = leaf.read_own(8191 * 512, 512)
    assert own == b"\xdd" * 212 + b"\x44" * 300


def test_resolve_parent_is_absolute(chain):
    base, leaf, _ = chain
    assert vhdfile.resolve_parent(leaf) == os.path.realpath(base)
    assert vhdfile.resolve_parent(base) is None


def test_coalesce_writes_only_into_the_parent(chain, tmp_path):
    base, leaf = str(tmp_path / "base.vhd"), str(tmp_path / "leaf.vhd")
    for src, dst in ((chain[0], base), (chain[1], leaf)):
        with open(src, "rb") as inp, open(dst, "wb") as out:
            out.write(inp.read())
    with Vhd.open(base) as vhd:
        before = (vhd.uuid, vhd.hidden, vhd.timestamp)
    leaf_sha, leaf_mtime = file_sha256(leaf), os.stat(leaf).st_mtime

    assert vhdfile.coalesce(leaf) == 4107
    assert os.path.getsize(base) == 12608000
    assert (file_sha256(leaf), os.stat(leaf).st_mtime) == (leaf_sha, leaf_mtime)
    assert bat_bitmap(base) == bytes.fromhex("e4200001")
    assert extents(base) == [(0, 2048), (8190, 4), (10240, 7), (20480, 4096), (40960, 1), (129024, 2048)]
    with Vhd.open(base) as vhd:
        assert (vhd.uuid, vhd.hidden, vhd.timestamp) == before
        assert vhd.batmap_header.checksum == 0xFFFFFFFB
        assert vhd.footer.checksum == vhd.footer.computed_checksum()
    assert vhdfile.chain_digest(base) == CHAIN_SHA256
    assert vhdfile.chain_digest(leaf) == CHAIN_SHA256

    assert vhdfile.coalesce(leaf) == 4107
    assert os.path.getsize(base) == 12608000
    assert vhdfile.chain_digest(base) == CHAIN_SHA256


def test_coalesce_refuses_a_dynamic_disk(chain):
    with pytest.raises(VhdError) as info:
        vhdfile.coalesce(chain[0])
    assert info.value.errno == errno.EINVAL
    assert str(info.value) == "coalescing of non-differencing disks is not supported"


def test_files_are_byte_identical_to_the_real_ones(tmp_path):
    """1-chain.txt and 3-coalesce.txt rebuilt with their UUIDs and clock: same sha256 for every file."""
    base, leaf = str(tmp_path / "base.vhd"), str(tmp_path / "leaf.vhd")
    created = calendar.timegm((2026, 11, 24, 20, 2, 53))
    vhdfile.create(base, 64, uuid="d50f2110-ab20-4dc0-8990-c78e5cae600b", created=created)
    write_all(base, BASE_WRITES)
    os.utime(base, (created, created))
    vhdfile.snapshot(leaf, base, uuid="b794bd0f-fa1c-41b9-84a1-3f90a952fffa", created=created)
    with Vhd.open(base, writable=True) as vhd:
        vhd.set_hidden(1)
    write_all(leaf, LEAF_WRITES)
    assert file_sha256(base) == "b06694d07dffee6bdf821bbf96cbba26b8f972e0a414d895c6841a48e92ee19d"
    assert file_sha256(leaf) == "e83d2b840bf1d844bd062a16898a48d9892954abc46d1527c750a804076826d0"
    vhdfile.coalesce(leaf)
    assert file_sha256(base) == "43520469f57fc3c093239011bf69e3ad1f975e44f713ad4f7f42a6f4b2fb9f7b"
    assert file_sha256(leaf) == "e83d2b840bf1d844bd062a16898a48d9892954abc46d1527c750a804076826d0"


def test_empty_disk_layout_is_byte_exact(tmp_path):
    path = str(tmp_path / "empty.vhd")
    vhdfile.create(path, 64)
    with open(path, "rb") as handle:
        raw = handle.read()
    assert len(raw) == 3584
    assert raw[:512] == raw[-512:] and raw[:8] == b"conectix"
    assert raw[512:520] == b"cxsparse"
    assert raw[1536:2048] == b"\xff" * 128 + bytes(384)
    assert raw[2048:2560] == b"tdbatmap" + struct.pack(">QIIIB", 2560, 1, 0x00010002, 0xFFFFFFFF, 0) + bytes(483)
    assert raw[2560:3072] == bytes(512)
    with Vhd.open(path) as vhd:
        assert vhd.parent_name is None and vhd.parent_locators == []
        assert vhd.bat == [UNUSED] * 32


def test_checksums_equal_the_transcript_for_its_uuids_and_time():
    """read -p: footer/header checksums of base and leaf from their UUIDs and timestamp."""
    stamp = vhdfile.vhd_time(calendar.timegm((2026, 11, 24, 20, 2, 53)))
    base_uuid, leaf_uuid = "d50f2110-ab20-4dc0-8990-c78e5cae600b", "b794bd0f-fa1c-41b9-84a1-3f90a952fffa"

    def footer(disk_type, uuid, hidden):
        size = 64 * MIB
        return vhdfile.Footer(data_offset=512, timestamp=stamp, original_size=size, current_size=size,
                              geometry=vhdfile.encode_geometry(vhdfile.chs_geometry(size)),
                              disk_type=disk_type, uuid=uuid, hidden=hidden)

    assert footer(3, base_uuid, 1).computed_checksum() == 0xFFFFF139
    assert footer(4, leaf_uuid, 0).computed_checksum() == 0xFFFFEEFA
    base = dict(vhdfile.dynamic_layout(footer(3, base_uuid, 0)))
    leaf = dict(vhdfile.dynamic_layout(footer(4, leaf_uuid, 0), (base_uuid, stamp, "base.vhd", "./base.vhd")))
    assert vhdfile.Header.unpack(base[512]).checksum == 0xFFFFF457
    assert vhdfile.Header.unpack(leaf[512]).checksum == 0xFFFFE371
    assert leaf[3072] == b"file://./base.vhd".ljust(512, b"\0")
    assert leaf[3584] == leaf[4096] == ".\\base.vhd".encode("utf-16-le").ljust(512, b"\0")


@pytest.mark.parametrize("size_mib, virtual, blocks", [(1, 2 * MIB, 1), (5, 6 * MIB, 3), (64, 64 * MIB, 32),
                                                       (100, 100 * MIB, 50)])
def test_create_rounds_up_to_whole_blocks(tmp_path, size_mib, virtual, blocks):
    path = str(tmp_path / "d.vhd")
    vhdfile.create(path, size_mib)
    with Vhd.open(path) as vhd:
        assert (vhd.virtual_size, vhd.max_bat_size, len(vhd.bat)) == (virtual, blocks, blocks)
    assert os.path.getsize(path) == 3584


def test_write_into_a_6_mib_disk(tmp_path):
    path = str(tmp_path / "five.vhd")
    vhdfile.create(path, 5)
    write_all(path, [(4194304, 512, 1)])
    assert os.path.getsize(path) == 2101760
    assert bat_bitmap(path) == b"\x20"
    with Vhd.open(path) as vhd:
        assert vhd.bat[2] * 512 == 3584


def test_100_mib_block_set(tmp_path):
    path = str(tmp_path / "big.vhd")
    vhdfile.create(path, 100)
    write_all(path, [(block * 2 * MIB, 1, 0xEE) for block in (0, 7, 8, 15, 49)])
    assert bat_bitmap(path) == bytes.fromhex("81810000000040")


def test_snapshot_of_an_empty_differencing_disk_links_to_its_ancestor(tmp_path):
    empty, child = str(tmp_path / "empty64.vhd"), str(tmp_path / "emptychild.vhd")
    vhdfile.create(empty, 64)
    vhdfile.snapshot(child, empty)
    assert os.path.getsize(child) == 5120 and bat_bitmap(child) == bytes(4)
    grandchild, kept = str(tmp_path / "grandchild.vhd"), str(tmp_path / "grandchild2.vhd")
    vhdfile.snapshot(grandchild, child)
    vhdfile.snapshot(kept, child, skip_empty_parents=False)
    assert vhdfile.resolve_parent(grandchild) == os.path.realpath(empty)
    assert vhdfile.resolve_parent(kept) == os.path.realpath(child)
    with Vhd.open(grandchild) as vhd:
        assert vhd.parent_name == "empty64.vhd"


def test_snapshot_across_directories_uses_a_relative_locator(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    base, child = str(tmp_path / "a" / "base.vhd"), str(tmp_path / "b" / "child.vhd")
    vhdfile.create(base, 8)
    write_all(base, [(4096, 4096, 0x5A)])
    vhdfile.snapshot(child, base)
    with Vhd.open(child) as vhd:
        assert [loc.name for loc in vhd.parent_locators] == ["../a/base.vhd", "./../a/base.vhd",
                                                             "./../a/base.vhd"]
    assert vhdfile.resolve_parent(child) == os.path.realpath(base)
    assert vhdfile.read_chain(child, 4096, 4096) == b"\x5a" * 4096


def test_set_parent_relinks_the_child(tmp_path):
    old, new, child = (str(tmp_path / name) for name in ("old.vhd", "newparent.vhd", "child.vhd"))
    vhdfile.create(old, 8)
    vhdfile.create(new, 8)
    write_all(new, [(0, 512, 0x77)])
    vhdfile.snapshot(child, old)
    vhdfile.set_parent(child, new)
    with Vhd.open(child) as vhd, Vhd.open(new) as parent:
        assert (vhd.parent_uuid, vhd.parent_name) == (parent.uuid, "newparent.vhd")
        assert [loc.data_len for loc in vhd.parent_locators] == [22, 30, 30]
        assert vhd.header.checksum == vhd.header.computed_checksum()
    assert vhdfile.resolve_parent(child) == os.path.realpath(new)
    assert vhdfile.read_chain(child, 0, 512) == b"\x77" * 512


def test_chain_of_three_matches_a_byte_model_and_survives_coalesce(tmp_path):
    rng = random.Random(7)
    model = bytearray(8 * MIB)
    paths = [str(tmp_path / name) for name in ("g.vhd", "p.vhd", "c.vhd")]
    vhdfile.create(paths[0], 8)
    vhdfile.snapshot(paths[1], paths[0])
    for index, path in enumerate(paths):
        if index == 2:
            vhdfile.snapshot(path, paths[1])
        with Vhd.open(path, writable=True) as vhd:
            for _ in range(12):
                offset, length = rng.randrange(8 * MIB - 70000), rng.randrange(1, 70000)
                data = bytes([rng.randrange(256)]) * length
                vhd.write(offset, data)
                model[offset:offset + length] = data
    assert vhdfile.read_chain(paths[2]) == bytes(model)
    assert vhdfile.read_chain(paths[2], 12345, 100000) == bytes(model[12345:112345])
    expected = hashlib.sha256(model).hexdigest()
    assert vhdfile.chain_digest(paths[2]) == expected
    vhdfile.coalesce(paths[2])
    assert vhdfile.chain_digest(paths[1]) == expected


def test_allocate_block_leaves_holes_and_sets_bits(tmp_path):
    path = str(tmp_path / "holes.vhd")
    vhdfile.create(path, 64)
    with Vhd.open(path, writable=True) as vhd:
        vhd.allocate_block(3, sectors=10)
        vhd.allocate_block(4)
        vhd.allocate_block(9, sectors=[0, 4095])
        assert vhd.block_bitmap(3)[:3] == b"\xff\xc0\x00"
        assert vhd.block_bitmap(9)[0] == 0x80 and vhd.block_bitmap(9)[511] == 0x01
        assert vhd.block_full(4) and not vhd.block_full(3)
    assert os.path.getsize(path) == 3 * (4096 + 2 * MIB) + 512
    assert os.stat(path).st_blocks * 512 < 256 * 1024
    assert vhdfile.allocated_blocks(path) == [3, 4, 9]
    assert vhdfile.chain_digest(path) == hashlib.sha256(bytes(64 * MIB)).hexdigest()


def test_many_small_disks_each_keep_their_own_blocks(tmp_path):
    for index in range(200):
        base, leaf = str(tmp_path / "b{}.vhd".format(index)), str(tmp_path / "l{}.vhd".format(index))
        vhdfile.create(base, 64)
        with Vhd.open(base, writable=True) as vhd:
            vhd.allocate_block(0)
            vhd.allocate_block(7, sectors=100)
        vhdfile.snapshot(leaf, base)
        assert vhdfile.allocated_blocks(base) == [0, 7] and vhdfile.allocated_blocks(leaf) == []


def test_marker_lives_in_the_batmap_header(tmp_path):
    path = str(tmp_path / "m.vhd")
    vhdfile.create(path, 8)
    with Vhd.open(path, writable=True) as vhd:
        vhd.set_marker(1)
    with Vhd.open(path) as vhd:
        assert vhd.marker == 1 and vhd.batmap_header.keyhash == ""


def test_fixed_disk(tmp_path):
    path = str(tmp_path / "fixed.vhd")
    vhdfile.create(path, 16, fixed=True)
    assert os.path.getsize(path) == 16777728
    write_all(path, [(100, 5, 0x41)])
    with Vhd.open(path) as vhd:
        assert vhd.disk_type == vhdfile.DISK_FIXED and vhd.physical_size == 16777728
        assert vhd.footer.data_offset == 2 ** 64 - 1
    with pytest.raises(VhdError) as info:
        vhdfile.allocated_blocks(path)
    assert info.value.errno == errno.EINVAL
    assert vhdfile.read_chain(path, 96, 12) == bytes(4) + b"AAAAA" + bytes(3)
    with pytest.raises(VhdError) as info:
        Vhd.open(path, fast=True)
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("content, code", [(b"", errno.EPIPE), (b"x" * 100, errno.EIO),
                                           (b"garbage!" * 128, errno.EINVAL)])
def test_invalid_files_raise_the_errno_libvhd_reports(tmp_path, content, code):
    path = tmp_path / "bad.vhd"
    path.write_bytes(content)
    with pytest.raises(VhdError) as info:
        Vhd.open(str(path))
    assert info.value.errno == code


def test_missing_file_and_missing_parent(tmp_path):
    with pytest.raises(VhdError) as info:
        Vhd.open(str(tmp_path / "nope.vhd"))
    assert info.value.errno == errno.ENOENT
    base, child = str(tmp_path / "gone.vhd"), str(tmp_path / "orphan.vhd")
    vhdfile.create(base, 8)
    vhdfile.snapshot(child, base)
    os.unlink(base)
    for call in (vhdfile.resolve_parent, vhdfile.chain_digest, vhdfile.coalesce):
        with pytest.raises(VhdError) as info:
            call(child)
        assert info.value.errno == errno.ENOENT
    with Vhd.open(child) as vhd:
        assert vhd.parent_locators[0].name == "./gone.vhd"


def test_damaged_end_footer_falls_back_to_the_copy(tmp_path):
    path = str(tmp_path / "d.vhd")
    vhdfile.create(path, 8)
    with open(path, "r+b") as handle:
        handle.seek(-512, os.SEEK_END)
        handle.write(bytes(512))
    with Vhd.open(path) as vhd:
        assert vhd.virtual_size == 8 * MIB


def test_writes_are_checked(tmp_path):
    path = str(tmp_path / "w.vhd")
    vhdfile.create(path, 8)
    with Vhd.open(path) as vhd:
        with pytest.raises(VhdError) as info:
            vhd.write(0, b"x")
        assert info.value.errno == errno.EBADF
    with Vhd.open(path, writable=True) as vhd:
        with pytest.raises(VhdError) as info:
            vhd.write(8 * MIB - 1, b"xy")
        assert info.value.errno == errno.ERANGE


def test_bat_spanning_sectors_is_rewritten_byte_exact(tmp_path):
    path = str(tmp_path / "wide.vhd")
    vhdfile.create(path, 300)
    assert os.path.getsize(path) == 4096
    with Vhd.open(path, writable=True) as vhd:
        assert vhd.batmap_header.batmap_offset == 3072
        vhd.allocate_block(140, sectors=1)
        vhd.allocate_block(2, sectors=1)
        expected = struct.pack(">150I", *vhd.bat) + bytes(1024 - 600)
        assert vhd.bat[140] * 512 == 3584 and vhd.bat[2] * 512 == 3584 + 4096 + 2 * MIB
    with open(path, "rb") as handle:
        handle.seek(1536)
        assert handle.read(1024) == expected
    assert os.path.getsize(path) == 2 * (4096 + 2 * MIB) + 512
