"""The pure core: `vhd-util scan` lines → records → forest → a state and a reason per VHD."""
import gc
import os

import pytest

from xcoalesce_agent import model
from xcoalesce_agent.inspect import vhdtree
from xcoalesce_agent.inspect.vhdtree import Policy, ScanRecord, VdiFacts

TRANSCRIPTS = "/work/shared/reference/vhd-util-transcripts"


def transcript_output(name, command):
    """stdout of `command` in a vhd-util transcript (the lines up to `[exit`, `[stderr:]` or `[note`)."""
    path = os.path.join(TRANSCRIPTS, name)
    if not os.path.exists(path):
        pytest.skip("reference transcripts not available")
    with open(path) as handle:
        lines = handle.read().splitlines()
    start = lines.index("$ " + command) + 1
    output = []
    for line in lines[start:]:
        if line.startswith("[exit") or line.startswith("[stderr:]") or line.startswith("[note"):
            break
        output.append(line)
    return "\n".join(output) + "\n"


def test_file_scan_with_errors_from_the_real_tool():
    scan = vhdtree.parse_scan(transcript_output("4-scan-errors.txt", "vhd-util scan -f -c -m '/srv/lab/sr-err/*.vhd'"),
                              lvm=False)
    by_uuid = {record.uuid: record for record in scan.records}
    assert sorted(by_uuid) == ["child", "empty", "garbage", "orphan", "p", "trunc"]
    assert by_uuid["empty"].error == "scan error -32: opening file"
    assert by_uuid["garbage"].error == "scan error -22: opening file"
    assert by_uuid["child"].parent_uuid == "p" and by_uuid["child"].size == 5120
    assert by_uuid["child"].virtual_size == 8388608 and not by_uuid["child"].hidden
    assert by_uuid["orphan"].parent_uuid == "gone"
    assert scan.errors == []


def test_phantom_slot_is_not_an_image():
    text = transcript_output("4-scan-errors.txt",
                             "vhd-util scan -f -c /srv/lab/sr-err/doesnotexist.vhd /srv/lab/sr-err/p.vhd")
    assert "vhd=. capacity=0" in text
    scan = vhdtree.parse_scan(text, lvm=False)
    assert [(record.uuid, bool(record.error)) for record in scan.records] == [("doesnotexist", True), ("p", False)]


def test_lvm_scan_from_the_real_tool():
    sr = "0a1b2c3d-1111-4222-8333-444455556666"
    for flags in ("-f -c", "-f -c -M"):
        text = transcript_output("6-lvm-sim.txt",
                                 "vhd-util scan {} -l VG_XenStorage-{} -m 'VHD-*'".format(flags, sr))
        scan = vhdtree.parse_scan(text, lvm=True)
        by_uuid = {record.uuid: record for record in scan.records}
        assert by_uuid["striped"].error == "scan error -38: failure scanning target"
        base = by_uuid["b0000000-0000-4000-8000-00000000000b"]
        assert base.hidden and base.parent_uuid == "" and base.size == 8388608
        leaf = by_uuid["1eaf0000-0000-4000-8000-00000000001f"]
        assert leaf.parent_uuid == base.uuid and not leaf.hidden
        assert by_uuid["0f000000-0000-4000-8000-0000000000ff"].parent_uuid == "gone"
        assert len(scan.records) == 4


@pytest.mark.parametrize("transcript, command, lvm", [
    ("4-scan-errors.txt", "vhd-util scan -f -c -m '/srv/lab/sr-err/*.vhd'", False),
    ("6-lvm-sim.txt", "vhd-util scan -f -c -l VG_XenStorage-0a1b2c3d-1111-4222-8333-444455556666 -m 'VHD-*'", True),
])
def test_plain_lines_read_in_one_pass_as_one_at_a_time(transcript, command, lvm):
    """A scan of plain image lines only is read by one findall; one unusual line sends the whole scan
    the careful way, line by line: both give the same records."""
    plain = "".join(line + "\n" for line in transcript_output(transcript, command).splitlines()
                    if "scan-error" not in line)
    phantom = "vhd=. capacity=0 size=0 hidden=0 parent=none\n"
    fast, careful = vhdtree.parse_scan(plain, lvm), vhdtree.parse_scan(plain + phantom, lvm)
    fields = ("uuid", "virtual_size", "size", "hidden", "parent_uuid", "error")
    assert [[getattr(record, field) for field in fields] for record in fast.records] == [
        [getattr(record, field) for field in fields] for record in careful.records]
    assert len(fast.records) >= 2 and any(record.parent_uuid for record in fast.records)


def test_lvm_scan_keeps_non_vhd_lvs_as_sr_errors():
    text = "vhd=MGT scan-error=-22 error-message='invalid footer'\nvhd=sr scan-error=2\n"
    scan = vhdtree.parse_scan(text, lvm=True)
    assert scan.records == []
    assert scan.errors == ["MGT: scan error -22: invalid footer", "sr: scan error 2"]


@pytest.mark.parametrize("text", [
    "Segmentation fault\n",
    "vhd=a.vhd capacity=lots size=1 hidden=0 parent=none\n",
    "vhd=a.vhd capacity=1 size=1 hidden=0 parent=none\n\x00\x01garbage\n",
    "vhd=a.raw capacity=1 size=1 hidden=0 parent=none\n",
    "vhd=a.vhd capacity=1 size=1 hidden=0\n",
])
def test_garbage_output_is_rejected_whole(text):
    with pytest.raises(vhdtree.ScanOutputError) as caught:
        vhdtree.parse_scan(text, lvm=False)
    assert "line" in str(caught.value) and "\n" not in str(caught.value)


def test_bitmap_length_covers_whole_blocks():
    assert vhdtree.bitmap_length(64 << 20) == 4
    assert vhdtree.bitmap_length(100 << 20) == 7
    assert vhdtree.bitmap_length(67125248) == 4


def image(uuid, parent="", hidden=False, size=1 << 20, error=""):
    return ScanRecord(uuid, 64 << 20, size, hidden, parent, error)


# Every state in one SR:
#   base* ─┬─ app (VM app)            snapshot_present
#          └─ snap (snapshot VDI)     snapshot
#   old* ── web (VM web)              web leaf_coalesceable, old hidden_parent
#   g1* ── g2* ── g3 (VM db)          g2 coalesceable, g3 leaf_coalesceable
#   junk1* ── junk2*                  garbage
#   lost ──> gone (missing)           orphan
#   alone                             leaf
#   broken                            scan_error
#   tmp* ── reset (on_boot=reset)     excluded
RECORDS = [
    image("base", hidden=True), image("app", "base"), image("snap", "base"),
    image("old", hidden=True), image("web", "old"),
    image("g1", hidden=True), image("g2", "g1", hidden=True), image("g3", "g2"),
    image("junk1", hidden=True), image("junk2", "junk1", hidden=True),
    image("lost", "gone"), image("alone"), image("broken", error="scan error -22: invalid footer"),
    image("tmp", hidden=True), image("reset", "tmp"),
]
FACTS = {
    "app": VdiFacts("app", vm_uuid="vm-app"), "snap": VdiFacts("snap", is_snapshot=True),
    "web": VdiFacts("web", vm_uuid="vm-web"), "g3": VdiFacts("g3", vm_uuid="vm-db"),
    "lost": VdiFacts("lost"), "alone": VdiFacts("alone"), "reset": VdiFacts("reset", on_boot="reset"),
}
EXPECTED = {
    "base": model.HIDDEN_PARENT, "app": model.SNAPSHOT_PRESENT, "snap": model.SNAPSHOT,
    "old": model.HIDDEN_PARENT, "web": model.LEAF_COALESCEABLE,
    "g1": model.HIDDEN_PARENT, "g2": model.COALESCEABLE, "g3": model.LEAF_COALESCEABLE,
    "junk1": model.GARBAGE, "junk2": model.GARBAGE, "lost": model.ORPHAN, "alone": model.LEAF,
    "broken": model.SCAN_ERROR, "tmp": model.HIDDEN_PARENT, "reset": model.EXCLUDED,
}


def classified(records=RECORDS, facts=FACTS, policy=None):
    nodes = vhdtree.build_forest(records)
    return nodes, vhdtree.classify(nodes, facts, policy or Policy())


def test_every_state_with_its_reason():
    nodes, states = classified()
    assert {uuid: state for uuid, (state, _) in states.items()} == EXPECTED
    assert set(EXPECTED.values()) == set(model.STATES) - {model.NOT_COW}
    for uuid, (state, reason) in states.items():
        assert bool(reason) == (state != model.LEAF_COALESCEABLE), uuid
    assert "gone" in states["lost"][1]
    assert "on-boot=reset" in states["reset"][1]
    assert "invalid footer" in states["broken"][1]
    assert "shared with 1 other VHD (snapshots)" in states["app"][1]


def test_chain_lengths():
    nodes, _ = classified()
    lengths = {uuid: node.chain_length for uuid, node in nodes.items()}
    assert lengths["g3"] == 3 and lengths["g2"] == 2 and lengths["g1"] == 1
    assert lengths["web"] == 2 and lengths["alone"] == 1 and lengths["lost"] == 1


def test_an_unlinked_forest_is_freed_without_the_cyclic_collector():
    def live_nodes():
        return sum(1 for item in gc.get_objects() if isinstance(item, vhdtree.Node))

    gc.collect()
    before = live_nodes()
    gc.disable()
    try:
        nodes, _ = classified()
        assert live_nodes() == before + len(RECORDS)
        vhdtree.unlink(nodes)
        del nodes
        assert live_nodes() == before
    finally:
        gc.enable()


def test_long_chain_and_loop():
    chain = [image("n0", hidden=True)] + [image("n{}".format(i), "n{}".format(i - 1), hidden=True)
                                          for i in range(1, 34)] + [image("top", "n33")]
    nodes, states = classified(chain, {"top": VdiFacts("top")})
    assert nodes["top"].chain_length == 35 > model.MAX_CHAIN_LENGTH
    assert states["top"][0] == model.LEAF_COALESCEABLE
    assert states["n5"][0] == model.COALESCEABLE
    nodes, states = classified([image("a", "b"), image("b", "a")], {})
    assert states["a"][0] == states["b"][0] == model.SCAN_ERROR


def test_snapshot_siblings_that_are_garbage_are_named():
    records = [image("p", hidden=True), image("leaf", "p"), image("dead", "p", hidden=True)]
    _, states = classified(records, {"leaf": VdiFacts("leaf")})
    assert states["leaf"][0] == model.SNAPSHOT_PRESENT
    assert "garbage" in states["leaf"][1]
    assert states["dead"][0] == model.GARBAGE


def test_leaf_unknown_to_xapi_is_excluded():
    _, states = classified([image("p", hidden=True), image("leaf", "p")], {})
    assert states["leaf"] == (model.EXCLUDED, "xapi has no VDI for it (deleted during the inspection?)")


@pytest.mark.parametrize("policy, facts, words", [
    (Policy({"leaf-coalesce": "false"}), VdiFacts("web"), "disabled on the SR"),
    (Policy({"gc": "false"}), VdiFacts("web"), "GC is disabled"),
    (Policy(), VdiFacts("web", leaf_coalesce="false"), "disabled on the VDI"),
    (Policy(), VdiFacts("web", allow_caching=True), "IntelliCache"),
    (Policy(exclude_vdis=["web"]), VdiFacts("web"), "exclude_vdis"),
    (Policy(exclude_vms=["vm-web"]), VdiFacts("web", vm_uuid="vm-web"), "exclude_vms"),
    (Policy(exclude_tag="keep"), VdiFacts("web", vm_tags=("keep",)), "tagged keep"),
])
def test_exclusions(policy, facts, words):
    _, states = classified([image("old", hidden=True), image("web", "old")], {"web": facts}, policy)
    state, reason = states["web"]
    assert state == model.EXCLUDED and words in reason


def test_leaf_coalesce_force_is_not_an_exclusion():
    _, states = classified([image("old", hidden=True), image("web", "old")],
                           {"web": VdiFacts("web", leaf_coalesce="force")})
    assert states["web"][0] == model.LEAF_COALESCEABLE


def test_a_snapshot_alone_under_its_parent_is_leaf_coalesced_as_sm_does():
    records = [image("base", hidden=True), image("snap", "base")]
    orphaned = {"snap": VdiFacts("snap", is_snapshot=True)}
    assert classified(records, orphaned)[1]["snap"] == (model.LEAF_COALESCEABLE, "")
    of_vm = {"snap": VdiFacts("snap", is_snapshot=True, vm_uuid="vm-web", vm_tags=("keep",))}
    assert classified(records, of_vm)[1]["snap"] == (model.LEAF_COALESCEABLE, "")
    state, reason = classified(records, of_vm, Policy(exclude_vms=["vm-web"]))[1]["snap"]
    assert (state, reason) == (model.EXCLUDED, "its VM is in [coalesce] exclude_vms")
    assert classified(records, of_vm, Policy(exclude_tag="keep"))[1]["snap"][0] == model.EXCLUDED


def test_a_snapshot_sharing_its_parent_or_without_one_stays():
    records = [image("base", hidden=True), image("snap", "base"), image("dead", "base", hidden=True),
               image("root-snap")]
    facts = {"snap": VdiFacts("snap", is_snapshot=True), "root-snap": VdiFacts("root-snap", is_snapshot=True)}
    _, states = classified(records, facts)
    assert states["snap"] == (model.SNAPSHOT, "its parent still has 1 garbage child; the GC deletes it first")
    assert states["root-snap"] == (model.SNAPSHOT, "a snapshot with no parent: nothing to merge")
