"""The storage manager's garbage collector of one SR: is it running, wait for it, kick a pass.

Every merge a run asks for is done by this GC (or by SM's plugin): the agent only starts and waits.
"""
import logging
import time

from . import inspection, stopping

LOG = logging.getLogger(__name__)

GC_TASK_LABEL = "Garbage Collection"
POLL_SECONDS = 0.1
# After SR.scan, how long the GC may take to show up before it is taken as already done.
GC_START_SECONDS = 1.0


class GcBusy(Exception):
    """The SR's GC outlasted the configured wait; the message is the reason of the run it stops."""


def gc_running(session, sr_uuid):
    """True while SM's GC works on the SR: a `cleanup ... -u <sr>` process or its xapi task."""
    if sr_uuid in inspection.running_gcs():
        return True
    sr_ref = session.xenapi.SR.get_by_uuid(sr_uuid)
    for task in session.xenapi.task.get_all_records().values():
        if (task.get("name_label") == GC_TASK_LABEL and task.get("status") == "pending"
                and task.get("other_config", {}).get("applies_to") == sr_ref):
            return True
    return False


def wait_gc_idle(session, sr_uuid, timeout):
    """Wait (bounded, and no longer once the agent is stopping) until the SR's GC is not running;
    True if it is idle."""
    deadline = time.monotonic() + timeout
    if gc_running(session, sr_uuid):
        LOG.info("SR %s: waiting up to %g s for the storage manager's GC to finish", sr_uuid, timeout)
        while gc_running(session, sr_uuid):
            if time.monotonic() >= deadline or stopping.requested():
                return False
            stopping.sleep(POLL_SECONDS)
    return True


def gc_pass(config, session, sr_uuid):
    """Kick the SR's GC with SR.scan and wait for it to finish; `GcBusy` when it outlasts gc_wait_seconds."""
    timeout = config.coalesce.gc_wait_seconds
    if stopping.requested() or not wait_gc_idle(session, sr_uuid, timeout):
        raise GcBusy(stopping.REASON if stopping.requested() else
                     "the SR's garbage collector is still busy after {:g} s".format(timeout))
    session.xenapi.SR.scan(session.xenapi.SR.get_by_uuid(sr_uuid))
    appear_by = time.monotonic() + GC_START_SECONDS
    while not gc_running(session, sr_uuid) and time.monotonic() < appear_by:
        time.sleep(POLL_SECONDS)
    if not wait_gc_idle(session, sr_uuid, timeout):
        raise GcBusy(stopping.REASON if stopping.requested() else
                     "the SR's garbage collector did not finish within {:g} s".format(timeout))
