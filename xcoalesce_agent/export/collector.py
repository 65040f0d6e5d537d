"""Prometheus metrics from the last inspection, the run history and the agent's own health.

Nothing here calls xapi or runs a tool: a scrape renders what the service already holds, so it is
cheap however often Prometheus comes. The inspection's families (per SR and per VDI, thousands of
samples on a big host) are rendered once per inspection and the bytes kept, the run counters and
health when they change; only the process metrics are rendered at each scrape (`Exposition`).
docs/metrics.md lists every metric.
"""
import gzip
import platform
import threading

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import generate_latest

from .. import __version__, model
from ..inspect import gcaccount, smlogrules
from ..reclaim import history

SR_LABELS = ("host", "sr_uuid", "sr_name", "sr_type")
VDI_LABELS = ("host", "sr_uuid", "vdi_uuid", "vm_uuid", "vm_name")
COW_FORMATS = (model.VHD, model.QCOW2)

# VHDs a VM writes to: the ones whose chain length matters (snapshots and hidden parents are left
# out to bound the number of series).
LEAF_STATES = (model.LEAF, model.LEAF_COALESCEABLE, model.SNAPSHOT_PRESENT, model.EXCLUDED)

_FREEZE_BOUNDS = [repr(bound) for bound in history.FREEZE_BUCKETS] + ["+Inf"]

# GC outcomes that keep a chain unmerged (every kind but `merged`); failures counted per kind.
BLOCKING_KINDS = tuple(kind for kind in smlogrules.KINDS if kind != smlogrules.MERGED)
GC_RESULTS = tuple(result for result in smlogrules.RESULTS if result != smlogrules.RUNNING)


class AgentStatus(object):
    """What the service knows about itself; written by the inspection thread, read by scrapes.

    `host` labels the metrics until an inspection names the host; the error counters of `stages`
    start at 0, so that their first increase shows.
    """

    def __init__(self, host="", stages=()):
        self._lock = threading.Lock()
        self._host = host
        self._inspection = None
        self._last_success = None
        self._xapi_reachable = None
        self._errors = dict.fromkeys(stages, 0)
        self._inspections = {"success": 0, "failure": 0}
        self._generation = 0

    def succeeded(self, inspection, finished):
        """A finished inspection (its per-stage errors included) becomes the one served."""
        with self._lock:
            self._inspection = inspection
            self._host = (inspection.host or {}).get("name") or self._host
            self._last_success = finished
            self._xapi_reachable = True
            self._inspections["success"] += 1
            for error in inspection.errors or ():
                self._count_error(error["stage"])
            self._generation += 1

    def failed(self, stage, xapi_reachable=None):
        """An inspection that produced nothing: the last good one stays served."""
        with self._lock:
            self._inspections["failure"] += 1
            self._count_error(stage)
            if xapi_reachable is not None:
                self._xapi_reachable = xapi_reachable
            self._generation += 1

    def _count_error(self, stage):
        self._errors[stage] = self._errors.get(stage, 0) + 1

    @property
    def inspection(self):
        return self._inspection

    @property
    def generation(self):
        """Grows with every change."""
        return self._generation

    def snapshot(self):
        """A consistent copy of the health fields, as a dict."""
        with self._lock:
            return {
                "host": self._host,
                "inspection": self._inspection,
                "last_success": self._last_success,
                "xapi_reachable": self._xapi_reachable,
                "errors": dict(self._errors),
                "inspections": dict(self._inspections),
            }


def _gauge(name, documentation, labels):
    return GaugeMetricFamily(name, documentation, labels=labels)


def _sr_labels(host, sr):
    return [host, sr.uuid or "", sr.name or "", sr.type or ""]


def _vdi_labels(host, sr, vdi):
    return [host, sr.uuid or "", vdi.uuid or "", vdi.vm_uuid or "", vdi.vm_name or ""]


class InspectionCollector(object):
    """The families of one inspection: SR space, chains, VHD states, GC, per-VDI reclaimable bytes."""

    def __init__(self, inspection):
        self._inspection = inspection

    def collect(self):
        inspection = self._inspection
        host = (inspection.host or {}).get("name") or ""
        srs = inspection.srs or ()
        sr_families = (
            ("xcoalesce_sr_size_bytes", "Size of the SR (physical_size).", "size_bytes"),
            ("xcoalesce_sr_free_bytes", "Free space on the SR (physical_size - physical_utilisation).",
             "free_bytes"),
            ("xcoalesce_sr_reclaimable_bytes", "Bytes a leaf coalesce of every leaf-coalesceable VDI on the SR "
             "would free now.", "reclaimable_bytes"),
            ("xcoalesce_sr_gc_pending_bytes", "Bytes the SR's garbage collector frees on its own "
             "(garbage VHDs, coalesceable hidden VHDs).", "gc_pending_bytes"),
            ("xcoalesce_sr_merge_required_free_bytes", "Free space the largest pending leaf merge on the SR "
             "needs before it can run.", "merge_free_bytes"),
            ("xcoalesce_sr_chain_length_max", "Longest VHD chain on the SR (the storage manager's limit is "
             "{}).".format(model.MAX_CHAIN_LENGTH), "longest_chain"),
            ("xcoalesce_sr_gc_running_seconds", "How long the SR's garbage collector had been running at the "
             "last inspection, 0 when not running.", "gc_running_seconds"),
        )
        for name, documentation, field in sr_families:
            family = _gauge(name, documentation, SR_LABELS)
            for sr in srs:
                family.add_metric(_sr_labels(host, sr), getattr(sr, field) or 0)
            yield family

        info = _gauge("xcoalesce_sr_info", "SRs this host inspects (value 1); join on sr_uuid for names.",
                      SR_LABELS + ("shared",))
        running = _gauge("xcoalesce_sr_gc_running", "1 when the SR's garbage collector was running at the last "
                         "inspection (SM's GC lock held, or a cleanup process).", SR_LABELS)
        skipped = _gauge("xcoalesce_sr_skipped_vdis", "Raw VDIs on the SR (not copy-on-write images), left alone.",
                         SR_LABELS)
        by_format = _gauge("xcoalesce_sr_reclaimable_by_format_bytes", "Bytes a leaf coalesce of every "
                           "leaf-coalesceable VDI on the SR would free now, by image format (vhd, qcow2).",
                           SR_LABELS + ("format",))
        scan_errors = _gauge("xcoalesce_sr_scan_errors", "Images on the SR that vhd-util or the QCOW2 reader "
                             "could not read at the last inspection.", SR_LABELS)
        states = _gauge("xcoalesce_sr_vhds", "Images (VHD, QCOW2) on the SR by leaf-coalesce state.",
                        SR_LABELS + ("state",))
        marked = _gauge("xcoalesce_leftover_marks", "VDIs on the SR carrying the agent's mark of a leaf-coalesce "
                        "flag it set and has not undone: left by an interrupted run (or a run in progress).",
                        SR_LABELS)
        for sr in srs:
            labels = _sr_labels(host, sr)
            info.add_metric(labels + ["true" if sr.shared else "false"], 1)
            running.add_metric(labels, 1 if sr.gc_running else 0)
            skipped.add_metric(labels, sr.skipped_vdis or 0)
            for image_format in COW_FORMATS:
                by_format.add_metric(labels + [image_format], sum(
                    vdi.reclaimable_bytes or 0 for vdi in sr.vdis or () if (vdi.format or model.VHD) == image_format))
            scan_errors.add_metric(labels, len(sr.errors or ()))
            marked.add_metric(labels, len(sr.leftover_marks or ()))
            counts = sr.state_counts()
            for state in model.STATES:
                states.add_metric(labels + [state], counts[state])
        for family in (info, running, skipped, by_format, scan_errors, states, marked):
            yield family

        reclaimable = _gauge("xcoalesce_vdi_reclaimable_bytes", "Bytes a leaf coalesce of the VDI would free "
                             "now; only VDIs with something to reclaim.", VDI_LABELS + ("format",))
        chains = _gauge("xcoalesce_vdi_chain_length", "VHDs from the VDI up to its root, itself included; "
                        "VDIs a VM writes to (leaves) only.", VDI_LABELS)
        for sr in srs:
            for vdi in sr.vdis or ():
                if vdi.reclaimable_bytes:
                    reclaimable.add_metric(_vdi_labels(host, sr, vdi) + [vdi.format or model.VHD],
                                           vdi.reclaimable_bytes)
                if vdi.state in LEAF_STATES and not vdi.hidden:
                    chains.add_metric(_vdi_labels(host, sr, vdi), vdi.chain_length or 0)
        yield reclaimable
        yield chains
        for family in _gc_families(host, srs):
            yield family
        for family in _smlog_families(host, inspection.smlog):
            yield family

        duration = _gauge("xcoalesce_inspection_duration_seconds", "How long the last good inspection took.",
                          ("host",))
        duration.add_metric([host], inspection.duration_seconds or 0)
        yield duration


def _gc_families(host, srs):
    """SM's GC per SR, from SMlog (runs, failures, last run and success) and xapi (no space, tapdisk)."""
    runs = CounterMetricFamily("xcoalesce_sr_gc_runs", "GC runs SMlog shows for the SR since the agent began "
                               "reading it, by result.", labels=SR_LABELS + ("result",))
    failures = CounterMetricFamily("xcoalesce_sr_gc_failures", "GC outcomes other than a merge SMlog shows for "
                                   "the SR's VHDs, by kind.", labels=SR_LABELS + ("kind",))
    last_run = _gauge("xcoalesce_sr_gc_last_run_timestamp_seconds", "When the SR's last GC run SMlog shows "
                      "started (unix time); absent when none.", SR_LABELS)
    last_success = _gauge("xcoalesce_sr_gc_last_success_timestamp_seconds", "When the SR's last GC run that "
                          "left nothing failed ended (unix time); absent when none.", SR_LABELS)
    blocked = _gauge("xcoalesce_sr_gc_blocked_vdis", "VHDs SM's GC should merge and did not, by the kind of "
                     "its latest outcome.", SR_LABELS + ("kind",))
    no_space = _gauge("xcoalesce_sr_gc_no_space", "1 while xapi holds SM's SM_GC_NO_SPACE message for the SR.",
                      SR_LABELS)
    unpause = _gauge("xcoalesce_sr_tapdisk_unpause_failures", "xapi's `failed to unpause tapdisk` messages of the "
                     "SR of the last days: VMs lost access to a disk.", SR_LABELS)
    for sr in srs:
        labels = _sr_labels(host, sr)
        gc = sr.gc or {}
        for result in GC_RESULTS:
            runs.add_metric(labels + [result], (gc.get("results") or {}).get(result, 0))
        for kind in BLOCKING_KINDS:
            failures.add_metric(labels + [kind], (gc.get("failures") or {}).get(kind, 0))
        if gc.get("last_run"):
            last_run.add_metric(labels, gc["last_run"]["started"])
        if gc.get("last_success") is not None:
            last_success.add_metric(labels, gc["last_success"])
        counts = dict.fromkeys(BLOCKING_KINDS, 0)
        for vdi in sr.vdis or ():
            kind = gcaccount.blocked(vdi)
            if kind is not None:
                counts[kind] += 1
        for kind in BLOCKING_KINDS:
            blocked.add_metric(labels + [kind], counts[kind])
        no_space.add_metric(labels, 1 if gc.get("no_space") else 0)
        unpause.add_metric(labels, sum(1 for signal in gc.get("signals") or ()
                                       if signal["name"] == gcaccount.UNPAUSE_MESSAGE))
    return runs, failures, last_run, last_success, blocked, no_space, unpause


def _smlog_families(host, health):
    """The SMlog reader's health; absent when the inspection did not read SMlog."""
    ok = _gauge("xcoalesce_smlog_reader_ok", "1 when the last inspection read SMlog, 0 when it was missing or "
                "unreadable.", ("host", "path"))
    lines = _gauge("xcoalesce_smlog_lines", "Lines of SMlog read since the agent began reading it, by what "
                   "became of them (read, unreadable: not syslog's form, cut: too long, not_utf8, unattributed: a GC "
                   "pass whose SR was never named in full, ambiguous: SRs sharing the short name it used).",
                   ("host", "path", "state"))
    behind = _gauge("xcoalesce_smlog_behind_bytes", "Bytes of SMlog left for the next inspection (past the cap "
                    "of one read).", ("host", "path"))
    if health:
        labels = [host, health.get("path") or ""]
        ok.add_metric(labels, 1 if health.get("status") == "ok" else 0)
        for state, count in sorted((health.get("lines") or {}).items()):
            lines.add_metric(labels + [state], count)
        behind.add_metric(labels, health.get("behind_bytes") or 0)
    return ok, lines, behind


class StatusCollector(object):
    """The families that change between inspections: run counters from the history, and health."""

    def __init__(self, status, run_history):
        self._status = status
        self._history = run_history

    def collect(self):
        status = self._status.snapshot()
        host = status["host"]
        inspection = status["inspection"]
        totals = self._history.totals()
        for family in _history_families(host, inspection, totals):
            yield family
        corrupt = _gauge("xcoalesce_history_corrupt_lines", "Lines of the run log (runs.jsonl) that could not be "
                         "read and were skipped.", ("host",))
        corrupt.add_metric([host], self._history.corrupt_lines())
        yield corrupt

        build = _gauge("xcoalesce_build_info", "The agent's version, its Python and the host's product version "
                       "(value 1).", ("host", "version", "python_version", "host_product_version"))
        product = ((inspection.host or {}).get("product_version") or "") if inspection else ""
        build.add_metric([host, __version__, platform.python_version(), product], 1)
        yield build

        last_success = _gauge("xcoalesce_last_inspection_success_timestamp_seconds", "When the last good "
                              "inspection finished (unix time); absent until one did.", ("host",))
        if status["last_success"] is not None:
            last_success.add_metric([host], status["last_success"])
        yield last_success

        reachable = _gauge("xcoalesce_xapi_reachable", "1 when xapi answered the last inspection, 0 when it "
                           "could not be reached; absent before the first attempt.", ("host",))
        if status["xapi_reachable"] is not None:
            reachable.add_metric([host], 1 if status["xapi_reachable"] else 0)
        yield reachable

        inspections = CounterMetricFamily("xcoalesce_inspections", "Inspections since the service started, "
                                          "by result.", labels=("host", "result"))
        for result in ("success", "failure"):
            inspections.add_metric([host, result], status["inspections"][result])
        yield inspections

        errors = CounterMetricFamily("xcoalesce_inspection_errors", "Errors met by inspections since the "
                                     "service started, by stage.", labels=("host", "stage"))
        for stage in sorted(status["errors"]):
            errors.add_metric([host, stage], status["errors"][stage])
        yield errors


def _history_families(host, inspection, totals):
    """Counters of the run history; every inspected SR gets its series at 0 before its first run."""
    sr_uuids = set(totals["srs"])
    if inspection is not None:
        sr_uuids.update(sr.uuid for sr in inspection.srs or ())
    reclaimed = CounterMetricFamily("xcoalesce_reclaimed_bytes", "Bytes leaf coalesces gave back on the SR, "
                                    "all runs recorded in the state directory.", labels=("host", "sr_uuid"))
    runs = CounterMetricFamily("xcoalesce_leaf_coalesce_runs", "Leaf-coalesce runs by SR, strategy and result.",
                               labels=("host", "sr_uuid", "strategy", "result"))
    for sr_uuid in sorted(sr_uuids):
        sr = totals["srs"].get(sr_uuid, {"reclaimed_bytes": 0, "runs": {}})
        reclaimed.add_metric([host, sr_uuid], sr["reclaimed_bytes"])
        for strategy in history.STRATEGIES:
            counts = sr["runs"].get(strategy, {})
            for result in history.RESULTS:
                runs.add_metric([host, sr_uuid, strategy, result], counts.get(result, 0))
    yield reclaimed
    yield runs

    frozen = HistogramMetricFamily("xcoalesce_leaf_coalesce_guest_frozen_seconds", "How long each run froze the "
                                   "guest's I/O (gc, live) or kept it suspended (plugin).", labels=("host", "strategy"))
    for strategy in history.STRATEGIES:
        observed = totals["frozen_seconds"].get(strategy)
        counts = observed["buckets"] if observed else [0] * (len(history.FREEZE_BUCKETS) + 1)
        buckets, cumulative = [], 0
        for index, count in enumerate(counts):
            cumulative += count
            buckets.append((_FREEZE_BOUNDS[index], cumulative))
        frozen.add_metric([host, strategy], buckets, observed["sum"] if observed else 0.0)
    yield frozen


def render(collectors):
    """The text exposition (format 0.0.4: every name here is a classic one) of some collectors."""
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    return generate_latest(registry)


class Exposition(object):
    """The /metrics body, in parts each rendered again only when what it shows changed.

    The inspection's part changes once per inspection, the health and run counters when an
    inspection ends or a run is recorded; only the process metrics are rendered at every scrape.
    The gzip form joins one gzip member per part, which RFC 1952 allows and Prometheus' reader
    follows.
    """

    def __init__(self, status, run_history):
        self._status = status
        self._history = run_history
        self._lock = threading.Lock()
        self._parts = {}
        self._process = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self._process)
        PlatformCollector(registry=self._process)
        GCCollector(registry=self._process)

    def _part(self, name, key, collectors):
        """(key, text, gzip member) of a part, rendered when `key` differs from the cached one."""
        cached = self._parts.get(name)
        if cached is not None and cached[0] == key:
            return cached
        with self._lock:
            cached = self._parts.get(name)
            if cached is None or cached[0] != key:
                text = render(collectors())
                cached = (key, text, gzip.compress(text, 6))
                self._parts[name] = cached
            return cached

    def _cached_parts(self):
        inspection = self._status.inspection
        return (
            self._part("inspection", inspection,
                       lambda: [InspectionCollector(inspection)] if inspection is not None else []),
            self._part("status", (self._status.generation, self._history.version()),
                       lambda: [StatusCollector(self._status, self._history)]),
        )

    def prepare(self):
        """Render what changed now, so that the next scrape does not have to."""
        self._cached_parts()

    def chunks(self, gzipped=False):
        """The body as a few byte strings to send one after the other."""
        process = generate_latest(self._process)
        if gzipped:
            return [part[2] for part in self._cached_parts()] + [gzip.compress(process, 6)]
        return [part[1] for part in self._cached_parts()] + [process]

    def body(self, gzipped=False):
        return b"".join(self.chunks(gzipped))
