"""Text from xapi or from files, made safe to print: one line, control characters escaped.

A name is whatever the pool's users typed into XenCenter or `xe`: it may hold a newline that would
split a table row or forge a log line, a terminal escape, or ten thousand characters. `one_line`
escapes control characters (C0, DEL, C1 with NEL, the Unicode line and paragraph separators, the
bidirectional overrides that reorder what follows them); `cell` also shortens to a width counted
in terminal columns, and `table` aligns cells by those columns. `OneLineFormatter` applies
`one_line` to every log message, so no call site has to. JSON output keeps names exact.
"""
import logging
import re
import unicodedata

NAME_WIDTH = 28
MESSAGE_WIDTH = 200
ELLIPSIS = "…"

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match):
    character = match.group()
    named = _NAMED.get(character)
    if named:
        return named
    code = ord(character)
    return "\\x{:02x}".format(code) if code < 0x100 else "\\u{:04x}".format(code)


def one_line(text):
    """`text` with every control character written as an escape (`\\n`, `\\t`, `\\x1b`, `\\u2028`)."""
    return _CONTROL.sub(_escape, text)


def _columns(character):
    if unicodedata.combining(character) or unicodedata.category(character) == "Cf":
        return 0
    return 2 if unicodedata.east_asian_width(character) in ("W", "F") else 1


def display_width(text):
    """Terminal columns `text` takes: wide (East Asian) characters two, combining marks none."""
    return sum(_columns(character) for character in text)


def cell(text, width=NAME_WIDTH):
    """`text` on one line and at most `width` columns, shortened with an ellipsis."""
    text = one_line(text or "")
    if display_width(text) <= width:
        return text
    kept, used = [], 0
    for character in text:
        used += _columns(character)
        if used > width - 1:
            break
        kept.append(character)
    return "".join(kept) + ELLIPSIS


def table(rows, indent=""):
    """Lines of `rows` (sequences of one-line cells) in columns two spaces apart; the last column is
    not padded, so a long reason does not widen the others."""
    widths = [max(display_width(row[index]) for row in rows) for index in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        padded = [row[index] + " " * (width - display_width(row[index])) for index, width in enumerate(widths)]
        lines.append((indent + "  ".join(padded + [row[-1]])).rstrip())
    return lines


class OneLineFormatter(logging.Formatter):
    """A log record is one line whatever its arguments hold; a logged traceback keeps its own lines,
    the messages of the exceptions in it made one line each."""

    def formatMessage(self, record):
        return one_line(super(OneLineFormatter, self).formatMessage(record))

    def formatException(self, exc_info):
        text = super(OneLineFormatter, self).formatException(exc_info)
        error, seen = exc_info[1], set()
        while error is not None and id(error) not in seen:
            seen.add(id(error))
            message = str(error)
            if one_line(message) != message:
                text = text.replace(message, one_line(message))
            error = error.__cause__ or error.__context__
        return text
