"""The storage manager's garbage collector in its own words: SMlog lines → GC runs per SR and the
latest outcome per VDI. Pure: lines in, a JSON-able state out (smlogfile.py reads the file).

A line is `Mon DD HH:MM:SS host IDENT: [pid] text`; GC lines have ident `SMGC`, a few `SM`. A GC
run is the pid that logged `=== SR <uuid>: gc ===`; lines of a pid with no run (the forked child
that runs the VHD coalesce) go to the SR's run that logged last. Exception blocks (`*~*~...`,
banner, `<tag>: EXCEPTION <class 'X'>, message`, traceback, `*~*~...`) become one event.

Outcomes (KINDS) name what the GC last did with a VDI; VDIs are named as SM names them: mostly the
first 8 hex digits of the UUID, sometimes the full UUID (gcaccount.py resolves them).
"""
import re
import time

GAVE_UP = "gave_up"
NO_SPACE = "no_space"
TIMED_OUT = "timed_out"
FAILED = "failed"
PAUSE_FAILED = "pause_failed"
UNPAUSE_FAILED = "unpause_failed"
DISABLED = "disabled"
CONCURRENT_CHANGE = "concurrent_change"
MERGED = "merged"
KINDS = (GAVE_UP, NO_SPACE, TIMED_OUT, FAILED, PAUSE_FAILED, UNPAUSE_FAILED, DISABLED, CONCURRENT_CHANGE, MERGED)

# How a run ended: `result` of an SR's last run.
RUNNING, SUCCESS, PARTIAL, RUN_FAILED = "running", "success", "partial", "failed"
ABORTED, SKIPPED = "aborted", "skipped"
RESULTS = (RUNNING, SUCCESS, PARTIAL, RUN_FAILED, ABORTED, SKIPPED)

# Bounds on what the state keeps, whatever the log holds.
MAX_SRS = 1024
MAX_VDIS_PER_SR = 4096
MAX_OPEN_RUNS = 64
MAX_RUN_ERRORS = 10
MAX_TEXT = 500
# A child's line is tied to a run that logged within this many seconds.
CHILD_WINDOW_SECONDS = 24 * 3600

_MONTHS = {name.encode("ascii"): number for number, name in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}
_LINE = re.compile(r"^([A-Z][a-z]{2}) ([ \d]\d) (\d\d):(\d\d):(\d\d) \S+ ([A-Za-z0-9_.-]+): \[(\d+)\](?: (.*))?$")
_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_FULL = re.compile(_UUID)
# A VDI as SM prints it: `*85ff84a8[VHD](65.000G//33.836G|n)`, `cf4a78da(50.000G/1.2G/?)`, or a full UUID.
_VDI = r"(\*?(?:{}|[0-9a-f]{{8}})(?:\[[A-Z]+\])?(?:\([^)]*\))?(?:\[RAW\])?)".format(_UUID)
_VDI_KEY = re.compile(r"\*?({}|[0-9a-f]{{8}})".format(_UUID))
_EXCEPTION = re.compile(r"^(\S+): EXCEPTION (?:<(?:class|type) '([^']*)'>|(\S+)), ?(.*)$")
# What the reader acts on, in the order SM's words are tried: (name, literal starts, pattern). The
# starts let most lines (those nothing acts on) go by without a regex.
_RULES = (
    ("start", ("=== SR ",), r"=== SR ({}): gc ===$".format(_UUID)),
    ("candidate", ("Leaf-coalescing ", "Leaf-Coalescing ", "Coalescing ", "coalescing "),
     r"(?:Leaf-)?[Cc]oalescing {} -> ".format(_VDI)),
    ("no_space", ("No space to ",), r"No space to (?:leaf-)?coalesce {} \(free space: (-?\d+)\)$".format(_VDI)),
    ("offline_fits", ("...but ",), r"\.\.\.but enough space if skip snap-coalesce$"),
    ("unpause_failed", ("ERROR: Failed to unpause VDI ",), r"ERROR: Failed to unpause VDI {}".format(_VDI)),
    ("vdi_disabled", ("Leaf-coalesce disabled for ", "Skipping reset-on-boot ", "Skipping allow_caching=true "),
     r"(Leaf-coalesce disabled for|Skipping reset-on-boot|Skipping allow_caching=true) " + _VDI),
    ("sr_disabled", ("GC is disabled ", "Coalesce disabled ", "Leaf-coalesce disabled "),
     r"(GC is disabled for this SR, abort|Coalesce disabled for this SR|Leaf-coalesce disabled for this SR)$"),
    ("concurrent", ("The VDI ",), r"(The VDI appears to have been concurrently (?:deleted|snapshotted)|"
                                  r"The VDI tree appears to have been altered since|"
                                  r"The VDI is no longer leaf-coalesceable)"),
    ("skip", ("Leaf-coalesce failed on ", "Coalesce failed, "),
     r"(?:Leaf-coalesce failed on {}|Coalesce failed), skipping".format(_VDI)),
    ("reason", ("Max iterations (", "No progress made ", "Unexpected bump "),
     r"(Max iterations \(\d+\) exceeded|No progress made for \d+ iterations|"
     r"Unexpected bump in size, compared to minimum achieved)$"),
    ("end", ("No work, ", "GC process exiting, ", "SR no longer attached, ", "Another GC instance ", "Aborted",
             "Term requested"),
     r"(No work, exiting|GC process exiting, no work left|SR no longer attached, exiting|"
     r"Another GC instance already active, exiting|Aborted|Term requested)$"),
    ("error", ("* * * * * SR ",), r"\* \* \* \* \* SR ({}): ERROR$".format(_UUID)),
    ("block", ("*~*~*~",), r"\*~\*~\*~"),
    ("iteration", ("Iteration: ",), r"Iteration: (\d+) -- Initial size (\d+) --> Final size (\d+)$"),
    ("size", ("Starting size ", "Final size ", "Minimum size "),
     r"(Starting|Final|Minimum) size (?:was|achieved was) +(\d+(?:\.\d+)?)$"),
)


def _rules_by_head():
    """The rules a line may match, by its first three characters (every literal start has at least three)."""
    heads = {}
    for name, starts, pattern in _RULES:
        rule = (starts, name, re.compile(pattern))
        for head in sorted({start[:3] for start in starts}):
            heads.setdefault(head, []).append(rule)
    return heads


_RULES_BY_HEAD = _rules_by_head()
_SM_PATTERNS = (
    ("coalesce_error", re.compile(r"^Coalesce failed on SR ({}): (.*)$".format(_UUID))),
    ("sr_no_space", re.compile(r"^Could not coalesce due to a lack of space in SR ({})$".format(_UUID))),
)
_SWITCHES = {"GC is disabled for this SR, abort": "gc", "Coalesce disabled for this SR": "coalesce",
             "Leaf-coalesce disabled for this SR": "leaf-coalesce", "Leaf-coalesce disabled for": "leaf-coalesce",
             "Skipping reset-on-boot": "on-boot=reset", "Skipping allow_caching=true": "allow-caching"}


def vdi_key(text):
    """`85ff84a8` of `*85ff84a8[VHD](...)`, the full UUID when SM printed one."""
    match = _VDI_KEY.match(text)
    return match.group(1) if match else ""


def parse_time(month, day, hour, minute, second, now):
    """Unix time of a syslog stamp (local time, no year): the year that puts it at most a day ahead of `now`."""
    year = time.localtime(now).tm_year
    fields = (year, _MONTHS[month], int(day), int(hour), int(minute), int(second), 0, 0, -1)
    stamp = time.mktime(fields)
    if stamp > now + 86400:
        stamp = time.mktime((year - 1,) + fields[1:])
    return stamp


def new_state():
    """What the reader keeps between inspections (JSON-able): per SR its runs and VDI outcomes, and
    the open runs by pid."""
    return {"srs": {}, "pids": {}, "lines": {"read": 0, "unreadable": 0, "cut": 0, "not_utf8": 0}}


class GcLog(object):
    """Feeds SMlog lines into a state; `state` is the dict to persist."""

    def __init__(self, state=None, now=None):
        self.state = state if _well_formed(state) else new_state()
        self.now = time.time() if now is None else now
        self._stamps = {}
        self._open_blocks = sum(1 for run in self.state["pids"].values() if run.get("exception") is not None)

    # -- lines --

    def feed_line(self, line):
        """One line of text (no newline); an unreadable line is counted."""
        self.feed_lines((line,))

    def feed_lines(self, lines):
        """Lines of text (no newlines); unreadable lines are counted. The loop most of the reader's time
        goes to: a GC line that matches no rule goes by without a call, unless an exception block is open."""
        stamps, heads = self._stamps, _RULES_BY_HEAD
        read = unreadable = 0
        for line in lines:
            read += 1
            stamp = stamps.get(line[:15])
            if stamp is None:
                stamp = self._stamp(line)
                if stamp is None:
                    unreadable += 1
                    continue
            # `Mon DD HH:MM:SS host IDENT: [pid] text`, the stamp known good
            opening = line.find(": [", 16)
            closing = line.find("]", opening + 3)
            pid = line[opening + 3:closing]
            if opening < 0 or closing < 0 or not pid.isdigit() or line[15:16] != " ":
                unreadable += 1
                continue
            ident = line[line.rfind(" ", 15, opening) + 1:opening]
            if ident == "SMGC":
                text = line[closing + 2:]
                name = match = None
                for starts, rule, pattern in heads.get(text[:3], ()):
                    if text.startswith(starts):
                        match = pattern.match(text)
                        if match is not None:
                            name = rule
                            break
                if name is not None or self._open_blocks:
                    self._gc_line(pid, stamp, text, name, match)
            elif ident == "SM":
                self._sm_line(line[closing + 2:], stamp)
        counts = self.state["lines"]
        counts["read"] += read
        counts["unreadable"] += unreadable

    def _stamp(self, line):
        """Unix time of the line's syslog stamp, None when the line is not in syslog's form."""
        match = _LINE.match(line)
        if match is None:
            return None
        if len(self._stamps) > 4096:
            self._stamps.clear()
        stamp = parse_time(match.group(1).encode("ascii"), *match.group(2, 3, 4, 5), now=self.now)
        self._stamps[line[:15]] = stamp
        return stamp

    def _gc_line(self, pid, stamp, text, name, match):
        """One line the GC (pid, a string of digits) logged at `stamp`: the rule it matched (name and
        match), or None within an exception block."""
        if name == "start":
            self._start(pid, match.group(1), stamp)
            return
        run = self._run_of(pid, stamp)
        if run is None:
            return
        if run.get("exception") is not None and self._in_exception(run, text, stamp):
            return
        if name is None:
            return
        if name == "block":
            self._set_block(run, {"lines": 0})
        elif name == "iteration":
            run.setdefault("tracker", {})["rounds"] = int(match.group(1))
        elif name == "size":
            if "tracker" in run:
                run["tracker"][match.group(1).lower()] = int(float(match.group(2)))
        else:
            getattr(self, "_on_" + name)(run, match, stamp)

    def _set_block(self, run, block):
        """Open (a dict) or close (None) the run's exception block, whose lines match no rule."""
        self._open_blocks += (block is not None) - (run.get("exception") is not None)
        run["exception"] = block

    def _in_exception(self, run, text, stamp):
        """True while the line belongs to the open exception block of the run."""
        block = run["exception"]
        block["lines"] += 1
        if text.startswith("*~*~*~") or block["lines"] > 200:
            self._set_block(run, None)
            return True
        match = _EXCEPTION.match(text)
        if match and "tag" not in block:
            block["tag"] = match.group(1)
            self._on_exception(run, match.group(1), match.group(2) or match.group(3), match.group(4), stamp)
            return True
        if not text or text[0] in " *" or text.startswith("Traceback"):
            return True
        self._set_block(run, None)   # no closing line: the block ended without it
        return False

    def _sm_line(self, text, stamp):
        for name, pattern in _SM_PATTERNS:
            match = pattern.match(text)
            if match is None:
                continue
            sr = self._sr(match.group(1))
            run = self._open_run_of_sr(match.group(1))
            if name == "coalesce_error":
                message = "Coalesce failed on SR: {}".format(match.group(2))
                if run is not None:
                    self._error(run, message)
                    if run.get("candidate"):
                        self._outcome(run, run["candidate"], FAILED, message, stamp, {"error": match.group(2)})
            else:
                sr["no_space_logged"] = stamp
            return

    # -- runs --

    def _start(self, key, sr_uuid, stamp):
        pids = self.state["pids"]
        while key in pids or len(pids) >= MAX_OPEN_RUNS:   # the pid's earlier run, else the one started first
            run = pids.pop(key if key in pids else next(iter(pids)))
            self._set_block(run, None)
            self._finish(run, stamp)
        sr = self._sr(sr_uuid)
        sr["runs_total"] = sr.get("runs_total", 0) + 1
        sr["last_run"] = {"started": stamp, "finished": None, "result": RUNNING, "merged": 0, "errors": []}
        pids[key] = {"sr": sr_uuid, "last": stamp, "candidate": None, "exception": None}

    def _run_of(self, key, stamp):
        """The run a pid's line belongs to: its own, or (a forked child) the run that logged last."""
        pids = self.state["pids"]
        run = pids.get(key)
        if run is None:
            recent = [item for item in pids.values()
                      if not item.get("ended") and stamp - item["last"] <= CHILD_WINDOW_SECONDS]
            if not recent:
                return None
            run = max(recent, key=lambda item: item["last"])
        if stamp > run["last"]:
            run["last"] = stamp
        return run

    def _open_run_of_sr(self, sr_uuid):
        runs = [run for run in self.state["pids"].values() if run["sr"] == sr_uuid]
        return max(runs, key=lambda run: run["last"]) if runs else None

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
            self._outcome(run, candidate, MERGED, "merged into its parent", stamp, {})
            self._last_run(run)["merged"] += 1
        run["candidate"], run["outcome"] = None, None

    def _finish(self, run, stamp, result=None):
        """The run ended; a failure or abort logged after it said it was exiting amends its result."""
        self._close_candidate(run, stamp)
        run["ended"] = True
        last = self._last_run(run)
        sr = self._sr(run["sr"])
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

    # -- what lines say --

    def _outcome(self, run, vdi, kind, message, stamp, figures):
        sr = self._sr(run["sr"])
        vdis = sr["vdis"]   # oldest first: an outcome moves to the end, the oldest goes past the cap
        if vdis.pop(vdi, None) is None and len(vdis) >= MAX_VDIS_PER_SR:
            del vdis[next(iter(vdis))]
        vdis[vdi] = {"kind": kind, "message": message[:MAX_TEXT], "time": stamp, "figures": figures}
        if kind != MERGED and kind != DISABLED:
            sr["failures"][kind] = sr["failures"].get(kind, 0) + 1
            run["failures"] = run.get("failures", 0) + 1
        if vdi == run.get("candidate") or (run.get("candidate") or "")[:8] == vdi[:8]:
            run["outcome"] = kind

    def _on_candidate(self, run, match, stamp):
        self._close_candidate(run, stamp)
        run["candidate"] = vdi_key(match.group(1))
        run.pop("tracker", None)

    def _on_no_space(self, run, match, stamp):
        vdi = vdi_key(match.group(1))
        run["no_space"] = vdi
        self._outcome(run, vdi, NO_SPACE, match.group(0), stamp, {"free_bytes": int(match.group(2))})

    def _on_offline_fits(self, run, match, stamp):
        outcome = self._sr(run["sr"])["vdis"].get(run.get("no_space") or "")
        if outcome is not None and outcome["kind"] == NO_SPACE:
            outcome["figures"]["fits_without_snapshot_coalesce"] = True
            outcome["message"] = (outcome["message"] + "; " + match.group(0))[:MAX_TEXT]

    def _on_unpause_failed(self, run, match, stamp):
        self._outcome(run, vdi_key(match.group(1)), UNPAUSE_FAILED, match.group(0), stamp, {})
        self._error(run, match.group(0))

    def _on_vdi_disabled(self, run, match, stamp):
        self._outcome(run, vdi_key(match.group(2)), DISABLED, match.group(0), stamp,
                      {"switch": _SWITCHES[match.group(1)]})

    def _on_sr_disabled(self, run, match, stamp):
        sr = self._sr(run["sr"])
        sr["disabled"] = {"switch": _SWITCHES[match.group(1)], "message": match.group(1), "time": stamp}
        if match.group(1).startswith("GC is disabled"):
            self._finish(run, stamp, SKIPPED)

    def _on_concurrent(self, run, match, stamp):
        if run.get("candidate"):
            self._outcome(run, run["candidate"], CONCURRENT_CHANGE, match.group(1), stamp, {})

    def _on_skip(self, run, match, stamp):
        vdi = vdi_key(match.group(1)) if match.group(1) else run.get("candidate")
        if vdi and not run.get("outcome"):
            self._outcome(run, vdi, FAILED, match.group(0), stamp, {})
        run["outcome"] = run.get("outcome") or FAILED

    def _on_reason(self, run, match, stamp):
        run.setdefault("tracker", {})["reason"] = match.group(1)

    def _on_end(self, run, match, stamp):
        text = match.group(1)
        result = {"Aborted": ABORTED, "Term requested": ABORTED,
                  "Another GC instance already active, exiting": SKIPPED,
                  "SR no longer attached, exiting": SKIPPED}.get(text)
        self._finish(run, stamp, result)

    def _on_error(self, run, match, stamp):
        self._finish(run, stamp, RUN_FAILED)

    def _on_exception(self, run, tag, cls, message, stamp):
        text = "{}: {}".format(cls, message)
        if tag == "gc":
            self._error(run, text)
            self._finish(run, stamp, RUN_FAILED)
            return
        self._error(run, text)
        vdi = run.get("candidate")
        figures = {"exception": cls, "error": message[:MAX_TEXT]}
        if "could not be coalesced" in message:
            full = _FULL.search(message)
            vdi = full.group(0) if full else vdi
            kind = GAVE_UP
            figures.update(_tracker_figures(run.get("tracker") or {}))
        elif "Timed out" in message:
            kind = TIMED_OUT
        elif "Failed to unpause" in message:
            kind = UNPAUSE_FAILED
        elif "Failed to pause" in message:
            kind = PAUSE_FAILED
        else:
            kind = FAILED
        if vdi and (not run.get("outcome") or (run["outcome"] == FAILED and kind != FAILED)):
            self._outcome(run, vdi, kind, text, stamp, figures)


def _tracker_figures(tracker):
    figures = {}
    for name, field in (("starting", "start_bytes"), ("final", "final_bytes"), ("minimum", "minimum_bytes"),
                        ("rounds", "rounds"), ("reason", "reason")):
        if name in tracker:
            figures[field] = tracker[name]
    return figures


def _well_formed(state):
    return (isinstance(state, dict) and isinstance(state.get("srs"), dict) and isinstance(state.get("pids"), dict)
            and isinstance(state.get("lines"), dict))
