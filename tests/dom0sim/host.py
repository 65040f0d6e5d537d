"""A whole simulated Dom0 under one state directory: build a scenario's files and xapi objects, then
serve them (xapi on DIR/xapi.sock, SM's GC and plugin, VMs that keep writing) until stopped.

    host = SimHost(state_dir, "demo").build()
    host.start()
    ...                      # the agent runs with --config DIR/agent.conf
    host.stop()
"""
import os
import time

from tests.dom0sim import scenarios, tools
from tests.dom0sim.hostbuild import Builder
from tests.dom0sim.smgenerations import DEFAULT_GENERATION, get_generation
from tests.dom0sim.smpause import DEFAULT_SNAPSHOT_SECONDS
from tests.dom0sim.xapi.db import Database
from tests.dom0sim.xapi.server import XapiServer

MIB = 1024 * 1024
DEFAULT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

AGENT_CONF = """# The agent's configuration for the simulated host in {root}
[agent]
state_dir = {root}/agent-state

[xapi]
socket = {root}/xapi.sock
inventory = {root}/xensource-inventory

[tools]
vhd_util = {root}/bin/vhd-util
qcow2_helper = {root}/bin/qcow2_helper
path = {root}/bin:{path}

[storage]
sr_mount_dir = {root}/sr-mount
speed_log_dir = {root}/run
sm_lock_dir = {root}/lock/sm
lvm_device_dir = {root}/lvm
smlog_path = {root}/SMlog

[coalesce]
mode = report
"""

class SimHost(object):
    """One simulated host: `build()` once, then `start()` / `stop()` (also a context manager).

    `sm` is the storage manager's generation ("3.2" as XCP-ng 8.3, "4.1" as XenServer 8), and
    `snapshot_seconds` how long each internal snapshot of a snapshot-coalesce round pauses the leaf;
    `qcow2_helper=False` makes a host without SM's qcow2_helper; `uuid_salt` gives its objects other
    UUIDs than the scenario's usual ones; the other keyword parameters are the scenario's."""

    def __init__(self, state_dir, scenario, sm=DEFAULT_GENERATION, snapshot_seconds=DEFAULT_SNAPSHOT_SECONDS,
                 qcow2_helper=True, uuid_salt="", **params):
        self.state_dir = os.path.abspath(state_dir)
        self.uuid_salt = uuid_salt
        self.sm_generation = get_generation(sm).name
        self.snapshot_seconds = snapshot_seconds
        self.qcow2_helper = qcow2_helper
        self.scenario = scenarios.get(scenario, **params) if isinstance(scenario, str) else scenario
        self.db = Database()
        self.server = None
        self.sm = None
        self.host_uuid = None
        self.srs = {}           # scenario key -> SR uuid
        self.vdis = {}          # disk key -> VDI uuid
        self.vms = {}           # VM name -> VM uuid
        self.parents = {}       # disk key -> uuid of its leaf's parent VHD ("" if none)
        self.writers = []       # the VmWriter of each VM that keeps writing
        self.socket_path = os.path.join(self.state_dir, "xapi.sock")
        self.agent_conf = os.path.join(self.state_dir, "agent.conf")
        self.inventory = os.path.join(self.state_dir, "xensource-inventory")
        self.bin_dir = os.path.join(self.state_dir, "bin")
        self.run_dir = os.path.join(self.state_dir, "run")
        self.sr_mount = os.path.join(self.state_dir, "sr-mount")

    # ---- building ------------------------------------------------------------------------------

    def build(self):
        for directory in (self.state_dir, self.bin_dir, self.run_dir, self.sr_mount,
                          os.path.join(self.state_dir, "agent-state")):
            if not os.path.isdir(directory):
                os.makedirs(directory)
        tools.install_tools(self.state_dir, self.bin_dir, omit=() if self.qcow2_helper else ("qcow2_helper",))
        Builder(self).build()
        with open(self.inventory, "w") as handle:
            handle.write("PRIMARY_DISK='/dev/sda'\nBUILD_NUMBER='release/yangtze/master/58'\n"
                         "INSTALLATION_UUID='{}'\nPRODUCT_BRAND='XCP-ng'\n".format(self.host_uuid))
        with open(self.agent_conf, "w") as handle:
            handle.write(AGENT_CONF.format(root=self.state_dir, path=DEFAULT_PATH))
        return self

    # ---- running -------------------------------------------------------------------------------

    def start(self):
        self.server = XapiServer(self.db, self.socket_path)
        self.server.start()
        self.sm.install()
        for spec in self.scenario["vms"]:
            if spec["writes_mib_s"] and spec["power_state"] == "Running" and spec["disks"]:
                first = spec["disks"][0]
                if os.path.exists(self.vdi_path(first["key"])):
                    self.writers.append(self.sm.start_writer(
                        self.vms[spec["name"]], self.srs[first["sr"]], self.vdis[first["key"]],
                        spec["writes_mib_s"] * MIB, start_offset=first["size_mib"] * MIB // 2))
        return self

    def stop(self):
        if self.sm is not None:
            self.sm.stop()
        if self.server is not None:
            self.server.stop()
            self.server = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()

    def describe(self):
        """Where everything is, for people."""
        lines = ["simulated host {} ({} scenario)".format(self.host_uuid, self.scenario["name"]),
                 "  xapi socket   {}".format(self.socket_path),
                 "  agent config  {}".format(self.agent_conf),
                 "  inventory     {}".format(self.inventory),
                 "  tools         {}".format(self.bin_dir),
                 "  speed logs    {}".format(self.run_dir),
                 "  SM log        {}".format(self.sm.log_path),
                 "  SM            {}".format(self.sm_generation)]
        for key, sr_uuid in sorted(self.srs.items()):
            lines.append("  SR {:<12} {}".format(key, sr_uuid))
        return "\n".join(lines)

    # ---- looking at it -------------------------------------------------------------------------

    def sr_ref(self, key):
        return self.db.ref_of("SR", self.srs[key])

    def vdi_ref(self, disk_key):
        return self.db.ref_of("VDI", self.vdis[disk_key])

    def vm_ref(self, name):
        return self.db.ref_of("VM", self.vms[name])

    def store(self, key):
        return self.sm.store(self.srs[key])

    def vdi_path(self, disk_key):
        """The VHD of a disk's leaf."""
        disk = self.disk_spec(disk_key)
        return self.store(disk["sr"]).path(self.vdis[disk_key])

    def disk_spec(self, disk_key):
        for spec in self.scenario["vms"]:
            for disk in spec["disks"]:
                if disk["key"] == disk_key:
                    return disk
        raise KeyError(disk_key)

def wait_until(predicate, timeout=30.0, interval=0.02):
    """Poll `predicate` until it is true; its last value."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    return value
