"""The exposition rendered from hand-built inspections: valid for promtool, escaped, bounded."""
import gzip
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import model_samples
from tests.helpers import require_tool
from tests.test_history import a_run
from xcoalesce_agent import model
from xcoalesce_agent.export import collector
from xcoalesce_agent.reclaim import history

AWKWARD_VM_NAME = 'quote " backslash \\ newline \n end, Ünïcødé ☃ 名前'


def samples(body):
    """{(sample name, frozenset of label pairs): value} of an exposition."""
    found = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def values(body, name, **labels):
    """Values of the samples called `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return [value for (sample, pairs), value in samples(body).items() if sample == name and wanted <= pairs]


def labelsets(body, name):
    return [dict(pairs) for (sample, pairs) in samples(body) if sample == name]


def promtool_check(body):
    promtool = require_tool("promtool")
    process = subprocess.Popen([promtool, "check", "metrics"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    output = process.communicate(body)[0].decode("utf-8", "replace")
    assert process.returncode == 0 and not output.strip(), output


@pytest.fixture
def run_history(tmp_path):
    return history.RunHistory(str(tmp_path))


def exposition_of(inspection, run_history, errors=()):
    status = collector.AgentStatus(host="boot-name")
    if inspection is not None:
        status.succeeded(inspection, 1700000100.0)
    for stage in errors:
        status.failed(stage, xapi_reachable=False)
    return collector.Exposition(status, run_history)


def test_the_full_exposition_passes_promtool(run_history):
    run_history.record(a_run(sr_uuid=model_samples.SR_UUID, reclaimed_bytes=4 << 20))
    run_history.record(a_run(sr_uuid=model_samples.SR_UUID, strategy="plugin", frozen_seconds=40.0))
    inspection = model_samples.small_inspection(vm_name=AWKWARD_VM_NAME)
    inspection.errors = [{"stage": "scan", "message": "vhd-util: bad footer"}]
    body = exposition_of(inspection, run_history, errors=["xapi"]).body()
    promtool_check(body)
    assert values(body, "xcoalesce_inspection_errors_total", stage="scan") == [1]
    assert values(body, "xcoalesce_inspection_errors_total", stage="xapi") == [1]


def test_an_agent_that_never_inspected_passes_promtool(run_history):
    body = exposition_of(None, run_history).body()
    promtool_check(body)
    assert values(body, "xcoalesce_build_info", host="boot-name")
    assert not values(body, "xcoalesce_last_inspection_success_timestamp_seconds")
    assert not values(body, "xcoalesce_sr_reclaimable_bytes")


def test_awkward_label_values_round_trip(run_history):
    inspection = model_samples.small_inspection(vm_name=AWKWARD_VM_NAME)
    inspection.srs[0].name = 'SR "quoted" \\ and\nnewline ✓'
    body = exposition_of(inspection, run_history).body()
    assert b'\\"' in body and b"\\\\" in body and b"\\n" in body
    assert [labels["vm_name"] for labels in labelsets(body, "xcoalesce_vdi_reclaimable_bytes")] == [AWKWARD_VM_NAME]
    assert {labels["sr_name"] for labels in labelsets(body, "xcoalesce_sr_info")} == {inspection.srs[0].name}
    promtool_check(body)


def test_space_per_sr_and_per_vdi(run_history):
    inspection = model_samples.small_inspection()
    sr = inspection.srs[0]
    body = exposition_of(inspection, run_history).body()
    sr_labels = dict(host="xen-01", sr_uuid=sr.uuid, sr_name="Local storage", sr_type="ext")
    assert values(body, "xcoalesce_sr_reclaimable_bytes", **sr_labels) == [4 << 20]
    assert values(body, "xcoalesce_sr_gc_pending_bytes", **sr_labels) == [6 << 20]
    assert values(body, "xcoalesce_sr_size_bytes", **sr_labels) == [64 << 30]
    assert values(body, "xcoalesce_sr_free_bytes", **sr_labels) == [32 << 30]
    assert values(body, "xcoalesce_sr_merge_required_free_bytes", **sr_labels) == [4 << 20]
    assert values(body, "xcoalesce_sr_chain_length_max", **sr_labels) == [2]
    assert values(body, "xcoalesce_sr_vhds", state="leaf_coalesceable", **sr_labels) == [1]
    assert values(body, "xcoalesce_sr_vhds", state="garbage", **sr_labels) == [1]
    assert len(values(body, "xcoalesce_sr_vhds", **sr_labels)) == len(model.STATES)
    coalesceable = sr.vdis[0]
    assert values(body, "xcoalesce_vdi_reclaimable_bytes", sr_uuid=sr.uuid, vdi_uuid=coalesceable.uuid,
                  vm_uuid=coalesceable.vm_uuid, vm_name="web-01") == [4 << 20]
    assert values(body, "xcoalesce_inspection_duration_seconds", host="xen-01") == [0.25]


def test_per_vdi_series_are_bounded(run_history):
    inspection = model_samples.small_inspection()
    body = exposition_of(inspection, run_history).body()
    vdis = inspection.srs[0].vdis
    assert [labels["vdi_uuid"] for labels in labelsets(body, "xcoalesce_vdi_reclaimable_bytes")] == [vdis[0].uuid]
    assert sorted(labels["vdi_uuid"] for labels in labelsets(body, "xcoalesce_vdi_chain_length")) == \
        sorted([vdis[0].uuid, vdis[2].uuid]), "leaves only: no hidden parents, snapshots or garbage"


def test_gc_running_now_and_for_how_long(run_history):
    inspection = model_samples.small_inspection()
    inspection.srs[0].gc_running = True
    inspection.srs[0].gc_running_seconds = 5400
    body = exposition_of(inspection, run_history).body()
    assert values(body, "xcoalesce_sr_gc_running") == [1]
    assert values(body, "xcoalesce_sr_gc_running_seconds") == [5400]


def test_run_counters_come_from_the_history_and_start_at_zero(run_history):
    inspection = model_samples.small_inspection()
    exposition = exposition_of(inspection, run_history)
    body = exposition.body()
    assert values(body, "xcoalesce_reclaimed_bytes_total", sr_uuid=model_samples.SR_UUID) == [0]
    assert len(values(body, "xcoalesce_leaf_coalesce_runs_total", sr_uuid=model_samples.SR_UUID)) == 9
    run_history.record(a_run(sr_uuid=model_samples.SR_UUID, reclaimed_bytes=3 << 20, frozen_seconds=0.7))
    run_history.record(a_run(sr_uuid=model_samples.SR_UUID, result="failed", reclaimed_bytes=0, frozen_seconds=12))
    body = exposition.body()
    assert values(body, "xcoalesce_reclaimed_bytes_total", sr_uuid=model_samples.SR_UUID) == [3 << 20]
    assert values(body, "xcoalesce_leaf_coalesce_runs_total", strategy="live", result="success") == [1]
    assert values(body, "xcoalesce_leaf_coalesce_runs_total", strategy="live", result="failed") == [1]
    assert values(body, "xcoalesce_leaf_coalesce_guest_frozen_seconds_bucket", strategy="live", le="1.0") == [1]
    assert values(body, "xcoalesce_leaf_coalesce_guest_frozen_seconds_bucket", strategy="live", le="30.0") == [2]
    assert values(body, "xcoalesce_leaf_coalesce_guest_frozen_seconds_bucket", strategy="live", le="+Inf") == [2]
    assert values(body, "xcoalesce_leaf_coalesce_guest_frozen_seconds_count", strategy="live") == [2]
    assert values(body, "xcoalesce_leaf_coalesce_guest_frozen_seconds_sum", strategy="live") == [pytest.approx(12.7)]
    assert values(body, "xcoalesce_leaf_coalesce_guest_frozen_seconds_count", strategy="plugin") == [0]
    assert values(body, "xcoalesce_leaf_coalesce_guest_frozen_seconds_count", strategy="gc") == [0]


def test_a_failed_inspection_keeps_the_last_good_data(run_history):
    status = collector.AgentStatus(host="boot-name")
    exposition = collector.Exposition(status, run_history)
    status.succeeded(model_samples.small_inspection(), 1700000100.0)
    before = exposition.body()
    status.failed("xapi", xapi_reachable=False)
    after = exposition.body()
    assert values(after, "xcoalesce_sr_reclaimable_bytes") == values(before, "xcoalesce_sr_reclaimable_bytes")
    assert values(after, "xcoalesce_last_inspection_success_timestamp_seconds", host="xen-01") == [1700000100.0]
    assert values(before, "xcoalesce_xapi_reachable") == [1]
    assert values(after, "xcoalesce_xapi_reachable") == [0]
    assert values(after, "xcoalesce_inspections_total", result="failure") == [1]
    assert values(after, "xcoalesce_inspections_total", result="success") == [1]


def test_build_info_names_the_versions(run_history):
    body = exposition_of(model_samples.small_inspection(), run_history).body()
    (labels,) = labelsets(body, "xcoalesce_build_info")
    assert labels["host_product_version"] == "8.2.1"
    assert labels["version"] and labels["python_version"].count(".") == 2


def test_gzip_body_holds_the_same_exposition(run_history):
    exposition = exposition_of(model_samples.small_inspection(), run_history)
    plain = exposition.body()
    unzipped = gzip.decompress(exposition.body(gzipped=True))
    assert samples(unzipped).keys() == samples(plain).keys()


def test_parts_are_rendered_again_only_when_what_they_show_changed(run_history):
    status = collector.AgentStatus()
    exposition = collector.Exposition(status, run_history)
    status.succeeded(model_samples.small_inspection(), 1700000100.0)
    exposition.prepare()
    inspection_part, status_part, _ = exposition.chunks()
    assert exposition.chunks()[0] is inspection_part and exposition.chunks()[1] is status_part
    run_history.record(a_run(sr_uuid=model_samples.SR_UUID))
    assert exposition.chunks()[0] is inspection_part and exposition.chunks()[1] is not status_part
    status_part = exposition.chunks()[1]
    status.failed("xapi", xapi_reachable=False)
    assert exposition.chunks()[0] is inspection_part and exposition.chunks()[1] is not status_part
    status.succeeded(model_samples.small_inspection(), 1700000200.0)
    assert exposition.chunks()[0] is not inspection_part


def test_unreadable_lines_of_the_run_log_are_a_gauge_not_an_error(run_history, tmp_path):
    run_history.record(a_run(sr_uuid=model_samples.SR_UUID, reclaimed_bytes=5))
    with open(str(tmp_path / history.RUNS_FILE), "ab") as stream:
        stream.write(b"\xff\xfe not text\n{\"cut short")
    (tmp_path / history.TOTALS_FILE).unlink()
    body = exposition_of(model_samples.small_inspection(), history.RunHistory(str(tmp_path))).body()
    assert values(body, "xcoalesce_history_corrupt_lines") == [2]
    assert values(body, "xcoalesce_reclaimed_bytes_total", sr_uuid=model_samples.SR_UUID) == [5]
    promtool_check(body)


def test_reclaimable_bytes_carry_the_image_format(run_history):
    vdis = [model_samples.vdi(model.LEAF_COALESCEABLE, reclaimable_bytes=4 << 20, format=model.VHD),
            model_samples.vdi(model.LEAF_COALESCEABLE, reclaimable_bytes=3 << 20, format=model.QCOW2),
            model_samples.vdi(model.NOT_COW, format=model.RAW)]
    body = exposition_of(model_samples.inspection([model_samples.sr(vdis)]), run_history).body()
    assert sorted(values(body, "xcoalesce_vdi_reclaimable_bytes", format=model.QCOW2)) == [3 << 20]
    assert values(body, "xcoalesce_sr_reclaimable_by_format_bytes", format=model.VHD) == [4 << 20]
    assert values(body, "xcoalesce_sr_reclaimable_by_format_bytes", format=model.QCOW2) == [3 << 20]
    assert values(body, "xcoalesce_sr_reclaimable_bytes") == [7 << 20]
    assert values(body, "xcoalesce_sr_vhds", state=model.NOT_COW) == [1]
