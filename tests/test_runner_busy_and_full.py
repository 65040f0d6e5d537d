"""`--now` against two hard cases of the simulated host: a VM writing faster than its SR merges, and an
SR filling up in the middle of a merge. Whatever happens, no VM stays down, no flag stays behind and no
other disk's content changes."""
import json
import re
import subprocess
import time

import pytest

from tests.agent_process import wait_for
from tests.dom0sim import scenarios as sc, sm
from tests.runner_support import (KEEP_SNAPSHOT, REPOSITORY, agent_command, chain_parent, configure, digests,
                                  downtime, other_configs, power_states, run_now, small_scenario)


SM_GENERATIONS = ("3.2", "4.1")
SPEED_MIB = 16


def busy_pool():
    """The busy scenario, small and fast, with a quiet neighbour on the same SR; its VM starts writing
    only when the test says so (`start_busy_writer`). Its leaf takes 1 s to merge at the logged speed:
    with SM's live rule (whole seconds at that speed under half its 0.05 s limit) only a leaf under
    1 s merges live, so SM snapshot-coalesces it. The agent predicts 6 s for SM's GC to do so (one
    round's pause and SM's 5 s live limit, as it cannot know this SM's limit) and over 1 s for its own
    live merge: a maximum of 60 s lets both run, one of 0.5 s neither. (The leaf the GC gives up on
    grows with the time its rounds take, which a loaded machine stretches; within the 512 MiB disk,
    its live merge stays under 60 s.)"""
    scenario = sc.busy(speed_mib=SPEED_MIB, writes_mib_s=0.0, leaf_mib=SPEED_MIB, disk_mib=512, live_timeout=0.05)
    scenario["vms"].append(sc.vm("quiet", [sc.disk("quiet-root", "ext", 32, steps=KEEP_SNAPSHOT)]))
    return scenario


def start_busy_writer(host):
    """busy-db writes 1.125 x faster than the SR merges, from the middle of its disk: each round's leaf
    ends bigger than it started, and either SM generation gives up within five rounds."""
    disk = host.disk_spec("busy-leaf")
    return host.sm.start_writer(host.vms["busy-db"], host.srs["ext"], host.vdis["busy-leaf"],
                                SPEED_MIB * sm.MIB * 9 // 8,
                                start_offset=disk["size_mib"] * sm.MIB // 2)


def settle(host):
    wait_for(lambda: host.sm.wait_idle(5), timeout=60, what="the simulated GCs to finish")


@pytest.mark.parametrize("max_freeze", [60.0, 0.5])
def test_a_vm_writing_faster_than_the_merge(sim_host, max_freeze):
    host = sim_host(busy_pool())
    configure(host, max_freeze_seconds=max_freeze)
    quiet = {"quiet-root": digests(host)["quiet-root"]}
    flags, states = other_configs(host), power_states(host)
    agent = subprocess.Popen(agent_command(host, "--now", "--json", "--vm", host.vms["busy-db"]), cwd=REPOSITORY,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    try:
        wait_for(lambda: host.sm.gc_running(host.srs["ext"]) or agent.poll() is not None, timeout=60,
                 interval=0.01, what="the agent's GC pass")
        writer = start_busy_writer(host)  # the VM's burst starts as the GC does: SM has to snapshot-coalesce
        stdout, stderr = agent.communicate(timeout=120)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.communicate()
    document = json.loads(stdout)
    assert agent.returncode == 0, stderr
    (run,) = document["runs"]
    if max_freeze == 60.0:
        with open(host.sm.log_path) as stream:
            log = stream.read()
        assert "VDI {} could not be coalesced".format(host.vdis["busy-leaf"]) in log  # the GC pass gave up
        assert (run["strategy"], run["result"]) == ("live", "success"), run["reason"]
        assert 1.0 <= run["predicted_freeze_seconds"] <= max_freeze
        assert 0 < run["frozen_seconds"] <= max_freeze and downtime(host, "busy-db") <= max_freeze
        assert chain_parent(host, "busy-leaf") == ""
    else:
        assert run["result"] == "skipped", run
        predicted = re.search(r"predicted freeze ([0-9.]+) s \(\w+\) over the maximum {:g} s".format(max_freeze),
                              run["reason"])
        assert predicted and float(predicted.group(1)) > max_freeze, run["reason"]
        assert downtime(host, "busy-db") == 0 and chain_parent(host, "busy-leaf") != ""
    writer.stop()
    settle(host)
    assert power_states(host) == states and other_configs(host) == flags
    assert "paused" not in host.db.get("VDI", host.vdi_ref("busy-leaf"))["sm_config"]
    assert {"quiet-root": digests(host)["quiet-root"]} == quiet and chain_parent(host, "quiet-root") != ""


def test_the_sr_filling_up_mid_merge(sim_host):
    host = sim_host(small_scenario())
    configure(host, strategies="live")
    contents, flags, states = digests(host), other_configs(host), power_states(host)
    host.sm.fail_merge_after(host.srs["local"], sm.BLOCK_COST)
    started = time.monotonic()
    code, document, stderr = run_now(host, "--vm", host.vms["app"])
    assert code == 1, stderr
    assert time.monotonic() - started < 60
    (run,) = document["runs"]
    assert (run["vdi_uuid"], run["result"]) == (host.vdis["app-root"], "failed")
    assert run["reason"] and "\n" not in run["reason"] and "Traceback" not in stderr
    settle(host)
    with open(host.sm.log_path) as stream:
        log = stream.read()
    assert "Coalesce failed on SR {}: No space left on device".format(host.srs["local"]) in log
    assert host.db.find("message", name="SM_GC_NO_SPACE")
    assert digests(host) == contents and chain_parent(host, "app-root") != ""
    assert power_states(host) == states
    assert all("paused" not in host.db.get("VDI", host.vdi_ref(key))["sm_config"] for key in host.parents)
    left = other_configs(host)
    assert left.pop("app-root").get("leaf-coalesce") in (None, "offline")  # SM's own note may stay
    flags.pop("app-root")
    assert left == flags
