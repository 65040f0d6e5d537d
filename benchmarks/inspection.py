"""Inspection cost on the simulated `large` and `pool-shared-lvm` scenarios, against the
one-`vhd-util query`-per-VDI script.

`pool-shared-lvm` is the pool master of a shared LVM SR: most chains' LVs are inactive there, so
their bitmaps are read from the PV extents (or SM's `vhd-blocks`) instead of `vhd-util read -B`.

Each measurement runs in a child process (`python -m benchmarks.inspection CHILD MODE CONF`) so that
its CPU time (`RUSAGE_SELF`: the agent alone; `RUSAGE_CHILDREN`: the tools it ran) and peak RSS are
its own, apart from the simulated xapi serving it from this process.
"""
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

# (scenario, its size parameter), also the figures' prefix (`large:10000`): `large` takes disks (one VM
# each; with the hidden parents their snapshots left, 1.5 VDIs each in xapi, as the figures count them);
# `pool-shared-lvm` takes VMs, about 2.8 VDIs each;
# `qcow2` (QCOW2 chains beside VHDs on file and LVM SRs) takes about as many VDIs, and is skipped on
# a simulated host without it.
CASES = (("large", 1000), ("large", 10000), ("pool-shared-lvm", 3560), ("qcow2", 1000))
BASELINE_SAMPLE = 200          # VDIs the baseline script queries; its cost per VDI is constant
CHILD = "child"


def cpu_seconds(usage):
    return usage.ru_utime + usage.ru_stime


class Meter(object):
    """CPU of this process and of its waited-for children, and wall time, since it was made."""

    def __init__(self):
        self.self_start = cpu_seconds(resource.getrusage(resource.RUSAGE_SELF))
        self.children_start = cpu_seconds(resource.getrusage(resource.RUSAGE_CHILDREN))
        self.wall_start = time.time()

    def read(self):
        return {"agent_cpu": cpu_seconds(resource.getrusage(resource.RUSAGE_SELF)) - self.self_start,
                "tools_cpu": cpu_seconds(resource.getrusage(resource.RUSAGE_CHILDREN)) - self.children_start,
                "wall": time.time() - self.wall_start}


def peak_rss_mb():
    """This process's peak RSS since its exec (VmHWM); ru_maxrss would count the parent it forked from."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child_inspect(conf):
    """Two inspections in a row: cold (no cached bitmaps) and warm (the daemon's steady state)."""
    from xcoalesce_agent import config, model
    from xcoalesce_agent.inspect import inspection, vhdutil
    settings = config.load(conf)
    cache = inspection.BitmapCache()
    runs = []
    for _ in range(2):
        tools = vhdutil.VhdUtil(settings)
        meter = Meter()
        result = inspection.inspect(settings, tools=tools, bitmaps=cache)
        tools.close()   # the tools' shell reaped: their CPU is in RUSAGE_CHILDREN once it is
        figures = meter.read()
        figures["spawned"] = tools.spawned
        figures["forked"] = tools.forked
        figures["peak_rss_mb"] = peak_rss_mb()
        runs.append(figures)
    vdis = [vdi for sr_report in result.srs for vdi in sr_report.vdis]
    return {"cold": runs[0], "warm": runs[1], "srs": len(result.srs), "vhds": len(vdis),
            "candidates": sum(1 for vdi in vdis if vdi.state == model.LEAF_COALESCEABLE),
            "errors": [error["message"] for error in result.errors]}


def child_baseline(conf):
    """The common script: every VDI from xapi, then `vhd-util query -n PATH -v -s -p -f` for each."""
    from xcoalesce_agent import config
    from xcoalesce_agent.inspect import inventory, vhdutil, xapi
    settings = config.load(conf)
    inventory.host_uuid(settings.xapi.inventory)
    tools = vhdutil.VhdUtil(settings)
    meter = Meter()
    with xapi.open_session(settings) as session:
        srs = session.xenapi.SR.get_all_records()
        vdis = session.xenapi.VDI.get_all_records()
    paths = []
    for vdi in vdis.values():
        sr = srs[vdi["SR"]]
        if sr["type"].startswith("lvm"):
            paths.append(os.path.join(settings.storage.lvm_device_dir, vhdutil.lvm_vg_name(sr["uuid"]),
                                      "VHD-" + vdi["location"]))
        else:
            paths.append(os.path.join(settings.storage.sr_mount_dir, sr["uuid"], vdi["location"] + ".vhd"))
    fetch = meter.read()
    meter = Meter()
    for path in paths[:BASELINE_SAMPLE]:
        try:
            tools.run(["query", "-n", path, "-v", "-s", "-p", "-f"])
        except vhdutil.VhdUtilError:
            pass
    tools.close()
    sample = meter.read()
    scale = len(paths) / float(min(len(paths), BASELINE_SAMPLE))
    return {"spawned": len(paths), "sampled": min(len(paths), BASELINE_SAMPLE),
            "agent_cpu": fetch["agent_cpu"] + sample["agent_cpu"] * scale,
            "tools_cpu": sample["tools_cpu"] * scale, "wall": fetch["wall"] + sample["wall"] * scale}


def in_child(mode, conf):
    process = subprocess.run([sys.executable, "-m", "benchmarks.inspection", CHILD, mode, conf],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    if process.returncode != 0:
        raise RuntimeError("{} child failed: {}".format(mode, process.stderr.strip()[-2000:]))
    return json.loads(process.stdout)


def measure(scenario, count):
    from tests.dom0sim.host import SimHost
    directory = tempfile.mkdtemp(prefix="bench-inspection-")
    try:
        started = time.time()
        host = SimHost(directory, scenario, count=count).build()
        sys.stderr.write("  built {} (count={}) in {:.0f} s\n".format(scenario, count, time.time() - started))
        host.start()
        try:
            return in_child("inspect", host.agent_conf), in_child("baseline", host.agent_conf)
        finally:
            host.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def ratio(numerator, denominator):
    return "{:.1f}x".format(numerator / denominator) if denominator else "n/a"


def run(cases=CASES):
    figures = [("interpreter", "Python {}.{}.{}".format(*sys.version_info[:3]))]
    cold_cpu = {}
    from tests.dom0sim import scenarios
    for scenario, count in cases:
        if scenario not in scenarios.names():
            figures.append((scenario, "skipped: the simulated host has no such scenario"))
            continue
        agent, baseline = measure(scenario, count)
        cold, warm = agent["cold"], agent["warm"]
        prefix = "{}:{}, {} VDIs: ".format(scenario, count, agent["vhds"])
        target = " (target {})".format(agent["srs"] + 2 * agent["candidates"]) if scenario == "large" else ""
        figures += [
            (prefix + "SRs, leaf-coalesce candidates", "{} SRs, {} candidates".format(
                agent["srs"], agent["candidates"])),
            (prefix + "tool runs (vhd-util, qcow2_helper, qemu-img), first inspection{}".format(target),
             cold["spawned"]),
            (prefix + "tool runs, next inspections (cached parents)", warm["spawned"]),
            (prefix + "processes the agent forks, first / next", "{} / {}".format(cold["forked"], warm["forked"])),
            (prefix + "vhd-util runs and forks, baseline (one query per VDI)", baseline["spawned"]),
            (prefix + "agent CPU s, first / next inspection (target < 1)", "{:.2f} / {:.2f}".format(
                cold["agent_cpu"], warm["agent_cpu"])),
            (prefix + "tools CPU s, first / next inspection", "{:.2f} / {:.2f}".format(
                cold["tools_cpu"], warm["tools_cpu"])),
            (prefix + "agent CPU s, baseline (from {} queries)".format(baseline["sampled"]),
             "{:.2f}".format(baseline["agent_cpu"])),
            (prefix + "wall s, first / next / baseline", "{:.1f} / {:.1f} / {:.1f}".format(
                cold["wall"], warm["wall"], baseline["wall"])),
            (prefix + "peak RSS MB of one inspection (target < 40)", "{:.1f}".format(cold["peak_rss_mb"])),
            (prefix + "baseline / agent: processes, agent CPU, wall", "{}, {}, {}".format(
                ratio(baseline["spawned"], warm["spawned"]), ratio(baseline["agent_cpu"], warm["agent_cpu"]),
                ratio(baseline["wall"], warm["wall"]))),
        ]
        for message in agent["errors"][:3]:
            figures.append((prefix + "inspection error", message))
        if scenario == "large":
            cold_cpu[count] = (cold["agent_cpu"], warm["agent_cpu"])
    if len(cold_cpu) > 1:
        low, high = min(cold_cpu), max(cold_cpu)
        figures.append(("agent CPU growth large:{} -> large:{}, first / next (linear: {:.0f}x)".format(
            low, high, high / low),
                        "{} / {}".format(ratio(cold_cpu[high][0], cold_cpu[low][0]),
                                         ratio(cold_cpu[high][1], cold_cpu[low][1]))))
    return figures


def _case(argument):
    """`COUNT` (the large scenario) or `SCENARIO:COUNT`."""
    scenario, _, count = argument.rpartition(":")
    return scenario or "large", int(count)


def main(argv):
    if len(argv) == 3 and argv[0] == CHILD:
        result = child_inspect(argv[2]) if argv[1] == "inspect" else child_baseline(argv[2])
        sys.stdout.write(json.dumps(result))
        return 0
    cases = tuple(_case(arg) for arg in argv) or CASES
    for figure, value in run(cases):
        print("{:<60} {}".format(figure, value))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
