"""What the planner decides on, gathered from the host: xapi's records, the SRs' merge speeds (SM's
speed log and the agent's own measured runs) and Dom0's load; and the speed store those runs feed."""
import os

from . import planner
from ..jsonfile import read_json, write_json
from ..inspect.xapi import iter_records

SPEEDS_FILE = "merge-speeds.json"
SPEEDS_KEPT = 10

# The fields of xapi's records that the planner and the runner read (planner.py, runner.py,
# strategies.py); only these are decoded, whatever else thousands of records hold.
VM_FIELDS = ("uuid", "power_state", "is_control_domain", "ha_restart_priority", "current_operations",
             "blocked_operations", "tags", "other_config")
VDI_FIELDS = ("uuid", "other_config", "on_boot", "allow_caching", "current_operations", "is_a_snapshot")
SR_FIELDS = ("uuid", "type", "other_config")


def gather_facts(config, session, sr_uuids):
    def by_uuid(class_name, fields):
        return {record["uuid"]: record for _, record in iter_records(config, session, class_name, fields)}

    return planner.HostFacts(
        vms=by_uuid("VM", VM_FIELDS),
        vdis=by_uuid("VDI", VDI_FIELDS),
        srs=by_uuid("SR", SR_FIELDS),
        speeds=read_speeds(config, sr_uuids),
        load_per_cpu=load_per_cpu(),
    )


def read_speeds(config, sr_uuids):
    """{sr: {"sm": SM's speed log mean, strategy: the agent's own measured mean}} in bytes/s."""
    own = read_json(os.path.join(config.agent.state_dir, SPEEDS_FILE), {})
    speeds = {}
    for sr_uuid in sr_uuids:
        path = os.path.join(config.storage.speed_log_dir, "{}.speed_log".format(sr_uuid))
        try:
            with open(path, encoding="utf-8") as stream:
                sm_speed = planner.parse_speed_log(stream.read())
        except (OSError, UnicodeDecodeError):
            sm_speed = None  # missing or unreadable: no speed
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
    speeds = read_json(path, {})
    figures = speeds.setdefault(sr_uuid, {}).setdefault(strategy, [])
    figures.append(merge_bytes / frozen_seconds)
    del figures[:-SPEEDS_KEPT]
    write_json(path, speeds)


def load_per_cpu():
    return os.getloadavg()[0] / (os.cpu_count() or 1)
