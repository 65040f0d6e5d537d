"""The crash journal: every host change the agent makes is written down before it is made.

A step is one change that must be undone if the agent dies before undoing it itself:
`leaf-coalesce` (the agent sets a VDI's `other-config:leaf-coalesce`: `force` to merge it now,
`false` to hold it back while the GC it kicked works on other VDIs) and `suspend` (a VM the
`coalesce-leaf` plugin suspends on the agent's behalf; the plugin also sets `force` on the VM's
VDIs). The file is rewritten atomically (fsync, rename, fsync of the directory) before the
step, and the step is dropped once the change is undone. `repair()` undoes what a crash left.

A `suspend` step names the plugin's xapi task once the call is made: xapi cannot stop a plugin,
so while that task runs the plugin may still suspend the VM or set `force`, and the step stays
open (its flags put back at each repair, the VM left to the plugin) until the task has ended.

The journal comes first, as it knows the order of the steps; each change is also marked on the
host (marks.py), and undoing a step removes its marks.
"""
import json
import logging
import os

import XenAPI

from ..inspect import marks
from ..inspect.marks import FORCE, HOLD, LEAF_COALESCE_KEY  # noqa: F401 (the journal's steps speak of them)
from ..inspect.xapi import TRANSPORT_ERRORS, describe
from ..jsonfile import fsync_dir

LOG = logging.getLogger(__name__)

FILE_NAME = "journal.json"

LEAF_COALESCE_STEP = "leaf-coalesce"
SUSPEND_STEP = "suspend"


def force_step(sr_uuid, vdi_uuid, previous):
    """The agent sets `leaf-coalesce=force` on a VDI whose value was `previous` (None: unset)."""
    return {"action": LEAF_COALESCE_STEP, "sr_uuids": [sr_uuid], "vdi_uuid": vdi_uuid, "value": FORCE,
            "previous": previous}


def hold_step(sr_uuid, vdi_uuid, previous):
    """The agent sets `leaf-coalesce=false` on a VDI it must not merge while it kicks the SR's GC."""
    return {"action": LEAF_COALESCE_STEP, "sr_uuids": [sr_uuid], "vdi_uuid": vdi_uuid, "value": HOLD,
            "previous": previous}


def suspend_step(sr_uuids, vm_uuid, power_state, forced_vdis=()):
    """A VM in `power_state` gets suspended; `forced_vdis` are [(vdi_uuid, previous)] also forced.

    `sr_uuids`: the SRs whose GC works while the step is open (repair waits for them first).
    """
    return {"action": SUSPEND_STEP, "sr_uuids": sorted(sr_uuids), "vm_uuid": vm_uuid,
            "power_state": power_state, "forced_vdis": [[uuid, previous] for uuid, previous in forced_vdis]}


class Journal(object):
    """The journal file in the agent's state directory."""

    def __init__(self, state_dir):
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, FILE_NAME)

    def steps(self):
        """The steps still open, oldest first; an unreadable journal is kept aside and read as empty."""
        try:
            with open(self.path, encoding="utf-8") as stream:
                steps = json.load(stream)["steps"]
        except (FileNotFoundError, NotADirectoryError):  # no journal, or no state directory yet
            return []
        except (ValueError, KeyError, TypeError, OSError) as error:
            aside = self.path + ".corrupt"
            LOG.error("journal %s unreadable (%s), moved to %s", self.path, error, aside)
            os.replace(self.path, aside)
            return []
        return steps

    def begin(self, step):
        """Record `step` durably; call before making the change. Returns the step's id."""
        steps = self.steps()
        step = dict(step, id=max([s["id"] for s in steps] + [0]) + 1)
        self._write(steps + [step])
        return step["id"]

    def amend(self, step_id, **fields):
        """Add `fields` to an open step (the plugin's task once it is known)."""
        self._write([dict(step, **fields) if step["id"] == step_id else step for step in self.steps()])

    def end(self, step_id):
        """Drop a step once its change is undone (or turned out not to need undoing)."""
        self._write([step for step in self.steps() if step["id"] != step_id])

    def _write(self, steps):
        os.makedirs(self.state_dir, exist_ok=True)
        if not steps:
            if os.path.exists(self.path):
                os.unlink(self.path)
                fsync_dir(self.state_dir)
            return
        temporary = self.path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as stream:
            json.dump({"steps": steps}, stream, indent=1, sort_keys=True)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, self.path)
        fsync_dir(self.state_dir)


def repair(session, journal):
    """Undo every open step, newest first; returns one line per action taken.

    A step whose undo fails stays in the journal (the next start tries again) and the error is
    raised after the other steps were tried.
    """
    actions = []
    failures = []
    for step in reversed(journal.steps()):
        try:
            if plugin_running(session, step):
                actions.extend(restore_forced(session, step))
                actions.append("VM {}: the coalesce-leaf plugin still runs (task {}): its step stays open until "
                               "it ends".format(step["vm_uuid"], step["task"]))
                continue
            actions.extend(undo(session, step))
        except (XenAPI.Failure,) + TRANSPORT_ERRORS as error:
            failures.append("{} {}: {}".format(step["action"], _subject(step), describe(error)))
            continue
        journal.end(step["id"])
    if failures:
        raise RepairFailed("; ".join(failures))
    return actions


class RepairFailed(Exception):
    """Some journal steps could not be undone; they stay in the journal."""


def undo(session, step):
    """Undo one step against xapi, its marks included; idempotent. Returns what was done, one line per change."""
    if step["action"] == LEAF_COALESCE_STEP:
        return marks.restore_flag(session, step["vdi_uuid"], step["value"], step["previous"])
    if step["action"] == SUSPEND_STEP:
        done = restore_forced(session, step) + marks.bring_back(session, step["vm_uuid"], step["power_state"])
        marks.drop_settled_marks(session, [vdi_uuid for vdi_uuid, _ in step["forced_vdis"]])
        return done
    raise ValueError("unknown journal step {!r}".format(step["action"]))


UNFINISHED_TASK = ("pending", "cancelling")


def task_running(session, task):
    """True while the xapi task `task` has not ended (a task gone has ended)."""
    try:
        return session.xenapi.task.get_status(task) in UNFINISHED_TASK
    except XenAPI.Failure as error:
        if marks.missing(error):
            return False
        raise


def plugin_running(session, step):
    """True while the plugin call of a `suspend` step is still under way."""
    return step["action"] == SUSPEND_STEP and bool(step.get("task")) and task_running(session, step["task"])


def restore_forced(session, step):
    """The `force` flags the plugin set on the VDIs of a `suspend` step go back to what they were.

    Done before the VM is resumed: a GC still running must not find `force` on a running VM's
    leaf (it would merge it with no time limit). The VDIs' marks stay until the VM's mark is gone."""
    done = []
    for vdi_uuid, previous in step["forced_vdis"]:
        done.extend(marks.restore_flag(session, vdi_uuid, FORCE, previous, keep_mark=True))
    return done


def _subject(step):
    return step.get("vdi_uuid") or step.get("vm_uuid")
