"""One inspection of this host: its SRs; the VMs using each VDI; then per SR: scan (`vhd-util` for
VHDs, qcow2images for QCOW2 images) → that SR's VDI records → classify → estimate.

Memory holds the VDI users of the host, the reports made so far and one SR's scan and VDI
records at a time, whatever the number of SRs. Per-SR and per-image failures are recorded in the
result; only an unreachable xapi or `vhd-util` raises. Bitmaps of hidden VHDs are cached across
inspections: a hidden VHD changes only when a child is merged into it, which also changes its
children.
"""
import calendar
import contextlib
import gc
import logging
import os
import time
import xmlrpc.client

import XenAPI

from .. import model, progress
from . import estimate, gcaccount, inventory, lvmread, marks, qcow2images
from . import qcow2meta, smgc, smlogfile, vhdmeta, vhdtree, vhdutil, xapi
from ..errors import HostUnreachable

LOG = logging.getLogger(__name__)

FILE_SR_TYPES = ("ext", "nfs", "smb")
LVM_SR_TYPES = ("lvm", "lvmoiscsi", "lvmohba")
NOT_COW_TYPES = {"aio": "raw", "raw": "raw"}
VHD_BLOCKS = "vhd-blocks"   # SM's sm_config key: a hidden LVM parent's bitmap (VHD or QCOW2), or "skipped"
# How far back xapi's messages about the GC are read (the SM_GC_NO_SPACE of an SR is read whatever its age).
GC_MESSAGE_WINDOW_SECONDS = 7 * 86400

# The fields an inspection reads of each class: only these are decoded from xapi's answers.
RECORD_FIELDS = {
    "pool": ("master",),
    "host": ("uuid", "name_label", "software_version"),
    "SR": ("uuid", "name_label", "type", "shared", "physical_size", "physical_utilisation", "other_config",
           "sm_config"),
    "PBD": ("host", "SR", "currently_attached"),
    "VDI": ("uuid", "name_label", "location", "is_a_snapshot", "on_boot", "allow_caching", "other_config",
            "sm_config", "physical_utilisation", "virtual_size"),
    "VBD": ("VM", "VDI", "type"),
    "VM": ("uuid", "name_label", "tags", "is_control_domain", "is_a_snapshot", "snapshot_of"),
}


class BitmapCache(object):
    """Block bitmaps by key; `prune()` after an inspection keeps only the keys it used."""

    def __init__(self):
        self._entries = {}
        self._used = set()

    def get(self, key):
        value = self._entries.get(key)
        if value is not None:
            self._used.add(key)
        return value

    def put(self, key, value):
        self._entries[key] = value
        self._used.add(key)

    def prune(self):
        for key in set(self._entries) - self._used:
            del self._entries[key]
        self._used = set()

    def __len__(self):
        return len(self._entries)


BITMAPS = BitmapCache()


def inspect(config, tools=None, bitmaps=None):
    """Inspect this host's SRs; `tools` (a VhdUtil) and `bitmaps` may be given to reuse them."""
    started = time.time()
    host_uuid = inventory.host_uuid(config.xapi.inventory)
    tools = tools or vhdutil.VhdUtil(config)
    bitmaps = BITMAPS if bitmaps is None else bitmaps
    with _without_cyclic_collection(), xapi.open_session(config) as session:
        result = _Inspector(config, session, tools, bitmaps).run(host_uuid)
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

    __slots__ = ("uuid", "name", "tags", "is_control_domain", "is_snapshot", "snapshot_of")

    def __init__(self, record):
        self.uuid = record.get("uuid", "")
        self.name = record.get("name_label", "")
        self.tags = tuple(record.get("tags") or ())
        self.is_control_domain = bool(record.get("is_control_domain"))
        self.is_snapshot = bool(record.get("is_a_snapshot"))
        self.snapshot_of = record.get("snapshot_of", "") if self.is_snapshot else ""


NO_VM = _Vm({})


def vdi_users(vbds, vms):
    """{VDI ref: _Vm} of the VM each VDI belongs to: the VM using it, preferring a real VM over a
    snapshot; a snapshot VM's VDIs belong to the VM it is a snapshot of (its exclusions cover its
    snapshots), or, once that VM is gone, to the snapshot VM itself: what `xe snapshot-list` still
    shows an administrator, and what they would exclude.

    `vbds` is any iterable of VBD records (xapi's stream of them: none is kept), `vms` {ref: _Vm}.
    """
    users = {}
    for vbd in vbds:
        vm = vms.get(vbd["VM"])
        if vm is None or vm.is_control_domain or vbd.get("type") == "CD":
            continue
        current = users.get(vbd["VDI"])
        if current is None or (current.is_snapshot and not vm.is_snapshot):
            users[vbd["VDI"]] = vm
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
        self.bitmaps = bitmaps
        self.errors = []
        self._volumes = {}   # the current LVM SR's LVs (lvm_volumes)
        self.signals = gcaccount.empty_signals()

    def records(self, class_name, where=None):
        """(ref, record) of `class_name` from xapi, with only the fields an inspection reads."""
        return xapi.iter_records(self.config, self.session, class_name, RECORD_FIELDS[class_name], where)

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
        self.gc_signals(ours)
        gcaccount.apply(result, log.state, self.signals)
        return result

    def gc_signals(self, ours):
        """xapi's word on the GC beside SMlog's: the SRs' messages of the last days (one call), each SR's
        live SM_GC_NO_SPACE, its GC task's progress (one call). The VDIs' flags came with their records."""
        uuids = {sr["uuid"]: ref for ref, sr in ours}
        since = xmlrpc.client.DateTime(time.strftime("%Y%m%dT%H:%M:%SZ",
                                                     time.gmtime(time.time() - GC_MESSAGE_WINDOW_SECONDS)))
        api = self.session.xenapi
        try:
            messages = api.message.get_since(since)
            gc_tasks = api.task.get_all_records_where('field "name__label" = "{}"'.format(smgc.GC_TASK_LABEL))
        except (XenAPI.Failure,) + xapi.TRANSPORT_ERRORS as error:
            self.errors.append({"stage": "gc-signals", "message": "xapi's GC messages and tasks: {}".format(
                xapi.describe(error))})
            return
        for ref, message in messages.items():
            if message.get("cls") == "SR" and message.get("obj_uuid") in uuids:
                self.signals.messages.setdefault(message["obj_uuid"], []).append(
                    dict(message, ref=ref, time=_unix_time(message.get("timestamp"))))
        for _, sr in ours:
            message_ref = (sr.get("sm_config") or {}).get(gcaccount.GC_NO_SPACE_KEY)
            if message_ref:
                message = self.live_message(message_ref, messages)
                if message is not None and message.get("name") == gcaccount.NO_SPACE_MESSAGE:
                    self.signals.sr_no_space[sr["uuid"]] = {"ref": message_ref, "body": message.get("body", ""),
                                                            "time": _unix_time(message.get("timestamp"))}
        by_ref = {ref: uuid for uuid, ref in uuids.items()}
        for task in gc_tasks.values():
            sr_uuid = by_ref.get((task.get("other_config") or {}).get("applies_to"))
            if sr_uuid is not None and task.get("status") == "pending":
                self.signals.task_progress[sr_uuid] = float(task.get("progress") or 0.0)

    def live_message(self, ref, messages):
        """The message `ref` if xapi still has it (SM destroys SM_GC_NO_SPACE once space is back)."""
        if ref in messages:
            return messages[ref]
        try:
            return self.session.xenapi.message.get_record(ref)
        except (XenAPI.Failure,) + xapi.TRANSPORT_ERRORS:
            return None

    def vdi_users(self):
        """`vdi_users` of xapi's VMs and VBDs: the VBD records are folded in as they stream."""
        vms = {ref: _Vm(record) for ref, record in self.records("VM")}
        return vdi_users((record for _, record in self.records("VBD")), vms)

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

    def image_path(self, sr, uuid):
        if sr["type"] in LVM_SR_TYPES:
            return os.path.join(self.config.storage.lvm_device_dir, vhdutil.lvm_vg_name(sr["uuid"]),
                                vhdtree.LV_PREFIX + uuid)
        return os.path.join(self.config.storage.sr_mount_dir, sr["uuid"], uuid + vhdtree.FILE_SUFFIX)

    def lvm_volumes(self, sr):
        """{LV name: lvmread.LogicalVolume} of the SR's volume group: one `vgs` and one `lvs` per SR
        and inspection, or the error that kept them unread (recorded once)."""
        if sr["uuid"] not in self._volumes:
            vg_name = vhdutil.lvm_vg_name(sr["uuid"])
            try:
                extent_size, pe_starts = lvmread.parse_vgs(self.tools.run_lvm("vgs", lvmread.vgs_arguments(vg_name)))
                volumes = lvmread.parse_lvs(self.tools.run_lvm("lvs", lvmread.lvs_arguments(vg_name)),
                                            extent_size, pe_starts)
            except (vhdutil.VhdUtilError, lvmread.LvmReportError) as error:
                self.error("lvs", sr, "its LVs cannot be listed: {}".format(error))
                volumes = error
            self._volumes = {sr["uuid"]: volumes}
        return self._volumes[sr["uuid"]]

    def image_source(self, sr):
        """The qcow2images.ImageSource of the SR, or the error that kept its LVs unlisted."""
        if sr["type"] not in LVM_SR_TYPES:
            return qcow2images.ImageSource(sr_dir=os.path.join(self.config.storage.sr_mount_dir, sr["uuid"]))
        volumes = self.lvm_volumes(sr)
        if isinstance(volumes, Exception):
            return volumes
        return qcow2images.ImageSource(vg_name=vhdutil.lvm_vg_name(sr["uuid"]), volumes=volumes,
                                       device_dir=self.config.storage.lvm_device_dir)

    def read_bitmaps(self, sr, nodes, vhd_blocks, source):
        """{uuid: bitmap, or the exception that kept it unread} of these nodes.

        A hidden image's comes from the cache when it has it; on an LVM SR, a hidden parent's from
        SM's `sm_config:vhd-blocks` when that holds a well-formed bitmap (`vhd_blocks`: {uuid:
        value}). The others are read with the tools (VHD: `vhd-util read -B`; QCOW2: the helper or
        qemu-img) where the image has a path (a file, an LV active here), from the image's own
        tables where it has none (through the PV) or where no QCOW2 tool is installed.
        """
        lvm = sr["type"] in LVM_SR_TYPES
        bitmaps, keys, wanted = {}, {}, {}
        for node in nodes:
            qcow2 = node.record.qcow2
            path = source.path(node.uuid) if qcow2 else self.image_path(sr, node.uuid)
            if node.record.hidden:
                if node.uuid in vhd_blocks:
                    try:
                        bitmaps[node.uuid] = _decode_vhd_blocks(vhd_blocks[node.uuid], node.record)
                        continue
                    except (vhdmeta.VhdMetadataError, qcow2meta.Qcow2Error) as error:
                        LOG.debug("SR %s: %s: %s; reading the image instead", sr["uuid"], node.uuid, error)
                keys[node.uuid] = self.cache_key(sr, node, path, lvm)
                cached = self.bitmaps.get(keys[node.uuid]) if keys[node.uuid] is not None else None
                if cached is not None:
                    bitmaps[node.uuid] = cached
                    continue
            wanted[path] = node
        vhds = {path: node for path, node in wanted.items() if not node.record.qcow2}
        read = self.read_vhd_bitmaps(sr, vhds, lvm)
        read.update((path, self.read_qcow2_bitmap(source, node)) for path, node in sorted(wanted.items())
                    if node.record.qcow2)
        for path, node in wanted.items():
            bitmaps[node.uuid] = read[path]
            if keys.get(node.uuid) is not None and not isinstance(read[path], Exception):
                self.bitmaps.put(keys[node.uuid], read[path])
        return bitmaps

    def read_vhd_bitmaps(self, sr, wanted, lvm):
        """{path: bitmap or exception} of VHDs: `read -B` where the path exists, else the PV."""
        on_device = sorted(path for path in wanted if not lvm or os.path.exists(path))
        read = self.tools.read_bitmaps([(path, wanted[path].record.virtual_size) for path in on_device])
        missed = {node.uuid: read.get(path) for path, node in wanted.items()
                  if path not in read or isinstance(read[path], Exception)}
        if lvm and missed:
            read.update(self.read_through_pv(sr, {uuid: (self.image_path(sr, uuid), error)
                                                  for uuid, error in missed.items()}, wanted))
        return read

    def read_qcow2_bitmap(self, source, node):
        """A QCOW2 image's own cluster bitmap, or the exception that kept it unread."""
        header = node.record.qcow2
        try:
            if source.on_device(node.uuid):
                bitmap = self.tools.qcow2_bitmap(source.path(node.uuid), header)
                if bitmap is not None:
                    return bitmap
            return source.bitmap(node.uuid, header)
        except vhdutil.VhdUtilError as error:
            return error
        except qcow2meta.Qcow2Error as error:
            return qcow2meta.Qcow2Error("{}: {}".format(node.uuid, error))
        except OSError as error:
            return qcow2meta.Qcow2Error("{}: cannot be read: {}".format(
                node.uuid, os.strerror(error.errno) if error.errno else error))

    def cache_key(self, sr, node, path, lvm):
        """What a hidden image's cached bitmap is kept under: it changes when a child merges into it.

        A file's mtime is part of it; an LV's device (when there is one) has no meaningful mtime.
        """
        try:
            stamp = None if lvm else os.stat(path).st_mtime_ns
        except OSError:
            return None
        return (sr["uuid"], node.uuid, node.record.size, stamp, tuple(sorted(child.uuid for child in node.children)))

    def read_through_pv(self, sr, missed, wanted):
        """{path: bitmap or exception} of LVs `read -B` did not read ({uuid: (path, its error or None)}).

        The SR's `lvs` and `vgs`; an LV that `lvs` shows active here keeps the error of `read -B` on
        its device, the others are read from their PV extents.
        """
        vg_name = vhdutil.lvm_vg_name(sr["uuid"])
        volumes = self.lvm_volumes(sr)
        if isinstance(volumes, Exception):
            return {path: error_ or volumes for path, error_ in missed.values()}
        results = {}
        with lvmread.PhysicalVolumes() as physical:
            for uuid, (path, device_error) in sorted(missed.items()):
                lv = volumes.get(vhdtree.LV_PREFIX + uuid)
                if device_error is not None and (lv is None or lv.active):
                    results[path] = device_error
                elif lv is None:
                    results[path] = vhdmeta.VhdMetadataError("{}{}: no such LV in `lvs` {}".format(
                        vhdtree.LV_PREFIX, uuid, vg_name))
                else:
                    try:
                        results[path] = lvmread.read_bitmap(physical, lv, wanted[path].record.virtual_size)
                    except vhdmeta.VhdMetadataError as error:
                        results[path] = error
        return results

    def join_vdis(self, sr_ref, users, report):
        """({image: VdiFacts}, {image: (name, _Vm)}, [reports of raw VDIs], {image: vhd-blocks}) of
        the SR's VDI records (vhd-blocks: SM's `sm_config:vhd-blocks`, kept on LVM SRs only).

        The records stream from xapi and go: only what classification and the report use is kept.
        """
        facts, names, reports, vhd_blocks = {}, {}, [], {}
        lvm = report.type in LVM_SR_TYPES
        no_map = {}
        for vdi_ref, vdi in self.records("VDI", 'field "SR" = "{}"'.format(sr_ref)):
            vm = users.get(vdi_ref, NO_VM)
            other_config = vdi.get("other_config") or no_map
            if other_config and marks.VDI_MARK_KEY in other_config:
                report.leftover_marks.append(marks.reported_mark(vdi["uuid"], other_config))
            sm_config = vdi.get("sm_config") or no_map
            vdi_type = sm_config.get("vdi_type", "vhd")
            if vdi_type in NOT_COW_TYPES:
                report.skipped_vdis += 1
                reports.append(_not_cow_report(vdi, vm, NOT_COW_TYPES[vdi_type]))
                continue
            image_uuid = vdi.get("location") or vdi["uuid"]
            names[image_uuid] = (vdi["name_label"], vm)
            if sm_config.get(gcaccount.GC_NO_SPACE_KEY):
                self.signals.vdi_no_space[image_uuid] = sm_config[gcaccount.GC_NO_SPACE_KEY]
            leaf_flag = other_config.get(marks.LEAF_COALESCE_KEY, "")
            if leaf_flag:
                self.signals.leaf_coalesce[image_uuid] = leaf_flag
            if lvm and VHD_BLOCKS in sm_config:
                vhd_blocks[image_uuid] = sm_config[VHD_BLOCKS]
            on_boot = vdi.get("on_boot", "persist")
            facts[image_uuid] = vhdtree.VdiFacts(
                vdi["uuid"], _is_true(vdi.get("is_a_snapshot")), _ON_BOOT.get(on_boot, on_boot),
                _is_true(vdi.get("allow_caching")), leaf_flag, vm.uuid, vm.tags)
        return facts, names, reports, vhd_blocks

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
        facts, names, reports, vhd_blocks = self.join_vdis(ref, users, report)
        if isinstance(scan, vhdutil.VhdUtilError):
            report.errors.append(str(scan))
            report.vdis = reports
            return report
        report.errors.extend(scan.errors)
        source = self.image_source(sr)
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
            self.classify_and_estimate(sr, nodes, facts, names, vhd_blocks, source, report, reports)
        reports.sort(key=lambda item: (item.vm_name == "", item.vm_name, item.name == "", item.name, item.uuid))
        report.vdis = reports
        vhdtree.unlink(nodes)
        return report

    def classify_and_estimate(self, sr, nodes, facts, names, vhd_blocks, source, report, reports):
        """A VdiReport per image of the SR's forest, appended to `reports`; the SR's totals."""
        policy = vhdtree.Policy(sr.get("other_config"), self.config.coalesce.exclude_vdis,
                                self.config.coalesce.exclude_vms, self.config.coalesce.exclude_tag)
        states = vhdtree.classify(nodes, facts, policy)
        merging = [node for uuid, node in nodes.items() if states[uuid][0] in (model.LEAF_COALESCEABLE,
                                                                               model.COALESCEABLE)]
        bitmaps = self.read_bitmaps(sr, set(merging) | {node.parent for node in merging}, vhd_blocks, source)
        unnamed = ("", NO_VM)
        for uuid, node in nodes.items():
            state, reason = states[uuid]
            name, vm = names.get(uuid, unnamed)
            record = node.record
            vdi_report = model.VdiReport(
                uuid=uuid, name=name, vm_uuid=vm.uuid, vm_name=vm.name,
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
        child_bitmap, parent_bitmap = bitmaps[node.uuid], bitmaps[node.parent.uuid]
        for error in (child_bitmap, parent_bitmap):
            if isinstance(error, Exception):
                report.errors.append(str(error))
                self.error("bitmap", sr, str(error))
                return error
        child, parent = node.record, node.parent.record
        lvm = sr["type"] in LVM_SR_TYPES
        if child.qcow2:
            return self.qcow2_merge(sr, node, source, child_bitmap, parent_bitmap, report)
        child_blocks = estimate.count_blocks(child_bitmap)
        new_blocks = estimate.blocks_missing_from_parent(child_bitmap, parent_bitmap)
        if not lvm:
            return estimate.file_merge(child.size, child_blocks, new_blocks)
        if leaf:
            return estimate.lvm_leaf_merge(child.size, parent.size, child.virtual_size, child_blocks)
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


def _decode_vhd_blocks(value, record):
    """SM's `sm_config:vhd-blocks` of a hidden image, in the bitmap order its format's reader gives."""
    if record.qcow2 is None:
        return vhdmeta.decode_vhd_blocks(value, record.virtual_size)
    if not record.qcow2.whole_helper_bitmap():
        raise qcow2meta.Qcow2Error("sm-config:vhd-blocks leaves out the last clusters of this image")
    return qcow2meta.decode_vhd_blocks(value, record.qcow2)


def _unix_time(value):
    """Unix time of an xapi date (`20240102T16:01:16Z`), None when it is not one."""
    text = getattr(value, "value", value)
    try:
        return float(calendar.timegm(time.strptime(str(text).replace("-", ""), "%Y%m%dT%H:%M:%SZ")))
    except ValueError:
        return None


def _not_cow_report(vdi, vm, kind):
    return model.VdiReport(
        uuid=vdi["uuid"], name=vdi["name_label"], vm_uuid=vm.uuid, vm_name=vm.name,
        chain_length=0, state=model.NOT_COW, reason="{} VDI: not a copy-on-write image; left alone".format(kind),
        reclaimable_bytes=0, merge_bytes=0, merge_free_bytes=0,
        physical_bytes=int(vdi.get("physical_utilisation") or 0), virtual_size_bytes=int(vdi.get("virtual_size") or 0),
        parent_uuid="", hidden=False, format=model.RAW)
