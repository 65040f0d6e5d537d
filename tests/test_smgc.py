"""Is SM's GC running on an SR, as a real host shows it: SM's locks (held for real with `lockf` by
another process, seen in /proc/locks), the `SMGC@` unit through a `systemctl` stand-in, a
`cleanup` process, the "Garbage Collection" task; and the plugin step's journal and bound."""
import os
import subprocess
import sys
import threading

from tests.dom0sim.xapi import tasks
from tests.runner_support import configure, other_configs, power_states, run_now, small_scenario
from xcoalesce_agent import config as config_module
from xcoalesce_agent.inspect import inspection, smgc
from xcoalesce_agent.reclaim import journal, repair

HOLDER = """
import fcntl, sys, time
path = sys.argv[1]
with open(path, "r+") as handle:
    fcntl.lockf(handle, fcntl.LOCK_EX)
    print("held", flush=True)
    sys.stdin.readline()
    fcntl.lockf(handle, fcntl.LOCK_UN)
    print("released", flush=True)
    sys.stdin.readline()
    contended = 0
    for _ in range(400):
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            contended += 1
            continue
        time.sleep(0.0005)
        fcntl.lockf(handle, fcntl.LOCK_UN)
    print(contended, flush=True)
"""


def lock_file(host, sr_uuid, name):
    directory = os.path.join(host.state_dir, "lock", "sm", sr_uuid)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    with open(path, "w") as stream:
        stream.write("left by SM\n")
    return path


def test_proc_locks_lines_give_device_inode_and_holder(tmp_path):
    sample = tmp_path / "locks"
    sample.write_text("1: POSIX  ADVISORY  WRITE 12345 fd:01:1835018 0 EOF\n"
                      "1: -> POSIX  ADVISORY  WRITE 777 fd:01:1835018 0 EOF\n"
                      "2: FLOCK  ADVISORY  WRITE 42 00:19:77 0 EOF\n"
                      "3: OFDLCK ADVISORY  READ  -1 103:02:9 0 EOF\n"
                      "garbage\n")
    assert smgc.held_locks(str(sample)) == {(0xfd, 1, 1835018): 12345, (0, 0x19, 77): 42, (0x103, 2, 9): -1}
    assert smgc.held_locks(str(tmp_path / "absent")) == {}


def test_a_gc_seen_only_through_its_lock_which_the_agent_never_takes(states_host, xapi_session):
    settings = config_module.load(states_host.agent_conf)
    session = xapi_session(states_host)
    sr_uuid = states_host.srs["ext"]
    assert not smgc.gc_running(settings, session, sr_uuid)  # no lock file at all: not held
    path = lock_file(states_host, sr_uuid, "gc_active")
    before = os.stat(path)
    assert not smgc.gc_running(settings, session, sr_uuid)  # a file nobody holds
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              universal_newlines=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert "lock held by pid {}".format(holder.pid) in smgc.gc_activity(settings, session, sr_uuid)
        assert smgc.wait_gc_idle(settings, session, sr_uuid, 0.3) is False
        report = {sr.uuid: sr for sr in inspection.inspect(settings).srs}[sr_uuid]
        assert report.gc_running and report.gc_running_seconds >= 0
        holder.stdin.write("release\n")
        holder.stdin.flush()
        assert holder.stdout.readline() == "released\n"
        assert not smgc.gc_running(settings, session, sr_uuid)
        stop = threading.Event()

        def look():
            while not stop.is_set():
                smgc.lock_holders(settings, [sr_uuid])
        looking = threading.Thread(target=look)
        looking.start()
        holder.stdin.write("go\n")
        holder.stdin.flush()
        contended = int(holder.stdout.readline())
        stop.set()
        looking.join()
    finally:
        holder.kill()
        holder.wait()
    assert contended == 0  # the agent's looks never held the lock the holder kept taking
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    with open(path) as stream:
        assert stream.read() == "left by SM\n"


def test_a_gc_seen_through_its_task_its_unit_or_its_process(states_host, xapi_session, tmp_path):
    settings = config_module.load(states_host.agent_conf)
    session = xapi_session(states_host)
    sr_uuid = states_host.srs["ext"]
    task = session.xenapi.task.create(smgc.GC_TASK_LABEL, "Garbage collection for SR " + sr_uuid)
    session.xenapi.task.add_to_other_config(task, "applies_to", session.xenapi.SR.get_by_uuid(sr_uuid))
    assert smgc.gc_activity(settings, session, sr_uuid) == "its xapi task"
    assert not smgc.gc_running(settings, session, states_host.srs["lvm"])
    tasks.succeed(states_host.db, task)  # the GC's own task ends with its work
    assert not smgc.gc_running(settings, session, sr_uuid)

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    systemctl = bin_dir / "systemctl"
    systemctl.write_text('#!/bin/sh\n[ "$1 $2" = "is-active {}" ] && {{ echo activating; exit 0; }}\n'
                         'echo inactive\nexit 3\n'.format(smgc.unit_name(sr_uuid).replace("\\", "\\\\")))
    systemctl.chmod(0o755)
    assert smgc.unit_name(sr_uuid) == "SMGC@" + sr_uuid.replace("-", "\\x2d")
    settings.tools.path = "{}:{}".format(bin_dir, settings.tools.path)
    assert smgc.gc_activity(settings, session, sr_uuid) == "{} activating".format(smgc.unit_name(sr_uuid))
    assert not smgc.gc_running(settings, session, states_host.srs["lvm"])
    systemctl.unlink()
    assert not smgc.gc_running(settings, session, sr_uuid)  # no systemctl: no unit to ask

    script = tmp_path / "cleanup"
    script.write_text("#!/bin/sh\nwhile read -r line; do :; done\n")
    script.chmod(0o755)
    process = subprocess.Popen([str(script), "-g", "-u", sr_uuid], stdin=subprocess.PIPE)
    try:
        assert wait_seen(lambda: smgc.gc_activity(settings, session, sr_uuid) == "a cleanup process")
    finally:
        process.stdin.close()
        process.wait()
    assert not smgc.gc_running(settings, session, sr_uuid)


def wait_seen(check, tries=200):
    """The process shows its command line once it has exec'ed: look until it does."""
    for _ in range(tries):
        if check():
            return True
        threading.Event().wait(0.01)
    return False


def test_repair_of_a_plugin_step_removes_its_force_flags_and_resumes_the_vm(sim_host):
    host = sim_host(small_scenario())
    settings = config_module.load(host.agent_conf)
    vm_ref, vdi_ref = host.vm_ref("db"), host.vdi_ref("db-data")
    steps = journal.Journal(settings.agent.state_dir)
    steps.begin(journal.suspend_step([host.srs["lvm"]], host.vms["db"], "Running", [(host.vdis["db-data"], None)]))
    host.db.add_to_map("VDI", vdi_ref, "other_config", "leaf-coalesce", "force")
    host.db.update("VM", vm_ref, power_state="Suspended")
    actions = repair.startup_repair(settings)
    assert actions == ["VDI {}: leaf-coalesce=(unset) restored".format(host.vdis["db-data"]),
                       "VM {}: resumed".format(host.vms["db"])]
    assert other_configs(host)["db-data"] == {} and power_states(host)["db"] == "Running"
    assert steps.steps() == []


def test_a_plugin_call_past_its_limit_is_cancelled_and_leaves_nothing(sim_host):
    """xapi is slow to start the plugin; past the limit the agent cancels its task (which does not
    stop it, as on a real host), gives it a last look, then puts back whatever it changed."""
    host = sim_host(small_scenario())
    before = (other_configs(host), power_states(host))
    configure(host, strategies="plugin", plugin_timeout_seconds=1)
    host.db.faults.set_duration("host.call_plugin", 3)
    code, document, stderr = run_now(host, "--vm", host.vms["db"])
    assert "the plugin did not finish within 1 s: cancelling its task" in stderr
    (run,) = document["runs"]
    assert code == (1 if run["result"] == "failed" else 0), stderr
    assert host.sm.wait_idle(60)
    repair.startup_repair(config_module.load(host.agent_conf))   # the plugin's step closes once it ended
    assert (other_configs(host), power_states(host)) == before
