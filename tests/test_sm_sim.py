"""The simulated storage manager behaves as SM does: GC per SR on the master, coalesce and leaf coalesce
that keep every disk's content, the speed log, the coalesce-leaf plugin's rules and messages."""
import hashlib
import os
import re
import subprocess
import time

import psutil
import pytest
import XenAPI

from tests.dom0sim import scenarios as sc
from tests.dom0sim import sm, vhdfile
from tests.dom0sim.host import wait_until
from xcoalesce_agent import config
from xcoalesce_agent.inspect import smlogfile

MIB = 1024 * 1024
BLOCK_COST = vhdfile.BLOCK_SIZE + vhdfile.BITMAP_BYTES

# A leaf whose snapshot was deleted: 4 MiB in the base, 4 MiB written after (2 MiB of it new blocks).
LEAF_STEPS = [sc.write(0, 4), sc.snapshot("s"), sc.write(2, 4), sc.delete_snapshot("s")]


@pytest.fixture(params=sorted(sm.GENERATIONS))
def generation(request):
    """Each SM generation, for behaviour they share."""
    return request.param


def one_disk_pool(sr_type="ext", steps=LEAF_STEPS, size_mib=16, speed_mib=400.0, power_state="Running",
                  sr_size_mib=512, sr_other=None, vdi_other=None, live_timeout=10.0, writes_mib_s=0.0,
                  shared=False, seed_speed_log=True):
    srs = [sc.sr("sr", sr_type, sr_size_mib, speed_mib=speed_mib, other_config=sr_other, shared=shared,
                 seed_speed_log=seed_speed_log)]
    vms = [sc.vm("vm", [sc.disk("disk", "sr", size_mib, steps=steps, other_config=vdi_other)],
                 power_state=power_state, writes_mib_s=writes_mib_s)]
    return sc.pool("one-disk", srs, vms, live_timeout=live_timeout)


def used(host, key="sr"):
    return int(host.db.get_field("SR", host.sr_ref(key), "physical_utilisation"))


def forest(host, key="sr"):
    return sm.Forest(host.store(key).scan())


def scan(session, host, key="sr", wait=True):
    session.xenapi.SR.scan(host.sr_ref(key))
    if wait:
        assert host.sm.wait_idle(60)


def slow_speed_log(host, key="sr", mib_s=1.0):
    """Ten earlier merges at `mib_s`: SM judges a live merge by floor(allocated / mean speed), so a small
    leaf goes through snapshot-coalesce rounds only while the logged speed is below its size per second."""
    path = host.sm.speed_log(host.srs[key])
    if os.path.exists(path):
        os.unlink(path)
    for _ in range(sm.SPEED_LOG_KEEP):
        sm.record_speed(path, mib_s * MIB)


def smlog(host):
    with open(host.sm.log_path) as handle:
        return handle.read()


def intervals(host, vm="vm", kind=None):
    return [i for i in host.db.downtime(host.vms[vm]) if kind is None or i.kind == kind]


def plugin(session, host, vm_uuid):
    host_ref = session.xenapi.host.get_by_uuid(host.host_uuid)
    return session.xenapi.host.call_plugin(host_ref, "coalesce-leaf", "leaf-coalesce", {"vm_uuid": vm_uuid})


def plugin_failure(session, host, vm_uuid):
    with pytest.raises(XenAPI.Failure) as caught:
        plugin(session, host, vm_uuid)
    return caught.value.details


# ---- SM's arithmetic, speed log and give-up rules ---------------------------------------------------

def test_lv_sizes_follow_lvhdutil():
    assert sm.overhead_empty(sm.MAX_FAST_RESIZE_SIZE) == 4329472
    assert sm.overhead_bitmap(64 * MIB) == 32 * 4096
    assert sm.full_lv_size(64 * MIB) == 72 * MIB
    assert sm.lv_size_for(1) == 4 * MIB and sm.lv_size_for(4 * MIB) == 4 * MIB


def test_speed_log_keeps_the_last_ten(tmp_path):
    path = str(tmp_path / "sr.speed_log")
    assert sm.read_speed(path) is None
    for speed in range(1, 13):
        sm.record_speed(path, speed * 1000)
    with open(path) as handle:
        lines = handle.read().splitlines()
    assert lines == [str(float(s * 1000)) for s in range(3, 13)]
    assert sm.read_speed(path) == pytest.approx(7500.0)


def test_tracker_gives_up_on_a_growing_leaf_and_not_on_a_shrinking_one():
    growing = sm.CoalesceTracker()
    assert [growing.give_up(size, size * 2) for size in (4, 8, 16)] == [False, False, True]
    assert "bump in size" in growing.reason
    shrinking = sm.CoalesceTracker()
    assert not any(shrinking.give_up(size, size // 2) for size in (64, 32, 16, 8, 4))
    steady = sm.CoalesceTracker()  # cleanup.py counts a round that ends no bigger as progress
    assert not any(steady.give_up(8, 8) for _ in range(20))


# ---- the GC -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sr_type", ["ext", "lvm"])
def test_gc_coalesces_a_hidden_parent_keeping_content(sim_host, xapi_session, sr_type):
    steps = [sc.write(0, 4), sc.snapshot("a"), sc.write(4, 4), sc.snapshot("b"), sc.write(1, 2),
             sc.delete_snapshot("a"), sc.delete_snapshot("b")]
    host = sim_host(one_disk_pool(sr_type=sr_type, steps=steps, vdi_other={"leaf-coalesce": "false"}))
    before = vhdfile.chain_digest(host.vdi_path("disk"))
    middle = host.parents["disk"]
    trees = forest(host)
    child, parent = trees.get(middle), trees.get(middle).parent
    assert child.is_coalesceable()
    new_blocks = len(child.blocks - parent.blocks)
    usage = used(host)
    scan(xapi_session(host), host)
    assert vhdfile.chain_digest(host.vdi_path("disk")) == before
    if sr_type == "lvm":
        merged_lv = sm.lv_size_for(parent.vhd_size + new_blocks * BLOCK_COST)
        assert used(host) == usage - child.lv_size - parent.lv_size + merged_lv
        assert forest(host).get(parent.uuid).lv_size == merged_lv
    else:
        assert used(host) == usage - child.vhd_size + new_blocks * BLOCK_COST
    after = forest(host)
    assert after.get(middle) is None and after.get(host.vdis["disk"]).parent.uuid == parent.uuid
    assert host.db.get("VDI", host.vdi_ref("disk"))["sm_config"]["vhd-parent"] == parent.uuid
    assert not host.db.find("VDI", uuid=middle)
    assert host.db.get("VDI", host.vdi_ref("disk"))["other_config"] == {"leaf-coalesce": "false"}


@pytest.mark.parametrize("sr_type", ["ext", "lvm"])
def test_live_leaf_coalesce_keeps_content_uuid_and_frees_the_right_bytes(sim_host, xapi_session, sr_type):
    host = sim_host(one_disk_pool(sr_type=sr_type))
    path = host.vdi_path("disk")
    before = vhdfile.chain_digest(path)
    trees = forest(host)
    leaf = trees.get(host.vdis["disk"])
    parent = leaf.parent
    new_blocks = len(leaf.blocks - parent.blocks)
    usage = used(host)
    scan(xapi_session(host), host)
    assert vhdfile.chain_digest(path) == before
    after = forest(host)
    assert list(after.images) == [host.vdis["disk"]]
    if sr_type == "lvm":
        assert used(host) == usage - parent.lv_size
        assert after.get(host.vdis["disk"]).lv_size == sm.full_lv_size(leaf.virtual_size)
    else:
        assert used(host) == usage - leaf.vhd_size + new_blocks * BLOCK_COST
    record = host.db.get("VDI", host.vdi_ref("disk"))
    assert "vhd-parent" not in record["sm_config"] and "paused" not in record["sm_config"]
    assert not host.db.find("VDI", uuid=parent.uuid)
    frozen = intervals(host, kind="io-frozen")
    assert len(frozen) == 1 and frozen[0].end is not None
    assert "Leaf-coalescing {}".format(host.vdis["disk"][:8]) in smlog(host)


def test_a_live_merge_over_the_timeout_is_abandoned_unchanged(sim_host, xapi_session):
    host = sim_host(one_disk_pool(speed_mib=8.0, live_timeout=0.2))
    sm.record_speed(host.sm.speed_log(host.srs["sr"]), 400 * MIB)
    path = host.vdi_path("disk")
    before = vhdfile.chain_digest(path)
    scan(xapi_session(host), host)
    log = smlog(host)
    assert "_doCoalesceLeaf: EXCEPTION <class 'util.SMException'>, Timed out" in log
    assert "Leaf-coalesce failed on {}".format(host.vdis["disk"][:8]) in log
    assert vhdfile.chain_digest(path) == before
    trees = forest(host)
    assert trees.get(host.vdis["disk"]).is_leaf_coalesceable() and trees.get(host.parents["disk"]).hidden
    frozen = intervals(host, kind="io-frozen")
    assert len(frozen) == 1 and 0.2 <= frozen[0].duration < 1.0


def test_forced_leaf_coalesce_skips_snapshot_coalesce_and_freezes_for_the_whole_merge(sim_host, xapi_session):
    host = sim_host(one_disk_pool(steps=[sc.write(0, 2), sc.snapshot("s"), sc.write(2, 6), sc.delete_snapshot("s")],
                                  speed_mib=40.0, live_timeout=0.05, vdi_other={"leaf-coalesce": "force"}))
    path = host.vdi_path("disk")
    before = vhdfile.chain_digest(path)
    scan(xapi_session(host), host)
    assert vhdfile.chain_digest(path) == before
    assert len(forest(host).images) == 1
    frozen = intervals(host, kind="io-frozen")
    assert len(frozen) == 1 and frozen[0].duration >= 6 * MIB / (40.0 * MIB) * 0.9
    log = smlog(host)
    assert "Leaf-coalesce forced, will not use timeout" in log and "Single-snapshotting" not in log
    assert "leaf-coalesce" not in host.db.get("VDI", host.vdi_ref("disk"))["other_config"]


def cleanup_processes(host, key="sr"):
    """Command lines of this host's GC processes for the SR (SR UUIDs repeat between tests' hosts)."""
    found = []
    for process in psutil.process_iter():
        try:
            line = process.cmdline()
        except psutil.Error:
            continue
        if os.path.join(host.state_dir, "bin", "cleanup") in line and host.srs[key] in line:
            found.append(line)
    return found


def systemctl(host, *args):
    command = [os.path.join(host.bin_dir, "systemctl")] + list(args)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    out, err = process.communicate()
    return process.returncode, out, err


def unit(sr_uuid):
    return "SMGC@" + sr_uuid.replace("-", "\\x2d")


def held_lock_inodes():
    with open("/proc/locks") as handle:
        return {int(line.split()[5].split(":")[2]) for line in handle if line.split()[1] == "POSIX"}


def test_one_gc_per_sr_seen_as_the_smgc_unit_running_cleanup_with_locks_and_task(sim_host, xapi_session, generation):
    host = sim_host(one_disk_pool(seed_speed_log=False), sm=generation)
    sr_uuid = host.srs["sr"]
    session = xapi_session(host)
    assert systemctl(host, "is-active", unit(sr_uuid)) == (3, "unknown\n", "")
    merge = host.sm.gate("gc.before-merge")
    scan(session, host, wait=False)
    scan(session, host, wait=False)
    assert merge.wait_reached(10)
    running = cleanup_processes(host)  # a script under its interpreter, as python3 runs cleanup.py
    assert [line[1:] for line in running] == [[os.path.join(host.state_dir, "bin", "cleanup"), "-g", "-u", sr_uuid]]
    assert systemctl(host, "is-active", unit(sr_uuid)) == (3, "activating\n", "")
    assert systemctl(host, "is-active", unit(sr_uuid) + ".service")[1] == "activating\n"
    assert systemctl(host, "is-active", "SMGC@" + sr_uuid)[1] == "unknown\n"  # not the unit SM started
    assert systemctl(host, "--quiet", "is-active", unit(sr_uuid)) == (3, "", "")
    code, out, err = systemctl(host, "stop", unit(sr_uuid))
    assert code == 1 and out == "" and err
    locks = os.path.join(host.state_dir, "lock", "sm", sr_uuid)
    assert {os.stat(os.path.join(locks, name)).st_ino for name in ("gc_active", "running")} <= held_lock_inodes()
    tasks = session.xenapi.task.get_all_records().values()
    assert [(t["name_label"], t["other_config"]) for t in tasks] == [
        ("Garbage Collection", {"applies_to": host.sr_ref("sr")})]
    merge.release()
    assert host.sm.wait_idle(30)
    assert not cleanup_processes(host) and not session.xenapi.task.get_all_records()
    assert systemctl(host, "is-active", unit(sr_uuid)) == (3, "inactive\n", "")
    assert os.stat(os.path.join(locks, "gc_active")).st_ino not in held_lock_inodes()
    assert smlog(host).count("=== SR {}: gc ===".format(sr_uuid)) == 1
    with open(host.sm.speed_log(sr_uuid)) as handle:
        assert len([float(line) for line in handle]) == 1


def test_a_gc_without_work_makes_no_task_and_smgc_runs_keep_no_quiet_period(sim_host, xapi_session):
    scenario = one_disk_pool(vdi_other={"leaf-coalesce": "false"})
    scenario["gc_quiet_seconds"] = 30.0
    host = sim_host(scenario)
    session = xapi_session(host)
    scan(session, host)
    assert "No work, exiting" in smlog(host) and not session.xenapi.task.get_all()
    session.xenapi.VDI.remove_from_other_config(host.vdi_ref("disk"), "leaf-coalesce")
    scan(session, host)  # `cleanup -g -u` is immediate: the quiet period is only for a daemonised GC
    assert len(forest(host).images) == 1 and "about to go quiet" not in smlog(host)


def test_deleting_a_snapshot_kicks_the_gc_that_merges_its_sibling(sim_host):
    host = sim_host("states")
    path = host.vdi_path("snapshot-present")
    before = vhdfile.chain_digest(path)
    vdi_ref = host.vdi_ref("snapshot-present")
    snapshot = host.db.get_field("VDI", vdi_ref, "snapshots")[0]
    host.sm.delete_vdi(host.db.get_field("VDI", snapshot, "uuid"))
    assert host.sm.wait_idle(30)
    assert list(forest(host, "lvm").get(host.vdis["snapshot-present"]).children) == []
    assert forest(host, "lvm").get(host.vdis["snapshot-present"]).parent is None
    assert vhdfile.chain_digest(path) == before
    assert not host.db.exists("VDI", snapshot)


def test_gc_runs_only_on_the_sr_master(sim_host, xapi_session):
    host = sim_host("pool-member")
    session = xapi_session(host)
    shared_before = vhdfile.chain_digest(host.vdi_path("shared-leaf"))
    for key in ("nfs", "local", "old"):
        scan(session, host, key)
    assert len(forest(host, "nfs").images) == 2
    assert "This host is NOT master, will not run" in smlog(host)
    assert len(forest(host, "local").images) == 1
    assert vhdfile.chain_digest(host.vdi_path("shared-leaf")) == shared_before


def test_switches_and_exclusions_keep_the_gc_off(sim_host, xapi_session):
    host = sim_host(one_disk_pool(sr_other={"gc": "false"}))
    scan(xapi_session(host), host)
    assert len(forest(host).images) == 2 and "GC is disabled for this SR" in smlog(host)
    states = sim_host("states")
    session = xapi_session(states)
    for key in ("ext", "lvm", "nolc"):
        scan(session, states, key)
    for disk in ("excluded-vdi", "excluded-reset", "excluded-caching", "excluded-sr"):
        image = sm.Forest(states.store(states.disk_spec(disk)["sr"]).scan()).get(states.vdis[disk])
        assert image.is_leaf_coalesceable(), disk
    assert "Skipping reset-on-boot" in smlog(states) and "Leaf-coalesce disabled for this SR" in smlog(states)


def test_no_space_to_leaf_coalesce_raises_sm_gc_no_space(sim_host, xapi_session):
    scenario = one_disk_pool(sr_type="lvm", sr_size_mib=128, speed_mib=0.5)
    scenario["vms"].append(sc.vm("filler", [sc.disk("filler", "sr", 84)], power_state="Halted"))
    host = sim_host(scenario)
    session = xapi_session(host)
    scan(session, host)
    assert len(forest(host).images) == 3
    assert "No space to leaf-coalesce {}".format(host.vdis["disk"][:8]) in smlog(host)
    messages = session.xenapi.message.get_all_records()
    assert [(m["name"], m["cls"], m["obj_uuid"]) for m in messages.values()] == [
        ("SM_GC_NO_SPACE", "SR", host.srs["sr"])]
    assert session.xenapi.SR.get_sm_config(host.sr_ref("sr"))["gc_no_space"] in messages
    record = session.xenapi.VDI.get_record(host.vdi_ref("disk"))
    assert record["other_config"]["leaf-coalesce"] == "offline"
    assert record["sm_config"]["gc_no_space"] in messages


def test_a_vm_writing_faster_than_the_merge_is_given_up_on(sim_host, xapi_session):
    host = sim_host(one_disk_pool(steps=[sc.write(0, 2), sc.snapshot("s"), sc.write(2, 2), sc.delete_snapshot("s")],
                                  size_mib=1024, speed_mib=16.0, writes_mib_s=32.0, live_timeout=0.05))
    slow_speed_log(host)
    session = xapi_session(host)
    scan(session, host)
    log = smlog(host)
    assert "Single-snapshotting" in log
    assert "VDI {} could not be coalesced".format(host.vdis["disk"]) in log
    image = forest(host).get(host.vdis["disk"])
    assert image is not None and image.is_leaf_coalesceable() and image.vhd_size > 4 * MIB
    frozen = intervals(host, kind="io-frozen")  # only the internal snapshot of each round paused the VM
    assert len(frozen) == log.count("Single-snapshotting") and all(i.duration < 1.0 for i in frozen)


def test_the_busy_scenario_leaf_grows_every_round_until_sm_gives_up(sim_host, xapi_session):
    host = sim_host("busy", speed_mib=16.0, writes_mib_s=32.0, leaf_mib=4, disk_mib=512, live_timeout=0.05)
    slow_speed_log(host, "ext")
    scan(xapi_session(host), host, "ext", wait=False)
    assert host.sm.wait_idle(60), "the GC is still snapshot-coalescing"
    log = smlog(host)
    sizes = [(int(line.split()[-5]), int(line.split()[-1])) for line in log.splitlines() if "-- Initial size" in line]
    assert len(sizes) >= 3 and all(after > before for before, after in sizes[1:])
    assert "Aborted coalesce" in log and "VDI {} could not be coalesced".format(host.vdis["busy-leaf"]) in log
    trees = forest(host, "ext")
    assert trees.get(host.vdis["busy-leaf"]).is_leaf_coalesceable() and len(trees.images) == 2
    frozen = intervals(host, "busy-db", kind="io-frozen")
    assert len(frozen) == log.count("Single-snapshotting") and all(i.duration < 1.0 for i in frozen)


def test_running_out_of_room_mid_merge_fails_it_and_changes_no_content(sim_host, xapi_session):
    host = sim_host(one_disk_pool(steps=[sc.write(0, 4), sc.snapshot("s"), sc.write(2, 8), sc.delete_snapshot("s")]))
    sr_uuid, vdi_uuid, parent_uuid = host.srs["sr"], host.vdis["disk"], host.parents["disk"]
    path = host.vdi_path("disk")
    before = vhdfile.chain_digest(path)
    parent_path = host.store("sr").path(parent_uuid)
    assert vhdfile.allocated_blocks(parent_path) == [0, 1] and vhdfile.allocated_blocks(path) == [1, 2, 3, 4]
    parent_size = os.path.getsize(parent_path)
    host.sm.fail_merge_after(sr_uuid, BLOCK_COST)
    session = xapi_session(host)
    scan(session, host)
    assert vhdfile.chain_digest(path) == before
    assert vhdfile.allocated_blocks(parent_path) == [0, 1, 2]  # part-way: one block appended, then ENOSPC
    assert parent_size < os.path.getsize(parent_path) <= parent_size + BLOCK_COST
    trees = forest(host)
    assert trees.get(vdi_uuid).is_leaf_coalesceable() and trees.get(parent_uuid).hidden
    log = smlog(host)
    assert "Coalesce failed on SR {}: No space left on device (Run out of space while coalescing.)".format(
        sr_uuid) in log
    assert "Leaf-coalesce failed on {}".format(vdi_uuid[:8]) in log
    frozen = intervals(host, kind="io-frozen")
    assert len(frozen) == 1 and frozen[0].end is not None
    assert "paused" not in host.db.get("VDI", host.vdi_ref("disk"))["sm_config"]
    scan(session, host)  # the next GC sees the SR full
    assert "No space to leaf-coalesce {}".format(vdi_uuid[:8]) in smlog(host)
    assert vhdfile.chain_digest(path) == before
    messages = sorted((m["name"], m["obj_uuid"]) for m in session.xenapi.message.get_all_records().values())
    assert messages == [("No space left on device", sr_uuid), ("SM_GC_NO_SPACE", sr_uuid)]
    lvm_host = sim_host(one_disk_pool(sr_type="lvm"))
    with pytest.raises(ValueError):
        lvm_host.sm.fail_merge_after(lvm_host.srs["sr"], BLOCK_COST)


# ---- the coalesce-leaf plugin -------------------------------------------------------------------------

def test_plugin_suspends_forces_and_resumes_a_busy_vm_on_lvm(sim_host, xapi_session):
    host = sim_host(one_disk_pool(sr_type="lvmoiscsi", shared=True, size_mib=128, speed_mib=16.0, sr_size_mib=1024,
                                  writes_mib_s=32.0, live_timeout=0.05,
                                  steps=[sc.write(0, 2), sc.snapshot("s"), sc.write(2, 2), sc.delete_snapshot("s")]))
    slow_speed_log(host)
    session = xapi_session(host)
    path = host.vdi_path("disk")
    writer = host.writers[0]
    with host.sm.io_lock(host.vdis["disk"]):
        expected = bytearray(vhdfile.read_chain(path))
    assert plugin(session, host, host.vms["vm"]) == "Success"
    writer.stop()
    for offset, data in writer.writes(len(expected)):
        expected[offset:offset + len(data)] = data
    assert vhdfile.chain_digest(path) == hashlib.sha256(expected).hexdigest()
    log = smlog(host)
    assert "could not be coalesced" in log and "Leaf-coalesce forced, will not use timeout" in log
    assert list(forest(host).images) == [host.vdis["disk"]]
    assert session.xenapi.VM.get_power_state(host.vm_ref("vm")) == "Running"
    suspended = intervals(host, kind="suspended")
    assert len(suspended) == 1 and suspended[0].end is not None
    assert "leaf-coalesce" not in host.db.get("VDI", host.vdi_ref("disk"))["other_config"]


def test_plugin_skips_non_lvm_disks(sim_host, xapi_session):
    host = sim_host(one_disk_pool(sr_type="ext"))
    session = xapi_session(host)
    assert plugin(session, host, host.vms["vm"]) == "VM has no leaf-coalesceable VDIs"
    assert "Skipping non-LVM VDI: {}".format(host.vdis["disk"]) in smlog(host)
    assert len(forest(host).images) == 2 and not intervals(host)


def test_plugin_refuses_vms_it_cannot_find_or_suspend(sim_host, xapi_session):
    host = sim_host(one_disk_pool(sr_type="lvm"))
    session = xapi_session(host)
    details = plugin_failure(session, host, "00000000-0000-4000-8000-000000000000")
    assert details[0] == "XENAPI_PLUGIN_FAILURE" and details[3].startswith("VM not found")
    host.db.faults.fail_vm_operation(host.vms["vm"], "suspend")
    details = plugin_failure(session, host, host.vms["vm"])
    assert details[:3] == ["XENAPI_PLUGIN_FAILURE", "leaf-coalesce", "Exception"]
    assert details[3].startswith("Failed to suspend the VM")
    assert session.xenapi.VM.get_power_state(host.vm_ref("vm")) == "Running"
    assert len(forest(host).images) == 1


def test_plugin_notes_srs_this_host_is_not_master_of(sim_host, xapi_session):
    scenario = one_disk_pool(sr_type="lvmoiscsi", shared=True)
    scenario.update(hosts=["xcp-ng-1", "xcp-ng-2"], master="xcp-ng-1", this_host="xcp-ng-2")
    host = sim_host(scenario)
    session = xapi_session(host)
    details = plugin_failure(session, host, host.vms["vm"])
    master = session.xenapi.host.get_uuid(session.xenapi.pool.get_master(session.xenapi.pool.get_all()[0]))
    assert details[3] == ("VM has no leaf-coalesceable VDIs\nNote:\nUnable to check VDIs on SR {} because this "
                          "host is not its master. Run on host {} to check that SR".format(host.srs["sr"], master))
    assert len(forest(host).images) == 2


def test_plugin_notes_srs_that_are_not_attached(sim_host, xapi_session):
    host = sim_host("pool-member")
    session = xapi_session(host)
    details = plugin_failure(session, host, host.vms["detached-vm"])
    assert details[3] == ("VM has no leaf-coalesceable VDIs\nNote:\nUnable to check VDIs on SR {} because it is "
                          "not attached".format(host.srs["old"]))


def test_writer_pauses_while_frozen(sim_host):
    host = sim_host(one_disk_pool(size_mib=64, writes_mib_s=20.0, speed_mib=400.0))
    writer = host.writers[0]
    assert wait_until(lambda: writer.written > 0, timeout=5)
    with host.sm.frozen(host.vdis["disk"]):
        frozen_at = writer.written
        time.sleep(0.1)
        assert writer.written == frozen_at
    assert intervals(host, kind="io-frozen")[0].duration >= 0.1


# ---- the two SM generations --------------------------------------------------------------------------

def lvm_vm_pool(**options):
    options.setdefault("sr_type", "lvmoiscsi")
    options.setdefault("shared", True)
    return one_disk_pool(**options)


def async_plugin(session, host, vm_uuid):
    host_ref = session.xenapi.host.get_by_uuid(host.host_uuid)
    return session.xenapi.Async.host.call_plugin(host_ref, "coalesce-leaf", "leaf-coalesce", {"vm_uuid": vm_uuid})


def task_done(session, task):
    return session.xenapi.task.get_status(task) != "pending"


def test_plugin_of_sm_3_2_does_not_wait_for_a_running_gc_and_leaves_force_to_it(sim_host, xapi_session):
    host = sim_host(lvm_vm_pool(), sm="3.2")
    session = xapi_session(host)
    path = host.vdi_path("disk")
    before = vhdfile.chain_digest(path)
    start = host.sm.gate("gc.loop-start")
    scan(session, host, wait=False)
    assert start.wait_reached(10)
    assert plugin(session, host, host.vms["vm"]) == "Success"  # returned while the GC still waits
    log = smlog(host)
    assert log.count("Another GC instance already active, exiting") >= 2
    assert forest(host).get(host.vdis["disk"]).is_leaf_coalesceable()  # nothing merged
    assert session.xenapi.VM.get_power_state(host.vm_ref("vm")) == "Running"
    suspended = intervals(host, kind="suspended")
    assert len(suspended) == 1 and suspended[0].end is not None
    assert host.db.get_field("VDI", host.vdi_ref("disk"), "other_config") == {"leaf-coalesce": "force"}
    start.release()
    assert host.sm.wait_idle(30)
    assert list(forest(host).images) == [host.vdis["disk"]] and vhdfile.chain_digest(path) == before
    assert "Leaf-coalesce forced, will not use timeout" in smlog(host)
    frozen = intervals(host, kind="io-frozen")  # the running VM froze for the whole forced merge
    assert len(frozen) == 1 and frozen[0].start > suspended[0].end
    assert "leaf-coalesce" not in host.db.get_field("VDI", host.vdi_ref("disk"), "other_config")


def test_plugin_of_sm_4_1_waits_for_the_running_gc_before_suspending(sim_host, xapi_session):
    host = sim_host(lvm_vm_pool(), sm="4.1")
    session = xapi_session(host)
    start = host.sm.gate("gc.loop-start")
    scan(session, host, wait=False)
    assert start.wait_reached(10)
    suspend = host.sm.gate("plugin.before-suspend")
    task = async_plugin(session, host, host.vms["vm"])
    assert wait_until(lambda: "Another GC instance already active, exiting" in smlog(host), timeout=10)
    assert not suspend.wait_reached(0.2) and session.xenapi.task.get_status(task) == "pending"
    start.release()
    assert suspend.wait_reached(10)
    assert host.sm.unit_state(host.srs["sr"]) != "activating"  # the plugin waited for the unit to end
    suspend.release()
    assert wait_until(lambda: task_done(session, task), timeout=30)
    assert session.xenapi.task.get_status(task) == "success"
    assert list(forest(host).images) == [host.vdis["disk"]]
    assert session.xenapi.VM.get_power_state(host.vm_ref("vm")) == "Running"
    log = smlog(host)
    unit_pid = re.search(r"SMGC: \[(\d+)\] === SR {}: gc ===".format(host.srs["sr"]), log).group(1)
    assert log.index("[{}] GC process exiting".format(unit_pid)) < log.index("Suspending VM")
    # the running GC merged the leaf; the plugin still set force, and no merge was left to delete it
    assert host.db.get_field("VDI", host.vdi_ref("disk"), "other_config") == {"leaf-coalesce": "force"}


def test_plugin_dry_run_of_sm_4_1_keeps_the_call_going_and_task_cancel_does_not_stop_it(sim_host, xapi_session):
    host = sim_host(lvm_vm_pool(), sm="4.1")
    session = xapi_session(host)
    vdi_uuid = host.vdis["disk"]
    dry_run = host.sm.gate("plugin.dry-run-loop")
    with host.sm.vdi_lock(vdi_uuid):  # busy: every pause fails fast, the leaf stays a candidate
        task = async_plugin(session, host, host.vms["vm"])
        assert dry_run.wait_reached(10)
    dry_run.release()
    assert "Failed to pause VDI {}".format(vdi_uuid) in smlog(host)
    assert session.xenapi.VM.get_power_state(host.vm_ref("vm")) == "Running"
    assert "leaf-coalesce" not in host.db.get_field("VDI", host.vdi_ref("disk"), "other_config")
    assert session.xenapi.task.cancel(task) == ""
    record = session.xenapi.task.get_record(task)
    assert record["status"] == "pending" and list(record["current_operations"].values()) == ["cancel"]
    rounds = smlog(host).count("Leaf-coalescing")
    assert wait_until(lambda: smlog(host).count("Leaf-coalescing") > rounds + 2, timeout=10)  # still going
    assert session.xenapi.task.get_status(task) == "pending"
    session.xenapi.VDI.add_to_other_config(host.vdi_ref("disk"), "leaf-coalesce", "false")  # no candidate left
    assert wait_until(lambda: task_done(session, task), timeout=10)
    record = session.xenapi.task.get_record(task)
    assert record["status"] == "success" and record["result"] == "<value>Success</value>"
    session.xenapi.task.destroy(task)
    assert not session.xenapi.task.get_all()
    assert forest(host).get(vdi_uuid).is_leaf_coalesceable()


def test_plugin_of_sm_3_2_ends_with_a_background_gc_that_keeps_the_quiet_period(sim_host, xapi_session):
    scenario = lvm_vm_pool()
    scenario["gc_quiet_seconds"] = 30.0
    host = sim_host(scenario, sm="3.2")
    session = xapi_session(host)
    vdi_uuid = host.vdis["disk"]
    with host.sm.vdi_lock(vdi_uuid):
        assert plugin(session, host, host.vms["vm"]) == "Success"
        assert wait_until(lambda: "GC active, about to go quiet" in smlog(host), timeout=10)
    assert host.sm.gc_running(host.srs["sr"]) and not cleanup_processes(host)
    assert [t["name_label"] for t in session.xenapi.task.get_all_records().values()] == ["Garbage Collection"]
    host.sm.stop(10)
    assert not host.sm.gc_running(host.srs["sr"])


def pid_lines(log, pid):
    """The texts SMlog holds from process `pid`."""
    return [line.split("] ", 1)[1] for line in log.splitlines() if " [{}] ".format(pid) in line]


def gc_runs_read(host, sr_uuid):
    """The SR's GC runs as the agent reads them from the host's SMlog."""
    log, health = smlogfile.read(config.load(host.agent_conf))
    assert health["status"] == "ok"
    return log.state["srs"][sr_uuid]


def plugin_after_a_unit_run(sim_host, xapi_session, generation):
    """The SR's SMGC unit ran once (leaf-coalesce off for the SR, so the leaf is left), then the plugin
    merged the leaf: (host, SMlog, the plugin's pid)."""
    host = sim_host(lvm_vm_pool(sr_other={"leaf-coalesce": "false"}), sm=generation)
    session = xapi_session(host)
    scan(session, host)
    session.xenapi.SR.remove_from_other_config(host.sr_ref("sr"), "leaf-coalesce")
    assert plugin(session, host, host.vms["vm"]) == "Success"
    assert host.sm.wait_idle(30) and list(forest(host).images) == [host.vdis["disk"]]
    log = smlog(host)
    return host, log, re.search(r"\[(\d+)\] VDI to consider: ", log).group(1)


def test_plugin_passes_of_sm_4_1_are_run_gc_calls_with_no_start_line(sim_host, xapi_session):
    host, log, plugin_pid = plugin_after_a_unit_run(sim_host, xapi_session, "4.1")
    sr_uuid = host.srs["sr"]
    texts = pid_lines(log, plugin_pid)
    assert log.count("=== SR {}: gc ===".format(sr_uuid)) == 1 and not any(t.startswith("=== SR") for t in texts)
    # each scan and the end of each pass: the SR's state summary, every tree the first time in a pass
    summary = "SR {} ('sr') (".format(sr_uuid[:4])
    assert texts[texts.index("GC process exiting, no work left") + 1].startswith(summary)
    assert texts.count("GC process exiting, no work left") == 3
    assert sum(1 for t in texts if t.startswith(summary) and t.endswith("VHD trees): ")) == 4  # leaves + 3 passes
    assert "        {}".format(host.sm.label(forest(host).get(host.vdis["disk"]))) in texts
    gc = gc_runs_read(host, sr_uuid)   # the unit's run and the plugin's three passes
    assert gc["runs_total"] == 4 and gc["results"] == {"success": 4}
    assert gc["vdis"][host.vdis["disk"][:8]][0] == "merged"


def test_plugin_passes_of_sm_3_2_are_gc_calls_and_the_last_a_daemon(sim_host, xapi_session):
    host, log, plugin_pid = plugin_after_a_unit_run(sim_host, xapi_session, "3.2")
    sr_uuid = host.srs["sr"]
    texts = pid_lines(log, plugin_pid)
    assert texts.count("=== SR {}: gc ===".format(sr_uuid)) == 3
    first_child = re.search(r"New PID \[(\d+)\]", "\n".join(texts)).group(1)
    daemon = re.search(r"Will finish as PID \[(\d+)\]", "\n".join(pid_lines(log, first_child))).group(1)
    assert texts[-2:] == ["=== SR {}: gc ===".format(sr_uuid), "New PID [{}]".format(first_child)]
    daemon_texts = pid_lines(log, daemon)
    assert daemon_texts[0].startswith("SR {} ('sr') (1 VDIs in 1 VHD trees): ".format(sr_uuid[:4]))
    assert daemon_texts[-2:] == ["GC process exiting, no work left",
                                 "SR {} ('sr') (1 VDIs in 1 VHD trees): no changes".format(sr_uuid[:4])]
    gc = gc_runs_read(host, sr_uuid)   # the unit's run and the plugin's three passes, the daemon's its last
    assert gc["runs_total"] == 4 and gc["results"] == {"success": 4}
    assert gc["vdis"][host.vdis["disk"][:8]][0] == "merged"


def test_plugin_passes_of_sm_4_1_are_runs_when_smlog_holds_no_start_line_of_the_sr(sim_host, xapi_session):
    """The plugin's first pass (the one that merged the leaf here) starts at the SR's state summary,
    which names the SR by 4 hex digits; its `Coalescing all in SR <uuid>` comes only later."""
    host = sim_host(lvm_vm_pool(), sm="4.1")
    session = xapi_session(host)
    assert plugin(session, host, host.vms["vm"]) == "Success"
    assert "=== SR" not in smlog(host) and list(forest(host).images) == [host.vdis["disk"]]
    gc = gc_runs_read(host, host.srs["sr"])
    assert gc["runs_total"] == 3 and gc["results"] == {"success": 3}
    assert gc["vdis"][host.vdis["disk"][:8]][0] == "merged"


def test_an_sr_with_no_name_is_summarised_by_its_full_uuid(sim_host, xapi_session):
    host = sim_host(one_disk_pool())
    session = xapi_session(host)
    session.xenapi.SR.set_name_label(host.sr_ref("sr"), "")
    scan(session, host)
    assert "SMGC: [{}] SR {} (2 VDIs in 1 VHD trees): \n".format(
        re.search(r"\[(\d+)\] === SR", smlog(host)).group(1), host.srs["sr"]) in smlog(host)


def test_async_task_of_a_failing_call_and_destroy_of_a_pending_task(sim_host, xapi_session):
    host = sim_host(lvm_vm_pool())
    session = xapi_session(host)
    task = async_plugin(session, host, "00000000-0000-4000-8000-000000000000")
    assert wait_until(lambda: task_done(session, task), timeout=10)
    record = session.xenapi.task.get_record(task)
    assert record["status"] == "failure" and record["error_info"][:3] == [
        "XENAPI_PLUGIN_FAILURE", "leaf-coalesce", "Exception"]
    session.xenapi.task.destroy(task)
    gate = host.sm.gate("plugin.before-suspend")
    task = async_plugin(session, host, host.vms["vm"])
    assert gate.wait_reached(10)
    session.xenapi.task.destroy(task)
    assert session.xenapi.task.get_status(task) == "pending"
    gate.release()
    assert wait_until(lambda: not session.xenapi.task.get_all(), timeout=30)


def test_snapshot_coalesce_rounds_pause_the_leaf(sim_host, xapi_session, generation):
    host = sim_host(one_disk_pool(live_timeout=0.05), sm=generation, snapshot_seconds=0.05)
    slow_speed_log(host)
    session = xapi_session(host)
    vdi_uuid = host.vdis["disk"]
    paused = host.sm.gate("gc.snapshot-paused")
    scan(session, host, wait=False)
    assert paused.wait_reached(10)
    assert host.db.get_field("VDI", host.vdi_ref("disk"), "sm_config")["paused"] == "true"
    base = [r for r in host.db.records("VDI").values() if r["is_a_snapshot"]]
    assert [(b["snapshot_of"], b["managed"]) for b in base] == [(host.vdi_ref("disk"), False)]
    assert [i.end for i in intervals(host, kind="io-frozen")] == [None]
    paused.release()
    assert host.sm.wait_idle(30)
    log = smlog(host)
    assert log.count("Single-snapshotting") == 1 and list(forest(host).images) == [vdi_uuid]
    frozen = intervals(host, kind="io-frozen")  # the snapshot's pause, then the live merge's
    assert len(frozen) == 2 and frozen[0].duration >= 0.05
    assert "paused" not in host.db.get_field("VDI", host.vdi_ref("disk"), "sm_config")


def test_give_up_rules_of_each_generation():
    lines = []
    growing = [(size, size * 2) for size in (4, 8, 16, 32, 64, 128)]
    old = sm.CoalesceTracker()
    assert [old.give_up(*sizes) for sizes in growing[:3]] == [False, False, True]
    assert old.reason == "Unexpected bump in size, compared to minimum achieved"
    new = sm.CoalesceTrackerV41(lines.append)
    assert [new.give_up(*sizes) for sizes in growing[:5]] == [False, False, False, False, True]
    assert new.reason == "Unexpected bump in size, compared to minimum achieved"
    assert lines[0] == "Calculated moving average as {}".format(sum(after for _, after in growing[:4]) / 4)
    below_average = sm.CoalesceTrackerV41()  # grows each round yet ends below the mean: progress
    assert not any(below_average.give_up(*sizes) for sizes in [(10, 100), (100, 90), (90, 80), (8, 9), (9, 10)])
    capped = sm.CoalesceTrackerV41()
    rounds = [capped.give_up(10, 10) for _ in range(25)]
    assert not any(rounds)  # never bigger: never judged, even past 20 rounds
    assert sm.GENERATIONS["3.2"].tracker.MAX_ITERATIONS == 10 and sm.CoalesceTrackerV41.MAX_ITERATIONS == 20


def test_speed_log_read_and_written_as_sm_does(tmp_path):
    path = str(tmp_path / "sr.speed_log")
    with open(path, "w") as handle:
        handle.write("100.0\n\n300.0\n")
    assert sm.read_speed(path) is None  # a blank line: SM finds "something bad" and has no speed
    with open(path, "w") as handle:
        handle.write("".join("{}\n".format(float(n)) for n in range(12)))
    sm.record_speed(path, 1000)
    with open(path) as handle:
        assert handle.read().splitlines() == [str(float(n)) for n in range(1, 12)] + ["1000.0"]


@pytest.mark.parametrize("speed, allocated, live", [(MIB, 5 * MIB - 1, True), (MIB, 5 * MIB, False),
                                                   (2 * MIB, 11 * MIB - 1, False), (None, 20 * MIB - 1, True),
                                                   (None, 20 * MIB, False)])
def test_live_decision_floors_as_sm_does(sim_host, speed, allocated, live):
    host = sim_host(one_disk_pool())
    path = host.sm.speed_log(host.srs["sr"])
    os.unlink(path)
    if speed:
        sm.record_speed(path, speed)
    leaf = type("Leaf", (), {"allocated_size": allocated, "uuid": host.vdis["disk"]})()
    assert sm.GcPass(host.sm, host.srs["sr"]).can_live_coalesce(leaf) is live


def test_vhd_parent_after_a_leaf_coalesce_under_a_grandparent(sim_host, xapi_session, generation):
    steps = [sc.write(0, 2), sc.snapshot("a"), sc.write(2, 2), sc.snapshot("b"), sc.write(4, 2),
             sc.delete_snapshot("b")]
    host = sim_host(one_disk_pool(steps=steps), sm=generation)
    session = xapi_session(host)
    trees = forest(host)
    leaf = trees.get(host.vdis["disk"])
    old_parent, grandparent = leaf.parent.uuid, leaf.parent.parent.uuid
    scan(session, host)
    after = forest(host)
    assert after.get(host.vdis["disk"]).parent.uuid == grandparent and after.get(old_parent) is None
    config = host.db.get_field("VDI", host.vdi_ref("disk"), "sm_config")
    if generation == "4.1":
        assert config["vhd-parent"] == old_parent  # stale until the next SR.scan
    else:
        assert "vhd-parent" not in config  # SM 3.2 deletes it under a grandparent too
    scan(session, host)
    assert host.db.get_field("VDI", host.vdi_ref("disk"), "sm_config")["vhd-parent"] == grandparent


def test_a_snapshot_vdi_leaf_is_leaf_coalesced_like_any_leaf(sim_host, xapi_session, generation):
    host = sim_host(one_disk_pool(steps=[sc.write(0, 4), sc.snapshot("s"), sc.write(2, 4), sc.delete_disk()]),
                    sm=generation)
    snapshots = [ref for ref, r in host.db.records("VDI").items() if r["is_a_snapshot"]]
    assert len(snapshots) == 1
    snap_uuid = host.db.get_field("VDI", snapshots[0], "uuid")
    assert forest(host).get(snap_uuid).is_leaf_coalesceable()
    scan(xapi_session(host), host)
    assert list(forest(host).images) == [snap_uuid] and host.db.exists("VDI", snapshots[0])


def test_pause_fails_fast_on_a_busy_vdi_and_the_merge_is_skipped(sim_host, xapi_session, generation):
    host = sim_host(one_disk_pool(), sm=generation)
    path = host.vdi_path("disk")
    before = vhdfile.chain_digest(path)
    with host.sm.vdi_lock(host.vdis["disk"]):
        scan(xapi_session(host), host)
    log = smlog(host)
    assert "Failed to pause VDI {}".format(host.vdis["disk"]) in log
    assert "Leaf-coalesce failed on {}".format(host.vdis["disk"][:8]) in log
    assert len(forest(host).images) == 2 and vhdfile.chain_digest(path) == before
    assert not intervals(host, kind="io-frozen")
