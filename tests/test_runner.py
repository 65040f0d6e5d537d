"""`--now` against the simulated host, through the real XenAPI client: plans, runs, measurements."""
import os
import subprocess

from tests.dom0sim import scenarios as sc, vhdfile
from tests.runner_support import (KEEP_SNAPSHOT, agent_command, chain_parent, configure, digests, downtime, files,
                                  other_configs, power_states, run_now, small_scenario, sr_free, REPOSITORY)
from xcoalesce_agent import config as config_module
from xcoalesce_agent.reclaim import history, repair, scheduled, snapshot_trigger

SM_GENERATIONS = ("3.2", "4.1")


def runs_by_disk(host, document):
    by_uuid = {run["vdi_uuid"]: run for run in document["runs"]}
    return {key: by_uuid[uuid] for key, uuid in host.vdis.items() if uuid in by_uuid}


def test_dry_run_prints_the_plan_and_changes_nothing(demo_host):
    contents, flags, states = files(demo_host), other_configs(demo_host), power_states(demo_host)
    code, document, stderr = run_now(demo_host, "--dry-run")
    assert code == 0, stderr
    runs = runs_by_disk(demo_host, document)
    assert set(runs) == {"web-01-root", "db-01-data", "mail-01-root"}
    assert all(run["result"] == "planned" and run["strategy"] == "gc" for run in runs.values())
    assert runs["web-01-root"]["estimated_bytes"] > 0 and runs["web-01-root"]["predicted_freeze_seconds"] > 0
    assert document["dry_run"] and document["reclaimed_bytes"] == 0
    text = subprocess.Popen(agent_command(demo_host, "--now", "--dry-run"), cwd=REPOSITORY, stdout=subprocess.PIPE,
                            universal_newlines=True).communicate()[0]
    assert "Would leaf-coalesce 3 VDI(s)" in text and "web-01" in text
    assert (files(demo_host), other_configs(demo_host), power_states(demo_host)) == (contents, flags, states)
    assert all(chain_parent(demo_host, key) for key in ("web-01-root", "db-01-data"))
    assert not os.path.exists(os.path.join(demo_host.state_dir, "agent-state", history.RUNS_FILE))


def test_now_reclaims_the_estimate_on_file_and_lvm_srs(demo_host):
    contents, flags, states = digests(demo_host), other_configs(demo_host), power_states(demo_host)
    free_before = {key: sr_free(demo_host, key) for key in demo_host.srs}
    code, document, stderr = run_now(demo_host)
    assert code == 0, stderr
    runs = runs_by_disk(demo_host, document)
    assert all(run["result"] == "success" for run in runs.values()), runs
    for key in ("web-01-root", "db-01-data"):  # ext and lvmoiscsi
        assert runs[key]["reclaimed_bytes"] == runs[key]["estimated_bytes"] > 0
        assert chain_parent(demo_host, key) == ""
    assert chain_parent(demo_host, "mail-01-root") == ""
    assert chain_parent(demo_host, "build-01-root") != ""  # a snapshot still holds its base
    for key, sr_uuid in demo_host.srs.items():
        freed = sum(run["reclaimed_bytes"] for run in document["runs"] if run["sr_uuid"] == sr_uuid)
        assert sr_free(demo_host, key) - free_before[key] == freed
    assert document["reclaimed_bytes"] == sum(run["reclaimed_bytes"] for run in document["runs"])
    assert digests(demo_host) == contents
    assert other_configs(demo_host) == flags and power_states(demo_host) == states
    for run in runs.values():
        assert run["frozen_seconds"] is not None
        vm_name = next(name for name, uuid in demo_host.vms.items() if uuid == run["vm_uuid"])
        assert abs(run["frozen_seconds"] - downtime(demo_host, vm_name)) < 0.5
        assert downtime(demo_host, vm_name) <= 10.0
    totals = history.RunHistory(os.path.join(demo_host.state_dir, "agent-state")).totals()
    assert totals["runs"] == 3
    assert sum(sr["reclaimed_bytes"] for sr in totals["srs"].values()) == document["reclaimed_bytes"]
    code, document, _ = run_now(demo_host)
    assert (code, document["runs"]) == (0, [])


def test_a_vdi_predicted_over_the_maximum_is_skipped_and_held_back(demo_host):
    web_files = {path: stat for path, stat in files(demo_host).items() if "/sr-mount/" in path}
    kept = {path: stat for path, stat in web_files.items()
            if os.path.basename(path)[:36] in (demo_host.vdis["web-01-root"], demo_host.parents["web-01-root"])}
    flags = other_configs(demo_host)
    code, document, stderr = run_now(demo_host, "--max-freeze-seconds", "0.05")
    assert code == 0, stderr
    runs = runs_by_disk(demo_host, document)
    web = runs["web-01-root"]
    assert web["result"] == "skipped" and web["reclaimed_bytes"] == 0
    assert web["reason"].startswith("predicted freeze 0.1 s (gc) over the maximum 0.05 s")
    assert runs["mail-01-root"]["result"] == "success"  # the GC ran on web-01's SR, web-01 was held back
    assert chain_parent(demo_host, "web-01-root") != "" and downtime(demo_host, "web-01") == 0
    assert len(kept) == 2 and all(files(demo_host)[path] == stat for path, stat in kept.items())
    assert other_configs(demo_host) == flags


def test_forced_live_path_and_the_plugin_measure_their_freeze(sim_host):
    host = sim_host(small_scenario())
    configure(host, strategies="live, plugin")
    code, document, stderr = run_now(host, "--vm", host.vms["app"], "--vm", host.vms["db"])
    assert code == 0, stderr
    runs = runs_by_disk(host, document)
    assert {key: run["strategy"] for key, run in runs.items()} == {"app-root": "live", "db-data": "live"}
    for key, vm_name in (("app-root", "app"), ("db-data", "db")):
        assert runs[key]["result"] == "success" and chain_parent(host, key) == ""
        assert 0 < downtime(host, vm_name) <= 10.0
        assert abs(runs[key]["frozen_seconds"] - downtime(host, vm_name)) < 0.5
    assert "idle-root" not in runs and chain_parent(host, "idle-root") != ""  # not asked for: held back
    assert downtime(host, "idle") == 0

    host = sim_host(small_scenario())
    configure(host, strategies="plugin")
    contents = vhdfile.chain_digest(host.vdi_path("db-data"))
    code, document, stderr = run_now(host, "--sr", host.srs["lvm"])
    assert code == 0, stderr
    (run,) = document["runs"]
    assert (run["strategy"], run["result"], run["vdi_uuid"]) == ("plugin", "success", host.vdis["db-data"])
    kinds = {interval.kind for interval in host.db.downtime(host.vms["db"])}
    assert "suspended" in kinds and power_states(host)["db"] == "Running"
    assert abs(run["frozen_seconds"] - downtime(host, "db")) < 0.5
    assert vhdfile.chain_digest(host.vdi_path("db-data")) == contents
    assert other_configs(host)["db-data"] == {}


def test_exclusions_and_ha_are_reported(sim_host):
    host = sim_host("demo")
    host.db.update("VM", host.vm_ref("web-01"), tags=["xcoalesce-exclude"])
    host.db.update("VM", host.vm_ref("db-01"), ha_restart_priority="restart")
    code, document, stderr = run_now(host, "--dry-run")
    assert code == 0, stderr
    runs = runs_by_disk(host, document)
    assert runs["web-01-root"]["result"] == "skipped" and "xcoalesce-exclude" in runs["web-01-root"]["reason"]
    assert runs["db-01-data"]["reason"].startswith("VM is HA-protected")


def test_scheduled_run_honours_mode_window_and_caps(sim_host):
    host = sim_host(small_scenario())
    configure(host, windows="Mon-Sun 00:00-24:00", max_vms_per_window=1)
    config = config_module.load(host.agent_conf)
    inspection = _inspect(config)
    config.coalesce.mode = "report"
    assert scheduled.scheduled_run(config, inspection) == []
    config.coalesce.mode = "auto"
    runs = scheduled.scheduled_run(config, inspection)
    assert [run.result for run in runs if run.result == "success"] == ["success"]
    assert scheduled.scheduled_run(config, _inspect(config)) == []  # the cap of one VM is used up
    config.coalesce.max_vms_per_window = 0
    config.coalesce.windows = config_module.windows("Mon-Sun 00:00-00:01")
    assert scheduled.scheduled_run(config, _inspect(config), now=_today_at(12)) == []


def _inspect(config):
    from xcoalesce_agent.inspect import inspection
    return inspection.inspect(config)


def _today_at(hour):
    import datetime
    import time
    moment = datetime.datetime.now().replace(hour=hour, minute=0, second=0, microsecond=0)
    return time.mktime(moment.timetuple())


def test_snapshot_deletion_marks_the_sr_pending_once_the_gc_settled(sim_host):
    host = sim_host("demo")
    configure(host, trigger_on_snapshot_delete="true")
    config = config_module.load(host.agent_conf)
    settled = []
    watcher = snapshot_trigger.SnapshotWatcher(config, on_settled=settled.append)
    watcher.start()
    try:
        assert watcher.following.wait(20)
        (snapshot,) = [ref for ref, record in host.db.records("VDI").items() if record["is_a_snapshot"]]
        host.store("iscsi").remove(host.db.get_field("VDI", snapshot, "uuid"))
        host.db.destroy("VDI", snapshot)
        assert watcher.wait_settled(20) == [host.srs["iscsi"]]
    finally:
        watcher.stop()
    assert settled == [host.srs["iscsi"]]
    assert snapshot_trigger.PendingSrs(config).load() == [host.srs["iscsi"]]


def test_another_run_holding_the_lock_exits_4(demo_host):
    from xcoalesce_agent.reclaim.lock import HostLock
    with HostLock(os.path.join(demo_host.state_dir, "agent-state")):
        code, document, stderr = run_now(demo_host)
    assert (code, document) == (4, None)
    assert stderr.startswith("xcoalesce-agent: error: another run already holds the host lock")


def test_startup_repair_undoes_what_an_interrupted_run_left(demo_host):
    from xcoalesce_agent.reclaim import journal
    config = config_module.load(demo_host.agent_conf)
    assert repair.startup_repair(config) == []
    vdi_ref, vm_ref = demo_host.vdi_ref("web-01-root"), demo_host.vm_ref("db-01")
    steps = journal.Journal(config.agent.state_dir)
    steps.begin(journal.force_step(demo_host.srs["local"], demo_host.vdis["web-01-root"], None))
    demo_host.db.add_to_map("VDI", vdi_ref, "other_config", "leaf-coalesce", "force")
    steps.begin(journal.suspend_step([demo_host.srs["iscsi"]], demo_host.vms["db-01"], "Running"))
    demo_host.db.update("VM", vm_ref, power_state="Suspended")
    actions = repair.startup_repair(config)
    assert sorted(actions) == sorted(["VM {}: resumed".format(demo_host.vms["db-01"]),
                                      "VDI {}: leaf-coalesce=(unset) restored".format(demo_host.vdis["web-01-root"])])
    assert demo_host.db.get_field("VDI", vdi_ref, "other_config") == {}
    assert demo_host.db.get_field("VM", vm_ref, "power_state") == "Running"
    assert steps.steps() == []


def moved_disk_scenario():
    """VM `moved` had its disk deleted after a snapshot: the snapshot VDI is alone under its base."""
    srs = [sc.sr("local", "ext", 512, speed_mib=24)]
    vms = [sc.vm("app", [sc.disk("app-root", "local", 32, steps=KEEP_SNAPSHOT)]),
           sc.vm("moved", [sc.disk("moved-root", "local", 32, steps=[sc.write(0, 4), sc.snapshot("s"),
                                                                     sc.write(0, 2), sc.delete_disk()])])]
    return sc.pool("moved", srs, vms)


def snapshot_vdi(host):
    (uuid,) = [record["uuid"] for record in host.db.records("VDI").values() if record["is_a_snapshot"]]
    return uuid


def snapshot_report(host):
    from xcoalesce_agent.inspect import inspection
    uuid = snapshot_vdi(host)
    reports = {vdi.uuid: vdi for sr in inspection.inspect(config_module.load(host.agent_conf)).srs
               for vdi in sr.vdis}
    return reports[uuid]


def test_a_snapshot_alone_under_its_base_is_leaf_coalesced_by_the_gc_or_held_back(sim_host):
    host = sim_host(moved_disk_scenario())
    report = snapshot_report(host)
    assert (report.state, report.vm_uuid, report.vm_name, report.chain_length) == (
        "leaf_coalesceable", host.vms["moved"], "moved", 2)
    assert report.reclaimable_bytes > 0
    flags = dict(host.db.get_field("VDI", host.db.ref_of("VDI", snapshot_vdi(host)), "other_config"))
    code, document, stderr = run_now(host, "--vm", host.vms["app"])
    assert code == 0, stderr
    assert [run["vdi_uuid"] for run in document["runs"]] == [host.vdis["app-root"]]
    assert snapshot_report(host).chain_length == 2  # not asked for: held back from the GC the run kicked
    assert host.db.get_field("VDI", host.db.ref_of("VDI", snapshot_vdi(host)), "other_config") == flags
    host.db.update("VM", host.vm_ref("moved"), tags=["xcoalesce-exclude"])
    code, document, stderr = run_now(host)
    assert code == 0, stderr
    (run,) = document["runs"]
    assert (run["vdi_uuid"], run["result"]) == (snapshot_vdi(host), "skipped") and "xcoalesce-exclude" in run["reason"]
    assert snapshot_report(host).chain_length == 2  # its VM excluded: held back too
    host.db.update("VM", host.vm_ref("moved"), tags=[])
    code, document, stderr = run_now(host)
    assert code == 0, stderr
    (run,) = document["runs"]
    assert (run["vdi_uuid"], run["strategy"], run["result"]) == (snapshot_vdi(host), "gc", "success")
    assert run["predicted_freeze_seconds"] == 0.0 and run["reclaimed_bytes"] > 0
    assert snapshot_report(host).chain_length == 1


def test_an_orphaned_snapshot_leaf_is_merged_unless_its_snapshot_vm_is_excluded(sim_host):
    """VM `moved` deleted (`xe vm-uninstall`: its disk went first) leaves its snapshot VM alone, whose
    VDI is the only child of its base: SM's GC leaf-coalesces it; the snapshot VM is what the
    administrator still sees, so its exclusion holds the VDI back."""
    host = sim_host(moved_disk_scenario())
    vm_ref = host.vm_ref("moved")
    host.db.update("VM", vm_ref, power_state="Halted")
    for vbd_ref in host.db.get_field("VM", vm_ref, "VBDs"):
        host.db.destroy("VBD", vbd_ref)
    host.db.destroy("VM", vm_ref)
    (snapshot_vm,) = [record for record in host.db.records("VM").values() if record["is_a_snapshot"]]
    report = snapshot_report(host)
    assert (report.state, report.vm_uuid, report.chain_length) == ("leaf_coalesceable", snapshot_vm["uuid"], 2)
    assert report.reclaimable_bytes > 0
    host.db.update("VM", host.db.ref_of("VM", snapshot_vm["uuid"]), tags=["xcoalesce-exclude"])
    code, document, stderr = run_now(host)
    assert code == 0, stderr
    assert [run["result"] for run in document["runs"] if run["vdi_uuid"] == snapshot_vdi(host)] == ["skipped"]
    assert snapshot_report(host).chain_length == 2
    host.db.update("VM", host.db.ref_of("VM", snapshot_vm["uuid"]), tags=[])
    code, document, stderr = run_now(host)
    assert code == 0, stderr
    (run,) = document["runs"]
    assert (run["vdi_uuid"], run["strategy"], run["result"]) == (snapshot_vdi(host), "gc", "success")
    assert run["reclaimed_bytes"] == run["estimated_bytes"] > 0
    assert snapshot_report(host).chain_length == 1
