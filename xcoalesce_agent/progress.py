"""Where long work is: one line redrawn on a terminal, or a periodic log line elsewhere.

The agent's long steps (inspecting SRs, waiting for SM's GC, the `coalesce-leaf` plugin) call
`step(text)` when they begin, `update(fraction, detail)` while they last and `done()` at the end.
cli.py installs once which reporter receives them (`install`): `TerminalProgress` when stderr is
a terminal and the agent is not the service, `LogProgress` otherwise; until then nothing is shown.
"""
import logging
import shutil
import time

from .printable import cell

LOG = logging.getLogger(__name__)

# A terminal line is redrawn at most this often (seconds).
REDRAW_SECONDS = 0.25
CLEAR_LINE = "\r\x1b[K"


def format_line(step_text, fraction=None, detail=""):
    """`step: 40%, detail`: the facts of one moment (control characters in names escaped later)."""
    parts = []
    if fraction is not None:
        parts.append("{:.0f}%".format(100.0 * min(max(fraction, 0.0), 1.0)))
    if detail:
        parts.append(detail)
    if not parts:
        return step_text
    return "{}: {}".format(step_text, ", ".join(parts)) if step_text else ", ".join(parts)


def waited(seconds, at_most):
    """`25 s of at most 3600 s`."""
    return "{:.0f} s of at most {:g} s".format(seconds, at_most)


def time_left(elapsed, fraction):
    """Seconds left if the rest goes as fast as what was done, or None when nothing is done yet."""
    if not fraction or fraction <= 0 or fraction > 1 or elapsed <= 0:
        return None
    return elapsed * (1.0 - fraction) / fraction


class Throttle(object):
    """True at most once every `interval` seconds of `clock` (the first call is always True)."""

    def __init__(self, interval, clock=time.monotonic):
        self.interval = interval
        self.clock = clock
        self.last = None

    def due(self):
        now = self.clock()
        if self.last is not None and now - self.last < self.interval:
            return False
        self.last = now
        return True

    def start(self):
        """Count the interval from now, as if a line had just been shown."""
        self.last = self.clock()

    def reset(self):
        self.last = None


class Silent(object):
    """Shows nothing: the reporter until one is installed."""

    def step(self, text):
        pass

    def update(self, fraction=None, detail=""):
        pass

    def done(self):
        pass


class LogProgress(Silent):
    """An INFO line every `interval` seconds while a step lasts: for the journal and for pipes."""

    def __init__(self, interval, clock=time.monotonic, log=LOG):
        self.throttle = Throttle(interval, clock)
        self.log = log
        self.text = ""

    def step(self, text):
        self.text = text
        if self.throttle.last is None:  # the first line comes once the work has lasted `interval`
            self.throttle.start()
        else:
            self.update()

    def update(self, fraction=None, detail=""):
        if self.throttle.due():
            self.log.info("%s", format_line(self.text, fraction, detail))

    def done(self):
        self.text = ""
        self.throttle.reset()


class TerminalProgress(Silent):
    """One line on a terminal, redrawn in place (`\\r` and erase line) at most every REDRAW_SECONDS
    and erased by `done()`; a log record erases it first (`logging.Filter` of the stderr handler),
    so normal output is never mixed with it."""

    def __init__(self, stream, clock=time.monotonic, width=None):
        self.stream = stream
        self.throttle = Throttle(REDRAW_SECONDS, clock)
        self.width = width
        self.text = ""
        self.shown = False

    def step(self, text):
        self.text = text
        self.throttle.reset()
        self.update()

    def update(self, fraction=None, detail=""):
        if self.throttle.due():
            width = self.width or shutil.get_terminal_size().columns
            # one column short of the width, so the cursor never wraps to a new line
            self._write(CLEAR_LINE + cell(format_line(self.text, fraction, detail), max(width - 1, 1)))
            self.shown = True

    def done(self):
        self.text = ""
        self.clear()

    def clear(self):
        if self.shown:
            self._write(CLEAR_LINE)
            self.shown = False
            self.throttle.reset()

    def filter(self, record):
        """As a logging filter: erase the line before the record is written."""
        self.clear()
        return True

    def _write(self, text):
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass


_reporter = Silent()


def install(reporter):
    """Make `reporter` receive every step from now on; returns it."""
    global _reporter
    _reporter.done()
    _reporter = reporter
    return reporter


def step(text):
    _reporter.step(text)


def update(fraction=None, detail=""):
    _reporter.update(fraction, detail)


def done():
    _reporter.done()
