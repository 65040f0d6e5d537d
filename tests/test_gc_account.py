"""The GC's own account, end to end on the simulated host of each SM generation: what SMlog and xapi say
of a stuck chain reaches --report's text, its JSON and the metrics."""
import json
import os
import re
import subprocess
import sys

import pytest

from tests.dom0sim import scenarios as sc
from tests.dom0sim import sm
from xcoalesce_agent import config
from xcoalesce_agent.export import collector
from xcoalesce_agent.inspect import inspection, report, smlogfile

MIB = 1 << 20
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=sorted(sm.GENERATIONS))
def generation(request):
    return request.param


def one_disk_pool(sr_type="ext", sr_size_mib=512, speed_mib=400.0):
    steps = [sc.write(0, 4), sc.snapshot("s"), sc.write(2, 4), sc.delete_snapshot("s")]
    srs = [sc.sr("sr", sr_type, sr_size_mib, speed_mib=speed_mib)]
    vms = [sc.vm("vm", [sc.disk("disk", "sr", 16, steps=steps)])]
    return sc.pool("one-disk", srs, vms)


def scan(host, key="sr"):
    host.sm.sr_scan(host.sr_ref(key))
    assert host.sm.wait_idle(120), "the simulated GC is still running"


def account(host):
    """(inspection, --report text, --report --json document, /metrics text) of the host now."""
    result = inspection.inspect(config.load(host.agent_conf))
    metrics = collector.render([collector.InspectionCollector(result)]).decode("utf-8")
    return result, report.render_text(result), json.loads(report.render_json(result)), metrics


def vdi_json(document, uuid):
    return next(vdi for sr in document["srs"] for vdi in sr["vdis"] if vdi["uuid"] == uuid)


def metric(metrics, name, **labels):
    for line in metrics.splitlines():
        if line.startswith(name + "{") and all('{}="{}"'.format(k, v) in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_busy_reports_that_the_gc_gave_up_with_sms_sizes(sim_host, generation):
    host = sim_host("busy", sm=generation, speed_mib=16.0, writes_mib_s=32.0, leaf_mib=4, disk_mib=512,
                    live_timeout=0.05)
    path = host.sm.speed_log(host.srs["ext"])
    if os.path.exists(path):
        os.unlink(path)
    for _ in range(sm.SPEED_LOG_KEEP):
        sm.record_speed(path, MIB)
    scan(host, "ext")
    leaf = host.vdis["busy-leaf"]
    result, text, document, metrics = account(host)
    gc = vdi_json(document, leaf)["gc"]
    assert gc["kind"] == "gave_up" and gc["source"] == "smlog", gc
    figures = gc["figures"]
    assert figures["final_bytes"] > figures["start_bytes"] > 0 and figures["rounds"] >= 3
    assert figures["exception"] == "util.SMException" and "could not be coalesced" in gc["message"]
    line = next(line for line in text.splitlines() if "({})".format(leaf[:8]) in line)
    assert re.search(r"GC gave up at \d\d:\d\d: leaf grew [\d.]+ \w+ -> [\d.]+ \w+ over \d+ rounds", line), line
    sr_gc = next(sr for sr in document["srs"] if sr["uuid"] == host.srs["ext"])["gc"]
    assert sr_gc["last_run"]["result"] == "partial" and sr_gc["last_run"]["finished"] >= sr_gc["last_run"]["started"]
    assert metric(metrics, "xcoalesce_sr_gc_blocked_vdis", kind="gave_up", sr_uuid=host.srs["ext"]) == 1
    assert metric(metrics, "xcoalesce_sr_gc_failures_total", kind="gave_up") >= 1
    assert metric(metrics, "xcoalesce_sr_gc_runs_total", result="partial") >= 1
    assert metric(metrics, "xcoalesce_smlog_reader_ok") == 1


def test_an_sr_short_of_space_reports_no_space_from_the_log_and_xapi(sim_host, generation):
    scenario = one_disk_pool(sr_type="lvm", sr_size_mib=128, speed_mib=0.5)
    scenario["vms"].append(sc.vm("filler", [sc.disk("filler", "sr", 84)], power_state="Halted"))
    host = sim_host(scenario, sm=generation)
    scan(host)
    leaf = host.vdis["disk"]
    result, text, document, metrics = account(host)
    gc = vdi_json(document, leaf)["gc"]
    assert gc["kind"] == "no_space" and gc["figures"]["free_bytes"] >= 0, gc
    assert gc["figures"]["needed_bytes"] > gc["figures"]["free_bytes"]
    assert [signal["name"] for signal in gc["signals"]] == ["SM_GC_NO_SPACE", "leaf-coalesce=offline"]
    sr_gc = document["srs"][0]["gc"]
    assert sr_gc["no_space"] is True
    assert any(signal["name"] == "SM_GC_NO_SPACE" for signal in sr_gc["signals"])
    assert "GC had no space at" in next(line for line in text.splitlines() if "({})".format(leaf[:8]) in line)
    assert "xapi: SM_GC_NO_SPACE: Unable to perform data coalesce" in text
    assert metric(metrics, "xcoalesce_sr_gc_no_space") == 1
    assert metric(metrics, "xcoalesce_sr_gc_blocked_vdis", kind="no_space") == 1


def test_a_failing_coalesce_reports_failed_with_the_exception(sim_host, generation):
    host = sim_host(one_disk_pool(), sm=generation)
    host.sm.fail_coalesce(host.srs["sr"])
    scan(host)
    leaf = host.vdis["disk"]
    result, text, document, metrics = account(host)
    gc = vdi_json(document, leaf)["gc"]
    assert gc["kind"] == "failed", gc
    assert gc["figures"]["exception"] == "util.CommandException" and gc["figures"]["error"] == "Input/output error"
    assert "GC's merge failed at" in text and "util.CommandException: Input/output error" in text
    sr_gc = document["srs"][0]["gc"]
    assert [signal["body"] for signal in sr_gc["signals"]] == ["I/O error while coalescing."]
    assert any("Input/output error" in error for error in sr_gc["last_run"]["errors"])
    assert metric(metrics, "xcoalesce_sr_gc_failures_total", kind="failed") >= 1
    assert metric(metrics, "xcoalesce_sr_gc_blocked_vdis", kind="failed") == 1
    # the command line shows the same, and reads on from where the inspection above stopped
    completed = subprocess.run([sys.executable, "-m", "xcoalesce_agent", "--config", host.agent_conf, "--report",
                                "--json"], cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               universal_newlines=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert vdi_json(json.loads(completed.stdout), leaf)["gc"]["kind"] == "failed"


def test_a_tapdisk_that_fails_to_unpause_and_a_rotation_mid_run(sim_host, generation):
    host = sim_host(one_disk_pool(), sm=generation)
    host.sm.sm_log("sr_attach {}".format(host.srs["sr"]))   # SM logs before any GC
    account(host)   # the reader stands at the end of the log
    host.sm.smlog.max_bytes = os.path.getsize(host.sm.log_path) + 2000   # rotates once, during the GC run
    host.sm.fail_unpause(host.vdis["disk"])
    scan(host)
    assert host.sm.smlog.rotations == 1
    result, text, document, metrics = account(host)
    assert result.smlog["rotations"] == 1 and result.smlog["status"] == "ok"
    gc = vdi_json(document, host.vdis["disk"])["gc"]
    # the run began in the rotated file and ended in the new one: its tail was read once, nothing lost
    assert gc["kind"] == "unpause_failed" and gc["source"] == "smlog", gc
    assert any(signal["name"] == "failed to unpause tapdisk" for signal in gc["signals"])
    assert document["srs"][0]["gc"]["runs_total"] == 1 and document["srs"][0]["gc"]["last_run"]["result"] == "partial"
    assert metric(metrics, "xcoalesce_sr_tapdisk_unpause_failures") == 1
    assert metric(metrics, "xcoalesce_sr_gc_failures_total", kind="unpause_failed") == 1


def test_the_reader_keeps_its_place_in_the_state_directory(sim_host):
    host = sim_host(one_disk_pool())
    scan(host)
    first, _, _, _ = account(host)
    conf = config.load(host.agent_conf)
    saved = json.load(open(smlogfile.state_path(conf)))
    assert saved["file"]["offset"] == os.path.getsize(host.sm.log_path)
    assert first.srs[0].gc["runs_total"] >= 1
    again, _, _, _ = account(host)   # nothing new: the runs already read are kept, none counted twice
    assert again.srs[0].gc["runs_total"] == first.srs[0].gc["runs_total"]
    assert again.smlog["bytes_read"] == 0
