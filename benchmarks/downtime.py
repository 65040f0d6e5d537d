"""Guest freeze per VM, per leaf-coalesce strategy and SM generation, against suspending the VM.

Each case is one VM on an iSCSI LVM SR (the plugin only works there) with a 1 GiB leaf left by a
deleted snapshot: a quiet VM, and a VM writing steadily while its leaf is merged. Each strategy runs
`xcoalesce-agent --now` on a fresh simulated host of the given SM generation; the freeze is what the
simulation records for the VM (I/O frozen, suspended or paused), every snapshot-coalesce pause
included. The baseline is the old manual workaround: the VM suspended for its whole merge.
"""
import sys
import tempfile

from tests.dom0sim import scenarios as sc
from tests.dom0sim.host import SimHost
from tests.dom0sim.xapi import client
from tests.runner_support import configure, downtime, run_now

MIB = 1024 * 1024
LEAF_MIB = 1024
DISK_MIB = 2048
SPEED_MIB = 128          # a 1 GiB leaf takes 8 s: more than SM's 5 s live limit
WRITES_MIB_S = 8.0
# Suspending writes the VM's memory out, resuming reads it back; scaled down with the disks.
SUSPEND_SECONDS = 0.5
RESUME_SECONDS = 0.5
GENERATIONS = ("3.2", "4.1")
STRATEGIES = ("gc", "live", "plugin")
CASES = (("quiet VM", 0.0), ("VM writing {:g} MiB/s".format(WRITES_MIB_S), WRITES_MIB_S))
VM_NAME = "vm"


def scenario(writes_mib_s):
    srs = [sc.sr("san", "lvmoiscsi", 3 * DISK_MIB + 1024, shared=True, speed_mib=SPEED_MIB)]
    steps = [sc.write(0, 8), sc.snapshot("backup"), sc.write(8, LEAF_MIB), sc.delete_snapshot("backup")]
    vms = [sc.vm(VM_NAME, [sc.disk("disk", "san", DISK_MIB, steps=steps)], writes_mib_s=writes_mib_s)]
    return sc.pool("downtime", srs, vms)


def _host(directory, generation, writes_mib_s):
    host = SimHost(directory, scenario(writes_mib_s), sm=generation).build().start()
    host.db.faults.set_duration("VM.suspend", SUSPEND_SECONDS)
    host.db.faults.set_duration("VM.resume", RESUME_SECONDS)
    return host


def measure_strategy(directory, generation, writes_mib_s, strategy):
    """(seconds the VM was frozen, result of its run) for one strategy through the agent."""
    host = _host(directory, generation, writes_mib_s)
    try:
        configure(host, strategies=strategy, max_freeze_seconds=600)
        code, document, stderr = run_now(host, timeout=900)
        if document is None:
            raise RuntimeError("--now with {} failed ({}): {}".format(strategy, code, stderr.strip()[-500:]))
        results = sorted({run["result"] for run in document["runs"]}) or ["nothing to do"]
        host.sm.wait_idle(600)
        return downtime(host, VM_NAME), ", ".join(results)
    finally:
        host.stop()


def measure_baseline(directory, generation, writes_mib_s):
    """Seconds the VM was frozen when it is suspended for its whole merge, as administrators did:
    suspend, SR.scan (the GC merges the leaf of a VM that no longer runs), wait, resume."""
    host = _host(directory, generation, writes_mib_s)
    try:
        session = client.connect(host.socket_path)
        try:
            vm_ref = session.xenapi.VM.get_by_uuid(host.vms[VM_NAME])
            session.xenapi.VM.suspend(vm_ref)
            session.xenapi.SR.scan(session.xenapi.SR.get_by_uuid(host.srs["san"]))
            host.sm.wait_idle(600)
            session.xenapi.VM.resume(vm_ref, False, False)
        finally:
            session.xenapi.session.logout()
        return downtime(host, VM_NAME)
    finally:
        host.stop()


def run():
    figures = []
    with tempfile.TemporaryDirectory(prefix="xcoalesce-bench-") as directory:
        for generation in GENERATIONS:
            for index, (case, writes_mib_s) in enumerate(CASES):
                where = "{}/{}-{}".format(directory, generation, index)
                label = "SM {}, {} MiB leaf, {}".format(generation, LEAF_MIB, case)
                sys.stderr.write("downtime: {}: baseline\n".format(label))
                baseline = measure_baseline(where + "-baseline", generation, writes_mib_s)
                figures.append(("{}: suspend-everything baseline, freeze s".format(label),
                                "{:.2f}".format(baseline)))
                for strategy in STRATEGIES:
                    sys.stderr.write("downtime: {}: {}\n".format(label, strategy))
                    seconds, results = measure_strategy("{}-{}".format(where, strategy), generation,
                                                        writes_mib_s, strategy)
                    figures.append(("{}: {}, freeze s (ratio to baseline; run {})".format(label, strategy, results),
                                    "{:.2f} ({:.2f}x)".format(seconds, seconds / baseline if baseline else 0.0)))
    return figures


if __name__ == "__main__":
    for name, figure in run():
        print("{:<58} {}".format(name, figure))
