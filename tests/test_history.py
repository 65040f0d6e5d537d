"""RunHistory: runs logged, totals on disk, surviving restarts and other processes."""
import json
import os
import subprocess
import sys

import pytest

from xcoalesce_agent.reclaim import history, plans
from xcoalesce_agent.reclaim.plans import RunRecord

SR_A = "11111111-1111-1111-1111-111111111111"
SR_B = "22222222-2222-2222-2222-222222222222"


def a_run(**changes):
    fields = dict(vm_uuid="vm-1", vdi_uuid="vdi-1", sr_uuid=SR_A, strategy="live", result="success", reason="",
                  estimated_bytes=4 << 20, reclaimed_bytes=4 << 20, frozen_seconds=1.5, predicted_freeze_seconds=2.0,
                  started=1700000000.0, finished=1700000010.0)
    fields.update(changes)
    return RunRecord(**fields)


def test_a_new_state_directory_has_empty_totals(tmp_path):
    runs = history.RunHistory(str(tmp_path / "state"))
    assert runs.totals() == history.empty_totals()
    assert runs.runs() == []
    assert not (tmp_path / "state").exists()


def test_record_counts_runs_bytes_and_freeze_buckets(tmp_path):
    runs = history.RunHistory(str(tmp_path))
    runs.record(a_run())
    runs.record(a_run(frozen_seconds=45.0, reclaimed_bytes=1 << 20))
    runs.record(a_run(result="failed", reclaimed_bytes=0, frozen_seconds=0.05))
    runs.record(a_run(sr_uuid=SR_B, strategy="gc", frozen_seconds=0.3, reclaimed_bytes=2 << 20))
    runs.record(a_run(sr_uuid=SR_B, strategy="plugin", result="skipped", reclaimed_bytes=None, frozen_seconds=None))
    totals = runs.totals()
    assert totals["runs"] == 5
    assert totals["srs"][SR_A] == {"reclaimed_bytes": 5 << 20, "runs": {"live": {"success": 2, "failed": 1}}}
    assert totals["srs"][SR_B] == {"reclaimed_bytes": 2 << 20, "runs": {"gc": {"success": 1},
                                                                        "plugin": {"skipped": 1}}}
    live = totals["frozen_seconds"]["live"]
    assert live["count"] == 3 and live["sum"] == pytest.approx(46.55)
    bounds = history.FREEZE_BUCKETS
    assert live["buckets"][bounds.index(0.1)] == 1
    assert live["buckets"][bounds.index(2.0)] == 1
    assert live["buckets"][bounds.index(60.0)] == 1
    assert sum(live["buckets"]) == 3
    assert totals["frozen_seconds"]["gc"]["count"] == 1
    assert set(totals["frozen_seconds"]) == {"live", "gc"}, "skipped runs froze nothing"
    assert [run.result for run in runs.runs()] == ["success", "success", "failed", "success", "skipped"]


def test_a_freeze_longer_than_every_bound_lands_in_inf(tmp_path):
    runs = history.RunHistory(str(tmp_path))
    runs.record(a_run(strategy="plugin", frozen_seconds=4000.0))
    assert runs.totals()["frozen_seconds"]["plugin"]["buckets"][-1] == 1


def test_totals_survive_a_new_instance(tmp_path):
    history.RunHistory(str(tmp_path)).record(a_run())
    again = history.RunHistory(str(tmp_path))
    assert again.totals()["srs"][SR_A]["reclaimed_bytes"] == 4 << 20
    again.record(a_run())
    assert history.RunHistory(str(tmp_path)).totals()["srs"][SR_A]["reclaimed_bytes"] == 8 << 20


def test_totals_follow_runs_recorded_by_another_process(tmp_path):
    reader = history.RunHistory(str(tmp_path))
    assert reader.totals()["runs"] == 0
    script = ("import sys; from xcoalesce_agent.reclaim import history; from tests.test_history import a_run; "
              "history.RunHistory(sys.argv[1]).record(a_run(reclaimed_bytes=123))")
    subprocess.check_call([sys.executable, "-c", script, str(tmp_path)],
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert reader.totals()["srs"][SR_A]["reclaimed_bytes"] == 123


def test_totals_file_is_replaced_atomically_and_is_json(tmp_path):
    runs = history.RunHistory(str(tmp_path))
    runs.record(a_run())
    with open(str(tmp_path / history.TOTALS_FILE)) as stream:
        assert json.load(stream)["runs"] == 1
    assert sorted(os.listdir(str(tmp_path))) == sorted([history.TOTALS_FILE, history.RUNS_FILE, history.LOCK_FILE])


def test_a_lost_or_corrupt_totals_file_is_rebuilt_from_the_log(tmp_path):
    runs = history.RunHistory(str(tmp_path))
    runs.record(a_run())
    runs.record(a_run(reclaimed_bytes=1))
    with open(str(tmp_path / history.RUNS_FILE), "a") as stream:
        stream.write('{"vm_uuid": "cut short by a cra')
    (tmp_path / history.TOTALS_FILE).write_text("{not json")
    rebuilt = history.RunHistory(str(tmp_path)).totals()
    assert rebuilt["runs"] == 2 and rebuilt["srs"][SR_A]["reclaimed_bytes"] == (4 << 20) + 1
    (tmp_path / history.TOTALS_FILE).unlink()
    assert history.RunHistory(str(tmp_path)).totals() == rebuilt


def test_totals_returns_a_copy(tmp_path):
    runs = history.RunHistory(str(tmp_path))
    runs.record(a_run())
    runs.totals()["srs"].clear()
    assert runs.totals()["srs"]


@pytest.mark.parametrize("changes, message", [
    ({"strategy": "magic"}, "unknown strategy"),
    ({"result": "maybe"}, "unknown result"),
    ({"sr_uuid": ""}, "no sr_uuid"),
    ({"reclaimed_bytes": -1}, "negative"),
])
def test_bad_run_records_are_refused(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        history.RunHistory(str(tmp_path)).record(a_run(**changes))
    assert history.RunHistory(str(tmp_path)).runs() == []


def test_a_logged_run_lacking_fields_is_refused(tmp_path):
    logged = json.loads(a_run().to_log())
    del logged["finished"]
    with pytest.raises(ValueError, match="lacks finished"):
        RunRecord.from_log(json.dumps(logged))
    with open(str(tmp_path / history.RUNS_FILE), "w") as stream:
        stream.write(json.dumps(logged) + "\n" + a_run(reclaimed_bytes=1).to_log() + "\n")
    runs = history.RunHistory(str(tmp_path))
    assert [run.reclaimed_bytes for run in runs.runs()] == [1] and runs.corrupt_lines() == 1


def test_a_log_line_keeps_the_format_when_the_run_has_one_and_reads_lines_without_it(tmp_path):
    runs = history.RunHistory(str(tmp_path))
    runs.record(a_run(format="qcow2", vm_name="web", merge_bytes=5))
    runs.record(a_run())  # a run as logged before the format was kept
    first, second = log_lines(tmp_path)[:2]
    assert json.loads(first.decode("utf-8"))["format"] == "qcow2" and b"format" not in second
    assert sorted(json.loads(first.decode("utf-8"))) == sorted(plans.LOG_FIELDS + ("format",))
    # the log keeps neither the VM's name nor the bytes merged
    assert [(run.format, run.vm_name, run.merge_bytes) for run in runs.runs()] == [("qcow2", None, None),
                                                                                  (None, None, None)]
    with pytest.raises(AttributeError):
        runs.runs()[0].reclaimed = 1  # a misspelt field


def log_lines(tmp_path):
    with open(str(tmp_path / history.RUNS_FILE), "rb") as stream:
        return stream.read().split(b"\n")


def test_bytes_that_are_not_utf8_are_skipped_and_counted(tmp_path):
    runs = history.RunHistory(str(tmp_path))
    runs.record(a_run())
    with open(str(tmp_path / history.RUNS_FILE), "ab") as stream:
        stream.write(b'{"vm_uuid": "\xff\xfe\x00 not text"}\n')
    runs.record(a_run(reclaimed_bytes=1))
    assert [run.reclaimed_bytes for run in runs.runs()] == [4 << 20, 1]
    assert runs.corrupt_lines() == 1
    (tmp_path / history.TOTALS_FILE).unlink()
    rebuilt = history.RunHistory(str(tmp_path))
    assert rebuilt.totals()["runs"] == 2 and rebuilt.totals()["srs"][SR_A]["reclaimed_bytes"] == (4 << 20) + 1
    assert rebuilt.corrupt_lines() == 1


def test_a_line_cut_short_does_not_swallow_the_next_record(tmp_path):
    runs = history.RunHistory(str(tmp_path))
    runs.record(a_run())
    with open(str(tmp_path / history.RUNS_FILE), "a") as stream:
        stream.write('{"vm_uuid": "cut short by a cra')
    assert runs.corrupt_lines() == 1
    runs.record(a_run(reclaimed_bytes=7))
    assert [run.reclaimed_bytes for run in runs.runs()] == [4 << 20, 7]
    assert log_lines(tmp_path)[1] == b'{"vm_uuid": "cut short by a cra'
    assert runs.corrupt_lines() == 1
    (tmp_path / history.TOTALS_FILE).unlink()
    assert history.RunHistory(str(tmp_path)).totals()["srs"][SR_A]["reclaimed_bytes"] == (4 << 20) + 7


def fill_log(tmp_path, count):
    """`count` valid runs written straight into the log (as many earlier records would have)."""
    line = (a_run(reclaimed_bytes=1).to_log() + "\n").encode("utf-8")
    with open(str(tmp_path / history.RUNS_FILE), "ab") as stream:
        stream.write(line * count)
    return len(line)


def test_the_log_is_rotated_by_size_and_the_totals_lose_nothing(tmp_path):
    runs = history.RunHistory(str(tmp_path))
    line_bytes = fill_log(tmp_path, history.MAX_LOG_BYTES // 300)
    count = history.MAX_LOG_BYTES // 300
    assert count * line_bytes > history.MAX_LOG_BYTES
    runs.record(a_run(reclaimed_bytes=1))
    assert not (tmp_path / history.RUNS_FILE).exists()
    assert os.path.getsize(str(tmp_path / history.ROTATED_RUNS_FILE)) == (count + 1) * line_bytes
    expected = {"runs": count + 1, "bytes": count + 1}
    totals = runs.totals()
    assert {"runs": totals["runs"], "bytes": totals["srs"][SR_A]["reclaimed_bytes"]} == expected
    runs.record(a_run(reclaimed_bytes=1000))
    assert len(runs.runs()) == 1
    (tmp_path / history.TOTALS_FILE).unlink()
    rebuilt = history.RunHistory(str(tmp_path)).totals()
    assert rebuilt["runs"] == count + 2 and rebuilt["srs"][SR_A]["reclaimed_bytes"] == count + 1 + 1000
    fill_log(tmp_path, count)
    runs.record(a_run(reclaimed_bytes=1))
    assert os.path.getsize(str(tmp_path / history.ROTATED_RUNS_FILE)) < 2 * history.MAX_LOG_BYTES
    assert runs.totals()["runs"] == 2 * count + 3


def test_a_crash_between_the_rotated_totals_and_the_rename_counts_nothing_twice(tmp_path):
    runs = history.RunHistory(str(tmp_path))
    count = history.MAX_LOG_BYTES // 300
    fill_log(tmp_path, count)
    runs.record(a_run(reclaimed_bytes=1))
    os.rename(str(tmp_path / history.ROTATED_RUNS_FILE), str(tmp_path / history.RUNS_FILE))  # as if not renamed
    (tmp_path / history.TOTALS_FILE).unlink()
    assert history.RunHistory(str(tmp_path)).totals()["runs"] == count + 1


def test_a_missing_state_directory_or_one_under_a_file_reads_as_empty(tmp_path):
    (tmp_path / "a-file").write_text("")
    for state_dir in (tmp_path / "missing", tmp_path / "a-file" / "state"):
        runs = history.RunHistory(str(state_dir))
        assert runs.totals() == history.empty_totals()
        assert runs.runs() == [] and runs.corrupt_lines() == 0


def test_now_records_its_runs_despite_a_corrupt_log_and_lost_totals(demo_host):
    from tests.runner_support import run_now
    state_dir = os.path.join(demo_host.state_dir, "agent-state")
    with open(os.path.join(state_dir, history.RUNS_FILE), "wb") as stream:
        stream.write(a_run(sr_uuid=SR_B).to_log().encode("utf-8") + b"\n\xc3\x28 bad\n{\"cut")
    code, document, stderr = run_now(demo_host, "--vm", demo_host.vms["web-01"])
    assert code == 0 and "Traceback" not in stderr, stderr
    (run,) = document["runs"]
    recorded = history.RunHistory(state_dir)
    assert recorded.corrupt_lines() == 2
    assert [item.vdi_uuid for item in recorded.runs()] == ["vdi-1", run["vdi_uuid"]]
    assert recorded.totals()["srs"][run["sr_uuid"]]["reclaimed_bytes"] == run["reclaimed_bytes"]
