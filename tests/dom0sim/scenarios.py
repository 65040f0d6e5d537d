"""Declarative descriptions of simulated pools: hosts, SRs, VMs, their disks and each disk's history.

A scenario is plain data: `get(name, **params)` returns a dict that `host.SimHost` builds. A disk's
`steps` replay what happened to it on a real host, in order:

    write(offset_mib, length_mib)  the VM wrote real data (a pattern unique to the disk and step)
    sparse(first_block, count)     blocks allocated without data (big disks, for benchmarks)
    snapshot(name)                 a VM snapshot: the leaf becomes a hidden base with two children,
                                   the disk's new leaf and the snapshot VDI `name`
    delete_snapshot(name)          the snapshot VDI is deleted, before any GC ran
    delete_disk()                  the disk itself is deleted: what is left above it is garbage
    lose_parent()                  the leaf's parent VHD vanishes: the leaf is an orphan

`expect` names the state (xcoalesce_agent.model vocabulary) the disk's leaf is in once built, and
`expect_parent` that of its parent; tests check them.

A disk's `vdi_type` is "vhd" (default) or "qcow2" (a real QCOW2 chain made with qemu-img / qemu-io,
as XCP-ng 8.3 keeps it); `bulk` QCOW2 disks are written whole by the simulation's own writer (many
images fast, `sparse` steps only); `hostile` makes a QCOW2 image no reader should trust instead
(truncated-header, backing-loop, backing-outside, unknown-feature; file SRs).
"""
MIB = 1024 * 1024


# ---- building blocks ----------------------------------------------------------------------------

def write(offset_mib, length_mib):
    return ("write", offset_mib, length_mib)


def sparse(first_block, count):
    return ("sparse", first_block, count)


def snapshot(name):
    return ("snapshot", name)


def delete_snapshot(name):
    return ("delete_snapshot", name)


def delete_disk():
    return ("delete_disk",)


def lose_parent():
    return ("lose_parent",)


def sr(key, sr_type, size_mib, name=None, shared=False, host=None, attached=True, speed_mib=200.0,
       seed_speed_log=True, other_config=None):
    """An SR; `host` is the host of a local SR's PBD (default: the pool master)."""
    return {"key": key, "type": sr_type, "size_mib": size_mib, "name": name or key, "shared": shared,
            "host": host, "attached": attached, "speed_mib": speed_mib, "seed_speed_log": seed_speed_log,
            "other_config": dict(other_config or {})}


def disk(key, sr_key, size_mib, steps=(), name=None, expect=None, expect_parent=None, other_config=None,
         on_boot="persist", allow_caching=False, vdi_type="vhd", bulk=False, hostile=None):
    return {"key": key, "sr": sr_key, "size_mib": size_mib, "steps": list(steps), "name": name or key,
            "expect": expect, "expect_parent": expect_parent, "other_config": dict(other_config or {}),
            "on_boot": on_boot, "allow_caching": allow_caching, "vdi_type": vdi_type, "bulk": bulk,
            "hostile": hostile}


def vm(name, disks=(), power_state="Running", host=None, writes_mib_s=0.0, ha_restart_priority="", tags=()):
    """A VM; `writes_mib_s` makes a running VM keep writing fresh data into its first disk."""
    return {"name": name, "disks": list(disks), "power_state": power_state, "host": host,
            "writes_mib_s": writes_mib_s, "ha_restart_priority": ha_restart_priority, "tags": list(tags)}


def garbage_file(sr_key, name, size=4096):
    """A file (or LV) in the SR that is not a VHD at all."""
    return {"sr": sr_key, "name": name, "size": size}


def pool(name, srs, vms, hosts=("xcp-ng-1",), master=None, this_host=None, loose=(), live_timeout=10.0,
         gc_quiet_seconds=0.0, description=""):
    """A pool; `live_timeout` is SM's live leaf-coalesce timeout (10 s), `gc_quiet_seconds` the pause a
    background GC keeps after its first run (300 s on a real host, none by default here)."""
    hosts = list(hosts)
    return {"name": name, "description": description, "hosts": hosts, "master": master or hosts[0],
            "this_host": this_host or hosts[0], "srs": list(srs), "vms": list(vms), "loose": list(loose),
            "live_timeout": live_timeout, "gc_quiet_seconds": gc_quiet_seconds}


# ---- the scenarios ---------------------------------------------------------------------------------

def demo():
    """A small realistic host: a few VMs on local ext storage and on an iSCSI LVM SR, with deleted
    snapshots left to merge on both."""
    srs = [sr("local", "ext", 2048, name="Local storage", speed_mib=400),
           sr("iscsi", "lvmoiscsi", 2048, name="iSCSI SAN", shared=True, speed_mib=400)]
    vms = [
        vm("web-01", [disk("web-01-root", "local", 256, name="web-01 root", expect="leaf_coalesceable",
                           steps=[write(0, 48), snapshot("nightly"), write(16, 24), write(96, 16),
                                  delete_snapshot("nightly")])]),
        vm("db-01", [disk("db-01-data", "iscsi", 128, name="db-01 data", expect="leaf_coalesceable",
                          steps=[write(0, 40), snapshot("backup"), write(8, 16), delete_snapshot("backup")])]),
        vm("build-01", [disk("build-01-root", "iscsi", 128, name="build-01 root", expect="snapshot_present",
                             expect_parent="hidden_parent",
                             steps=[write(0, 24), snapshot("before-upgrade"), write(0, 8)])]),
        vm("mail-01", [disk("mail-01-root", "local", 128, name="mail-01 root", expect="leaf_coalesceable",
                            expect_parent="coalesceable",
                            steps=[write(0, 24), snapshot("monday"), write(24, 8), snapshot("tuesday"),
                                   write(40, 8), delete_snapshot("monday"), delete_snapshot("tuesday")])],
           power_state="Halted"),
    ]
    return pool("demo", srs, vms, description=demo.__doc__)


def large(count=10000, file_srs=3, size_mib=2048):
    """Thousands of VDIs for benchmarks: one in ten on an iSCSI LVM SR, the rest over `file_srs` ext and
    NFS SRs; most chains short; no real data (sparse blocks)."""
    srs = [sr("lvm", "lvmoiscsi", 64 * 1024 * 1024, name="iSCSI SAN", shared=True)]
    srs += [sr("sr{}".format(i), ("ext", "nfs")[i % 2], 64 * 1024 * 1024, name="Storage {}".format(i),
               shared=i % 2 == 1) for i in range(file_srs)]
    vms = []
    for index in range(count):
        sr_key = "lvm" if index % 10 == 0 else "sr{}".format(index % file_srs)
        shape = (index + index // 10) % 10
        if shape < 6:
            steps = [sparse(0, 1 + index % 3)]
        elif shape < 9:
            steps = [sparse(0, 2), snapshot("s"), sparse(2 + index % 7, 1 + index % 2), delete_snapshot("s")]
        else:
            steps = [sparse(0, 2), snapshot("s"), sparse(2, 1)]
        disks = [disk("vdi-{}".format(index), sr_key, size_mib, steps=steps)]
        vms.append(vm("vm-{:05d}".format(index), disks, power_state="Running" if index % 3 else "Halted"))
    return pool("large", srs, vms, description=large.__doc__)


def states():
    """One disk in every state the agent classifies, spread so that each SR's GC can still run."""
    srs = [sr("ext", "ext", 1024, name="Local ext"),
           sr("lvm", "lvm", 1024, name="Local LVM"),
           sr("nolc", "ext", 512, name="No leaf coalesce", other_config={"leaf-coalesce": "false"}),
           sr("broken", "ext", 512, name="Broken chains"),
           sr("qcow", "ext", 512, name="Mixed formats")]
    leaf_history = [write(0, 4), snapshot("s"), write(2, 4), delete_snapshot("s")]
    vms = [
        vm("plain", [disk("active-leaf", "ext", 16, steps=[write(0, 4)], expect="leaf")]),
        vm("kept-snapshot", [disk("snapshot-present", "lvm", 16, steps=[write(0, 4), snapshot("keep"), write(4, 2)],
                                  expect="snapshot_present", expect_parent="hidden_parent")]),
        vm("pending-gc", [disk("gc-pending", "ext", 16, expect="leaf_coalesceable", expect_parent="coalesceable",
                               steps=[write(0, 4), snapshot("a"), write(4, 2), snapshot("b"), write(6, 2),
                                      delete_snapshot("a"), delete_snapshot("b")])]),
        vm("leafy", [disk("leaf-file", "ext", 16, steps=leaf_history, expect="leaf_coalesceable"),
                     disk("leaf-lvm", "lvm", 16, steps=leaf_history, expect="leaf_coalesceable")]),
        vm("gone", [disk("garbage", "ext", 16, expect_parent="garbage",
                         steps=[write(0, 4), snapshot("s"), write(0, 2), delete_snapshot("s"), delete_disk()])],
           power_state="Halted"),
        vm("excluded", [
            disk("excluded-vdi", "ext", 16, steps=leaf_history, expect="excluded",
                 other_config={"leaf-coalesce": "false"}),
            disk("excluded-reset", "lvm", 16, steps=leaf_history, expect="excluded", on_boot="reset"),
            disk("excluded-caching", "ext", 16, steps=leaf_history, expect="excluded", allow_caching=True),
            disk("excluded-sr", "nolc", 16, steps=leaf_history, expect="excluded")]),
        vm("orphaned", [disk("orphan", "broken", 16, expect="orphan",
                             steps=[write(0, 4), snapshot("s"), write(0, 2), lose_parent()])]),
        vm("formats", [disk("raw-disk", "lvm", 16, vdi_type="aio", expect="not_cow"),
                       disk("qcow2-disk", "qcow", 16, vdi_type="qcow2", hostile="truncated-header",
                            expect="scan_error")]),
    ]
    loose = [garbage_file("broken", "0badf11e-0000-4000-8000-000000000000.vhd")]
    return pool("states", srs, vms, loose=loose, description=states.__doc__)


def pool_member():
    """This host is a pool member: a shared NFS SR whose master is another host, a detached SR."""
    srs = [sr("nfs", "nfs", 1024, name="NFS shared", shared=True),
           sr("local", "ext", 512, name="Local storage", host="xcp-ng-2"),
           sr("old", "lvm", 512, name="Detached LVM", host="xcp-ng-2", attached=False)]
    leaf_history = [write(0, 4), snapshot("s"), write(2, 4), delete_snapshot("s")]
    vms = [vm("shared-vm", [disk("shared-leaf", "nfs", 16, steps=leaf_history, expect="leaf_coalesceable")],
              host="xcp-ng-2"),
           vm("local-vm", [disk("local-leaf", "local", 16, steps=leaf_history, expect="leaf_coalesceable")],
              host="xcp-ng-2"),
           vm("detached-vm", [disk("detached-disk", "old", 16, steps=leaf_history)], power_state="Halted")]
    return pool("pool-member", srs, vms, hosts=("xcp-ng-1", "xcp-ng-2"), master="xcp-ng-1",
                this_host="xcp-ng-2", description=pool_member.__doc__)


def long_chain(length=29):
    """A disk whose chain is `length` VHDs long (SM refuses snapshots past 30)."""
    steps = []
    for index in range(length - 1):
        steps += [write(index % 8, 1), snapshot("s{:02d}".format(index))]
    srs = [sr("ext", "ext", 2048, name="Local storage")]
    vms = [vm("chained", [disk("long-chain", "ext", 16, steps=steps + [write(0, 1)], expect="snapshot_present",
                               expect_parent="hidden_parent")])]
    return pool("long-chain", srs, vms, description=long_chain.__doc__)


def busy(speed_mib=4.0, writes_mib_s=8.0, leaf_mib=64, disk_mib=1024, live_timeout=10.0):
    """A VM that writes faster than its SR merges: SM snapshot-coalesces, the leaf grows every round,
    and SM gives up on it ("could not be coalesced"); the disk's size bounds what the VM writes."""
    srs = [sr("ext", "ext", 8192, name="Slow storage", speed_mib=speed_mib)]
    vms = [vm("busy-db", [disk("busy-leaf", "ext", disk_mib, expect="leaf_coalesceable",
                               steps=[write(0, 8), snapshot("s"), write(8, leaf_mib), delete_snapshot("s")])],
              writes_mib_s=writes_mib_s)]
    return pool("busy", srs, vms, live_timeout=live_timeout, description=busy.__doc__)


def pool_shared_lvm(count=12, size_mib=64, real_data=None):
    """This host masters a 3-host pool sharing an iSCSI LVM SR, and has local ext storage. Most VMs
    run on the other hosts, some are halted or suspended, some run here; deleted snapshots leave
    leaf-coalesceable chains in every group (on the shared SR) and on the ext SR. On this host only
    the chains of VMs running here are active LVs. `count` VMs; `real_data` (default: up to 100
    VMs) writes real data, else blocks are allocated without data (benchmarks)."""
    real = count <= 100 if real_data is None else real_data
    hosts = ("xcp-ng-1", "xcp-ng-2", "xcp-ng-3")
    srs = [sr("san", "lvmoiscsi", max(4096, count * 4 * (size_mib + 16)), name="iSCSI SAN", shared=True),
           sr("local", "ext", max(2048, count * 2 * size_mib), name="Local storage")]

    def history(keep_snapshot):
        first, second = (write(0, 2), write(2, 1)) if real else (sparse(0, 2), sparse(2, 1))
        steps = [first, snapshot("s"), second]
        return steps if keep_snapshot else steps + [delete_snapshot("s")]

    groups = (("remote", "Running", hosts[1]), ("remote", "Running", hosts[2]), ("halted", "Halted", None),
              ("remote", "Running", hosts[1]), ("here", "Running", hosts[0]), ("suspended", "Suspended", None))
    vms = []
    for index in range(count):
        group, power_state, host = groups[index % len(groups)]
        name = "{}-{:05d}".format(group, index)
        kept = index % 7 == 6
        disks = [disk(name + "-root", "san", size_mib, steps=history(kept),
                      expect="snapshot_present" if kept else "leaf_coalesceable",
                      expect_parent="hidden_parent" if kept else None)]
        if group in ("here", "halted"):
            disks.append(disk(name + "-data", "local", size_mib, steps=history(False), expect="leaf_coalesceable"))
        vms.append(vm(name, disks, power_state=power_state, host=host))
    return pool("pool-shared-lvm", srs, vms, hosts=hosts, description=pool_shared_lvm.__doc__)


HOSTILE_QCOW2 = (("truncated-header", "scan_error"), ("backing-loop", "scan_error"),
                 ("backing-outside", "orphan"), ("unknown-feature", "scan_error"))


def qcow2(count=0, big_gib=2560):
    """XCP-ng 8.3 with QCOW2 VDIs beside VHDs: a local ext SR and an iSCSI LVM SR each hold QCOW2 and
    VHD chains, with leaves left after deleted snapshots, kept snapshots (hidden parents), a hidden
    parent the GC merges on its own, and one QCOW2 disk of `big_gib` GiB (over 2 TiB: QCOW2 by
    default, sparse). A third ext SR holds hostile QCOW2 images, apart because SM's GC stops on an SR
    holding them: a truncated header, a backing loop, a backing file outside the SR, an unknown
    incompatible feature bit. `count` more VMs, each with a QCOW2 disk written whole (for benchmarks:
    most leaf-coalesceable, one in five on the LVM SR)."""
    srs = [sr("ext", "ext", 4 * 1024 * 1024, name="Local ext"),
           sr("iscsi", "lvmoiscsi", 4096 + count * 200, name="iSCSI SAN", shared=True),
           sr("hostile", "ext", 1024, name="Hostile images")]
    leaf = [write(0, 4), snapshot("s"), write(2, 4), delete_snapshot("s")]
    kept = [write(0, 4), snapshot("keep"), write(4, 2)]
    twice = [write(0, 4), snapshot("a"), write(4, 2), snapshot("b"), write(6, 2), delete_snapshot("a"),
             delete_snapshot("b")]
    q = "qcow2"
    vms = [
        vm("q-web", [disk("q-web-root", "ext", 64, leaf, vdi_type=q, expect="leaf_coalesceable")]),
        vm("q-db", [disk("q-db-data", "iscsi", 64, leaf, vdi_type=q, expect="leaf_coalesceable")],
           power_state="Halted"),
        vm("q-build", [disk("q-build-root", "iscsi", 64, kept, vdi_type=q, expect="snapshot_present",
                            expect_parent="hidden_parent"),
                       disk("q-build-scratch", "ext", 64, kept, vdi_type=q, expect="snapshot_present",
                            expect_parent="hidden_parent")]),
        vm("q-mail", [disk("q-mail-root", "ext", 64, twice, vdi_type=q, expect="leaf_coalesceable",
                           expect_parent="coalesceable")], power_state="Halted"),
        vm("q-big", [disk("q-big-data", "ext", big_gib * 1024, [write(0, 2), snapshot("s"), write(1, 2),
                                                                 delete_snapshot("s")],
                          vdi_type=q, expect="leaf_coalesceable")], power_state="Halted"),
        vm("v-web", [disk("v-web-root", "ext", 64, leaf, expect="leaf_coalesceable")]),
        vm("v-db", [disk("v-db-data", "iscsi", 64, leaf, expect="leaf_coalesceable")], power_state="Halted"),
        vm("hostile", [disk("hostile-" + kind, "hostile", 64, hostile=kind, vdi_type=q, expect=state)
                       for kind, state in HOSTILE_QCOW2], power_state="Halted"),
    ]
    for index in range(count):
        kept_snapshot = index % 10 == 9
        steps = [sparse(0, 2), snapshot("s"), sparse(2 + index % 5, 1)]
        if not kept_snapshot:
            steps.append(delete_snapshot("s"))
        vms.append(vm("bulk-{:05d}".format(index), [
            disk("bulk-{:05d}".format(index), "iscsi" if index % 5 == 0 else "ext", 256, steps, vdi_type=q,
                 bulk=True, expect="snapshot_present" if kept_snapshot else "leaf_coalesceable")],
            power_state="Running" if index % 3 else "Halted"))
    return pool("qcow2", srs, vms, description=qcow2.__doc__)


SCENARIOS = {"demo": demo, "large": large, "states": states, "pool-member": pool_member,
             "long-chain": long_chain, "busy": busy, "pool-shared-lvm": pool_shared_lvm, "qcow2": qcow2}


def names():
    return sorted(SCENARIOS)


def get(name, **params):
    """The scenario `name` built with `params`; KeyError naming the known ones otherwise."""
    if name not in SCENARIOS:
        raise KeyError("unknown scenario {!r} (known: {})".format(name, ", ".join(names())))
    return SCENARIOS[name](**params)
