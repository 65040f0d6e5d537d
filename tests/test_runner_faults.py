"""Faults during leaf-coalesce runs: whatever fails, no VM stays suspended or paused, no flag the agent
set stays behind, and no virtual disk content changes. Each test ends with the host as it was, or
coalesced with identical contents."""
import json
import os
import signal
import subprocess

import pytest

from tests.agent_process import wait_for
from tests.runner_support import (REPOSITORY, agent_command, chain_parent, configure, digests, journal_steps,
                                  other_configs, power_states, run_now, small_scenario)

SM_GENERATIONS = ("3.2", "4.1")


@pytest.fixture
def host(sim_host):
    started = sim_host(small_scenario())
    started.before = (digests(started), other_configs(started), power_states(started))
    return started


def step_seen(host, action, value=None):
    return any(step["action"] == action and (value is None or step.get("value") == value)
               for step in journal_steps(host))


def assert_nothing_left_behind(host):
    """No VM down that ran before, no flag the agent set, identical contents, an empty journal."""
    contents, flags, states = host.before
    settle(host)
    assert power_states(host) == states
    assert other_configs(host) == flags
    assert digests(host) == contents
    assert journal_steps(host) == []


def settle(host):
    """Until the simulated SM has no GC running (the plugin may start one more after a kill)."""
    wait_for(lambda: host.sm.wait_idle(5), timeout=60, what="the simulated GCs to finish")


def start_agent(host, *args):
    return subprocess.Popen(agent_command(host, "--now", "--json", *args), cwd=REPOSITORY, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True)


def failed_plugin_run(host):
    """A `--now` run by the plugin strategy that has to fail (exit 1): (document, stderr)."""
    configure(host, strategies="plugin")
    code, document, stderr = run_now(host)
    assert code == 1, stderr
    return document, stderr


def db_data_run(host, document):
    (run,) = [run for run in document["runs"] if run["vdi_uuid"] == host.vdis["db-data"]]
    return run


def when_step(host, action, value=None):
    wait_for(lambda: step_seen(host, action, value), timeout=60, interval=0.01,
             what="journal step {} {}".format(action, value or ""))


def test_xapi_dropping_mid_run(host):
    configure(host, strategies="live")
    agent = start_agent(host, "--vm", host.vms["app"])
    when_step(host, "leaf-coalesce", "force")
    host.db.faults.drop_connections(from_call=1)
    stdout, stderr = agent.communicate(timeout=120)
    assert agent.returncode == 3, stderr
    assert "xapi" in stderr and "Traceback" not in stderr
    assert step_seen(host, "leaf-coalesce")  # what could not be undone waits in the journal
    host.db.faults.clear()
    code, _, stderr = run_now(host, "--vm", host.vms["app"])
    assert code == 0, stderr
    assert chain_parent(host, "app-root") == ""
    assert_nothing_left_behind(host)


def test_the_plugin_failing(host):
    host.db.faults.fail_method("host.call_plugin", "XENAPI_PLUGIN_FAILURE", "leaf-coalesce", "Exception", "Error")
    document, _ = failed_plugin_run(host)
    run = db_data_run(host, document)
    assert run["result"] == "failed" and "XENAPI_PLUGIN_FAILURE" in run["reason"]
    assert chain_parent(host, "db-data") != ""
    assert_nothing_left_behind(host)


def test_vhd_util_failing(host):
    tool = os.path.join(host.bin_dir, "vhd-util")
    os.rename(tool, tool + ".real")
    with open(tool, "w") as stream:
        stream.write("#!/bin/sh\necho 'vhd-util: failed' >&2\nexit 1\n")
    os.chmod(tool, 0o755)
    code, document, stderr = run_now(host)
    assert (code, document["runs"]) == (0, []), stderr
    assert "vhd-util" in stderr and "Traceback" not in stderr
    assert_nothing_left_behind(host)
    os.unlink(tool)
    code, document, stderr = run_now(host)
    assert (code, document) == (3, None)
    assert stderr.startswith("xcoalesce-agent: error: ") and "Traceback" not in stderr

    os.rename(tool + ".real", tool)
    configure(host, strategies="live")
    agent = start_agent(host, "--vm", host.vms["app"])
    when_step(host, "leaf-coalesce", "force")
    os.rename(tool, tool + ".real")
    with open(tool, "w") as stream:
        stream.write("#!/bin/sh\nexit 1\n")
    os.chmod(tool, 0o755)
    stdout, stderr = agent.communicate(timeout=120)
    assert agent.returncode in (1, 3) and "Traceback" not in stderr
    os.replace(tool + ".real", tool)
    assert_nothing_left_behind(host)


def test_the_vm_refusing_to_suspend(host):
    host.db.faults.fail_vm_operation(host.vms["db"], "suspend")
    document, _ = failed_plugin_run(host)
    run = db_data_run(host, document)
    assert run["result"] == "failed" and "Failed to suspend the VM" in run["reason"]
    assert_nothing_left_behind(host)


def test_the_vm_refusing_to_resume_is_resumed_by_the_next_run(host):
    host.db.faults.fail_vm_operation(host.vms["db"], "resume")
    _, stderr = failed_plugin_run(host)
    assert power_states(host)["db"] == "Suspended"
    assert "could not undo everything yet" in stderr and step_seen(host, "suspend")
    host.db.faults.clear()
    code, document, stderr = run_now(host)
    assert code == 0, stderr
    assert chain_parent(host, "db-data") == ""
    assert_nothing_left_behind(host)


def test_the_sr_detaching(host):
    configure(host, strategies="live")
    agent = start_agent(host, "--vm", host.vms["app"])
    when_step(host, "leaf-coalesce", "force")
    for pbd in host.db.find("PBD", SR=host.sr_ref("local")):
        host.db.update("PBD", pbd, currently_attached=False)
    host.db.faults.fail_method("SR.scan", "SR_BACKEND_FAILURE_47", "", "The SR is not available")
    stdout, stderr = agent.communicate(timeout=120)
    assert agent.returncode in (0, 1), stderr
    assert "Traceback" not in stderr
    assert_nothing_left_behind(host)


def test_disk_full_during_the_run(host):
    configure(host, strategies="live")
    agent = start_agent(host, "--vm", host.vms["app"])
    when_step(host, "leaf-coalesce", "force")
    record = host.db.get("SR", host.sr_ref("local"))
    host.db.update("SR", host.sr_ref("local"), physical_size=int(record["physical_utilisation"]))
    stdout, stderr = agent.communicate(timeout=120)
    document = json.loads(stdout)
    (run,) = document["runs"]
    assert run["result"] in ("failed", "success"), run
    if run["result"] == "failed":
        assert agent.returncode == 1 and chain_parent(host, "app-root") != ""
    host.before[1]["app-root"] = other_configs(host)["app-root"]  # SM's own `offline` note may stay
    assert other_configs(host)["app-root"].get("leaf-coalesce") != "force"
    assert_nothing_left_behind(host)


@pytest.mark.parametrize("strategy,action,value", [
    ("live", "leaf-coalesce", "false"),
    ("live", "leaf-coalesce", "force"),
    ("plugin", "suspend", None),
])
def test_killed_at_each_host_changing_step_and_started_again(host, strategy, action, value):
    configure(host, strategies=strategy)
    vm = "db" if strategy == "plugin" else "app"
    if strategy == "plugin":
        host.db.faults.fail_vm_operation(host.vms[vm], "resume")  # keeps it suspended past the kill
    agent = start_agent(host, "--vm", host.vms[vm])
    when_step(host, action, value)
    if strategy == "plugin":
        wait_for(lambda: power_states(host)[vm] == "Suspended", timeout=60, interval=0.01, what="the suspend")
    elif value == "false":  # the journal comes first: wait for the change itself, then kill
        wait_for(lambda: other_configs(host)["idle-root"].get("leaf-coalesce") == "false", timeout=60,
                 interval=0.01, what="the hold")
    agent.send_signal(signal.SIGKILL)
    agent.communicate(timeout=30)
    assert step_seen(host, action, value)
    host.db.faults.clear()
    settle(host)
    code, document, stderr = run_now(host, "--vm", host.vms[vm])
    assert code == 0, stderr
    assert "repaired after an interrupted run" in stderr
    assert chain_parent(host, "{}-{}".format(vm, "data" if vm == "db" else "root")) == ""
    assert_nothing_left_behind(host)
