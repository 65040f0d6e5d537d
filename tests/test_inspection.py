"""Inspections of simulated hosts, checked against the truth computed here from the files themselves."""
import gc
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from tests.dom0sim import lvm, scenarios, sm, vhdfile
from tests.dom0sim.host import SimHost
from tests.dom0sim.scenarios import delete_snapshot, disk, pool, snapshot, sr, vm, write
from xcoalesce_agent import config, model
from xcoalesce_agent.inspect import inspection, vhdutil, xapi
from xcoalesce_agent.errors import HostUnreachable

BLOCK_COST = 2 * 1024 * 1024 + 4096
EXTENT = 4 * 1024 * 1024


def started_host(tmp_path_factory, scenario, name=None):
    directory = str(tmp_path_factory.mktemp(name or str(scenario)))
    host = SimHost(directory, scenario, uuid_salt=directory).build()
    return host.start()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    host = started_host(tmp_path_factory, "demo")
    yield host
    host.stop()


@pytest.fixture(scope="module")
def states_host(tmp_path_factory):
    host = started_host(tmp_path_factory, "states")
    yield host
    host.stop()


def agent_config(host):
    return config.load(host.agent_conf)


def run_agent(host_or_conf, *args):
    conf = getattr(host_or_conf, "agent_conf", host_or_conf)
    process = subprocess.run([sys.executable, "-m", "xcoalesce_agent", "--config", conf] + list(args),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    return process.returncode, process.stdout, process.stderr


def vdis_by_uuid(document):
    return {vdi["uuid"]: vdi for sr_document in document["srs"] for vdi in sr_document["vdis"]}


def lv_sizes(vg_dir):
    with open(os.path.join(vg_dir, "metadata.json")) as handle:
        return {lv["name"]: lv["size"] for lv in json.load(handle)["lvs"]}


def true_reclaimable(host, disk_key, sr_key, sr_type):
    """What leaf-coalescing the disk frees, from the files: blocks of leaf and parent, sizes on disk."""
    leaf_path = host.vdi_path(disk_key)
    parent_path = host.store(sr_key).path(host.parents[disk_key])
    if sr_type in ("ext", "nfs", "smb"):
        new_blocks = set(vhdfile.allocated_blocks(leaf_path)) - set(vhdfile.allocated_blocks(parent_path))
        return os.path.getsize(leaf_path) - len(new_blocks) * BLOCK_COST
    sizes = lv_sizes(os.path.dirname(leaf_path))
    with vhdfile.Vhd.open(leaf_path) as leaf:
        virtual_size = leaf.virtual_size
    return (sizes[os.path.basename(leaf_path)] + sizes[os.path.basename(parent_path)]
            - sm.full_lv_size(virtual_size))


def scenario_disks(host):
    for spec in host.scenario["vms"]:
        for disk_spec in spec["disks"]:
            yield spec, disk_spec


def sr_type_of(host, disk_spec):
    return next(spec["type"] for spec in host.scenario["srs"] if spec["key"] == disk_spec["sr"])


def test_demo_report_json_matches_the_files(demo):
    code, out, err = run_agent(demo, "--report", "--json")
    assert code == 0, err
    document = json.loads(out)
    assert document["host"]["uuid"] == demo.host_uuid
    assert {sr_document["uuid"] for sr_document in document["srs"]} == set(demo.srs.values())
    vdis = vdis_by_uuid(document)
    checked = 0
    for vm_spec, disk_spec in scenario_disks(demo):
        report = vdis[demo.vdis[disk_spec["key"]]]
        assert report["state"] == disk_spec["expect"], disk_spec["key"]
        assert report["vm_name"] == vm_spec["name"] and report["vm_uuid"] == demo.vms[vm_spec["name"]]
        if disk_spec["expect_parent"]:
            assert vdis[demo.parents[disk_spec["key"]]]["state"] == disk_spec["expect_parent"]
        if report["state"] == model.LEAF_COALESCEABLE:
            truth = true_reclaimable(demo, disk_spec["key"], disk_spec["sr"], sr_type_of(demo, disk_spec))
            assert report["reclaimable_bytes"] == truth
            assert report["reason"] == ""
            checked += 1
        else:
            assert report["reclaimable_bytes"] == 0 and report["reason"]
    assert checked == 3
    for sr_document in document["srs"]:
        for key in ("uuid", "name", "type", "size_bytes", "free_bytes", "reclaimable_bytes", "gc_pending_bytes"):
            assert key in sr_document
        assert sr_document["reclaimable_bytes"] == sum(vdi["reclaimable_bytes"] for vdi in sr_document["vdis"])
    assert document["reclaimable_bytes"] == sum(sr_document["reclaimable_bytes"] for sr_document in document["srs"])


def test_naive_sum_of_sizes_is_far_off_on_the_demo(demo):
    result = inspection.inspect(agent_config(demo))
    web = next(vdi for sr_report in result.srs for vdi in sr_report.vdis if vdi.uuid == demo.vdis["web-01-root"])
    leaf_path = demo.vdi_path("web-01-root")
    parent_path = demo.store("local").path(demo.parents["web-01-root"])
    new_blocks = set(vhdfile.allocated_blocks(leaf_path)) - set(vhdfile.allocated_blocks(parent_path))
    naive = os.path.getsize(leaf_path)
    assert len(new_blocks) == 8
    assert naive - web.reclaimable_bytes == 8 * BLOCK_COST
    assert naive > 1.6 * web.reclaimable_bytes


def test_states_scenario_shows_every_state_with_its_reason(states_host):
    result = inspection.inspect(agent_config(states_host))
    reports = {vdi.uuid: vdi for sr_report in result.srs for vdi in sr_report.vdis}
    assert {vdi.state for vdi in reports.values()} == set(model.STATES)
    for vdi in reports.values():
        assert bool(vdi.reason) == (vdi.state != model.LEAF_COALESCEABLE), vdi.uuid
    for _, disk_spec in scenario_disks(states_host):
        uuid = states_host.vdis.get(disk_spec["key"])
        if disk_spec["expect"]:
            assert reports[uuid].state == disk_spec["expect"], disk_spec["key"]
        if disk_spec["expect_parent"]:
            assert reports[states_host.parents[disk_spec["key"]]].state == disk_spec["expect_parent"]
        if disk_spec["expect"] == model.LEAF_COALESCEABLE:
            assert reports[uuid].reclaimable_bytes == true_reclaimable(
                states_host, disk_spec["key"], disk_spec["sr"], sr_type_of(states_host, disk_spec))
    by_name = {sr_report.name: sr_report for sr_report in result.srs}
    assert by_name["Mixed formats"].skipped_vdis == 0 and by_name["Local LVM"].skipped_vdis == 1
    qcow2 = [vdi for vdi in by_name["Mixed formats"].vdis if vdi.format == model.QCOW2]
    assert [vdi.state for vdi in qcow2] == [model.SCAN_ERROR]
    assert "header cut short" in qcow2[0].reason
    assert any("scan error -22" in error for error in by_name["Broken chains"].errors)
    garbage = [vdi for vdi in by_name["Local ext"].vdis if vdi.state == model.GARBAGE]
    assert by_name["Local ext"].gc_pending_bytes >= sum(vdi.physical_bytes for vdi in garbage) > 0
    assert result.errors == []


def test_a_raw_vdi_shows_xapis_sizes_and_its_vm(states_host):
    """A raw VDI has no image to scan: its sizes are xapi's, read only for the SRs that have one."""
    result = inspection.inspect(agent_config(states_host))
    (raw,) = [vdi for sr_report in result.srs for vdi in sr_report.vdis if vdi.state == model.NOT_COW]
    record = states_host.db.get("VDI", states_host.vdi_ref("raw-disk"))
    assert (raw.uuid, raw.format, raw.vm_name) == (states_host.vdis["raw-disk"], model.RAW, "formats")
    assert (raw.physical_bytes, raw.virtual_size_bytes) == (record["physical_utilisation"], record["virtual_size"])
    assert raw.virtual_size_bytes == 16 * 1024 * 1024


def test_disks_belong_to_guests_whatever_else_plugs_them(tmp_path_factory):
    """Every VM has an empty CD drive, and a disk plugged into the control domain (a backup reading
    it) is still its VM's: only the guests' disk VBDs name a VDI's VM."""
    host = started_host(tmp_path_factory, "demo", "guests")
    db = host.db
    try:
        dom0 = db.find("VM", is_control_domain=True)[0]
        for position, uuid in enumerate(host.vdis.values()):
            db.create("VBD", VM=dom0, VDI=db.ref_of("VDI", uuid), device="xvd" + "fghijklmnop"[position],
                      userdevice=str(position + 4), currently_attached=True)
        result = inspection.inspect(agent_config(host))
    finally:
        host.stop()
    cd_drives = [vbd for vbd in db.all("VBD") if db.get_field("VBD", vbd, "type") == "CD"]
    assert cd_drives and {db.get_field("VBD", vbd, "VDI") for vbd in cd_drives} == {"OpaqueRef:NULL"}
    owners = {host.vdis[disk["key"]]: spec["name"] for spec in host.scenario["vms"] for disk in spec["disks"]}
    reports = {vdi.uuid: vdi for sr_report in result.srs for vdi in sr_report.vdis}
    assert owners and all(reports[uuid].vm_name == name for uuid, name in owners.items())


def test_pool_member_inspects_only_its_own_attached_local_srs(tmp_path_factory):
    host = started_host(tmp_path_factory, "pool-member")
    try:
        result = inspection.inspect(agent_config(host))
    finally:
        host.stop()
    assert [sr_report.uuid for sr_report in result.srs] == [host.srs["local"]]
    skipped = {item["uuid"]: item["reason"] for item in result.skipped_srs}
    assert skipped[host.srs["nfs"]] == "shared SR: the pool master inspects it"
    assert skipped[host.srs["old"]] == "not attached on this host"
    states = {vdi.uuid: vdi.state for vdi in result.srs[0].vdis}
    assert states[host.vdis["local-leaf"]] == model.LEAF_COALESCEABLE


MERGE_HISTORIES = {
    "overlap": [write(0, 8), snapshot("s"), write(4, 8), delete_snapshot("s")],
    "disjoint": [write(0, 4), snapshot("s"), write(8, 6), delete_snapshot("s")],
}


def merges_scenario():
    srs, vms = [], []
    for sr_type in ("ext", "lvm"):
        for shape, steps in sorted(MERGE_HISTORIES.items()):
            key = "{}-{}".format(sr_type, shape)
            srs.append(sr(key, sr_type, 512, name=key))
            vms.append(vm("vm-" + key, [disk(key, key, 32, steps=steps, expect=model.LEAF_COALESCEABLE)]))
    return pool("merges", srs, vms)


def used_bytes(host, key):
    """What the SR's VHDs occupy: file sizes, or LV sizes."""
    store = host.store(key)
    if isinstance(store, sm.FileStore):
        return sum(os.path.getsize(os.path.join(store.directory, name)) for name in os.listdir(store.directory))
    return sum(lv["size"] for lv in store.vg.lvs())


def test_a_real_leaf_coalesce_frees_the_estimate(tmp_path_factory):
    host = started_host(tmp_path_factory, merges_scenario(), name="merges")
    try:
        settings = agent_config(host)
        before = inspection.inspect(settings)
        estimates = {sr_report.name: sr_report for sr_report in before.srs}
        used = {key: used_bytes(host, key) for key in host.srs}
        with xapi.open_session(settings) as session:
            for key in host.srs:
                vdi_ref = session.xenapi.VDI.get_by_uuid(host.vdis[key])
                session.xenapi.VDI.add_to_other_config(vdi_ref, "leaf-coalesce", "force")
                session.xenapi.SR.scan(session.xenapi.SR.get_by_uuid(host.srs[key]))
        assert host.sm.wait_idle(60)
        for key in host.srs:
            report = estimates[key]
            assert [vdi.state for vdi in report.vdis if vdi.uuid == host.vdis[key]] == [model.LEAF_COALESCEABLE]
            freed = used[key] - used_bytes(host, key)
            assert report.gc_pending_bytes == 0
            assert freed == report.reclaimable_bytes > 0, key
            if key.startswith("lvm"):
                assert freed % EXTENT == 0
        after = {sr_report.name: sr_report for sr_report in inspection.inspect(settings).srs}
        for key in host.srs:
            states = {vdi.uuid: vdi.state for vdi in after[key].vdis}
            assert states[host.vdis[key]] == model.LEAF and after[key].reclaimable_bytes == 0
    finally:
        host.stop()


def test_gc_running_is_seen_with_its_age(states_host, tmp_path):
    script = tmp_path / "cleanup"
    script.write_text("#!/bin/sh\nwhile read -r line; do :; done\n")
    script.chmod(0o755)
    sr_uuid = states_host.srs["ext"]
    process = subprocess.Popen([str(script), "-g", "-b", "-u", sr_uuid], stdin=subprocess.PIPE)
    try:
        time.sleep(0.3)
        result = inspection.inspect(agent_config(states_host))
    finally:
        process.stdin.close()
        process.wait()
    running = {sr_report.uuid: (sr_report.gc_running, sr_report.gc_running_seconds) for sr_report in result.srs}
    assert running[sr_uuid][0] is True and 0 <= running[sr_uuid][1] < 60
    assert all(not flag for uuid, (flag, _) in running.items() if uuid != sr_uuid)


def wrapped_tool(tmp_path, settings, after_scan):
    """A `vhd-util` that runs the host's own, then does `after_scan` (shell) once a scan is done."""
    wrapper = tmp_path / "vhd-util"
    wrapper.write_text('#!/bin/sh\n"{real}" "$@"\nstatus=$?\nif [ "$1" = scan ]; then\n{after}\nfi\nexit $status\n'
                       .format(real=settings.tools.vhd_util, after=after_scan))
    wrapper.chmod(0o755)
    settings.tools.vhd_util = str(wrapper)
    return settings


def test_vdi_deleted_between_scan_and_join(tmp_path_factory, tmp_path):
    """The scan sees a VHD whose VDI record is gone by the time the records are read."""
    host = started_host(tmp_path_factory, "demo", name="demo-forgetting")
    flag = tmp_path / "scanned"
    settings = wrapped_tool(tmp_path, agent_config(host),
                            'if [ ! -e "{0}.done" ]; then touch "{0}" "{0}.done"; n=0\n'
                            'while [ -e "{0}" ] && [ $n -lt 100 ]; do sleep 0.05; n=$((n+1)); done; fi'.format(flag))
    vdi_uuid = host.vdis["web-01-root"]
    vdi_ref = host.vdi_ref("web-01-root")

    def delete_record_once_scanned():
        deadline = time.time() + 10
        while not flag.exists() and time.time() < deadline:
            time.sleep(0.01)
        host.db.destroy("VDI", vdi_ref)
        flag.unlink()

    thread = threading.Thread(target=delete_record_once_scanned)
    thread.start()
    try:
        result = inspection.inspect(settings)
    finally:
        thread.join()
        host.stop()
    report = next(vdi for sr_report in result.srs for vdi in sr_report.vdis if vdi.uuid == vdi_uuid)
    assert report.state == model.EXCLUDED and "deleted during the inspection" in report.reason
    assert report.vm_uuid == "" and report.reclaimable_bytes == 0
    assert result.errors == []


def test_vhd_deleted_between_scan_and_bitmap_read(tmp_path_factory, tmp_path):
    host = started_host(tmp_path_factory, "demo", name="demo-vanishing")
    try:
        leaf = host.vdi_path("web-01-root")
        settings = wrapped_tool(tmp_path, agent_config(host), 'rm -f "{}"'.format(leaf))
        result = inspection.inspect(settings)
    finally:
        host.stop()
    report = next(vdi for sr_report in result.srs for vdi in sr_report.vdis if vdi.uuid == host.vdis["web-01-root"])
    assert report.state == model.SCAN_ERROR and "block bitmaps could not be read" in report.reason
    assert [error["stage"] for error in result.errors] == ["bitmap"]


def test_garbage_vhd_util_output_is_a_per_sr_error(demo, tmp_path):
    settings = agent_config(demo)
    wrapper = tmp_path / "vhd-util"
    wrapper.write_text('#!/bin/sh\nif [ "$4" = "-l" ]; then echo "*** stack smashing detected ***"; exit 0; fi\n'
                       'exec "{}" "$@"\n'.format(settings.tools.vhd_util))
    wrapper.chmod(0o755)
    conf = tmp_path / "agent.conf"
    with open(demo.agent_conf) as handle:
        conf.write_text(handle.read().replace(settings.tools.vhd_util, str(wrapper)))
    code, out, err = run_agent(str(conf), "--report", "--json")
    assert code == 0
    document = json.loads(out)
    by_type = {sr_document["type"]: sr_document for sr_document in document["srs"]}
    assert by_type["ext"]["errors"] == [] and by_type["ext"]["vdis"]
    assert by_type["lvmoiscsi"]["vdis"] == []
    assert "printed unexpected output: line 1: *** stack smashing detected ***" in by_type["lvmoiscsi"]["errors"][0]
    assert err.count("\n") == 1 and err.startswith("WARNING: scan: SR iSCSI SAN")


def test_detached_and_foreign_srs_are_skipped_not_scanned(tmp_path_factory):
    extra = scenarios.states()
    extra["srs"].append(sr("spare", "lvm", 256, name="Spare LVM", attached=False))
    extra["srs"].append(sr("iso", "iso", 256, name="ISO library"))
    host = SimHost(str(tmp_path_factory.mktemp("detached")), extra).build().start()
    try:
        result = inspection.inspect(agent_config(host))
    finally:
        host.stop()
    skipped = {item["name"]: item["reason"] for item in result.skipped_srs}
    assert skipped["Spare LVM"] == "not attached on this host"
    assert skipped["ISO library"] == "type iso does not hold VHDs"
    assert "Spare LVM" not in {sr_report.name for sr_report in result.srs}


def test_hidden_parent_bitmaps_are_read_once(demo):
    settings = agent_config(demo)
    cache = inspection.BitmapCache()
    first = inspection.inspect(settings, bitmaps=cache)
    vdis = [vdi for sr_report in first.srs for vdi in sr_report.vdis]
    candidates = [vdi for vdi in vdis if vdi.state == model.LEAF_COALESCEABLE]
    merged = candidates + [vdi for vdi in vdis if vdi.state == model.COALESCEABLE]
    # A VHD leaf's parent on an LVM SR is inflated to its full size whatever it holds: not read.
    lvm_leaves = {vdi.uuid for sr_report in first.srs if sr_report.type.startswith("lvm") for vdi in sr_report.vdis
                  if vdi.state == model.LEAF_COALESCEABLE and vdi.format == model.VHD}
    assert lvm_leaves
    hidden = {vdi.parent_uuid for vdi in merged if vdi.uuid not in lvm_leaves} | {vdi.uuid for vdi in merged
                                                                                 if vdi.hidden}
    assert len(cache) == len(hidden)
    tools = vhdutil.VhdUtil(settings)
    second = inspection.inspect(settings, tools=tools, bitmaps=cache)
    assert tools.spawned == len(second.srs) + len(candidates)
    assert report_bytes(first) == report_bytes(second)


def report_bytes(result):
    return [(vdi.uuid, vdi.reclaimable_bytes) for sr_report in result.srs for vdi in sr_report.vdis]


def test_lvm_volume_sizes_come_from_the_scan(demo):
    result = inspection.inspect(agent_config(demo))
    iscsi = next(sr_report for sr_report in result.srs if sr_report.type == "lvmoiscsi")
    sizes = lv_sizes(os.path.join(demo.state_dir, "lvm", lvm.sr_vg_name(iscsi.uuid)))
    for vdi in iscsi.vdis:
        if vdi.state != model.NOT_COW:
            assert vdi.physical_bytes == sizes["VHD-" + vdi.uuid]


def test_the_cyclic_collector_is_back_on_after_an_inspection_whatever_happened(demo, tmp_path):
    settings = agent_config(demo)
    inspection.inspect(settings)
    assert gc.isenabled()
    settings.xapi.socket = str(tmp_path / "no-xapi.sock")
    with pytest.raises(HostUnreachable):
        inspection.inspect(settings)
    assert gc.isenabled()
