"""The RPM as Dom0 gets it: built by packaging/build-rpm, linted, inspected, installed into a throwaway root.

The throwaway root has busybox as its shell and a `systemctl` that logs its arguments, so the
scriptlets really run (chrooted by rpm) and their calls are checked in order for install, upgrade
and erase. The installed tree then runs `xcoalesce-agent --report` with a bare Python 3.6 against
the simulated host.
"""
import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import XenAPI

from tests.helpers import require_tool
from xcoalesce_agent import __version__, config

TREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON36 = os.environ.get("PYTHON36", "/root/.pyenv/versions/3.6.15/bin/python3.6")
SITELIB = "/usr/lib/python3.6/site-packages"
UNITS = ("xcoalesce-agent.service", "xcoalesce-agent-now.service", "xcoalesce-agent-now.timer")
# What rpm 4.11 (EL7) can install: no zstd payload, no newer rpmlib features.
RPMLIB_OF_RPM_4_11 = {"CompressedFileNames", "FileDigests", "PartialHardlinkSets", "PayloadFilesHavePrefix",
                      "PayloadIsXz"}

STUB_SYSTEMCTL = """#!/bin/sh
if [ -e /usr/lib/systemd/system/xcoalesce-agent.service ]; then units=present; else units=gone; fi
echo "$* (units $units)" >> /var/log/systemctl.log
"""


def run(command, **kwargs):
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, **kwargs)
    assert result.returncode == 0, "{} failed:\n{}".format(" ".join(command), result.stdout)
    return result.stdout


def query(package, *args):
    return run(["rpm", "-qp"] + list(args) + [package])


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """Release 1 and release 2 of the same version, as `make rpm` builds them."""
    require_tool("rpmbuild")
    topdir = str(tmp_path_factory.mktemp("rpmbuild"))
    built = {}
    for release in (1, 2):
        output = run([os.path.join(TREE, "packaging/build-rpm"), "--topdir", topdir, "--release", str(release)])
        built[release] = output.strip().splitlines()[-1]
        assert os.path.isfile(built[release]), output
    return built


def make_root(path):
    """An empty system for `rpm --root`: busybox as /bin/sh, /dev/null and a logging systemctl."""
    busybox = require_tool("busybox")
    for directory in ("bin", "usr/bin", "dev", "var/lib/rpm", "var/log"):
        os.makedirs(os.path.join(path, directory))
    shutil.copy(busybox, os.path.join(path, "bin/busybox"))
    os.symlink("busybox", os.path.join(path, "bin/sh"))
    with open(os.path.join(path, "dev/null"), "w"):
        pass
    systemctl = os.path.join(path, "usr/bin/systemctl")
    with open(systemctl, "w") as stream:
        stream.write(STUB_SYSTEMCTL)
    os.chmod(systemctl, 0o755)
    return path


def rpm_in(root, *args):
    return run(["rpm", "--root", root, "--dbpath", "/var/lib/rpm", "--nodeps"] + list(args))


def systemctl_calls(root):
    """The stub's log since the last call, emptied."""
    log = os.path.join(root, "var/log/systemctl.log")
    if not os.path.exists(log):
        return []
    with open(log) as stream:
        calls = stream.read().splitlines()
    os.unlink(log)
    return calls


@pytest.fixture(scope="module")
def installed(packages, tmp_path_factory):
    """A root where release 1 was installed, its config edited, then upgraded to release 2."""
    root = make_root(str(tmp_path_factory.mktemp("dom0root")))
    calls = {}
    rpm_in(root, "-i", "--force-debian", packages[1])
    calls["install"] = systemctl_calls(root)
    with open(os.path.join(root, "etc/xcoalesce-agent/agent.conf"), "a") as stream:
        stream.write("# edited by the administrator\n")
    rpm_in(root, "-U", "--force-debian", packages[2])
    calls["upgrade"] = systemctl_calls(root)
    return root, calls


@pytest.mark.parametrize("arguments", [["--release", "0"], ["--release"], ["--sign"]])
def test_build_script_rejects_bad_arguments_in_one_line(arguments):
    result = subprocess.run([os.path.join(TREE, "packaging/build-rpm")] + arguments,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    assert result.returncode == 2
    assert result.stderr.startswith("build-rpm: error: ") and result.stderr.count("\n") == 1


def test_rpmlint_is_clean_on_package_and_spec(packages):
    require_tool("rpmlint")
    result = subprocess.run(["rpmlint", "-s", "-c", os.path.join(TREE, "packaging/rpmlint.toml"), packages[1],
                             os.path.join(TREE, "packaging/xcoalesce-agent.spec")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    assert result.returncode == 0 and "0 errors, 0 warnings" in result.stdout, result.stdout


def test_version_comes_from_the_package_and_release_from_the_build(packages):
    assert query(packages[1], "--qf", "%{VERSION}-%{RELEASE}") == __version__ + "-1.el7"
    assert query(packages[2], "--qf", "%{VERSION}-%{RELEASE}") == __version__ + "-2.el7"
    assert query(packages[1], "--qf", "%{ARCH}") == "noarch"


def test_package_holds_the_agent_units_config_docs_and_monitoring_files(packages):
    files = set(query(packages[1], "-l").splitlines())
    expected = {
        "/usr/bin/xcoalesce-agent",
        "/etc/xcoalesce-agent/agent.conf",
        "/var/lib/xcoalesce-agent",
        "/usr/share/xcoalesce-agent",
        "/usr/share/doc/xcoalesce-agent/README.md",
        "/usr/share/licenses/xcoalesce-agent/LICENSE",
        "/usr/share/licenses/xcoalesce-agent/LICENSE.prometheus_client",
        "/etc/rsyslog.d/xcoalesce-agent.conf",
        "/etc/logrotate.d/xcoalesce-agent",
        SITELIB + "/xcoalesce_agent/_vendor/prometheus_client/__init__.py",
        SITELIB + "/xcoalesce_agent/_vendor/prometheus_client/__pycache__/__init__.cpython-36.pyc",
        SITELIB + "/xcoalesce_agent/__pycache__/cli.cpython-36.pyc",
    }
    expected.update("/usr/lib/systemd/system/" + unit for unit in UNITS)
    expected.update("/usr/share/doc/xcoalesce-agent/docs/" + name
                    for name in os.listdir(os.path.join(TREE, "docs")) if name.endswith(".md"))
    expected.update(SITELIB + "/xcoalesce_agent/" + name
                    for name in os.listdir(os.path.join(TREE, "xcoalesce_agent")) if name.endswith(".py"))
    monitoring = os.path.join(TREE, "monitoring")
    expected.update("/usr/share/xcoalesce-agent/" + name
                    for name in (os.listdir(monitoring) if os.path.isdir(monitoring) else [])
                    if name.endswith((".yml", ".json")))
    assert expected - files == set()
    assert not [name for name in files if re.search(r"cpython-3(?!6)\d+", name)]


def test_state_directory_and_config_are_root_only_and_config_is_noreplace(packages):
    modes = dict(line.split(" ", 1) for line in
                 query(packages[1], "--qf", "[%{FILENAMES} %{FILEMODES:perms}\n]").splitlines())
    assert modes["/var/lib/xcoalesce-agent"] == "drwx------"
    assert modes["/etc/xcoalesce-agent/agent.conf"] == "-rw-------"
    flags = dict(line.split(" ", 1) for line in
                 query(packages[1], "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]").splitlines())
    assert flags["/etc/xcoalesce-agent/agent.conf"] == "cn"
    assert flags["/etc/rsyslog.d/xcoalesce-agent.conf"] == flags["/etc/logrotate.d/xcoalesce-agent"] == "cn"
    assert modes["/etc/rsyslog.d/xcoalesce-agent.conf"] == modes["/etc/logrotate.d/xcoalesce-agent"] == "-rw-r--r--"


def test_logs_go_to_a_file_of_their_own_rotated_by_logrotate(installed):
    """Dom0's journal stores nothing: rsyslog writes the units' SyslogIdentifier into its own file,
    and stops there (not /var/log/messages too); logrotate rotates that file and tells rsyslog."""
    root, _ = installed
    with open(os.path.join(root, "etc/rsyslog.d/xcoalesce-agent.conf")) as stream:
        rules = [line for line in stream.read().splitlines() if line and not line.startswith("#")]
    assert rules == [':programname, isequal, "xcoalesce-agent" -/var/log/xcoalesce-agent.log', "& stop"]
    for unit in UNITS[:2]:
        with open(os.path.join(root, "usr/lib/systemd/system", unit)) as stream:
            assert "\nSyslogIdentifier=xcoalesce-agent\n" in stream.read()
    with open(os.path.join(root, "etc/logrotate.d/xcoalesce-agent")) as stream:
        policy = stream.read()
    assert re.search(r"(?m)^/var/log/xcoalesce-agent\.log \{$", policy)
    assert re.search(r"(?m)^\s+(size|maxsize) \d+M$", policy) and re.search(r"(?m)^\s+rotate \d+$", policy)
    assert "kill -HUP `cat /var/run/syslogd.pid" in policy


def test_spec_builds_in_a_clean_el7_build_root(packages):
    """Every macro the spec uses comes from a BuildRequires; the licence file is marked %license."""
    build_requires = set(run(["rpmspec", "-q", "--buildrequires", os.path.join(TREE, "packaging/xcoalesce-agent.spec")])
                         .splitlines())
    assert {"systemd", "python3-devel", "python3-rpm-macros"} <= build_requires
    licences = query(packages[1], "-L").splitlines()
    assert "/usr/share/licenses/xcoalesce-agent/LICENSE" in licences
    with open(os.path.join(TREE, "LICENSE")) as stream:
        assert "GNU GENERAL PUBLIC LICENSE\n                       Version 2, June 1991" in stream.read()
    assert query(packages[1], "--qf", "%{LICENSE}").startswith("GPL-2.0-only")


def test_requirements_name_the_host_python_and_xapi(packages):
    requires = set(query(packages[1], "-R").splitlines())
    assert {"python3", "xapi-core", "/usr/bin/python3", "python(abi) = 3.6", "systemd"} <= requires
    assert not [line for line in requires if "pyenv" in line or "venv" in line or "python3.6dist" in line]
    assert "psutil" not in query(packages[1], "--recommends")  # optional; EL7's rpm has no weak dependencies
    assert "bundled(python3-prometheus_client)" in query(packages[1], "--provides")


def test_rpm_4_11_can_read_and_check_the_package(packages):
    requires = query(packages[1], "-R").splitlines()
    rpmlib = {re.match(r"rpmlib\((\w+)\)", line).group(1) for line in requires if line.startswith("rpmlib(")}
    assert rpmlib <= RPMLIB_OF_RPM_4_11
    assert query(packages[1], "--qf", "%{PAYLOADCOMPRESSOR}") == "xz"
    digests = run(["rpm", "-Kv", packages[1]])
    assert "Header SHA1 digest: OK" in digests and "MD5 digest: OK" in digests


def test_scriptlets_are_expanded_systemd_macros(packages):
    scripts = query(packages[1], "--scripts")
    assert "%" not in scripts
    assert "systemctl preset xcoalesce-agent.service xcoalesce-agent-now.timer" in scripts
    assert "systemctl --no-reload disable xcoalesce-agent.service" in scripts
    assert "systemctl try-restart xcoalesce-agent.service" in scripts


def test_install_presets_the_units(installed):
    _, calls = installed
    assert calls["install"] == ["preset xcoalesce-agent.service xcoalesce-agent-now.timer (units present)",
                                "try-restart rsyslog.service (units present)"]


def test_upgrade_restarts_a_running_daemon_once_the_new_files_are_in(installed):
    root, calls = installed
    assert calls["upgrade"] == ["try-restart rsyslog.service (units present)", "daemon-reload (units present)",
                                "try-restart xcoalesce-agent.service (units present)"]
    with open(os.path.join(root, "etc/xcoalesce-agent/agent.conf")) as stream:
        assert stream.read().endswith("# edited by the administrator\n")


def test_installed_files_verify_and_units_are_the_tested_ones(installed):
    root, _ = installed
    result = subprocess.run(["rpm", "--root", root, "--dbpath", "/var/lib/rpm", "--nodeps", "-V", "xcoalesce-agent"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    assert result.stdout.splitlines() == ["S.5....T.  c /etc/xcoalesce-agent/agent.conf"]  # the edit only
    for unit in UNITS:
        with open(os.path.join(root, "usr/lib/systemd/system", unit)) as installed_unit, \
                open(os.path.join(TREE, "systemd", unit)) as source:
            assert installed_unit.read() == source.read()


def test_installed_tree_names_no_build_paths(installed):
    root, _ = installed
    leaks = []
    for top in ("usr", "etc"):
        for directory, _, names in os.walk(os.path.join(root, top)):
            for name in names:
                path = os.path.join(directory, name)
                with open(path, "rb") as stream:
                    content = stream.read()
                if b"BUILDROOT" in content or b"/root/.pyenv" in content or TREE.encode() in content:
                    leaks.append(path)
    assert leaks == []
    with open(os.path.join(root, "usr/bin/xcoalesce-agent")) as stream:
        assert stream.readline() == "#!/usr/bin/python3 -s\n"


def test_default_config_lists_every_key_with_its_default(installed):
    root, _ = installed
    with open(os.path.join(root, "etc/xcoalesce-agent/agent.conf")) as stream:
        text = stream.read()
    assert config.parse(text, "agent.conf") == config.parse("", "defaults")
    uncommented = re.sub(r"(?m)^#(\w+ =.*)$", r"\1", text)
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(uncommented)
    listed = {(section, key) for section in parser.sections() for key in parser[section]}
    assert listed == {(key.section, key.name) for key in config.SCHEMA}
    assert config.parse(uncommented, "agent.conf") == config.parse("", "defaults")


def test_erase_stops_and_disables_before_the_files_go(packages, tmp_path):
    root = make_root(str(tmp_path / "root"))
    rpm_in(root, "-i", "--force-debian", packages[1])
    systemctl_calls(root)
    rpm_in(root, "-e", "xcoalesce-agent")
    units = " ".join(UNITS)
    assert systemctl_calls(root) == [
        "--no-reload disable {} (units present)".format(units),
        "stop {} (units present)".format(units),
        "daemon-reload (units gone)",
        "try-restart rsyslog.service (units gone)",
    ]
    assert not os.path.exists(os.path.join(root, "usr/bin/xcoalesce-agent"))
    assert not os.path.exists(os.path.join(root, "var/lib/xcoalesce-agent"))


@pytest.fixture()
def simulated_host(tmp_path):
    """`python -m tests.dom0sim serve` on a directory, until the test ends."""
    state = str(tmp_path / "host")
    server = subprocess.Popen([sys.executable, "-m", "tests.dom0sim", "serve", "--state", state, "--scenario", "demo"],
                              cwd=TREE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, universal_newlines=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(state, "xapi.sock")):
            assert server.poll() is None, "the simulated host stopped: " + server.stderr.read()
            assert time.monotonic() < deadline, "the simulated host did not come up in 30 s"
            time.sleep(0.1)
        yield state
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_installed_tree_reports_on_the_simulated_host_with_python36(installed, simulated_host, tmp_path):
    """A bare Python 3.6 with only what the package and xapi-core give: bundled prometheus_client, no psutil."""
    root, _ = installed
    if not os.path.exists(PYTHON36):
        pytest.fail("no Python 3.6 at {}".format(PYTHON36))
    xapi_core = str(tmp_path / "xapi-core")
    shutil.copytree(os.path.dirname(XenAPI.__file__), os.path.join(xapi_core, "XenAPI"))
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([root + SITELIB, xapi_core]))
    result = subprocess.run([PYTHON36, os.path.join(root, "usr/bin/xcoalesce-agent"), "--report", "--json",
                             "--config", os.path.join(simulated_host, "agent.conf")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                            env=environment, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["errors"] == [] and report["srs"] and report["reclaimable_bytes"] > 0
