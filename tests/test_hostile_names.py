"""Names from xapi holding newlines, escapes or ten thousand characters: one line per table row and per
log record, shortened in tables, exact in JSON."""
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from tests.dom0sim import scenarios as sc
from tests.runner_support import REPOSITORY
from xcoalesce_agent import model, printable
from xcoalesce_agent.inspect import report
from xcoalesce_agent.reclaim import runresult
from xcoalesce_agent.reclaim.plans import PlanEntry

# Every kind of line break xapi can carry in a name (XML 1.0 carries no other C0 character).
FORGED = "x\nERROR: forged\r\tz\u2028y\u2029v\u0085w\x7f"
ESCAPED = "x\\nERROR: forged\\r\\tz\\u2028y\\u2029v\\x85w\\x7f"
LONG = "L" * 10000


def clipped(prefix):
    """How a hostile name starting with `prefix` shows in a table."""
    return (prefix + ESCAPED)[:printable.NAME_WIDTH - 1] + "…"


@pytest.mark.parametrize("text, shown", [
    ("plain name", "plain name"),
    (FORGED, ESCAPED),
    ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
    ("\x00\x0b\x0c\x9b", "\\x00\\x0b\\x0c\\x9b"),
    ("abc\u202edcba", "abc\\u202edcba"),
    ("Straße 東京", "Straße 東京"),
])
def test_one_line_escapes_control_characters(text, shown):
    assert printable.one_line(text) == shown


def test_cells_are_shortened_by_terminal_columns():
    assert printable.cell("short") == "short"
    assert printable.cell(LONG) == "L" * 27 + "…"
    assert printable.display_width(printable.cell("東" * 40)) <= printable.NAME_WIDTH
    assert printable.display_width("東京e\u0301") == 5
    assert printable.cell(FORGED, 12) == "x\\nERROR: f…"


def test_table_aligns_wide_characters():
    lines = printable.table([("NAME", "SIZE"), ("東京", "1"), ("abcd", "2"), ("ab", "3")])
    assert len({printable.display_width(line[:line.rindex(" ") + 1]) for line in lines}) == 1


def hostile_inspection():
    vdis = [model.VdiReport(uuid="1eaf0000-0000-4000-8000-000000000001", name="VDI" + FORGED + LONG, vm_uuid="vm-1",
                            vm_name="VM" + FORGED + LONG, chain_length=2, state=model.LEAF_COALESCEABLE,
                            reason="", reclaimable_bytes=1 << 20, merge_bytes=1 << 20, merge_free_bytes=1 << 20,
                            physical_bytes=2 << 20, virtual_size_bytes=8 << 20, parent_uuid="", hidden=False),
            model.VdiReport(uuid="1eaf0000-0000-4000-8000-000000000002", name="東京" * 20, vm_uuid="vm-2",
                            vm_name="東京", chain_length=1, state=model.LEAF, reason="no " + FORGED,
                            reclaimable_bytes=0, merge_bytes=0, merge_free_bytes=0, physical_bytes=1 << 20,
                            virtual_size_bytes=8 << 20, parent_uuid="", hidden=False)]
    sr = model.SrReport(uuid="5e1ec7ed-0000-4000-8000-00000000000a", name="SR" + FORGED + LONG, type="ext",
                        shared=False, size_bytes=1 << 30, free_bytes=1 << 29, reclaimable_bytes=1 << 20,
                        gc_pending_bytes=0, merge_free_bytes=1 << 20, longest_chain=2, gc_running=False,
                        gc_running_seconds=0.0, skipped_vdis=0, errors=["SR " + FORGED + ": failed"], vdis=vdis)
    return model.Inspection(host={"uuid": "h-1", "name": "host" + FORGED, "product_version": "8.3.0"}, started=1.0,
                            duration_seconds=0.5, srs=[sr], errors=[],
                            skipped_srs=[{"uuid": "iso-1", "name": "ISO" + FORGED, "type": "iso", "reason": "iso"}])


def test_report_rows_stay_one_line_and_aligned():
    text = report.render_text(hostile_inspection())
    lines = text.splitlines()
    assert len(lines) == 12 and not any("\r" in line or "\t" in line for line in lines)
    assert max(printable.display_width(line) for line in lines) < 300
    assert not any(line.startswith("ERROR") for line in lines)
    assert lines[0] == "Host " + clipped("host") + " (h-1)"
    rows = lines[lines.index(next(line for line in lines if "STATE" in line)):][:3]
    states = ("STATE", "leaf_coalesceable", "leaf ")
    starts = {printable.display_width(row[:row.index(states[index])]) for index, row in enumerate(rows)}
    assert len(starts) == 1, rows
    assert clipped("VM") in rows[1] and rows[2].endswith("no " + ESCAPED)
    document = json.loads(report.render_json(hostile_inspection()))
    assert document["srs"][0]["vdis"][0]["vm_name"] == "VM" + FORGED + LONG


def test_now_table_shortens_and_escapes_the_vm_column():
    runs = [PlanEntry(vm_uuid="vm", vm_name=name, vm_power_state="Running",
                      vdi_uuid="1eaf0000-0000-4000-8000-00000000000{}".format(index), vdi_name="", format="vhd",
                      sr_uuid="5e1ec7ed-0000-4000-8000-00000000000a", sr_type="ext", chain_length=2, parent_uuid="",
                      estimated_bytes=1 << 20, merge_bytes=1 << 20, merge_free_bytes=0, strategy="gc",
                      predicted_freeze_seconds=0.1, result="planned", reason=FORGED)
            for index, name in enumerate(("VM" + FORGED + LONG, "東京", ""))]
    for dry_run in (True, False):
        lines = runresult.render_text(runs, dry_run).splitlines()
        assert len(lines) == 5 and max(len(line) for line in lines) < 200
        assert clipped("VM") in lines[1] and lines[1].endswith(ESCAPED)
        assert "  vm  " in lines[3]
        assert len({printable.display_width(line[:line.index("gc")]) for line in lines[1:4]}) == 1
    assert json.loads(runresult.render_json(runs))["runs"][0]["vm_name"] == "VM" + FORGED + LONG


def test_a_logged_traceback_keeps_its_lines_and_escapes_the_message():
    handler_stream = []

    class Collect(logging.Handler):
        def emit(self, record):
            handler_stream.append(self.format(record))

    handler = Collect()
    handler.setFormatter(printable.OneLineFormatter("%(levelname)s: %(message)s"))
    logger = logging.getLogger("tests.hostile")
    logger.addHandler(handler)
    try:
        try:
            raise ValueError("bad " + FORGED)
        except ValueError:
            logger.error("failed on %s", "SR" + FORGED, exc_info=True)
    finally:
        logger.removeHandler(handler)
    lines = handler_stream[0].splitlines()
    assert lines[0] == "ERROR: failed on SR" + ESCAPED
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: bad " + ESCAPED


def hostile_scenario():
    history = [sc.write(0, 4), sc.snapshot("s"), sc.write(0, 4), sc.delete_snapshot("s")]
    srs = [sc.sr("local", "ext", 128, name="SR" + FORGED), sc.sr("gone", "ext", 64, name="Gone" + FORGED)]
    vms = [sc.vm("VM" + FORGED + LONG, [sc.disk("d", "local", 16, name="VDI" + FORGED, steps=history)])]
    return sc.pool("hostile", srs, vms)


def run_agent(host, *args):
    process = subprocess.Popen([sys.executable, "-m", "xcoalesce_agent", "--config", host.agent_conf] + list(args),
                               cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               universal_newlines=True)
    stdout, stderr = process.communicate(timeout=120)
    return process.returncode, stdout, stderr


def test_hostile_names_from_the_host_forge_no_line(sim_host):
    host = sim_host(hostile_scenario())
    shutil.rmtree(os.path.join(host.sr_mount, host.srs["gone"]))  # its scan fails: the SR's name is logged
    code, out, err = run_agent(host, "--report")
    assert code == 0
    assert [line.split(":")[0] for line in err.splitlines()] == ["WARNING"]
    assert "SR Gone" + ESCAPED + " (" in err
    lines = out.splitlines()
    assert not any(line.startswith(("ERROR", "y", "v", "z")) for line in lines)
    assert max(len(line) for line in lines) < 300
    assert any(line.startswith("  " + clipped("VM") + "  " + clipped("VDI") + " (") for line in lines)
    code, out, err = run_agent(host, "--now", "--dry-run")
    assert code == 0 and [line.split(":")[0] for line in err.splitlines()] == ["WARNING"]
    assert len(out.splitlines()) == 3 and max(len(line) for line in out.splitlines()) < 200
    code, out, err = run_agent(host, "--report", "--json")
    assert json.loads(out)["srs"][1]["vdis"][0]["vm_name"] == "VM" + FORGED + LONG
    host.db.faults.fail_method("VDI.get_all_records_where", "SR_BACKEND_FAILURE", "bad\nERROR: forged")
    code, out, err = run_agent(host, "--report")
    assert code == 3 and err.count("\n") == 1 and "bad\\nERROR: forged" in err
