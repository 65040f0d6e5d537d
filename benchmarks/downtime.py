"""Guest downtime per GiB merged, per leaf-coalesce strategy, against suspending every VM.

Each strategy runs `xcoalesce-agent --now` on a fresh simulated host (an LVM SR, since the plugin
only works there) where every VM has a leaf left over from a deleted snapshot. The downtime is what
the simulation records per VM (I/O frozen, suspended or paused). The baseline is the old manual
workaround: the `coalesce-leaf` plugin called for every VM, each suspended for its merge.
"""
import sys
import tempfile

from tests.dom0sim import scenarios as sc
from tests.dom0sim.host import SimHost
from tests.runner_support import configure, downtime, run_now

GIB = 1024 ** 3
VMS = 4
LEAF_MIB = 48
SPEED_MIB = 160
# Suspending writes the VM's memory out, resuming reads it back; scaled down with the disks.
SUSPEND_SECONDS = 0.5
RESUME_SECONDS = 0.5
STRATEGIES = ("gc", "live", "plugin")


def scenario():
    srs = [sc.sr("san", "lvmoiscsi", 4096, shared=True, speed_mib=SPEED_MIB)]
    steps = [sc.write(0, 8), sc.snapshot("backup"), sc.write(8, LEAF_MIB), sc.delete_snapshot("backup")]
    vms = [sc.vm("vm-{}".format(index), [sc.disk("disk-{}".format(index), "san", 128, steps=steps)])
           for index in range(VMS)]
    return sc.pool("downtime", srs, vms)


def _host(directory):
    host = SimHost(directory, scenario()).build().start()
    host.db.faults.set_duration("VM.suspend", SUSPEND_SECONDS)
    host.db.faults.set_duration("VM.resume", RESUME_SECONDS)
    return host


def _total_downtime(host):
    return sum(downtime(host, name) for name in host.vms)


def measure_strategy(directory, strategy):
    """(seconds of downtime over all VMs, bytes merged) for one strategy through the agent."""
    host = _host(directory)
    try:
        configure(host, strategies=strategy, max_freeze_seconds=600)
        code, document, stderr = run_now(host, timeout=600)
        if code != 0 or document is None:
            raise RuntimeError("--now with {} failed ({}): {}".format(strategy, code, stderr.strip()[-500:]))
        merged = sum(run["merge_bytes"] for run in document["runs"] if run["result"] == "success")
        return _total_downtime(host), merged
    finally:
        host.stop()


def measure_baseline(directory):
    """(seconds of downtime, bytes merged) calling the plugin for every VM, as administrators did."""
    from tests.dom0sim.xapi import client
    host = _host(directory)
    try:
        merged = sum(_leaf_bytes(host, key) for key in host.vdis)
        session = client.connect(host.socket_path)
        try:
            host_ref = session.xenapi.host.get_by_uuid(host.host_uuid)
            for vm_uuid in host.vms.values():
                session.xenapi.host.call_plugin(host_ref, "coalesce-leaf", "leaf-coalesce", {"vm_uuid": vm_uuid})
        finally:
            session.xenapi.session.logout()
        host.sm.wait_idle(600)
        return _total_downtime(host), merged
    finally:
        host.stop()


def _leaf_bytes(host, key):
    from tests.dom0sim import vhdfile
    return len(vhdfile.allocated_blocks(host.vdi_path(key))) * vhdfile.BLOCK_SIZE


def per_gib(seconds, merged):
    return seconds / (merged / float(GIB)) if merged else float("nan")


def run():
    figures = []
    with tempfile.TemporaryDirectory(prefix="xcoalesce-bench-") as directory:
        sys.stderr.write("downtime: baseline (plugin for every VM)\n")
        base_seconds, base_merged = measure_baseline(directory + "/baseline")
        baseline = per_gib(base_seconds, base_merged)
        figures.append(("suspend-everything baseline: downtime s per GiB", "{:.2f}".format(baseline)))
        for strategy in STRATEGIES:
            sys.stderr.write("downtime: strategy {}\n".format(strategy))
            seconds, merged = measure_strategy(directory + "/" + strategy, strategy)
            value = per_gib(seconds, merged)
            figures.append(("{}: downtime s per GiB merged ({:.0f} MiB)".format(strategy, merged / 1048576.0),
                            "{:.2f}".format(value)))
            figures.append(("{}: ratio to the baseline".format(strategy), "{:.2f}".format(value / baseline)))
    return figures


if __name__ == "__main__":
    for name, figure in run():
        print("{:<58} {}".format(name, figure))
