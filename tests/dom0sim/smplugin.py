"""The `coalesce-leaf` xapi plugin of SM (host.call_plugin(host, "coalesce-leaf", "leaf-coalesce",
{"vm_uuid": ...})): it finds the VM's leaf-coalesceable VDIs on LVM SRs this host masters, runs a GC
pass, suspends the VM, forces the leaf coalesce (other-config:leaf-coalesce=force), resumes it and
ends with the generation's final pass. Its GC passes run inside the plugin call: no process, no unit.
"""
import collections

from tests.dom0sim.smgc import LEAF_COALESCE_KEY, GcPass
from tests.dom0sim.smstore import SmError
from tests.dom0sim.xapi import vm
from tests.dom0sim.xapi.errors import XapiError

PLUGIN_NAME = "coalesce-leaf"
RET_SUCCESS, RET_NOTHING_TODO, RET_NO_SUCH_VM, RET_ERROR_VM, RET_ERROR_XAPI, RET_ERROR_OTHER = range(6)
RET_MSG = {
    RET_SUCCESS: "Success",
    RET_NOTHING_TODO: "VM has no leaf-coalesceable VDIs",
    RET_NO_SUCH_VM: "VM not found",
    RET_ERROR_VM: "Failed to suspend the VM",
    RET_ERROR_XAPI: "XAPI error",
    RET_ERROR_OTHER: "Error",
}


class LeafCoalescePlugin(object):
    """The StorageManager's coalesce-leaf plugin."""

    def coalesce_leaf_plugin(self, host_ref, args):
        """host.call_plugin(host, "coalesce-leaf", "leaf-coalesce", {"vm_uuid": ...}), run on `host_ref`.

        Failures are plain Exceptions, so the client sees XENAPI_PLUGIN_FAILURE [fn, "Exception", text]
        as XenAPIPlugin reports them.
        """
        status, messages = self.vm_leaf_coalesce(host_ref, args.get("vm_uuid", ""))
        text = RET_MSG[status]
        if messages:
            text += "\nNote:\n" + "\n".join(messages)
        elif status == RET_NOTHING_TODO:
            status = RET_SUCCESS
        if status != RET_SUCCESS:
            raise Exception(text)
        return text

    def vm_leaf_coalesce(self, host_ref, vm_uuid):
        self.step("plugin.start")
        messages = []
        vm_ref = self.records.by_uuid("VM", vm_uuid)
        if vm_ref is None:
            self.log("Error: VM {} not found".format(vm_uuid))
            return RET_NO_SUCH_VM, messages
        vdis = collections.OrderedDict()
        for vbd_ref in self.db.get_field("VM", vm_ref, "VBDs"):
            vdi_ref = self.db.get_field("VBD", vbd_ref, "VDI")
            if not self.db.exists("VDI", vdi_ref):
                continue
            vdi = self.db.get("VDI", vdi_ref)
            sr = self.db.get("SR", vdi["SR"])
            if sr["type"].startswith("lv"):
                self.log("VDI to consider: {}".format(vdi["uuid"]))
                vdis.setdefault(sr["uuid"], []).append(vdi["uuid"])
            else:
                self.log("Skipping non-LVM VDI: {}".format(vdi["uuid"]))
        status = RET_SUCCESS
        coalesceable = collections.OrderedDict()
        for sr_uuid, vdi_uuids in vdis.items():
            master, attached = self.records.sr_master_uuid(self.records.sr_ref(sr_uuid))
            prefix = "Unable to check VDIs on SR {} because ".format(sr_uuid)
            if not attached:
                messages.append(prefix + "it is not attached")
                continue
            if master != self.db.get_field("host", host_ref, "uuid"):
                messages.append(prefix + "this host is not its master. Run on host {} to check that SR".format(master))
                continue
            try:
                found = self.coalesceable_leaves(sr_uuid, vdi_uuids)
            except SmError as exc:
                text = "Error: {}, skipping SR {}".format(exc, sr_uuid)
                self.log(text)
                messages.append(text)
                status = RET_ERROR_OTHER
                continue
            if found:
                coalesceable[sr_uuid] = found
        if not coalesceable:
            self.log("The VM has no VDIs that could be leaf-coalesced")
            return RET_NOTHING_TODO, messages
        for sr_uuid in coalesceable:
            self.plugin_gc(sr_uuid)
        if self.generation.plugin_waits_for_gc:
            for sr_uuid in coalesceable:
                self.wait_for_completion(sr_uuid)
        self.step("plugin.before-suspend")
        suspended = False
        if self.db.get_field("VM", vm_ref, "power_state") == "Running":
            self.log("Suspending VM {}".format(vm_uuid))
            try:
                vm.run(self.db, vm_ref, "suspend")
            except XapiError:
                self.log("Failed to suspend the VM")
                return RET_ERROR_VM, messages
            suspended = True
        try:
            self.force_leaf_coalesce(host_ref, coalesceable)
        finally:
            if suspended:
                self.log("Resuming VM {}".format(vm_uuid))
                vm.run(self.db, vm_ref, "resume")
            for sr_uuid in coalesceable:
                self.plugin_final_pass(sr_uuid)
        return status, messages

    def plugin_gc(self, sr_uuid, dry_run=False):
        """A GC pass inside the plugin: it exits at once while another GC holds gc_active. SM 4.1 calls
        run_gc(immediate=True): no `=== SR` line, a fatal error logged and the plugin goes on; SM 3.2
        calls gc(inBackground=False): `=== SR` first, a fatal error raised to the plugin."""
        if self.generation.plugin_calls_run_gc:
            self.run_gc(sr_uuid, dry_run=dry_run)
        else:
            self.gc(sr_uuid, dry_run=dry_run, raise_errors=True)

    def plugin_final_pass(self, sr_uuid):
        """SM 4.1: a dry run in the plugin, going round while it finds work. SM 3.2: gc(inBackground=True),
        a daemonised GC that keeps the quiet period once the SR had a GC, and the plugin returns."""
        if self.generation.plugin_final_dry_run:
            self.plugin_gc(sr_uuid, dry_run=True)
        else:
            self.gc_in_background(sr_uuid, self.gc_quiet_seconds if sr_uuid in self._gc_ran else 0.0)

    def coalesceable_leaves(self, sr_uuid, vdi_uuids):
        forest = GcPass(self, sr_uuid).scan()
        return [uuid for uuid in vdi_uuids if forest.get(uuid) is not None and forest.get(uuid).is_leaf_coalesceable()]

    def force_leaf_coalesce(self, host_ref, coalesceable):
        for sr_uuid, vdi_uuids in coalesceable.items():
            self.log("Processing VDIs: {}".format(vdi_uuids))
            for vdi_uuid in vdi_uuids:
                ref = self.records.vdi_ref(vdi_uuid)
                if ref is None or self.db.get_field("VDI", ref, "other_config").get(LEAF_COALESCE_KEY):
                    continue
                self.records.set_map_key("VDI", ref, "other_config", LEAF_COALESCE_KEY, "force")
            self.log("Coalescing all in SR {}...".format(sr_uuid))
            self.plugin_gc(sr_uuid)
