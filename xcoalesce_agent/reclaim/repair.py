"""Undoing what an interrupted run left behind: the journal's steps, then the agent's marks in xapi.

At the start and end of every run (runner.py), at each cycle of the service (`startup_repair`) and
on `--repair` (`run_repair`). `force` flags go back at once, before anything waits: a GC still
running must not take them.
"""
import json
import logging
import sys

import XenAPI

from . import journal as journal_module, leftovers
from ..errors import EXIT_OK, EXIT_RUNS_FAILED, AgentError, LockHeld
from .lock import HostLock
from ..inspect.smgc import wait_gc_idle
from ..inspect.xapi import TRANSPORT_ERRORS, describe, open_session

LOG = logging.getLogger(__name__)


def repair(config, session, journal):
    """Undo what an earlier run left behind: the `force` flags at once (a GC still running must not
    take them), the rest once the GCs of those SRs have settled (bounded by gc_wait_seconds). The
    step of a plugin still running stays open (journal.repair); its SRs are not waited for."""
    steps = journal.steps()
    if not steps:
        return []
    actions = _release_force(session, steps)
    settled = [step for step in steps if not journal_module.plugin_running(session, step)]
    for sr_uuid in sorted({sr for step in settled for sr in step.get("sr_uuids", ())}):
        if not wait_gc_idle(config, session, sr_uuid, config.coalesce.gc_wait_seconds):
            LOG.warning("repairing while the GC of SR %s still runs", sr_uuid)
    actions += journal_module.repair(session, journal)
    for line in actions:
        LOG.warning("repaired after an interrupted run: %s", line)
    return actions


def repair_marks(config, session, wait_seconds):
    """After the journal: what the marks in xapi say is still left (a lost or corrupt journal,
    another host's run on an SR this host now masters). Returns `leftovers.Leftovers`."""
    found = leftovers.repair(config, session, wait_seconds)
    for line in found.undone:
        LOG.warning("repaired after an interrupted run: %s", line)
    for line in found.left:
        LOG.warning("left behind by an interrupted run: %s", line)
    return found


def _release_force(session, steps):
    """Every `force` flag the journal names goes back now; what fails here `journal.repair` retries."""
    actions = []
    for step in steps:
        try:
            if step["action"] == journal_module.SUSPEND_STEP:
                actions.extend(journal_module.restore_forced(session, step))
            elif step.get("value") == journal_module.FORCE:
                actions.extend(journal_module.undo(session, step))
        except XenAPI.Failure as error:
            LOG.warning("could not remove a force flag yet: %s", describe(error))
    return actions


def startup_repair(config, with_marks=False):
    """Called by the daemon at each cycle: undo what an interrupted run left, if no run holds the
    lock (that run repairs first itself): the journal's steps, then, when there were any or
    `with_marks` (the inspection saw the agent's marks), the marks in xapi. Returns what was
    done; logs instead of raising."""
    journal = journal_module.Journal(config.agent.state_dir)
    steps = journal.steps()
    if not steps and not with_marks:
        return []
    try:
        with HostLock(config.agent.state_dir):
            with open_session(config) as session:
                actions = repair(config, session, journal) if steps else []
                return actions + repair_marks(config, session, 0).undone
    except LockHeld:
        LOG.debug("a run holds the host lock: it repairs first itself")
    except (AgentError, journal_module.RepairFailed, XenAPI.Failure) + TRANSPORT_ERRORS as error:
        LOG.error("could not undo what an interrupted run left (the next run will try again): %s", describe(error))
    return []


def run_repair(config, as_json):
    """`xcoalesce-agent --repair`: the journal, then the marks in xapi; prints what was undone, what
    is left and the marks that are other hosts' to undo. 0 when nothing is left, 1 otherwise."""
    journal = journal_module.Journal(config.agent.state_dir)
    with HostLock(config.agent.state_dir):
        with open_session(config) as session:
            try:
                actions = repair(config, session, journal)
                problem = ""
            except journal_module.RepairFailed as error:
                actions, problem = [], "journal: could not be undone yet: {}".format(error)
            found = leftovers.repair(config, session, config.coalesce.gc_wait_seconds)
    found.undone[:0] = actions
    if problem:
        found.left.insert(0, problem)
    sys.stdout.write(render_repair(found, as_json))
    return EXIT_RUNS_FAILED if found.left else EXIT_OK


def render_repair(found, as_json):
    """`--repair`'s output: JSON {undone, left, others}, or one line per item."""
    if as_json:
        return json.dumps(found.to_dict(), indent=2, sort_keys=True) + "\n"
    lines = ["undone: " + line for line in found.undone] + ["left: " + line for line in found.left]
    lines += ["another host's: " + line for line in found.others]
    if not found.left:
        lines.append("nothing left behind" + (" by this host" if found.others else ""))
    return "\n".join(lines) + "\n"
