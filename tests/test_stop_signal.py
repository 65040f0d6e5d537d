"""SIGTERM (`systemctl stop`, an RPM upgrade) while a run acts: the step under way ends at once, its host
change undone and dropped from the journal, no further step begins, and the process exits well within
the units' TimeoutStopSec, rather than being killed mid-step.

The first leaf's merge is made to last (a 64 MiB leaf on an SR merging 2 MiB/s: 32 s), so the stop
always lands while its live step is open; the other leaf is never started.
"""
import json
import os
import signal
import subprocess
import time

import pytest

from tests.agent_process import Agent, wait_for
from tests.dom0sim import scenarios as sc
from tests.runner_support import (KEEP_SNAPSHOT, REPOSITORY, agent_command, chain_parent, configure, digests,
                                  journal_steps, other_configs, power_states)
from tests.test_daemon import write_config
from tests.test_daemon_schedule import OPEN_WINDOW, set_mode
from xcoalesce_agent.reclaim import history

SM_GENERATIONS = ("3.2", "4.1")

MERGE_SECONDS = 32
STOPPED_WITHIN = 20  # seconds: well under the merge, and under TimeoutStopSec


@pytest.fixture
def host(sim_host):
    long_leaf = [sc.write(0, 4), sc.snapshot("s"), sc.write(0, 64), sc.delete_snapshot("s")]
    srs = [sc.sr("local", "ext", 1024, speed_mib=2)]
    vms = [sc.vm("app", [sc.disk("app-root", "local", 128, steps=long_leaf)]),
           sc.vm("idle", [sc.disk("idle-root", "local", 32, steps=KEEP_SNAPSHOT)])]
    started = sim_host(sc.pool("slow", srs, vms, live_timeout=10 * MERGE_SECONDS))
    configure(started, strategies="live", max_freeze_seconds=10 * MERGE_SECONDS)
    started.before = (digests(started), other_configs(started), power_states(started))
    return started


def forced_vdi(host):
    """The VDI of the open `leaf-coalesce=force` step, once there is one."""
    def found():
        return next((step["vdi_uuid"] for step in journal_steps(host) if step.get("value") == "force"), None)
    return wait_for(found, timeout=60, interval=0.01, what="a live step")


def assert_stopped_cleanly(host, forced):
    """Nothing left behind, and the leaf not being merged at the stop was never started."""
    contents, flags, states = host.before
    assert journal_steps(host) == []
    assert power_states(host) == states
    assert {key: value.get("leaf-coalesce") for key, value in other_configs(host).items()} == \
        {key: value.get("leaf-coalesce") for key, value in flags.items()}
    untouched = [key for key, uuid in host.vdis.items() if uuid != forced and key in host.parents]
    assert untouched and all(chain_parent(host, key) != "" for key in untouched)
    host.sm.stop()  # the simulated GC ends its merge now rather than in MERGE_SECONDS
    assert digests(host) == contents


def test_sigterm_during_now_undoes_the_step_and_starts_no_other(host):
    process = subprocess.Popen(agent_command(host, "--now", "--json"), cwd=REPOSITORY, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, universal_newlines=True)
    forced = forced_vdi(host)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=STOPPED_WITHIN)
    assert time.monotonic() - sent < STOPPED_WITHIN
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.splitlines()[-1] == "xcoalesce-agent: error: stopped by SIGTERM after undoing the step under way"
    runs = {run["vdi_uuid"]: run for run in json.loads(stdout)["runs"]}
    assert set(runs) == set(host.vdis[key] for key in ("app-root", "idle-root"))
    assert all(run["reason"].endswith("the agent is stopping") for run in runs.values()), runs
    assert runs[forced]["result"] == "failed"
    assert [run["result"] for uuid, run in runs.items() if uuid != forced] == ["skipped"]
    recorded = history.RunHistory(os.path.join(host.state_dir, "agent-state")).runs()
    assert sorted(run.vdi_uuid for run in recorded) == sorted(runs)
    assert_stopped_cleanly(host, forced)


def test_sigterm_to_the_service_during_a_scheduled_run(host, tmp_path):
    set_mode(host, "auto", windows=OPEN_WINDOW)
    with Agent(write_config(host, tmp_path / "agent.conf")) as agent:
        forced = forced_vdi(host)
        sent = time.monotonic()
        agent.signal(signal.SIGTERM)
        assert agent.wait(STOPPED_WITHIN) == 0
        assert time.monotonic() - sent < STOPPED_WITHIN
        stderr = agent.stderr()
        assert "Traceback" not in stderr and "stopping on signal 15" in stderr and "INFO: stopped" in stderr
    assert_stopped_cleanly(host, forced)
