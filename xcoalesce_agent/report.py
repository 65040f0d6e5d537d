"""`--report`: a table per SR with totals, or the inspection as JSON with stable keys. Pure."""
import json
import time

from . import gcaccount, model, smlogrules
from .printable import MESSAGE_WIDTH, cell, one_line, table

COLUMNS = ("VM", "VDI", "CHAIN", "STATE", "RECLAIMABLE", "REASON")
UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(value):
    """IEC units: `0 B`, `1023 B`, `1.5 KiB`, `20.0 GiB`."""
    amount = float(value)
    for unit in UNITS:
        if abs(amount) < 1024 or unit == UNITS[-1]:
            return "{} {}".format(int(amount), unit) if unit == "B" else "{:.1f} {}".format(amount, unit)
        amount /= 1024
    return ""


def _vdi_label(vdi):
    """Name and short UUID (the UUID alone when nameless), marked `[qcow2]` for a QCOW2 image."""
    label = "{} ({})".format(cell(vdi.name), one_line(vdi.uuid[:8])) if vdi.name else one_line(vdi.uuid)
    return label + " [qcow2]" if vdi.format == model.QCOW2 else label


def _sr_heading(sr):
    gc = "running for {:.0f} s".format(sr.gc_running_seconds) if sr.gc_running else "not running"
    return ("SR {} ({}, {})\n  size {}, free {}, reclaimable by leaf coalesce {}, GC pending {}, "
            "free space the largest merge needs {}, longest chain {}, GC {}").format(
        cell(sr.name), cell(sr.type), one_line(sr.uuid), human_bytes(sr.size_bytes), human_bytes(sr.free_bytes),
        human_bytes(sr.reclaimable_bytes), human_bytes(sr.gc_pending_bytes), human_bytes(sr.merge_free_bytes),
        sr.longest_chain, gc)


def _mark_line(mark):
    """One line of a leftover mark (model.SrReport.leftover_marks)."""
    current = mark["leaf_coalesce"] if mark["leaf_coalesce"] is not None else "(unset)"
    if "unreadable" in mark:
        return "  left behind: VDI {}: leaf-coalesce={}, with a mark this agent did not write: {!r}".format(
            mark["vdi_uuid"], current, mark["unreadable"])
    return ("  left behind: VDI {}: leaf-coalesce={}; the agent of host {} set {} over {} at {} "
            "(xcoalesce-agent --repair undoes it)").format(
        mark["vdi_uuid"], current, mark["host"], mark["set"],
        mark["replaced"] if mark["replaced"] is not None else "(unset)", mark.get("at", "?"))


def _when(stamp, now):
    """`14:02` today, `Jan 02 14:02` before, in local time."""
    if stamp is None:
        return "?"
    shown = time.localtime(stamp)
    return time.strftime("%H:%M" if time.localtime(now)[:3] == shown[:3] else "%b %d %H:%M", shown)


def gc_reason(vdi, now=None):
    """For a chain SM should have merged and did not, the GC's latest outcome in a sentence, else ""."""
    kind = gcaccount.blocked(vdi)
    if kind is None:
        return ""
    now = time.time() if now is None else now
    gc = vdi.gc
    figures, when = gc["figures"], _when(gc["time"], now)
    if kind == smlogrules.GAVE_UP and "start_bytes" in figures and "final_bytes" in figures:
        text = "GC gave up at {}: leaf grew {} -> {}{}".format(
            when, human_bytes(figures["start_bytes"]), human_bytes(figures["final_bytes"]),
            " over {} rounds".format(figures["rounds"]) if "rounds" in figures else "")
    elif kind == smlogrules.NO_SPACE and "free_bytes" in figures:
        text = "GC had no space at {}: SR free {}, the merge needs {}".format(
            when, human_bytes(figures["free_bytes"]), human_bytes(figures.get("needed_bytes") or 0))
    else:
        words = {smlogrules.GAVE_UP: "GC gave up", smlogrules.NO_SPACE: "GC had no space",
                 smlogrules.TIMED_OUT: "GC's merge timed out",
                 smlogrules.FAILED: "GC's merge failed", smlogrules.PAUSE_FAILED: "GC could not pause the VDI",
                 smlogrules.UNPAUSE_FAILED: "GC could not unpause the VDI (its VM lost the disk)",
                 smlogrules.DISABLED: "GC skips it", smlogrules.CONCURRENT_CHANGE: "GC stopped as the chain changed"}
        text = "{} at {}: {}".format(words[kind], when, gc["message"])
    if any(signal["name"] == gcaccount.NO_SPACE_MESSAGE for signal in gc["signals"]) and kind != smlogrules.NO_SPACE:
        text += "; xapi: SM_GC_NO_SPACE"
    return text


def _gc_heading(sr, now):
    gc = sr.gc or {}
    run = gc.get("last_run")
    if not run:
        return []
    line = "  last GC run {} at {}: {}, {} merged".format(
        "started" if run["result"] == smlogrules.RUNNING else "ended", _when(run["finished"] or run["started"], now),
        run["result"], run["merged"])
    if gc.get("last_success") is not None:
        line += "; last success {}".format(_when(gc["last_success"], now))
    lines = [line] + ["  GC error: {}".format(cell(error, MESSAGE_WIDTH)) for error in run["errors"]]
    lines.extend("  xapi: {}: {}".format(cell(signal["name"]), cell(signal["body"], MESSAGE_WIDTH))
                 for signal in gc.get("signals") or ())
    return lines


def render_text(inspection):
    host = inspection.host or {}
    lines = ["Host {} ({})".format(cell(host.get("name", "")), one_line(host.get("uuid", ""))), ""]
    now = time.time()
    for sr in inspection.srs or ():
        lines.append(_sr_heading(sr))
        lines.extend(_gc_heading(sr, now))
        rows = [COLUMNS] + [(cell(vdi.vm_name) or "-", _vdi_label(vdi), str(vdi.chain_length), vdi.state,
                             human_bytes(vdi.reclaimable_bytes) if vdi.state == model.LEAF_COALESCEABLE else "-",
                             cell(gc_reason(vdi, now) or vdi.reason, MESSAGE_WIDTH)) for vdi in sr.vdis or ()]
        lines.extend(table(rows, "  ") if len(rows) > 1 else ["  no VHD or QCOW2 images"])
        if sr.skipped_vdis:
            lines.append("  {} raw {} skipped".format(sr.skipped_vdis, "VDI" if sr.skipped_vdis == 1 else "VDIs"))
        lines.extend("  error: {}".format(cell(error, MESSAGE_WIDTH)) for error in sr.errors or ())
        lines.extend(one_line(_mark_line(mark)) for mark in sr.leftover_marks or ())
        lines.append("")
    for skipped in inspection.skipped_srs or ():
        lines.append("Skipped SR {} ({}, {}): {}".format(
            cell(skipped["name"]), cell(skipped["type"]), one_line(skipped["uuid"]),
            cell(skipped["reason"], MESSAGE_WIDTH)))
    if inspection.skipped_srs:
        lines.append("")
    srs = inspection.srs or ()
    lines.append("Total: {} reclaimable by leaf coalesce on {} {}; the GC's own pending work frees {}".format(
        human_bytes(inspection.reclaimable_bytes), len(srs), "SR" if len(srs) == 1 else "SRs",
        human_bytes(sum(sr.gc_pending_bytes for sr in srs))))
    return "\n".join(lines) + "\n"


def to_json_dict(inspection):
    """The JSON document: the model's fields plus totals and state counts per SR."""
    document = inspection.to_dict()
    srs = inspection.srs or ()
    for index, sr in enumerate(srs):
        document["srs"][index]["state_counts"] = sr.state_counts()
    document["reclaimable_bytes"] = inspection.reclaimable_bytes
    document["gc_pending_bytes"] = sum(sr.gc_pending_bytes for sr in srs)
    return document


def render_json(inspection):
    return json.dumps(to_json_dict(inspection), indent=2, sort_keys=True) + "\n"
