"""Space arithmetic, on plain numbers and on real VHD files merged for real."""
import os

import pytest

from tests.dom0sim import vhdfile
from xcoalesce_agent.inspect import estimate

MIB = 1024 * 1024
BLOCK = estimate.BLOCK_SIZE


def bitmap(blocks, nbytes=4):
    data = bytearray(nbytes)
    for block in blocks:
        data[block >> 3] |= 0x80 >> (block & 7)
    return bytes(data)


def test_bitmaps_are_msb_first_as_vhd_util_prints_them():
    assert bitmap({0, 1, 2, 31}) == bytes.fromhex("e0000001")
    assert estimate.count_blocks(bytes.fromhex("e4200000")) == 5
    assert estimate.blocks_missing_from_parent(bytes.fromhex("e4200000"), bytes.fromhex("e0000001")) == 2


def test_bitmaps_of_different_lengths_align_on_block_zero():
    child = bitmap({0, 40}, nbytes=7)
    parent = bitmap({0}, nbytes=4)
    assert estimate.blocks_missing_from_parent(child, parent) == 1
    assert estimate.blocks_missing_from_parent(parent, child) == 0


def test_file_merge_arithmetic():
    merge = estimate.file_merge(child_size=10510848, child_blocks=5, new_blocks=2)
    assert merge.freed_bytes == 10510848 - 2 * (BLOCK + 4096)
    assert merge.merge_bytes == 5 * BLOCK
    assert merge.merge_free_bytes == 2 * (BLOCK + 4096)


def test_lvhd_sizes_follow_sm():
    # 3 KiB + 4 bytes per block of 2 TiB, rounded to 512, plus one bit per block, rounded to 4 KiB
    assert estimate.lvhd_metadata_size(2 << 40) == 4329472
    assert estimate.bitmaps_size(64 * MIB) == 32 * 4096
    assert estimate.lvhd_full_lv_size(64 * MIB) == 72 * MIB
    assert estimate.lvhd_full_lv_size(10 << 30) % estimate.EXTENT_SIZE == 0


def test_lvm_leaf_merge_frees_the_parent_lv():
    full = estimate.lvhd_full_lv_size(64 * MIB)
    merge = estimate.lvm_leaf_merge(leaf_lv_size=full, parent_lv_size=12 * MIB, virtual_size=64 * MIB, leaf_blocks=3)
    assert merge.freed_bytes == 12 * MIB
    assert merge.merge_free_bytes == full - 12 * MIB
    assert merge.merge_bytes == 3 * BLOCK


def test_lvm_inner_merge_to_the_extent():
    merge = estimate.lvm_inner_merge(child_lv_size=8 * MIB, parent_lv_size=8 * MIB, child_blocks=3, new_blocks=1)
    assert merge.freed_bytes == 8 * MIB + 8 * MIB - 12 * MIB
    assert merge.merge_free_bytes == 4 * MIB


def make_chain(directory, parent_blocks, leaf_blocks, size_mib=64):
    parent = os.path.join(directory, "parent.vhd")
    leaf = os.path.join(directory, "leaf.vhd")
    vhdfile.create(parent, size_mib)
    with vhdfile.Vhd.open(parent, writable=True) as vhd:
        for block in parent_blocks:
            vhd.write(block * BLOCK + 4096, b"p" * 4096)
    vhdfile.snapshot(leaf, parent)
    with vhdfile.Vhd.open(parent, writable=True) as vhd:
        vhd.set_hidden(True)
    with vhdfile.Vhd.open(leaf, writable=True) as vhd:
        for block in leaf_blocks:
            vhd.write(block * BLOCK, b"l" * 512)
    return parent, leaf


def read_bitmap(path, size_mib=64):
    return bitmap(vhdfile.allocated_blocks(path), nbytes=size_mib // 2 // 8)


@pytest.mark.parametrize("parent_blocks, leaf_blocks", [
    ({0, 1, 2, 31}, {0, 1, 2, 5, 10}),   # overlapping: 3 shared, 2 new
    ({0, 1}, {8, 9, 20}),                # disjoint: all new
    ({3, 4, 5}, {3, 4, 5}),              # the leaf rewrote only what the parent has
])
def test_estimate_equals_the_bytes_a_real_merge_frees_and_naive_is_wrong(tmp_path, parent_blocks, leaf_blocks):
    parent, leaf = make_chain(str(tmp_path), parent_blocks, leaf_blocks)
    before = os.path.getsize(parent) + os.path.getsize(leaf)
    leaf_size = os.path.getsize(leaf)
    leaf_bitmap, parent_bitmap = read_bitmap(leaf), read_bitmap(parent)
    merge = estimate.file_merge(leaf_size, estimate.count_blocks(leaf_bitmap),
                                estimate.blocks_missing_from_parent(leaf_bitmap, parent_bitmap))

    vhdfile.coalesce(leaf)
    merged_parent = os.path.getsize(parent)
    os.unlink(leaf)

    assert before - merged_parent == merge.freed_bytes
    assert merged_parent - (before - leaf_size) == merge.merge_free_bytes
    # The naive answer: "the snapshot's space = the sum of the two files, the leaf's size comes back".
    new_blocks = len(set(leaf_blocks) - set(parent_blocks))
    naive_freed = leaf_size
    assert naive_freed - merge.freed_bytes == new_blocks * estimate.BLOCK_COST
    naive_merge_space = leaf_size
    assert naive_merge_space - merge.merge_free_bytes == leaf_size - new_blocks * estimate.BLOCK_COST
