"""What the SMlog reader (smlog.py) recognises and the words of its state: the GC lines it acts on (the
rules, compiled into the patterns that find them), the outcome kinds and run results, the caps on what
the state keeps.

A line is `Mon DD HH:MM:SS host IDENT: [pid] text`; GC lines have ident `SMGC`, a few `SM`. One
pattern finds, in a whole block of lines at once, the few lines a rule acts on (two more the rarer
exception and `SM` lines); the rest (most of SMlog) are only counted, never split into lines.

Outcomes (KINDS) name what the GC last did with a VDI; VDIs are named as SM names them: mostly the
first 8 hex digits of the UUID, sometimes the full UUID (gcaccount.py resolves them).

Also the pure parts of the reader's state: syslog stamps, and the passes held until their process
names their SR in full (`held`: by pid, [named, ambiguous, first stamp, GC lines]).
"""
import re
import sys
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
MERGED_TEXT = "merged into its parent"

# How a run ended: `result` of an SR's last run.
RUNNING, SUCCESS, PARTIAL, RUN_FAILED = "running", "success", "partial", "failed"
ABORTED, SKIPPED = "aborted", "skipped"
RESULTS = (RUNNING, SUCCESS, PARTIAL, RUN_FAILED, ABORTED, SKIPPED)

# What a pass logs once it ended (SM's `finally` and error handling), not a start of the process's next pass.
AMENDING = frozenset(("exiting", "aborted", "error", "exception"))

# Bounds on what the state keeps, whatever the log holds.
MAX_SRS = 1024
MAX_VDIS_PER_SR = 4096
MAX_OPEN_RUNS = 64
MAX_RUN_ERRORS = 10
MAX_TEXT = 500
# An SR's name as its state summary gives it (longer ones: that summary is not read).
MAX_SR_NAME = 256
# A child's line is tied to a run that logged within this many seconds.
CHILD_WINDOW_SECONDS = 24 * 3600
# A pass whose SR the summary names only by digits no known SR alone has is held until its process names
# the SR in full, at most this many processes, passes a process, and GC lines a pass.
MAX_HELD_PIDS = 4
MAX_HELD_PASSES = 4
MAX_HELD_LINES = 512
# Syslog stamps read so far, by their text (logs are in time order: a few are enough).
MAX_STAMPS = 256

_MONTH_NAMES = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTHS = {name: number for number, name in enumerate(_MONTH_NAMES, 1)}
STAMP = re.compile(r"({}) ([ \d]\d) ([01]\d|2[0-3]):([0-5]\d):([0-5]\d)$".format("|".join(_MONTH_NAMES)))
# Lines not in syslog's form (`Mon DD HH:MM:SS ...`: spaces at 3 and 15) after a newline, found in bulk.
NOT_SYSLOG_AFTER_NEWLINE = re.compile(r"\n(?![^\n]{3} [^\n]{11} )")
_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
FULL_UUID = re.compile(_UUID)
# A VDI as SM prints it: `*85ff84a8[VHD](65.000G//33.836G|n)`, `cf4a78da(50.000G/1.2G/?)`, or a full UUID.
_VDI = r"(\*?(?:{}|[0-9a-f]{{8}})(?:\[[A-Z]{{1,8}}\])?(?:\([^)\n]{{0,200}}\))?(?:\[RAW\])?)".format(_UUID)
_VDI_KEY = re.compile(r"\*?({}|[0-9a-f]{{8}})".format(_UUID))
ANOTHER_GC = "Another GC instance already active, exiting"
# What the reader acts on: (rule, pattern of the text after `SMGC: [pid] `), tried in this order. Each
# pattern begins with a literal character, which lets the regex engine pass over the others at once;
# none reads more than a bounded stretch of a line past where it begins (the pattern is also tried
# within lines' text, see smlog.GcLog.feed_text).
_GC_RULES = (
    ("start", r"=== SR ({}): gc ===$".format(_UUID)),
    ("plugin_pass", r"Coalescing all in SR ({})\.\.\.$".format(_UUID)),
    ("summary", r"SR (?:(([0-9a-f]{{4}}) \('.{{0,{}}}'\))|({})) \(\d+ VDIs in \d+ VHD trees\):".format(
        MAX_SR_NAME, _UUID)),
    ("candidate", r"Leaf-[Cc]oalescing {} -> ".format(_VDI)),
    ("candidate", r"[Cc]oalescing {} -> ".format(_VDI)),
    ("no_space", r"No space to (?:leaf-)?coalesce {} \(free space: (-?\d+)\)$".format(_VDI)),
    ("offline_fits", r"\.\.\.but enough space if skip snap-coalesce$"),
    ("unpause_failed", r"ERROR: Failed to unpause VDI {}".format(_VDI)),
    ("vdi_disabled", r"Leaf-coalesce disabled for {}".format(_VDI)),
    ("vdi_disabled", r"Skipping (?:reset-on-boot|allow_caching=true) {}".format(_VDI)),
    ("sr_disabled", r"GC is disabled for this SR, abort$"),
    ("sr_disabled", r"Coalesce disabled for this SR$"),
    ("sr_disabled", r"Leaf-coalesce disabled for this SR$"),
    ("concurrent", r"The VDI (?:appears to have been concurrently (?:deleted|snapshotted)|"
                   r"tree appears to have been altered since|is no longer leaf-coalesceable)"),
    ("skip", r"Leaf-coalesce failed on {}, skipping".format(_VDI)),
    ("skip", r"Coalesce failed, skipping"),
    ("reason", r"Max iterations \(\d+\) exceeded$"),
    ("reason", r"No progress made for \d+ iterations$"),
    ("reason", r"Unexpected bump in size, compared to minimum achieved$"),
    ("end", r"No work, exiting$"),
    ("end", r"SR no longer attached, exiting$"),
    ("end", ANOTHER_GC + "$"),
    ("exiting", r"GC process exiting, no work left$"),
    ("aborted", r"Aborted$"),
    ("aborted", r"Term requested$"),
    ("error", r"\* \* \* \* \* SR ({}): ERROR$".format(_UUID)),
    ("iteration", r"Iteration: (\d+) -- Initial size (\d+) --> Final size (\d+)$"),
    ("size", r"Starting size was +(\d+(?:\.\d+)?)$"),
    ("size", r"Final size was +(\d+(?:\.\d+)?)$"),
    ("size", r"Minimum size achieved was +(\d+(?:\.\d+)?)$"),
)
# Lines rarer than those, each found by a pattern of its own (its literal start found fast), and what
# comes before that start on its line: (rule, pattern, pattern of the line from its host to that start).
_SIDE_RULES = (
    ("exception", r": EXCEPTION (?:<(?:class|type) '([^'\n]{{0,{0}}})'>|(\S+)), ?(.{{0,{0}}})".format(MAX_TEXT),
     r"[^ \n]+ SMGC: \[(\d+)\] (\S+)"),
    ("sm_line", r"\] Co(?:alesce failed on SR ({0}): (.{{0,{1}}})|"
                r"uld not coalesce due to a lack of space in SR ({0})$)".format(_UUID, MAX_TEXT),
     r"[^ \n]+ SM: \[(\d+)"),
)
# Figures whose words repeat from outcome to outcome: kept once.
_SHARED_FIGURES = frozenset(("exception", "reason"))
_SWITCHES = {"GC is disabled for this SR, abort": "gc", "Coalesce disabled for this SR": "coalesce",
             "Leaf-coalesce disabled for this SR": "leaf-coalesce", "Leaf-coalesce disabled for": "leaf-coalesce",
             "Skipping reset-on-boot": "on-boot=reset", "Skipping allow_caching=true": "allow-caching"}


def _compile_wanted():
    """One pattern for the rules, its match found from ` SMGC: [`; and by the number of the empty group
    that ends each rule's pattern (the group that matched last), (rule, the groups to read: the whole
    match, the rule's own groups, the pid's)."""
    wanted = re.compile(r" SMGC: \[(?:(\d+)\] {}|(?!\d+\]))".format(
        _alternation(["{}(?P<rule{}>)".format(pattern, number) for number, (_, pattern) in enumerate(_GC_RULES)])),
        re.MULTILINE)
    rules = {}
    for number, (name, pattern) in enumerate(_GC_RULES):
        marker = wanted.groupindex["rule{}".format(number)]
        rules[marker] = (name, (0,) + tuple(range(marker - re.compile(pattern).groups, marker)) + (1,))
    return wanted, rules


def _alternation(patterns):
    """The patterns as one alternation in which those that begin with the same literal characters share
    them, down to where they differ: the regex engine tries fewer of them (and their order among those
    that begin alike is kept; rules that begin differently never match the same text)."""
    items = _alternatives(patterns)
    return items[0] if len(items) == 1 else "(?:" + "|".join(items) + ")"


def _alternatives(patterns):
    shared, items = {}, []
    for pattern in patterns:
        atom = _literal_atom(pattern)
        if atom is None:
            items.append(pattern)
        elif atom in shared:
            shared[atom].append(pattern[len(atom):])
        else:
            shared[atom] = [pattern[len(atom):]]
            items.append(atom)
    return [item + _alternation(shared[item]) if item in shared else item for item in items]


def _literal_atom(pattern):
    """The literal character a pattern begins with, as written (`a`, `\\.`), None when it begins otherwise."""
    atom = pattern[:2] if pattern[:1] == "\\" and not pattern[1:2].isalnum() else pattern[:1]
    if not atom or atom in "^$.|?*+()[]{}\\" or pattern[len(atom):len(atom) + 1] in ("*", "+", "?", "{"):
        return None
    return atom


WANTED, RULES = _compile_wanted()
SIDES = tuple((name, re.compile(pattern, re.MULTILINE), re.compile(head)) for name, pattern, head in _SIDE_RULES)


def replay(rare, before, end):
    """Handle the rare lines [(where, handler, fields, stamp)] found before `before`; (those left, where
    the next one is or `end`)."""
    done = 0
    while done < len(rare) and rare[done][0] < before:
        _, handler, fields, stamp = rare[done]
        handler(fields, stamp)
        done += 1
    rare = rare[done:]
    return rare, rare[0][0] if rare else end


def stamp_of(head, stamps, minutes, now):
    """Unix time of a syslog stamp (`Jan  2 16:01:16`), None when it is not one; `stamps` and `minutes`
    keep those read so far (by their text, and by their minute)."""
    match = STAMP.match(head)
    if match is None:
        return None
    minute = head[:12]
    base = minutes.get(minute)
    if base is None:
        if len(minutes) >= MAX_STAMPS:
            minutes.clear()
        base = minutes[minute] = parse_time(*match.group(1, 2, 3, 4), second=0, now=now)
    if len(stamps) >= MAX_STAMPS:
        stamps.clear()
    stamp = stamps[head] = base + int(match.group(5))
    return stamp


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


def outcome(value):
    """An outcome as the state keeps it, `[kind, message, time]` and SM's figures when it gave some,
    as a dict {kind, message, time, figures}."""
    return {"kind": value[0], "message": value[1], "time": value[2],
            "figures": dict(value[3]) if len(value) > 3 and isinstance(value[3], dict) else {}}


def compact_outcomes(state):
    """The outcomes of a state read back, with shared words; those of an older state (dicts) converted.
    False when the state is not what this reader writes."""
    kinds = {kind: kind for kind in KINDS}
    try:
        for sr in state["srs"].values():
            vdis = sr["vdis"]
            for key, value in vdis.items():
                if type(value) is dict:
                    figures = [value["figures"]] if value.get("figures") else []
                    value = vdis[key] = [value["kind"], value["message"], value["time"]] + figures
                value[0] = kinds[value[0]]
                if value[1] == MERGED_TEXT:
                    value[1] = MERGED_TEXT
                for name in _SHARED_FIGURES.intersection(value[3] if len(value) > 3 else ()):
                    value[3][name] = sys.intern(value[3][name])
    except (TypeError, KeyError, IndexError, AttributeError):
        return False
    return True


def well_formed(state):
    """The state is of the shape this reader writes (a state of an earlier form gets its `held` passes)."""
    if not (isinstance(state, dict) and isinstance(state.get("srs"), dict) and isinstance(state.get("pids"), dict)
            and isinstance(state.get("lines"), dict)):
        return False
    held = state.setdefault("held", {})
    return isinstance(held, dict) and all(
        isinstance(passes, list) and all(isinstance(item, list) and len(item) == 4 for item in passes)
        for passes in held.values())


def hold_pass(state, pid, named, ambiguous, stamp):
    """A pass of the pid is held (`named`: the SR as its summary names it, `ambiguous`: known SRs share
    its digits): [named, ambiguous, its first stamp, its GC lines or None once past the cap]."""
    held = state["held"]
    passes = held.get(pid)
    if passes is None:
        if len(held) >= MAX_HELD_PIDS:
            drop_passes(state, held.pop(next(iter(held))))
        passes = held[pid] = []
    elif len(passes) >= MAX_HELD_PASSES:
        drop_passes(state, [passes.pop(0)])
    passes.append([named, ambiguous, stamp, []])


def keep_line(state, pid, line):
    """A GC line (rule, fields, stamp) of the pass the pid holds; past the cap the pass is dropped. None:
    the line is no run's yet."""
    passes = state["held"].get(pid)
    lines = passes[-1][3] if passes else None
    if lines is not None and len(lines) < MAX_HELD_LINES:
        lines.append(line)
        return None
    if passes:
        drop_passes(state, passes[-1:])
        passes[-1][3] = None
    _count_dropped(state, bool(passes and passes[-1][1]), 1)
    return None


def bound_lines(state, pid, sr_uuid, stamp):
    """The pid names the SR in full: the GC lines of its held pass of the SR's digits, those it held
    before ended unbound (dropped). Never a guess: several passes or known SRs of those digits, or a pass
    too old or past the cap, give None (dropped)."""
    passes = state["held"][pid]
    index = next((at for at, item in enumerate(passes) if sr_uuid.startswith(item[0][:4])), None)
    if index is None:
        return None
    bound, digits = passes[index], passes[index][0][:4]
    alike = [item for item in passes[index + 1:] if item[0][:4] == digits]
    drop_passes(state, passes[:index])
    passes[:] = [item for item in passes[index + 1:] if item[0][:4] != digits]
    if not passes:
        del state["held"][pid]
    ambiguous = bool(alike) or any(uuid[:4] == digits and uuid != sr_uuid for uuid in state["srs"])
    if ambiguous or bound[1] or not bound[3] or stamp - bound[2] > CHILD_WINDOW_SECONDS:
        drop_passes(state, [[named, ambiguous or was, first, kept] for named, was, first, kept in [bound] + alike])
        return None
    return bound[3]


def drop_passes(state, passes):
    """Held passes no process named: their GC lines are counted (`unattributed`, or `ambiguous` when SRs
    shared their digits), never read as a run."""
    for _, ambiguous, _, lines in passes:
        _count_dropped(state, ambiguous, len(lines or ()))


def _count_dropped(state, ambiguous, count):
    counts = state["lines"]
    name = "ambiguous" if ambiguous else "unattributed"
    counts[name] = counts.get(name, 0) + count


def exception_kind(message):
    """The outcome kind of an exception SM logged against a coalesce, by its message."""
    if "could not be coalesced" in message:
        return GAVE_UP
    if "Timed out" in message:
        return TIMED_OUT
    if "Failed to unpause" in message:
        return UNPAUSE_FAILED
    if "Failed to pause" in message:
        return PAUSE_FAILED
    return FAILED


def said_in(fields):
    """The text of the line a rule matched, as far as the rule reads it (fields[0] is the whole match)."""
    whole = fields[0]
    return whole[whole.index("] ") + 2:]


def switch_of(said):
    """The switch a `... disabled` or `Skipping ...` line names (`gc`, `leaf-coalesce`, ...)."""
    return next(switch for words, switch in _SWITCHES.items() if said.startswith(words))


def tracker_figures(tracker):
    """The figures a run's tracker (sizes, rounds, reason) gave, as an outcome keeps them."""
    figures = {}
    for name, field in (("starting", "start_bytes"), ("final", "final_bytes"), ("minimum", "minimum_bytes"),
                        ("rounds", "rounds"), ("reason", "reason")):
        if name in tracker:
            figures[field] = tracker[name]
    return figures
