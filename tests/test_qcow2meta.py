"""qcow2meta and the QCOW2 estimates on real images made with Debian's qemu-img and qemu-io: the
parser reads what qemu wrote, the bitmaps match `qemu-img map`, and the bytes a leaf coalesce frees
match what a real `qemu-img commit` does to the files."""
import base64
import os
import random
import struct
import subprocess
import zlib

import pytest

from tests.helpers import require_tool
from xcoalesce_agent.inspect import estimate, qcow2meta

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def qemu_img():
    require_tool("qemu-io")
    return require_tool("qemu-img")


def run(*command):
    return subprocess.check_output(command, stderr=subprocess.STDOUT).decode()


def create(path, size, cluster_size=65536, backing=None):
    command = ["qemu-img", "create", "-f", "qcow2", "-o", "cluster_size={}".format(cluster_size)]
    if backing:
        command += ["-b", backing, "-F", "qcow2"]
    run(*(command + [path] + ([] if backing else [str(size)])))


def write(path, *ranges, pattern=1):
    run("qemu-io", *[argument for offset, length in ranges
                     for argument in ("-c", "write -P {} {} {}".format(pattern, offset, length))], path)


def reader(path):
    handle = open(path, "rb")

    def read(offset, length):
        handle.seek(offset)
        return handle.read(length)
    return handle, read


def header_of(path):
    handle, read = reader(path)
    with handle:
        return qcow2meta.read_header(read, os.path.getsize(path))


def bitmap_of(path):
    handle, read = reader(path)
    with handle:
        header = qcow2meta.read_header(read, os.path.getsize(path))
        return qcow2meta.cluster_bitmap(read, header, os.path.getsize(path))


def map_of(path):
    return run("qemu-img", "map", "--output=json",
               'json:{"driver":"qcow2","file":{"driver":"file","filename":"%s"},"backing":null}' % path)


def set_hidden(path, hidden):
    """Append SM's hidden-flag extension as SM does: over the end marker, the backing name moved."""
    header = header_of(path)
    with open(path, "r+b") as handle:
        raw = handle.read(65536)
        (backing_offset,) = struct.unpack_from(">Q", raw, 8)
        (backing_size,) = struct.unpack_from(">I", raw, 16)
        (length,) = struct.unpack_from(">I", raw, 100) if header.version == 3 else (72,)
        offset = length
        while struct.unpack_from(">I", raw, offset)[0] != 0:
            offset += 8 + (struct.unpack_from(">I", raw, offset + 4)[0] + 7) // 8 * 8
        extension = struct.pack(">II", qcow2meta.HIDDEN_EXTENSION, 8) + bytes([1 if hidden else 0]) + bytes(7)
        if backing_offset:
            name = raw[backing_offset:backing_offset + backing_size]
            handle.seek(backing_offset)
            handle.write(bytes(backing_size))
            handle.seek(backing_offset + 16)
            handle.write(name)
            handle.seek(8)
            handle.write(struct.pack(">Q", backing_offset + 16))
        handle.seek(offset)
        handle.write(extension + bytes(8))


def test_header_backing_name_and_hidden_flag(qemu_img, tmp_path):
    base, leaf = str(tmp_path / "base.qcow2"), str(tmp_path / "leaf.qcow2")
    create(base, 64 * MIB)
    create(leaf, 0, backing="base.qcow2")
    header = header_of(leaf)
    assert (header.version, header.cluster_size, header.virtual_size) == (3, 65536, 64 * MIB)
    assert header.backing_name == "base.qcow2" and not header.hidden
    assert header.l2_entries == 8192 and header.refcounts_per_block == 32768
    set_hidden(leaf, True)
    assert header_of(leaf).hidden and header_of(leaf).backing_name == "base.qcow2"
    run("qemu-img", "check", leaf)
    set_hidden(base, False)
    assert not header_of(base).hidden and header_of(base).backing_name == ""


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536])
def test_cluster_bitmap_matches_qemu_img_map(qemu_img, tmp_path, cluster_size):
    path = str(tmp_path / "image.qcow2")
    size = 8 * MIB + 3 * cluster_size
    create(path, size, cluster_size)
    write(path, (0, cluster_size), (3 * MIB + 5, 100000), (size - cluster_size, cluster_size))
    header = header_of(path)
    bitmap = bitmap_of(path)
    assert len(bitmap) == header.bitmap_length()
    assert bitmap == qcow2meta.map_bitmap(map_of(path), header)
    assert estimate.count_clusters(bitmap) == 2 + len(range(3 * MIB // cluster_size,
                                                            (3 * MIB + 100005 - 1) // cluster_size + 1))
    assert bitmap[0] & 1 and bitmap[-1] >> ((header.clusters - 1) % 8) & 1


def test_extended_l2_clusters_with_any_allocated_subcluster_count(qemu_img, tmp_path):
    path = str(tmp_path / "image.qcow2")
    run("qemu-img", "create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=65536", path, str(16 * MIB))
    write(path, (65536 + 4096, 4096), (4 * MIB, 65536))
    header = header_of(path)
    assert header.extended_l2 and header.l2_entries == 4096
    assert bitmap_of(path) == qcow2meta.map_bitmap(map_of(path), header)


def test_helper_bitmap_and_vhd_blocks_are_checked_against_the_header(qemu_img, tmp_path):
    path = str(tmp_path / "image.qcow2")
    create(path, 8 * MIB)
    write(path, (MIB, 65536))
    header, bitmap = header_of(path), bitmap_of(path)
    assert header.whole_helper_bitmap()
    assert qcow2meta.helper_bitmap(bitmap, header, "qcow2_helper") == bitmap
    with pytest.raises(qcow2meta.Qcow2Error, match="printed 0 bytes where a 16-byte bitmap"):
        qcow2meta.helper_bitmap(b"", header, "qcow2_helper")
    value = base64.b64encode(zlib.compress(bitmap)).decode("ascii")
    assert qcow2meta.decode_vhd_blocks(value, header) == bitmap
    for bad in ("skipped", base64.b64encode(zlib.compress(bitmap[:-1])).decode("ascii")):
        with pytest.raises(qcow2meta.Qcow2Error):
            qcow2meta.decode_vhd_blocks(bad, header)
    create(path, 8 * MIB + 65536)
    assert not header_of(path).whole_helper_bitmap()


def commit_and_measure(base, leaf):
    """(estimated growth, real growth, estimated freed, real freed) of `qemu-img commit leaf -d`."""
    parent_header = header_of(base)
    child = qcow2meta.regrid(bitmap_of(leaf), header_of(leaf), parent_header.cluster_bits)
    parent = bitmap_of(base)
    new, tables = estimate.clusters_missing_from_parent(child, parent, parent_header.l2_entries)
    parent_size, leaf_size = os.path.getsize(base), os.path.getsize(leaf)
    growth = estimate.qcow2_growth(parent_size, new, tables, parent_header.cluster_size,
                                   parent_header.refcounts_per_block)
    merge = estimate.qcow2_file_merge(leaf_size, estimate.count_clusters(child), parent_header.cluster_size, growth)
    output = run("qemu-img", "commit", "-f", "qcow2", leaf, "-d")
    assert output.strip().endswith("Image committed.")
    run("qemu-img", "check", base)
    real_growth = os.path.getsize(base) - parent_size
    return growth, real_growth, merge.freed_bytes, leaf_size - real_growth


def test_measured_example_of_the_facts(qemu_img, tmp_path):
    """17 clusters new to the parent: it grows by 17 clusters exactly."""
    base, leaf = str(tmp_path / "base.qcow2"), str(tmp_path / "leaf.qcow2")
    create(base, 64 * MIB)
    write(base, (0, 4 * MIB))
    create(leaf, 0, backing="base.qcow2")
    write(leaf, (MIB, 2 * MIB), (4 * MIB, 17 * 65536), pattern=2)
    growth, real, freed, real_freed = commit_and_measure(base, leaf)
    assert growth == real == 17 * 65536
    assert freed == real_freed


@pytest.mark.parametrize("seed", range(12))
def test_estimate_equals_a_real_commit(qemu_img, tmp_path, seed):
    """Random chains with small clusters, so that new L2 tables and refcount blocks are needed."""
    rng = random.Random(seed)
    cluster_size = rng.choice([512, 1024, 4096, 65536])
    size = {512: 4, 1024: 8, 4096: 32, 65536: 256}[cluster_size] * MIB
    base, leaf = str(tmp_path / "base.qcow2"), str(tmp_path / "leaf.qcow2")
    create(base, size, cluster_size)
    ranges = [(rng.randrange(size // cluster_size) * cluster_size, rng.randint(1, 200) * cluster_size)
              for _ in range(rng.randint(0, 5))]
    if ranges:
        write(base, *[(offset, min(length, size - offset)) for offset, length in ranges])
    create(leaf, 0, cluster_size, backing="base.qcow2")
    ranges = [(rng.randrange(size // cluster_size) * cluster_size, rng.randint(1, 300) * cluster_size)
              for _ in range(rng.randint(1, 5))]
    write(leaf, *[(offset, min(length, size - offset)) for offset, length in ranges], pattern=2)
    growth, real, freed, real_freed = commit_and_measure(base, leaf)
    assert (growth, freed) == (real, real_freed)


@pytest.mark.parametrize("clusters", [(65536, 4096), (4096, 65536)])
def test_a_leaf_with_other_clusters_than_its_parent(qemu_img, tmp_path, clusters):
    base, leaf = str(tmp_path / "base.qcow2"), str(tmp_path / "leaf.qcow2")
    create(base, 32 * MIB, clusters[0])
    write(base, (0, MIB))
    create(leaf, 0, clusters[1], backing="base.qcow2")
    write(leaf, (MIB - 4096, 8192), (9 * MIB + 4096, 4096), (20 * MIB, 3 * 65536), pattern=2)
    growth, real, freed, real_freed = commit_and_measure(base, leaf)
    assert (growth, freed) == (real, real_freed)


def test_image_end_is_past_the_last_counted_cluster(qemu_img, tmp_path):
    path = str(tmp_path / "image.qcow2")
    create(path, 64 * MIB)
    write(path, (0, MIB))
    handle, read = reader(path)
    with handle:
        header = qcow2meta.read_header(read, os.path.getsize(path))
        assert qcow2meta.image_end(read, header, os.path.getsize(path)) == os.path.getsize(path)
        assert qcow2meta.image_end(read, header, 100 * MIB) == os.path.getsize(path)   # an LV holding it


def hostile(raw, size=None):
    """The Qcow2Error message parsing `raw` as an image of `size` bytes (default: its length)."""
    with pytest.raises(qcow2meta.Qcow2Error) as caught:
        qcow2meta.read_header(lambda offset, length: raw[offset:offset + length], size or len(raw))
    return str(caught.value)


@pytest.fixture
def image_bytes(qemu_img, tmp_path):
    base, leaf = str(tmp_path / "base.qcow2"), str(tmp_path / "leaf.qcow2")
    create(base, 64 * MIB)
    create(leaf, 0, backing="base.qcow2")
    with open(leaf, "rb") as handle:
        return bytearray(handle.read())


def test_hostile_headers_give_one_line_reasons(image_bytes):
    raw = bytes(image_bytes)
    assert "header cut short: 40 of 72 bytes" in hostile(raw[:40])
    assert "invalid magic" in hostile(b"conectix" + raw[8:])
    assert "version 4" in hostile(raw[:4] + struct.pack(">I", 4) + raw[8:])
    assert "cluster_bits 30" in hostile(raw[:20] + struct.pack(">I", 30) + raw[24:])
    unknown = raw[:72] + struct.pack(">Q", 1 << 9) + raw[80:]
    assert "unknown incompatible feature bits 0x200: left alone" in hostile(unknown)
    assert "marked corrupt" in hostile(raw[:72] + struct.pack(">Q", 2) + raw[80:])
    assert "external data file" in hostile(raw[:72] + struct.pack(">Q", 4) + raw[80:])
    far = raw[:8] + struct.pack(">Q", 70000) + raw[16:]
    assert "backing file name of 10 bytes at 70000 is out of bounds" in hostile(far)
    assert "L1 table" in hostile(raw, 4096)
    loop = raw[:100] + struct.pack(">I", 112) + raw[104:112] + struct.pack(">II", 0x1234, 1 << 20) + raw[120:]
    assert "header extension 0x1234 cut short" in hostile(loop)


def test_a_truncated_l2_table_is_an_error_not_zeros(qemu_img, tmp_path):
    path = str(tmp_path / "image.qcow2")
    create(path, 64 * MIB)
    write(path, (0, MIB))
    with open(path, "rb") as handle:
        raw = handle.read()
    header = qcow2meta.read_header(lambda offset, length: raw[offset:offset + length], len(raw))
    cut = raw[:5 * 65536 - 100]
    with pytest.raises(qcow2meta.Qcow2Error, match="outside the"):
        qcow2meta.cluster_bitmap(lambda offset, length: cut[offset:offset + length], header, len(cut))
