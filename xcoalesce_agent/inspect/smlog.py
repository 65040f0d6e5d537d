"""The storage manager's garbage collector in its own words: SMlog lines → GC runs per SR and the
latest outcome per VDI. Pure: text in, a JSON-able state out (smlogfile.py reads the file; smlogrules.py
holds the rules that recognise GC lines, the outcome kinds and the caps).

A GC run is the pid that logged `=== SR <uuid>: gc ===`. The GC passes the `coalesce-leaf` plugin
runs in its own process (SM 4.1: `run_gc`) log no such line: a pass starts at `Coalescing all in SR
<uuid>...` (the forced pass), at the SR's state summary (`SR 4659 ('name') (6 VDIs in 5 VHD
trees):`) of a process with no run, or at a new pass's first line from a process whose pass has
ended. Lines of a pid with no run (the forked child that runs the VHD coalesce) go to the open run
that logged last. `<tag>: EXCEPTION <class 'X'>, message` is the event of an exception block.

A summary names the SR by 4 hex digits and a name; the plugin's process names the SR in full only
later (`Coalescing all in SR <uuid>`, before its forced pass) or on an error: a pass whose digits no one
known SR has is held until its process names in full an SR of those digits (smlogrules: never a guess).
"""
import sys
import time

from .smlogrules import (ABORTED, AMENDING, ANOTHER_GC, CHILD_WINDOW_SECONDS, CONCURRENT_CHANGE, DISABLED, FAILED,
                         FULL_UUID, GAVE_UP, MAX_OPEN_RUNS, MAX_RUN_ERRORS, MAX_SRS, MAX_TEXT, MAX_VDIS_PER_SR,
                         MERGED, MERGED_TEXT, NO_SPACE, NOT_SYSLOG_AFTER_NEWLINE, PARTIAL, RULES, RUN_FAILED, RUNNING,
                         SIDES, SKIPPED, SUCCESS, UNPAUSE_FAILED, WANTED, bound_lines, compact_outcomes,
                         exception_kind, hold_pass, keep_line, replay, said_in, stamp_of, switch_of, tracker_figures,
                         vdi_key, well_formed)


def new_state():
    """What the reader keeps between inspections (JSON-able): per SR its runs and its VDIs' latest
    outcomes (compact: see `smlogrules.outcome`), the runs by pid, and the passes held by pid."""
    return {"srs": {}, "pids": {}, "held": {}, "lines": {"read": 0, "unreadable": 0, "cut": 0, "not_utf8": 0}}


class GcLog(object):
    """Feeds SMlog lines into a state; `state` is the dict to persist."""

    def __init__(self, state=None, now=None):
        self.state = state if well_formed(state) and compact_outcomes(state) else new_state()
        self.now = time.time() if now is None else now
        self._stamps = {}
        self._minutes = {}
        self._rules = {index: (getattr(self, "_on_" + name), groups) for index, (name, groups) in RULES.items()}
        self._sides = tuple((getattr(self, "_on_" + name), pattern, head) for name, pattern, head in SIDES)

    # -- lines --

    def feed_line(self, line):
        """One line of text (no newline); an unreadable line is counted."""
        self.feed_text(line)

    def feed_text(self, text):
        """Complete lines joined by newlines (none after the last): every line counted, a line not in
        syslog's form counted unreadable, and only the lines a rule matches looked at one by one."""
        counts = self.state["lines"]
        counts["read"] += text.count("\n") + 1
        unreadable = len(NOT_SYSLOG_AFTER_NEWLINE.findall(text)) + (text[3:4] != " " or text[15:16] != " ")
        stamps, rules = self._stamps, self._rules
        rare = self._rare_lines(text)
        upcoming = rare[0][0] if rare else len(text)
        previous = 0
        for match in WANTED.finditer(text):
            at = match.start()
            if at > upcoming:
                rare, upcoming = replay(rare, at, len(text))
            start = text.rfind("\n", previous, at) + 1   # looked for back to the previous match only
            if ((start == 0 and previous) or at <= start + 16 or text[start + 15] != " "
                    or text.find(" ", start + 16, at) >= 0):
                previous = at
                continue   # words of a line's text, not its ident
            previous = at
            index = match.lastindex
            head = text[start:start + 15]
            stamp = stamps.get(head)
            if stamp is None:
                stamp = stamp_of(head, stamps, self._minutes, self.now)
            if index is None or stamp is None:   # a GC line whose pid or stamp cannot be read
                unreadable += 1
                continue
            handler, groups = rules[index]
            handler(match.group(*groups), stamp)
        replay(rare, len(text), len(text))
        counts["unreadable"] += unreadable

    def _rare_lines(self, text):
        """The lines of the side rules (SIDES), [(where, handler, fields, stamp)] in the text's order."""
        found = []
        for handler, pattern, head in self._sides:
            previous = 0
            for match in pattern.finditer(text):
                at = match.start()
                start = text.rfind("\n", previous, at) + 1
                line = None if (start == 0 and previous) or text[start + 15:start + 16] != " " else \
                    head.fullmatch(text, start + 16, at)
                previous = at
                stamp = line and stamp_of(text[start:start + 15], self._stamps, self._minutes, self.now)
                if stamp:
                    found.append((at, handler, ("",) + line.groups()[1:] + match.groups() + (line.group(1),), stamp))
        found.sort(key=lambda item: item[0])
        return found

    # -- runs --

    def _take(self, key, stamp):
        """The pid's entry leaves `pids`: a run it had ends."""
        entry = self.state["pids"].pop(key, None)
        if entry is not None and entry["sr"] and not entry.get("pending") and not entry.get("ended"):
            self._finish(entry, stamp)

    def _start(self, key, sr_uuid, stamp):
        """A run of the SR by the pid begins; the pid's earlier run ends, and the run started first
        when too many are kept."""
        pids = self.state["pids"]
        self._take(key, stamp)
        while len(pids) >= MAX_OPEN_RUNS:
            self._take(next(iter(pids)), stamp)
        sr = self._sr(sr_uuid)
        sr["runs_total"] = sr.get("runs_total", 0) + 1
        sr["last_run"] = {"started": stamp, "finished": None, "result": RUNNING, "merged": 0, "errors": []}
        run = pids[key] = {"sr": sr_uuid, "last": stamp, "candidate": None}
        return run

    def _pend(self, key, sr_uuid, stamp):
        """The pid is about to run a pass of the SR with no `=== SR` line: its first line starts it."""
        pids = self.state["pids"]
        self._take(key, stamp)
        while len(pids) >= MAX_OPEN_RUNS:
            self._take(next(iter(pids)), stamp)
        pids[key] = {"sr": sr_uuid, "last": stamp, "pending": True}

    def _run_of(self, fields, stamp, rule):
        """The run a pid's line belongs to: its own (a new pass once the pid's run ended, unless the
        line amends how it ended), or (a forked child) the open run that logged last; None for a line
        of a held pass (kept with it)."""
        pids = self.state["pids"]
        run = pids.get(fields[-1])
        if run is None:
            recent = [item for item in pids.values() if not item.get("ended") and not item.get("pending")
                      and stamp - item["last"] <= CHILD_WINDOW_SECONDS]
            if not recent:
                return None
            run = max(recent, key=lambda item: item["last"])
        elif run.get("pending") or (run.get("ended") and rule not in AMENDING):
            return self._start(fields[-1], run["sr"], stamp)
        if stamp > run["last"]:
            run["last"] = stamp
        if "held" in run:
            return keep_line(self.state, run["pid"], (rule, fields, stamp))
        return run

    def _runs_of_sr(self, sr_uuid):
        return [run for run in self.state["pids"].values() if run["sr"] == sr_uuid and not run.get("pending")]

    def _sr(self, sr_uuid):
        srs = self.state["srs"]
        sr = srs.get(sr_uuid)
        if sr is None:
            if len(srs) >= MAX_SRS:
                oldest = min(srs, key=lambda uuid: (srs[uuid].get("last_run") or {}).get("started") or 0)
                del srs[oldest]
            sr = srs[sr_uuid] = {"vdis": {}, "failures": {}, "results": {}}
        return sr

    def _last_run(self, run):
        return self._sr(run["sr"])["last_run"]

    def _error(self, run, message):
        errors = self._last_run(run)["errors"]
        if len(errors) < MAX_RUN_ERRORS:
            errors.append(message[:MAX_TEXT])

    def _close_candidate(self, run, stamp):
        """The candidate the run moved on from: merged unless something was logged against it."""
        candidate = run.get("candidate")
        if candidate and not run.get("outcome"):
            self._outcome(run, candidate, MERGED, MERGED_TEXT, stamp, {})
            self._last_run(run)["merged"] += 1
        run["candidate"], run["outcome"] = None, None

    def _finish(self, run, stamp, result=None):
        """The run ended; a failure or abort logged after it said it was exiting amends its result."""
        if run.get("ended") and result not in (RUN_FAILED, ABORTED):
            return
        self._close_candidate(run, stamp)
        run["ended"] = True
        sr = self._sr(run["sr"])
        last = sr["last_run"]
        if last["result"] != RUNNING:
            if result not in (RUN_FAILED, ABORTED) or last["result"] == result:
                return
            sr["results"][last["result"]] -= 1
            if last["result"] == SUCCESS:
                sr["last_success"] = run.get("previous_success")
        elif result is None:
            result = PARTIAL if last["errors"] or run.get("failures") else SUCCESS
        last["result"] = result
        last["finished"] = stamp
        sr["results"][result] = sr["results"].get(result, 0) + 1
        if result == SUCCESS:
            run["previous_success"] = sr.get("last_success")
            sr["last_success"] = stamp

    def _outcome(self, run, vdi, kind, message, stamp, figures):
        sr = self._sr(run["sr"])
        vdis = sr["vdis"]   # oldest first: an outcome moves to the end, the oldest goes past the cap
        if vdis.pop(vdi, None) is None and len(vdis) >= MAX_VDIS_PER_SR:
            del vdis[next(iter(vdis))]
        vdis[vdi] = [kind, message[:MAX_TEXT], stamp, figures] if figures else [kind, message[:MAX_TEXT], stamp]
        if kind != MERGED and kind != DISABLED:
            sr["failures"][kind] = sr["failures"].get(kind, 0) + 1
            run["failures"] = run.get("failures", 0) + 1
        candidate = run.get("candidate")
        if candidate and candidate[:8] == vdi[:8]:
            run["outcome"] = kind

    # -- what lines say: ((the whole match, the rule's groups..., the pid), stamp) --

    def _on_start(self, fields, stamp):
        self._bind(fields[-1], fields[1], stamp)
        self._start(fields[-1], fields[1], stamp)

    def _on_plugin_pass(self, fields, stamp):
        self._bind(fields[-1], fields[1], stamp)
        self._pend(fields[-1], fields[1], stamp)

    def _on_summary(self, fields, stamp):
        """The SR's state as a GC pass scans it: a process with no run (or whose run of another SR
        ended) that logs it runs a pass of its own (the plugin's), unless a run of the SR is open
        (then it is that run's child); a pass is held while its digits name no one known SR."""
        key, sr_uuid = fields[-1], fields[3]
        run = self.state["pids"].get(key)
        if run is not None and "held" not in run and (not run.get("ended") or run["sr"].startswith(
                fields[2] or sr_uuid)):
            return
        if sr_uuid is not None:
            self._bind(key, sr_uuid, stamp)
        else:
            known = [uuid for uuid in self.state["srs"] if uuid.startswith(fields[2])]
            if len(known) != 1:
                self._hold(key, fields[1], len(known) > 1, stamp)
                return
            sr_uuid = known[0]
        if run is not None or not any(not item.get("ended") for item in self._runs_of_sr(sr_uuid)):
            self._pend(key, sr_uuid, stamp)

    # -- passes held until their SR is named in full (smlogrules: the held passes themselves) --

    def _hold(self, key, named, ambiguous, stamp):
        """The pid's pass of the SR SM names `named` (`5e5c ('sr')`) is held; a summary of the pass it
        holds already is one of its lines."""
        pids = self.state["pids"]
        run = pids.get(key)
        if run is not None and run.get("held") == named and self.state["held"].get(key):
            run["last"] = max(run["last"], stamp)
            return
        self._take(key, stamp)
        hold_pass(self.state, key, named, ambiguous, stamp)
        while len(pids) >= MAX_OPEN_RUNS:
            self._take(next(iter(pids)), stamp)
        pids[key] = {"sr": None, "held": named, "pid": key, "last": stamp}

    def _bind(self, key, sr_uuid, stamp):
        """The pid names the SR in full: the lines of its held pass of the SR are read as that SR's."""
        lines = key in self.state["held"] and bound_lines(self.state, key, sr_uuid, stamp)
        if lines:
            self._take(key, stamp)
            self._pend(key, sr_uuid, lines[0][2])
            for rule, fields, at in lines:
                getattr(self, "_on_" + rule)(fields, at)

    def _on_candidate(self, fields, stamp):
        run = self._run_of(fields, stamp, "candidate")
        if run is not None:
            self._close_candidate(run, stamp)
            run["candidate"] = vdi_key(fields[1])
            run.pop("tracker", None)

    def _on_no_space(self, fields, stamp):
        run = self._run_of(fields, stamp, "no_space")
        if run is not None:
            vdi = vdi_key(fields[1])
            run["no_space"] = vdi
            self._outcome(run, vdi, NO_SPACE, said_in(fields), stamp, {"free_bytes": int(fields[2])})

    def _on_offline_fits(self, fields, stamp):
        run = self._run_of(fields, stamp, "offline_fits")
        outcome = run and self._sr(run["sr"])["vdis"].get(run.get("no_space") or "")
        if outcome and outcome[0] == NO_SPACE and len(outcome) > 3:
            outcome[3]["fits_without_snapshot_coalesce"] = True
            outcome[1] = (outcome[1] + "; " + said_in(fields))[:MAX_TEXT]

    def _on_unpause_failed(self, fields, stamp):
        run = self._run_of(fields, stamp, "unpause_failed")
        if run is not None:
            self._outcome(run, vdi_key(fields[1]), UNPAUSE_FAILED, said_in(fields), stamp, {})
            self._error(run, said_in(fields))

    def _on_vdi_disabled(self, fields, stamp):
        run = self._run_of(fields, stamp, "vdi_disabled")
        if run is not None:
            said = said_in(fields)
            self._outcome(run, vdi_key(fields[1]), DISABLED, said, stamp, {"switch": switch_of(said)})

    def _on_sr_disabled(self, fields, stamp):
        run = self._run_of(fields, stamp, "sr_disabled")
        if run is not None:
            said = said_in(fields)
            self._sr(run["sr"])["disabled"] = {"switch": switch_of(said), "message": said, "time": stamp}
            if said.startswith("GC is disabled"):
                self._finish(run, stamp, SKIPPED)

    def _on_concurrent(self, fields, stamp):
        run = self._run_of(fields, stamp, "concurrent")
        if run is not None and run.get("candidate"):
            self._outcome(run, run["candidate"], CONCURRENT_CHANGE, said_in(fields), stamp, {})

    def _on_skip(self, fields, stamp):
        run = self._run_of(fields, stamp, "skip")
        if run is None:
            return
        vdi = vdi_key(fields[1]) if len(fields) > 2 else run.get("candidate")
        if vdi and not run.get("outcome"):
            self._outcome(run, vdi, FAILED, said_in(fields), stamp, {})
        run["outcome"] = run.get("outcome") or FAILED

    def _on_reason(self, fields, stamp):
        run = self._run_of(fields, stamp, "reason")
        if run is not None:
            run.setdefault("tracker", {})["reason"] = sys.intern(said_in(fields))

    def _on_iteration(self, fields, stamp):
        run = self._run_of(fields, stamp, "iteration")
        if run is not None:
            run.setdefault("tracker", {})["rounds"] = int(fields[1])

    def _on_size(self, fields, stamp):
        run = self._run_of(fields, stamp, "size")
        if run is not None and "tracker" in run:
            run["tracker"][said_in(fields).split(" ", 1)[0].lower()] = int(float(fields[1]))

    def _on_end(self, fields, stamp):
        said = said_in(fields)
        if said == ANOTHER_GC and fields[-1] not in self.state["pids"]:
            return   # a process that found the SR's GC at work (the plugin's pass): never that run's child
        run = self._run_of(fields, stamp, "end")
        if run is not None:
            self._finish(run, stamp, SKIPPED if said in (ANOTHER_GC, "SR no longer attached, exiting") else None)

    def _on_exiting(self, fields, stamp):
        """Printed in a `finally`: the end of a pass, also after a failure (not a success signal)."""
        run = self._run_of(fields, stamp, "exiting")
        if run is not None:
            self._finish(run, stamp)

    def _on_aborted(self, fields, stamp):
        run = self._run_of(fields, stamp, "aborted")
        if run is not None:
            self._finish(run, stamp, ABORTED)

    def _on_error(self, fields, stamp):
        self._bind(fields[-1], fields[1], stamp)
        run = self._run_of(fields, stamp, "error")
        if run is not None:
            self._finish(run, stamp, RUN_FAILED)

    def _on_exception(self, fields, stamp):
        run = self._run_of(fields, stamp, "exception")
        if run is None:
            return
        tag, cls, message = fields[1], fields[2] or fields[3], fields[4]
        text = "{}: {}".format(cls, message)
        self._error(run, text)
        if tag == "gc":
            self._finish(run, stamp, RUN_FAILED)
            return
        vdi = run.get("candidate")
        figures = {"exception": sys.intern(cls), "error": message[:MAX_TEXT]}
        kind = exception_kind(message)
        if kind == GAVE_UP:
            full = FULL_UUID.search(message)
            vdi = full.group(0) if full else vdi
            figures.update(tracker_figures(run.get("tracker") or {}))
        if vdi and (not run.get("outcome") or (run["outcome"] == FAILED and kind != FAILED)):
            self._outcome(run, vdi, kind, text, stamp, figures)

    def _on_sm_line(self, fields, stamp):
        """`SM` lines about the GC: a coalesce that failed (`Coalesce failed on SR`), no space to coalesce."""
        self._bind(fields[-1], fields[1] or fields[3], stamp)
        if fields[1] is None:
            self._sr(fields[3])["no_space_logged"] = stamp
            return
        self._sr(fields[1])
        runs = self._runs_of_sr(fields[1])
        run = max(runs, key=lambda item: item["last"]) if runs else None
        if run is not None:
            message = "Coalesce failed on SR: {}".format(fields[2])
            self._error(run, message)
            if run.get("candidate"):
                self._outcome(run, run["candidate"], FAILED, message, stamp, {"error": fields[2]})

