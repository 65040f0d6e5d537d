"""One inspection of this host: its SRs; the VMs using each VDI; then per SR: scan (`vhd-util` for
VHDs, qcow2images for QCOW2 images) → that SR's VDI records → classify → estimate.

Memory holds the VDI users of the host, the reports made so far and one SR's scan and VDI
records at a time, whatever the number of SRs. Per-SR and per-image failures are recorded in the
result; only an unreachable xapi or `vhd-util` raises. Where the images are and how their block
bitmaps are read: srimages; xapi's word on the GC: gcsignals.
"""
import contextlib
import gc
import os
import time

from .. import model, progress
from . import estimate, gcaccount, gcsignals, inventory, marks, qcow2images, qcow2meta, smgc, smlogfile, srimages
from . import vhdtree, vhdutil, xapi
from ..errors import HostUnreachable
from .srimages import FILE_SR_TYPES, LVM_SR_TYPES, BitmapCache


NOT_COW_TYPES = {"aio": "raw", "raw": "raw"}
VHD_BLOCKS = "vhd-blocks"   # SM's sm_config key: a hidden LVM parent's bitmap (VHD or QCOW2), or "skipped"

# The fields an inspection reads of each class: only these are decoded from xapi's answers.
RECORD_FIELDS = {
    "pool": ("master",),
    "host": ("uuid", "name_label", "software_version"),
    "SR": ("uuid", "name_label", "type", "shared", "physical_size", "physical_utilisation", "other_config",
           "sm_config"),
    "PBD": ("host", "SR", "currently_attached"),
    "VDI": ("uuid", "name_label", "location", "is_a_snapshot", "on_boot", "allow_caching", "other_config",
            "sm_config"),
    "VBD": ("VM", "VDI"),
    "VM": ("uuid", "name_label", "tags", "is_a_snapshot", "snapshot_of"),
}
# Only disks (a VM's CD drives hold ISOs, never the SRs' images) and only guests (no control domain):
# xapi filters the records, which are then neither sent nor read.
DISK_VBDS = 'field "type" = "Disk"'
GUEST_VMS = 'field "is_control_domain" = "false"'
# What only a raw VDI's report shows (an image's sizes come from its scan): read for SRs that have raw VDIs.
RAW_VDI_FIELDS = ("physical_utilisation", "virtual_size")


BITMAPS = BitmapCache()


def inspect(config, tools=None, bitmaps=None):
    """Inspect this host's SRs; `tools` (a VhdUtil) and `bitmaps` may be given to reuse them.

    The tools' shell starts first, while this process is smallest (toolshell.py)."""
    started = time.time()
    host_uuid = inventory.host_uuid(config.xapi.inventory)
    own_tools = tools is None
    tools = vhdutil.VhdUtil(config) if own_tools else tools
    bitmaps = BITMAPS if bitmaps is None else bitmaps
    try:
        tools.start()
        with _without_cyclic_collection(), xapi.open_session(config) as session:
            result = _Inspector(config, session, tools, bitmaps).run(host_uuid)
    finally:
        if own_tools:
            tools.close()
    bitmaps.prune()
    result.started = started
    result.duration_seconds = time.time() - started
    return result


@contextlib.contextmanager
def _without_cyclic_collection():
    """An inspection allocates hundreds of thousands of objects and leaves no cycles (forests are
    unlinked): the cyclic collector would only walk the live reports, the previous inspection's
    among them, again and again."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def select_srs(host_ref, is_master, srs, pbds):
    """([(ref, record)] of the SRs this host inspects, [skipped {uuid, name, type, reason}])."""
    attached_here = set()
    hosts_of = {}
    for pbd in pbds.values():
        hosts_of.setdefault(pbd["SR"], set()).add(pbd["host"])
        if pbd["host"] == host_ref and pbd["currently_attached"]:
            attached_here.add(pbd["SR"])
    ours, skipped = [], []
    for ref, sr in sorted(srs.items(), key=lambda item: (item[1]["name_label"], item[1]["uuid"])):
        reason = ""
        if sr["type"] not in FILE_SR_TYPES + LVM_SR_TYPES:
            reason = "type {} does not hold VHDs".format(sr["type"])
        elif sr["shared"] and not is_master:
            reason = "shared SR: the pool master inspects it"
        elif not sr["shared"] and host_ref not in hosts_of.get(ref, ()):
            reason = "local to another host"
        elif ref not in attached_here:
            reason = "not attached on this host"
        if reason:
            skipped.append({"uuid": sr["uuid"], "name": sr["name_label"], "type": sr["type"], "reason": reason})
        else:
            ours.append((ref, sr))
    return ours, skipped


class _Vm(object):
    """What an inspection keeps of one VM record: thousands of them, so no dict each."""

    __slots__ = ("uuid", "name", "tags", "is_snapshot", "snapshot_of")

    def __init__(self, record):
        self.uuid = record.get("uuid", "")
        self.name = record.get("name_label", "")
        self.tags = tuple(record.get("tags") or ())
        self.is_snapshot = bool(record.get("is_a_snapshot"))
        self.snapshot_of = record.get("snapshot_of", "") if self.is_snapshot else ""


NO_VM = _Vm({})


def vdi_users(vbds, vms):
    """{VDI ref: _Vm} of the VM each VDI belongs to: the VM using it, preferring a real VM over a
    snapshot; a snapshot VM's VDIs belong to the VM it is a snapshot of (its exclusions cover its
    snapshots), or, once that VM is gone, to the snapshot VM itself: what `xe snapshot-list` still
    shows an administrator, and what they would exclude.

    `vbds` is any iterable of disk VBD records (xapi's stream of them: none is kept), `vms` {ref: _Vm}
    of the guests: a VBD of any other VM (the control domain's) is left out.
    """
    users = {}
    vm_of, user_of = vms.get, users.get
    for vbd in vbds:
        vm = vm_of(vbd["VM"])
        if vm is None:
            continue
        vdi = vbd["VDI"]
        current = user_of(vdi)
        if current is None or (current.is_snapshot and not vm.is_snapshot):
            users[vdi] = vm
    return {ref: vms.get(vm.snapshot_of, vm) if vm.is_snapshot else vm for ref, vm in users.items()}


# One string object for each value of the enum, rather than one per VDI.
_ON_BOOT = {"persist": "persist", "reset": "reset"}


def _is_true(value):
    return value is True or (value is not False and str(value).lower() == "true")


class _Inspector(object):
    """The state of one inspection, spread over the SRs it covers."""

    def __init__(self, config, session, tools, bitmaps):
        self.config = config
        self.session = session
        self.tools = tools
        self.errors = []
        self.images = srimages.SrImages(config, tools, bitmaps, self.error)
        self.signals = gcaccount.empty_signals()

    def records(self, class_name, where=None, fields=None):
        """(ref, record) of `class_name` from xapi, with only the fields an inspection reads."""
        return xapi.iter_records(self.config, self.session, class_name, fields or RECORD_FIELDS[class_name], where)

    def run(self, host_uuid):
        pools, hosts = dict(self.records("pool")), dict(self.records("host"))
        srs, pbds = dict(self.records("SR")), dict(self.records("PBD"))
        host_ref = next((ref for ref, host in hosts.items() if host["uuid"] == host_uuid), None)
        if host_ref is None:
            raise HostUnreachable("xapi at {} does not know this host {} (from {})".format(
                self.config.xapi.socket, host_uuid, self.config.xapi.inventory))
        master = next(iter(pools.values()), {}).get("master")
        ours, skipped = select_srs(host_ref, master == host_ref, srs, pbds)
        users = self.vdi_users()
        gcs = smgc.running_gcs(self.config, [sr["uuid"] for _, sr in ours])
        reports = []
        for number, (ref, sr) in enumerate(ours, 1):
            progress.step("inspecting SR {}/{} {}".format(number, len(ours), sr["name_label"]))
            reports.append(self.sr_report(ref, sr, users, gcs.get(sr["uuid"])))
        progress.done()
        host = hosts[host_ref]
        result = model.Inspection(
            host={"uuid": host["uuid"], "name": host["name_label"],
                  "product_version": (host.get("software_version") or {}).get("product_version", "")},
            srs=reports, skipped_srs=skipped, errors=self.errors)
        log, health = smlogfile.read(self.config)
        result.smlog = dict(health, lines=dict(log.state["lines"]))
        problem = gcsignals.read(self.session, ours, self.signals)
        if problem:
            self.errors.append({"stage": "gc-signals", "message": problem})
        gcaccount.apply(result, log.state, self.signals)
        return result

    def vdi_users(self):
        """`vdi_users` of xapi's VMs and VBDs: the VBD records are folded in as they stream."""
        vms = {ref: _Vm(record) for ref, record in self.records("VM", GUEST_VMS)}
        return vdi_users((record for _, record in self.records("VBD", DISK_VBDS)), vms)

    def error(self, stage, sr, message):
        self.errors.append({"stage": stage, "message": "SR {} ({}): {}".format(sr["name_label"], sr["uuid"], message)})

    def scan(self, sr):
        try:
            if sr["type"] in LVM_SR_TYPES:
                return self.tools.scan_lvm_sr(sr["uuid"])
            return self.tools.scan_file_sr(os.path.join(self.config.storage.sr_mount_dir, sr["uuid"]))
        except vhdutil.VhdUtilError as error:
            self.error("scan", sr, str(error))
            return error

    def join_vdis(self, sr_ref, users, report):
        """({image: VdiFacts}, [reports of raw VDIs], {image: vhd-blocks}) of the SR's VDI records
        (vhd-blocks: SM's `sm_config:vhd-blocks`, kept on LVM SRs only).

        The records stream from xapi and go: only what classification and the report use is kept.
        """
        facts, raw, vhd_blocks = {}, {}, {}
        lvm = report.type in LVM_SR_TYPES
        no_map = {}
        of_sr = 'field "SR" = "{}"'.format(sr_ref)
        for vdi_ref, vdi in self.records("VDI", of_sr):
            vm = users.get(vdi_ref, NO_VM)
            other_config = vdi.get("other_config") or no_map
            if other_config and marks.VDI_MARK_KEY in other_config:
                report.leftover_marks.append(marks.reported_mark(vdi["uuid"], other_config))
            sm_config = vdi.get("sm_config") or no_map
            vdi_type = sm_config.get("vdi_type", "vhd")
            if vdi_type in NOT_COW_TYPES:
                report.skipped_vdis += 1
                raw[vdi_ref] = (vdi, vm, NOT_COW_TYPES[vdi_type])
                continue
            uuid = vdi["uuid"]
            location = vdi.get("location")
            image_uuid = uuid if location == uuid else location or uuid  # one string where they are equal
            if sm_config.get(gcaccount.GC_NO_SPACE_KEY):
                self.signals.vdi_no_space[image_uuid] = sm_config[gcaccount.GC_NO_SPACE_KEY]
            leaf_flag = other_config.get(marks.LEAF_COALESCE_KEY, "")
            if leaf_flag:
                self.signals.leaf_coalesce[image_uuid] = leaf_flag
            if lvm and VHD_BLOCKS in sm_config:
                vhd_blocks[image_uuid] = sm_config[VHD_BLOCKS]
            on_boot = vdi.get("on_boot", "persist")
            facts[image_uuid] = vhdtree.VdiFacts(
                uuid, _is_true(vdi.get("is_a_snapshot")), _ON_BOOT.get(on_boot, on_boot),
                _is_true(vdi.get("allow_caching")), leaf_flag, vm.uuid, vm.tags, vdi["name_label"], vm.name)
        return facts, self.raw_reports(of_sr, raw), vhd_blocks

    def raw_reports(self, of_sr, raw):
        """The reports of an SR's raw VDIs ({ref: (record, _Vm, kind)}), their sizes read from xapi
        in a second pass over the SR's records only when it has some (one gone by then shows 0)."""
        if not raw:
            return []
        sizes = {ref: record for ref, record in self.records("VDI", of_sr, RAW_VDI_FIELDS) if ref in raw}
        return [_not_cow_report(vdi, sizes.get(ref, {}), vm, kind) for ref, (vdi, vm, kind) in raw.items()]

    def sr_report(self, ref, sr, users, gc_seconds):
        """The SR's report: its scan first, then xapi's VDI records of that SR only, joined."""
        scan = self.scan(sr)
        size = int(sr["physical_size"])
        report = model.SrReport(
            uuid=sr["uuid"], name=sr["name_label"], type=sr["type"], shared=bool(sr["shared"]),
            size_bytes=size, free_bytes=size - int(sr["physical_utilisation"]),
            reclaimable_bytes=0, gc_pending_bytes=0, merge_free_bytes=0, longest_chain=0,
            gc_running=gc_seconds is not None, gc_running_seconds=gc_seconds or 0.0,
            skipped_vdis=0, errors=[], vdis=[], leftover_marks=[])
        facts, reports, vhd_blocks = self.join_vdis(ref, users, report)
        if isinstance(scan, vhdutil.VhdUtilError):
            report.errors.append(str(scan))
            report.vdis = reports
            return report
        report.errors.extend(scan.errors)
        source = self.images.image_source(sr)
        if isinstance(source, Exception):
            report.errors.append("QCOW2 images not listed: {}".format(source))
            source = qcow2images.ImageSource(vg_name=vhdutil.lvm_vg_name(sr["uuid"]))
        with source:
            try:
                records = scan.records + source.records()
            except OSError as error:
                report.errors.append("QCOW2 images not listed: {}".format(
                    os.strerror(error.errno) if error.errno else error))
                records = scan.records
            nodes = vhdtree.build_forest(records)
            self.classify_and_estimate(sr, nodes, facts, vhd_blocks, source, report, reports)
        reports.sort(key=lambda item: (item.vm_name == "", item.vm_name, item.name == "", item.name, item.uuid))
        report.vdis = reports
        vhdtree.unlink(nodes)
        return report

    def classify_and_estimate(self, sr, nodes, facts, vhd_blocks, source, report, reports):
        """A VdiReport per image of the SR's forest, appended to `reports`; the SR's totals."""
        policy = vhdtree.Policy(sr.get("other_config"), self.config.coalesce.exclude_vdis,
                                self.config.coalesce.exclude_vms, self.config.coalesce.exclude_tag)
        states = vhdtree.classify(nodes, facts, policy)
        lvm = sr["type"] in LVM_SR_TYPES
        merging = [node for uuid, node in nodes.items() if states[uuid][0] in (model.LEAF_COALESCEABLE,
                                                                               model.COALESCEABLE)]
        bitmaps = self.images.read_bitmaps(sr, set(merging) | {node.parent for node in merging if _parent_bitmap_used(
            lvm, node, states[node.uuid][0] == model.LEAF_COALESCEABLE)}, vhd_blocks, source)
        unknown = vhdtree.VdiFacts("")   # a hidden image xapi has no VDI for
        for uuid, node in nodes.items():
            state, reason = states[uuid]
            vdi = facts.get(uuid, unknown)
            record = node.record
            vdi_report = model.VdiReport(
                uuid=uuid, name=vdi.name, vm_uuid=vdi.vm_uuid, vm_name=vdi.vm_name,
                chain_length=node.chain_length, state=state, reason=reason,
                reclaimable_bytes=0, merge_bytes=0, merge_free_bytes=0, physical_bytes=record.size,
                virtual_size_bytes=record.virtual_size, parent_uuid=record.parent_uuid,
                hidden=record.hidden, format=record.image_format)
            if record.error:
                report.errors.append("{}: {}".format(uuid, record.error))
            elif state == model.LEAF_COALESCEABLE:
                self.estimate_leaf(sr, node, source, bitmaps, vdi_report, report)
            elif state == model.GARBAGE:
                report.gc_pending_bytes += record.size
            elif state == model.COALESCEABLE:
                merge = self.merge(sr, node, source, bitmaps, report, leaf=False)
                if isinstance(merge, estimate.Estimate):
                    report.gc_pending_bytes += max(0, merge.freed_bytes)
            reports.append(vdi_report)
        report.longest_chain = max([report.longest_chain] + [node.chain_length for node in nodes.values()])

    def estimate_leaf(self, sr, node, source, bitmaps, vdi_report, report):
        merge = self.merge(sr, node, source, bitmaps, report, leaf=True)
        if isinstance(merge, Exception):
            vdi_report.state = model.SCAN_ERROR
            vdi_report.reason = "its block bitmaps could not be read: {}".format(merge)
            return
        vdi_report.reclaimable_bytes = max(0, merge.freed_bytes)
        vdi_report.merge_bytes = merge.merge_bytes
        vdi_report.merge_free_bytes = merge.merge_free_bytes
        report.reclaimable_bytes += vdi_report.reclaimable_bytes
        report.merge_free_bytes = max(report.merge_free_bytes, merge.merge_free_bytes)

    def merge(self, sr, node, source, bitmaps, report, leaf):
        """The Estimate of merging `node` into its parent, or the error that prevented it."""
        lvm = sr["type"] in LVM_SR_TYPES
        child_bitmap = bitmaps[node.uuid]
        parent_bitmap = bitmaps[node.parent.uuid] if _parent_bitmap_used(lvm, node, leaf) else b""
        for error in (child_bitmap, parent_bitmap):
            if isinstance(error, Exception):
                report.errors.append(str(error))
                self.error("bitmap", sr, str(error))
                return error
        child, parent = node.record, node.parent.record
        if child.qcow2:
            return self.qcow2_merge(sr, node, source, child_bitmap, parent_bitmap, report)
        child_blocks = estimate.count_blocks(child_bitmap)
        if lvm and leaf:
            return estimate.lvm_leaf_merge(child.size, parent.size, child.virtual_size, child_blocks)
        new_blocks = estimate.blocks_missing_from_parent(child_bitmap, parent_bitmap)
        if not lvm:
            return estimate.file_merge(child.size, child_blocks, new_blocks)
        return estimate.lvm_inner_merge(child.size, parent.size, child_blocks, new_blocks)

    def qcow2_merge(self, sr, node, source, child_bitmap, parent_bitmap, report):
        """A QCOW2 commit of `node` into its parent: the parent grows by the clusters it lacks (and
        the L2 tables and refcount blocks they need), then the child goes. SM's coalesce size is
        what both images map (popcount of child OR parent) x cluster size, as its live test reads it."""
        child, parent = node.record, node.parent.record
        header = parent.qcow2
        grid = qcow2meta.regrid(child_bitmap, child.qcow2, header.cluster_bits)
        new_clusters, new_tables = estimate.clusters_missing_from_parent(grid, parent_bitmap, header.l2_entries)
        mapped = estimate.count_clusters(grid) + estimate.count_clusters(parent_bitmap) - new_clusters
        if sr["type"] not in LVM_SR_TYPES:
            growth = estimate.qcow2_growth(parent.size, new_clusters, new_tables, header.cluster_size,
                                           header.refcounts_per_block)
            return estimate.qcow2_file_merge(child.size, mapped, header.cluster_size, growth)
        try:
            end = source.image_end(parent.uuid, header)
        except (qcow2meta.Qcow2Error, OSError) as error:
            message = "{}: its end cannot be read: {}".format(parent.uuid, error)
            report.errors.append(message)
            self.error("bitmap", sr, message)
            return qcow2meta.Qcow2Error(message)
        growth = estimate.qcow2_growth(end, new_clusters, new_tables, header.cluster_size, header.refcounts_per_block)
        return estimate.qcow2_lvm_merge(child.size, parent.size, end, mapped, header.cluster_size, growth)


def _parent_bitmap_used(lvm, node, leaf):
    """Whether the estimate of merging `node` reads its parent's bitmap: not for a VHD leaf on an
    LVM SR, whose parent SM inflates to its full size whatever blocks it holds."""
    return not (lvm and leaf and node.record.qcow2 is None)


def _not_cow_report(vdi, sizes, vm, kind):
    return model.VdiReport(
        uuid=vdi["uuid"], name=vdi["name_label"], vm_uuid=vm.uuid, vm_name=vm.name,
        chain_length=0, state=model.NOT_COW, reason="{} VDI: not a copy-on-write image; left alone".format(kind),
        reclaimable_bytes=0, merge_bytes=0, merge_free_bytes=0,
        physical_bytes=int(sizes.get("physical_utilisation") or 0),
        virtual_size_bytes=int(sizes.get("virtual_size") or 0), parent_uuid="", hidden=False, format=model.RAW)
