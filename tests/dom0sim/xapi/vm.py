"""VM power states as xapi runs them: which operation is valid when, the errors, and the transitions.

The checks follow xapi's order: blocked operations, power state, operations in progress, templates,
snapshots, the control domain.
"""
import uuid

from . import downtime
from .errors import XapiError
from .schema import NULL_REF

HALTED, PAUSED, RUNNING, SUSPENDED = "Halted", "Paused", "Running", "Suspended"

# The power states each operation starts from.
VALID_FROM = {
    "start": [HALTED], "make_into_template": [HALTED], "clone": [HALTED], "copy": [HALTED],
    "unpause": [PAUSED],
    "resume": [SUSPENDED],
    "clean_shutdown": [RUNNING], "clean_reboot": [RUNNING], "pause": [RUNNING], "suspend": [RUNNING],
    "pool_migrate": [RUNNING], "migrate_send": [RUNNING],
    "changing_dynamic_range": [HALTED, RUNNING],
    "export": [HALTED, SUSPENDED], "destroy": [HALTED, SUSPENDED],
    "hard_reboot": [PAUSED, RUNNING],
    "hard_shutdown": [PAUSED, SUSPENDED, RUNNING], "checkpoint": [PAUSED, SUSPENDED, RUNNING],
    "snapshot": [HALTED, PAUSED, SUSPENDED, RUNNING],
}

# The power state each operation this simulation runs leaves the VM in, given start_paused.
TARGETS = {
    "start": lambda paused: PAUSED if paused else RUNNING,
    "resume": lambda paused: PAUSED if paused else RUNNING,
    "clean_shutdown": lambda paused: HALTED,
    "hard_shutdown": lambda paused: HALTED,
    "clean_reboot": lambda paused: RUNNING,
    "hard_reboot": lambda paused: RUNNING,
    "suspend": lambda paused: SUSPENDED,
    "pause": lambda paused: PAUSED,
    "unpause": lambda paused: RUNNING,
}

TEMPLATE_OPERATIONS = {"changing_dynamic_range", "clone", "copy", "export", "destroy"}
SNAPSHOT_OPERATIONS = {"clone", "copy", "export", "destroy", "hard_shutdown"}
CONTROL_DOMAIN_OPERATIONS = {"changing_dynamic_range", "start"}


def operation_error(vm_ref, record, op):
    """The XapiError `op` would meet on this VM record now, or None."""
    blocked = record["blocked_operations"]
    if op in blocked:
        return XapiError("OPERATION_BLOCKED", vm_ref, blocked[op])
    state = record["power_state"]
    if state not in VALID_FROM[op]:
        expected = ", ".join(s.lower() for s in VALID_FROM[op])
        return XapiError("VM_BAD_POWER_STATE", vm_ref, expected, state.lower())
    current = sorted(set(record["current_operations"].values()))
    if current:
        names = current[0] if len(current) == 1 else "{" + ",".join(current) + "}"
        return XapiError("OTHER_OPERATION_IN_PROGRESS", "VM." + names, vm_ref)
    if record["is_a_template"] and not record["is_a_snapshot"] and op not in TEMPLATE_OPERATIONS:
        return XapiError("VM_IS_TEMPLATE", vm_ref, op)
    if record["is_a_snapshot"] and op not in SNAPSHOT_OPERATIONS:
        return XapiError("VM_IS_SNAPSHOT", vm_ref, op)
    if record["is_control_domain"] and op not in CONTROL_DOMAIN_OPERATIONS:
        return XapiError("OPERATION_NOT_ALLOWED", "This operation is not allowed on a control domain")
    return None


def allowed_operations(record):
    """What xapi would list in VM.allowed_operations for this record."""
    return sorted(op for op in VALID_FROM if operation_error(NULL_REF, record, op) is None)


def downtime_kind(record):
    """PAUSED or SUSPENDED while the VM is not running (including while it suspends or pauses), else None."""
    operations = set(record["current_operations"].values())
    if record["power_state"] == SUSPENDED or "suspend" in operations:
        return downtime.SUSPENDED
    if record["power_state"] == PAUSED or "pause" in operations:
        return downtime.PAUSED
    return None


def new_ref():
    return "OpaqueRef:" + str(uuid.uuid4())


def run(db, vm_ref, op, start_paused=False, operation_key=None):
    """Run a power operation on a VM: mark it in current_operations, take its time, then transition.

    Injected failures (Faults.fail_vm_operation) leave the VM in its former power state.
    """
    key = operation_key or new_ref()
    with db.lock:
        record = db.get("VM", vm_ref)
        error = operation_error(vm_ref, record, op)
        if error is not None:
            raise error
        db.update("VM", vm_ref, current_operations=dict(record["current_operations"], **{key: op}))
    try:
        db.faults.take_time("VM." + op)
        db.faults.check_vm_operation(record["uuid"], op)
    except Exception:
        _end_operation(db, vm_ref, key, {})
        raise
    target = TARGETS[op](start_paused)
    _end_operation(db, vm_ref, key, _transition_fields(db, record, target))
    if target != record["power_state"]:
        db.power_changed(vm_ref)


def _end_operation(db, vm_ref, key, fields):
    with db.lock:
        operations = dict(db.get_field("VM", vm_ref, "current_operations"))
        operations.pop(key, None)
        db.update("VM", vm_ref, current_operations=operations, **fields)
        if "power_state" in fields:
            attached = fields["power_state"] in (RUNNING, PAUSED)
            for vbd in db.get_field("VM", vm_ref, "VBDs"):
                db.update("VBD", vbd, currently_attached=attached)


def _transition_fields(db, record, target):
    live = target in (RUNNING, PAUSED)
    host = record["resident_on"] if record["resident_on"] != NULL_REF else _home_host(db, record)
    domid = record["domid"] if live and record["domid"] >= 0 else (db.next_domid() if live else -1)
    return {"power_state": target, "resident_on": host if live else NULL_REF, "domid": domid}


def _home_host(db, record):
    if db.exists("host", record["affinity"]):
        return record["affinity"]
    for pool in db.all("pool"):
        master = db.get_field("pool", pool, "master")
        if db.exists("host", master):
            return master
    hosts = db.all("host")
    return hosts[0] if hosts else NULL_REF
