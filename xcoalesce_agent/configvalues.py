"""The value types of the agent's INI file: text -> typed value, raising ValueError with what is wrong.

Numbers carry their range (`parse.bounds`), which the loader checks and docs/configuration.md shows.
"""
import collections
import ipaddress
import math
import os
import re

WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")

# One maintenance window: `days` is a frozenset of weekday numbers (Monday 0, as
# `datetime.weekday()`), naming the day the window opens; `start` and `end` are minutes since
# midnight (end may be 1440). When end < start the window runs past midnight into the next day.
Window = collections.namedtuple("Window", "days start end")

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?$", re.IGNORECASE)
_TIME = re.compile(r"^(\d{1,2}):(\d{2})$")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_ZONE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_IEC = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def text(value):
    return value


def absolute_path(value):
    if not value.startswith("/"):
        raise ValueError("expected an absolute path, got {!r}".format(value))
    return os.path.normpath(value)


def optional_path(value):
    return absolute_path(value) if value else ""


def search_path(value):
    """A PATH-like list of absolute directories separated by ':'."""
    parts = value.split(":")
    for part in parts:
        if not part.startswith("/"):
            raise ValueError("expected absolute directories separated by ':', got {!r}".format(value))
    return value


def _ranged(minimum, maximum, exclusive, shown):
    """Decorates a parser of numbers: its result must lie in [minimum, maximum] ((minimum, maximum] when
    `exclusive`); `shown` writes a bound in errors. The bounds stay on the parser as `bounds`."""
    def decorate(parse_text):
        def parse(value):
            result = parse_text(value)
            if result < minimum or (exclusive and result == minimum) or result > maximum:
                raise ValueError("must be {} {} and at most {}, got {!r}".format(
                    "greater than" if exclusive else "at least", shown(minimum), shown(maximum), value))
            return result
        parse.bounds = (minimum, maximum)
        return parse
    return decorate


def integer(minimum, maximum):
    @_ranged(minimum, maximum, False, str)
    def parse(value):
        try:
            return int(value)
        except ValueError:
            raise ValueError("expected an integer, got {!r}".format(value)) from None
    return parse


def number(minimum, maximum, exclusive=False):
    """A finite decimal number from `minimum` (excluded when `exclusive`) to `maximum`."""
    @_ranged(minimum, maximum, exclusive, "{:g}".format)
    def parse(value):
        try:
            result = float(value)
        except ValueError:
            raise ValueError("expected a number, got {!r}".format(value)) from None
        if math.isnan(result) or math.isinf(result):
            raise ValueError("expected a finite number, got {!r}".format(value))
        return result
    return parse


def boolean(value):
    lowered = value.lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise ValueError("expected true or false, got {!r}".format(value))


def choice(options):
    def parse(value):
        if value.lower() not in options:
            raise ValueError("expected one of {}, got {!r}".format(", ".join(options), value))
        return value.lower()
    return parse


def _items(value):
    return [item for item in re.split(r"[\s,]+", value) if item]


def choice_list(options):
    def parse(value):
        items = [item.lower() for item in _items(value)]
        if not items:
            raise ValueError("expected at least one of {}".format(", ".join(options)))
        for item in items:
            if item not in options:
                raise ValueError("expected a list of {}, got {!r}".format(", ".join(options), item))
        if len(set(items)) != len(items):
            raise ValueError("lists an item twice: {!r}".format(value))
        return items
    return parse


def uuid_list(value):
    items = [item.lower() for item in _items(value)]
    for item in items:
        if not _UUID.match(item):
            raise ValueError("expected UUIDs separated by commas, got {!r}".format(item))
    return items


def byte_size(value):
    """`1073741824`, `512M`, `10G`, `1.5TiB`: K, M, G and T are powers of 1024."""
    match = _SIZE.match(value.strip())
    if not match:
        raise ValueError("expected a size in bytes with an optional K, M, G or T suffix, got {!r}".format(value))
    amount = float(match.group(1)) * _IEC[match.group(2).lower()]
    if math.isinf(amount):
        raise ValueError("not a size: {!r}".format(value))
    return int(amount)


def _iec(amount):
    """A byte count with the largest suffix that writes it exactly: `1024T`, `512M`, `0`."""
    for suffix in "TGMK":
        if amount and amount % _IEC[suffix.lower()] == 0:
            return "{}{}".format(amount // _IEC[suffix.lower()], suffix)
    return str(amount)


def byte_size_range(minimum, maximum):
    return _ranged(minimum, maximum, False, _iec)(byte_size)


def listen_address(value):
    """`host:port`, `:port` (all addresses) or `[v6 address]:port`; a host that is no IP address
    must be a host name (RFC 1123), the only text ever given to the resolver when binding."""
    host, separator, port = value.rpartition(":")
    if not separator or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected ADDRESS:PORT with a port from 1 to 65535, got {!r}".format(value))
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        raise ValueError("write an IPv6 address in brackets, as [::]:PORT, got {!r}".format(value))
    if host.startswith("["):
        if not _ipv6_address(host[1:-1]):
            raise ValueError("not an IPv6 address in brackets: {!r}".format(host))
    elif host and not _ipv4_address(host) and not plausible_host_name(host):
        raise ValueError("neither an IP address nor a host name: {!r}".format(host))
    return value


def _ipv4_address(text):
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv4Address)
    except ValueError:
        return False


def _ipv6_address(text):
    """An IPv6 address, with a zone (`fe80::1%eth0`) allowed."""
    address, separator, zone = text.partition("%")
    try:
        ipaddress.IPv6Address(address)
    except ValueError:
        return False
    return not separator or bool(_ZONE.fullmatch(zone))


def plausible_host_name(text):
    """RFC 1123: dot-separated labels of letters, digits and inner hyphens, at most 63 characters each,
    253 in all; a last label of digits only would be a malformed IPv4 address."""
    labels = text[:-1].split(".") if text.endswith(".") else text.split(".")
    return (len(text) <= 253 and all(_LABEL.fullmatch(label) for label in labels)
            and not labels[-1].isdigit())


def basic_auth_username(value):
    """RFC 7617: a user-id holds no colon (the password starts after the first) and no control character."""
    if ":" in value or any(ord(character) < 32 or ord(character) == 127 for character in value):
        raise ValueError("cannot hold ':' or control characters (RFC 7617: the password starts after the first ':')")
    return value


def sha256_hex(value):
    if value and not _SHA256.match(value):
        raise ValueError("expected 64 hexadecimal digits (sha256 of the password)")
    return value.lower()


def _minutes(value, allow_end_of_day):
    match = _TIME.match(value)
    if not match:
        raise ValueError("expected a time HH:MM, got {!r}".format(value))
    hours, minutes = int(match.group(1)), int(match.group(2))
    total = hours * 60 + minutes
    if minutes > 59 or total > 1440 or (total == 1440 and not allow_end_of_day):
        raise ValueError("not a time of day: {!r}".format(value))
    return total


def _weekday(name):
    lowered = name.strip().lower()
    for index, full in enumerate(WEEKDAYS):
        if lowered in (full, full[:3]):
            return index
    raise ValueError("not a day of the week: {!r} (use Mon, Tue, ... Sun)".format(name.strip()))


def _days(value):
    days = set()
    for item in value.split(","):
        first, dash, last = item.strip().partition("-")
        start = _weekday(first)
        if not dash:
            days.add(start)
            continue
        end = _weekday(last)
        day = start
        days.add(day)
        while day != end:
            day = (day + 1) % 7
            days.add(day)
    return frozenset(days)


def windows(value):
    """`Sat,Sun 01:00-05:00; Mon-Fri 02:00-03:30`; days may be left out (every day); empty: any time."""
    result = []
    for entry in value.split(";"):
        entry = entry.strip()
        if not entry:
            continue
        days_text, _, span = entry.rpartition(" ")
        start, dash, end = span.partition("-")
        if not dash:
            raise ValueError("expected [DAYS] HH:MM-HH:MM, got {!r}".format(entry))
        days = _days(days_text) if days_text.strip() else frozenset(range(7))
        window = Window(days, _minutes(start, False), _minutes(end, True))
        if window.start == window.end:
            raise ValueError("window {!r} is empty".format(entry))
        result.append(window)
    return result
