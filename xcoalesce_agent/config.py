"""The agent's INI file: one declarative schema, one loader, errors naming file, line and key.

`load(path) -> Config`; values are typed: `config.xapi.socket`, `config.coalesce.windows`, ...
Every path the agent touches on a host is a key here, which is how the simulated host is used.
"""
import collections
import configparser
import math
import os
import re

from .errors import ConfigError

DEFAULT_PATH = "/etc/xcoalesce-agent/agent.conf"
DEFAULT_LISTEN_ADDRESS = "0.0.0.0:10530"

STRATEGIES = ("gc", "live", "plugin")
MODES = ("off", "report", "auto")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")

# One maintenance window: `days` is a frozenset of weekday numbers (Monday 0, as
# `datetime.weekday()`), naming the day the window opens; `start` and `end` are minutes since
# midnight (end may be 1440). When end < start the window runs past midnight into the next day.
Window = collections.namedtuple("Window", "days start end")

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?$", re.IGNORECASE)
_TIME = re.compile(r"^(\d{1,2}):(\d{2})$")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_IEC = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


# Value parsers: text -> typed value, raising ValueError with what is wrong.

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


def integer(minimum):
    def parse(value):
        try:
            number = int(value)
        except ValueError:
            raise ValueError("expected an integer, got {!r}".format(value)) from None
        if number < minimum:
            raise ValueError("must be at least {}, got {}".format(minimum, number))
        return number
    return parse


def number(minimum, exclusive=False):
    def parse(value):
        try:
            result = float(value)
        except ValueError:
            raise ValueError("expected a number, got {!r}".format(value)) from None
        if math.isnan(result) or math.isinf(result):
            raise ValueError("expected a finite number, got {!r}".format(value))
        if result < minimum or (exclusive and result == minimum):
            raise ValueError("must be {} {:g}, got {!r}".format(
                "greater than" if exclusive else "at least", minimum, value))
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
    return int(float(match.group(1)) * _IEC[match.group(2).lower()])


def listen_address(value):
    """`host:port`, `:port` (all addresses) or `[v6 address]:port`."""
    host, separator, port = value.rpartition(":")
    if not separator or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected ADDRESS:PORT with a port from 1 to 65535, got {!r}".format(value))
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        raise ValueError("write an IPv6 address in brackets, as [::]:PORT, got {!r}".format(value))
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


class Key(object):
    """One configuration key: where it lives, how its text becomes a value, and its default."""

    def __init__(self, section, name, parse, default):
        self.section = section
        self.name = name
        self.parse = parse
        self.default = default


SCHEMA = (
    Key("agent", "state_dir", absolute_path, "/var/lib/xcoalesce-agent"),
    Key("agent", "log_level", choice(LOG_LEVELS), "info"),
    Key("xapi", "socket", absolute_path, "/var/lib/xcp/xapi"),
    Key("xapi", "inventory", absolute_path, "/etc/xensource-inventory"),
    Key("xapi", "timeout_seconds", number(0, exclusive=True), 60.0),
    Key("tools", "vhd_util", absolute_path, "/usr/bin/vhd-util"),
    Key("tools", "path", search_path, "/usr/sbin:/usr/bin:/sbin:/bin"),
    Key("tools", "timeout_seconds", number(0, exclusive=True), 300.0),
    Key("storage", "sr_mount_dir", absolute_path, "/run/sr-mount"),
    Key("storage", "speed_log_dir", absolute_path, "/run"),
    Key("storage", "sm_lock_dir", absolute_path, "/var/lock/sm"),
    Key("storage", "lvm_device_dir", absolute_path, "/dev"),
    Key("inspection", "interval_seconds", number(0, exclusive=True), 300.0),
    Key("web", "listen_address", listen_address, DEFAULT_LISTEN_ADDRESS),
    Key("web", "tls_cert_file", optional_path, ""),
    Key("web", "tls_key_file", optional_path, ""),
    Key("web", "basic_auth_username", text, ""),
    Key("web", "basic_auth_password_sha256", sha256_hex, ""),
    Key("coalesce", "mode", choice(MODES), "report"),
    Key("coalesce", "strategies", choice_list(STRATEGIES), list(STRATEGIES)),
    Key("coalesce", "max_freeze_seconds", number(0, exclusive=True), 10.0),
    Key("coalesce", "windows", windows, []),
    Key("coalesce", "max_vms_per_window", integer(0), 0),
    Key("coalesce", "max_bytes_per_window", byte_size, 0),
    Key("coalesce", "allow_ha_protected", boolean, False),
    Key("coalesce", "max_load_per_cpu", number(0), 0.0),
    Key("coalesce", "exclude_vms", uuid_list, []),
    Key("coalesce", "exclude_vdis", uuid_list, []),
    Key("coalesce", "exclude_tag", text, "xcoalesce-exclude"),
    Key("coalesce", "gc_wait_seconds", number(0, exclusive=True), 3600.0),
    Key("coalesce", "plugin_timeout_seconds", number(0, exclusive=True), 3600.0),
    Key("coalesce", "trigger_on_snapshot_delete", boolean, False),
)

SECTIONS = tuple(collections.OrderedDict((key.section, None) for key in SCHEMA))
_KEYS = {(key.section, key.name): key for key in SCHEMA}

# Keys that only make sense together: (section, key, other key).
_PAIRS = (
    ("web", "tls_cert_file", "tls_key_file"),
    ("web", "basic_auth_username", "basic_auth_password_sha256"),
)


class Section(object):
    """The typed values of one section, as attributes."""

    def __init__(self, name, values):
        self._name = name
        self.__dict__.update(values)

    def __repr__(self):
        values = {key: value for key, value in self.__dict__.items() if not key.startswith("_")}
        return "Section({!r}, {!r})".format(self._name, values)


class Config(object):
    """The whole configuration: `config.<section>.<key>`, and `config.path` it was read from."""

    def __init__(self, path, values):
        self.path = path
        for section in SECTIONS:
            setattr(self, section, Section(section, values[section]))


def defaults(path=None):
    """The configuration of a real Dom0, with nothing read."""
    return Config(path, _default_values())


def _default_values():
    values = {section: {} for section in SECTIONS}
    for key in SCHEMA:
        default = key.default
        values[key.section][key.name] = list(default) if isinstance(default, list) else default
    return values


def load(path=None):
    """Read and validate the file; a missing default file gives the defaults, a missing given one an error."""
    explicit = path is not None
    path = path if explicit else DEFAULT_PATH
    try:
        with open(path, encoding="utf-8") as stream:
            content = stream.read()
    except FileNotFoundError:
        if explicit:
            raise ConfigError("{}: no such configuration file".format(path)) from None
        return defaults(path)
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError("{}: cannot read: {}".format(path, getattr(error, "strerror", None) or error)) from None
    return Config(path, parse(content, path))


def parse(content, path):
    """Typed values per section from the file's text; `path` only names the file in errors."""
    parser = configparser.ConfigParser(interpolation=None, strict=True, default_section="\0",
                                       empty_lines_in_values=False)
    try:
        parser.read_string(content, source=path)
    except configparser.Error as error:
        raise ConfigError(_parser_error(error, path)) from None
    lines = _locate(content)

    def fail(line_key, message):
        raise ConfigError("{}:{}: {}".format(path, lines.get(line_key, 1), message))

    values = _default_values()
    for section in parser.sections():
        if section not in values:
            fail((section, None), "[{}]: unknown section (known: {})".format(section, ", ".join(SECTIONS)))
        for name, value in parser.items(section):
            key = _KEYS.get((section, name))
            if key is None:
                fail((section, name), "[{}] {}: unknown key".format(section, name))
            try:
                values[section][name] = key.parse(value.strip())
            except ValueError as error:
                fail((section, name), "[{}] {}: {}".format(section, name, error))
    for section, first, second in _PAIRS:
        given = values[section]
        if bool(given[first]) != bool(given[second]):
            present, missing = (first, second) if given[first] else (second, first)
            fail((section, present), "[{}] {}: needs {} as well".format(section, present, missing))
    return values


def _parser_error(error, path):
    lineno = getattr(error, "lineno", None)
    if isinstance(error, configparser.MissingSectionHeaderError):
        return "{}:{}: a key before any [section]".format(path, lineno)
    if isinstance(error, configparser.DuplicateSectionError):
        return "{}:{}: [{}]: section given twice".format(path, lineno, error.section)
    if isinstance(error, configparser.DuplicateOptionError):
        return "{}:{}: [{}] {}: key given twice".format(path, lineno, error.section, error.option)
    if isinstance(error, configparser.ParsingError) and error.errors:
        lineno, line = error.errors[0]
        return "{}:{}: not a `key = value` line: {}".format(path, lineno, line.strip())
    return "{}: {}".format(path, str(error).splitlines()[0])


def _locate(content):
    """Line numbers of section headers (key None) and keys, found by scanning the text."""
    lines = {}
    section = None
    for number, line in enumerate(content.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;" or line[0].isspace():
            continue
        if stripped.startswith("[") and "]" in stripped:
            section = stripped[1:stripped.index("]")]
            lines.setdefault((section, None), number)
            continue
        name = re.split(r"[=:]", stripped, maxsplit=1)[0].strip().lower()
        lines.setdefault((section, name), number)
    return lines
