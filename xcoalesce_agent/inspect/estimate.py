"""Space arithmetic of coalescing: what a merge frees and what free space it needs first.

Pure. File SRs are exact to the block: each block a merge appends to the parent costs its 2 MiB
of data and its 4 KiB sector bitmap. LVM SRs follow SM's LV sizing (lvhdutil: calcSizeLV,
calcSizeVHDLV): exact to the 4 MiB extent.
"""
BLOCK_SIZE = 2 * 1024 * 1024
BITMAP_SIZE = 4096                       # a block's sector bitmap, padded to keep data 4 KiB aligned
BLOCK_COST = BLOCK_SIZE + BITMAP_SIZE    # what one more allocated block adds to a VHD
EXTENT_SIZE = 4 * 1024 * 1024            # LVM extent: LV sizes are rounded up to it
LVHD_MAX_VIRTUAL_SIZE = 2 * 1024 * 1024 * 1024 * 1024   # LVHD preallocates metadata for this size


class Estimate(object):
    """One merge: bytes it frees once done, bytes it copies, free space it needs first."""

    __slots__ = ("freed_bytes", "merge_bytes", "merge_free_bytes")

    def __init__(self, freed_bytes, merge_bytes, merge_free_bytes):
        self.freed_bytes = freed_bytes
        self.merge_bytes = merge_bytes
        self.merge_free_bytes = merge_free_bytes

    def __repr__(self):
        return "Estimate(freed_bytes={}, merge_bytes={}, merge_free_bytes={})".format(
            self.freed_bytes, self.merge_bytes, self.merge_free_bytes)


def count_blocks(bitmap):
    """Allocated blocks in a `vhd-util read -B` bitmap."""
    return bin(int.from_bytes(bitmap, "big")).count("1")


def blocks_missing_from_parent(child_bitmap, parent_bitmap):
    """Blocks the child has and the parent lacks: those a merge appends to the parent."""
    length = max(len(child_bitmap), len(parent_bitmap))
    child = int.from_bytes(child_bitmap.ljust(length, b"\0"), "big")
    parent = int.from_bytes(parent_bitmap.ljust(length, b"\0"), "big")
    return bin(child & ~parent).count("1")


def round_up(value, unit):
    return -(-value // unit) * unit


def lvhd_full_lv_size(virtual_size):
    """The LV size of a fully inflated LVHD VHD (a writable leaf): data, bitmaps and metadata."""
    return round_up(virtual_size + lvhd_metadata_size(LVHD_MAX_VIRTUAL_SIZE) + bitmaps_size(virtual_size),
                    EXTENT_SIZE)


def lvhd_metadata_size(virtual_size):
    """Footer, header, locators, BAT and batmap of an empty VHD of that size, 4 KiB aligned."""
    blocks = virtual_size // (1024 * 1024) // 2
    size = round_up(3 * 1024 + blocks * 4, 512)
    return round_up(size + blocks // 8, 4096)


def bitmaps_size(virtual_size):
    return round_up(virtual_size, BLOCK_SIZE) // BLOCK_SIZE * BITMAP_SIZE


def file_merge(child_size, child_blocks, new_blocks):
    """Merging a child of `child_size` bytes into its parent on a file SR, then deleting the child.

    The parent grows by the blocks it lacks before the child goes: that growth is the free space
    needed first, and the child's size minus it is what the SR gains.
    """
    growth = new_blocks * BLOCK_COST
    return Estimate(child_size - growth, child_blocks * BLOCK_SIZE, growth)


def lvm_leaf_merge(leaf_lv_size, parent_lv_size, virtual_size, leaf_blocks):
    """Leaf coalesce on an LVM SR: the parent LV is inflated to full size, the leaf LV removed."""
    full = lvhd_full_lv_size(virtual_size)
    return Estimate(leaf_lv_size + parent_lv_size - full, leaf_blocks * BLOCK_SIZE,
                    max(0, full - parent_lv_size))


def lvm_inner_merge(child_lv_size, parent_lv_size, child_blocks, new_blocks):
    """The GC's coalesce of a hidden VHD on an LVM SR: the parent grows by the blocks it lacks
    (and is deflated again to its VHD rounded to the extent); the child LV is removed."""
    grown = round_up(parent_lv_size + new_blocks * BLOCK_COST, EXTENT_SIZE)
    return Estimate(child_lv_size + parent_lv_size - grown, child_blocks * BLOCK_SIZE, grown - parent_lv_size)


def count_clusters(bitmap):
    """Clusters set in a QCOW2 cluster bitmap (qcow2meta's bit order; the count does not care)."""
    return bin(int.from_bytes(bitmap, "little")).count("1")


def clusters_missing_from_parent(child_bitmap, parent_bitmap, l2_entries):
    """(clusters the child has and the parent lacks, L2 tables the parent needs for them): one L2
    table maps `l2_entries` clusters (a multiple of 8, so a whole number of bitmap bytes)."""
    length = max(len(child_bitmap), len(parent_bitmap))
    child, parent = child_bitmap.ljust(length, b"\0"), parent_bitmap.ljust(length, b"\0")
    new = int.from_bytes(child, "little") & ~int.from_bytes(parent, "little")
    span = l2_entries // 8
    tables = sum(1 for first in range(0, length, span)
                 if child[first:first + span].strip(b"\0") and not parent[first:first + span].strip(b"\0"))
    return bin(new).count("1"), tables


def qcow2_growth(parent_end, new_clusters, new_tables, cluster_size, refcounts_per_block):
    """Bytes a QCOW2 image ending at `parent_end` grows by when a commit writes `new_clusters` data
    clusters into it: each one, one cluster per new L2 table, and a refcount block each time the
    image's clusters pass what its refcount blocks cover (every new cluster appended at its end)."""
    used = -(-parent_end // cluster_size)
    added = new_clusters + new_tables
    if not added:
        return 0
    blocks = -(-used // refcounts_per_block)
    total = used + added
    while -(-total // refcounts_per_block) > blocks:
        more = -(-total // refcounts_per_block) - blocks
        blocks += more
        total += more
    return total * cluster_size - parent_end


def qcow2_file_merge(leaf_size, leaf_clusters, cluster_size, growth):
    """Leaf coalesce of a QCOW2 image on a file SR: the parent grows first, then the leaf goes."""
    return Estimate(leaf_size - growth, leaf_clusters * cluster_size, growth)


def qcow2_lvm_merge(leaf_lv_size, parent_lv_size, parent_end, leaf_clusters, cluster_size, growth):
    """Leaf coalesce of a QCOW2 image on an LVM SR: the parent LV (never deflated) is extended only
    as far as the grown image needs, to the extent; the leaf LV goes."""
    extension = max(0, round_up(parent_end + growth, EXTENT_SIZE) - parent_lv_size)
    return Estimate(leaf_lv_size - extension, leaf_clusters * cluster_size, extension)
