"""Shared by the runner tests and the downtime benchmark: `--now` as a real process on a simulated
host, and snapshots of what must never change (virtual contents) or be left behind (flags, power)."""
import json
import os
import subprocess
import sys

from tests.dom0sim import scenarios as sc, vhdfile

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


KEEP_SNAPSHOT = [sc.write(0, 4), sc.snapshot("s"), sc.write(0, 12), sc.delete_snapshot("s")]


def small_scenario():
    """Three running VMs with small leaves left by deleted snapshots, on a slow file SR and a slow
    LVM SR, so that runs are quick to set up and each merge lasts long enough to interrupt."""
    srs = [sc.sr("local", "ext", 512, speed_mib=24), sc.sr("lvm", "lvm", 512, speed_mib=24)]
    vms = [sc.vm("app", [sc.disk("app-root", "local", 32, steps=KEEP_SNAPSHOT)]),
           sc.vm("idle", [sc.disk("idle-root", "local", 32, steps=KEEP_SNAPSHOT)]),
           sc.vm("db", [sc.disk("db-data", "lvm", 32, steps=KEEP_SNAPSHOT)])]
    return sc.pool("small", srs, vms)


def configure(host, **coalesce):
    """Append `[coalesce]` keys to the host's agent.conf (its last section is `[coalesce]`)."""
    with open(host.agent_conf, "a") as stream:
        for key, value in sorted(coalesce.items()):
            stream.write("{} = {}\n".format(key, value))
    return host.agent_conf


def agent_command(host, *args):
    return [sys.executable, "-m", "xcoalesce_agent", "--config", host.agent_conf, "--log-level", "info"] + list(args)


def run_now(host, *args, **options):
    """`xcoalesce-agent --now ARGS --json`: (exit code, parsed JSON or None, stderr)."""
    process = subprocess.Popen(agent_command(host, "--now", "--json", *args), cwd=REPOSITORY, env=options.get("env"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    try:
        stdout, stderr = process.communicate(timeout=options.get("timeout", 120))
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    try:
        document = json.loads(stdout)
    except ValueError:
        document = None
    return process.returncode, document, stderr


def virtual_contents(host, disk_key):
    """sha256 of a disk's virtual contents; an inactive LVM chain is held active for the look, as a
    test may (the agent never does)."""
    store = host.store(host.disk_spec(disk_key)["sr"])
    names = ["VHD-" + uuid for uuid in store.chain(host.vdis[disk_key])] if store.lvm else []
    if names:
        store.vg.activate(names, "test")
    try:
        return vhdfile.chain_digest(host.vdi_path(disk_key))
    finally:
        if names:
            store.vg.deactivate(names, "test")


def journal_steps(host):
    """The agent's open journal steps ([] when there is no readable journal)."""
    try:
        with open(os.path.join(host.state_dir, "agent-state", "journal.json")) as stream:
            return json.load(stream)["steps"]
    except (OSError, ValueError):
        return []


def digests(host):
    """The virtual contents of every disk that has a VHD chain."""
    return {key: virtual_contents(host, key) for key in host.parents}


def files(host):
    """(size, mtime) of every file holding VHDs (file SRs and LVM stores): what "touched nothing" means."""
    found = {}
    for top in (host.sr_mount, os.path.join(host.state_dir, "lvm")):
        for directory, _, names in os.walk(top):
            for name in names:
                status = os.stat(os.path.join(directory, name))
                found[os.path.join(directory, name)] = (status.st_size, status.st_mtime_ns)
    return found


def power_states(host):
    return {name: host.db.get_field("VM", host.vm_ref(name), "power_state") for name in host.vms}


def other_configs(host):
    return {key: dict(host.db.get_field("VDI", host.vdi_ref(key), "other_config"))
            for key in host.parents if host.db.ref_of("VDI", host.vdis[key])}


def downtime(host, vm_name):
    """Seconds the VM did not run, as the simulation recorded it (overlaps counted once)."""
    intervals = sorted((i.start, i.start + i.duration) for i in host.db.downtime(host.vms[vm_name]))
    total, reach = 0.0, None
    for start, end in intervals:
        if reach is None or start > reach:
            total += end - start
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total


def chain_parent(host, key):
    """The VDI's `vhd-parent` in xapi ("" once it has none)."""
    return host.db.get_field("VDI", host.vdi_ref(key), "sm_config").get("vhd-parent", "")


def sr_free(host, key):
    record = host.db.get("SR", host.sr_ref(key))
    return int(record["physical_size"]) - int(record["physical_utilisation"])
