"""The GC's own account joined to an inspection: SMlog outcomes (smlog.py) and xapi's signals beside
them, per VDI (`VdiReport.gc`) and per SR (`SrReport.gc`). Pure.

SM names VHDs by the first 8 hex digits of their UUID: a prefix is resolved through the SR's VHDs of
this inspection, and a prefix that several of them share is reported as such, never guessed.
Where xapi's signals and the log disagree, both are kept: `gc["signals"]` lists xapi's.
"""
import collections

from .. import model
from . import smlogrules

NO_SPACE_MESSAGE = "SM_GC_NO_SPACE"
UNPAUSE_MESSAGE = "failed to unpause tapdisk"
COALESCE_ERROR_SUFFIX = "while coalescing."
GC_NO_SPACE_KEY = "gc_no_space"
# VDIs the GC should have merged: an outcome other than `merged` blocks them.
MERGEABLE_STATES = (model.LEAF_COALESCEABLE, model.COALESCEABLE)

# What xapi says, gathered by inspection.py: messages of the SRs and VDIs, per SR its gc_no_space
# message ref (sm_config) and GC task progress, per VDI its gc_no_space ref and leaf-coalesce flag.
Signals = collections.namedtuple("Signals", "messages sr_no_space task_progress vdi_no_space leaf_coalesce")


def empty_signals():
    return Signals({}, {}, {}, {}, {})


def signal_of(message):
    """The signal a message is ({"name", "body", "time", "priority"}), or None for other messages."""
    name, body = message.get("name", ""), message.get("body", "")
    if name in (NO_SPACE_MESSAGE, UNPAUSE_MESSAGE) or body.endswith(COALESCE_ERROR_SUFFIX):
        return {"name": name, "body": body, "time": message.get("time"), "priority": message.get("priority")}
    return None


def apply(inspection, log_state, signals):
    """Give each SR report its `gc` and each VDI report its `gc` (or None)."""
    srs = (log_state or {}).get("srs", {})
    for sr in inspection.srs or ():
        _apply_sr(sr, srs.get(sr.uuid) or {}, signals)


def _apply_sr(sr, state, signals):
    outcomes = resolve(sr, state.get("vdis") or {})
    messages = [signal for signal in (signal_of(m) for m in signals.messages.get(sr.uuid, ())) if signal]
    alive_no_space = signals.sr_no_space.get(sr.uuid)
    # Most VDIs have nothing said of them: only these, or every VDI when a message may name it, are looked at.
    named = set(outcomes).union(signals.vdi_no_space, signals.leaf_coalesce)
    unpause = any(message["name"] == UNPAUSE_MESSAGE for message in messages)
    for vdi in sr.vdis or ():
        vdi.gc = _vdi_gc(vdi, outcomes.get(vdi.uuid), signals, alive_no_space, messages) \
            if unpause or vdi.uuid in named else None
    sr.gc = {
        "last_run": state.get("last_run"),
        "last_success": state.get("last_success"),
        "runs_total": state.get("runs_total", 0),
        "results": dict(state.get("results") or {}),
        "failures": dict(state.get("failures") or {}),
        "disabled": state.get("disabled"),
        "no_space": alive_no_space is not None,
        "task_progress": signals.task_progress.get(sr.uuid),
        "signals": messages,
    }


def resolve(sr, outcomes):
    """{VHD uuid: latest outcome} of the log's outcomes (as its state keeps them), keys resolved through
    the SR's VHDs; ambiguous or unknown prefixes go into the SR's errors (unknown ones are VHDs gone since)."""
    if not outcomes:
        return {}
    uuids = {vdi.uuid for vdi in sr.vdis or ()}
    by_prefix = collections.defaultdict(list)
    for uuid in uuids:
        by_prefix[uuid[:8]].append(uuid)
    resolved = {}
    for key, value in outcomes.items():
        outcome = smlogrules.outcome(value)
        if key in uuids:
            target = key
        elif len(key) == 8 and len(by_prefix.get(key, ())) == 1:
            target = by_prefix[key][0]
        else:
            if len(by_prefix.get(key, ())) > 1:
                sr.errors.append("SMlog names VHD {}, which {} VHDs of the SR begin with: not attributed".format(
                    key, len(by_prefix[key])))
            continue
        if target not in resolved or resolved[target]["time"] <= outcome["time"]:
            resolved[target] = outcome
    return resolved


def _vdi_gc(vdi, outcome, signals, alive_no_space, sr_messages):
    own = []
    ref = signals.vdi_no_space.get(vdi.uuid)
    if ref is not None and alive_no_space is not None and ref == alive_no_space["ref"]:
        own.append({"name": NO_SPACE_MESSAGE, "body": alive_no_space["body"], "time": alive_no_space["time"],
                    "priority": 3})
    if signals.leaf_coalesce.get(vdi.uuid) == "offline":
        own.append({"name": "leaf-coalesce=offline", "body": "SM set other-config:leaf-coalesce=offline: the "
                    "merge fits only without snapshot-coalesce", "time": None, "priority": None})
    own.extend(m for m in sr_messages if m["name"] == UNPAUSE_MESSAGE and vdi.uuid in m["body"])
    if outcome is None and not own:
        return None
    if outcome is None:
        first = own[0]
        kind = smlogrules.UNPAUSE_FAILED if first["name"] == UNPAUSE_MESSAGE else smlogrules.NO_SPACE
        gc = {"kind": kind, "message": first["body"], "time": first["time"], "figures": {}, "source": "xapi"}
    else:
        gc = {"kind": outcome["kind"], "message": outcome["message"], "time": outcome["time"],
              "figures": dict(outcome.get("figures") or {}), "source": "smlog"}
    if gc["kind"] == smlogrules.NO_SPACE and vdi.state in MERGEABLE_STATES:
        gc["figures"]["needed_bytes"] = vdi.merge_free_bytes
    gc["signals"] = own
    return gc


def blocked(vdi):
    """The kind of GC outcome that keeps a chain SM should have merged unmerged, or None."""
    gc = vdi.gc
    if gc is None or vdi.state not in MERGEABLE_STATES or gc["kind"] == smlogrules.MERGED:
        return None
    return gc["kind"]
