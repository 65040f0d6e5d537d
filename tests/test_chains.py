"""Verification of a run from the VHD forest of an inspection, never from xapi's `vhd-parent`."""
from xcoalesce_agent import model
from xcoalesce_agent.inspect import chains, vhdtree
from xcoalesce_agent.reclaim import planner, plans
from xcoalesce_agent.model import Inspection, SrReport, VdiReport
from xcoalesce_agent.reclaim.plans import PlanEntry
from xcoalesce_agent.inspect.vhdtree import ScanRecord, VdiFacts

MIB = 1024 * 1024
SR = "22222222-0000-0000-0000-000000000001"
VM = "11111111-0000-0000-0000-000000000001"


def inspection_of(records, facts):
    """The inspection of one SR as inspection.py builds it from a scan (sizes as merge estimates)."""
    nodes = vhdtree.build_forest(records)
    states = vhdtree.classify(nodes, facts, vhdtree.Policy())
    vdis = [VdiReport(uuid=uuid, name=uuid, vm_uuid=facts[uuid].vm_uuid if uuid in facts else "", vm_name="",
                      chain_length=node.chain_length, state=states[uuid][0], reason=states[uuid][1],
                      reclaimable_bytes=node.record.size if states[uuid][0] == model.LEAF_COALESCEABLE else 0,
                      merge_bytes=node.record.size, merge_free_bytes=0, physical_bytes=node.record.size,
                      virtual_size_bytes=node.record.virtual_size, parent_uuid=node.record.parent_uuid,
                      hidden=node.record.hidden)
            for uuid, node in sorted(nodes.items())]
    return Inspection(srs=[SrReport(uuid=SR, name="sr", type="ext", shared=False, size_bytes=10 ** 10,
                                    free_bytes=10 ** 10, reclaimable_bytes=0, gc_pending_bytes=0, merge_free_bytes=0,
                                    longest_chain=3, gc_running=False, gc_running_seconds=0, skipped_vdis=0,
                                    errors=[], vdis=vdis)])


def image(uuid, parent="", hidden=False, size=8 * MIB):
    return ScanRecord(uuid, 64 * MIB, size, hidden, parent)


FACTS = {"leaf": VdiFacts("leaf", vm_uuid=VM), "snap": VdiFacts("snap", is_snapshot=True, vm_uuid=VM)}


def test_a_leaf_coalesce_under_a_grandparent_is_judged_from_the_scan_not_from_a_stale_vhd_parent():
    #   base* ─┬─ parent* ── leaf      leaf coalesce      base* ─┬─ leaf (the parent, renamed)
    #          └─ snap                 ─────────────>            └─ snap
    before = inspection_of([image("base", hidden=True), image("parent", "base", hidden=True),
                            image("leaf", "parent"), image("snap", "base")], FACTS)
    host = planner.HostFacts(
        vms={VM: {"uuid": VM, "power_state": "Halted", "other_config": {}, "tags": []}},
        vdis={uuid: {"uuid": uuid, "other_config": {}, "on_boot": "persist", "allow_caching": False,
                     "current_operations": {}, "is_a_snapshot": uuid == "snap",
                     "sm_config": {"vhd-parent": "parent"}} for uuid in ("leaf", "snap")},
        speeds={SR: {"sm": 100.0 * MIB}})
    (entry,) = planner.plan(before, host, planner.Policy())
    assert (entry.vdi_uuid, entry.parent_uuid, entry.chain_length) == ("leaf", "parent", 3)
    assert not chains.shortened(before, entry) and not chains.merged(before, entry)

    after = inspection_of([image("base", hidden=True), image("leaf", "base", size=16 * MIB),
                           image("snap", "base")], FACTS)
    # xapi still names the old parent until the next SR.scan: nothing here reads it
    assert host.vdis["leaf"]["sm_config"]["vhd-parent"] == "parent"
    assert chains.shortened(after, entry) and chains.merged(after, entry)


def test_a_chain_the_gc_shortened_above_a_leaf_still_leaf_coalesceable_is_not_merged():
    before = inspection_of([image("base", hidden=True), image("mid", "base", hidden=True),
                            image("leaf", "mid")], FACTS)
    (report,) = [vdi for vdi in before.srs[0].vdis if vdi.uuid == "leaf"]
    entry = PlanEntry(vm_uuid=VM, vm_name="", vm_power_state="Halted", vdi_uuid="leaf", vdi_name="leaf", format="vhd",
                      sr_uuid=SR, sr_type="ext", chain_length=report.chain_length, parent_uuid="mid",
                      estimated_bytes=report.reclaimable_bytes, merge_bytes=report.merge_bytes, merge_free_bytes=0,
                      result=plans.PLANNED, strategy=plans.GC)
    after = inspection_of([image("base", hidden=True), image("leaf", "base")], FACTS)
    assert chains.shortened(after, entry) and not chains.merged(after, entry)
