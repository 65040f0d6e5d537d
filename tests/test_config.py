"""The configuration file: every key typed, every mistake named by file, line and key."""
import os
import re

import pytest

from xcoalesce_agent import config, configvalues
from xcoalesce_agent.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "agent.conf"
    path.write_text(text)
    return str(path)


def load_error(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert caught.value.exit_code == 2
    message = caught.value.message
    assert "\n" not in message
    return message.replace(path, "FILE")


def test_defaults_are_those_of_a_real_dom0(tmp_path):
    loaded = config.load(write(tmp_path, ""))
    assert loaded.xapi.socket == "/var/lib/xcp/xapi"
    assert loaded.xapi.inventory == "/etc/xensource-inventory"
    assert loaded.tools.vhd_util == "/usr/bin/vhd-util"
    assert loaded.tools.path == "/usr/sbin:/usr/bin:/sbin:/bin"
    assert loaded.storage.sr_mount_dir == "/run/sr-mount"
    assert loaded.storage.sm_lock_dir == "/var/lock/sm"
    assert loaded.inspection.interval_seconds == 300
    assert loaded.web.listen_address == config.DEFAULT_LISTEN_ADDRESS
    assert loaded.coalesce.mode == "report"
    assert loaded.coalesce.strategies == ["gc", "live", "plugin"]
    assert loaded.coalesce.max_freeze_seconds == 10.0
    assert loaded.coalesce.windows == []
    assert loaded.coalesce.exclude_tag == "xcoalesce-exclude"
    assert loaded.coalesce.gc_wait_seconds == 3600
    assert loaded.coalesce.trigger_on_snapshot_delete is False


def test_every_schema_key_has_a_parseable_default():
    loaded = config.defaults()
    for key in config.SCHEMA:
        assert getattr(getattr(loaded, key.section), key.name) == key.default


def test_typed_values(tmp_path):
    loaded = config.load(write(tmp_path, """
[agent]
state_dir = /srv/state/
log_level = DEBUG

[coalesce]
mode = auto
strategies = live, plugin
max_freeze_seconds = 2.5
windows = Sat,Sun 01:00-05:00; Mon-Fri 02:00-03:30; Fri-Mon 22:00-02:00; 00:00-24:00
max_vms_per_window = 3
max_bytes_per_window = 1.5T
allow_ha_protected = yes
exclude_vms = 0b6b8b1e-3b7e-4c3f-9c7e-1f0e2d3c4b5a, 1B6B8B1E-3B7E-4C3F-9C7E-1F0E2D3C4B5A
""".lstrip()))
    assert loaded.agent.state_dir == "/srv/state"
    assert loaded.agent.log_level == "debug"
    assert loaded.coalesce.mode == "auto"
    assert loaded.coalesce.strategies == ["live", "plugin"]
    assert loaded.coalesce.max_freeze_seconds == 2.5
    assert loaded.coalesce.windows == [
        configvalues.Window(frozenset([5, 6]), 60, 300),
        configvalues.Window(frozenset(range(5)), 120, 210),
        configvalues.Window(frozenset([4, 5, 6, 0]), 1320, 120),
        configvalues.Window(frozenset(range(7)), 0, 1440),
    ]
    assert loaded.coalesce.max_vms_per_window == 3
    assert loaded.coalesce.max_bytes_per_window == 3 << 39
    assert loaded.coalesce.allow_ha_protected is True
    assert loaded.coalesce.exclude_vms[1] == "1b6b8b1e-3b7e-4c3f-9c7e-1f0e2d3c4b5a"


@pytest.mark.parametrize("text, size", [("0", 0), ("4096", 4096), ("1K", 1024), ("10G", 10 << 30),
                                        ("512MiB", 512 << 20), ("2 TB", 2 << 40)])
def test_sizes_are_iec(text, size):
    assert configvalues.byte_size(text) == size


@pytest.mark.parametrize("text, expected", [
    ("[agent]\nlog_level = info\n\n[coalesce]\n# comment\nmode = sometimes\n",
     "FILE:6: [coalesce] mode: expected one of off, report, auto, got 'sometimes'"),
    ("[agent]\nlog_level = info\ncolour = blue\n", "FILE:3: [agent] colour: unknown key"),
    ("[agent]\n[gui]\nx = 1\n", "FILE:2: [gui]: unknown section"),
    ("[xapi]\ntimeout_seconds = soon\n", "FILE:2: [xapi] timeout_seconds: expected a number, got 'soon'"),
    ("[xapi]\ntimeout_seconds = 0\n", "FILE:2: [xapi] timeout_seconds: must be at least 1 and at most 3600"),
    ("[xapi]\nsocket = var/xapi\n", "FILE:2: [xapi] socket: expected an absolute path"),
    ("[coalesce]\nmax_vms_per_window = 1.5\n", "FILE:2: [coalesce] max_vms_per_window: expected an integer"),
    ("[coalesce]\nallow_ha_protected = maybe\n", "FILE:2: [coalesce] allow_ha_protected: expected true or false"),
    ("[coalesce]\nstrategies = gc, magic\n", "FILE:2: [coalesce] strategies: expected a list of gc, live, plugin"),
    ("[coalesce]\nwindows = Sat 01:00-25:00\n", "FILE:2: [coalesce] windows: not a time of day: '25:00'"),
    ("[coalesce]\nwindows = Caturday 01:00-02:00\n", "FILE:2: [coalesce] windows: not a day of the week"),
    ("[coalesce]\nwindows = Sat 01:00\n", "FILE:2: [coalesce] windows: expected [DAYS] HH:MM-HH:MM"),
    ("[coalesce]\nmax_bytes_per_window = lots\n", "FILE:2: [coalesce] max_bytes_per_window: expected a size"),
    ("[coalesce]\nexclude_vms = vm-one\n", "FILE:2: [coalesce] exclude_vms: expected UUIDs"),
    ("[web]\nlisten_address = 9856\n", "FILE:2: [web] listen_address: expected ADDRESS:PORT"),
    ("[web]\n\nbasic_auth_username = admin\n",
     "FILE:3: [web] basic_auth_username: needs basic_auth_password_sha256 as well"),
    ("[web]\nbasic_auth_password_sha256 = secret\n", "FILE:2: [web] basic_auth_password_sha256: expected 64"),
    ("log_level = info\n", "FILE:1: a key before any [section]"),
    ("[agent]\nlog_level = info\n[agent]\n", "FILE:3: [agent]: section given twice"),
    ("[agent]\nlog_level = info\nlog_level = debug\n", "FILE:3: [agent] log_level: key given twice"),
    ("[agent]\nthis line has no equals sign\n", "FILE:2: not a `key = value` line"),
    ("[DEFAULT]\nlog_level = info\n", "FILE:1: [DEFAULT]: unknown section"),
])
def test_mistakes_are_named_by_file_line_and_key(tmp_path, text, expected):
    assert load_error(tmp_path, text).startswith(expected)


@pytest.mark.parametrize("section, key, value, expected", [
    ("xapi", "timeout_seconds", "1e308", "must be at least 1 and at most 3600, got '1e308'"),
    ("xapi", "timeout_seconds", "3601", "must be at least 1 and at most 3600"),
    ("tools", "timeout_seconds", "1e308", "must be at least 1 and at most 3600"),
    ("tools", "timeout_seconds", "inf", "expected a finite number, got 'inf'"),
    ("inspection", "interval_seconds", "1e308", "must be at least 1 and at most 86400"),
    ("inspection", "interval_seconds", "nan", "expected a finite number, got 'nan'"),
    ("inspection", "interval_seconds", "0.5", "must be at least 1 and at most 86400"),
    ("coalesce", "max_freeze_seconds", "601", "must be greater than 0 and at most 600"),
    ("coalesce", "max_freeze_seconds", "-inf", "expected a finite number"),
    ("coalesce", "gc_wait_seconds", "1e308", "must be at least 1 and at most 86400"),
    ("coalesce", "max_load_per_cpu", "1e308", "must be at least 0 and at most 100"),
    ("coalesce", "max_load_per_cpu", "-1", "must be at least 0 and at most 100"),
    ("coalesce", "max_vms_per_window", "10001", "must be at least 0 and at most 10000, got '10001'"),
    ("coalesce", "max_vms_per_window", "-1", "must be at least 0 and at most 10000"),
    ("coalesce", "max_bytes_per_window", "1025T", "must be at least 0 and at most 1024T, got '1025T'"),
    ("coalesce", "max_bytes_per_window", "9" * 400, "not a size"),
    ("web", "basic_auth_username", "prom:etheus", "cannot hold ':' or control characters (RFC 7617: "),
    ("web", "listen_address", "my_host:10530", "neither an IP address nor a host name: 'my_host'"),
    ("web", "listen_address", "{}.example:10530".format("a" * 64), "neither an IP address nor a host name"),
    ("web", "listen_address", "{}example:10530".format("abc." * 62), "neither an IP address nor a host name"),
    ("web", "listen_address", "192.0.2.300:10530", "neither an IP address nor a host name"),
    ("web", "listen_address", "host name:10530", "neither an IP address nor a host name"),
    ("web", "listen_address", "[192.0.2.1]:10530", "not an IPv6 address in brackets: '[192.0.2.1]'"),
])
def test_numbers_and_names_out_of_range_are_refused(tmp_path, section, key, value, expected):
    text = "[{}]\n\n{} = {}\n".format(section, key, value)
    if key == "basic_auth_username":
        text += "basic_auth_password_sha256 = {}\n".format("0" * 64)
    assert load_error(tmp_path, text).startswith("FILE:3: [{}] {}: {}".format(section, key, expected))


@pytest.mark.parametrize("address", ["127.0.0.1:1", ":10530", "[::1]:10530", "[fe80::1%eth0]:10530",
                                     "localhost:10530", "metrics-01.example.com.:10530"])
def test_listen_addresses_that_load(tmp_path, address):
    assert config.load(write(tmp_path, "[web]\nlisten_address = {}\n".format(address))).web.listen_address == address


def test_every_number_has_a_range_that_holds_its_default():
    for key in config.SCHEMA:
        if isinstance(key.default, (int, float)) and not isinstance(key.default, bool):
            minimum, maximum = key.parse.bounds
            assert minimum <= key.default <= maximum < 1e6 or key.name.endswith("_bytes_per_window"), key.name
            assert key.parse(repr(key.default)) == key.default


def test_the_configuration_reference_gives_every_range():
    """The table of docs/configuration.md says `MIN to MAX` in the range column of every number."""
    rows, section = {}, None
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "configuration.md")
    with open(path, encoding="utf-8") as stream:
        for line in stream:
            cells = [cell.strip(" `[]") for cell in re.split(r"(?<!\\)\|", line)]
            if line.startswith("| ") and len(cells) == 7:
                section = cells[1] or section
                rows[(section, cells[2])] = cells[4]
    for key in config.SCHEMA:
        if hasattr(key.parse, "bounds"):
            assert " to " in rows[(key.section, key.name)], (key.section, key.name)


def test_missing_file_given_explicitly_is_an_error(tmp_path):
    with pytest.raises(ConfigError) as caught:
        config.load(str(tmp_path / "absent.conf"))
    assert "absent.conf: no such configuration file" in caught.value.message


def test_missing_default_file_gives_defaults(monkeypatch, tmp_path):
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "absent.conf"))
    assert config.load().coalesce.mode == "report"


def test_undecodable_file_is_an_error(tmp_path):
    path = tmp_path / "agent.conf"
    path.write_bytes(b"[agent]\nlog_level = \xff\n")
    with pytest.raises(ConfigError) as caught:
        config.load(str(path))
    assert "cannot read" in caught.value.message
