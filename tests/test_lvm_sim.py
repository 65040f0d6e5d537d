"""The simulated LVM store and its `lvs` / `vgs` stand-ins (format of the shared transcript 6)."""
import json
import os
import subprocess
import sys

import pytest

from tests.dom0sim import lvm, tools

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
