"""Leaf-coalesce runs: `--now`, and the run the daemon's schedule asks for (scheduled.py).

Every run: host lock -> repair what an interrupted run left (repair.py) -> inspect -> plan -> hold
back the leaves the plan leaves alone -> the SRs' normal GC pass -> per VDI still
leaf-coalesceable the forced live path or the plugin -> one inspection to verify each chain is
shorter and measure the bytes freed -> record in the run history. Every host change is journalled
before it is made and undone in a `finally` (strategies.py); the freeze of each run is measured
from xapi's events (freeze.py).
"""
import logging
import sys
import time

import XenAPI

from ..inspect import chains, inspection as inspection_module
from . import history as history_module, journal as journal_module
from .. import model, statedir, stopping
from ..inspect import inventory
from . import planner, plans, schedule
from .repair import repair, repair_marks
from ..errors import EXIT_OK, EXIT_RUNS_FAILED, EXIT_UNREACHABLE, AgentError, HostUnreachable
from .facts import gather_facts, record_speed
from .freeze import FreezeMeter
from .lock import HostLock
from .plans import RunRecord
from .runresult import render_json, render_text
from ..inspect.smgc import GcBusy, gc_pass, wait_gc_idle
from .strategies import close_step, run_live, run_plugin, set_leaf_coalesce
from ..inspect.xapi import TRANSPORT_ERRORS, describe, open_session

LOG = logging.getLogger(__name__)


# ---- one run over a plan -----------------------------------------------------------------

class Runner(object):
    """Carries out a plan on the host through one xapi session.

    1. hold back (`leaf-coalesce=false`, journalled) every leaf of the SRs concerned that the plan
       leaves alone, so that the GC the agent kicks merges nothing it should not;
    2. the SRs' normal GC pass (if `gc` is allowed), then one inspection;
    3. each VDI still leaf-coalesceable: planned again on fresh data, then the forced live path or
       the plugin;
    4. one inspection to verify every chain and measure the bytes freed; release the holds.
    """

    def __init__(self, config, session, policy, record=None):
        self.config = config
        self.session = session
        self.policy = policy
        self.journal = journal_module.Journal(config.agent.state_dir)
        self.lost = None  # why xapi was lost mid-run, if it was
        self.record = record  # called with each run record as soon as it is final
        self.started = {}  # vdi_uuid -> when its path began
        self.ended = {}  # vdi_uuid -> its final run record

    def inspect(self):
        return inspection_module.inspect(self.config)

    def facts(self, inspection):
        return gather_facts(self.config, self.session, [sr.uuid for sr in inspection.srs or ()])

    def execute(self, entries, before):
        """Run the planned entries; returns one run record per entry."""
        runs = [self._finish(RunRecord.of(entry, time.time())) for entry in entries
                if entry.result != plans.PLANNED]
        planned = [entry for entry in entries if entry.result == plans.PLANNED]
        if stopping.requested():
            return runs + [self._ended(entry, plans.SKIPPED, stopping.REASON) for entry in planned]
        if not planned:
            return runs
        held = []
        host_uuid = inventory.host_uuid(self.config.xapi.inventory)
        try:
            for step in self._holds(planned, before):
                held.append(set_leaf_coalesce(self.session, self.journal, step, host_uuid))
            return runs + self._execute_held(planned, before)
        except TRANSPORT_ERRORS as error:
            self.lost = "xapi unreachable: {}".format(describe(error))
        except XenAPI.Failure as error:
            return runs + [self._ended(entry, plans.FAILED, "holding back the SRs' other leaves: {}".format(
                describe(error))) for entry in planned]
        finally:
            self._release(held)
        return runs + [self._ended(entry, plans.FAILED, "interrupted: " + self.lost) for entry in planned]

    def _holds(self, planned, before):
        """Journal steps holding back every leaf of the SRs concerned that the GC the agent kicks
        could merge although the plan leaves it alone (skipped, excluded, not asked for)."""
        wanted = {entry.vdi_uuid for entry in planned}
        sr_uuids = {entry.sr_uuid for entry in planned}
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
                close_step(self.session, self.journal, step_id)
            except (XenAPI.Failure,) + TRANSPORT_ERRORS as error:
                LOG.error("could not release a held VDI now (the journal keeps it): %s", describe(error))

    def _ended(self, entry, result, reason, **fields):
        """The entry's final run record: this outcome, unless it already had one."""
        if entry.vdi_uuid in self.ended:
            return self.ended[entry.vdi_uuid]
        run = RunRecord.of(entry, self.started.get(entry.vdi_uuid) or time.time())
        run.update(result=result, reason=reason, finished=time.time(), **fields)
        return self._finish(run)

    def _finish(self, run):
        """A run's outcome is final: recorded now, so that a kill later in the plan loses nothing."""
        self.ended[run.vdi_uuid] = run
        if self.record is not None:
            self.record(run)
        return run

    def _execute_held(self, planned, before):
        current = before
        frozen_by_gc = {}
        if plans.GC in self.policy.strategies:
            try:
                with FreezeMeter(self.config, {entry.vdi_uuid: entry.vm_uuid for entry in planned}) as meter:
                    for sr_uuid in sorted({entry.sr_uuid for entry in planned}):
                        gc_pass(self.config, self.session, sr_uuid)
                current = self.inspect()
            except (XenAPI.Failure, GcBusy, HostUnreachable) as error:
                return [self._ended(entry, plans.FAILED, "GC pass: {}".format(describe(error)))
                        for entry in planned]
            frozen_by_gc = {entry.vdi_uuid: meter.seconds(entry.vdi_uuid) for entry in planned}
        outcomes = {}  # vdi_uuid -> (strategy, frozen seconds, predicted) once something was run for it
        failures = {}  # vdi_uuid -> run record that failed or was skipped before anything ran
        forced_any = False
        stale = False  # a forced path ran since `current` was inspected: its GC may have merged more
        for entry in planned:
            self.started[entry.vdi_uuid] = time.time()
            if stopping.requested():  # the step before ended and was undone: begin no other
                failures[entry.vdi_uuid] = self._ended(entry, plans.SKIPPED, stopping.REASON)
                continue
            if stale and not chains.merged(current, entry):
                try:
                    current = self.inspect()
                except HostUnreachable as error:
                    failures[entry.vdi_uuid] = self._ended(entry, plans.FAILED, describe(error))
                    continue
                stale = False
            if chains.merged(current, entry):
                outcomes[entry.vdi_uuid] = (plans.GC, frozen_by_gc.get(entry.vdi_uuid),
                                            entry.predicted_freeze_seconds, None)
                continue
            outcome = self._force(entry, current, outcomes)
            stale = True
            if isinstance(outcome, RunRecord):
                failures[entry.vdi_uuid] = outcome
            else:
                outcomes[entry.vdi_uuid] = outcome
                forced_any = True
        after = current
        if forced_any:
            try:
                for sr_uuid in sorted({entry.sr_uuid for entry in planned}):
                    self.session.xenapi.SR.scan(self.session.xenapi.SR.get_by_uuid(sr_uuid))
                    wait_gc_idle(self.config, self.session, sr_uuid, self.config.coalesce.gc_wait_seconds)
                after = self.inspect()
            except (XenAPI.Failure, HostUnreachable) as error:
                return [self._ended(entry, plans.FAILED, "could not verify: {}".format(describe(error)))
                        for entry in planned]
        runs = [failures.get(entry.vdi_uuid) or self._verify(entry, before, after, *outcomes[entry.vdi_uuid])
                for entry in planned]
        for sr_uuid in sorted({entry.sr_uuid for entry in planned}):
            LOG.info("SR %s: free space %d -> %d bytes", sr_uuid, chains.sr_free_bytes(before, sr_uuid),
                     chains.sr_free_bytes(after, sr_uuid))
        return runs

    def _force(self, entry, current, outcomes):
        """The forcing path for one VDI: (strategy, frozen seconds, predicted, PluginRun or None), or
        the run record of a skip or a failure."""
        vm_done = [outcome for uuid, outcome in outcomes.items()
                   if outcome[0] == plans.PLUGIN and uuid in chains.vm_vdis(current, entry.vm_uuid)]
        if vm_done:
            return vm_done[0]  # the plugin already ran for this VM: verification tells
        fresh = None
        try:
            facts = self.facts(current)
            replanned = planner.plan(current, facts, self.policy.without(plans.GC), srs=[entry.sr_uuid])
            fresh = next((item for item in replanned if item.vdi_uuid == entry.vdi_uuid), None)
            if fresh is None or fresh.result != plans.PLANNED:
                reason = fresh.reason if fresh else "no longer leaf-coalesceable"
                return self._ended(entry, plans.SKIPPED, "after the GC pass: " + reason,
                                   strategy=fresh.strategy if fresh and fresh.strategy else entry.strategy)
            plugin_run = None
            with FreezeMeter(self.config, {entry.vdi_uuid: entry.vm_uuid}) as meter:
                if fresh.strategy == plans.LIVE:
                    run_live(self.config, self.session, self.journal, entry)
                else:
                    plugin_run = run_plugin(self.config, self.session, self.journal, entry, facts)
            if plugin_run is not None and plugin_run.error:
                return self._ended(entry, plans.FAILED, plugin_run.failure(), strategy=fresh.strategy)
            return (fresh.strategy, meter.seconds(entry.vdi_uuid), fresh.predicted_freeze_seconds,
                    plugin_run)
        except (XenAPI.Failure, GcBusy, HostUnreachable, journal_module.RepairFailed) as error:
            strategy = fresh.strategy if fresh is not None and fresh.strategy else entry.strategy
            return self._ended(entry, plans.FAILED, describe(error), strategy=strategy)

    def _verify(self, entry, before, after, strategy, frozen, predicted, plugin_run):
        """The run record once its path ran: the chain must be one link shorter in `after` (a fresh
        `vhd-util scan`: xapi's `vhd-parent` still names the old parent after a leaf coalesce with a
        grandparent); bytes freed measured. `plugin_run` (a PluginRun) gives the plugin's part."""
        run = RunRecord.of(entry, self.started[entry.vdi_uuid])
        run.update(strategy=strategy, predicted_freeze_seconds=predicted, finished=time.time(),
                   frozen_seconds=round(frozen, 3) if frozen is not None else None)
        if not chains.shortened(after, entry):
            _, report = chains.find_vdi(after, entry.vdi_uuid)
            chain = "{} links".format(report.chain_length) if report else "VDI gone"
            run.update(result=plans.FAILED, reason=plugin_run.not_merged(chain) if plugin_run else
                       "the chain is not shorter after the run ({})".format(chain))
            return self._finish(run)
        if plugin_run is not None and plugin_run.merged():
            run.update(reason=plugin_run.merged())
        sr_uuid, vdi_uuid = entry.sr_uuid, entry.vdi_uuid
        reclaimed = max(0, chains.own_chain_bytes(before, sr_uuid, vdi_uuid)
                        - chains.own_chain_bytes(after, sr_uuid, vdi_uuid))
        run.update(result=plans.SUCCESS, reclaimed_bytes=reclaimed)
        if reclaimed < entry.estimated_bytes:
            LOG.warning("VDI %s: reclaimed %d bytes, %d were estimated", vdi_uuid, reclaimed, entry.estimated_bytes)
        elif reclaimed > entry.estimated_bytes:
            LOG.info("VDI %s: reclaimed %d bytes: %d by the leaf coalesce, the rest by the GC's merges in its chain",
                     vdi_uuid, reclaimed, entry.estimated_bytes)
        if frozen is not None and strategy != plans.GC:
            record_speed(self.config, sr_uuid, strategy, entry.merge_bytes, frozen)
        if frozen is not None:
            LOG.info("VDI %s: frozen %.2f s by %s, %s s predicted", vdi_uuid, frozen, strategy, predicted)
        return self._finish(run)


# ---- the entry points ----------------------------------------------------------------------

def _recorder(config, record_skipped):
    """What records each run in the history as it ends; a state directory failing now is logged."""
    history = history_module.RunHistory(config.agent.state_dir)

    def record(run):
        if run.strategy in history_module.STRATEGIES and (record_skipped or run.result != plans.SKIPPED):
            try:
                history.record(run)
            except OSError as error:
                LOG.error("VDI %s: run not recorded in %s: %s", run.vdi_uuid, history.state_dir, error)
    return record


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

    Raises `StateDirUnusable` when the state directory cannot take the journal and the history,
    `LockHeld` when another run holds the host lock, `HostUnreachable` when xapi or `vhd-util`
    cannot be reached before anything was done.
    """
    statedir.require_writable(config.agent.state_dir)
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
                repair_marks(config, session, 0)  # what waits for a GC is left to the next cycle or --repair
                runner = Runner(config, session, policy, record=_recorder(config, record_skipped))
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
    return runs, problems, lost


def _settled(config, session, runner, inspection, srs):
    """Wait (bounded) for the GCs already running on the SRs concerned, then look again."""
    busy = [sr.uuid for sr in inspection.srs or () if sr.gc_running and (not srs or sr.uuid in srs)]
    if not busy:
        return inspection
    for sr_uuid in busy:
        wait_gc_idle(config, session, sr_uuid, config.coalesce.gc_wait_seconds)
    return runner.inspect()


def run_now(config, options):
    """`xcoalesce-agent --now`: returns the exit code (docs/operations.md, "Exit codes")."""
    dry_run = bool(getattr(options, "dry_run", False))
    policy = planner.Policy.from_config(config.coalesce, getattr(options, "max_freeze_seconds", None))
    caps = schedule.caps_left(policy.max_vms_per_window, policy.max_bytes_per_window, 0, 0)
    runs, problems, lost = plan_and_run(config, policy, vms=getattr(options, "vms", None) or (),
                                        srs=getattr(options, "srs", None) or (), dry_run=dry_run, caps=caps)
    output = render_json(runs, dry_run) if getattr(options, "json", False) else render_text(runs, dry_run)
    sys.stdout.write(output)
    for problem in problems:
        sys.stderr.write("xcoalesce-agent: error: {}\n".format(problem))
    if lost:
        return EXIT_UNREACHABLE
    if problems or any(run.result == plans.FAILED for run in runs):
        return EXIT_RUNS_FAILED
    return EXIT_OK
