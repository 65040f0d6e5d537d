"""The outcome of `--now` (or its plan, with `--dry-run`) as a table or as JSON with stable keys. Pure.

`runs`: `plans.RunRecord`s, or with `--dry-run` the `plans.PlanEntry`s; each gives its own JSON row."""
import json

from . import plans
from ..printable import MESSAGE_WIDTH, cell, one_line, table
from ..inspect.report import human_bytes


def render_json(runs, dry_run=False):
    document = {
        "dry_run": dry_run,
        "runs": [run.to_json() for run in runs],
        "estimated_bytes": sum(run.estimated_bytes for run in runs if run.result != plans.SKIPPED),
        "reclaimed_bytes": sum(run.reclaimed_bytes or 0 for run in runs),
    }
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def _size(value):
    return human_bytes(value or 0)


def _seconds(value):
    return "-" if value is None else "{:.2f} s".format(value)


def _vm_label(run):
    return cell(run.vm_name) if run.vm_name else one_line(run.vm_uuid or "-")


def render_text(runs, dry_run=False):
    if not runs:
        return "Nothing to leaf-coalesce.\n"
    header = ("VDI", "VM", "STRATEGY", "PREDICTED", "ESTIMATED") + (
        ("PLAN", "REASON") if dry_run else ("FROZEN", "RECLAIMED", "RESULT", "REASON"))
    rows = [header]
    for run in runs:
        row = (one_line(run.vdi_uuid), _vm_label(run), run.strategy or "-",
               _seconds(run.predicted_freeze_seconds), _size(run.estimated_bytes))
        if not dry_run:
            row += (_seconds(run.frozen_seconds), _size(run.reclaimed_bytes))
        rows.append(row + (run.result, cell(run.reason or "", MESSAGE_WIDTH)))
    lines = table(rows)
    planned = [run for run in runs if run.result != plans.SKIPPED]
    if dry_run:
        lines.append("Would leaf-coalesce {} VDI(s), expected to free {}.".format(
            len(planned), _size(sum(run.estimated_bytes for run in planned))))
    else:
        lines.append("Reclaimed {} in {} successful run(s), {} failed, {} skipped.".format(
            _size(sum(run.reclaimed_bytes or 0 for run in runs)),
            sum(1 for run in runs if run.result == plans.SUCCESS),
            sum(1 for run in runs if run.result == plans.FAILED),
            sum(1 for run in runs if run.result == plans.SKIPPED)))
    return "\n".join(lines) + "\n"
