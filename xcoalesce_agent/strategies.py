"""The host changes of a run, each journalled before it is made and undone in a `finally`: the
VDI's `leaf-coalesce` flag (to force a leaf, or hold one back), the forced live path and the
`coalesce-leaf` plugin path. What a crash leaves open, `journal.repair` undoes."""
import logging

from . import inventory, journal as journal_module, planner
from .smgc import gc_pass
from .xapi import NULL_REF

LOG = logging.getLogger(__name__)

PLUGIN = "coalesce-leaf"
PLUGIN_FUNCTION = "leaf-coalesce"


def set_leaf_coalesce(session, journal, step):
    """Journal `step`, then set the VDI's `other-config:leaf-coalesce` to its value. Returns the step id."""
    ref = session.xenapi.VDI.get_by_uuid(step["vdi_uuid"])
    step_id = journal.begin(step)
    try:
        if step["previous"] is not None:
            session.xenapi.VDI.remove_from_other_config(ref, journal_module.LEAF_COALESCE_KEY)
        session.xenapi.VDI.add_to_other_config(ref, journal_module.LEAF_COALESCE_KEY, step["value"])
    except BaseException:
        close_step(session, journal, step_id)
        raise
    return step_id


def close_step(session, journal, step_id):
    """Undo one journal step now; if that fails it stays for `repair` and the error propagates."""
    step = next(item for item in journal.steps() if item["id"] == step_id)
    for line in journal_module.undo(session, step):
        LOG.info("%s", line)
    journal.end(step_id)


def _leaf_coalesce_value(session, vdi_uuid):
    ref = session.xenapi.VDI.get_by_uuid(vdi_uuid)
    return session.xenapi.VDI.get_other_config(ref).get(journal_module.LEAF_COALESCE_KEY)


def run_live(config, session, journal, entry):
    """`leaf-coalesce=force` on the VDI, then a GC pass; the flag goes in every case."""
    previous = _leaf_coalesce_value(session, entry["vdi_uuid"])
    step = set_leaf_coalesce(session, journal, journal_module.force_step(entry["sr_uuid"], entry["vdi_uuid"],
                                                                         previous))
    try:
        gc_pass(config, session, entry["sr_uuid"])
    finally:
        close_step(session, journal, step)


def run_plugin(config, session, journal, entry, facts):
    """The `coalesce-leaf` plugin for the entry's VM (suspends it); the VM comes back in every case."""
    vm_uuid = entry["vm_uuid"]
    vm_ref = session.xenapi.VM.get_by_uuid(vm_uuid)
    power_state = session.xenapi.VM.get_power_state(vm_ref)
    forced, sr_uuids = [], set()
    for vbd_ref in session.xenapi.VM.get_VBDs(vm_ref):
        vdi_ref = session.xenapi.VBD.get_VDI(vbd_ref)
        if vdi_ref == NULL_REF:
            continue
        record = session.xenapi.VDI.get_record(vdi_ref)
        sr = facts.srs.get(session.xenapi.SR.get_uuid(record["SR"]), {})
        if planner.is_lvm(sr.get("type", "")):
            sr_uuids.add(sr["uuid"])
            forced.append((record["uuid"], record["other_config"].get(journal_module.LEAF_COALESCE_KEY)))
    host_ref = session.xenapi.host.get_by_uuid(inventory.host_uuid(config.xapi.inventory))
    step = journal.begin(journal_module.suspend_step(sr_uuids, vm_uuid, power_state, forced))
    try:
        answer = session.xenapi.host.call_plugin(host_ref, PLUGIN, PLUGIN_FUNCTION, {"vm_uuid": vm_uuid})
        LOG.info("coalesce-leaf on VM %s: %s", vm_uuid, " ".join(str(answer).split()))
    finally:
        close_step(session, journal, step)
