"""`vhd-util scan` output → records → the VHD forest of one SR → a state and a reason per VHD.

Pure: plain text and plain objects in, plain objects out. The rules follow the storage manager's
own (docs/operations.md, "What is stuck"): coalesceable = hidden inner node whose parent has only
it; leaf-coalesceable = visible leaf whose parent has only it, a snapshot VDI included (SM does not
tell snapshots apart there); garbage = hidden with no visible descendant.
"""
import re

from .. import model

FILE_SUFFIX = ".vhd"
LV_PREFIX = "VHD-"
BLOCK_SIZE = 2 * 1024 * 1024

_IMAGE = re.compile(r"^vhd=(?P<name>\S*) capacity=(?P<capacity>\d+) size=(?P<size>\d+) hidden=(?P<hidden>\d+)"
                    r"(?: marker=\d+ keyhash=[0-9a-f]*)? parent=(?P<parent>\S+)$")
_ERROR = re.compile(r"^vhd=(?P<name>.*?) scan-error=(?P<code>-?\d+)(?: error-message='(?P<message>.*)')?$")
_PHANTOM_NAMES = ("", ".")
# The lines of a scan with nothing unusual, each read by one findall: (uuid, capacity, size, hidden,
# parent uuid or "" for none), by file and LVM image names.
_PLAIN_IMAGES = {
    lvm: re.compile(r"^vhd=(?:\S*/)?{prefix}([^\s/]+){suffix} capacity=(\d+) size=(\d+) hidden=(\d+)"
                    r"(?: marker=\d+ keyhash=[0-9a-f]*)? parent=(?:none|(?:\S*/)?{prefix}([^\s/]+){suffix})$".format(
                        prefix=re.escape(LV_PREFIX) if lvm else "", suffix="" if lvm else re.escape(FILE_SUFFIX)), re.M)
    for lvm in (False, True)}
_NON_BLANK_LINE = re.compile(r"^(?=[ \t]*\S)", re.M)


class ScanOutputError(ValueError):
    """A line `vhd-util scan` never prints: the whole scan is not to be trusted."""


class ScanRecord(object):
    """One image of an SR: a line of `vhd-util scan`, or a QCOW2 image (`image_format` "qcow2",
    its qcow2meta.Header in `qcow2`); `error` set when it could not be read."""

    __slots__ = ("uuid", "virtual_size", "size", "hidden", "parent_uuid", "error", "image_format", "qcow2")

    def __init__(self, uuid, virtual_size=0, size=0, hidden=False, parent_uuid="", error="", image_format="vhd",
                 qcow2=None):
        self.uuid = uuid
        self.virtual_size = virtual_size
        self.size = size
        self.hidden = hidden
        self.parent_uuid = parent_uuid
        self.error = error
        self.image_format = image_format
        self.qcow2 = qcow2

    def __repr__(self):
        return "ScanRecord({!r}, hidden={}, parent={!r}{})".format(
            self.uuid, self.hidden, self.parent_uuid, ", error={!r}".format(self.error) if self.error else "")


class Scan(object):
    """The records of one SR's scan, and errors that name no image (one line each)."""

    def __init__(self, records, errors):
        self.records = records
        self.errors = errors


def image_uuid(name, lvm):
    """The VDI UUID an image name stands for (`<uuid>.vhd`, `VHD-<uuid>`), or None."""
    base = name.rstrip("/").rsplit("/", 1)[-1]
    if lvm:
        return base[len(LV_PREFIX):] if base.startswith(LV_PREFIX) and len(base) > len(LV_PREFIX) else None
    return base[:-len(FILE_SUFFIX)] if base.endswith(FILE_SUFFIX) and len(base) > len(FILE_SUFFIX) else None


def parse_scan(text, lvm):
    """Parse `vhd-util scan -f -c` output (file mode, or LVM mode with `-l`).

    A UUID met again (as a parent) and a size met again are the same object: the reports of thousands
    of VHDs keep them.
    """
    known = {}
    plain = _PLAIN_IMAGES[lvm].findall(text)
    if len(plain) == len(_NON_BLANK_LINE.findall(text)):
        capacities = {}
        return Scan([ScanRecord(known.setdefault(uuid, uuid), capacities.setdefault(capacity, int(capacity)),
                                int(size), hidden != "0", known.setdefault(parent, parent))
                     for uuid, capacity, size, hidden, parent in plain], [])
    del plain
    records = []
    errors = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        image = _IMAGE.match(line)
        if image:
            name, capacity, size, hidden, parent = image.groups()
            if name in _PHANTOM_NAMES:
                continue  # the zeroed slot `-c` leaves for a target that failed early: its error line came before
            uuid = image_uuid(name, lvm)
            if uuid is None:
                raise ScanOutputError("line {}: unexpected image name: {}".format(number, _clip(line)))
            # A parent name that names no image of this SR is kept as printed: that parent is missing.
            parent_uuid = "" if parent == "none" else image_uuid(parent, lvm) or parent
            capacity = int(capacity)
            records.append(ScanRecord(known.setdefault(uuid, uuid), known.setdefault(capacity, capacity),
                                      int(size), hidden != "0", known.setdefault(parent_uuid, parent_uuid)))
            continue
        error = _ERROR.match(line)
        if not error:
            raise ScanOutputError("line {}: {}".format(number, _clip(line)))
        message = "scan error {}{}".format(error.group("code"), ": " + error.group("message")
                                           if error.group("message") else "")
        uuid = image_uuid(error.group("name"), lvm)
        if uuid is None:
            errors.append("{}: {}".format(error.group("name") or "(unnamed image)", message))
        else:
            records.append(ScanRecord(uuid, error=message))
    return Scan(records, errors)


def _clip(line):
    printable = "".join(char if char.isprintable() else "?" for char in line)
    return printable if len(printable) <= 120 else printable[:117] + "..."


def bitmap_length(virtual_size):
    """Bytes `vhd-util read -B` prints: one bit per whole 2 MiB block of the virtual size."""
    return (virtual_size // BLOCK_SIZE + 7) // 8


NO_CHILDREN = ()   # a leaf's children: most nodes are leaves, and share it


class Node(object):
    """One VHD in the forest; `uuid` is its record's, kept beside it for the walks up and down chains."""

    __slots__ = ("record", "uuid", "parent", "children", "chain_length")

    def __init__(self, record):
        self.record = record
        self.uuid = record.uuid
        self.parent = None
        self.children = NO_CHILDREN
        self.chain_length = 0


def build_forest(records):
    """Nodes by UUID, linked to parents and children, with the chain length of each."""
    nodes = {}
    for record in records:
        nodes.setdefault(record.uuid, Node(record))
    for node in nodes.values():
        parent = nodes.get(node.record.parent_uuid) if node.record.parent_uuid else None
        if parent is not None:
            node.parent = parent
            if parent.children is NO_CHILDREN:
                parent.children = []
            parent.children.append(node)
    for node in nodes.values():
        _chain_length(node)
    return nodes


def unlink(nodes):
    """Drop the forest's parent and child links, which are reference cycles: unlinked, the forest is
    freed as soon as it is no longer used, not at the next run of the cyclic garbage collector."""
    for node in nodes.values():
        node.parent = None
        node.children = NO_CHILDREN


def _chain_length(node):
    path = []
    seen = set()
    current = node
    while current is not None and not current.chain_length and current.uuid not in seen:
        path.append(current)
        seen.add(current.uuid)
        current = current.parent
    length = current.chain_length if current is not None else 0
    for item in reversed(path):
        length += 1
        item.chain_length = length
    return node.chain_length


class VdiFacts(object):
    """What xapi says about a VDI and its VM, as far as classification and the report care.

    `vm_uuid`, `vm_tags`, `vm_name`: the VM the VDI belongs to: the VM using it, or for a snapshot
    VM's VDI the VM it is a snapshot of ("" when that VM is gone: an orphaned snapshot).
    """

    __slots__ = ("uuid", "is_snapshot", "on_boot", "allow_caching", "leaf_coalesce", "vm_uuid", "vm_tags", "name",
                 "vm_name")

    def __init__(self, uuid, is_snapshot=False, on_boot="persist", allow_caching=False, leaf_coalesce="",
                 vm_uuid="", vm_tags=(), name="", vm_name=""):
        self.uuid = uuid
        self.is_snapshot = is_snapshot
        self.on_boot = on_boot
        self.allow_caching = allow_caching
        self.leaf_coalesce = leaf_coalesce
        self.vm_uuid = vm_uuid
        self.vm_tags = vm_tags
        self.name = name
        self.vm_name = vm_name


class Policy(object):
    """What keeps a leaf-coalesceable VDI out: the SR's switches and the agent's own exclusions."""

    def __init__(self, sr_other_config=None, exclude_vdis=(), exclude_vms=(), exclude_tag=""):
        self.sr_other_config = sr_other_config or {}
        self.exclude_vdis = frozenset(exclude_vdis)
        self.exclude_vms = frozenset(exclude_vms)
        self.exclude_tag = exclude_tag

    def sr_exclusion(self):
        other = self.sr_other_config
        if other.get("leaf-coalesce") == "false":
            return "leaf coalesce is disabled on the SR (other-config:leaf-coalesce=false)"
        for key in ("gc", "coalesce"):
            if other.get(key) == "false":
                return "the GC is disabled on the SR (other-config:{}=false)".format(key)
        return ""

    def vdi_exclusion(self, facts):
        if facts.leaf_coalesce == "false":
            return "leaf coalesce is disabled on the VDI (other-config:leaf-coalesce=false)"
        if facts.on_boot == "reset":
            return "the VDI is reset on boot (on-boot=reset)"
        if facts.allow_caching:
            return "the VDI uses IntelliCache (allow-caching=true)"
        if facts.uuid in self.exclude_vdis:
            return "the VDI is in [coalesce] exclude_vdis"
        if facts.vm_uuid and facts.vm_uuid in self.exclude_vms:
            return "its VM is in [coalesce] exclude_vms"
        if self.exclude_tag and self.exclude_tag in facts.vm_tags:
            return "its VM is tagged {}".format(self.exclude_tag)
        return ""


def classify(nodes, facts, policy):
    """{uuid: (state, reason)} for every node; `facts` holds xapi's view by VDI UUID."""
    live = _with_visible_descendant(nodes)
    sr_exclusion = policy.sr_exclusion()
    return {uuid: _classify_node(node, facts.get(uuid), live, policy, sr_exclusion)
            for uuid, node in nodes.items()}


def _with_visible_descendant(nodes):
    """UUIDs of the VHDs that have a visible (not hidden) VHD somewhere below them."""
    live = set()
    for node in nodes.values():
        if node.record.hidden:
            continue
        current = node.parent
        while current is not None and current.uuid not in live:
            live.add(current.uuid)
            current = current.parent
    return live


def _short(uuid):
    return uuid[:8]


def _classify_node(node, facts, live, policy, sr_exclusion):
    record = node.record
    if record.error:
        if record.image_format == "vhd":
            return model.SCAN_ERROR, "vhd-util could not read it ({})".format(record.error)
        return model.SCAN_ERROR, "its QCOW2 image could not be read: {}".format(record.error)
    if record.parent_uuid and node.parent is None:
        return model.ORPHAN, "its parent {} is missing".format(record.parent_uuid)
    if node.parent is not None and node.parent.record.error:
        return model.SCAN_ERROR, "its parent {} could not be read".format(record.parent_uuid)
    if node.parent is not None and node.parent.record.image_format != record.image_format:
        return model.SCAN_ERROR, "a chain is one format: this {} image's parent {} is {}".format(
            record.image_format.upper(), _short(record.parent_uuid), node.parent.record.image_format.upper())
    if _in_loop(node):
        return model.SCAN_ERROR, "its parent chain loops back on itself"
    if record.hidden:
        return _classify_hidden(node, live)
    if node.children:
        return model.HIDDEN_PARENT, "not hidden, yet parent of {} VHDs".format(len(node.children))
    # SM's leaf-coalesce candidates have no snapshot check: a snapshot VDI that is a leaf whose parent
    # has only it (its VM's disk deleted or moved) is leaf-coalesced like any leaf.
    snapshot = facts is not None and facts.is_snapshot
    if node.parent is None:
        return (model.SNAPSHOT, "a snapshot with no parent: nothing to merge") if snapshot else (
            model.LEAF, "no parent: nothing to merge")
    siblings = len(node.parent.children) - 1
    if siblings:
        return model.SNAPSHOT if snapshot else model.SNAPSHOT_PRESENT, _siblings_reason(node, live, siblings)
    if facts is None:
        return model.EXCLUDED, "xapi has no VDI for it (deleted during the inspection?)"
    exclusion = sr_exclusion or policy.vdi_exclusion(facts)
    if exclusion:
        return model.EXCLUDED, exclusion
    return model.LEAF_COALESCEABLE, ""


def _siblings_reason(node, live, siblings):
    garbage = sum(1 for child in node.parent.children if child is not node and child.uuid not in live
                  and child.record.hidden)
    if garbage == siblings:
        return "its parent still has {} garbage {}; the GC deletes {} first".format(
            siblings, "child" if siblings == 1 else "children", "it" if siblings == 1 else "them")
    return "its parent {} is shared with {} other {} (snapshots)".format(
        _short(node.parent.uuid), siblings, "VHD" if siblings == 1 else "VHDs")


def _in_loop(node):
    seen = set()
    current = node
    while current is not None:
        if current.uuid in seen:
            return True
        seen.add(current.uuid)
        current = current.parent
    return False


def _classify_hidden(node, live):
    if node.uuid not in live:
        return model.GARBAGE, "hidden with no VDI left below it: the GC deletes it"
    if len(node.children) == 1 and node.parent is not None and len(node.parent.children) == 1:
        return model.COALESCEABLE, "the GC merges it into its parent {} on its own".format(_short(node.parent.uuid))
    if node.parent is None:
        return model.HIDDEN_PARENT, "base of the chain, shared by {} VHDs".format(len(node.children)) \
            if len(node.children) > 1 else "base of the chain"
    if len(node.children) > 1:
        return model.HIDDEN_PARENT, "shared by {} VHDs".format(len(node.children))
    return model.HIDDEN_PARENT, "its parent {} is shared with other VHDs".format(_short(node.parent.uuid))
