"""The agent's INI file: one declarative schema, one loader, errors naming file, line and key.

`load(path) -> Config`; values are typed: `config.xapi.socket`, `config.coalesce.windows`, ...
Every path the agent touches on a host is a key here, which is how the simulated host is used.
"""
import collections
import configparser
import re

from .configvalues import (absolute_path, basic_auth_username, boolean, byte_size_range, choice, choice_list,
                           integer, listen_address, number, optional_path, search_path, sha256_hex, text,
                           uuid_list, windows)
from .errors import ConfigError

DEFAULT_PATH = "/etc/xcoalesce-agent/agent.conf"
DEFAULT_LISTEN_ADDRESS = "0.0.0.0:10530"

STRATEGIES = ("gc", "live", "plugin")
MODES = ("off", "report", "auto")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


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
    for line_number, line in enumerate(content.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;" or line[0].isspace():
            continue
        if stripped.startswith("[") and "]" in stripped:
            section = stripped[1:stripped.index("]")]
            lines.setdefault((section, None), line_number)
            continue
        name = re.split(r"[=:]", stripped, maxsplit=1)[0].strip().lower()
        lines.setdefault((section, name), line_number)
    return lines
