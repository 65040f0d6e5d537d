"""The SMlog reader: the GC's words from public excerpts, and a file that fights back (garbage, huge
lines, bytes that are not UTF-8, truncation, rotation, replacement) read without a crash in bounded memory."""
import json
import os
import resource

from xcoalesce_agent import config
from xcoalesce_agent.inspect import smlog, smlogfile, smlogrules

SR = "4659a1b2-0000-4000-8000-000000000001"
LEAF = "1234abcd-0000-4000-8000-000000000009"
BANNER = "*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*"


def lines(pid, *texts, ident="SMGC", stamp="Jan  2 16:01:16"):
    return ["{} host {}: [{}] {}".format(stamp, ident, pid, text) for text in texts]


def exception(pid, tag, cls, message):
    return lines(pid, BANNER, "         ***********************", "         *  E X C E P T I O N  *",
                 "         ***********************", "{}: EXCEPTION <class '{}'>, {}".format(tag, cls, message),
                 '  File "/opt/xensource/sm/cleanup.py", line 1, in coalesce', "    self._coalesce(vdi)", "", BANNER)


def feed(*groups):
    log = smlog.GcLog(now=1767369700.0)
    for group in groups:
        for line in group:
            log.feed_line(line)
    return log.state


def test_the_public_excerpts_give_a_failed_coalesce_with_its_exception():
    state = feed(lines(3802739, "=== SR {}: gc ===".format(SR),
                       "Coalescing *85ff84a8[VHD](65.000G///33.836G|n) -> *cf4a78da[VHD](65.000G//64.1G/65.1G|n)"),
                 lines(3802740, "  Running VHD coalesce on *85ff84a8[VHD](65.000G///33.836G|n)"),
                 exception(3802739, "coalesce", "util.CommandException", "No such file or directory"),
                 lines(3802739, "Coalesce failed, skipping", "GC process exiting, no work left"))
    sr = state["srs"][SR]
    outcome = smlogrules.outcome(sr["vdis"]["85ff84a8"])
    assert outcome["kind"] == "failed"
    assert outcome["figures"] == {"exception": "util.CommandException", "error": "No such file or directory"}
    assert sr["last_run"]["result"] == "partial" and sr["failures"] == {"failed": 1}


def test_a_failed_coalesce_with_no_exception_logged_fails_its_candidate():
    state = feed(lines(12345678, "=== SR {}: gc ===".format(SR), "Coalescing *aaaabbbb(1G/1M/1M) -> *3333(1G/1M/1M)",
                       "Coalesce failed, skipping", "GC process exiting, no work left"))
    assert smlogrules.outcome(state["srs"][SR]["vdis"]["aaaabbbb"])["kind"] == "failed"
    assert list(state["srs"][SR]["vdis"]) == ["aaaabbbb"]


def test_gave_up_keeps_sms_sizes_and_rounds():
    state = feed(lines(7, "=== SR {}: gc ===".format(SR), "Leaf-coalescing 1234abcd(10.000G/1.200G/1.2G) -> "
                       "*cf4a78da(10G/5G/5G)", "Aborted coalesce",
                       "Iteration: 1 -- Initial size 1288490188 --> Final size 1300000000",
                       "Iteration: 10 -- Initial size 1388490188 --> Final size 1395864371",
                       "Max iterations (10) exceeded", "Starting size was         1288490188",
                       "Final size was            1395864371", "Minimum size achieved was 1288490188"),
                 exception(7, "leaf-coalesce", "util.SMException", "VDI {} could not be coalesced".format(LEAF)),
                 lines(7, "Leaf-coalesce failed on 1234abcd(10.000G/1.200G/1.2G), skipping"))
    outcome = smlogrules.outcome(state["srs"][SR]["vdis"][LEAF])
    assert outcome["kind"] == "gave_up"
    assert {key: outcome["figures"][key] for key in ("start_bytes", "final_bytes", "rounds", "reason")} == {
        "start_bytes": 1288490188, "final_bytes": 1395864371, "rounds": 10, "reason": "Max iterations (10) exceeded"}


def test_space_timeouts_pauses_switches_and_merges():
    state = feed(lines(9, "=== SR {}: gc ===".format(SR),
                       "No space to leaf-coalesce 99998888[VHD](10.000G//1.2G/1.3G|a) (free space: 4194304)",
                       "...but enough space if skip snap-coalesce",
                       "Skipping reset-on-boot 77776666(1G/1M/1M)",
                       "Leaf-coalescing 55554444(1G/1M/1M) -> *33332222(1G/1M/1M)"),
                 exception(9, "_doCoalesceLeaf", "util.SMException", "Timed out"),
                 lines(9, "*** UNDO LEAF-COALESCE", "*** leaf-coalesce undo successful"),
                 exception(9, "leaf-coalesce", "util.SMException", "Timed out"),
                 lines(9, "Leaf-coalescing 11110000(1G/1M/1M) -> *33332222(1G/1M/1M)"),
                 exception(9, "leaf-coalesce", "util.SMException", "Failed to pause VDI 11110000(1G/1M/1M)"),
                 lines(9, "Coalescing *aaaabbbb(1G/1M/1M) -> *33332222(1G/1M/1M)",
                       "The VDI tree appears to have been altered since",
                       "Coalescing *ccccdddd(1G/1M/1M) -> *33332222(1G/1M/1M)", "No work, exiting",
                       "GC process exiting, no work left"),
                 lines(9, "Could not coalesce due to a lack of space in SR {}".format(SR), ident="SM"))
    vdis = {key: smlogrules.outcome(value) for key, value in state["srs"][SR]["vdis"].items()}
    assert vdis["99998888"]["kind"] == "no_space"
    assert vdis["99998888"]["figures"] == {"free_bytes": 4194304, "fits_without_snapshot_coalesce": True}
    assert vdis["77776666"]["figures"] == {"switch": "on-boot=reset"}
    assert [vdis[key]["kind"] for key in ("55554444", "11110000", "aaaabbbb", "ccccdddd")] == [
        "timed_out", "pause_failed", "concurrent_change", "merged"]
    assert state["srs"][SR]["last_run"]["merged"] == 1


def test_a_fatal_gc_error_fails_the_run_after_it_said_it_was_exiting():
    state = feed(lines(5, "=== SR {}: gc ===".format(SR), "GC process exiting, no work left"),
                 exception(5, "gc", "util.SMException", "Parent VDI x of y not found"),
                 lines(5, "* * * * * SR {}: ERROR".format(SR), ""))
    run = state["srs"][SR]["last_run"]
    assert run["result"] == "failed" and run["errors"] == ["util.SMException: Parent VDI x of y not found"]
    assert state["srs"][SR]["last_success"] is None and state["srs"][SR]["results"] == {"success": 0, "failed": 1}


def test_garbage_is_counted_never_fatal():
    state = feed(["", "x" * 70000, "\ufffd\ufffd not syslog", "Jan  2 16:01:16 host SMGC: [12] unknown words",
                  "Jan  2 16:01:16 host SMGC: [abc] not a pid", "Foo 99 99:99:99"])
    assert state["lines"]["unreadable"] == 5 and state["srs"] == {}


def make_config(tmp_path, log_path):
    conf = tmp_path / "agent.conf"
    conf.write_text("[agent]\nstate_dir = {}\n[storage]\nsmlog_path = {}\n".format(tmp_path / "state", log_path))
    return config.load(str(conf))


def run_line(pid, sr=SR):
    return "Jan  2 16:01:16 host SMGC: [{}] === SR {}: gc ===\n".format(pid, sr).encode("ascii")


def test_hostile_files_are_read_in_bounded_memory_and_every_bad_line_counted(tmp_path):
    path = tmp_path / "SMlog"
    huge = b"Jan  2 16:01:16 host SMGC: [1] " + b"y" * (1 << 20) + b"\n"
    with open(str(path), "wb") as stream:
        stream.write(run_line(1) + huge + b"\xff\xfe\xfd bad bytes\n" + huge * 3 + run_line(2) + b"no newline")
    conf = make_config(tmp_path, str(path))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    log, health = smlogfile.read(conf)
    counts = log.state["lines"]
    assert counts["cut"] == 4 and counts["not_utf8"] == 1 and counts["unreadable"] >= 1
    assert log.state["srs"][SR]["runs_total"] == 2 and health["status"] == "ok"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024   # KiB: a few chunks at most
    # one line of garbage with no newline at all, larger than any chunk
    with open(str(path), "ab") as stream:
        stream.write(b"z" * (9 << 20))
    log, health = smlogfile.read(conf)
    assert log.state["lines"]["cut"] == 5 and health["behind_bytes"] == 0


def test_truncation_rotation_and_replacement(tmp_path):
    path = str(tmp_path / "SMlog")
    conf = make_config(tmp_path, path)
    with open(path, "wb") as stream:
        stream.write(run_line(1))
    assert smlogfile.read(conf)[0].state["srs"][SR]["runs_total"] == 1
    with open(path, "wb") as stream:   # truncated (copytruncate), then written again
        stream.write(b"")
    smlogfile.read(conf)
    with open(path, "ab") as stream:
        stream.write(run_line(2))
    log, health = smlogfile.read(conf)
    assert log.state["srs"][SR]["runs_total"] == 2 and health["truncations"] == 1
    with open(path, "ab") as stream:   # written, then rotated before the next inspection
        stream.write(run_line(3))
    os.rename(path, path + ".1")
    with open(path + ".2.gz", "wb") as stream:
        stream.write(run_line(99) * 3)   # never read
    with open(path, "wb") as stream:
        stream.write(run_line(4))
    log, health = smlogfile.read(conf)
    assert log.state["srs"][SR]["runs_total"] == 4 and health["rotations"] == 1
    os.unlink(path)
    log, health = smlogfile.read(conf)
    assert health["status"] == "missing" and log.state["srs"][SR]["runs_total"] == 4
    replacement = path + ".new"   # a file replaced whole (rename over it)
    with open(replacement, "wb") as stream:
        stream.write(run_line(5) + run_line(6))
    os.rename(replacement, path)
    log, health = smlogfile.read(conf)
    assert log.state["srs"][SR]["runs_total"] == 6 and health["status"] == "ok"


def test_a_corrupt_state_file_starts_afresh(tmp_path):
    path = str(tmp_path / "SMlog")
    conf = make_config(tmp_path, path)
    with open(path, "wb") as stream:
        stream.write(run_line(1))
    os.makedirs(conf.agent.state_dir)
    with open(smlogfile.state_path(conf), "w") as stream:
        stream.write('{"file": {"inode": "x"}, "log": [1, 2]')
    log, health = smlogfile.read(conf)
    assert log.state["srs"][SR]["runs_total"] == 1 and health["status"] == "ok"


def test_the_plugins_gc_passes_without_a_start_line_are_runs_of_their_own():
    """SM 4.1's coalesce-leaf plugin calls run_gc in its own process: no `=== SR` line. Its passes begin
    at the SR's state summary of a process with no run, at `Coalescing all in SR`, and at a new pass's
    first line once the process's pass ended; `GC process exiting` and the summary after it end a pass."""
    summary = "SR 4659 ('LVM-local-SR') (2 VDIs in 1 VHD trees): no changes"
    leaf = "1234abcd[VHD](10.000G//1.200G/1.3G|a)"
    state = feed(lines(11, "=== SR {}: gc ===".format(SR), "No work, exiting", "GC process exiting, no work left"),
                 lines(12, "VDI to consider: {}".format(LEAF), summary, "        {}".format(leaf),
                       summary, "No work, exiting", "GC process exiting, no work left", summary,
                       "Suspending VM 0000", "Processing VDIs: ['{}']".format(LEAF),
                       "Coalescing all in SR {}...".format(SR), summary, "Leaf-coalesce candidate: " + leaf,
                       "Leaf-coalesce forced, will not use timeout",
                       "Leaf-coalescing {} -> *cf4a78da[VHD](10.000G//5.0G/5.1G|a)".format(leaf),
                       "No work, exiting", "GC process exiting, no work left", summary, "Resuming VM 0000",
                       summary, "Leaf-coalescing {} -> *cf4a78da[VHD](10.000G//5.0G/5.1G|a)".format(leaf)),
                 exception(12, "leaf-coalesce", "util.SMException", "Failed to pause VDI 1234abcd"),
                 lines(12, "Leaf-coalesce failed on {}, skipping".format(leaf), "GC process exiting, no work left",
                       summary))
    sr = state["srs"][SR]
    assert sr["runs_total"] == 4 and sr["results"] == {"success": 3, "partial": 1}
    assert smlogrules.outcome(sr["vdis"]["1234abcd"])["kind"] == "pause_failed"
    assert sr["last_run"]["result"] == "partial" and sr["last_run"]["errors"] == [
        "util.SMException: Failed to pause VDI 1234abcd"]


def test_the_plugins_passes_with_a_start_line_and_a_daemon_are_counted_once():
    """SM 3.2's plugin logs `=== SR` after `Coalescing all in SR`; its last pass forks a daemon that
    logs under another pid, the child of the run its parent started."""
    summary = "SR 4659 ('LVM-local-SR') (2 VDIs in 1 VHD trees): no changes"
    state = feed(lines(21, "Coalescing all in SR {}...".format(SR), "=== SR {}: gc ===".format(SR),
                       "No work, exiting", "GC process exiting, no work left", summary, "=== SR {}: gc ===".format(SR)),
                 lines(22, summary, "Coalescing *aaaabbbb(1G/1M/1M) -> *33332222(1G/1M/1M)", "No work, exiting",
                       "GC process exiting, no work left", summary))
    sr = state["srs"][SR]
    assert sr["runs_total"] == 2 and sr["results"] == {"success": 2}
    assert smlogrules.outcome(sr["vdis"]["aaaabbbb"])["kind"] == "merged"


def test_a_summary_names_a_run_only_for_an_sr_known_by_its_four_digits():
    other = "4659ffff-0000-4000-8000-000000000002"
    state = feed(lines(31, "=== SR {}: gc ===".format(SR), "GC process exiting, no work left"),
                 lines(32, "=== SR {}: gc ===".format(other), "GC process exiting, no work left"),
                 lines(33, "SR 4659 ('one of two') (1 VDIs in 1 VHD trees): no changes", "No work, exiting"),
                 lines(34, "SR 9999 ('unknown') (1 VDIs in 1 VHD trees): no changes", "No work, exiting"),
                 lines(35, "=== SR {}: gc ===".format(SR)),
                 lines(36, "SR 4659 ('one of two') (1 VDIs in 1 VHD trees): no changes",
                       "Another GC instance already active, exiting"))
    assert [state["srs"][uuid]["runs_total"] for uuid in (SR, other)] == [2, 1] and len(state["srs"]) == 2
    assert state["srs"][SR]["last_run"]["result"] == "running"   # the plugin's pass that found it at work


def test_rule_words_inside_a_lines_text_are_not_lines_nor_are_hostile_lines():
    log = smlog.GcLog(now=1767369700.0)
    fake = " SMGC: [9] === SR {}: gc ===".format(SR)
    log.feed_text("\n".join(lines(41, "said: " + fake, ident="SM") + ["garbage" + fake]))
    assert log.state["srs"] == {} and log.state["lines"] == {"read": 2, "unreadable": 1, "cut": 0, "not_utf8": 0}
    # words that begin a rule again and again in one long line (their cost: benchmarks/smlog.py)
    hostile = [" SMGC: [1] SR 4659 ('" + "x" * 40, " SMGC: [1] a: EXCEPTION <class '" + "y" * 40,
               " SMGC: [1] Coalescing 1234abcd(" + "z" * 40, " SM: [1] Coalesce failed on SR {}: ".format(SR)]
    for words in hostile:
        log.feed_text("\n".join(lines(42, words * (60000 // len(words)))))
    assert log.state["srs"] == {} and log.state["lines"]["read"] == 6


def test_a_state_file_of_the_earlier_form_is_read_and_a_mangled_one_starts_afresh(tmp_path):
    path = str(tmp_path / "SMlog")
    conf = make_config(tmp_path, path)
    with open(path, "wb") as stream:
        stream.write(run_line(1))
    os.makedirs(conf.agent.state_dir)
    earlier = {"kind": "no_space", "message": "No space", "time": 5.0, "figures": {"free_bytes": 4}}
    srs = {SR: {"vdis": {"1234abcd": earlier, "5678abcd": dict(earlier, kind="merged", figures={})},
                "failures": {}, "results": {}, "runs_total": 7}}
    saved = {"log": {"srs": srs, "pids": {}, "lines": {"read": 0, "unreadable": 0, "cut": 0, "not_utf8": 0}}}
    with open(smlogfile.state_path(conf), "w") as stream:
        json.dump(saved, stream)
    log, health = smlogfile.read(conf)
    vdis = log.state["srs"][SR]["vdis"]
    assert smlogrules.outcome(vdis["1234abcd"]) == earlier and vdis["5678abcd"] == ["merged", "No space", 5.0]
    assert log.state["srs"][SR]["runs_total"] == 8
    srs[SR]["vdis"]["1234abcd"] = ["no kind of ours", "x", 1.0]
    saved["file"] = None
    with open(smlogfile.state_path(conf), "w") as stream:
        json.dump(saved, stream)
    log, health = smlogfile.read(conf)
    assert log.state["srs"][SR]["runs_total"] == 1 and health["status"] == "ok"


def plugin_pass(pid, named):
    """What SM 4.1's plugin logs before it names the SR in full: its scan, then a run_gc pass that merges
    the leaf (the summaries name the SR by 4 hex digits and its name)."""
    summary = "SR {} (2 VDIs in 1 VHD trees): no changes".format(named)
    leaf = "1234abcd[VHD](10.000G//1.200G/1.3G|a)"
    return lines(pid, "VDI to consider: {}".format(LEAF), summary, summary, "Leaf-coalesce candidate: " + leaf,
                 "Leaf-coalescing {} -> *cf4a78da[VHD](10.000G//5.0G/5.1G|a)".format(leaf), "No work, exiting",
                 "GC process exiting, no work left", summary, "Suspending VM 0000")


def forced_pass(pid, sr_uuid, named):
    summary = "SR {} (1 VDIs in 1 VHD trees): no changes".format(named)
    return lines(pid, "Coalescing all in SR {}...".format(sr_uuid), summary, "No work, exiting",
                 "GC process exiting, no work left", summary)


def test_a_pass_of_an_sr_named_by_its_digits_alone_is_held_until_its_process_names_the_sr():
    """The plugin's first pass names the SR only as `4659 ('LVM-local-SR')`; its process names it in
    full at `Coalescing all in SR`: the held pass is then that SR's, also across a saved state."""
    log = smlog.GcLog(now=1767369700.0)
    log.feed_text("\n".join(plugin_pass(51, "4659 ('LVM-local-SR')")))
    assert log.state["srs"] == {} and len(log.state["held"]["51"][0][3]) == 3
    log = smlog.GcLog(json.loads(json.dumps(log.state)), now=1767369700.0)
    log.feed_text("\n".join(forced_pass(51, SR, "4659 ('LVM-local-SR')")))
    sr = log.state["srs"][SR]
    assert sr["runs_total"] == 2 and sr["results"] == {"success": 2} and log.state["held"] == {}
    assert smlogrules.outcome(sr["vdis"]["1234abcd"])["kind"] == "merged"
    assert "unattributed" not in log.state["lines"] and "ambiguous" not in log.state["lines"]


def test_a_held_pass_its_process_never_names_ends_unbound_and_its_lines_are_counted():
    """A pass held before the one the process names (its SR never named in full) is dropped, never a
    run; held passes are bounded whatever the log holds."""
    state = feed(plugin_pass(61, "9999 ('gone')"), plugin_pass(61, "4659 ('LVM-local-SR')"),
                 forced_pass(61, SR, "4659 ('LVM-local-SR')"))
    assert list(state["srs"]) == [SR] and state["srs"][SR]["runs_total"] == 2
    assert state["lines"]["unattributed"] == 3 and state["held"] == {}
    flood = [lines(pid, "SR 9999 ('gone') (1 VDIs in 1 VHD trees): no changes",
                   *["Coalescing *aaaabbbb(1G/1M/1M) -> *33332222(1G/1M/1M)"] * 600) for pid in range(100, 120)]
    state = feed(*flood)
    assert state["srs"] == {} and len(state["held"]) == smlogrules.MAX_HELD_PIDS
    assert all(held[3] is None for passes in state["held"].values() for held in passes)
    assert state["lines"]["unattributed"] == 20 * 600


def test_passes_of_srs_that_share_four_digits_are_never_guessed():
    """Two SRs the log named in full share the digits, or one process held passes of two SRs of the same
    digits: the passes are dropped (counted ambiguous), the pass the process then names is read."""
    other = "4659ffff-0000-4000-8000-000000000002"
    state = feed(lines(70, "=== SR {}: gc ===".format(SR), "No work, exiting", "GC process exiting, no work left"),
                 lines(71, "=== SR {}: gc ===".format(other), "No work, exiting", "GC process exiting, no work left"),
                 plugin_pass(72, "4659 ('one of two')"), forced_pass(72, SR, "4659 ('one of two')"))
    assert [state["srs"][uuid]["runs_total"] for uuid in (SR, other)] == [2, 1]
    assert "1234abcd" not in state["srs"][SR]["vdis"] and state["lines"]["ambiguous"] == 3
    state = feed(plugin_pass(73, "4659 ('a')"), plugin_pass(73, "4659 ('b')"), forced_pass(73, SR, "4659 ('a')"))
    assert state["srs"][SR]["runs_total"] == 1 and state["srs"][SR]["vdis"] == {}
    assert state["lines"]["ambiguous"] == 6 and state["held"] == {}


def test_a_plugin_call_over_a_known_sr_and_an_unknown_one_reads_each_pass_as_its_srs():
    """The plugin's first passes go SR by SR, then `Coalescing all in SR` comes in the same order: the
    pass of the SR known by its digits is read at once, the other one when its SR is named."""
    other = "77770000-0000-4000-8000-000000000003"
    state = feed(lines(80, "=== SR {}: gc ===".format(SR), "No work, exiting", "GC process exiting, no work left"),
                 plugin_pass(81, "4659 ('known')")[:-1], plugin_pass(81, "7777 ('new')")[1:],
                 forced_pass(81, SR, "4659 ('known')"), forced_pass(81, other, "7777 ('new')"))
    assert state["srs"][SR]["runs_total"] == 3 and state["srs"][other]["runs_total"] == 2
    assert [smlogrules.outcome(state["srs"][uuid]["vdis"]["1234abcd"])["kind"] for uuid in (SR, other)] == [
        "merged", "merged"]
    assert state["held"] == {} and "unattributed" not in state["lines"]
