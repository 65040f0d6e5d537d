"""The result of one inspection: plain objects shared by the report, the exporter and the runner.

Nothing here does I/O; `to_dict()` gives the stable JSON shape of `--report --json`.
"""

# What an image (VHD or QCOW2) is, as far as leaf coalesce is concerned.
LEAF = "leaf"                            # writable leaf with no parent: nothing to merge
LEAF_COALESCEABLE = "leaf_coalesceable"  # leaf whose parent has no other child: leaf coalesce frees space
SNAPSHOT_PRESENT = "snapshot_present"    # leaf whose parent still has other children (snapshots)
SNAPSHOT = "snapshot"                    # a snapshot VDI sharing its parent, or with none; one alone
                                         # under its parent is leaf_coalesceable, as for SM
HIDDEN_PARENT = "hidden_parent"          # hidden VHD with several children: stays
COALESCEABLE = "coalesceable"            # hidden VHD the GC merges on its own
GARBAGE = "garbage"                      # hidden VHD with no live descendant: the GC deletes it
ORPHAN = "orphan"                        # its parent is missing
EXCLUDED = "excluded"                    # leaf-coalesceable, but excluded by policy
SCAN_ERROR = "scan_error"                # its image (or its parent's) could not be read
NOT_COW = "not_cow"                      # raw VDI, not a copy-on-write image: skipped, never guessed at

STATES = (LEAF, LEAF_COALESCEABLE, SNAPSHOT_PRESENT, SNAPSHOT, HIDDEN_PARENT, COALESCEABLE,
          GARBAGE, ORPHAN, EXCLUDED, SCAN_ERROR, NOT_COW)

# Image formats (VdiReport.format): SM's copy-on-write images, and raw VDIs (NOT_COW).
VHD, QCOW2, RAW = "vhd", "qcow2", "raw"
FORMATS = (VHD, QCOW2, RAW)

MAX_CHAIN_LENGTH = 30


class _Record(object):
    """Keyword-built record with a fixed field list; `to_dict` follows that list.

    Each subclass holds its fields in `__slots__` (thousands of VDI reports per inspection).
    """

    __slots__ = ()
    FIELDS = ()
    _FIELD_SET = frozenset()

    def __init_subclass__(cls, **options):
        super().__init_subclass__(**options)
        cls._FIELD_SET = frozenset(cls.FIELDS)

    def __init__(self, **values):
        if not self._FIELD_SET.issuperset(values):
            raise TypeError("{}: unknown fields {}".format(type(self).__name__, sorted(set(values) - self._FIELD_SET)))
        for name in self.FIELDS:
            setattr(self, name, values.get(name))

    def to_dict(self):
        return {name: _plain(getattr(self, name)) for name in self.FIELDS}

    def __repr__(self):
        return "{}({})".format(type(self).__name__, ", ".join(
            "{}={!r}".format(name, getattr(self, name)) for name in self.FIELDS[:3]))


def _plain(value):
    if isinstance(value, _Record):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


class VdiReport(_Record):
    """One image of an SR (a VDI, or a hidden image that no VDI record names)."""

    FIELDS = (
        "uuid",               # VDI UUID (the image's name)
        "name",               # VDI name_label, "" for VHDs xapi does not know
        "vm_uuid",            # VM using it through a VBD, "" when none
        "vm_name",
        "chain_length",       # VHDs from this one up to its root, itself included
        "state",              # one of STATES
        "reason",             # why not reclaimable, or "" when it is
        "reclaimable_bytes",  # what a leaf coalesce would free now (0 when not leaf-coalesceable)
        "merge_bytes",        # bytes a leaf coalesce copies into the parent
        "merge_free_bytes",   # free space the SR needs before that merge
        "physical_bytes",     # file size, or LV size on LVM SRs
        "virtual_size_bytes",
        "parent_uuid",        # "" for a root
        "hidden",
        "format",             # one of FORMATS
        "gc",                 # SM's GC on this VHD (gcaccount.py): {kind, message, time, figures, source,
                              # signals}, None when neither SMlog nor xapi says anything of it
    )
    __slots__ = FIELDS

    def __init__(self, uuid=None, name=None, vm_uuid=None, vm_name=None, chain_length=None, state=None,
                 reason=None, reclaimable_bytes=None, merge_bytes=None, merge_free_bytes=None, physical_bytes=None,
                 virtual_size_bytes=None, parent_uuid=None, hidden=None, format=None, gc=None):
        """The fields by name, as for every record, spelled out: one report per image, ten thousand
        per inspection, where the generic keyword loop costs more than the rest of the report."""
        self.uuid = uuid
        self.name = name
        self.vm_uuid = vm_uuid
        self.vm_name = vm_name
        self.chain_length = chain_length
        self.state = state
        self.reason = reason
        self.reclaimable_bytes = reclaimable_bytes
        self.merge_bytes = merge_bytes
        self.merge_free_bytes = merge_free_bytes
        self.physical_bytes = physical_bytes
        self.virtual_size_bytes = virtual_size_bytes
        self.parent_uuid = parent_uuid
        self.hidden = hidden
        self.format = format
        self.gc = gc


class SrReport(_Record):
    """One SR this host is responsible for."""

    FIELDS = (
        "uuid",
        "name",
        "type",
        "shared",
        "size_bytes",             # physical_size
        "free_bytes",             # physical_size - physical_utilisation
        "reclaimable_bytes",      # sum over leaf-coalesceable VDIs
        "gc_pending_bytes",       # what the GC's own pending work (garbage, coalesceable) will free
        "merge_free_bytes",       # free space the largest pending leaf merge needs first
        "longest_chain",
        "gc_running",             # SM's GC runs on this SR now (its lock held, or a cleanup process)
        "gc_running_seconds",     # for how long, 0 when not running
        "skipped_vdis",           # raw VDIs (not copy-on-write), counted and left alone
        "errors",                 # per-image scan errors, one line each
        "vdis",                   # [VdiReport]
        "leftover_marks",         # [{vdi_uuid, set, replaced, host, at, leaf_coalesce}]: the agent's marks
                                  # (marks.py) on VDIs, left by an interrupted run or one in progress
        "gc",                     # SM's GC of the SR (gcaccount.py): last_run {started, finished, result,
                                  # merged, errors}, last_success, runs_total, results, failures, signals, ...
    )
    __slots__ = FIELDS

    def state_counts(self):
        counts = dict.fromkeys(STATES, 0)
        for vdi in self.vdis or ():
            counts[vdi.state] += 1
        return counts


class Inspection(_Record):
    """One inspection of the host: what `--report` prints and `/metrics` serves."""

    FIELDS = (
        "host",                   # {"uuid", "name", "product_version"}
        "started",                # unix time
        "duration_seconds",
        "srs",                    # [SrReport]
        "skipped_srs",            # [{"uuid", "name", "type", "reason"}]: not ours, not VHD, detached
        "errors",                 # [{"stage", "message"}]: what went wrong, per stage
        "smlog",                  # the SMlog reader's health (smlogfile.py), None when not read
    )
    __slots__ = FIELDS

    @property
    def reclaimable_bytes(self):
        return sum(sr.reclaimable_bytes for sr in self.srs or ())
