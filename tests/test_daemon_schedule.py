"""The service acting on its own against the simulated host: mode, windows, the snapshot-deletion
trigger and the start-up repair, each with a real agent process and what /metrics shows after."""
import datetime
import os
import signal
import subprocess

import pytest

from tests.agent_process import Agent, wait_for
from tests.runner_support import (REPOSITORY, agent_command, chain_parent, configure, digests, files, other_configs,
                                  power_states, small_scenario)
from tests.test_daemon import value, write_config
from xcoalesce_agent import config as config_module
from xcoalesce_agent.inspect import inspection
from xcoalesce_agent.reclaim import journal

OPEN_WINDOW = "Mon-Sun 00:00-24:00"


def switch_mode(path, old, new):
    """Rewrite the `[coalesce] mode` of the config file at `path` from `old` to `new`."""
    with open(path) as stream:
        text = stream.read()
    assert "\nmode = {}\n".format(old) in text
    with open(path, "w") as stream:
        stream.write(text.replace("\nmode = {}\n".format(old), "\nmode = {}\n".format(new)))


def set_mode(host, mode, **coalesce):
    """The host's agent.conf (in `report` mode) with `mode` and more `[coalesce]` keys."""
    switch_mode(host.agent_conf, "report", mode)
    configure(host, **coalesce)


def closed_window():
    """Half an hour every day, twelve hours away from now."""
    hour = (datetime.datetime.now().hour + 12) % 24
    return "{:02d}:00-{:02d}:30".format(hour, hour)


def total(metrics, name, **labels):
    return sum(sample for sample_labels, sample in metrics.get(name, ())
               if set(labels.items()) <= set(sample_labels.items()))


def metrics_when(agent, condition, what, timeout=60.0):
    """The parsed metrics once `condition(metrics)` holds; fails at once if the agent exits."""
    def check():
        if agent.process.poll() is not None:
            raise AssertionError("the agent exited with {}: {}".format(agent.process.returncode, agent.stderr()))
        metrics = agent.metrics()
        return metrics if metrics and condition(metrics) else None
    return wait_for(check, timeout, what=what)


def test_auto_mode_in_an_open_window_reclaims_on_its_own(demo_host, tmp_path):
    set_mode(demo_host, "auto", windows=OPEN_WINDOW)
    config_path = write_config(demo_host, tmp_path / "agent.conf")
    reclaimable = inspection.inspect(config_module.load(config_path)).reclaimable_bytes
    contents = digests(demo_host)
    assert reclaimable > 0
    with Agent(config_path) as agent:
        metrics = metrics_when(agent, lambda found: total(found, "xcoalesce_reclaimed_bytes_total") > 0
                               and total(found, "xcoalesce_sr_reclaimable_bytes") < reclaimable,
                               "the reclaimed bytes and the inspection after the run")
        assert "Traceback" not in agent.stderr()
    assert total(metrics, "xcoalesce_leaf_coalesce_runs_total", result="success") == 3
    assert total(metrics, "xcoalesce_leaf_coalesce_runs_total", result="failed") == 0
    assert total(metrics, "xcoalesce_sr_reclaimable_bytes") == 0
    assert total(metrics, "xcoalesce_reclaimed_bytes_total") > 0
    assert all(chain_parent(demo_host, key) == "" for key in ("web-01-root", "db-01-data", "mail-01-root"))
    assert digests(demo_host) == contents


@pytest.mark.parametrize("mode,window", [("report", OPEN_WINDOW), ("auto", None)], ids=["report", "closed-window"])
def test_no_run_in_report_mode_or_outside_the_windows(demo_host, tmp_path, mode, window):
    set_mode(demo_host, mode, windows=window or closed_window())
    before = (files(demo_host), other_configs(demo_host), power_states(demo_host))
    with Agent(write_config(demo_host, tmp_path / "agent.conf")) as agent:
        agent.wait_for_metric("xcoalesce_sr_reclaimable_bytes")
        agent.signal(signal.SIGHUP)  # the second inspection comes after the first one's scheduled run
        metrics = metrics_when(agent, lambda found: value(found, "xcoalesce_inspections_total", result="success") == 2,
                               "a second inspection")
    assert total(metrics, "xcoalesce_leaf_coalesce_runs_total") == 0
    assert total(metrics, "xcoalesce_reclaimed_bytes_total") == 0
    assert total(metrics, "xcoalesce_sr_reclaimable_bytes") > 0
    assert (files(demo_host), other_configs(demo_host), power_states(demo_host)) == before


def test_a_snapshot_deletion_leads_to_a_run_on_its_sr_only(demo_host, tmp_path):
    set_mode(demo_host, "off", windows=OPEN_WINDOW, trigger_on_snapshot_delete="true")
    config_path = write_config(demo_host, tmp_path / "agent.conf")
    iscsi, local = demo_host.srs["iscsi"], demo_host.srs["local"]
    with Agent(config_path) as agent:
        agent.wait_for_metric("xcoalesce_sr_reclaimable_bytes")
        assert "following snapshot deletions" not in agent.stderr()  # mode off: no watcher
        switch_mode(config_path, "off", "auto")
        agent.signal(signal.SIGHUP)
        wait_for(lambda: "following snapshot deletions" in agent.stderr(), what="the snapshot watcher")
        (snapshot,) = [ref for ref, record in demo_host.db.records("VDI").items() if record["is_a_snapshot"]]
        demo_host.store("iscsi").remove(demo_host.db.get_field("VDI", snapshot, "uuid"))
        demo_host.db.destroy("VDI", snapshot)
        metrics = metrics_when(agent, lambda found: total(found, "xcoalesce_reclaimed_bytes_total", sr_uuid=iscsi) > 0
                               and value(found, "xcoalesce_sr_reclaimable_bytes", sr_uuid=iscsi) == 0,
                               "a run on the SR of the deleted snapshot")
        assert "scheduled leaf coalesce on SR {}:".format(iscsi) in agent.stderr()
    assert total(metrics, "xcoalesce_leaf_coalesce_runs_total", sr_uuid=iscsi, result="success") >= 1
    assert total(metrics, "xcoalesce_leaf_coalesce_runs_total", sr_uuid=local) == 0
    assert value(metrics, "xcoalesce_sr_reclaimable_bytes", sr_uuid=local) > 0
    assert chain_parent(demo_host, "db-01-data") == ""
    assert chain_parent(demo_host, "web-01-root") != "" and chain_parent(demo_host, "mail-01-root") != ""


def smlog(host):
    with open(host.sm.log_path) as stream:
        return stream.read()


def test_a_journal_left_by_a_killed_run_is_repaired_at_start(sim_host, tmp_path):
    host = sim_host(small_scenario())
    configure(host, strategies="plugin")
    states, flags = power_states(host), other_configs(host)
    steps = journal.Journal(os.path.join(host.state_dir, "agent-state"))
    host.db.faults.fail_vm_operation(host.vms["db"], "resume")  # keeps it suspended past the kill
    killed = subprocess.Popen(agent_command(host, "--now", "--vm", host.vms["db"]), cwd=REPOSITORY,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: power_states(host)["db"] == "Suspended", timeout=60, interval=0.01, what="the suspend")
    finally:
        killed.kill()
        killed.wait(30)
    wait_for(lambda: "Resuming VM {}".format(host.vms["db"]) in smlog(host), timeout=60,
             what="the plugin's resume, refused")
    wait_for(lambda: host.sm.wait_idle(5) and not host.db.get_field("VM", host.vm_ref("db"), "current_operations"),
             timeout=60, what="the simulated GCs to finish")
    host.db.faults.clear()
    assert [step["action"] for step in steps.steps()] == ["suspend"]
    assert power_states(host)["db"] == "Suspended"
    with Agent(write_config(host, tmp_path / "agent.conf")) as agent:
        agent.wait_for_metric("xcoalesce_sr_reclaimable_bytes")
        assert "repaired after an interrupted run: VM {}: resumed".format(host.vms["db"]) in agent.stderr()
    assert power_states(host) == states
    assert other_configs(host) == flags
    assert not any("force" in config.values() for config in other_configs(host).values())
    assert steps.steps() == []
