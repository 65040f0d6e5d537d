"""Eligibility, pre-flight reasons, strategy choice and caps, on plain data."""
from xcoalesce_agent import model
from xcoalesce_agent.reclaim import planner
from xcoalesce_agent.model import Inspection, SrReport, VdiReport

MIB = 1024 * 1024
VM = "11111111-0000-0000-0000-000000000001"
VM2 = "11111111-0000-0000-0000-000000000002"
SR_FILE = "22222222-0000-0000-0000-000000000001"
SR_LVM = "22222222-0000-0000-0000-000000000002"


def vdi(uuid, vm=VM, merge=100 * MIB, reclaim=80 * MIB, state=model.LEAF_COALESCEABLE, free_needed=10 * MIB):
    return VdiReport(uuid=uuid, name=uuid, vm_uuid=vm, vm_name="vm", chain_length=2, state=state, reason="",
                     reclaimable_bytes=reclaim, merge_bytes=merge, merge_free_bytes=free_needed,
                     physical_bytes=merge, virtual_size_bytes=1024 * MIB, parent_uuid="p-" + uuid, hidden=False)


def sr(uuid, vdis, sr_type="ext", free=10 * 1024 * MIB, gc_running=False):
    return SrReport(uuid=uuid, name=uuid, type=sr_type, shared=False, size_bytes=20 * 1024 * MIB, free_bytes=free,
                    reclaimable_bytes=0, gc_pending_bytes=0, merge_free_bytes=0, longest_chain=2,
                    gc_running=gc_running, gc_running_seconds=30 if gc_running else 0, skipped_vdis=0, errors=[],
                    vdis=vdis)


def vm_record(power_state="Running", **extra):
    record = {"uuid": VM, "power_state": power_state, "tags": [], "other_config": {}, "ha_restart_priority": "",
              "current_operations": {}, "blocked_operations": {}, "is_control_domain": False}
    record.update(extra)
    return record


def vdi_record(**extra):
    record = {"other_config": {}, "on_boot": "persist", "allow_caching": False, "current_operations": {}}
    record.update(extra)
    return record


def facts(vdis, vm=None, sm_speed=100 * MIB, srs=None, load=0.0, own=None):
    speeds = {SR_FILE: dict(sm=sm_speed, **(own or {})), SR_LVM: dict(sm=sm_speed, **(own or {}))}
    return planner.HostFacts(vms={VM: vm or vm_record(), VM2: vm_record()},
                             vdis={report.uuid: vdi_record() for report in vdis},
                             srs=srs or {}, speeds=speeds, load_per_cpu=load)


def plan_one(report, sr_type="ext", policy=None, host=None, sr_kwargs=None):
    sr_uuid = SR_LVM if sr_type.startswith("lv") else SR_FILE
    inspection = Inspection(srs=[sr(sr_uuid, [report], sr_type=sr_type, **(sr_kwargs or {}))])
    (entry,) = planner.plan(inspection, host or facts([report]), policy or planner.Policy())
    return entry


def test_small_leaf_goes_to_the_gc():
    entry = plan_one(vdi("a", merge=50 * MIB))
    assert (entry.result, entry.strategy, entry.fallbacks) == ("planned", "gc", ["live"])
    assert entry.predicted_freeze_seconds == 0.5
    assert entry.estimated_bytes == 80 * MIB


SNAPSHOT_COALESCE_FREEZE = (planner.SNAPSHOT_COALESCE_ROUNDS * planner.SNAPSHOT_ROUND_PAUSE_SECONDS
                            + planner.SM_LIVE_FREEZE_SECONDS)


def test_large_leaf_goes_to_the_gc_with_snapshot_coalesce_pauses():
    entry = plan_one(vdi("a", merge=800 * MIB))
    assert (entry.strategy, entry.predicted_freeze_seconds, entry.fallbacks) == (
        "gc", SNAPSHOT_COALESCE_FREEZE, ["live"])
    assert SNAPSHOT_COALESCE_FREEZE == 6.0
    entry = plan_one(vdi("a", merge=800 * MIB), policy=planner.Policy(max_freeze_seconds=5.5))
    assert entry.result == "skipped"
    assert entry.reason == "predicted freeze 6.0 s (gc) over the maximum 5.5 s"


def test_large_leaf_goes_live_then_skipped_over_the_maximum():
    live = planner.Policy(strategies=["live"])
    entry = plan_one(vdi("a", merge=800 * MIB), policy=live)
    assert (entry.strategy, entry.predicted_freeze_seconds) == ("live", 8.0)
    entry = plan_one(vdi("a", merge=1600 * MIB), policy=live)
    assert entry.result == "skipped"
    assert entry.reason == "predicted freeze 16.0 s (live) over the maximum 10 s"
    entry = plan_one(vdi("a", merge=1600 * MIB), policy=planner.Policy(strategies=["live"], max_freeze_seconds=20))
    assert (entry.result, entry.strategy) == ("planned", "live")


def test_sm_live_decision_at_the_boundary():
    speed = 100.0 * MIB
    assert not planner.sm_merges_live(500 * MIB, speed)          # exactly 5 s is not live
    assert planner.sm_merges_live(500 * MIB - 1, speed)
    assert not planner.sm_merges_live(600 * MIB - 1, speed)      # 5.99 s: integer division gives 5
    assert planner.sm_merges_live(1, 0.2)                         # 1 // 0.2 == 4.0 where 1 / 0.2 == 5.0
    assert planner.sm_merges_live(20 * MIB - 1, None) and not planner.sm_merges_live(20 * MIB, None)
    assert not planner.sm_merges_live(20 * MIB, 0.0)              # a zero speed is no speed
    assert planner.sm_merges_live(10 ** 12, speed, forced=True)
    at_limit = plan_one(vdi("a", merge=500 * MIB))
    assert (at_limit.strategy, at_limit.predicted_freeze_seconds) == ("gc", SNAPSHOT_COALESCE_FREEZE)
    below = plan_one(vdi("a", merge=500 * MIB - 2 * MIB))
    assert (below.strategy, below.predicted_freeze_seconds) == ("gc", 4.98)


def test_forced_leaf_is_merged_live_by_the_gc_without_snapshot_coalesce():
    report = vdi("a", merge=800 * MIB)
    host = facts([report])
    host.vdis["a"]["other_config"]["leaf-coalesce"] = "force"
    entry = plan_one(report, host=host)
    assert (entry.strategy, entry.predicted_freeze_seconds) == ("gc", 8.0)
    host = facts([report], sm_speed=None)
    host.vdis["a"]["other_config"]["leaf-coalesce"] = "force"
    entry = plan_one(report, host=host, policy=planner.Policy(strategies=["gc"]))
    assert entry.result == "skipped" and "forced (leaf-coalesce=force) with no measured" in entry.reason


def snapshot_facts(reports, vm=None):
    host = facts(reports, vm=vm)
    for report in reports:
        host.vdis[report.uuid]["is_a_snapshot"] = True
    return host


def test_snapshot_leaf_is_merged_by_the_gc_without_freezing_its_vm():
    report = vdi("s", merge=800 * MIB)
    entry = plan_one(report, host=snapshot_facts([report]))
    assert (entry.result, entry.strategy, entry.predicted_freeze_seconds) == ("planned", "gc", 0.0)
    assert (entry.vm_uuid, entry.vm_power_state) == (VM, "")
    orphan = vdi("s", vm="")
    entry = plan_one(orphan, host=snapshot_facts([orphan]))
    assert (entry.result, entry.strategy, entry.predicted_freeze_seconds) == ("planned", "gc", 0.0)
    entry = plan_one(report, host=snapshot_facts([report], vm=vm_record("Paused", ha_restart_priority="restart")))
    assert entry.result == "planned"  # the state of its VM does not matter: the merge does not touch it


def test_snapshot_leaf_follows_the_exclusions_of_its_vm():
    report = vdi("s")
    entry = plan_one(report, host=snapshot_facts([report]), policy=planner.Policy(exclude_vms=[VM]))
    assert (entry.result, entry.reason) == ("skipped", "VM excluded by exclude_vms")
    entry = plan_one(report, host=snapshot_facts([report], vm=vm_record(tags=["xcoalesce-exclude"])))
    assert (entry.result, entry.reason) == ("skipped", "VM excluded by tag xcoalesce-exclude")


def test_the_plugin_leaves_snapshots_out():
    disk, snap = vdi("a", merge=100 * MIB), vdi("s", merge=300 * MIB)
    host = facts([disk, snap])
    host.vdis["s"].update(is_a_snapshot=True, other_config={"leaf-coalesce": "false"})
    inspection = Inspection(srs=[sr(SR_LVM, [disk, snap], sr_type="lvm")])
    entries = planner.plan(inspection, host, planner.Policy(strategies=["plugin"]))
    by_vdi = {entry.vdi_uuid: entry for entry in entries}
    assert (by_vdi["a"].strategy, by_vdi["a"].predicted_freeze_seconds) == (
        "plugin", 1.0 + planner.SUSPEND_RESUME_SECONDS)
    host.vdis["s"]["other_config"] = {}
    entries = planner.plan(inspection, host, planner.Policy(strategies=["plugin"]))
    by_vdi = {entry.vdi_uuid: entry for entry in entries}
    assert by_vdi["s"].reason == "a snapshot VDI: the coalesce-leaf plugin merges only the disks its VM uses"


def test_halted_vm_has_no_freeze():
    host = facts([vdi("a")], vm=vm_record("Halted"))
    entry = plan_one(vdi("a", merge=5000 * MIB), host=host)
    assert (entry.result, entry.strategy, entry.predicted_freeze_seconds) == ("planned", "gc", 0.0)


def test_plugin_only_on_lvm_with_suspend_overhead():
    policy = planner.Policy(strategies=["plugin"])
    entry = plan_one(vdi("a", merge=300 * MIB), sr_type="lvm", policy=policy)
    assert (entry.strategy, entry.predicted_freeze_seconds) == ("plugin", 3.0 + planner.SUSPEND_RESUME_SECONDS)
    entry = plan_one(vdi("a"), sr_type="ext", policy=policy)
    assert entry.reason == "the coalesce-leaf plugin only works on LVM SRs"


def test_plugin_refused_when_it_would_merge_an_excluded_vdi():
    first, second = vdi("a"), vdi("b")
    host = facts([first, second])
    host.vdis["b"]["other_config"]["leaf-coalesce"] = "false"
    inspection = Inspection(srs=[sr(SR_LVM, [first, second], sr_type="lvmoiscsi")])
    entries = planner.plan(inspection, host, planner.Policy(strategies=["plugin"]))
    by_vdi = {entry.vdi_uuid: entry for entry in entries}
    assert "would also merge VDI b" in by_vdi["a"].reason
    assert by_vdi["b"].reason.startswith("leaf coalesce switched off on the VDI")


def test_own_measured_speed_wins_over_the_speed_log():
    host = facts([vdi("a")], own={"live": 50 * MIB})
    entry = plan_one(vdi("a", merge=400 * MIB), host=host, policy=planner.Policy(strategies=["live"]))
    assert (entry.strategy, entry.predicted_freeze_seconds) == ("live", 8.0)


def test_no_speed_known():
    host = facts([vdi("a")], sm_speed=None)
    entry = plan_one(vdi("a", merge=10 * MIB), host=host)
    assert (entry.strategy, entry.predicted_freeze_seconds) == ("gc", planner.SM_LIVE_FREEZE_SECONDS)
    entry = plan_one(vdi("a", merge=100 * MIB), host=host)  # snapshot-coalesced down to under 20 MiB first
    assert (entry.strategy, entry.predicted_freeze_seconds) == ("gc", SNAPSHOT_COALESCE_FREEZE)
    entry = plan_one(vdi("a", merge=100 * MIB), host=host, policy=planner.Policy(strategies=["live"]))
    assert entry.result == "skipped"
    assert "no measured merge speed" in entry.reason


def check_reason(expected, report=None, vm=None, vdi_extra=None, policy=None, sr_kwargs=None, srs=None, load=0.0):
    report = report or vdi("a")
    host = facts([report], vm=vm, srs=srs, load=load)
    host.vdis["a"].update(vdi_extra or {})
    entry = plan_one(report, policy=policy, host=host, sr_kwargs=sr_kwargs)
    assert entry.result == "skipped"
    assert expected in entry.reason


def test_preflight_reasons():
    check_reason("garbage collector is busy", sr_kwargs={"gc_running": True})
    check_reason("not enough free space", report=vdi("a", free_needed=2 * 1024 * MIB), sr_kwargs={"free": MIB})
    check_reason("VM busy with clean_shutdown", vm=vm_record(current_operations={"t": "clean_shutdown"}))
    check_reason("VM is Paused", vm=vm_record("Paused"))
    check_reason("HA-protected", vm=vm_record(ha_restart_priority="restart"))
    check_reason("VM excluded by tag", vm=vm_record(tags=["xcoalesce-exclude"]))
    check_reason("VM excluded by other-config", vm=vm_record(other_config={"xcoalesce-exclude": "true"}))
    check_reason("VM excluded by exclude_vms", policy=planner.Policy(exclude_vms=[VM]))
    check_reason("VDI excluded by exclude_vdis", policy=planner.Policy(exclude_vdis=["a"]))
    check_reason("on-boot=reset", vdi_extra={"on_boot": "reset"})
    check_reason("allow-caching", vdi_extra={"allow_caching": True})
    check_reason("switched off on the SR", srs={SR_FILE: {"other_config": {"leaf-coalesce": "false"}}})
    check_reason("other-config:gc=false", srs={SR_FILE: {"other_config": {"gc": "false"}}})
    check_reason("Dom0 load 3.00 per CPU above the limit 2", policy=planner.Policy(max_load_per_cpu=2), load=3.0)
    check_reason("excluded by policy", report=vdi("a", state=model.EXCLUDED))


def test_ha_protected_allowed_when_configured():
    host = facts([vdi("a")], vm=vm_record(ha_restart_priority="restart"))
    entry = plan_one(vdi("a"), host=host, policy=planner.Policy(allow_ha_protected=True))
    assert entry.result == "planned"


def test_filters_and_order():
    inspection = Inspection(srs=[
        sr(SR_FILE, [vdi("small", reclaim=1 * MIB), vdi("big", vm=VM2, reclaim=9 * MIB)]),
        sr(SR_LVM, [vdi("lvm", reclaim=5 * MIB), vdi("leaf", state=model.LEAF)], sr_type="lvm"),
    ])
    host = facts([vdi("small"), vdi("big"), vdi("lvm")])
    entries = planner.plan(inspection, host, planner.Policy())
    assert [entry.vdi_uuid for entry in entries] == ["big", "lvm", "small"]
    assert [e.vdi_uuid for e in planner.plan(inspection, host, planner.Policy(), srs=[SR_LVM])] == ["lvm"]
    assert [e.vdi_uuid for e in planner.plan(inspection, host, planner.Policy(), vms=[VM2])] == ["big"]


def test_caps_per_window():
    inspection = Inspection(srs=[sr(SR_FILE, [vdi("a", reclaim=50), vdi("b", vm=VM2, reclaim=40),
                                              vdi("c", reclaim=30)])])
    host = facts([vdi("a"), vdi("b"), vdi("c")])
    entries = planner.apply_caps(planner.plan(inspection, host, planner.Policy()), 1, None)
    assert [(e.vdi_uuid, e.result) for e in entries] == [("a", "planned"), ("b", "skipped"), ("c", "planned")]
    entries = planner.apply_caps(planner.plan(inspection, host, planner.Policy()), None, 85)
    assert [e.result for e in entries] == ["planned", "skipped", "planned"]
    assert entries[1].reason == "the cap of bytes per window is reached"


def test_policy_from_config_and_override():
    from xcoalesce_agent import config
    coalesce = config.defaults().coalesce
    policy = planner.Policy.from_config(coalesce, max_freeze_seconds=3)
    assert policy.max_freeze_seconds == 3
    assert policy.strategies == ("gc", "live", "plugin")
    assert policy.without("gc").strategies == ("live", "plugin")


def test_parse_speed_log_reads_as_sm_does():
    assert planner.parse_speed_log("100\n300\n") == 200.0
    assert planner.parse_speed_log("100\n300") == 200.0                  # no final newline
    assert planner.parse_speed_log("100\r\n300\r\n") == 200.0
    assert planner.parse_speed_log(" 100 \n\t300\n") == 200.0           # float() strips blanks
    assert planner.parse_speed_log("\n".join(["1"] * 5 + ["10"] * 10)) == 7.0   # every line, as SM
    assert planner.parse_speed_log("") is None
    assert planner.parse_speed_log("\n") is None
    assert planner.parse_speed_log("100\n\n300\n") is None              # a blank line: no speed at all
    assert planner.parse_speed_log("100\n300\n\n") is None
    assert planner.parse_speed_log("100\n \n300\n") is None
    assert planner.parse_speed_log("100\nfast\n") is None
    assert planner.parse_speed_log("-5\n5\n") is None                    # a mean not above zero
    assert planner.parse_speed_log("nan\n") is None and planner.parse_speed_log("inf\n") is None
