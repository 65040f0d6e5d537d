"""The plugin path against both SM generations' races, held step by step by the simulated SM's gates.

Needs the simulated host to take `sm="3.2"` or `sm="4.1"` and `host.sm.gate(name)` (an object with
`wait_reached(timeout) -> bool` and `release()`; an armed gate holds every SM step reaching it until
released). Skipped while the simulated SM has no `gate`. `host.sm.kick(sr_uuid)` starts a GC as SR.scan
does; the unit GC shows through `systemctl is-active SMGC@<sr-uuid, - as \\x2d>` (SM's own unit name).
"""
import json
import subprocess

import pytest

from tests.dom0sim import sm
from tests.runner_support import (REPOSITORY, agent_command, chain_parent, configure, digests, other_configs,
                                  power_states, small_scenario)

if not hasattr(sm.StorageManager, "gate"):
    pytest.skip("the simulated SM has no SM generations and gates yet", allow_module_level=True)


def start_agent(host, *args):
    return subprocess.Popen(agent_command(host, "--now", "--json", *args), cwd=REPOSITORY, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True)


def finish(agent):
    stdout, stderr = agent.communicate(timeout=120)
    return agent.returncode, json.loads(stdout) if stdout.strip() else None, stderr


def nothing_left(host, before):
    contents, flags, states = before
    assert host.sm.wait_idle(60)
    assert power_states(host) == states
    assert other_configs(host) == flags
    assert digests(host) == contents


@pytest.fixture(params=["3.2", "4.1"])
def generation(request):
    return request.param


@pytest.fixture
def host(sim_host, generation):
    started = sim_host(small_scenario(), sm=generation)
    started.before = (digests(started), other_configs(started), power_states(started))
    return started


def test_the_plugin_racing_a_gc_started_just_before_it(host, generation):
    """A GC starts after the agent saw the SR idle, while the plugin does its first pass.
    3.2: the plugin does not wait; it resumes the VM having merged nothing and leaves `force`: the
    agent removes it, no VM stays suspended, the run fails saying the GC was running. 4.1: the
    plugin waits for that GC, then merges."""
    configure(host, strategies="plugin", gc_wait_seconds=3, plugin_timeout_seconds=60)
    before_suspend = host.sm.gate("plugin.before-suspend")
    agent = start_agent(host, "--vm", host.vms["db"])
    assert before_suspend.wait_reached(60)
    merging = host.sm.gate("gc.before-merge")
    host.sm.kick(host.srs["lvm"])
    assert merging.wait_reached(30)
    before_suspend.release()
    if generation == "4.1":
        merging.release()
    code, document, stderr = finish(agent)
    merging.release()
    (run,) = document["runs"]
    assert run["strategy"] == "plugin"
    if generation == "4.1":
        assert (code, run["result"]) == (0, "success"), stderr
        assert chain_parent(host, "db-data") == ""
    elif run["result"] == "failed":  # 3.2; unless the plugin's first, unforced pass merged the leaf
        assert code == 1 and "the plugin merged nothing: the SR's garbage collector was running" in run["reason"]
    assert other_configs(host)["db-data"].get("leaf-coalesce") != "force"
    nothing_left(host, host.before)


def test_a_dry_run_pass_that_does_not_end_is_bounded(host):
    """The plugin's final dry-run pass goes on: the call is cut at plugin_timeout_seconds, the run
    fails with the reason, and the VM runs."""
    configure(host, strategies="plugin", plugin_timeout_seconds=3)
    dry_run = host.sm.gate("plugin.dry-run")
    agent = start_agent(host, "--vm", host.vms["db"])
    assert dry_run.wait_reached(60)
    code, document, stderr = finish(agent)
    dry_run.release()
    (run,) = document["runs"]
    assert (code, run["result"]) == (1, "failed"), stderr
    assert "the plugin did not finish within 3 s" in run["reason"]
    assert power_states(host)["db"] == "Running"
    assert other_configs(host)["db-data"].get("leaf-coalesce") != "force"
    nothing_left(host, host.before)


def test_a_gc_seen_only_through_its_lock_holds_the_plugin_back(host):
    """A GC the plugin runs in its own process shows only its lock: the agent waits for it before it
    calls the plugin, and gives up after gc_wait_seconds without suspending anything."""
    configure(host, strategies="plugin", gc_wait_seconds=2)
    merging = host.sm.gate("gc.before-merge")
    host.sm.kick(host.srs["lvm"])
    assert merging.wait_reached(30)
    agent = start_agent(host, "--vm", host.vms["db"])
    code, document, stderr = finish(agent)
    merging.release()
    assert code in (0, 1), stderr
    assert power_states(host)["db"] == "Running"
    assert all(run["result"] in ("failed", "skipped") for run in document["runs"])
    assert "garbage collector" in " ".join(run["reason"] for run in document["runs"])
    nothing_left(host, host.before)
