"""What interrupted runs leave on the host, undone from the agent's marks in xapi alone: after a
lost or corrupt journal (`--repair`, the service's cycle, a plain `--now`), for marks another host
made on an SR this host masters, and never over a flag someone else changed since."""
import json
import os
import signal
import subprocess

import pytest

from tests.agent_process import Agent, wait_for
from tests.dom0sim.xapi import tasks, vm as sim_vm
from tests.runner_support import (REPOSITORY, agent_command, configure, digests, other_configs, power_states,
                                  run_now, small_scenario)
from tests.test_daemon import value, write_config
from tests.test_runner_faults import journal_steps, settle, start_agent, when_step
from xcoalesce_agent import config as config_module
from xcoalesce_agent.export import collector
from xcoalesce_agent.inspect import inspection, marks

OTHER_HOST = "0b5e7b0a-3a1e-4b53-9d5b-6f0c2a1d9e77"


@pytest.fixture
def host(sim_host):
    started = sim_host(small_scenario())
    started.before = (digests(started), other_configs(started), power_states(started))
    return started


def agent(host, *args):
    """`xcoalesce-agent ARGS`: (exit code, stdout, stderr)."""
    process = subprocess.Popen(agent_command(host, *args), cwd=REPOSITORY, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, universal_newlines=True)
    stdout, stderr = process.communicate(timeout=120)
    return process.returncode, stdout, stderr


def vm_marks(host):
    return {name: host.db.get_field("VM", host.vm_ref(name), "other_config").get(marks.VM_MARK_KEY)
            for name in host.vms}


def marked_vdis(host):
    return sorted(key for key, other_config in other_configs(host).items() if marks.VDI_MARK_KEY in other_config)


def plugin_pending(host):
    return any(record["status"] == "pending" and record["name_label"] == "Async.host.call_plugin"
               for record in host.db.records("task").values())


def kill_mid_step(host, strategy, action, value):
    """`--now` killed with SIGKILL once the step's change is made (as in test_runner_faults), then
    left to settle: the simulated GC idle, the plugin's call over, the VM still suspended."""
    configure(host, strategies=strategy)
    vm = "db" if strategy == "plugin" else "app"
    if strategy == "plugin":
        host.db.faults.fail_vm_operation(host.vms[vm], "resume")
    process = start_agent(host, "--vm", host.vms[vm])
    when_step(host, action, value)
    if strategy == "plugin":
        wait_for(lambda: power_states(host)[vm] == "Suspended", timeout=60, interval=0.01, what="the suspend")
    elif value == "false":
        wait_for(lambda: other_configs(host)["idle-root"].get("leaf-coalesce") == "false", timeout=60,
                 interval=0.01, what="the hold")
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    wait_for(lambda: not plugin_pending(host), timeout=60, what="the plugin's call to end")
    settle(host)
    host.db.faults.clear()  # only now: the plugin's own resume must fail
    assert marked_vdis(host)
    if strategy == "plugin":
        assert power_states(host)["db"] == "Suspended" and vm_marks(host)["db"]


def lose_journal(host, how):
    path = os.path.join(host.state_dir, "agent-state", "journal.json")
    if how == "deleted":
        os.unlink(path)
    else:
        with open(path, "w") as stream:
            stream.write('{"steps": [{"action": "leaf-co')


def assert_nothing_left_behind(host):
    contents, flags, states = host.before
    settle(host)
    assert power_states(host) == states
    assert other_configs(host) == flags
    assert digests(host) == contents
    assert journal_steps(host) == []
    assert vm_marks(host) == dict.fromkeys(host.vms)


@pytest.mark.parametrize("strategy,action,value,how", [
    ("live", "leaf-coalesce", "false", "deleted"),
    ("live", "leaf-coalesce", "force", "corrupt"),
    ("plugin", "suspend", None, "corrupt"),
])
def test_repair_undoes_a_killed_run_from_the_marks_alone(host, strategy, action, value, how):
    kill_mid_step(host, strategy, action, value)
    lose_journal(host, how)
    code, stdout, stderr = agent(host, "--repair", "--json")
    assert code == 0, stderr
    document = json.loads(stdout)
    assert document["left"] == [] and document["others"] == []
    assert document["undone"] or value == "force"  # SM deletes the `force` it merged with: only its mark was left
    if strategy == "plugin":
        assert "VM {}: resumed".format(host.vms["db"]) in document["undone"]
    if how == "corrupt":
        assert os.path.exists(os.path.join(host.state_dir, "agent-state", "journal.json.corrupt"))
    assert_nothing_left_behind(host)
    code, stdout, _ = agent(host, "--repair")
    assert (code, stdout) == (0, "nothing left behind\n")


def test_a_plain_now_undoes_them_first(host):
    kill_mid_step(host, "live", "leaf-coalesce", "false")
    lose_journal(host, "corrupt")
    code, document, stderr = run_now(host, "--vm", host.vms["app"])
    assert code == 0, stderr
    assert "repaired after an interrupted run: VDI {}".format(host.vdis["idle-root"]) in stderr
    assert_nothing_left_behind(host)


def test_the_service_undoes_them_at_its_next_cycle(host, tmp_path):
    kill_mid_step(host, "plugin", "suspend", None)
    lose_journal(host, "deleted")
    with Agent(write_config(host, tmp_path / "agent.conf")) as service:
        wait_for(lambda: power_states(host)["db"] == "Running" and not marked_vdis(host), timeout=60,
                 what="the service to undo the marks")
        metrics = service.wait_for_metric("xcoalesce_leftover_marks")
        wait_for(lambda: value(service.metrics(), "xcoalesce_leftover_marks", sr_uuid=host.srs["lvm"]) == 0,
                 what="the metric to show no marks")
        assert value(metrics, "xcoalesce_leftover_marks", sr_uuid=host.srs["local"]) == 0
        service.signal(signal.SIGTERM)
        assert service.wait() == 0
        assert "repaired after an interrupted run: VM {}: resumed".format(host.vms["db"]) in service.stderr()
    assert_nothing_left_behind(host)


def set_other_config(host, cls, ref, **keys):
    other_config = dict(host.db.get_field(cls, ref, "other_config"))
    other_config.update(keys)
    host.db.update(cls, ref, other_config=other_config)


def leftover_gauge(host):
    result = inspection.inspect(config_module.load(host.agent_conf))
    (family,) = [family for family in collector.InspectionCollector(result).collect()
                 if family.name == "xcoalesce_leftover_marks"]
    return result, {sample.labels["sr_uuid"]: sample.value for sample in family.samples}


def test_another_hosts_marks_wait_for_quiet_and_an_admins_flag_is_left(host):
    """The old master left a hold on `idle-root`, a forced `db-data` and the `db` VM suspended by the
    plugin; an administrator has since set `app-root` to `false` over the agent's own `force`."""
    configure(host, gc_wait_seconds=1)  # how long `--repair` waits for the GC that holds the hold back
    db = host.db
    set_other_config(host, "VDI", host.vdi_ref("idle-root"), **{
        "leaf-coalesce": "false", marks.VDI_MARK_KEY: marks.vdi_mark("false", None, OTHER_HOST)})
    forced = marks.vdi_mark("force", None, OTHER_HOST, host.vms["db"])
    set_other_config(host, "VDI", host.vdi_ref("db-data"), **{"leaf-coalesce": "force", marks.VDI_MARK_KEY: forced})
    sim_vm.run(db, host.vm_ref("db"), "suspend")
    set_other_config(host, "VM", host.vm_ref("db"), **{
        marks.VM_MARK_KEY: marks.vm_mark("Running", [host.srs["lvm"]], OTHER_HOST)})
    admin_flags = {"leaf-coalesce": "false", marks.VDI_MARK_KEY: marks.vdi_mark("force", None, host.host_uuid)}
    set_other_config(host, "VDI", host.vdi_ref("app-root"), **admin_flags)
    gc_task = tasks.create(db, "Garbage Collection", other_config={"applies_to": host.sr_ref("local")})
    plugin_task = tasks.create(db, "Async.host.call_plugin")

    result, gauge = leftover_gauge(host)
    assert gauge == {host.srs["local"]: 2, host.srs["lvm"]: 1}
    code, stdout, stderr = agent(host, "--report", "--json")
    assert code == 0, stderr
    reported = {sr["uuid"]: sr["leftover_marks"] for sr in json.loads(stdout)["srs"]}
    assert [(mark["vdi_uuid"], mark["set"], mark["host"], mark["leaf_coalesce"])
            for mark in reported[host.srs["lvm"]]] == [(host.vdis["db-data"], "force", OTHER_HOST, "force")]
    code, stdout, _ = agent(host, "--report")
    assert "left behind: VDI {}: leaf-coalesce=false; the agent of host {} set force".format(
        host.vdis["app-root"], host.host_uuid) in stdout

    code, stdout, stderr = agent(host, "--repair", "--json")
    assert code == 1, stderr
    document = json.loads(stdout)
    flags = other_configs(host)
    assert flags["db-data"] == {marks.VDI_MARK_KEY: forced}  # force goes at once; its mark with the VM's
    assert flags["idle-root"]["leaf-coalesce"] == "false"  # a GC works on the SR: the hold waits
    assert power_states(host)["db"] == "Suspended"  # a plugin call is pending: the VM waits
    assert flags["app-root"] == admin_flags
    left = "\n".join(document["left"])
    assert "coalesce-leaf plugin call is still pending" in left and "its xapi task" in left
    assert "someone changed it since" in left and "xe vdi-param-remove uuid={}".format(host.vdis["app-root"]) in left

    tasks.succeed(db, gc_task)
    tasks.succeed(db, plugin_task)
    code, stdout, stderr = agent(host, "--repair")
    assert code == 1, stderr
    assert "undone: VM {}: resumed".format(host.vms["db"]) in stdout
    assert "left: VDI {}".format(host.vdis["app-root"]) in stdout
    flags = other_configs(host)
    assert flags["app-root"] == admin_flags
    assert flags["idle-root"] == host.before[1]["idle-root"] and flags["db-data"] == host.before[1]["db-data"]
    assert power_states(host)["db"] == "Running" and vm_marks(host)["db"] is None
    assert leftover_gauge(host)[1] == {host.srs["local"]: 1, host.srs["lvm"]: 0}


def test_marks_on_an_sr_another_host_masters_are_left_to_it(host):
    pool = host.db.all("pool")[0]
    other = host.db.create("host", uuid=OTHER_HOST, name_label="other")
    host.db.update("pool", pool, master=other)
    host.db.update("SR", host.sr_ref("lvm"), shared=True)
    set_other_config(host, "VDI", host.vdi_ref("db-data"), **{
        "leaf-coalesce": "false", marks.VDI_MARK_KEY: marks.vdi_mark("false", None, OTHER_HOST)})
    code, stdout, stderr = agent(host, "--repair", "--json")
    assert code == 0, stderr
    document = json.loads(stdout)
    assert document["left"] == [] and len(document["others"]) == 1 and host.vdis["db-data"] in document["others"][0]
    assert other_configs(host)["db-data"]["leaf-coalesce"] == "false"
