"""The crash journal's file and the host lock, on real files and real processes."""
import json
import os
import subprocess
import sys

import pytest

from xcoalesce_agent import errors
from xcoalesce_agent.reclaim import journal, lock


def test_journal_records_steps_and_clears(tmp_path):
    state = tmp_path / "state"
    jrn = journal.Journal(str(state))
    assert jrn.steps() == []
    first = jrn.begin(journal.force_step("sr-1", "vdi-1", None))
    second = jrn.begin(journal.suspend_step(["sr-1"], "vm-1", "Running", [("vdi-2", None)]))
    on_disk = json.loads((state / "journal.json").read_text())
    assert [step["action"] for step in on_disk["steps"]] == ["leaf-coalesce", "suspend"]
    assert on_disk["steps"][1]["forced_vdis"] == [["vdi-2", None]]
    assert not (state / "journal.json.tmp").exists()
    jrn.end(first)
    assert [step["id"] for step in jrn.steps()] == [second]
    jrn.end(second)
    assert not (state / "journal.json").exists()


def test_step_ids_stay_unique_across_instances(tmp_path):
    journal.Journal(str(tmp_path)).begin(journal.force_step("sr", "a", None))
    again = journal.Journal(str(tmp_path))
    assert again.begin(journal.force_step("sr", "b", "offline")) == 2
    assert [step["previous"] for step in again.steps()] == [None, "offline"]


def test_corrupt_journal_is_moved_aside(tmp_path):
    (tmp_path / "journal.json").write_text("{not json")
    assert journal.Journal(str(tmp_path)).steps() == []
    assert (tmp_path / "journal.json.corrupt").read_text() == "{not json"


def test_repair_with_nothing_open_needs_no_session(tmp_path):
    assert journal.repair(None, journal.Journal(str(tmp_path))) == []


HOLD = "import sys, time; from xcoalesce_agent.reclaim import lock; l = lock.HostLock(sys.argv[1]); l.acquire(); " \
       "print('held', flush=True); time.sleep(30)"


def test_lock_held_by_another_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                              universal_newlines=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(errors.LockHeld) as raised:
            lock.HostLock(str(tmp_path)).acquire()
        assert raised.value.exit_code == 4
        assert "pid {}".format(holder.pid) in str(raised.value)
    finally:
        holder.kill()
        holder.wait()
    with lock.HostLock(str(tmp_path)):
        assert (tmp_path / "run.lock").read_text().strip() == str(os.getpid())


def test_lock_released_after_use(tmp_path):
    with lock.HostLock(str(tmp_path / "new")):
        pass
    with lock.HostLock(str(tmp_path / "new")):
        pass
