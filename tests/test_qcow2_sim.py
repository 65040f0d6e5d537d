"""QCOW2 VDIs on the simulated host: real images (qemu-img check), names as on XCP-ng 8.3, SM's hidden
flag, the qcow2_helper stand-in, xapi records, and the GC merging QCOW2 chains on file and LVM SRs."""
import base64
import json
import os
import subprocess
import zlib

import pytest

from tests.dom0sim import qcow2file, qcow2store, sm
from tests.dom0sim.host import SimHost

MIB = 1024 * 1024


def qemu(*args, check=True):
    process = subprocess.run(list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if check:
        assert process.returncode == 0, process.stderr
    return process


def helper(*args):
    process = subprocess.run([os.path.join(HOST_BIN[0], "qcow2_helper")] + list(args), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    return process.returncode, process.stdout, process.stderr.decode()


HOST_BIN = []


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The qcow2 scenario as built (nothing runs on it: tests that change it build their own)."""
    host = SimHost(str(tmp_path_factory.mktemp("qcow2") / "h"), "qcow2", count=10).build()
    HOST_BIN[:] = [host.bin_dir]
    return host


def images(host, key):
    return dict((image.uuid, image) for image in host.store(key).scan())


def qcow2_disks(host):
    for spec in host.scenario["vms"]:
        for disk in spec["disks"]:
            if disk["vdi_type"] == "qcow2" and not disk["hostile"]:
                yield disk


def test_every_image_passes_qemu_img_check_and_names_its_backing_file_as_the_host_does(built):
    ext, iscsi = built.store("ext"), built.store("iscsi")
    checked = 0
    for uuid, image in images(built, "ext").items():
        if image.vdi_type == "qcow2":
            qemu("qemu-img", "check", "-q", image.path)
            assert image.path == os.path.join(ext.directory, uuid + ".qcow2")
            if image.backing_name is not None:
                assert image.backing_name == image.parent_footer_uuid + ".qcow2"
            checked += 1
    vg = iscsi.vg
    for uuid, image in images(built, "iscsi").items():
        if image.vdi_type == "qcow2":
            with iscsi.holding(iscsi.lv_name(link) for link in iscsi.chain(uuid)):
                qemu("qemu-img", "check", "-q", image.path)
                info = json.loads(qemu("qemu-img", "info", "--backing-chain", "--output=json", image.path).stdout)
            assert os.path.basename(image.path) == "QCOW2-" + uuid
            if image.backing_name is not None:
                assert image.backing_name == os.path.join(
                    built.state_dir, "lvm", "VG_XenStorage-" + built.srs["iscsi"], "QCOW2-" + image.parent_footer_uuid)
                assert len(info) == 2
            assert vg.lv_size("QCOW2-" + uuid) % (4 * MIB) == 0
            checked += 1
    assert checked >= 20


def test_records_say_qcow2_and_hidden_parents_carry_the_helpers_bitmap(built):
    for disk in qcow2_disks(built):
        record = built.db.get("VDI", built.vdi_ref(disk["key"]))
        assert record["sm_config"]["vdi_type"] == "qcow2"
        assert record["sm_config"]["image-format"] == "qcow2"
        parent = built.parents.get(disk["key"])
        if parent:
            assert record["sm_config"]["vhd-parent"] == parent
    ext = images(built, "ext")
    forest = sm.Forest(list(ext.values()))
    gc = sm.GcPass(built.sm, built.srs["ext"])
    gc.update_block_info(forest)
    hidden = [image for image in ext.values() if image.vdi_type == "qcow2" and image.hidden]
    assert hidden
    for image in hidden:
        value = built.db.get("VDI", built.db.ref_of("VDI", image.uuid))["sm_config"]["vhd-blocks"]
        code, out, _ = helper("bitmap", image.path)
        assert code == 0 and zlib.decompress(base64.b64decode(value)) == out


def test_a_bitmap_too_big_for_xapi_is_recorded_as_skipped(built, monkeypatch):
    image = [image for image in images(built, "ext").values() if image.vdi_type == "qcow2" and image.hidden][0]
    monkeypatch.setattr(qcow2store, "VHD_BLOCKS_MAX_CHARS", 8)
    assert image.block_info() == "skipped"


def test_the_big_disk_is_over_two_tib_and_sparse(built):
    path = built.vdi_path("q-big-data")
    header = qcow2file.read_header(path)
    assert header.size > 2 * 1024 ** 4
    assert os.stat(path).st_blocks * 512 < 64 * MIB


def test_hidden_flag_round_trips_and_qemu_keeps_reading_and_keeping_it(tmp_path):
    base, leaf = str(tmp_path / "base.qcow2"), str(tmp_path / "leaf.qcow2")
    qemu("qemu-img", "create", "-q", "-f", "qcow2", base, "64M")
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", leaf)
    assert qcow2file.read_header(leaf).hidden is None           # plain qemu-img: no flag yet
    qcow2file.set_hidden(leaf, True)
    header = qcow2file.read_header(leaf)
    assert header.hidden is True and header.backing_name == "base.qcow2"
    assert qcow2file.HIDDEN_EXTENSION in [ext[0] for ext in header.extensions]
    qemu("qemu-img", "check", "-q", leaf)
    info = json.loads(qemu("qemu-img", "info", "--output=json", leaf).stdout)
    assert info["backing-filename"] == "base.qcow2"
    qcow2file.set_hidden(leaf, False)
    assert qcow2file.read_header(leaf).hidden is False
    qcow2file.set_hidden(leaf, True)
    qemu("qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", base, leaf)
    header = qcow2file.read_header(leaf)
    assert header.hidden is True and header.backing_name == base


def test_helper_counts_only_the_images_own_clusters_as_qemu_img_map_does(built, tmp_path):
    base, leaf = str(tmp_path / "base.qcow2"), str(tmp_path / "leaf.qcow2")
    qcow2store.create(base, 600 * MIB)
    qcow2store.write(base, 0, b"b" * MIB)
    qcow2store.snapshot(leaf, "base.qcow2", base)
    qcow2store.write(leaf, 512 * 1024, b"l" * (2 * MIB))
    qcow2store.write(leaf, 520 * MIB, b"x" * 4096)
    code, out, err = helper("allocated", leaf)
    mapped = json.loads(qemu("qemu-img", "map", "--output=json", "json:" + json.dumps(
        {"driver": "qcow2", "file": {"driver": "file", "filename": leaf}, "backing": None})).stdout)
    own = sum(run["length"] for run in mapped if run["data"])
    assert (code, err) == (0, "") and out == "{}\n".format(own).encode() == b"2162688\n"
    code, out, _ = helper("bitmap", leaf)
    assert code == 0 and len(out) == 600 * MIB // 65536 // 8
    bits = [index for index in range(len(out) * 8) if out[index >> 3] >> (index & 7) & 1]
    assert bits == list(range(8, 40)) + [520 * 16]


def test_helper_exit_codes_and_messages_are_the_real_ones(built, tmp_path):
    assert helper("allocated") == (1, b"", "Need an argument\n")
    missing = str(tmp_path / "missing")
    assert helper("allocated", missing) == (1, b"", "Opening file {} failed with error No such file or "
                                                    "directory (2)\n".format(missing))
    not_qcow2 = tmp_path / "x.vhd"
    not_qcow2.write_bytes(b"conectix" + bytes(600))
    assert helper("bitmap", str(not_qcow2)) == (0, b"", "MAGIC is wrong\n")
    image = str(tmp_path / "i.qcow2")
    qcow2file.write_image(image, 64 * MIB, [3])
    assert helper("frobnicate", image) == (1, b"", "Command frobnicate is unknown.\n")
    assert helper("allocated", str(tmp_path)) == (1, b"", "Failed reading file\n")


def test_a_host_can_lack_the_helper(tmp_path):
    host = SimHost(str(tmp_path / "h"), "qcow2", qcow2_helper=False).build()
    assert not os.path.exists(os.path.join(host.bin_dir, "qcow2_helper"))
    assert os.path.exists(os.path.join(host.bin_dir, "vhd-util"))


def test_hostile_images_are_what_their_names_say(built):
    hostile = images(built, "hostile")
    forest = sm.Forest(list(hostile.values()))
    by_kind = dict((disk["hostile"], built.vdis[disk["key"]])
                   for spec in built.scenario["vms"] for disk in spec["disks"] if disk["hostile"])
    assert hostile[by_kind["truncated-header"]].scan_error
    loop = hostile[by_kind["backing-loop"]]
    assert loop.parent is not None and loop.parent.parent is loop
    assert hostile[by_kind["backing-outside"]] in forest.orphans
    unknown = hostile[by_kind["unknown-feature"]]
    assert not unknown.scan_error
    failed = qemu("qemu-img", "info", unknown.path, check=False)
    assert failed.returncode != 0 and b"feature" in failed.stderr
    code, out, _ = helper("allocated", hostile[by_kind["truncated-header"]].path)
    assert (code, out) == (0, b"0\n")


def test_bulk_images_are_valid(built):
    sample = [disk for disk in qcow2_disks(built) if disk["bulk"] and disk["sr"] == "ext"][:3]
    assert sample
    for disk in sample:
        leaf = built.vdi_path(disk["key"])
        qemu("qemu-img", "check", "-q", leaf)
        qemu("qemu-img", "check", "-q", os.path.join(os.path.dirname(leaf), built.parents[disk["key"]] + ".qcow2"))


# ---- the GC ------------------------------------------------------------------------------------------

def raw_copy(path, target):
    qemu("qemu-img", "convert", "-O", "raw", path, target)


@pytest.mark.parametrize("generation", ["3.2", "4.1"])
def test_gc_leaf_coalesces_a_qcow2_leaf_on_a_file_sr(tmp_path, generation):
    host = SimHost(str(tmp_path / "h"), "qcow2", sm=generation).build()
    store = host.store("ext")
    leaf_uuid, parent_uuid = host.vdis["q-web-root"], host.parents["q-web-root"]
    leaf, parent = store.path(leaf_uuid), store.path(parent_uuid)
    raw_copy(leaf, str(tmp_path / "before.raw"))
    growth = qcow2store.merge_growth(leaf, parent)
    leaf_size, parent_size = os.path.getsize(leaf), os.path.getsize(parent)
    used = store.utilisation()
    with host.start():
        assert host.sm.gc(host.srs["ext"], raise_errors=True) == 0
    merged = store.path(leaf_uuid)
    assert not os.path.exists(parent) and merged.endswith(leaf_uuid + ".qcow2")
    qemu("qemu-img", "check", "-q", merged)
    qemu("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(tmp_path / "before.raw"), merged)
    header = qcow2file.read_header(merged)
    assert header.backing_name is None and header.hidden is False
    assert os.path.getsize(merged) - parent_size == growth == 32 * 65536   # 4 MiB..6 MiB are new to the parent
    freed_here = leaf_size - growth
    assert store.utilisation() <= used - freed_here
    record = host.db.get("VDI", host.vdi_ref("q-web-root"))
    assert "vhd-parent" not in record["sm_config"] and record["sm_config"]["image-format"] == "qcow2"
    assert not host.db.find("VDI", uuid=parent_uuid)
    with open(host.sm.speed_log(host.srs["ext"])) as handle:
        assert len(handle.readlines()) >= 2


def test_gc_coalesces_a_hidden_qcow2_parent_and_relinks_its_child(tmp_path):
    host = SimHost(str(tmp_path / "h"), "qcow2").build()
    store = host.store("ext")
    leaf_uuid = host.vdis["q-mail-root"]
    raw_copy(store.path(leaf_uuid), str(tmp_path / "before.raw"))
    with host.start():
        assert host.sm.gc(host.srs["ext"], raise_errors=True) == 0
    merged = store.path(leaf_uuid)
    qemu("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(tmp_path / "before.raw"), merged)
    assert qcow2file.read_header(merged).backing_name is None
    assert [image.uuid for image in images(host, "ext").values() if image.uuid == leaf_uuid]


@pytest.mark.parametrize("generation", ["3.2", "4.1"])
def test_gc_leaf_coalesces_a_qcow2_leaf_on_an_lvm_sr(tmp_path, generation):
    host = SimHost(str(tmp_path / "h"), "qcow2", sm=generation).build()
    store = host.store("iscsi")
    vg = store.vg
    leaf_uuid, parent_uuid = host.vdis["q-db-data"], host.parents["q-db-data"]
    assert not vg.is_active("QCOW2-" + leaf_uuid)                       # its VM is halted
    with store.holding(["QCOW2-" + leaf_uuid, "QCOW2-" + parent_uuid]):
        raw_copy(store.path(leaf_uuid), str(tmp_path / "before.raw"))
    leaf_lv, parent_lv = vg.lv_size("QCOW2-" + leaf_uuid), vg.lv_size("QCOW2-" + parent_uuid)
    assert parent_lv == qcow2store.volume_size(64 * MIB)                 # base copies are not deflated
    free = vg.free_bytes()
    with host.start():
        assert host.sm.gc(host.srs["iscsi"], raise_errors=True) == 0
    assert not vg.has_lv("QCOW2-" + parent_uuid)
    assert vg.lv_size("QCOW2-" + leaf_uuid) == parent_lv
    assert not vg.is_active("QCOW2-" + leaf_uuid)
    assert vg.free_bytes() >= free + leaf_lv
    with store.holding(["QCOW2-" + leaf_uuid]):
        merged = store.path(leaf_uuid)
        qemu("qemu-img", "check", "-q", merged)
        qemu("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(tmp_path / "before.raw"), merged)
        assert qcow2file.read_header(merged).backing_name is None


def test_commit_output_is_parsed_as_sm_parses_it():
    assert qcow2store.committed_bytes("(1114112/1114112)\nImage committed.\n") == 1114112
    assert qcow2store.committed_bytes("(4096/8192)") == 4096
    with pytest.raises(sm.SmError):
        qcow2store.committed_bytes("Image committed.\n")


def test_merge_growth_counts_new_clusters_and_l2_tables_as_qemu_img_commit_grows_the_parent(tmp_path):
    base, leaf = str(tmp_path / "base.qcow2"), str(tmp_path / "leaf.qcow2")
    qcow2store.create(base, 1024 * MIB)
    qcow2store.write(base, 0, b"b" * MIB)
    qcow2store.snapshot(leaf, "base.qcow2", base)
    qcow2store.write(leaf, 0, b"l" * (2 * MIB))
    qcow2store.write(leaf, 600 * MIB, b"x" * 65536)
    growth = qcow2store.merge_growth(leaf, base)
    assert growth == (16 + 1 + 1) * 65536            # 1 MiB..2 MiB, one cluster past 512 MiB, its L2 table
    before = os.path.getsize(base)
    assert qcow2store.committed_bytes(qcow2store.commit(leaf)) == 33 * 65536
    assert os.path.getsize(base) - before == growth
    assert qcow2file.allocated_bytes(base) == 33 * 65536
