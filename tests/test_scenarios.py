"""Scenarios build a whole simulated Dom0 that matches what they declare, and `serve` runs one."""
import os
import signal
import subprocess
import sys

import pytest

from tests.dom0sim import scenarios, sm, vhdfile
from tests.dom0sim.host import SimHost
from xcoalesce_agent import config as agent_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {"demo": {}, "states": {}, "pool-member": {}, "long-chain": {}, "busy": {"leaf_mib": 4},
         "pool-shared-lvm": {}}


def observed_state(host, forest, disk, parent=False):
    """The state of a disk's leaf (or of its parent) in the agent's vocabulary, from files and records."""
    if disk["vdi_type"] == "qcow2":
        return "scan_error"   # a placeholder header: cluster_bits 0
    if disk["vdi_type"] != "vhd":
        return "not_cow"
    uuid = host.parents[disk["key"]] if parent else host.vdis[disk["key"]]
    image = forest.get(uuid)
    if image is None:
        return None
    if image in forest.orphans:
        return "orphan"
    if image.scan_error:
        return "scan_error"
    if image.hidden:
        if image in forest.garbage():
            return "garbage"
        return "coalesceable" if image.is_coalesceable() else "hidden_parent"
    if image.parent is None:
        return "leaf"
    if len(image.parent.children) > 1:
        return "snapshot_present"
    record = host.db.get("VDI", host.vdi_ref(disk["key"]))
    sr_other = host.db.get_field("SR", record["SR"], "other_config")
    if (record["other_config"].get("leaf-coalesce") == "false" or record["on_boot"] == "reset"
            or record["allow_caching"] or sr_other.get("leaf-coalesce") == "false"):
        return "excluded"
    return "leaf_coalesceable"


def disks(host):
    for vm in host.scenario["vms"]:
        for disk in vm["disks"]:
            yield disk


@pytest.mark.parametrize("name", sorted(SMALL))
def test_scenario_builds_into_its_declared_states(tmp_path, name):
    host = SimHost(str(tmp_path / "h"), name, **SMALL[name]).build()
    forests = {}
    checked = 0
    for disk in disks(host):
        sr_spec = [s for s in host.scenario["srs"] if s["key"] == disk["sr"]][0]
        if not sr_spec["attached"]:
            assert disk["expect"] is None
            continue
        if disk["sr"] not in forests:
            forests[disk["sr"]] = sm.Forest(host.store(disk["sr"]).scan())
        forest = forests[disk["sr"]]
        for parent, expected in ((False, disk["expect"]), (True, disk["expect_parent"])):
            if expected is not None:
                assert observed_state(host, forest, disk, parent) == expected, (disk["key"], parent)
                checked += 1
    assert checked >= 1


def test_states_scenario_covers_every_state_the_agent_classifies(tmp_path):
    declared = set()
    for disk in disks(SimHost(str(tmp_path / "h"), "states")):
        declared.update(state for state in (disk["expect"], disk["expect_parent"]) if state)
    assert declared == {"leaf", "leaf_coalesceable", "snapshot_present", "hidden_parent", "coalesceable",
                        "garbage", "orphan", "excluded", "scan_error", "not_cow"}


def test_records_describe_the_files(tmp_path):
    host = SimHost(str(tmp_path / "h"), "states").build()
    records = host.db.records("VDI")
    for key in ("ext", "lvm"):
        forest = sm.Forest(host.store(key).scan())
        for image in forest.images.values():
            if image.scan_error:
                continue
            record = records[host.db.ref_of("VDI", image.uuid)]
            assert record["physical_utilisation"] == image.physical_bytes
            assert record["virtual_size"] == image.virtual_size
            assert record["managed"] is not image.hidden
            assert record["sm_config"].get("vhd-parent", "") == (image.parent.uuid if image.parent else "")
    snapshots = [r for r in records.values() if r["is_a_snapshot"]]
    assert sorted(records[r["snapshot_of"]]["uuid"] for r in snapshots) == sorted(
        [host.vdis["snapshot-present"], host.vdis["orphan"]])
    vm_snapshots = [r for r in host.db.records("VM").values() if r["is_a_snapshot"]]
    assert sorted(r["name_label"] for r in vm_snapshots) == ["keep", "s"]
    lvm_vg = host.store("lvm").vg
    for lv in lvm_vg.lvs():
        if lv["name"].startswith("VHD-"):
            image = forest_image(host, "lvm", lv["name"][4:])
            expected = sm.full_lv_size(image.virtual_size) if not image.hidden else sm.lv_size_for(image.vhd_size)
            if not (image.hidden or image.children) and records[host.db.ref_of("VDI", image.uuid)]["is_a_snapshot"]:
                continue
            assert lv["size"] == expected, lv["name"]


def forest_image(host, key, uuid):
    return sm.Forest(host.store(key).scan()).get(uuid)


def test_lvm_chains_read_back_through_the_vhd_util_stand_in(tmp_path):
    host = SimHost(str(tmp_path / "h"), "states").build()
    vg = host.store("lvm").vg.name
    env = dict(os.environ, PATH=host.bin_dir + ":" + os.environ.get("PATH", "/usr/bin:/bin"))
    output = subprocess.check_output([os.path.join(host.bin_dir, "vhd-util"), "scan", "-f", "-c", "-l", vg,
                                      "-m", "VHD-*"], universal_newlines=True, env=env)
    leaf = "vhd=VHD-{} ".format(host.vdis["leaf-lvm"])
    line = [text for text in output.splitlines() if text.startswith(leaf)][0]
    assert line.endswith("parent=VHD-" + host.parents["leaf-lvm"])


def test_layout_and_agent_configuration(tmp_path):
    host = SimHost(str(tmp_path / "h"), "demo").build()
    config = agent_config.load(host.agent_conf)
    assert config.xapi.socket == host.socket_path
    assert config.xapi.inventory == host.inventory
    assert config.tools.vhd_util == os.path.join(host.bin_dir, "vhd-util")
    assert config.tools.path.split(":")[0] == host.bin_dir
    assert config.storage.sr_mount_dir == host.sr_mount
    assert config.storage.speed_log_dir == host.run_dir
    assert config.storage.lvm_device_dir == os.path.join(host.state_dir, "lvm")
    assert os.path.isdir(config.agent.state_dir)
    with open(host.inventory) as handle:
        assert "INSTALLATION_UUID='{}'\n".format(host.host_uuid) in handle.read()
    for tool in ("vhd-util", "lvs", "vgs", "cleanup"):
        assert os.access(os.path.join(host.bin_dir, tool), os.X_OK)
    assert os.path.isdir(os.path.join(host.sr_mount, host.srs["local"]))
    assert os.path.isfile(os.path.join(host.state_dir, "lvm", "VG_XenStorage-" + host.srs["iscsi"], "metadata.json"))
    for sr_uuid in host.srs.values():
        assert sm.read_speed(os.path.join(host.run_dir, sr_uuid + ".speed_log")) == 400 * 1024 * 1024


def test_large_builds_sparse(tmp_path):
    host = SimHost(str(tmp_path / "h"), "large", count=200).build()
    leaves = [disk for disk in disks(host)]
    assert len(leaves) == 200
    apparent = used = 0
    for key in host.srs:
        store = host.store(key)
        forest = sm.Forest(store.scan())
        assert max(image.depth() for image in forest.images.values()) <= 2
        if not store.lvm:
            for name in os.listdir(store.directory):
                stat = os.stat(os.path.join(store.directory, name))
                apparent += stat.st_size
                used += stat.st_blocks * 512
    assert used * 20 < apparent


def test_demo_reclaims_through_the_real_xenapi_client(demo_host, xapi_session):
    host = demo_host
    session = xapi_session(host)
    digests = {key: vhdfile.chain_digest(host.vdi_path(key)) for key in host.vdis}
    usage = {key: int(session.xenapi.SR.get_physical_utilisation(host.sr_ref(key))) for key in host.srs}
    host_ref = session.xenapi.host.get_by_uuid(host.host_uuid)
    result = session.xenapi.host.call_plugin(host_ref, "coalesce-leaf", "leaf-coalesce",
                                            {"vm_uuid": host.vms["db-01"]})
    assert result == "Success"
    assert "suspended" in [i.kind for i in host.db.downtime(host.vms["db-01"])]
    for key in host.srs:
        session.xenapi.SR.scan(host.sr_ref(key))
    assert host.sm.wait_idle(60)
    for key in host.srs:
        assert int(session.xenapi.SR.get_physical_utilisation(host.sr_ref(key))) < usage[key]
    for key, digest in digests.items():
        assert vhdfile.chain_digest(host.vdi_path(key)) == digest, key
    assert session.xenapi.VDI.get_sm_config(host.vdi_ref("web-01-root")).get("vhd-parent") is None
    assert session.xenapi.VDI.get_sm_config(host.vdi_ref("build-01-root"))["vhd-parent"] == host.parents[
        "build-01-root"]


def serve_command(state_dir, *extra):
    return [sys.executable, "-m", "tests.dom0sim", "serve", "--state", state_dir] + list(extra)


def test_serve_builds_serves_and_stops_on_sigterm(tmp_path):
    state_dir = str(tmp_path / "served")
    process = subprocess.Popen(serve_command(state_dir, "--scenario", "states"), cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, universal_newlines=True)
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("serving"):
                break
        assert any(os.path.join(state_dir, "xapi.sock") in line for line in lines)
        from tests.dom0sim.xapi import client
        session = client.connect(os.path.join(state_dir, "xapi.sock"))
        assert len(session.xenapi.SR.get_all()) == 5
        session.xenapi.session.logout()
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert out.strip().endswith("stopped")


@pytest.mark.parametrize("arguments, message", [
    (["--scenario", "nope"], "unknown scenario 'nope'"),
    (["--scenario", "large", "--param", "count"], "--param expects KEY=VALUE"),
    (["--scenario", "large", "--param", "colour=blue"], "scenario large:"),
])
def test_serve_rejects_bad_input_in_one_line(tmp_path, arguments, message):
    process = subprocess.Popen(serve_command(str(tmp_path / "s"), *arguments), cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, universal_newlines=True)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert len(err.splitlines()) == 1 and message in err


def test_scenario_names():
    assert {"demo", "large", "pool-shared-lvm"} <= set(scenarios.names())
    with pytest.raises(KeyError):
        scenarios.get("nope")


def test_demo_command_shows_the_agent_before_and_after(tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    process = subprocess.Popen([sys.executable, "-m", "tests.dom0sim", "demo"], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    for text in ("SR usage before:", "--report", "--now", "SR usage after:", "freed "):
        assert text in out
    assert not os.listdir(str(tmp_path))
