"""The simulated LVM store, its activation on a simulated host and its `lvs` / `vgs` stand-ins."""
import base64
import io
import json
import os
import subprocess
import sys
import zlib

import pytest

from tests.dom0sim import lvm, tools
from tests.dom0sim.host import SimHost
from tests.dom0sim.xapi import vm
from tests.runner_support import virtual_contents

MIB = 1024 * 1024
SR = "0a1b2c3d-1111-4222-8333-444455556666"
VG = "VG_XenStorage-" + SR
VGS_ARGS = ["--noheadings", "--nosuffix", "--units=b",
            "--options=vg_name,vg_extent_size,lv_count,pv_count,pv_name,pe_start", "--unbuffered"]
LVS_ARGS = ["--noheadings", "--nosuffix", "--units=b",
            "--options=lv_name,lv_size,segtype,seg_count,seg_start,seg_size,devices", "--unbuffered"]


@pytest.fixture
def root(tmp_path):
    return str(tmp_path)


@pytest.fixture
def bin_dir(root):
    path = os.path.join(root, "bin")
    tools.install_tools(root, path)
    return path


def run(bin_dir, command, args):
    process = subprocess.Popen([os.path.join(bin_dir, command)] + args, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, universal_newlines=True)
    out, err = process.communicate()
    return out, err, process.returncode


def test_store_layout_and_metadata(root):
    vg = lvm.VolumeGroup.for_sr(root, SR, create=True)
    path = vg.create_lv("VHD-a", 5 * MIB)
    assert path == os.path.join(root, "lvm", VG, "VHD-a") and os.path.isfile(path)
    with open(os.path.join(root, "lvm", VG, "metadata.json")) as handle:
        meta = json.load(handle)
    pv = os.path.join(root, "lvm", "pv", VG)
    assert meta["extent_size"] == 4 * MIB and meta["pe_start"] == MIB and meta["pv_name"] == pv
    assert os.path.isfile(pv) and os.path.getsize(pv) == 0
    assert meta["lvs"] == [{"name": "VHD-a", "size": 8 * MIB, "start_extent": 0, "data_len": 0,
                            "holders": {"lvcreate": 1}}]
    assert lvm.list_vg_names(root) == [VG]


def test_create_resize_rename_remove(root):
    vg = lvm.VolumeGroup.create(root, VG, pv_size=MIB + 10 * 4 * MIB)
    vg.create_lv("A", 4 * MIB)
    vg.create_lv("B", 8 * MIB)
    assert [(lv["name"], lv["start_extent"]) for lv in vg.lvs()] == [("A", 0), ("B", 1)]
    assert vg.free_bytes() == 7 * 4 * MIB
    assert vg.resize_lv("A", 9 * MIB) == 12 * MIB
    assert vg.lv("A")["start_extent"] == 3
    with open(vg.lv_path("A"), "wb") as handle:
        handle.write(b"x" * (5 * MIB))
    with pytest.raises(lvm.LvmError):
        vg.resize_lv("A", 4 * MIB)
    assert vg.resize_lv("A", 5 * MIB) == 8 * MIB
    vg.rename_lv("A", "C")
    assert os.path.getsize(vg.lv_path("C")) == 5 * MIB and not os.path.exists(vg.lv_path("A"))
    with pytest.raises(lvm.LvmError) as excinfo:
        vg.create_lv("D", 40 * MIB)
    assert "insufficient free space" in str(excinfo.value)
    with pytest.raises(lvm.LvmError):
        vg.create_lv("B", 4 * MIB)
    with pytest.raises(lvm.LvmError):
        vg.rename_lv("C", "B")
    vg.remove_lv("C")
    assert [lv["name"] for lv in vg.lvs()] == ["B"] and not os.path.exists(vg.lv_path("C"))
    vg.create_lv("E", 4 * MIB)
    assert vg.lv("E")["start_extent"] == 0
    with pytest.raises(lvm.LvmError):
        vg.lv_size("C")
    with pytest.raises(lvm.LvmError):
        lvm.VolumeGroup.create(root, VG)
    with pytest.raises(lvm.LvmError):
        lvm.VolumeGroup(root, "VG_missing").lvs()


def squeezed(text):
    """Report lines with the column padding collapsed (transcript 6's stand-ins did not align)."""
    return "".join("  " + " ".join(line.split()) + "\n" for line in text.splitlines())


def test_vgs_and_lvs_print_what_libvhd_parses(root, bin_dir):
    pv = os.path.join(root, "pv0.img")
    vg = lvm.VolumeGroup.create(root, VG, pv_name=pv)
    for name, size in (("MGT", 4), ("VHD-b", 8), ("VHD-1eaf", 8), ("VHD-0f", 4)):
        vg.create_lv(name, size * MIB)
    vg.create_lv("VHD-striped", 4 * MIB, segtype="striped")
    out, err, code = run(bin_dir, "vgs", [VG] + VGS_ARGS)
    assert (squeezed(out), err, code) == ("  {} 4194304 5 1 {} 1048576\n".format(VG, pv), "", 0)
    assert out == "  {} 4194304   5   1 {} 1048576\n".format(VG, pv)
    out, err, code = run(bin_dir, "lvs", [VG] + LVS_ARGS)
    assert (squeezed(out), err, code) == ("".join([
        "  MGT 4194304 linear 1 0 4194304 {pv}(0)\n",
        "  VHD-b 8388608 linear 1 0 8388608 {pv}(1)\n",
        "  VHD-1eaf 8388608 linear 1 0 8388608 {pv}(3)\n",
        "  VHD-0f 4194304 linear 1 0 4194304 {pv}(5)\n",
        "  VHD-striped 4194304 striped 1 0 4194304 {pv}(6)\n"]).format(pv=pv), "", 0)
    assert out.splitlines()[0] == "  MGT         4194304 linear     1     0 4194304 {}(0)".format(pv)


def test_unknown_volume_group_fails_like_lvm(root, bin_dir):
    for command, args in (("vgs", VGS_ARGS), ("lvs", LVS_ARGS)):
        assert run(bin_dir, command, ["NoSuchVG"] + args) == (
            "", '  Volume group "NoSuchVG" not found\n  Cannot process volume group NoSuchVG\n', 5)


def test_report_options_and_errors(root, bin_dir):
    lvm.VolumeGroup.create(root, "VG1").create_lv("L", MIB)
    assert run(bin_dir, "lvs", ["--units=b", "--options=lv_name,lv_size"]) == (
        "  LV    LSize\n  L  4194304B\n", "", 0)
    out, err, code = run(bin_dir, "lvs", ["--options=lv_name,bogus"])
    assert (out, code) == ("", 3) and "Unrecognised field: bogus" in err


def test_wrappers_need_the_state_dir(root, bin_dir):
    with open(os.path.join(bin_dir, "vhd-util")) as handle:
        text = handle.read()
    assert "DOM0SIM_ROOT='{}'".format(root) in text and text.startswith("#!/bin/sh\n")
    assert all(os.access(os.path.join(bin_dir, name), os.X_OK) for name in ("vhd-util", "lvs", "vgs"))
    env = dict(os.environ)
    env.pop("DOM0SIM_ROOT", None)
    process = subprocess.Popen([sys.executable, "-m", "tests.dom0sim.lvm", "vgs"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, universal_newlines=True, env=env,
                               cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out, err = process.communicate()
    assert (out, err.strip(), process.returncode) == ("", "DOM0SIM_ROOT is not set", 3)


def test_device_mapper_paths_follow_the_lvs(root):
    vg = lvm.VolumeGroup.for_sr(root, SR, create=True)
    vg.create_lv("VHD-1-2", 4 * MIB)
    dm = vg.dm_path("VHD-1-2")
    assert os.path.basename(dm) == "VG_XenStorage--0a1b2c3d--1111--4222--8333--444455556666-VHD--1--2"
    with open(dm, "wb") as handle:
        handle.write(b"data")
    with open(vg.lv_path("VHD-1-2"), "rb") as handle:
        assert handle.read() == b"data"
    vg.rename_lv("VHD-1-2", "VHD-3")
    assert not os.path.exists(dm) and os.path.samefile(vg.dm_path("VHD-3"), vg.lv_path("VHD-3"))
    vg.remove_lv("VHD-3")
    assert os.listdir(os.path.dirname(dm)) == [] and lvm.list_vg_names(root) == [VG]


# ---- activation on a simulated host -------------------------------------------------------------

def report(root, command, args):
    out = io.StringIO()
    err = io.StringIO()
    old = os.environ.get(lvm.ROOT_ENV)
    os.environ[lvm.ROOT_ENV] = root
    try:
        status = lvm.report_main(command, args, out, err)
    finally:
        if old is None:
            del os.environ[lvm.ROOT_ENV]
        else:
            os.environ[lvm.ROOT_ENV] = old
    return out.getvalue(), err.getvalue(), status


def test_lvs_and_vgs_accept_lvm_option_forms(root):
    pv = os.path.join(root, "pv.img")
    vg = lvm.VolumeGroup.create(root, "VGO", pv_name=pv, pv_size=MIB + 10 * 4 * MIB)
    vg.create_lv("A", 4 * MIB)
    vg.create_lv("LongerName", 8 * MIB)
    vg.deactivate(["A"], lvm.HOLDER_CREATE)
    vg.set_readonly("LongerName", True)
    expected = "  A          -wi------- 4194304\n  LongerName -ri-a----- 8388608\n"
    for args in (["--noheadings", "--nosuffix", "--units", "b", "-o", "lv_name,lv_attr,lv_size", "VGO"],
                 ["VGO", "--noheadings", "--nosuffix", "--units=b", "-olv_name,lv_attr,lv_size"],
                 ["--noheadings", "--nosuffix", "--units", "B", "--options", "lv_name,lv_attr,lv_size"],
                 ["--noheadings", "--nosuffix", "--units=B", "--options=lv_name,lv_attr,lv_size", "--unbuffered"]):
        assert report(root, "lvs", args) == (expected, "", 0), args
    for args in (["--separator", ":"], ["--separator=:"]):
        assert report(root, "lvs", ["--noheadings", "--units", "b", "-o", "lv_name,seg_start_pe,seg_size_pe,devices"]
                      + args) == ("  A:0:1:{pv}(0)\n  LongerName:0:2:{pv}(1)\n".format(pv=pv), "", 0)
    assert report(root, "lvs", ["--segments", "--units", "b", "VGO"]) == (
        "  LV         VG  Attr       Type      SSize\n"
        "  A          VGO -wi------- linear 4194304B\n"
        "  LongerName VGO -ri-a----- linear 8388608B\n", "", 0)
    assert report(root, "lvs", ["--noheadings", "-o", "lv_path", "VGO"])[0].split() == [
        vg.lv_path("A"), vg.lv_path("LongerName")]
    assert report(root, "vgs", ["--noheadings", "--nosuffix", "--units", "b", "-o",
                                "vg_name,vg_extent_size,lv_count,pv_count,pv_name,pe_start,vg_size,vg_free"]) == (
        "  VGO 4194304   2   1 {} 1048576 41943040 29360128\n".format(pv), "", 0)
    assert report(root, "vgs", ["-o", "vg_name,vg_size"]) == ("  VG   VSize\n  VGO 40.00m\n", "", 0)
    out, err, status = report(root, "lvs", ["-o"])
    assert (out, status) == ("", 3) and "requires an argument" in err


def test_activation_moves_bytes_between_pv_and_device_nodes(root):
    vg = lvm.VolumeGroup.create(root, "VGA", pv_size=MIB + 20 * 4 * MIB)
    path = vg.create_lv("L", 4 * MIB)
    with open(path, "r+b") as handle:
        handle.truncate(3 * MIB)
        handle.seek(2 * MIB)
        handle.write(b"tail")
        handle.seek(0)
        handle.write(b"head")
    vg.deactivate(["L"], lvm.HOLDER_CREATE)
    assert not any(os.path.exists(node) for node in vg.node_paths("L"))
    assert vg.lv("L")["data_len"] == 3 * MIB and not vg.lv("L")["active"]
    assert vg.read_lv("L", 0, 4) == b"head" and vg.read_lv("L", 2 * MIB, 4) == b"tail"
    assert vg.read_lv("L", 3 * MIB - 2, 10) == bytes(2)
    with open(vg.pv_path(), "rb") as pv:
        pv.seek(lvm.PE_START)
        assert pv.read(4) == b"head"
    vg.create_lv("M", 4 * MIB)                  # L cannot grow in place any more: resizing moves it
    vg.resize_lv("L", 8 * MIB)
    assert vg.lv("L")["start_extent"] == 2 and vg.read_lv("L", 2 * MIB, 4) == b"tail"
    vg.activate(["L"], lvm.HOLDER_GC)
    vg.activate(["L"], lvm.HOLDER_ATTACH)
    with open(vg.lv_path("L"), "rb") as handle:
        assert handle.read(4) == b"head" and os.path.getsize(vg.lv_path("L")) == 3 * MIB
    assert os.path.samefile(vg.dm_path("L"), vg.lv_path("L"))
    with open(vg.lv_path("L"), "r+b") as handle:
        handle.write(b"HEAD")
    vg.deactivate(["L"], lvm.HOLDER_GC)
    assert vg.is_active("L") and vg.lv("L")["holders"] == {"attach": 1}
    vg.set_held([], lvm.HOLDER_ATTACH)
    assert not vg.is_active("L") and vg.read_lv("L", 0, 4) == b"HEAD"
    vg.remove_lv("L")
    vg.create_lv("N", 4 * MIB)
    assert vg.lv("N")["start_extent"] == 0 and vg.read_lv("N", 0, 4) == b""


def lv_states(host, sr_key):
    vg = host.store(sr_key).vg
    out, _, status = report(host.state_dir, "lvs", ["--noheadings", "-o", "lv_name,lv_attr", vg.name])
    assert status == 0
    return dict(line.split() for line in out.splitlines())


def chain_uuids(host, disk_key):
    return host.store("san").chain(host.vdis[disk_key])


def test_pool_shared_lvm_activates_only_chains_attached_here(tmp_path):
    host = SimHost(str(tmp_path / "h"), "pool-shared-lvm").build()
    vg = host.store("san").vg
    attrs = lv_states(host, "san")
    assert attrs.pop("MGT") == "-wi-a-----"
    seen = set()
    for spec in host.scenario["vms"]:
        group = spec["name"].split("-")[0]
        seen.add(group)
        leaf, parent = chain_uuids(host, spec["disks"][0]["key"])
        state = "a" if group == "here" else "-"
        assert attrs["VHD-" + leaf] == "-wi-{}-----".format(state), spec["name"]
        assert attrs["VHD-" + parent] == "-ri-{}-----".format(state), spec["name"]
        for uuid in (leaf, parent):
            assert all(os.path.exists(node) == (group == "here") for node in vg.node_paths("VHD-" + uuid))
    assert seen == {"remote", "halted", "here", "suspended"}
    assert [line for line in attrs.values() if line[4] == "a"] == ["-ri-a-----", "-wi-a-----"] * 2


def run_tool(host, args):
    env = dict(os.environ, PATH=host.bin_dir + ":" + os.environ.get("PATH", "/usr/bin:/bin"))
    process = subprocess.Popen(["vhd-util"] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               universal_newlines=True, env=env)
    out, err = process.communicate()
    return out, err, process.returncode


def test_inactive_lv_fails_read_like_a_missing_file_while_scan_reads_it(tmp_path):
    host = SimHost(str(tmp_path / "h"), "pool-shared-lvm").build()
    vg = host.store("san").vg
    leaf = host.vdis["halted-00002-root"]
    path = vg.lv_path("VHD-" + leaf)
    missing = os.path.join(str(tmp_path), "never-there")
    for command in (["read", "-B", "-n"], ["query", "-v", "-n"], ["check", "-n"]):
        out, err, status = run_tool(host, command + [path])
        assert (out.replace(path, "X"), err.replace(path, "X"), status) == tuple(
            item.replace(missing, "X") if isinstance(item, str) else item
            for item in run_tool(host, command + [missing])), command
        assert status != 0
    out, err, status = run_tool(host, ["scan", "-f", "-c", "-l", vg.name, "-m", "VHD-" + leaf])
    parent = host.parents["halted-00002-root"]
    assert (out, err, status) == ("vhd=VHD-{} capacity={} size={} hidden=0 parent=VHD-{}\n".format(
        leaf, 64 * MIB, vg.lv_size("VHD-" + leaf), parent), "", 0)


def test_gc_merges_a_halted_chain_and_leaves_it_inactive(sim_host):
    host = sim_host("pool-shared-lvm")
    key = "halted-00002-root"
    before = virtual_contents(host, key)
    host.sm.gc(host.srs["san"])
    leaf = host.vdis[key]
    assert chain_uuids(host, key) == [leaf]
    attrs = lv_states(host, "san")
    assert attrs["VHD-" + leaf] == "-wi-------" and not os.path.exists(host.vdi_path(key))
    assert [name for name, attr in attrs.items() if attr[4] == "a"] == sorted(
        ["MGT"] + ["VHD-" + uuid for spec in host.scenario["vms"] if spec["name"].startswith("here")
                   for uuid in chain_uuids(host, spec["disks"][0]["key"])], key=list(attrs).index)
    assert virtual_contents(host, key) == before


def test_suspend_deactivates_and_resume_reactivates(sim_host):
    host = sim_host("pool-shared-lvm")
    name = "here-00004"
    uuids = chain_uuids(host, name + "-root")
    vg = host.store("san").vg
    assert all(vg.is_active("VHD-" + uuid) for uuid in uuids)
    vm.run(host.db, host.vm_ref(name), "suspend")
    assert not any(vg.is_active("VHD-" + uuid) or os.path.exists(vg.lv_path("VHD-" + uuid)) for uuid in uuids)
    vm.run(host.db, host.vm_ref(name), "resume")
    assert all(vg.is_active("VHD-" + uuid) for uuid in uuids)
    vm.run(host.db, host.vm_ref(name), "pause")
    assert all(vg.is_active("VHD-" + uuid) for uuid in uuids)
    vm.run(host.db, host.vm_ref(name), "hard_shutdown")
    assert not any(vg.is_active("VHD-" + uuid) for uuid in uuids)
    vm.run(host.db, host.vm_ref("halted-00002"), "start")
    assert all(vg.is_active("VHD-" + uuid) for uuid in chain_uuids(host, "halted-00002-root"))


def test_gc_records_vhd_blocks_of_hidden_parents(sim_host):
    host = sim_host("pool-shared-lvm")
    key = "remote-00006-root"                   # keeps its snapshot: a hidden parent with two children
    parent = host.parents[key]
    ref = host.db.ref_of("VDI", parent)
    assert "vhd-blocks" not in host.db.get_field("VDI", ref, "sm_config")
    host.sm.gc(host.srs["san"])
    value = host.db.get_field("VDI", ref, "sm_config")["vhd-blocks"]
    store = host.store("san")
    assert zlib.decompress(base64.b64decode(value)) == store.image(parent).block_bitmap() == b"\x80" + bytes(3)
    assert not store.vg.is_active("VHD-" + parent)
