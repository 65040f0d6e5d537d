"""Pure decisions for leaf-coalesce runs: which VDIs, by which native path, with what freeze.

Input is plain data: an `model.Inspection`, the xapi records of the VMs, VDIs and SRs keyed by
UUID (`HostFacts`), and the policy from `[coalesce]` (`Policy`). Output is one `plans.PlanEntry`
per leaf-coalesceable VDI: the strategy to use, or the reason it is skipped.

Strategies, least disruptive first (docs/operations.md, "Strategies"):
  gc      the SR's normal GC merges the leaf by itself (SM's own short live freeze)
  live    `other-config:leaf-coalesce=force` + GC: the VM runs on, its disk I/O frozen for the merge
  plugin  the `coalesce-leaf` plugin (LVM SRs): the VM is suspended for the merge
The predicted freeze is the bytes to merge divided by the SR's measured merge speed; for `gc`, when
SM will not merge the leaf live at once, the pauses of its snapshot-coalesce rounds plus the final
live merge that SM bounds itself.
"""
import io
import math

from .. import model
from .plans import GC, LIVE, PLANNED, PLUGIN, SKIPPED, STRATEGY_ORDER, PlanEntry

# SM leaf-coalesces live on its own when the leaf's allocated bytes, integer-divided by the speed
# of its speed log, are under half its 10 s live timeout, or, with no speed logged, when the leaf
# is under 20 MiB; `leaf-coalesce=force` always does (cleanup.py: VDI.canLiveCoalesce).
SM_LIVE_LEAF_COALESCE_TIMEOUT = 10
SM_TIMEOUT_SAFETY_MARGIN = 0.5
SM_LIVE_FREEZE_SECONDS = SM_TIMEOUT_SAFETY_MARGIN * SM_LIVE_LEAF_COALESCE_TIMEOUT
SM_UNMEASURED_LEAF_BYTES = 20 * 1024 * 1024
# Otherwise SM snapshot-coalesces first: each round is an internal VDI.snapshot, which pauses the
# VDI's tapdisk for the snapshot and unpauses it on the new leaf. The pause of one round (a
# conservative default: the agent does not measure it apart from the merge), and the rounds
# expected: one leaves the leaf with only what the VM wrote meanwhile. A VM writing steadily takes
# more (SM 3.2 gives up after 3 rounds without progress, 4.1.10+ after up to 20 rounds).
SNAPSHOT_ROUND_PAUSE_SECONDS = 1.0
SNAPSHOT_COALESCE_ROUNDS = 1
# Suspend plus resume when the agent has not timed the plugin on this SR yet.
SUSPEND_RESUME_SECONDS = 2.0

LEAF_COALESCE_KEY = "leaf-coalesce"
RUNNING = "Running"


class Policy(object):
    """What `[coalesce]` allows; `max_freeze_seconds` may be overridden for one run."""

    def __init__(self, strategies=STRATEGY_ORDER, max_freeze_seconds=10.0, allow_ha_protected=False,
                 max_load_per_cpu=0.0, exclude_vms=(), exclude_vdis=(), exclude_tag="xcoalesce-exclude",
                 max_vms_per_window=0, max_bytes_per_window=0):
        self.strategies = tuple(name for name in STRATEGY_ORDER if name in strategies)
        self.max_freeze_seconds = max_freeze_seconds
        self.allow_ha_protected = allow_ha_protected
        self.max_load_per_cpu = max_load_per_cpu
        self.exclude_vms = frozenset(exclude_vms)
        self.exclude_vdis = frozenset(exclude_vdis)
        self.exclude_tag = exclude_tag
        self.max_vms_per_window = max_vms_per_window
        self.max_bytes_per_window = max_bytes_per_window

    @classmethod
    def from_config(cls, coalesce, max_freeze_seconds=None):
        return cls(
            strategies=coalesce.strategies,
            max_freeze_seconds=coalesce.max_freeze_seconds if max_freeze_seconds is None else max_freeze_seconds,
            allow_ha_protected=coalesce.allow_ha_protected,
            max_load_per_cpu=coalesce.max_load_per_cpu,
            exclude_vms=coalesce.exclude_vms,
            exclude_vdis=coalesce.exclude_vdis,
            exclude_tag=coalesce.exclude_tag,
            max_vms_per_window=coalesce.max_vms_per_window,
            max_bytes_per_window=coalesce.max_bytes_per_window,
        )

    def without(self, strategy):
        """The same policy with one strategy taken away (e.g. `gc` once the GC pass has run)."""
        copy = Policy.__new__(Policy)
        copy.__dict__.update(self.__dict__)
        copy.strategies = tuple(name for name in self.strategies if name != strategy)
        return copy


class HostFacts(object):
    """What xapi and the host say right now, as plain data.

    `vms`, `vdis`, `srs`: xapi records keyed by UUID. `speeds`: {sr_uuid: {"sm": bytes/s or None,
    strategy: bytes/s measured by the agent's own runs}}. `load_per_cpu`: Dom0 1-minute load / CPUs.
    """

    def __init__(self, vms=None, vdis=None, srs=None, speeds=None, load_per_cpu=0.0):
        self.vms = vms or {}
        self.vdis = vdis or {}
        self.srs = srs or {}
        self.speeds = speeds or {}
        self.load_per_cpu = load_per_cpu

    def speed(self, sr_uuid, strategy):
        """Bytes per second a merge runs at on this SR for this strategy, or None if never measured."""
        measured = self.speeds.get(sr_uuid, {})
        return measured.get(strategy) or measured.get("sm")


def parse_speed_log(text):
    """The speed SM reads from `<sr>.speed_log` (cleanup.py: getStorageSpeed), or None.

    SM takes the mean of every line of the file (it writes only its last ten runs): any line that is
    not a number, a blank line included, means no speed at all, as does an empty file or a mean that
    is not above zero. A figure SM never writes (nan, inf) gives no speed either.
    """
    try:
        figures = [float(line) for line in io.StringIO(text, newline=None).readlines()]
    except ValueError:
        return None
    if not figures:
        return None
    mean = sum(figures) / len(figures)
    return mean if mean > 0 and math.isfinite(mean) else None


def sm_merges_live(merge_bytes, sm_speed, forced=False):
    """SM's own choice (VDI.canLiveCoalesce): merge the leaf live now, rather than snapshot-coalesce
    it first. `merge_bytes` is the leaf's allocated bytes, `sm_speed` what its speed log gives."""
    if forced:
        return True
    if sm_speed:
        return merge_bytes // sm_speed < SM_LIVE_FREEZE_SECONDS
    return merge_bytes < SM_UNMEASURED_LEAF_BYTES


def is_lvm(sr_type):
    return sr_type.startswith("lv")


def _truthy(value):
    return str(value).strip().lower() in ("true", "yes", "1", "on")


def plan(inspection, facts, policy, vms=(), srs=()):
    """One entry per leaf-coalesceable (or policy-excluded) VDI, narrowed to `vms` / `srs` if given.

    Entries to run come first, largest reclaim first; the caps per window are not applied here
    (see `apply_caps`).
    """
    candidates = [(sr, vdi) for sr in inspection.srs or () for vdi in sr.vdis or ()
                  if vdi.state in (model.LEAF_COALESCEABLE, model.EXCLUDED)]
    reasons = {vdi.uuid: preflight(sr, vdi, facts, policy) for sr, vdi in candidates}
    entries = []
    for sr, vdi in candidates:
        if (srs and sr.uuid not in srs) or (vms and vdi.vm_uuid not in vms):
            continue
        entries.append(_plan_vdi(sr, vdi, candidates, reasons, facts, policy))
    entries.sort(key=lambda entry: (entry.result != PLANNED, -entry.estimated_bytes))
    return entries


def _vm_of(vdi, facts):
    """The record of the VM the VDI belongs to (for a snapshot VDI, the VM it is a snapshot of)."""
    return facts.vms.get(vdi.vm_uuid) if vdi.vm_uuid else None


def _is_snapshot(vdi, facts):
    return _truthy((facts.vdis.get(vdi.uuid) or {}).get("is_a_snapshot", False))


def _attached_vm(vdi, facts):
    """The record of the VM whose disk the VDI is, whose I/O a merge freezes: none for a snapshot VDI,
    which no running VM uses."""
    return None if _is_snapshot(vdi, facts) else _vm_of(vdi, facts)


def _entry(sr, vdi, vm):
    return PlanEntry(
        vm_uuid=vdi.vm_uuid or "", vm_name=vdi.vm_name or "", vm_power_state=vm.get("power_state", "") if vm else "",
        vdi_uuid=vdi.uuid, vdi_name=vdi.name or "", format=vdi.format or "vhd", sr_uuid=sr.uuid, sr_type=sr.type,
        chain_length=vdi.chain_length, parent_uuid=vdi.parent_uuid or "", estimated_bytes=vdi.reclaimable_bytes or 0,
        merge_bytes=vdi.merge_bytes or 0, merge_free_bytes=vdi.merge_free_bytes or 0, result=SKIPPED)


def _plan_vdi(sr, vdi, candidates, reasons, facts, policy):
    vm = _attached_vm(vdi, facts)
    entry = _entry(sr, vdi, vm)
    if reasons[vdi.uuid]:
        entry.reason = reasons[vdi.uuid]
        return entry
    options, refusals = _strategies(sr, vdi, vm, candidates, reasons, facts, policy)
    fitting = [(name, freeze) for name, freeze in options if freeze <= policy.max_freeze_seconds]
    if fitting:
        entry.update(strategy=fitting[0][0], predicted_freeze_seconds=round(fitting[0][1], 3),
                     fallbacks=[name for name, _ in fitting[1:]], result=PLANNED)
        return entry
    if options:
        name, freeze = min(options, key=lambda option: option[1])
        entry.update(strategy=name, predicted_freeze_seconds=round(freeze, 3), reason=(
            "predicted freeze {:.1f} s ({}) over the maximum {:g} s".format(
                freeze, name, policy.max_freeze_seconds)))
        return entry
    entry.reason = "; ".join(refusals) or "no strategy allowed by the configuration"
    return entry


def preflight(sr, vdi, facts, policy):
    """Why this VDI must not be leaf-coalesced now, or "" when it may.

    The exclusions look at the VM the VDI belongs to, the VM's state checks at the VM using it.
    """
    owner, attached = _vm_of(vdi, facts), _attached_vm(vdi, facts)
    for check, vm in ((_check_state, owner), (_check_sr, owner), (_check_vdi, owner), (_check_exclusions, owner),
                      (_check_vm, attached), (_check_host, owner), (_check_space, owner)):
        reason = check(sr, vdi, vm, facts, policy)
        if reason:
            return reason
    return ""


def _check_state(sr, vdi, vm, facts, policy):
    if vdi.state == model.EXCLUDED:
        return vdi.reason or "excluded by policy"
    if vdi.state != model.LEAF_COALESCEABLE:
        return "not leaf-coalesceable any more ({})".format(vdi.state)
    return ""


def _check_sr(sr, vdi, vm, facts, policy):
    if sr.gc_running:
        return "the SR's garbage collector is busy (running for {:.0f} s)".format(sr.gc_running_seconds or 0)
    other = (facts.srs.get(sr.uuid) or {}).get("other_config", {})
    if other.get(LEAF_COALESCE_KEY) == "false":
        return "leaf coalesce switched off on the SR (other-config:leaf-coalesce=false)"
    for key in ("gc", "coalesce"):
        if other.get(key) == "false":
            return "garbage collection switched off on the SR (other-config:{}=false)".format(key)
    return ""


def _check_vdi(sr, vdi, vm, facts, policy):
    record = facts.vdis.get(vdi.uuid)
    if record is None:
        return "VDI unknown to xapi"
    if record.get("other_config", {}).get(LEAF_COALESCE_KEY) == "false":
        return "leaf coalesce switched off on the VDI (other-config:leaf-coalesce=false)"
    if record.get("on_boot") == "reset":
        return "VDI has on-boot=reset (SM never leaf-coalesces it)"
    if record.get("allow_caching") in (True, "true"):
        return "VDI has allow-caching=true (SM never leaf-coalesces it)"
    if record.get("current_operations"):
        return "VDI busy with {}".format(", ".join(sorted(record["current_operations"].values())))
    return ""


def _check_exclusions(sr, vdi, vm, facts, policy):
    if vdi.uuid in policy.exclude_vdis:
        return "VDI excluded by exclude_vdis"
    record = facts.vdis.get(vdi.uuid) or {}
    if _truthy(record.get("other_config", {}).get(policy.exclude_tag, "")):
        return "VDI excluded by other-config:{}".format(policy.exclude_tag)
    if vm is None:
        return ""
    if vdi.vm_uuid in policy.exclude_vms:
        return "VM excluded by exclude_vms"
    if policy.exclude_tag in (vm.get("tags") or ()):
        return "VM excluded by tag {}".format(policy.exclude_tag)
    if _truthy(vm.get("other_config", {}).get(policy.exclude_tag, "")):
        return "VM excluded by other-config:{}".format(policy.exclude_tag)
    return ""


def _check_vm(sr, vdi, vm, facts, policy):
    if vm is None:
        if vdi.vm_uuid and not _is_snapshot(vdi, facts):
            return "VM {} unknown to xapi".format(vdi.vm_uuid)
        return ""
    if vm.get("is_control_domain"):
        return "VDI is attached to the control domain"
    if vm.get("ha_restart_priority") and not policy.allow_ha_protected:
        return "VM is HA-protected (ha_restart_priority={}); allow_ha_protected is off".format(
            vm["ha_restart_priority"])
    if vm.get("current_operations"):
        return "VM busy with {}".format(", ".join(sorted(vm["current_operations"].values())))
    if vm.get("power_state") not in (RUNNING, "Halted", "Suspended"):
        return "VM is {}".format(vm.get("power_state"))
    return ""


def _check_host(sr, vdi, vm, facts, policy):
    if policy.max_load_per_cpu and facts.load_per_cpu > policy.max_load_per_cpu:
        return "Dom0 load {:.2f} per CPU above the limit {:g}".format(facts.load_per_cpu, policy.max_load_per_cpu)
    return ""


def _check_space(sr, vdi, vm, facts, policy):
    needed = vdi.merge_free_bytes or 0
    if needed > (sr.free_bytes or 0):
        return "not enough free space for the merge: needs {} bytes, the SR has {}".format(needed, sr.free_bytes)
    return ""


def _strategies(sr, vdi, vm, candidates, reasons, facts, policy):
    """([(strategy, predicted freeze)], [why a strategy cannot be used]) in the policy's order."""
    running = vm is not None and vm.get("power_state") == RUNNING
    merge = vdi.merge_bytes or 0
    options = []
    refusals = []
    for name in policy.strategies:
        speed = facts.speed(sr.uuid, name)
        if name == GC:
            freeze = gc_freeze(merge, (facts.speeds.get(sr.uuid) or {}).get("sm"), speed,
                               _forced(vdi, facts)) if running else 0.0
            if freeze is None:
                refusals.append("forced (leaf-coalesce=force) with no measured merge speed for the SR yet")
                continue
        elif name == LIVE:
            if running and not speed:
                refusals.append("no measured merge speed for the SR yet")
                continue
            freeze = merge / speed if running else 0.0
        else:
            refusal = _plugin_refusal(sr, vdi, vm, candidates, reasons, facts)
            if not refusal and running and not speed:
                refusal = "no measured merge speed for the SR yet"
            if refusal:
                refusals.append(refusal)
                continue
            freeze = 0.0
            if running:
                freeze = _vm_merge_bytes(vdi.vm_uuid, candidates, facts) / speed
                if not facts.speeds.get(sr.uuid, {}).get(PLUGIN):
                    freeze += SUSPEND_RESUME_SECONDS
        options.append((name, freeze))
    return options, refusals


def gc_freeze(merge_bytes, sm_speed, speed, forced=False):
    """The freeze the SR's GC causes a running VM when it leaf-coalesces its leaf on its own, or None
    when it cannot be bounded (a forced merge with no speed known).

    SM merging live at once: the merge at `speed` (5 s, SM's limit, with no speed known). Otherwise
    the pauses of its snapshot-coalesce rounds, then the live merge of what is left, which SM starts
    only once it judges it within its 0.5 x 10 s limit.
    """
    if sm_merges_live(merge_bytes, sm_speed, forced):
        if speed:
            return merge_bytes / speed
        return None if forced and merge_bytes >= SM_UNMEASURED_LEAF_BYTES else SM_LIVE_FREEZE_SECONDS
    return SNAPSHOT_COALESCE_ROUNDS * SNAPSHOT_ROUND_PAUSE_SECONDS + SM_LIVE_FREEZE_SECONDS


def _forced(vdi, facts):
    return (facts.vdis.get(vdi.uuid) or {}).get("other_config", {}).get(LEAF_COALESCE_KEY) == "force"


def _plugin_refusal(sr, vdi, vm, candidates, reasons, facts):
    if not is_lvm(sr.type):
        return "the coalesce-leaf plugin only works on LVM SRs"
    if _is_snapshot(vdi, facts):
        return "a snapshot VDI: the coalesce-leaf plugin merges only the disks its VM uses"
    if vm is None:
        return "the coalesce-leaf plugin needs a VM"
    if "suspend" in (vm.get("blocked_operations") or {}):
        return "suspend is blocked on the VM"
    others = sorted(other.uuid for other in _plugin_vdis(vdi.vm_uuid, candidates, facts)
                    if other.uuid != vdi.uuid and reasons[other.uuid])
    if others:
        return "the coalesce-leaf plugin would also merge VDI {}, which must be left alone".format(
            ", ".join(others))
    return ""


def _plugin_vdis(vm_uuid, candidates, facts):
    """The VDIs the plugin merges while the VM is suspended: all the leaf-coalesceable disks it uses on
    LVM SRs (its snapshots are not among them)."""
    return [vdi for sr, vdi in candidates
            if vdi.vm_uuid == vm_uuid and is_lvm(sr.type) and not _is_snapshot(vdi, facts)]


def _vm_merge_bytes(vm_uuid, candidates, facts):
    return sum(vdi.merge_bytes or 0 for vdi in _plugin_vdis(vm_uuid, candidates, facts))


def apply_caps(entries, vms_left, bytes_left):
    """Skip planned entries beyond the VMs / bytes still allowed (None: unlimited). Returns entries."""
    chosen_vms = set()
    for entry in entries:
        if entry.result != PLANNED:
            continue
        vm_key = entry.vm_uuid or entry.vdi_uuid
        if vms_left is not None and vm_key not in chosen_vms and len(chosen_vms) >= vms_left:
            entry.update(result=SKIPPED, reason="the cap of VMs per window is reached")
            continue
        if bytes_left is not None and entry.estimated_bytes > bytes_left:
            entry.update(result=SKIPPED, reason="the cap of bytes per window is reached")
            continue
        chosen_vms.add(vm_key)
        if bytes_left is not None:
            bytes_left -= entry.estimated_bytes
    return entries
