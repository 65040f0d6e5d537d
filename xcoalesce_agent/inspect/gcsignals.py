"""xapi's word on the GC beside SMlog's: the SRs' messages of the last days, each SR's live
`SM_GC_NO_SPACE`, the progress of its GC task. Two calls per inspection; the VDIs' flags come with
their records."""
import calendar
import time
import xmlrpc.client

import XenAPI

from . import gcaccount, smgc, xapi

# How far back xapi's messages about the GC are read (the SM_GC_NO_SPACE of an SR is read whatever its age).
GC_MESSAGE_WINDOW_SECONDS = 7 * 86400


def read(session, ours, signals):
    """Fill `signals` (gcaccount.empty_signals()) for the SRs `ours` [(ref, record)]. Returns the
    error message when xapi would not answer, else ""."""
    uuids = {sr["uuid"]: ref for ref, sr in ours}
    since = xmlrpc.client.DateTime(time.strftime("%Y%m%dT%H:%M:%SZ",
                                                 time.gmtime(time.time() - GC_MESSAGE_WINDOW_SECONDS)))
    api = session.xenapi
    try:
        messages = api.message.get_since(since)
        gc_tasks = api.task.get_all_records_where('field "name__label" = "{}"'.format(smgc.GC_TASK_LABEL))
    except (XenAPI.Failure,) + xapi.TRANSPORT_ERRORS as error:
        return "xapi's GC messages and tasks: {}".format(xapi.describe(error))
    for ref, message in messages.items():
        if message.get("cls") == "SR" and message.get("obj_uuid") in uuids:
            signals.messages.setdefault(message["obj_uuid"], []).append(
                dict(message, ref=ref, time=unix_time(message.get("timestamp"))))
    for _, sr in ours:
        message_ref = (sr.get("sm_config") or {}).get(gcaccount.GC_NO_SPACE_KEY)
        if message_ref:
            message = _live_message(session, message_ref, messages)
            if message is not None and message.get("name") == gcaccount.NO_SPACE_MESSAGE:
                signals.sr_no_space[sr["uuid"]] = {"ref": message_ref, "body": message.get("body", ""),
                                                   "time": unix_time(message.get("timestamp"))}
    by_ref = {ref: uuid for uuid, ref in uuids.items()}
    for task in gc_tasks.values():
        sr_uuid = by_ref.get((task.get("other_config") or {}).get("applies_to"))
        if sr_uuid is not None and task.get("status") == "pending":
            signals.task_progress[sr_uuid] = float(task.get("progress") or 0.0)
    return ""


def _live_message(session, ref, messages):
    """The message `ref` if xapi still has it (SM destroys SM_GC_NO_SPACE once space is back)."""
    if ref in messages:
        return messages[ref]
    try:
        return session.xenapi.message.get_record(ref)
    except (XenAPI.Failure,) + xapi.TRANSPORT_ERRORS:
        return None


def unix_time(value):
    """Unix time of an xapi date (`20240102T16:01:16Z`), None when it is not one."""
    text = getattr(value, "value", value)
    try:
        return float(calendar.timegm(time.strptime(str(text).replace("-", ""), "%Y%m%dT%H:%M:%SZ")))
    except ValueError:
        return None
