"""The agent's marks on the host: every change it makes is noted in xapi beside the change itself.

The journal (journal.py) is the agent's own record, on its own disk; a mark is the host's: it
survives a lost or corrupt journal and is seen by the agent of whichever host is the SR's master
next (leftovers.py). A mark is written before the change and removed once the change is undone.

- VDI `other-config:xcoalesce-agent-leaf-coalesce` beside `leaf-coalesce`, a JSON object:
  `{"set": "force" or "false", "replaced": the value before or null (unset), "host": the UUID of
  the host whose agent set it, "at": "YYYY-MM-DDTHH:MM:SSZ"}`, plus `"vm": <VM UUID>` when the
  `coalesce-leaf` plugin sets the flag for that VM.
- VM `other-config:xcoalesce-agent-suspend`, a JSON object: `{"power_state": the VM's state before
  (the plugin suspends a running VM), "srs": [the SRs whose GC the plugin runs], "host", "at"}`.
  Written after the marks of the VM's VDIs and removed before them, so a VM mark never stands
  alone: the VDI marks an inspection reads are enough to tell that something is left.

A flag is put back only while it still holds what the agent set (`undo_decision`): a value
changed by someone else since is the administrator's choice, never overwritten; its mark stays so
that reports keep showing it, and a warning says how to remove it.
"""
import json
import logging
import time

import XenAPI

LOG = logging.getLogger(__name__)

LEAF_COALESCE_KEY = "leaf-coalesce"
FORCE = "force"
HOLD = "false"
VDI_MARK_KEY = "xcoalesce-agent-leaf-coalesce"
VM_MARK_KEY = "xcoalesce-agent-suspend"

# What undoing a flag change comes to, given the flag's value now.
RESTORE = "restore"   # it holds what the agent set: put back what it replaced
DONE = "done"         # nothing to put back: never changed, or already back
CHANGED = "changed"   # someone else changed it since: left alone


def _now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _encode(document):
    return json.dumps(document, sort_keys=True, separators=(",", ":"))


def vdi_mark(value, previous, host_uuid, vm_uuid=None, at=None):
    """The text of a VDI mark: the agent sets `leaf-coalesce=value` where it was `previous` (None: unset)."""
    document = {"set": value, "replaced": previous, "host": host_uuid, "at": at or _now()}
    if vm_uuid:
        document["vm"] = vm_uuid
    return _encode(document)


def vm_mark(power_state, sr_uuids, host_uuid, at=None):
    """The text of a VM mark: the VM, in `power_state`, gets suspended by the plugin on these SRs."""
    return _encode({"power_state": power_state, "srs": sorted(sr_uuids), "host": host_uuid, "at": at or _now()})


def parse_vdi_mark(text):
    """The VDI mark as a dict, or None when it is not one the agent wrote."""
    document = _parse(text, ("set", "replaced", "host"))
    if document is None or document["set"] not in (FORCE, HOLD):
        return None
    if document["replaced"] is not None and not isinstance(document["replaced"], str):
        return None
    return document


def parse_vm_mark(text):
    """The VM mark as a dict, or None when it is not one the agent wrote."""
    document = _parse(text, ("power_state", "srs", "host"))
    if document is None or not isinstance(document["srs"], list):
        return None
    return document


def _parse(text, keys):
    try:
        document = json.loads(text)
    except (TypeError, ValueError):
        return None
    if not isinstance(document, dict) or not all(key in document for key in keys):
        return None
    return document


def reported_mark(vdi_uuid, other_config):
    """The agent's mark in a VDI record's `other_config` as an inspection reports it, or None:
    {vdi_uuid, set, replaced, host, at[, vm], leaf_coalesce (the flag now)}, or {vdi_uuid,
    unreadable} for a value this agent did not write."""
    text = other_config.get(VDI_MARK_KEY)
    if text is None:
        return None
    mark = parse_vdi_mark(text) or {"unreadable": text}
    return dict(mark, vdi_uuid=vdi_uuid, leaf_coalesce=other_config.get(LEAF_COALESCE_KEY))


def undo_decision(value, previous, current):
    """RESTORE, DONE or CHANGED for a flag the agent set to `value` over `previous`, now `current`.

    SM deletes `force` itself once it used it (`coalesceLeaf`'s `finally`): an unset flag where the
    agent set `force` gets back the value it replaced."""
    if current == value:
        return DONE if previous == value else RESTORE
    if current == previous:
        return DONE
    if value == FORCE and current is None:
        return RESTORE
    return CHANGED


def missing(error):
    """The xapi failure says the object is gone."""
    return bool(error.details) and error.details[0] in ("UUID_INVALID", "HANDLE_INVALID")


def _replace_key(api, ref, key, value):
    """Set one other-config key (xapi refuses `add_to_other_config` of a key that is there)."""
    api.remove_from_other_config(ref, key)
    api.add_to_other_config(ref, key, value)


def mark_vdi(session, vdi_ref, value, previous, host_uuid, vm_uuid=None):
    """Write the VDI's mark; call before its `leaf-coalesce` changes."""
    _replace_key(session.xenapi.VDI, vdi_ref, VDI_MARK_KEY, vdi_mark(value, previous, host_uuid, vm_uuid))


def mark_vm(session, vm_ref, power_state, sr_uuids, host_uuid):
    """Write the VM's mark; call after its VDIs' marks, before the plugin may suspend it."""
    _replace_key(session.xenapi.VM, vm_ref, VM_MARK_KEY, vm_mark(power_state, sr_uuids, host_uuid))


def changed_warning(vdi_uuid, value, current):
    """What is said of a flag someone else changed since the agent set it."""
    return ("VDI {}: leaf-coalesce is {} where the agent had set {}: someone changed it since, so it is left "
            "as it is; once checked, remove the agent's mark with `xe vdi-param-remove uuid={} param-name="
            "other-config param-key={}`").format(vdi_uuid, "unset" if current is None else current, value,
                                                  vdi_uuid, VDI_MARK_KEY)


def restore_flag(session, vdi_uuid, value, previous, keep_mark=False):
    """Put the VDI's `leaf-coalesce` back to `previous` if it still holds the agent's `value`, then
    remove its mark (unless `keep_mark`; never when someone else changed the flag). Idempotent.
    Returns one line per change made."""
    api = session.xenapi.VDI
    try:
        ref = api.get_by_uuid(vdi_uuid)
        other_config = api.get_other_config(ref)
        current = other_config.get(LEAF_COALESCE_KEY)
        decision = undo_decision(value, previous, current)
        done = []
        if decision == RESTORE and (current, previous) != (None, None):
            if current is not None:
                api.remove_from_other_config(ref, LEAF_COALESCE_KEY)
            if previous is not None:
                api.add_to_other_config(ref, LEAF_COALESCE_KEY, previous)
            done.append("VDI {}: leaf-coalesce={} restored".format(
                vdi_uuid, previous if previous is not None else "(unset)"))
        elif decision == CHANGED:
            LOG.warning("%s", changed_warning(vdi_uuid, value, current))
        if decision != CHANGED and not keep_mark and VDI_MARK_KEY in other_config:
            api.remove_from_other_config(ref, VDI_MARK_KEY)
    except XenAPI.Failure as error:
        if missing(error):
            return []
        raise
    return done


def drop_settled_marks(session, vdi_uuids):
    """Remove the marks of these VDIs whose flag is back (never one someone else changed since)."""
    api = session.xenapi.VDI
    for vdi_uuid in vdi_uuids:
        try:
            ref = api.get_by_uuid(vdi_uuid)
            other_config = api.get_other_config(ref)
            mark = parse_vdi_mark(other_config.get(VDI_MARK_KEY))
            if mark is not None and undo_decision(mark["set"], mark["replaced"],
                                                  other_config.get(LEAF_COALESCE_KEY)) == DONE:
                api.remove_from_other_config(ref, VDI_MARK_KEY)
        except XenAPI.Failure as error:
            if not missing(error):
                raise


def bring_back(session, vm_uuid, power_state):
    """Resume a VM that was running before the plugin suspended it, then remove its mark.

    The mark stays when the resume fails (the error propagates). Returns the change made, if any."""
    api = session.xenapi.VM
    try:
        ref = api.get_by_uuid(vm_uuid)
        done = []
        if power_state == "Running" and api.get_power_state(ref) == "Suspended":
            api.resume(ref, False, False)
            done.append("VM {}: resumed".format(vm_uuid))
        api.remove_from_other_config(ref, VM_MARK_KEY)
    except XenAPI.Failure as error:
        if missing(error):
            return []
        raise
    return done
