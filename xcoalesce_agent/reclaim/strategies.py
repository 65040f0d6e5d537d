"""The host changes of a run, each journalled before it is made and undone in a `finally`: the
VDI's `leaf-coalesce` flag (to force a leaf, or hold one back), the forced live path and the
`coalesce-leaf` plugin path. Each change is also marked on the host before it is made (marks.py).
What a crash leaves open, `journal.repair` undoes, or from the marks alone `leftovers.repair`."""
import logging
import time
import xmlrpc.client
from xml.parsers.expat import ExpatError

import XenAPI

from .. import progress, stopping
from ..inspect import inventory, marks
from . import journal as journal_module, planner
from ..inspect.smgc import POLL_SECONDS, GcBusy, foreign_gc, gc_activity, gc_pass, require_gc_idle, wait_gc_idle
from ..inspect.xapi import NULL_REF, describe

LOG = logging.getLogger(__name__)

PLUGIN = "coalesce-leaf"
PLUGIN_FUNCTION = "leaf-coalesce"


def set_leaf_coalesce(session, journal, step, host_uuid):
    """Journal `step`, mark the VDI as changed by this host, then set its `other-config:leaf-coalesce`
    to the step's value. Returns the step id."""
    ref = session.xenapi.VDI.get_by_uuid(step["vdi_uuid"])
    step_id = journal.begin(step)
    try:
        marks.mark_vdi(session, ref, step["value"], step["previous"], host_uuid)
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
    """`leaf-coalesce=force` on the VDI, then a GC pass; the flag goes in every case.

    The flag is set only while the SR's GC is idle, and the GC is looked at again just after: a GC
    already running would take the forced leaf and merge it with no time limit."""
    sr_uuid = entry.sr_uuid
    require_gc_idle(config, session, sr_uuid)
    previous = _leaf_coalesce_value(session, entry.vdi_uuid)
    step = set_leaf_coalesce(session, journal, journal_module.force_step(sr_uuid, entry.vdi_uuid, previous),
                             inventory.host_uuid(config.xapi.inventory))
    try:
        started = gc_activity(config, session, sr_uuid)
        if started:
            raise GcBusy("a garbage collector started on the SR as the force flag was set ({}); the flag was "
                         "taken back".format(started))
        gc_pass(config, session, sr_uuid)
    finally:
        close_step(session, journal, step)


# ---- the coalesce-leaf plugin --------------------------------------------------------------

# How often the plugin's task is looked at, and how long it is looked at once cancelled: xapi
# cannot stop a plugin (task.cancel only marks its task), so a plugin past its limit rarely ends then.
TASK_POLL_SECONDS = 0.25
CANCEL_GRACE_SECONDS = 1.0
UNFINISHED = journal_module.UNFINISHED_TASK


class PluginUnfinished(Exception):
    """The plugin's call did not finish: past plugin_timeout_seconds (`task`: its task, still
    running), or its task was cancelled by someone else (`task` empty)."""

    def __init__(self, message, task=""):
        Exception.__init__(self, message)
        self.task = task


class PluginRun(object):
    """What one call of the plugin came to: its answer or why it failed, a GC other than the
    plugin's own seen on the VM's SRs meanwhile, the plugin's task if it still runs after the
    agent gave up on it, and what it took to bring the VM back."""

    def __init__(self):
        self.answer = ""
        self.error = ""
        self.gc_seen = ""
        self.task = ""
        self.notes = []

    def failure(self):
        """The reason of a run whose plugin call failed."""
        return "; ".join([self.error] + self.notes)

    def not_merged(self, chain):
        """The reason of a run whose plugin returned but whose chain (`chain`: "N links") is as long."""
        if self.gc_seen:
            reason = "the plugin merged nothing: the SR's garbage collector was running ({})".format(self.gc_seen)
        else:
            reason = "the plugin merged nothing ({}; it answered {!r})".format(chain, self.answer)
        return "; ".join([reason] + self.notes)

    def merged(self):
        """The reason of a run whose plugin merged: only what it took to bring the VM back."""
        return "; ".join(self.notes)


def run_plugin(config, session, journal, entry, facts):
    """The `coalesce-leaf` plugin for the entry's VM (it suspends the VM); returns a `PluginRun`.

    Safe on both SM generations. Before SM 4.1.10 the plugin does not wait for a GC already
    running: its passes exit at once, it resumes the VM having merged nothing and leaves `force`
    on the leaves for that GC. So the SRs' GCs must be idle just before the call (`GcBusy` after
    gc_wait_seconds). SM 4.1 sets `force` even on a leaf the GC it waited for merged, and leaves
    it. The call is bounded (`call_plugin_bounded`). Whatever happens, the `force` flags the
    plugin set go back at once, and a VM it left suspended is resumed once the SRs' GCs are idle
    (`_end_plugin_step`). A plugin still running past its limit keeps its journal step open.
    A plugin that merged nothing is not called again in the same run, as that would suspend the
    VM a second time: the run fails with the reason and a later run tries again.
    """
    vm_uuid = entry.vm_uuid
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
    for sr_uuid in sorted(sr_uuids):
        require_gc_idle(config, session, sr_uuid)
    host_uuid = inventory.host_uuid(config.xapi.inventory)
    host_ref = session.xenapi.host.get_by_uuid(host_uuid)
    run = PluginRun()

    def watch():
        for sr_uuid in sorted(sr_uuids):
            run.gc_seen = run.gc_seen or foreign_gc(config, sr_uuid)

    step = journal.begin(journal_module.suspend_step(sr_uuids, vm_uuid, power_state, forced))
    try:
        _mark_plugin_changes(session, vm_ref, vm_uuid, power_state, forced, sr_uuids, host_uuid)
        run.answer = call_plugin_bounded(config, session, host_ref, vm_uuid, watch,
                                         started=lambda task: journal.amend(step, task=task))
        LOG.info("coalesce-leaf on VM %s: %s", vm_uuid, " ".join(run.answer.split()))
    except XenAPI.Failure as error:
        run.error = describe(error)
    except PluginUnfinished as error:
        run.error, run.task = str(error), error.task
    finally:
        _end_plugin_step(config, session, journal, step, sorted(sr_uuids), run)
    return run


def _mark_plugin_changes(session, vm_ref, vm_uuid, power_state, forced, sr_uuids, host_uuid):
    """The plugin sets `force` on these VDIs and suspends the VM: marked before the call, VDIs first."""
    for vdi_uuid, previous in forced:
        marks.mark_vdi(session, session.xenapi.VDI.get_by_uuid(vdi_uuid), journal_module.FORCE, previous,
                       host_uuid, vm_uuid)
    marks.mark_vm(session, vm_ref, power_state, sr_uuids, host_uuid)


def call_plugin_bounded(config, session, host_ref, vm_uuid, watch=None, started=None):
    """The plugin through `Async.host.call_plugin`: its answer, `XenAPI.Failure` when it failed,
    `PluginUnfinished` past plugin_timeout_seconds (its task is cancelled, which xapi records but
    which does not stop the plugin, and looked at for CANCEL_GRACE_SECONDS more). `started(task)`
    is called as soon as the task exists; the task is polled (`watch()` is called at each look,
    the last one after it ended) and destroyed at the end (xapi drops a running task when it ends)."""
    limit = config.coalesce.plugin_timeout_seconds
    vm_name = session.xenapi.VM.get_name_label(session.xenapi.VM.get_by_uuid(vm_uuid))
    progress.step("plugin for VM {}".format(vm_name))
    task = session.xenapi.Async.host.call_plugin(host_ref, PLUGIN, PLUGIN_FUNCTION, {"vm_uuid": vm_uuid})
    try:
        if started is not None:
            started(task)
        begun = time.monotonic()

        def look():
            progress.update(None, progress.waited(time.monotonic() - begun, limit))
            if watch is not None:
                watch()

        status = _task_status(session, task, begun + limit, look)
        if status in UNFINISHED:
            status, unfinished = _cancel(session, task, limit)
            if status in UNFINISHED:
                raise PluginUnfinished(unfinished, task)
        if status == "success":
            return _task_result(session.xenapi.task.get_result(task))
        if status == "failure":
            raise XenAPI.Failure(session.xenapi.task.get_error_info(task))
        raise PluginUnfinished("the plugin's task was {} by someone else".format(status))
    finally:
        progress.done()
        try:
            session.xenapi.task.destroy(task)
        except XenAPI.Failure as error:
            LOG.debug("task.destroy of the plugin's task: %s", describe(error))


def _task_status(session, task, deadline, watch=None):
    """The task's status once it left pending (or cancelling), or as it is at `deadline`."""
    while True:
        if watch is not None:
            watch()
        status = session.xenapi.task.get_status(task)
        if status not in UNFINISHED or time.monotonic() >= deadline:
            return status
        time.sleep(TASK_POLL_SECONDS)


def _cancel(session, task, limit):
    """task.cancel past the limit, then up to CANCEL_GRACE_SECONDS for the task to end: (the
    task's status then, what happened in words)."""
    what = "the plugin did not finish within {:g} s".format(limit)
    LOG.warning("%s: cancelling its task", what)
    try:
        session.xenapi.task.cancel(task)
        cancel = "its task was cancelled"
    except XenAPI.Failure as error:
        cancel = "its task could not be cancelled ({})".format(describe(error))
    status = _task_status(session, task, time.monotonic() + CANCEL_GRACE_SECONDS)
    if status in UNFINISHED:
        return status, "{}; {} but xapi cannot stop a plugin: it still runs".format(what, cancel)
    return status, "{}; {}".format(what, cancel)


def _task_result(text):
    """A task's result is the XML-RPC value of the call's answer (`<value>Success</value>`)."""
    if not text:
        return ""
    try:
        (value,), _ = xmlrpc.client.loads(
            "<methodResponse><params><param>{}</param></params></methodResponse>".format(text))
    except (ValueError, ExpatError, xmlrpc.client.ResponseError):
        return text
    return str(value)


def _end_plugin_step(config, session, journal, step_id, sr_uuids, run):
    """After the call, whatever its outcome: the `force` flags back, then the VM back once the SRs'
    GCs let go of its chain (bounded), then the journal step closed. A plugin still running past
    its limit resumes the VM itself once its forced pass ends: the agent resumes it only if the
    SRs' GCs are idle, and keeps the step open (the next run puts back what the plugin leaves)."""
    step = next(item for item in journal.steps() if item["id"] == step_id)
    for line in journal_module.restore_forced(session, step):
        LOG.info("%s", line)
    vm_ref = session.xenapi.VM.get_by_uuid(step["vm_uuid"])
    if run.task and journal_module.task_running(session, run.task):
        if _left_suspended(session, step, vm_ref):
            _resume_after_plugin_pass(config, session, vm_ref, sr_uuids, run)
        if journal_module.task_running(session, run.task):
            for line in journal_module.restore_forced(session, step):
                LOG.info("%s", line)
            run.notes.append("the plugin still runs (task {}): its journal step stays open until it ends, and "
                             "the next run puts back what it leaves".format(run.task))
            return
    if _left_suspended(session, step, vm_ref):
        waited = []
        for sr_uuid in sr_uuids:
            busy = gc_activity(config, session, sr_uuid)
            if not busy:
                continue
            started = time.monotonic()
            if wait_gc_idle(config, session, sr_uuid, config.coalesce.gc_wait_seconds):
                waited.append("resumed once the SR's garbage collector ({}) had finished, {:.0f} s later".format(
                    busy, time.monotonic() - started))
            else:
                waited.append("resumed although the SR's garbage collector ({}) still ran after {:g} s".format(
                    busy, config.coalesce.gc_wait_seconds))
        run.notes.append("the plugin left the VM suspended; the agent {}".format(
            "; ".join(waited) if waited else "resumed it"))
    close_step(session, journal, step_id)


def _left_suspended(session, step, vm_ref):
    return step["power_state"] == "Running" and session.xenapi.VM.get_power_state(vm_ref) == "Suspended"


def _resume_after_plugin_pass(config, session, vm_ref, sr_uuids, run):
    """The plugin, past its limit, has the VM suspended: its forced GC pass may hold the SRs' locks
    on the VM's chain, and the VM must not run while it merges. Wait (up to gc_wait_seconds) for the
    plugin to resume it, or for the SRs' GCs to be idle and then resume it; else leave it to the
    plugin and say so."""
    deadline = time.monotonic() + config.coalesce.gc_wait_seconds
    while True:
        if session.xenapi.VM.get_power_state(vm_ref) != "Suspended":
            run.notes.append("the plugin resumed the VM itself")
            return
        busy = [seen for seen in (gc_activity(config, session, sr_uuid) for sr_uuid in sr_uuids) if seen]
        if not busy:
            try:
                session.xenapi.VM.resume(vm_ref, False, False)
                run.notes.append("the agent resumed the VM once the SRs' garbage collectors were idle")
            except XenAPI.Failure as error:
                if session.xenapi.VM.get_power_state(vm_ref) == "Suspended":
                    raise
                LOG.debug("VM.resume: %s (the plugin resumed it meanwhile)", describe(error))
                run.notes.append("the plugin resumed the VM itself")
            return
        if time.monotonic() >= deadline or stopping.requested():
            run.notes.append("the VM stays suspended: the plugin's garbage collector pass still works on its SRs "
                             "({}) after {:g} s; the plugin resumes it when the pass ends, or the next run "
                             "does".format("; ".join(busy), config.coalesce.gc_wait_seconds))
            return
        stopping.sleep(POLL_SECONDS)
