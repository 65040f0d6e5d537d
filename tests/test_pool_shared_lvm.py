"""The pool master of a shared LVM SR (scenario `pool-shared-lvm`), on both SM generations: most
chains' LVs are inactive on this host, as on a real pool. The agent estimates and reclaims them
without activating an LV, running an LVM command that changes anything, or touching SM's locks."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.runner_support import REPOSITORY, agent_command, configure, digests, other_configs, power_states, run_now

# Runs inside the agent's process (Python >= 3.8): every process it starts and every command its tool
# shell runs, every lock call (with the file it is on) and every file it opens, written to $AUDIT_LOG
# as JSON lines.
AUDIT_HOOK = textwrap.dedent("""\
    import json, os, sys
    _log = open(os.environ["AUDIT_LOG"], "a")
    def _hook(event, args):
        if event in ("subprocess.Popen", "os.exec", "os.posix_spawn", "xcoalesce_agent.tool"):
            _log.write(json.dumps([event, repr(args)]) + "\\n")
            _log.flush()
        elif event in ("fcntl.lockf", "fcntl.flock", "fcntl.fcntl"):
            _log.write(json.dumps([event, os.readlink("/proc/self/fd/{}".format(args[0]))]) + "\\n")
            _log.flush()
        elif event == "open" and isinstance(args[0], str):
            _log.write(json.dumps([event, args[0], args[1] or ""]) + "\\n")
            _log.flush()
    sys.addaudithook(_hook)
    """)
LVM_CHANGES = ("lvchange", "vgchange", "lvcreate", "lvremove", "lvresize", "lvextend", "lvreduce", "lvrename")


@pytest.fixture(params=["3.2", "4.1"])
def pool_host(request, sim_host):
    return sim_host("pool-shared-lvm", sm=request.param)


def lv_activity(host):
    """{LV name: active?} of the shared SR's VG, as `lvs` shows it."""
    return {lv["name"]: lv["active"] for lv in host.store("san").vg.lvs()}


def report(host):
    process = subprocess.Popen(agent_command(host, "--report", "--json"), cwd=REPOSITORY, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, universal_newlines=True)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    return {vdi["uuid"]: vdi for sr in json.loads(stdout)["srs"] for vdi in sr["vdis"]}


def expected_leaf_coalesceable(host):
    return sorted(disk["key"] for spec in host.scenario["vms"] for disk in spec["disks"]
                  if disk["expect"] == "leaf_coalesceable")


def audited_environment(tmp_path):
    """The agent's environment with the audit hook, or None where Python has no audit hooks."""
    if sys.version_info < (3, 8):
        return None
    hook_dir = tmp_path / "audit"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(AUDIT_HOOK)
    environment = dict(os.environ, AUDIT_LOG=str(tmp_path / "audit.log"))
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook_dir), environment.get("PYTHONPATH")]))
    return environment


def test_every_chain_is_estimated_whatever_its_activation(pool_host):
    vdis = report(pool_host)
    assert not [vdi for vdi in vdis.values() if vdi["state"] == "scan_error"]
    activity = lv_activity(pool_host)
    inactive = [key for key in expected_leaf_coalesceable(pool_host)
                if not activity.get("VHD-" + pool_host.vdis[key], True)]
    assert len(inactive) > len(expected_leaf_coalesceable(pool_host)) // 2   # most chains live elsewhere
    for key in expected_leaf_coalesceable(pool_host):
        vdi = vdis[pool_host.vdis[key]]
        assert vdi["state"] == "leaf_coalesceable" and vdi["reclaimable_bytes"] > 0, (key, vdi)
        assert vdi["merge_bytes"] > 0, (key, vdi)
    assert lv_activity(pool_host) == activity


def test_now_frees_each_estimate_and_leaves_activation_as_it_was(pool_host, tmp_path):
    activity, contents = lv_activity(pool_host), digests(pool_host)
    flags, states = other_configs(pool_host), power_states(pool_host)
    configure(pool_host, max_freeze_seconds=60)
    environment = audited_environment(tmp_path)
    code, document, stderr = run_now(pool_host, env=environment, timeout=600)
    assert code == 0, stderr
    runs = {run["vdi_uuid"]: run for run in document["runs"]}
    for key in expected_leaf_coalesceable(pool_host):
        run = runs[pool_host.vdis[key]]
        assert run["result"] == "success", (key, run)
        assert run["reclaimed_bytes"] == run["estimated_bytes"] > 0, (key, run)
    after = lv_activity(pool_host)
    assert [name for name, active in activity.items() if not active and after.get(name)] == []
    assert [name for name, active in activity.items() if active and name in after and not after[name]] == []
    assert digests(pool_host) == contents
    assert other_configs(pool_host) == flags and power_states(pool_host) == states
    if environment is not None:
        with open(environment["AUDIT_LOG"]) as stream:
            events = [json.loads(line) for line in stream]
        commands = [event[1] for event in events
                    if event[0] in ("subprocess.Popen", "os.exec", "os.posix_spawn", "xcoalesce_agent.tool")]
        assert not [command for command in commands if any(name in command for name in LVM_CHANGES)]
        lock_dir = os.path.join(pool_host.state_dir, "lock")
        assert not [event for event in events if event[1].startswith(lock_dir)]   # SM's locks: never opened
        agent_state = os.path.join(pool_host.state_dir, "agent-state")
        assert not [event for event in events if event[0].startswith("fcntl.") and not event[1].startswith(agent_state)]
        assert any("lvs" in command for command in commands)   # the audit saw the agent's processes
