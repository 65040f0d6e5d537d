"""Reading VHD bitmaps of LVs from their PV extents: `lvs`/`vgs` output as LVM prints it, real PV
files holding real VHDs (from the simulated host's writer) at their extents, and the inspection of a
simulated host whose LVs are not all active."""
import base64
import os
import zlib

import pytest

from tests.dom0sim import lvm, scenarios, vhdfile, vhdutil_cli
from xcoalesce_agent import config, model
from xcoalesce_agent.inspect import inspection, lvmread, vhdmeta, vhdutil

MIB = 1024 * 1024
EXTENT = 4 * MIB
PE_START = MIB
VG = "VG_XenStorage-0a1b2c3d-1111-4222-8333-444455556666"


def read_b(path):
    out = vhdutil_cli.Output()
    assert vhdutil_cli.run(["read", "-B", "-n", path], out) == 0
    return bytes(out.out)


def test_lvm_command_lines():
    assert lvmread.lvs_arguments(VG) == [
        VG, "--noheadings", "--nosuffix", "--units", "b", "--separator", "|",
        "-o", "lv_name,lv_attr,lv_size,segtype,seg_start_pe,seg_size_pe,devices", "--segments"]
    assert lvmread.vgs_arguments(VG) == [
        VG, "--noheadings", "--nosuffix", "--units", "b", "--separator", "|", "-o", "pv_name,vg_extent_size,pe_start"]


# As LVM 2.02 prints them with the arguments above: two spaces before each row, one row per segment / PV.
VGS_TEXT = "  /dev/sdb|4194304|1048576\n  /dev/mapper/36001405abc|4194304|196608\n"
LVS_TEXT = """\
  MGT|-wi-a-----|4194304|linear|0|1|/dev/sdb(0)
  VHD-aaaa|-wi-a-----|8388608|linear|0|2|/dev/sdb(1)
  VHD-bbbb|-wi-------|12582912|linear|0|1|/dev/sdb(9)
  VHD-bbbb|-wi-------|12582912|linear|1|2|/dev/mapper/36001405abc(4)
  VHD-cccc|-wi-------|8388608|striped|0|2|/dev/sdb(20),/dev/mapper/36001405abc(20)
  VHD-dddd|-wi-------|4194304|linear|0|1|/dev/sdz(3)
  VHD-eeee|-wi-s-----|8388608|linear|0|1|/dev/sdb(30)
"""


def every_volume(text, extent_size, pe_starts):
    report = lvmread.parse_lvs(text, extent_size, pe_starts)
    return report.volumes(set(report.names("")))


def test_parse_vgs_and_lvs_as_lvm_prints_them():
    extent_size, starts = lvmread.parse_vgs(VGS_TEXT)
    assert extent_size == EXTENT and starts == {"/dev/sdb": PE_START, "/dev/mapper/36001405abc": 196608}
    report = lvmread.parse_lvs(LVS_TEXT, extent_size, starts)
    assert report.names("VHD-") == ["VHD-aaaa", "VHD-bbbb", "VHD-cccc", "VHD-dddd", "VHD-eeee"]
    assert sorted(report.volumes({"VHD-aaaa", "VHD-eeee", "VHD-none"})) == ["VHD-aaaa", "VHD-eeee"]
    volumes = every_volume(LVS_TEXT, extent_size, starts)
    assert volumes["VHD-aaaa"].active and not volumes["VHD-bbbb"].active and not volumes["VHD-eeee"].active
    assert [(s.start, s.length, s.pv, s.pv_offset) for s in volumes["VHD-bbbb"].segments] == [
        (0, EXTENT, "/dev/sdb", PE_START + 9 * EXTENT),
        (EXTENT, 2 * EXTENT, "/dev/mapper/36001405abc", 196608 + 4 * EXTENT)]
    assert volumes["VHD-bbbb"].problem == ""
    assert volumes["VHD-cccc"].problem == "segment at extent 0 is striped, not linear"
    assert "not a PV of the VG" in volumes["VHD-dddd"].problem
    assert volumes["VHD-eeee"].problem == "its segments cover less than its 8388608 bytes"
    assert lvmread.pv_ranges(volumes["VHD-bbbb"].segments, EXTENT - 512, 1024) == [
        ("/dev/sdb", PE_START + 10 * EXTENT - 512, 512), ("/dev/mapper/36001405abc", 196608 + 4 * EXTENT, 512)]


@pytest.mark.parametrize("text, reason", [
    ("", "vgs printed no physical volume"),
    ("  /dev/sdb|4194304\n", "vgs: unexpected line"),
    ("  /dev/sdb|4M|1048576\n", "'4M' is not a number"),
    ("  /dev/sdb|4194304|1048576\n  /dev/sdc|8388608|1048576\n", "unexpected extent size"),
])
def test_vgs_output_not_understood(text, reason):
    with pytest.raises(lvmread.LvmReportError) as raised:
        lvmread.parse_vgs(text)
    assert reason in str(raised.value)


@pytest.mark.parametrize("line", ["  VHD-aaaa|-wi-a-----|8388608|linear|0|2",
                                  "  VHD-aaaa|-wi-a-----|8M|linear|0|2|/dev/sdb(1)",
                                  "  VHD-aaaa|-wi-a-----|8388608|linear|-1|2|/dev/sdb(1)"])
def test_lvs_output_not_understood(line):
    with pytest.raises(lvmread.LvmReportError) as raised:
        lvmread.parse_lvs("  MGT|-wi-a-----|4194304|linear|0|1|/dev/sdb(0)\n{}\n\n".format(line), EXTENT,
                          {"/dev/sdb": PE_START})
    assert str(raised.value) == "lvs: unexpected line: " + line.strip()


def written_vhd(path, size_mib, blocks):
    vhdfile.create(path, size_mib)
    with vhdfile.Vhd.open(path, writable=True) as vhd:
        for block in blocks:
            vhd.write(block * vhdfile.BLOCK_SIZE, b"\xa5" * 4096)
    return path


class PvLab(object):
    """Sparse PV files with VHDs copied to the extents of their LVs' segments, and the lvs/vgs text of them."""

    def __init__(self, directory):
        self.directory = directory
        self.pvs = {}
        self.lvs_lines = []

    def pv(self, name):
        path = os.path.join(self.directory, name)
        if name not in self.pvs:
            with open(path, "wb") as stream:
                stream.truncate(PE_START + 64 * EXTENT)
            self.pvs[name] = path
        return path

    def place(self, lv_name, vhd_path, segments, attr="-wi-------"):
        """segments: [(lv extent, extents, pv name, pv extent)]; the LV is the sum of them."""
        with open(vhd_path, "rb") as stream:
            data = stream.read()
        size = sum(count for _, count, _, _ in segments) * EXTENT
        assert len(data) <= size
        for start, count, pv_name, pv_extent in segments:
            with open(self.pv(pv_name), "r+b") as stream:
                stream.seek(PE_START + pv_extent * EXTENT)
                stream.write(data[start * EXTENT:(start + count) * EXTENT])
            self.lvs_lines.append("  {}|{}|{}|linear|{}|{}|{}({})".format(
                lv_name, attr, size, start, count, self.pv(pv_name), pv_extent))

    def volumes(self):
        vgs = "".join("  {}|{}|{}\n".format(path, EXTENT, PE_START) for path in self.pvs.values())
        return every_volume("\n".join(self.lvs_lines), *lvmread.parse_vgs(vgs))


def test_bitmaps_read_from_real_pv_files(tmp_path):
    lab = PvLab(str(tmp_path))
    small = written_vhd(str(tmp_path / "small.vhd"), 64, [0, 1, 2, 31])
    split = written_vhd(str(tmp_path / "split.vhd"), 100, [49, 0, 7, 8, 15])
    # A 2 TiB VHD: its 4 MiB BAT crosses from the LV's first extent into segments on another PV.
    huge = written_vhd(str(tmp_path / "huge.vhd"), 2 * 1024 * 1024, [0, 1048575, 300000])
    lab.place("VHD-small", small, [(0, 4, "pv0", 3)])
    lab.place("VHD-split", split, [(0, 1, "pv0", 20), (1, 3, "pv0", 10)])
    lab.place("VHD-huge", huge, [(0, 1, "pv0", 30), (1, 1, "pv1", 5), (2, 2, "pv0", 40)])
    volumes = lab.volumes()
    with lvmread.PhysicalVolumes() as physical:
        for name, path, virtual_size in (("VHD-small", small, 64 * MIB), ("VHD-split", split, 100 * MIB),
                                         ("VHD-huge", huge, 2 * 1024 * 1024 * MIB)):
            assert lvmread.read_bitmap(physical, volumes[name], virtual_size) == read_b(path), name


def test_unreadable_lvs_are_one_line_each(tmp_path):
    lab = PvLab(str(tmp_path))
    base = written_vhd(str(tmp_path / "base.vhd"), 64, [5])
    lab.place("VHD-good", base, [(0, 2, "pv0", 0)])
    zeros = str(tmp_path / "zeros")
    with open(zeros, "wb") as stream:
        stream.truncate(EXTENT)
    lab.place("VHD-zeros", zeros, [(0, 1, "pv0", 10)])
    lab.lvs_lines.append("  VHD-gone|-wi-------|8388608|linear|0|2|{}(70)".format(lab.pv("pv0")))
    volumes = lab.volumes()
    volumes["VHD-moved"] = lvmread.LogicalVolume("VHD-moved", False, 8 * MIB)
    volumes["VHD-moved"].segments = [lvmread.Segment(0, 8 * MIB, str(tmp_path / "no-such-pv"), 0)]
    striped = every_volume("  VHD-s|-wi-------|4194304|striped|0|1|/dev/sdb(0)", EXTENT, {"/dev/sdb": 0})
    with lvmread.PhysicalVolumes() as physical:
        assert lvmread.read_bitmap(physical, volumes["VHD-good"], 64 * MIB) == read_b(base)
        cases = [("VHD-zeros", volumes["VHD-zeros"], 64 * MIB, "VHD-zeros (read from its PV extents): footer: "
                  "invalid cookie"),
                 ("VHD-gone", volumes["VHD-gone"], 64 * MIB, "VHD-gone (read from its PV extents): footer cut short: "
                  "0 of 512 bytes"),
                 ("VHD-moved", volumes["VHD-moved"], 64 * MIB, "VHD-moved: reading its PV extents failed: "
                  "No such file or directory"),
                 ("VHD-s", striped["VHD-s"], 64 * MIB, "VHD-s: segment at extent 0 is striped, not linear"),
                 ("resized", volumes["VHD-good"], 128 * MIB, "VHD-good: a 4-byte bitmap where the scan's virtual "
                  "size gives 8 bytes")]
        for name, volume, virtual_size, reason in cases:
            with pytest.raises(vhdmeta.VhdMetadataError) as raised:
                lvmread.read_bitmap(physical, volume, virtual_size)
            assert str(raised.value).startswith(reason), (name, str(raised.value))


# ---- end to end: a simulated host whose LVM keeps inactive LVs in the PV only -----------------

def lvm_candidates(result):
    """{sr uuid: [uuids of leaf-coalesceable VHDs and their parents]} of the LVM SRs."""
    found = {}
    for sr_report in result.srs:
        if sr_report.type in inspection.LVM_SR_TYPES:
            by_uuid = {vdi.uuid: vdi for vdi in sr_report.vdis}
            for vdi in sr_report.vdis:
                if vdi.state in (model.LEAF_COALESCEABLE, model.COALESCEABLE) and vdi.parent_uuid in by_uuid:
                    found.setdefault(sr_report.uuid, set()).update((vdi.uuid, vdi.parent_uuid))
    return found


def figures(result):
    return sorted((vdi.uuid, vdi.state, vdi.reason, vdi.reclaimable_bytes, vdi.merge_bytes, vdi.merge_free_bytes)
                  for sr_report in result.srs for vdi in sr_report.vdis)


def test_inactive_lvs_are_estimated_from_their_pv_extents(sim_host):
    host = sim_host("demo")
    settings = config.load(host.agent_conf)
    counted = vhdutil.VhdUtil(settings)
    active = inspection.inspect(settings, tools=counted, bitmaps=inspection.BitmapCache())
    candidates = lvm_candidates(active)
    assert candidates
    sr_uuid = sorted(candidates)[0]
    volume_group = lvm.VolumeGroup.for_sr(host.state_dir, sr_uuid)
    volume_group.set_held([], lvm.HOLDER_ATTACH)   # as if every VM using the SR ran on another host
    assert not any(volume_group.is_active("VHD-" + uuid) for uuid in candidates[sr_uuid])
    tools = vhdutil.VhdUtil(settings)
    inactive = inspection.inspect(settings, tools=tools, bitmaps=inspection.BitmapCache())
    assert figures(inactive) == figures(active)
    assert not any(vdi.state == model.SCAN_ERROR for sr_report in inactive.srs for vdi in sr_report.vdis)
    assert tools.forked <= counted.forked + 2   # one lvs and one vgs more, no process per VHD


def hidden_images_read(result):
    """[(sr uuid, uuid)] of hidden images on LVM SRs whose bitmaps the estimates read: a hidden
    coalesceable VHD and its parent (a VHD leaf's parent is inflated whatever it holds: not read)."""
    read = []
    for sr_report in result.srs:
        if sr_report.type in inspection.LVM_SR_TYPES:
            by_uuid = {vdi.uuid: vdi for vdi in sr_report.vdis}
            for vdi in sr_report.vdis:
                parent = by_uuid.get(vdi.parent_uuid)
                if vdi.state == model.COALESCEABLE:
                    read += [(sr_report.uuid, image.uuid) for image in (vdi, parent) if image and image.hidden]
    return sorted(set(read))


def test_hidden_lvhd_images_use_sm_vhd_blocks_and_fall_back_when_malformed(sim_host, xapi_session):
    # A chain the GC would shorten on its own (monday, then tuesday, deleted) on an LVM SR, attached here.
    host = sim_host(scenarios.pool("vhd-blocks", [scenarios.sr("iscsi", "lvmoiscsi", 1024)], [scenarios.vm("mail", [
        scenarios.disk("mail-root", "iscsi", 64, expect="leaf_coalesceable", expect_parent="coalesceable", steps=[
            scenarios.write(0, 24), scenarios.snapshot("monday"), scenarios.write(24, 8), scenarios.snapshot("tuesday"),
            scenarios.write(40, 8), scenarios.delete_snapshot("monday"), scenarios.delete_snapshot("tuesday")])])]))
    settings = config.load(host.agent_conf)
    tools = vhdutil.VhdUtil(settings)
    plain = inspection.inspect(settings, tools=tools, bitmaps=inspection.BitmapCache())
    parents = hidden_images_read(plain)
    assert len(parents) == 2
    session = xapi_session(host)
    well_formed = (lambda path: base64.b64encode(zlib.compress(read_b(path))).decode("ascii"), len(parents))
    cut_short = (lambda path: base64.b64encode(zlib.compress(read_b(path)[:-1])).decode("ascii"), 0)
    for value_of, reads_saved in (well_formed, cut_short):
        for sr_uuid, uuid in parents:
            ref = session.xenapi.VDI.get_by_uuid(uuid)
            session.xenapi.VDI.remove_from_sm_config(ref, "vhd-blocks")
            session.xenapi.VDI.add_to_sm_config(ref, "vhd-blocks", value_of(
                os.path.join(settings.storage.lvm_device_dir, lvm.sr_vg_name(sr_uuid), "VHD-" + uuid)))
        counted = vhdutil.VhdUtil(settings)
        result = inspection.inspect(settings, tools=counted, bitmaps=inspection.BitmapCache())
        assert figures(result) == figures(plain)
        assert tools.spawned - counted.spawned == reads_saved
