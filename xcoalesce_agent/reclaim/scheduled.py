"""The daemon's leaf-coalesce runs: in `auto` mode, inside a maintenance window and under the
window's caps (its usage kept on disk), on the SRs the snapshot trigger left pending if it is on."""
import datetime
import logging
import os
import time

import XenAPI

from .. import model
from . import planner, plans, schedule
from ..errors import AgentError
from ..jsonfile import read_json, write_json
from .runner import plan_and_run
from .snapshot_trigger import PendingSrs
from ..inspect.xapi import TRANSPORT_ERRORS, describe

LOG = logging.getLogger(__name__)

WINDOW_FILE = "window.json"


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
    usage = read_json(usage_path, {})
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
        runs, problems, _ = plan_and_run(config, planner.Policy.from_config(config.coalesce), inspection=inspection,
                                         srs=srs or (), caps=caps, record_skipped=False)
    except (AgentError, XenAPI.Failure) + TRANSPORT_ERRORS as error:
        LOG.warning("scheduled leaf coalesce not run: %s", describe(error))
        return []
    for problem in problems:
        LOG.error("%s", problem)
    done = [run for run in runs if run.result == plans.SUCCESS]
    LOG.info("scheduled leaf coalesce%s: %d succeeded, %d failed, %d skipped; %d bytes reclaimed",
             " on SR {}".format(", ".join(srs)) if srs else "", len(done),
             sum(1 for run in runs if run.result == plans.FAILED),
             sum(1 for run in runs if run.result == plans.SKIPPED), sum(run.reclaimed_bytes for run in done))
    usage["vms"] = sorted(set(usage["vms"]) | {run.vm_uuid or run.vdi_uuid for run in done})
    usage["bytes"] += sum(run.reclaimed_bytes for run in done)
    write_json(usage_path, usage)
    if srs:
        pending.remove(srs)
    return runs


def _anything_to_do(inspection, srs):
    return any(vdi.state == model.LEAF_COALESCEABLE for sr in inspection.srs or () if not srs or sr.uuid in srs
               for vdi in sr.vdis or ())
