"""Leaf-coalesce runs: `--now`, the daemon's scheduled runs and the snapshot-deletion trigger.

Every run: host lock -> repair what an interrupted run left (journal) -> inspect -> plan -> hold
back the leaves the plan leaves alone -> the SRs' normal GC pass -> per VDI still
leaf-coalesceable the forced live path or the plugin -> one inspection to verify each chain is
shorter and measure the bytes freed -> record in the run history. Every host change is journalled
before it is made and undone in a `finally`; the freeze of each run is measured from xapi's events.
"""
import datetime
import json
import logging
import os
import sys
import threading
import time

import XenAPI

from . import history as history_module
from . import inspection as inspection_module
from . import inventory, journal as journal_module, model, planner, schedule
from .errors import EXIT_OK, EXIT_RUNS_FAILED, EXIT_UNREACHABLE, AgentError, HostUnreachable
from .lock import HostLock
from .xapi import TRANSPORT_ERRORS, describe, fetch_all, open_session

LOG = logging.getLogger(__name__)

PLUGIN = "coalesce-leaf"
PLUGIN_FUNCTION = "leaf-coalesce"
GC_TASK_LABEL = "Garbage Collection"
POLL_SECONDS = 0.1
# After SR.scan, how long the GC may take to show up before it is taken as already done.
GC_START_SECONDS = 1.0
SPEEDS_FILE = "merge-speeds.json"
WINDOW_FILE = "window.json"
PENDING_FILE = "pending-srs.json"
SPEEDS_KEPT = 10


# ---- small I/O helpers -------------------------------------------------------------------

def _read_json(path, default):
    try:
        with open(path, encoding="utf-8") as stream:
            return json.load(stream)
    except (OSError, ValueError):
        return default


def _write_json(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as stream:
        json.dump(value, stream, sort_keys=True)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)


def read_speeds(config, sr_uuids):
    """{sr: {"sm": SM's speed log mean, strategy: the agent's own measured mean}} in bytes/s."""
    own = _read_json(os.path.join(config.agent.state_dir, SPEEDS_FILE), {})
    speeds = {}
    for sr_uuid in sr_uuids:
        path = os.path.join(config.storage.speed_log_dir, "{}.speed_log".format(sr_uuid))
        try:
            with open(path, encoding="utf-8") as stream:
                sm_speed = planner.parse_speed_log(stream.read())
        except OSError:
            sm_speed = None
        speeds[sr_uuid] = {"sm": sm_speed}
        for strategy, figures in own.get(sr_uuid, {}).items():
            if figures:
                speeds[sr_uuid][strategy] = sum(figures) / len(figures)
    return speeds


def record_speed(config, sr_uuid, strategy, merge_bytes, frozen_seconds):
    """Keep the speed a run achieved (bytes merged per second frozen) for later predictions."""
    if not merge_bytes or not frozen_seconds or frozen_seconds <= 0:
        return
    path = os.path.join(config.agent.state_dir, SPEEDS_FILE)
    speeds = _read_json(path, {})
    figures = speeds.setdefault(sr_uuid, {}).setdefault(strategy, [])
    figures.append(merge_bytes / frozen_seconds)
    del figures[:-SPEEDS_KEPT]
    _write_json(path, speeds)


def load_per_cpu():
    return os.getloadavg()[0] / (os.cpu_count() or 1)


# ---- xapi: facts, the GC, the two forcing paths ------------------------------------------

def gather_facts(config, session, sr_uuids):
    def by_uuid(class_name):
        return {record["uuid"]: record for record in fetch_all(config, session, class_name).values()}

    return planner.HostFacts(
        vms=by_uuid("VM"),
        vdis=by_uuid("VDI"),
        srs=by_uuid("SR"),
        speeds=read_speeds(config, sr_uuids),
        load_per_cpu=load_per_cpu(),
    )


def gc_running(session, sr_uuid):
    """True while SM's GC works on the SR: a `cleanup ... -u <sr>` process or its xapi task."""
    if sr_uuid in inspection_module.running_gcs():
        return True
    sr_ref = session.xenapi.SR.get_by_uuid(sr_uuid)
    for task in session.xenapi.task.get_all_records().values():
        if (task.get("name_label") == GC_TASK_LABEL and task.get("status") == "pending"
                and task.get("other_config", {}).get("applies_to") == sr_ref):
            return True
    return False


def wait_gc_idle(session, sr_uuid, timeout):
    """Wait (bounded) until the SR's GC is not running; True if it is idle."""
    deadline = time.monotonic() + timeout
    if gc_running(session, sr_uuid):
        LOG.info("SR %s: waiting up to %g s for the storage manager's GC to finish", sr_uuid, timeout)
        while gc_running(session, sr_uuid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_SECONDS)
    return True


def gc_pass(config, session, sr_uuid):
    """Kick the SR's GC with SR.scan and wait for it to finish; raises when it outlasts gc_wait_seconds."""
    timeout = config.coalesce.gc_wait_seconds
    if not wait_gc_idle(session, sr_uuid, timeout):
        raise RunError("the SR's garbage collector is still busy after {:g} s".format(timeout))
    session.xenapi.SR.scan(session.xenapi.SR.get_by_uuid(sr_uuid))
    appear_by = time.monotonic() + GC_START_SECONDS
    while not gc_running(session, sr_uuid) and time.monotonic() < appear_by:
        time.sleep(POLL_SECONDS)
    if not wait_gc_idle(session, sr_uuid, timeout):
        raise RunError("the SR's garbage collector did not finish within {:g} s".format(timeout))


class FreezeMeter(object):
    """How long each watched VDI's running VM is kept from running, measured from xapi's events.

    A VDI counts as frozen while SM has paused its tapdisk (`sm_config:paused=true`) or while its
    VM is suspending, suspended, pausing or paused. Only VMs running when the meter starts count;
    a VM that was not running loses nothing. Falls back to the elapsed time if xapi's events fail.
    """

    EVENT_TIMEOUT = 0.25  # how late the meter notices it is asked to stop

    def __init__(self, config, vdi_vms):
        self.config = config
        self.vdi_vms = dict(vdi_vms)  # vdi_uuid -> vm_uuid ("" when none)
        self._stop = threading.Event()
        self._thread = None
        self._failed = None
        self._started = None
        self._down_since = {}
        self._frozen = dict.fromkeys(self.vdi_vms, 0.0)
        self._vdi_paused = {}
        self._vm_down = {}
        self._refs = {}
        self._running = set()
        self._elapsed = 0.0

    def __enter__(self):
        self._started = time.monotonic()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(ready,), name="freeze-meter", daemon=True)
        self._thread.start()
        ready.wait(self.config.xapi.timeout_seconds)
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join(self.config.xapi.timeout_seconds)
        self._finish(time.monotonic())

    def seconds(self, vdi_uuid):
        if self._failed is not None:
            LOG.warning("freeze not measured from xapi events (%s); counting the elapsed time", self._failed)
            return self._elapsed
        return self._frozen.get(vdi_uuid, 0.0)

    def _watch(self, ready):
        try:
            with open_session(self.config) as session:
                event_from = getattr(session.xenapi.event, "from")
                watched = self._subscriptions(session)
                token = ""
                while True:
                    last = self._stop.is_set()
                    result = event_from(watched, token, 0.0 if last or not token else self.EVENT_TIMEOUT)
                    token = result["token"]
                    for event in result["events"]:
                        self._apply(event)
                    ready.set()
                    if last:
                        return
        except (HostUnreachable, XenAPI.Failure) + TRANSPORT_ERRORS as error:
            self._failed = describe(error)
        finally:
            ready.set()

    def _subscriptions(self, session):
        self._refs = {}
        running = set()
        for vdi_uuid, vm_uuid in self.vdi_vms.items():
            if not vm_uuid:
                continue
            vm_ref = session.xenapi.VM.get_by_uuid(vm_uuid)
            if session.xenapi.VM.get_power_state(vm_ref) != planner.RUNNING:
                continue
            running.add(vm_uuid)
            self._refs[session.xenapi.VDI.get_by_uuid(vdi_uuid)] = ("vdi", vdi_uuid)
            self._refs[vm_ref] = ("vm", vm_uuid)
        self._running = running
        return ["{}/{}".format(kind, ref) for ref, (kind, _) in self._refs.items()]

    def _apply(self, event):
        kind, uuid = self._refs.get(event["ref"], (None, None))
        record = event.get("snapshot")
        if kind is None or record is None:
            return
        if kind == "vdi":
            self._vdi_paused[uuid] = record.get("sm_config", {}).get("paused") == "true"
        else:
            operations = set(record.get("current_operations", {}).values())
            self._vm_down[uuid] = (record.get("power_state") in ("Suspended", "Paused")
                                   or bool(operations & {"suspend", "pause"}))
        self._account(time.monotonic())

    def _account(self, now):
        for vdi_uuid, vm_uuid in self.vdi_vms.items():
            down = vm_uuid in self._running and (self._vdi_paused.get(vdi_uuid) or self._vm_down.get(vm_uuid))
            since = self._down_since.get(vdi_uuid)
            if down and since is None:
                self._down_since[vdi_uuid] = now
            elif not down and since is not None:
                self._frozen[vdi_uuid] += now - since
                del self._down_since[vdi_uuid]

    def _finish(self, now):
        self._elapsed = now - self._started
        for vdi_uuid, since in list(self._down_since.items()):
            self._frozen[vdi_uuid] += now - since
        self._down_since = {}


class RunError(Exception):
    """One run could not be carried out; its message is the run's reason."""


def set_leaf_coalesce(session, journal, step):
    """Journal `step`, then set the VDI's `other-config:leaf-coalesce` to its value. Returns the step id."""
    ref = session.xenapi.VDI.get_by_uuid(step["vdi_uuid"])
    step_id = journal.begin(step)
    try:
        if step["previous"] is not None:
            session.xenapi.VDI.remove_from_other_config(ref, journal_module.LEAF_COALESCE_KEY)
        session.xenapi.VDI.add_to_other_config(ref, journal_module.LEAF_COALESCE_KEY, step["value"])
    except BaseException:
        _close_step(session, journal, step_id)
        raise
    return step_id


def leaf_coalesce_value(session, vdi_uuid):
    ref = session.xenapi.VDI.get_by_uuid(vdi_uuid)
    return session.xenapi.VDI.get_other_config(ref).get(journal_module.LEAF_COALESCE_KEY)


def run_live(config, session, journal, entry):
    """`leaf-coalesce=force` on the VDI, then a GC pass; the flag goes in every case."""
    previous = leaf_coalesce_value(session, entry["vdi_uuid"])
    step = set_leaf_coalesce(session, journal, journal_module.force_step(entry["sr_uuid"], entry["vdi_uuid"],
                                                                         previous))
    try:
        gc_pass(config, session, entry["sr_uuid"])
    finally:
        _close_step(session, journal, step)


def run_plugin(config, session, journal, entry, facts):
    """The `coalesce-leaf` plugin for the entry's VM (suspends it); the VM comes back in every case."""
    vm_uuid = entry["vm_uuid"]
    vm_ref = session.xenapi.VM.get_by_uuid(vm_uuid)
    power_state = session.xenapi.VM.get_power_state(vm_ref)
    forced, sr_uuids = [], set()
    for vbd_ref in session.xenapi.VM.get_VBDs(vm_ref):
        vdi_ref = session.xenapi.VBD.get_VDI(vbd_ref)
        if vdi_ref == "OpaqueRef:NULL":
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
        _close_step(session, journal, step)


def _close_step(session, journal, step_id):
    """Undo one journal step now; if that fails it stays for `repair` and the error propagates."""
    step = next(item for item in journal.steps() if item["id"] == step_id)
    for line in journal_module.undo(session, step):
        LOG.info("%s", line)
    journal.end(step_id)


def repair(config, session, journal):
    """Undo what an earlier run left behind, once the GCs it started have settled."""
    steps = journal.steps()
    if not steps:
        return []
    for sr_uuid in sorted({sr for step in steps for sr in step.get("sr_uuids", ())}):
        if not wait_gc_idle(session, sr_uuid, config.coalesce.gc_wait_seconds):
            LOG.warning("repairing while the GC of SR %s still runs", sr_uuid)
    actions = journal_module.repair(session, journal)
    for line in actions:
        LOG.warning("repaired after an interrupted run: %s", line)
    return actions


# ---- one run over a plan -----------------------------------------------------------------

def _find(inspection, vdi_uuid):
    for sr in inspection.srs or ():
        for vdi in sr.vdis or ():
            if vdi.uuid == vdi_uuid:
                return sr, vdi
    return None, None


def _chain_bytes(inspection, sr_uuid, vdi_uuid):
    """Physical bytes of the VDI's own part of its chain: the VHD and every ancestor up to (not
    including) one that other VHDs share. A leaf coalesce, and the GC's merges below it, only
    change this part; comparing it before and after gives the bytes a run freed."""
    reports = {}
    children = {}
    for sr in inspection.srs or ():
        if sr.uuid == sr_uuid:
            for vdi in sr.vdis or ():
                reports[vdi.uuid] = vdi
                children[vdi.parent_uuid] = children.get(vdi.parent_uuid, 0) + 1
    total = 0
    current = reports.get(vdi_uuid)
    while current is not None:
        total += current.physical_bytes or 0
        parent = reports.get(current.parent_uuid) if current.parent_uuid else None
        if parent is None or children.get(parent.uuid, 0) != 1:
            break
        current = parent
    return total


def _sr_free(inspection, sr_uuid):
    for sr in inspection.srs or ():
        if sr.uuid == sr_uuid:
            return sr.free_bytes or 0
    return 0


def _run_record(entry, started):
    return {
        "vm_uuid": entry["vm_uuid"], "vm_name": entry["vm_name"], "vdi_uuid": entry["vdi_uuid"],
        "sr_uuid": entry["sr_uuid"], "strategy": entry["strategy"], "result": entry["result"],
        "reason": entry["reason"], "estimated_bytes": entry["estimated_bytes"], "reclaimed_bytes": 0,
        "merge_bytes": entry["merge_bytes"], "frozen_seconds": None,
        "predicted_freeze_seconds": entry["predicted_freeze_seconds"], "started": started, "finished": started,
    }


class Runner(object):
    """Carries out a plan on the host through one xapi session.

    1. hold back (`leaf-coalesce=false`, journalled) every leaf of the SRs concerned that the plan
       leaves alone, so that the GC the agent kicks merges nothing it should not;
    2. the SRs' normal GC pass (if `gc` is allowed), then one inspection;
    3. each VDI still leaf-coalesceable: planned again on fresh data, then the forced live path or
       the plugin;
    4. one inspection to verify every chain and measure the bytes freed; release the holds.
    """

    def __init__(self, config, session, policy):
        self.config = config
        self.session = session
        self.policy = policy
        self.journal = journal_module.Journal(config.agent.state_dir)
        self.lost = None  # why xapi was lost mid-run, if it was

    def inspect(self):
        return inspection_module.inspect(self.config)

    def facts(self, inspection):
        return gather_facts(self.config, self.session, [sr.uuid for sr in inspection.srs or ()])

    def execute(self, entries, before):
        """Run the planned entries; returns one run record per entry."""
        runs = [_run_record(entry, time.time()) for entry in entries if entry["result"] != planner.PLANNED]
        planned = [entry for entry in entries if entry["result"] == planner.PLANNED]
        if not planned:
            return runs
        held = []
        try:
            for step in self._holds(planned, before):
                held.append(set_leaf_coalesce(self.session, self.journal, step))
            return runs + self._execute_held(planned, before)
        except TRANSPORT_ERRORS as error:
            self.lost = "xapi unreachable: {}".format(describe(error))
        except XenAPI.Failure as error:
            return runs + [self._ended(entry, planner.FAILED, "holding back the SRs' other leaves: {}".format(
                describe(error))) for entry in planned]
        finally:
            self._release(held)
        return runs + [self._ended(entry, planner.FAILED, "interrupted: " + self.lost) for entry in planned]

    def _holds(self, planned, before):
        """Journal steps holding back every leaf of the SRs concerned that the GC the agent kicks
        could merge although the plan leaves it alone (skipped, excluded, not asked for)."""
        wanted = {entry["vdi_uuid"] for entry in planned}
        sr_uuids = {entry["sr_uuid"] for entry in planned}
        facts = self.facts(before)
        steps = []
        for sr in before.srs or ():
            if sr.uuid not in sr_uuids:
                continue
            for vdi in sr.vdis or ():
                record = facts.vdis.get(vdi.uuid)
                if vdi.state not in (model.LEAF_COALESCEABLE, model.EXCLUDED) or vdi.uuid in wanted or not record:
                    continue
                value = record["other_config"].get(journal_module.LEAF_COALESCE_KEY)
                if value == journal_module.HOLD or record["on_boot"] == "reset" or record["allow_caching"]:
                    continue
                steps.append(journal_module.hold_step(sr.uuid, vdi.uuid, value))
        return steps

    def _release(self, held):
        for step_id in held:
            try:
                _close_step(self.session, self.journal, step_id)
            except (XenAPI.Failure,) + TRANSPORT_ERRORS as error:
                LOG.error("could not release a held VDI now (the journal keeps it): %s", describe(error))

    def _ended(self, entry, result, reason, **fields):
        run = _run_record(entry, entry.get("started") or time.time())
        run.update(result=result, reason=reason, finished=time.time(), **fields)
        return run

    def _execute_held(self, planned, before):
        current = before
        frozen_by_gc = {}
        if planner.GC in self.policy.strategies:
            try:
                with FreezeMeter(self.config, {entry["vdi_uuid"]: entry["vm_uuid"] for entry in planned}) as meter:
                    for sr_uuid in sorted({entry["sr_uuid"] for entry in planned}):
                        gc_pass(self.config, self.session, sr_uuid)
                current = self.inspect()
            except (XenAPI.Failure, RunError, HostUnreachable) as error:
                return [self._ended(entry, planner.FAILED, "GC pass: {}".format(describe(error)))
                        for entry in planned]
            frozen_by_gc = {entry["vdi_uuid"]: meter.seconds(entry["vdi_uuid"]) for entry in planned}
        outcomes = {}  # vdi_uuid -> (strategy, frozen seconds, predicted) once something was run for it
        failures = {}  # vdi_uuid -> run record that failed or was skipped before anything ran
        forced_any = False
        for entry in planned:
            entry["started"] = time.time()
            try:
                if not _merged(current, entry) and self._parent_changed(entry):
                    current = self.inspect()  # the GC worked on this chain while busy with another
            except (XenAPI.Failure, HostUnreachable) as error:
                failures[entry["vdi_uuid"]] = self._ended(entry, planner.FAILED, describe(error))
                continue
            if _merged(current, entry):
                outcomes[entry["vdi_uuid"]] = (planner.GC, frozen_by_gc.get(entry["vdi_uuid"]),
                                               entry["predicted_freeze_seconds"])
                continue
            outcome = self._force(entry, current, outcomes)
            if isinstance(outcome, dict):
                failures[entry["vdi_uuid"]] = outcome
            else:
                outcomes[entry["vdi_uuid"]] = outcome
                forced_any = True
        after = current
        if forced_any:
            try:
                for sr_uuid in sorted({entry["sr_uuid"] for entry in planned}):
                    self.session.xenapi.SR.scan(self.session.xenapi.SR.get_by_uuid(sr_uuid))
                    wait_gc_idle(self.session, sr_uuid, self.config.coalesce.gc_wait_seconds)
                after = self.inspect()
            except (XenAPI.Failure, HostUnreachable) as error:
                return [self._ended(entry, planner.FAILED, "could not verify: {}".format(describe(error)))
                        for entry in planned]
        runs = [failures.get(entry["vdi_uuid"]) or self._verify(entry, before, after,
                                                                 *outcomes[entry["vdi_uuid"]])
                for entry in planned]
        for sr_uuid in sorted({entry["sr_uuid"] for entry in planned}):
            LOG.info("SR %s: free space %d -> %d bytes", sr_uuid, _sr_free(before, sr_uuid), _sr_free(after, sr_uuid))
        return runs

    def _force(self, entry, current, outcomes):
        """The forcing path for one VDI: (strategy, frozen seconds, predicted), or the run record of a
        skip or a failure."""
        vm_done = [outcome for uuid, outcome in outcomes.items()
                   if outcome[0] == planner.PLUGIN and uuid in _vdis_of_vm(current, entry["vm_uuid"])]
        if vm_done:
            return vm_done[0]  # the plugin already ran for this VM: verification tells
        fresh = None
        try:
            facts = self.facts(current)
            replanned = planner.plan(current, facts, self.policy.without(planner.GC), srs=[entry["sr_uuid"]])
            fresh = next((item for item in replanned if item["vdi_uuid"] == entry["vdi_uuid"]), None)
            if fresh is None or fresh["result"] != planner.PLANNED:
                reason = fresh["reason"] if fresh else "no longer leaf-coalesceable"
                return self._ended(entry, planner.SKIPPED, "after the GC pass: " + reason,
                                   strategy=fresh["strategy"] if fresh and fresh["strategy"] else entry["strategy"])
            with FreezeMeter(self.config, {entry["vdi_uuid"]: entry["vm_uuid"]}) as meter:
                if fresh["strategy"] == planner.LIVE:
                    run_live(self.config, self.session, self.journal, entry)
                else:
                    run_plugin(self.config, self.session, self.journal, entry, facts)
            return fresh["strategy"], meter.seconds(entry["vdi_uuid"]), fresh["predicted_freeze_seconds"]
        except (XenAPI.Failure, RunError, HostUnreachable, journal_module.RepairFailed) as error:
            strategy = fresh["strategy"] if fresh is not None and fresh.get("strategy") else entry["strategy"]
            return self._ended(entry, planner.FAILED, describe(error), strategy=strategy)

    def _parent_changed(self, entry):
        """xapi's `vhd-parent` of the VDI is no longer the parent it was planned with."""
        ref = self.session.xenapi.VDI.get_by_uuid(entry["vdi_uuid"])
        return self.session.xenapi.VDI.get_sm_config(ref).get("vhd-parent", "") != entry["parent_uuid"]

    def _verify(self, entry, before, after, strategy, frozen, predicted):
        """The run record once its path ran: the chain must be one link shorter; bytes freed measured."""
        run = _run_record(entry, entry["started"])
        run.update(strategy=strategy, predicted_freeze_seconds=predicted, finished=time.time(),
                   frozen_seconds=round(frozen, 3) if frozen is not None else None)
        if not _shortened(after, entry):
            _, report = _find(after, entry["vdi_uuid"])
            run.update(result=planner.FAILED, reason="the chain is not shorter after the run ({})".format(
                "{} links".format(report.chain_length) if report else "VDI gone"))
            return run
        sr_uuid, vdi_uuid = entry["sr_uuid"], entry["vdi_uuid"]
        reclaimed = max(0, _chain_bytes(before, sr_uuid, vdi_uuid) - _chain_bytes(after, sr_uuid, vdi_uuid))
        run.update(result=planner.SUCCESS, reclaimed_bytes=reclaimed)
        if reclaimed < entry["estimated_bytes"]:
            LOG.warning("VDI %s: reclaimed %d bytes, %d were estimated", vdi_uuid, reclaimed, entry["estimated_bytes"])
        elif reclaimed > entry["estimated_bytes"]:
            LOG.info("VDI %s: reclaimed %d bytes: %d by the leaf coalesce, the rest by the GC's merges in its chain",
                     vdi_uuid, reclaimed, entry["estimated_bytes"])
        if frozen is not None and strategy != planner.GC:
            record_speed(self.config, sr_uuid, strategy, entry["merge_bytes"], frozen)
        if frozen is not None:
            LOG.info("VDI %s: frozen %.2f s by %s, %s s predicted", vdi_uuid, frozen, strategy, predicted)
        return run


def _shortened(inspection, entry):
    _, report = _find(inspection, entry["vdi_uuid"])
    return report is not None and report.chain_length < entry["chain_length"]


def _merged(inspection, entry):
    """The chain is shorter and nothing is left to leaf-coalesce (a GC merging only a hidden parent
    also shortens it, but leaves the leaf leaf-coalesceable)."""
    _, report = _find(inspection, entry["vdi_uuid"])
    return _shortened(inspection, entry) and report.state != model.LEAF_COALESCEABLE


def _vdis_of_vm(inspection, vm_uuid):
    return {vdi.uuid for sr in inspection.srs or () for vdi in sr.vdis or () if vm_uuid and vdi.vm_uuid == vm_uuid}


# ---- the entry points ----------------------------------------------------------------------

def _policy(config, max_freeze_seconds=None):
    return planner.Policy.from_config(config.coalesce, max_freeze_seconds)


def _record_history(config, runs, record_skipped):
    history = history_module.RunHistory(config.agent.state_dir)
    for run in runs:
        if run["strategy"] in history_module.STRATEGIES and (record_skipped or run["result"] != planner.SKIPPED):
            history.record(run)


def _final_repair(config, journal):
    """After a run: whatever is still open in the journal is undone now with a fresh session."""
    if not journal.steps():
        return ""
    try:
        with open_session(config) as session:
            repair(config, session, journal)
    except (HostUnreachable, journal_module.RepairFailed) + TRANSPORT_ERRORS as error:
        return "could not undo everything yet (the next run will): {}".format(describe(error))
    return ""


def plan_and_run(config, policy, inspection=None, vms=(), srs=(), dry_run=False, caps=(None, None),
                 record_skipped=True):
    """Lock, repair, inspect, plan, run. Returns (entries or runs, problems: [str], lost xapi: bool).

    Raises `LockHeld` when another run holds the host lock, `HostUnreachable` when xapi or
    `vhd-util` cannot be reached before anything was done.
    """
    journal = journal_module.Journal(config.agent.state_dir)
    problems = []
    with HostLock(config.agent.state_dir):
        runs = []
        lost = False
        try:
            with open_session(config) as session:
                try:
                    repair(config, session, journal)
                except journal_module.RepairFailed as error:
                    raise AgentError("an interrupted run left changes that cannot be undone yet, so nothing "
                                     "is run: {}".format(error)) from None
                runner = Runner(config, session, policy)
                before = inspection or runner.inspect()
                before = _settled(config, session, runner, before, srs)
                for error in before.errors or ():
                    LOG.warning("inspection: %s: %s", error["stage"], error["message"])
                entries = planner.plan(before, runner.facts(before), policy, vms=vms, srs=srs)
                planner.apply_caps(entries, *caps)
                if dry_run:
                    return entries, problems, False
                runs = runner.execute(entries, before)
                lost = runner.lost is not None
        finally:
            problem = _final_repair(config, journal)
            if problem:
                problems.append(problem)
        _record_history(config, runs, record_skipped)
    return runs, problems, lost


def _settled(config, session, runner, inspection, srs):
    """Wait (bounded) for the GCs already running on the SRs concerned, then look again."""
    busy = [sr.uuid for sr in inspection.srs or () if sr.gc_running and (not srs or sr.uuid in srs)]
    if not busy:
        return inspection
    for sr_uuid in busy:
        wait_gc_idle(session, sr_uuid, config.coalesce.gc_wait_seconds)
    return runner.inspect()


def run_now(config, options):
    """`xcoalesce-agent --now`: returns the exit code (docs/design.md)."""
    dry_run = bool(getattr(options, "dry_run", False))
    policy = _policy(config, getattr(options, "max_freeze_seconds", None))
    caps = schedule.caps_left(policy.max_vms_per_window, policy.max_bytes_per_window, 0, 0)
    runs, problems, lost = plan_and_run(config, policy, vms=getattr(options, "vms", None) or (),
                                        srs=getattr(options, "srs", None) or (), dry_run=dry_run, caps=caps)
    output = render_json(runs, dry_run) if getattr(options, "json", False) else render_text(runs, dry_run)
    sys.stdout.write(output)
    for problem in problems:
        sys.stderr.write("xcoalesce-agent: error: {}\n".format(problem))
    if lost:
        return EXIT_UNREACHABLE
    if problems or any(run["result"] == planner.FAILED for run in runs):
        return EXIT_RUNS_FAILED
    return EXIT_OK


# ---- the daemon: start-up repair, scheduled runs and the snapshot-deletion trigger -------------

def startup_repair(config):
    """Called once by the daemon at start: undo what an interrupted run left, if no run holds the
    lock (that run repairs first itself). Returns what was done; logs instead of raising."""
    journal = journal_module.Journal(config.agent.state_dir)
    if not journal.steps():
        return []
    try:
        with HostLock(config.agent.state_dir):
            with open_session(config) as session:
                return repair(config, session, journal)
    except (AgentError, journal_module.RepairFailed, XenAPI.Failure) + TRANSPORT_ERRORS as error:
        LOG.error("could not undo what an interrupted run left (the next run will try again): %s", describe(error))
        return []


def scheduled_run(config, inspection, now=None):
    """Called by the daemon after each inspection: in `auto` mode, inside a window and under the
    caps, leaf-coalesce what is eligible (with `trigger_on_snapshot_delete`, only on the SRs where
    a snapshot was deleted since). Returns the runs done ([] when none); never raises for a held
    lock (the other run acts) or an unreachable host (the next inspection will tell).
    """
    coalesce = config.coalesce
    if coalesce.mode != "auto":
        return []
    moment = datetime.datetime.fromtimestamp(time.time() if now is None else now)
    window = schedule.current_window_start(coalesce.windows, moment)
    if window is None:
        return []
    usage_path = os.path.join(config.agent.state_dir, WINDOW_FILE)
    usage = _read_json(usage_path, {})
    if usage.get("window") != window.isoformat():
        usage = {"window": window.isoformat(), "vms": [], "bytes": 0}
    caps = schedule.caps_left(coalesce.max_vms_per_window, coalesce.max_bytes_per_window,
                              len(usage["vms"]), usage["bytes"])
    if 0 in caps:
        return []
    pending = PendingSrs(config)
    srs = pending.load() if coalesce.trigger_on_snapshot_delete else None
    if srs is not None and not srs:
        return []
    if not _anything_to_do(inspection, srs):
        return []
    try:
        runs, problems, _ = plan_and_run(config, _policy(config), inspection=inspection, srs=srs or (),
                                         caps=caps, record_skipped=False)
    except (AgentError, XenAPI.Failure) + TRANSPORT_ERRORS as error:
        LOG.warning("scheduled leaf coalesce not run: %s", describe(error))
        return []
    for problem in problems:
        LOG.error("%s", problem)
    done = [run for run in runs if run["result"] == planner.SUCCESS]
    LOG.info("scheduled leaf coalesce%s: %d succeeded, %d failed, %d skipped; %d bytes reclaimed",
             " on SR {}".format(", ".join(srs)) if srs else "", len(done),
             sum(1 for run in runs if run["result"] == planner.FAILED),
             sum(1 for run in runs if run["result"] == planner.SKIPPED), sum(run["reclaimed_bytes"] for run in done))
    usage["vms"] = sorted(set(usage["vms"]) | {run["vm_uuid"] or run["vdi_uuid"] for run in done})
    usage["bytes"] += sum(run["reclaimed_bytes"] for run in done)
    _write_json(usage_path, usage)
    if srs:
        pending.remove(srs)
    return runs


def _anything_to_do(inspection, srs):
    return any(vdi.state == model.LEAF_COALESCEABLE for sr in inspection.srs or () if not srs or sr.uuid in srs
               for vdi in sr.vdis or ())


class PendingSrs(object):
    """SRs where a snapshot was deleted and whose leaves wait for the next window (kept on disk)."""

    def __init__(self, config):
        self.path = os.path.join(config.agent.state_dir, PENDING_FILE)
        self._lock = threading.Lock()

    def load(self):
        return sorted(_read_json(self.path, []))

    def add(self, sr_uuids):
        with self._lock:
            _write_json(self.path, sorted(set(self.load()) | set(sr_uuids)))

    def remove(self, sr_uuids):
        with self._lock:
            _write_json(self.path, sorted(set(self.load()) - set(sr_uuids)))


def watching(config):
    """Whether the daemon should run a `SnapshotWatcher`."""
    return config.coalesce.mode != "off" and config.coalesce.trigger_on_snapshot_delete


class SnapshotWatcher(object):
    """Follows xapi's VDI events (`event.from`) in a thread; when a snapshot VDI is deleted, waits
    for the SR's GC to settle, then marks the SR pending (for `scheduled_run`) and settled (so the
    daemon inspects it now). `start()`, `stop()`, `wait_settled(timeout) -> [sr_uuid]`;
    `on_settled(sr_uuid)`, if given, is called from the watcher's thread (e.g. to wake the daemon).
    """

    EVENT_TIMEOUT = 2.0
    SETTLE_POLL_SECONDS = 0.5
    RETRY_SECONDS = 10.0

    def __init__(self, config, on_settled=None):
        self.config = config
        self.on_settled = on_settled
        self.pending = PendingSrs(config)
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._settled = set()
        self._deleted = {}   # sr_uuid -> monotonic time of the deletion
        self._snapshots = {}  # VDI ref -> SR ref, for snapshot VDIs
        self._thread = None
        self.following = threading.Event()  # set once the snapshot VDIs present at start are known

    def start(self):
        self._thread = threading.Thread(target=self._loop, name="snapshot-watcher", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.EVENT_TIMEOUT + 5)

    def wait_settled(self, timeout):
        """Block up to `timeout` seconds for SRs that settled after a snapshot deletion; returns them."""
        with self._changed:
            if not self._settled:
                self._changed.wait(timeout)
            settled, self._settled = sorted(self._settled), set()
        return settled

    def _loop(self):
        while not self._stop.is_set():
            try:
                with open_session(self.config) as session:
                    self._follow(session)
            except (HostUnreachable, XenAPI.Failure) + TRANSPORT_ERRORS as error:
                LOG.warning("snapshot watcher: %s; retrying in %g s", describe(error), self.RETRY_SECONDS)
                self._stop.wait(self.RETRY_SECONDS)

    def _follow(self, session):
        event_from = getattr(session.xenapi.event, "from")
        token = ""
        sr_uuids = {}
        while not self._stop.is_set():
            result = event_from(["VDI"], token, self.SETTLE_POLL_SECONDS if self._deleted else self.EVENT_TIMEOUT)
            token = result["token"]
            for event in result["events"]:
                self._note(session, event, sr_uuids)
            if not self.following.is_set():
                LOG.info("following snapshot deletions (%d snapshot VDIs now)", len(self._snapshots))
                self.following.set()
            self._settle(session)

    def _note(self, session, event, sr_uuids):
        ref = event["ref"]
        if event["operation"] == "del":
            sr_ref = self._snapshots.pop(ref, None)
            if sr_ref is not None and sr_ref in sr_uuids:
                LOG.info("snapshot VDI deleted on SR %s", sr_uuids[sr_ref])
                self._deleted[sr_uuids[sr_ref]] = time.monotonic()
            return
        record = event.get("snapshot") or {}
        if record.get("is_a_snapshot"):
            sr_ref = record["SR"]
            self._snapshots[ref] = sr_ref
            if sr_ref not in sr_uuids:
                sr_uuids[sr_ref] = session.xenapi.SR.get_uuid(sr_ref)

    def _settle(self, session):
        for sr_uuid, deleted in list(self._deleted.items()):
            if time.monotonic() - deleted < GC_START_SECONDS or gc_running(session, sr_uuid):
                continue
            del self._deleted[sr_uuid]
            self.pending.add([sr_uuid])
            with self._changed:
                self._settled.add(sr_uuid)
                self._changed.notify_all()
            if self.on_settled is not None:
                self.on_settled(sr_uuid)


# ---- output ------------------------------------------------------------------------------

JSON_FIELDS = ("vm_uuid", "vm_name", "vdi_uuid", "sr_uuid", "strategy", "result", "reason", "estimated_bytes",
               "reclaimed_bytes", "frozen_seconds", "predicted_freeze_seconds", "merge_bytes")


def render_json(runs, dry_run=False):
    document = {
        "dry_run": dry_run,
        "runs": [{name: run.get(name) for name in JSON_FIELDS} for run in runs],
        "estimated_bytes": sum(run["estimated_bytes"] for run in runs if run["result"] != planner.SKIPPED),
        "reclaimed_bytes": sum(run.get("reclaimed_bytes") or 0 for run in runs),
    }
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def _size(value):
    value = float(value or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return "{:.1f} {}".format(value, unit) if unit != "B" else "{:.0f} B".format(value)
        value /= 1024
    return ""


def _seconds(value):
    return "-" if value is None else "{:.2f} s".format(value)


def render_text(runs, dry_run=False):
    if not runs:
        return "Nothing to leaf-coalesce.\n"
    header = ("VDI", "VM", "STRATEGY", "PREDICTED", "ESTIMATED") + (
        ("PLAN", "REASON") if dry_run else ("FROZEN", "RECLAIMED", "RESULT", "REASON"))
    rows = [header]
    for run in runs:
        row = (run["vdi_uuid"], run["vm_name"] or run["vm_uuid"] or "-", run["strategy"] or "-",
               _seconds(run["predicted_freeze_seconds"]), _size(run["estimated_bytes"]))
        if dry_run:
            row += (run["result"], run["reason"] or "")
        else:
            row += (_seconds(run["frozen_seconds"]), _size(run["reclaimed_bytes"]), run["result"], run["reason"] or "")
        rows.append(row)
    widths = [max(len(str(row[column])) for row in rows) for column in range(len(header) - 1)]
    lines = ["  ".join(str(row[column]).ljust(width) for column, width in enumerate(widths)) + "  " + str(row[-1])
             for row in rows]
    planned = [run for run in runs if run["result"] != planner.SKIPPED]
    if dry_run:
        lines.append("Would leaf-coalesce {} VDI(s), expected to free {}.".format(
            len(planned), _size(sum(run["estimated_bytes"] for run in planned))))
    else:
        lines.append("Reclaimed {} in {} successful run(s), {} failed, {} skipped.".format(
            _size(sum(run["reclaimed_bytes"] or 0 for run in runs)),
            sum(1 for run in runs if run["result"] == planner.SUCCESS),
            sum(1 for run in runs if run["result"] == planner.FAILED),
            sum(1 for run in runs if run["result"] == planner.SKIPPED)))
    return "\n".join(line.rstrip() for line in lines) + "\n"
