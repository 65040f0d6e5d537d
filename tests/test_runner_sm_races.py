"""The plugin and GC paths against each SM generation's races, held step by step by the simulated SM's
gates (tests/dom0sim/sm.py): a GC started just before the plugin, a plugin still running past its
limit (xapi's task.cancel does not stop it), a GC seen only through its lock, 4.1's stale vhd-parent,
and the freezes of snapshot-coalesce rounds."""
import json
import subprocess
import threading
import time

import pytest

from tests.agent_process import wait_for
from tests.dom0sim import scenarios as sc
from tests.runner_support import (REPOSITORY, agent_command, chain_parent, configure, digests, downtime,
                                  journal_steps, other_configs, power_states, run_now, small_scenario)
from xcoalesce_agent import config as config_module
from xcoalesce_agent.reclaim import repair

SM_GENERATIONS = ("3.2", "4.1")


def start_agent(host, *args):
    return subprocess.Popen(agent_command(host, "--now", "--json", *args), cwd=REPOSITORY, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True)


def finish(agent):
    stdout, stderr = agent.communicate(timeout=120)
    return agent.returncode, json.loads(stdout) if stdout.strip() else None, stderr


def sm_log(host):
    with open(host.sm.log_path) as stream:
        return stream.read()


def plugin_tasks(host):
    return [ref for ref, record in host.db.records("task").items() if record["name_label"] == "Async.host.call_plugin"]


def nothing_left(host, before):
    contents, flags, states = before
    assert host.sm.wait_idle(60)
    assert power_states(host) == states
    assert other_configs(host) == flags
    assert digests(host) == contents
    assert journal_steps(host) == []


@pytest.fixture
def host(sim_host):
    started = sim_host(small_scenario())
    started.before = (digests(started), other_configs(started), power_states(started))
    return started


def test_the_plugin_racing_a_gc_started_just_before_it(host, sm_generation):
    """A GC takes gc_active after the agent saw the SR idle and called the plugin, before the plugin's
    first pass. 3.2: the plugin does not wait: its passes exit, it resumes the VM having merged nothing
    and leaves `force` for that GC: the agent removes it before the GC looks, and the run fails naming
    the GC. 4.1: the plugin waits for the GC (which merges the leaf), then sets `force` on the merged
    leaf and leaves it: the agent removes it too."""
    configure(host, strategies="plugin", gc_wait_seconds=2, plugin_timeout_seconds=60)
    plugin_start = host.sm.gate("plugin.start")
    agent = start_agent(host, "--vm", host.vms["db"])
    assert plugin_start.wait_reached(60)
    scanning = host.sm.gate("gc.loop-start")
    host.sm.kick(host.srs["lvm"])
    assert scanning.wait_reached(30)
    plugin_start.release()
    if sm_generation == "4.1":
        scanning.release()
    code, document, stderr = finish(agent)
    (run,) = document["runs"]
    assert run["strategy"] == "plugin"
    if sm_generation == "4.1":
        assert (code, run["result"]) == (0, "success"), stderr
        assert chain_parent(host, "db-data") == ""
    else:
        assert (code, run["result"]) == (1, "failed"), stderr
        assert "the plugin merged nothing: the SR's garbage collector was running (" in run["reason"]
        assert other_configs(host)["db-data"].get("leaf-coalesce") != "force"
        scanning.release()  # the GC goes on now: it must find no `force` on the running VM's leaf
    nothing_left(host, host.before)
    assert "Leaf-coalesce forced, will not use timeout" not in sm_log(host)


def test_a_dry_run_pass_that_does_not_end_is_bounded(sim_host):
    """SM 4.1's final dry run keeps finding the leaf its forced pass could not merge (the VDI busy):
    the call is cut at plugin_timeout_seconds, the run fails with the reason within the bound, the
    VM (resumed by the plugin) runs, no `force` is left, and the step stays open, naming the task,
    until the next repair sees the plugin ended."""
    host = sim_host(small_scenario(), sm="4.1")
    before = (digests(host), other_configs(host), power_states(host))
    configure(host, strategies="plugin", plugin_timeout_seconds=2, gc_wait_seconds=2)
    with host.sm.vdi_lock(host.vdis["db-data"]):  # every pause of the leaf fails at once
        started = time.monotonic()
        code, document, stderr = run_now(host, "--vm", host.vms["db"])
        elapsed = time.monotonic() - started
    (run,) = document["runs"]
    assert (code, run["result"]) == (1, "failed"), stderr
    assert "the plugin did not finish within 2 s" in run["reason"] and "still runs" in run["reason"]
    assert elapsed < 2 + 8, elapsed  # the limit, a look after the cancel, the agent's start and inspection
    assert power_states(host)["db"] == "Running"
    assert other_configs(host)["db-data"].get("leaf-coalesce") != "force"
    (step,) = journal_steps(host)
    assert step["action"] == "suspend" and step["task"] in plugin_tasks(host)
    host.sm.stop()  # the dry run ends only with SM
    wait_for(lambda: not plugin_tasks(host), timeout=30, what="the plugin's task to end")
    repair.startup_repair(config_module.load(host.agent_conf))
    assert journal_steps(host) == []
    assert (digests(host), other_configs(host), power_states(host)) == before


def test_a_plugin_past_its_limit_leaves_the_vm_to_its_forced_pass(host):
    """The plugin's forced pass holds the SR (held at its merge) with the VM suspended when the limit
    passes: the agent does not resume the VM under it; it reports the run failed, keeps the step, and
    the plugin resumes the VM once its pass ended; the next run closes the step."""
    configure(host, strategies="plugin", plugin_timeout_seconds=1, gc_wait_seconds=1)
    busy = host.sm.vdi_lock(host.vdis["db-data"])
    busy.acquire()  # the plugin's first, unforced pass cannot pause the leaf: it stays for the forced one
    try:
        suspending = host.sm.gate("plugin.before-suspend")
        agent = start_agent(host, "--vm", host.vms["db"])
        assert suspending.wait_reached(60)
    finally:
        busy.release()
    merging = host.sm.gate("gc.before-merge")
    suspending.release()
    assert merging.wait_reached(30)
    code, document, stderr = finish(agent)
    (run,) = document["runs"]
    assert (code, run["result"]) == (1, "failed"), stderr
    assert "the plugin did not finish within 1 s" in run["reason"]
    assert "the VM stays suspended: the plugin's garbage collector pass still works on its SRs" in run["reason"]
    assert power_states(host)["db"] == "Suspended"
    (step,) = journal_steps(host)
    assert step["action"] == "suspend" and step["task"]
    merging.release()
    wait_for(lambda: not plugin_tasks(host), timeout=30, what="the plugin's task to end")
    assert power_states(host)["db"] == "Running"
    code, document, stderr = run_now(host, "--vm", host.vms["db"])
    assert (code, document["runs"]) == (0, []), stderr
    assert chain_parent(host, "db-data") == ""
    nothing_left(host, host.before)


def test_a_gc_seen_only_through_its_lock_holds_the_plugin_back(host):
    """A GC with no unit, no process and (before its first scan) no task, as the plugin's own: only its
    gc_active lock shows it. The agent waits for it, then skips the VM after gc_wait_seconds having
    suspended nothing."""
    configure(host, strategies="plugin", gc_wait_seconds=1)
    scanning = host.sm.gate("gc.loop-start")
    gc = threading.Thread(target=host.sm.gc, args=(host.srs["lvm"],))
    gc.start()
    try:
        assert scanning.wait_reached(30)
        assert host.sm.unit_state(host.srs["lvm"]) == "unknown"
        code, document, stderr = run_now(host, "--vm", host.vms["db"])
    finally:
        scanning.release()
        gc.join(60)
    (run,) = document["runs"]
    assert (code, run["result"]) == (0, "skipped"), stderr
    assert "waiting up to 1 s for the storage manager's GC to finish (SM's GC lock held by pid" in stderr
    assert run["reason"].startswith("the SR's garbage collector is busy")
    assert "suspended" not in {interval.kind for interval in host.db.downtime(host.vms["db"])}  # only the GC's merge
    nothing_left(host, host.before)


def grandparent_scenario():
    """db-data's leaf sits on a single-child parent that has a grandparent (a kept snapshot's base)."""
    steps = [sc.write(0, 4), sc.snapshot("kept"), sc.write(4, 4), sc.snapshot("s"), sc.write(0, 12),
             sc.delete_snapshot("s")]
    srs = [sc.sr("lvm", "lvm", 512, speed_mib=24)]
    return sc.pool("grandparent", srs, [sc.vm("db", [sc.disk("db-data", "lvm", 32, steps=steps)])])


def test_a_leaf_with_a_grandparent_is_judged_merged_from_the_scan(sim_host, sm_generation):
    """After the leaf coalesce SM 4.1 leaves `vhd-parent` naming the old parent until the next SR.scan:
    the agent judges the chain from `vhd-util scan` and reports the merge."""
    host = sim_host(grandparent_scenario())
    old_parent = chain_parent(host, "db-data")
    code, document, stderr = run_now(host)
    assert code == 0, stderr
    (run,) = [run for run in document["runs"] if run["vdi_uuid"] == host.vdis["db-data"]]
    assert run["result"] == "success" and run["reclaimed_bytes"] == run["estimated_bytes"] > 0, run
    if sm_generation == "4.1":
        assert chain_parent(host, "db-data") == old_parent  # stale: that VDI is gone
        assert not host.db.find("VDI", uuid=old_parent)


def test_snapshot_coalesce_pauses_are_counted_as_frozen(sim_host):
    """A running VM whose leaf is too big for SM's live rule at the logged speed: SM's GC snapshot-
    coalesces it, each round's internal snapshot pausing the leaf; the run's frozen_seconds counts
    those pauses as the simulation recorded them."""
    steps = [sc.write(0, 4), sc.snapshot("s"), sc.write(0, 16), sc.delete_snapshot("s")]
    srs = [sc.sr("local", "ext", 512, speed_mib=16)]
    host = sim_host(sc.pool("rounds", srs, [sc.vm("app", [sc.disk("app-root", "local", 64, steps=steps)])],
                            live_timeout=1.0), snapshot_seconds=0.4)
    code, document, stderr = run_now(host)
    assert code == 0, stderr
    (run,) = document["runs"]
    assert (run["strategy"], run["result"]) == ("gc", "success"), run
    assert "Single-snapshotting {}".format(host.vdis["app-root"][:8]) in sm_log(host)
    recorded = downtime(host, "app")
    assert recorded >= 0.4 and run["frozen_seconds"] > 0
    assert abs(run["frozen_seconds"] - recorded) < 0.3, (run["frozen_seconds"], recorded)

