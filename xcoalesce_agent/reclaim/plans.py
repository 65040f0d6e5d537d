"""Plan entries and run records: what the planner decides for one VDI, and what running it came to.

Both are slotted records, so that a misspelt field fails where it is used. Their JSON forms live
here alone: `to_json()` is one row of `--now --json` (a plan entry's with `--dry-run`), and
`RunRecord.to_log()` / `RunRecord.from_log()` one line of the run history (`runs.jsonl`, history.py).
"""
import json

# The native paths a run takes, least disruptive first (planner.py), and what became of an entry.
GC = "gc"
LIVE = "live"
PLUGIN = "plugin"
STRATEGY_ORDER = (GC, LIVE, PLUGIN)

PLANNED = "planned"  # a plan entry to run
SUCCESS = "success"
FAILED = "failed"
SKIPPED = "skipped"  # a plan entry left alone, or a run that did not start
RUN_RESULTS = (SUCCESS, FAILED, SKIPPED)

# The keys of one row of `--now --json`, for a plan entry as for a run record.
OUTPUT_FIELDS = ("vm_uuid", "vm_name", "vdi_uuid", "sr_uuid", "strategy", "result", "reason", "estimated_bytes",
                 "reclaimed_bytes", "frozen_seconds", "predicted_freeze_seconds", "merge_bytes", "format")
# The keys of one line of `runs.jsonl`; `format` too when the run has one (a log written before it
# existed stays readable).
LOG_FIELDS = ("vm_uuid", "vdi_uuid", "sr_uuid", "strategy", "result", "reason", "estimated_bytes",
              "reclaimed_bytes", "frozen_seconds", "predicted_freeze_seconds", "started", "finished")
OPTIONAL_LOG_FIELDS = ("format",)


class _Record(object):
    __slots__ = ()

    def update(self, **fields):
        """Set several fields at once; an unknown name raises AttributeError."""
        for name, value in fields.items():
            setattr(self, name, value)

    def to_json(self):
        """One row of `--now --json`."""
        return {name: getattr(self, name) for name in OUTPUT_FIELDS}

    def __repr__(self):
        return "{}(vdi_uuid={!r}, strategy={!r}, result={!r})".format(
            type(self).__name__, self.vdi_uuid, self.strategy, self.result)


class PlanEntry(_Record):
    """The planner's decision for one leaf-coalesceable (or policy-excluded) VDI."""

    __slots__ = (
        "vm_uuid",                   # the VM the VDI belongs to (for a snapshot VDI, its VM), "" when none
        "vm_name",
        "vm_power_state",            # of the VM whose disk it is, "" for a snapshot VDI or none
        "vdi_uuid",
        "vdi_name",
        "format",                    # the image format (model.FORMATS)
        "sr_uuid",
        "sr_type",
        "chain_length",              # when planned: a run must leave it shorter
        "parent_uuid",
        "estimated_bytes",           # what the leaf coalesce is expected to free
        "merge_bytes",               # bytes the merge copies into the parent
        "merge_free_bytes",          # free space the SR needs for the merge
        "strategy",                  # GC, LIVE or PLUGIN; "" when none can be used
        "fallbacks",                 # [strategy]: the others that fit the freeze limit, in order
        "predicted_freeze_seconds",  # of `strategy`, None when there is none
        "result",                    # PLANNED, or SKIPPED with a reason
        "reason",                    # why skipped, "" when planned
    )
    # A plan has reclaimed and frozen nothing yet: its rows of `--now --dry-run --json` say null.
    reclaimed_bytes = None
    frozen_seconds = None

    def __init__(self, vm_uuid, vm_name, vm_power_state, vdi_uuid, vdi_name, format, sr_uuid, sr_type,
                 chain_length, parent_uuid, estimated_bytes, merge_bytes, merge_free_bytes, result,
                 strategy="", fallbacks=(), predicted_freeze_seconds=None, reason=""):
        self.vm_uuid = vm_uuid
        self.vm_name = vm_name
        self.vm_power_state = vm_power_state
        self.vdi_uuid = vdi_uuid
        self.vdi_name = vdi_name
        self.format = format
        self.sr_uuid = sr_uuid
        self.sr_type = sr_type
        self.chain_length = chain_length
        self.parent_uuid = parent_uuid
        self.estimated_bytes = estimated_bytes
        self.merge_bytes = merge_bytes
        self.merge_free_bytes = merge_free_bytes
        self.strategy = strategy
        self.fallbacks = list(fallbacks)
        self.predicted_freeze_seconds = predicted_freeze_seconds
        self.result = result
        self.reason = reason


class RunRecord(_Record):
    """What running one plan entry came to (or why it was not run); final once recorded."""

    __slots__ = (
        "vm_uuid",
        "vm_name",                   # None when read from the log, which does not keep it
        "vdi_uuid",
        "format",                    # None when read from a log written before it was kept
        "sr_uuid",
        "strategy",                  # the path that ran (or would have)
        "result",                    # one of RUN_RESULTS
        "reason",
        "estimated_bytes",
        "reclaimed_bytes",           # measured by the inspection after the run
        "merge_bytes",               # None when read from the log, which does not keep it
        "frozen_seconds",            # the guest freeze measured (freeze.py), None when nothing ran
        "predicted_freeze_seconds",
        "started",                   # unix time
        "finished",
    )

    def __init__(self, vm_uuid, vdi_uuid, sr_uuid, strategy, result, reason, estimated_bytes, reclaimed_bytes,
                 frozen_seconds, predicted_freeze_seconds, started, finished, vm_name=None, merge_bytes=None,
                 format=None):
        self.vm_uuid = vm_uuid
        self.vm_name = vm_name
        self.vdi_uuid = vdi_uuid
        self.format = format
        self.sr_uuid = sr_uuid
        self.strategy = strategy
        self.result = result
        self.reason = reason
        self.estimated_bytes = estimated_bytes
        self.reclaimed_bytes = reclaimed_bytes
        self.merge_bytes = merge_bytes
        self.frozen_seconds = frozen_seconds
        self.predicted_freeze_seconds = predicted_freeze_seconds
        self.started = started
        self.finished = finished

    @classmethod
    def of(cls, entry, started):
        """The run of a plan entry, with the entry's outcome, before anything is measured."""
        return cls(vm_uuid=entry.vm_uuid, vm_name=entry.vm_name, vdi_uuid=entry.vdi_uuid, format=entry.format,
                   sr_uuid=entry.sr_uuid, strategy=entry.strategy, result=entry.result, reason=entry.reason,
                   estimated_bytes=entry.estimated_bytes, reclaimed_bytes=0, merge_bytes=entry.merge_bytes,
                   frozen_seconds=None, predicted_freeze_seconds=entry.predicted_freeze_seconds,
                   started=started, finished=started)

    def to_log(self):
        """The run's line of `runs.jsonl` (without its newline)."""
        fields = LOG_FIELDS + tuple(name for name in OPTIONAL_LOG_FIELDS if getattr(self, name) is not None)
        return json.dumps({name: getattr(self, name) for name in fields}, sort_keys=True)

    @classmethod
    def from_log(cls, line):
        """The run of one line of `runs.jsonl`; ValueError naming what is wrong with it."""
        fields = json.loads(line)
        if not isinstance(fields, dict):
            raise ValueError("run record is not a JSON object")
        missing = [name for name in LOG_FIELDS if name not in fields]
        if missing:
            raise ValueError("run record lacks {}".format(", ".join(missing)))
        known = LOG_FIELDS + OPTIONAL_LOG_FIELDS
        return cls(**{name: fields[name] for name in known if name in fields})
