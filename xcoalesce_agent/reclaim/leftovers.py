"""What interrupted runs left on the host, found and undone from xapi alone (the marks, marks.py).

The journal is read first wherever it exists (it knows the order of the steps); this is the safety
net for a journal lost or corrupt, and for a shared SR whose pool master changed while its agent
had changes open. It runs under the host lock: at the start of every run, at each cycle of the
service (when the inspection saw marks), and as `xcoalesce-agent --repair`.

What an administrator can expect:

- This host's own marks are undone: no run of this host is in progress, as the lock is held.
- Another host's marks are undone only on an SR this host is now the master of (the pool master
  for a shared SR): the other host's agent no longer starts runs there. A run it had in progress
  when the master changed may still be going, so its marks wait while anything shows it: the
  SR's GC (smgc: locks, unit, `cleanup` process, xapi task), a paused VDI, a pending
  `coalesce-leaf` plugin task anywhere in the pool, an operation in progress on the VM. Marks on
  SRs another host masters are that host's business: listed, not touched.
- `force` is taken back at once, whoever set it and whatever runs: without it SM merges with its
  own time limit or not at all, never with an unbounded freeze. A hold (`false`) goes once the
  SR's GC is idle (waited for up to `wait_seconds`), as does the resume of a VM the plugin
  suspended, which also needs no plugin call pending (while it runs nobody may resume the VM).
- A flag someone else changed since the agent set it is never overwritten: it and its mark are
  left, with a warning, and reported until the administrator removes the mark.
"""
import logging

import XenAPI

from ..inspect import inspection, inventory, marks, smgc, xapi
from ..errors import HostUnreachable
from ..inspect.marks import HOLD, LEAF_COALESCE_KEY, VDI_MARK_KEY, VM_MARK_KEY

LOG = logging.getLogger(__name__)

PLUGIN_TASK_LABEL = "Async.host.call_plugin"
RECORD_FIELDS = {
    "pool": ("master",),
    "host": ("uuid",),
    "SR": ("uuid", "name_label", "type", "shared"),
    "PBD": ("host", "SR", "currently_attached"),
    "VDI": ("uuid", "SR", "other_config", "sm_config"),
    "VM": ("uuid", "power_state", "other_config", "current_operations"),
}


class Leftovers(object):
    """What one repair did (`undone`), what it left (`left`: for later or for the administrator),
    and the marks it is not this host's to undo (`others`); one line each."""

    def __init__(self):
        self.undone = []
        self.left = []
        self.others = []

    def to_dict(self):
        return {"undone": self.undone, "left": self.left, "others": self.others}


def repair(config, session, wait_seconds):
    """Undo the marked changes of interrupted runs that are safe to undo now; returns `Leftovers`.

    Raises `HostUnreachable` when xapi's records cannot be read; a change xapi refuses to undo is
    reported in `left` and the others are still tried.
    """
    return _Repair(config, session, wait_seconds).run()


class _Repair(object):
    def __init__(self, config, session, wait_seconds):
        self.config = config
        self.session = session
        self.wait_seconds = wait_seconds
        self.host_uuid = inventory.host_uuid(config.xapi.inventory)
        self.result = Leftovers()
        self.sr_uuids = {}  # SR ref -> uuid
        self.mastered = set()
        self._gc = {}
        self._plugin = None

    def records(self, class_name):
        return xapi.iter_records(self.config, self.session, class_name, RECORD_FIELDS[class_name])

    def run(self):
        vdis = [(ref, vdi) for ref, vdi in self.records("VDI") if VDI_MARK_KEY in (vdi.get("other_config") or {})]
        vms = [(ref, vm) for ref, vm in self.records("VM") if VM_MARK_KEY in (vm.get("other_config") or {})]
        if not vdis and not vms:
            return self.result
        srs = dict(self.records("SR"))
        self.sr_uuids = {ref: sr["uuid"] for ref, sr in srs.items()}
        self.mastered = self._mastered(srs)
        marked_vms = {vm["uuid"] for _, vm in vms}
        settled = {}  # VM uuid -> VDI uuids whose marks go once the VM's mark is gone
        for _, vdi in vdis:
            vm_uuid = self.vdi(vdi, marked_vms)
            if vm_uuid:
                settled.setdefault(vm_uuid, []).append(vdi["uuid"])
        for _, vm in vms:
            if self.vm(vm):
                self._try("VM {}".format(vm["uuid"]), marks.drop_settled_marks, settled.get(vm["uuid"], ()))
        return self.result

    def _mastered(self, srs):
        """UUIDs of the SRs this host is the master of: those an inspection here covers."""
        hosts = dict(self.records("host"))
        host_ref = next((ref for ref, host in hosts.items() if host["uuid"] == self.host_uuid), None)
        if host_ref is None:
            raise HostUnreachable("xapi at {} does not know this host {}".format(self.config.xapi.socket,
                                                                                 self.host_uuid))
        master = next(iter(dict(self.records("pool")).values()), {}).get("master")
        ours, _ = inspection.select_srs(host_ref, master == host_ref, srs, dict(self.records("PBD")))
        return {sr["uuid"] for _, sr in ours}

    def whose(self, host_uuid, sr_uuids):
        """"own", "ours" (another host's, on SRs this host masters) or "" (not this host's to undo)."""
        if host_uuid == self.host_uuid:
            return "own"
        return "ours" if sr_uuids and all(uuid in self.mastered for uuid in sr_uuids) else ""

    def gc_busy(self, sr_uuid):
        """What shows the SR's GC working, after waiting up to wait_seconds once, or ""."""
        if sr_uuid not in self._gc:
            if self.wait_seconds:
                smgc.wait_gc_idle(self.config, self.session, sr_uuid, self.wait_seconds)
            self._gc[sr_uuid] = smgc.gc_activity(self.config, self.session, sr_uuid)
        return self._gc[sr_uuid]

    def plugin_running(self):
        """True while a `coalesce-leaf` (any plugin) call is pending in the pool: it may hold a VM."""
        if self._plugin is None:
            tasks = self.session.xenapi.task.get_all_records_where(
                'field "name__label" = "{}" and field "status" = "pending"'.format(PLUGIN_TASK_LABEL))
            self._plugin = bool(tasks)
        return self._plugin

    def _try(self, subject, undo, *arguments, **options):
        """`undo(session, *arguments, **options)`; xapi refusing it is reported as left. True when it went through."""
        try:
            self.result.undone.extend(undo(self.session, *arguments, **options) or ())
        except XenAPI.Failure as error:
            self.result.left.append("{}: could not be undone yet: {}".format(subject, xapi.describe(error)))
            return False
        return True

    def vdi(self, vdi, marked_vms):
        """Undo one VDI's marked flag change when safe; returns the VM UUID whose mark must go first
        when the VDI's mark has to wait for it, else ""."""
        other_config = vdi.get("other_config") or {}
        text, uuid = other_config[VDI_MARK_KEY], vdi["uuid"]
        mark = marks.parse_vdi_mark(text)
        if mark is None:
            self.result.left.append("VDI {}: {}={} is not a mark this agent writes; remove it by hand".format(
                uuid, VDI_MARK_KEY, text))
            return ""
        sr_uuid = self.sr_uuids.get(vdi.get("SR"), "")
        owner = self.whose(mark["host"], [sr_uuid])
        if not owner:
            self.result.others.append("VDI {}: leaf-coalesce={} set by host {} at {} on SR {}, whose master "
                                      "undoes it".format(uuid, mark["set"], mark["host"], mark.get("at"), sr_uuid))
            return ""
        current = other_config.get(LEAF_COALESCE_KEY)
        decision = marks.undo_decision(mark["set"], mark["replaced"], current)
        if decision == marks.CHANGED:
            warning = marks.changed_warning(uuid, mark["set"], current)
            LOG.warning("%s", warning)
            self.result.left.append(warning)
            return ""
        if decision == marks.RESTORE and mark["set"] == HOLD:
            busy = self.gc_busy(sr_uuid) or (
                "the VDI is paused" if (vdi.get("sm_config") or {}).get("paused") == "true" else "")
            if busy:
                self.result.left.append("VDI {}: leaf-coalesce=false kept for now, as SR {} is busy: {}".format(
                    uuid, sr_uuid, busy))
                return ""
        keep = mark.get("vm") in marked_vms
        self._try("VDI {}".format(uuid), marks.restore_flag, uuid, mark["set"], mark["replaced"], keep_mark=keep)
        return mark["vm"] if keep else ""

    def vm(self, vm):
        """Resume one marked VM when safe and remove its mark; True when the mark is gone."""
        text, uuid = vm["other_config"][VM_MARK_KEY], vm["uuid"]
        mark = marks.parse_vm_mark(text)
        if mark is None:
            self.result.left.append("VM {}: {}={} is not a mark this agent writes; remove it by hand".format(
                uuid, VM_MARK_KEY, text))
            return False
        if not self.whose(mark["host"], mark["srs"]):
            self.result.others.append("VM {}: suspended by the plugin for host {} at {}; the master of SR {} "
                                      "undoes it".format(uuid, mark["host"], mark.get("at"), ", ".join(mark["srs"])))
            return False
        if mark["power_state"] == "Running" and vm.get("power_state") == "Suspended":
            busy = self.vm_busy(vm, mark)
            if busy:
                self.result.left.append("VM {}: left suspended for now: {}".format(uuid, busy))
                return False
        return self._try("VM {}".format(uuid), marks.bring_back, uuid, mark["power_state"])

    def vm_busy(self, vm, mark):
        """Why a suspended VM cannot be resumed yet (the plugin may still hold it), or ""."""
        if self.plugin_running():
            return "a coalesce-leaf plugin call is still pending"
        if vm.get("current_operations"):
            return "an operation is in progress on it ({})".format(
                ", ".join(sorted(set(vm["current_operations"].values()))))
        for sr_uuid in sorted(mark["srs"]):
            busy = self.gc_busy(sr_uuid)
            if busy:
                return "the garbage collector of SR {} runs ({})".format(sr_uuid, busy)
        return ""


def count_marks(result):
    """How many of the agent's marks an inspection saw, over its SRs."""
    return sum(len(sr.leftover_marks or ()) for sr in result.srs or ())

