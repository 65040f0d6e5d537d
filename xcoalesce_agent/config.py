"""The agent's INI file: one declarative schema, one loader, errors naming file, line and key.

`load(path) -> Config`; values are typed: `config.xapi.socket`, `config.coalesce.windows`, ...
Every path the agent touches on a host is a key here, which is how the simulated host is used.
"""
import collections
import configparser
import ipaddress
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
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_ZONE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
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


class Key(object):
    """One configuration key: where it lives, how its text becomes a value, and its default."""

    def __init__(self, section, name, parse, default):
        self.section = section
        self.name = name
        self.parse = parse
        self.default = default


HOUR = 3600
DAY = 86400

# Every number has a range, checked at load: timeouts and waits stay far below what threading,
# select and time_t accept, so no value that loads can crash a wait later.
SCHEMA = (
    Key("agent", "state_dir", absolute_path, "/var/lib/xcoalesce-agent"),
    Key("agent", "log_level", choice(LOG_LEVELS), "info"),
    # Off a terminal, how often a long step (a GC wait, the plugin, an inspection) logs where it is.
    Key("agent", "progress_log_seconds", number(1, HOUR), 30.0),
    Key("xapi", "socket", absolute_path, "/var/lib/xcp/xapi"),
    Key("xapi", "inventory", absolute_path, "/etc/xensource-inventory"),
    # The local xapi answers in seconds; after an hour it is hung.
    Key("xapi", "timeout_seconds", number(1, HOUR), 60.0),
    Key("tools", "vhd_util", absolute_path, "/usr/bin/vhd-util"),
    # QCOW2 cluster bitmaps: SM's helper (XCP-ng 8.3), else qemu-img map; neither need be installed.
    Key("tools", "qcow2_helper", absolute_path, "/opt/xensource/libexec/qcow2_helper"),
    Key("tools", "qemu_img", absolute_path, "/usr/bin/qemu-img"),
    Key("tools", "path", search_path, "/usr/sbin:/usr/bin:/sbin:/bin"),
    # A vhd-util scan of the largest LVM SR takes minutes; after an hour it is hung.
    Key("tools", "timeout_seconds", number(1, HOUR), 300.0),
    Key("storage", "sr_mount_dir", absolute_path, "/run/sr-mount"),
    Key("storage", "speed_log_dir", absolute_path, "/run"),
    Key("storage", "sm_lock_dir", absolute_path, "/var/lock/sm"),
    Key("storage", "lvm_device_dir", absolute_path, "/dev"),
    # Where SM logs its GC (rsyslog, facility LOCAL2); rotated to <path>.1 beside it.
    Key("storage", "smlog_path", absolute_path, "/var/log/SMlog"),
    # From a second (tests, demos) to a day: /metrics must not go stale for longer.
    Key("inspection", "interval_seconds", number(1, DAY), 300.0),
    Key("web", "listen_address", listen_address, DEFAULT_LISTEN_ADDRESS),
    Key("web", "tls_cert_file", optional_path, ""),
    Key("web", "tls_key_file", optional_path, ""),
    Key("web", "basic_auth_username", basic_auth_username, ""),
    Key("web", "basic_auth_password_sha256", sha256_hex, ""),
    Key("coalesce", "mode", choice(MODES), "report"),
    Key("coalesce", "strategies", choice_list(STRATEGIES), list(STRATEGIES)),
    # Guests time out I/O stalled for minutes (Linux reports hung tasks after 120 s): ten minutes at most.
    Key("coalesce", "max_freeze_seconds", number(0, 600, exclusive=True), 10.0),
    Key("coalesce", "windows", windows, []),
    # 0: no cap; 10000 VMs is more than a pool runs.
    Key("coalesce", "max_vms_per_window", integer(0, 10000), 0),
    # 0: no cap; 1 PiB is more than a pool's SRs hold.
    Key("coalesce", "max_bytes_per_window", byte_size_range(0, 1 << 50), 0),
    Key("coalesce", "allow_ha_protected", boolean, False),
    # 0: no check; a Dom0 with a load of 100 per CPU is not working anyway.
    Key("coalesce", "max_load_per_cpu", number(0, 100), 0.0),
    Key("coalesce", "exclude_vms", uuid_list, []),
    Key("coalesce", "exclude_vdis", uuid_list, []),
    Key("coalesce", "exclude_tag", text, "xcoalesce-exclude"),
    # The GC of a large SR can run for hours; a day at most.
    Key("coalesce", "gc_wait_seconds", number(1, DAY), 3600.0),
    # The plugin's merge lasts as long as the leaf takes to merge; a day at most.
    Key("coalesce", "plugin_timeout_seconds", number(1, DAY), 3600.0),
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


def parse_value(section, name, value):
    """The typed value of one key's text, as the file would give it: for command-line overrides."""
    return _KEYS[(section, name)].parse(value.strip())


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
