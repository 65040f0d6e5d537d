"""The `vhd-util` adapter against real VHD files and the simulated host's `vhd-util` (blktap's exact output)."""
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from tests.dom0sim import lvm, tools, vhdfile
from xcoalesce_agent import config
from xcoalesce_agent.inspect import vhdutil
from xcoalesce_agent.errors import HostUnreachable

SR = "5e1ec7ed-0000-4000-8000-00000000000a"
BASE = "ba5e0000-0000-4000-8000-000000000001"
LEAF = "1eaf0000-0000-4000-8000-000000000002"
BLOCK = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("host"))
    paths = tools.install_tools(root, os.path.join(root, "bin"))
    agent_config = config.defaults()
    agent_config.tools.vhd_util = paths["vhd-util"]
    agent_config.tools.path = os.path.join(root, "bin") + ":/usr/bin:/bin"
    agent_config.tools.timeout_seconds = 30.0
    agent_config.storage.sr_mount_dir = os.path.join(root, "sr-mount")
    agent_config.storage.lvm_device_dir = os.path.join(root, "lvm")
    return root, agent_config


def write_blocks(path, blocks):
    with vhdfile.Vhd.open(path, writable=True) as vhd:
        for block in blocks:
            vhd.write(block * BLOCK, b"d" * 512)


def file_sr(root):
    directory = os.path.join(root, "sr-mount", SR)
    os.makedirs(directory)
    base, leaf = os.path.join(directory, BASE + ".vhd"), os.path.join(directory, LEAF + ".vhd")
    vhdfile.create(base, 64)
    write_blocks(base, [0, 1, 2, 31])
    vhdfile.snapshot(leaf, base)
    with vhdfile.Vhd.open(base, writable=True) as vhd:
        vhd.set_hidden(True)
    write_blocks(leaf, [0, 1, 2, 5, 10])
    open(os.path.join(directory, "empty.vhd"), "wb").close()
    with open(os.path.join(directory, "junk.vhd"), "wb") as handle:
        handle.write(b"not a vhd" * 500)
    return directory


def dm_name(vg_name, lv_name):
    """The device-mapper name libvhd stores as an LVHD parent's name (`--` escapes `-`)."""
    return "{}-{}".format(vg_name.replace("-", "--"), lv_name.replace("-", "--"))


def lvm_sr(root, sr_uuid):
    vg = lvm.VolumeGroup.for_sr(root, sr_uuid, create=True)
    base = vg.create_lv("VHD-" + BASE, 8 * 1024 * 1024)
    vhdfile.create(base, 64)
    write_blocks(base, [3])
    mapper = os.path.join(root, "mapper")
    os.makedirs(mapper, exist_ok=True)
    alias = os.path.join(mapper, dm_name(vg.name, "VHD-" + BASE))
    os.symlink(base, alias)
    leaf = vg.create_lv("VHD-" + LEAF, 72 * 1024 * 1024)
    vhdfile.snapshot(leaf, alias)
    with vhdfile.Vhd.open(base, writable=True) as vhd:
        vhd.set_hidden(True)
    write_blocks(leaf, [3, 4])
    return vg


def test_file_sr_scan_and_bitmaps(host):
    root, agent_config = host
    directory = file_sr(root)
    tool = vhdutil.VhdUtil(agent_config)
    scan = tool.scan_file_sr(directory)
    by_uuid = {record.uuid: record for record in scan.records}
    assert set(by_uuid) == {BASE, LEAF, "empty", "junk"}
    assert by_uuid[BASE].hidden and by_uuid[BASE].size == os.path.getsize(os.path.join(directory, BASE + ".vhd"))
    assert by_uuid[LEAF].parent_uuid == BASE and by_uuid[LEAF].virtual_size == 64 * 1024 * 1024
    assert by_uuid["empty"].error == "scan error -32: opening file"
    assert by_uuid["junk"].error.startswith("scan error -22")
    assert tool.read_bitmap(os.path.join(directory, BASE + ".vhd"), 64 << 20) == bytes.fromhex("e0000001")
    assert tool.read_bitmap(os.path.join(directory, LEAF + ".vhd"), 64 << 20) == bytes.fromhex("e4200000")
    assert tool.spawned == 3


def test_missing_sr_directory_is_an_sr_error(host):
    root, agent_config = host
    with pytest.raises(vhdutil.VhdUtilError) as caught:
        vhdutil.VhdUtil(agent_config).scan_file_sr(os.path.join(root, "nowhere"))
    assert "(exit 5): vhd=" in str(caught.value) or "(exit 5): scan failed: -5" in str(caught.value)


def test_empty_sr_directory_scans_empty(host):
    root, agent_config = host
    os.makedirs(os.path.join(root, "empty-sr"))
    assert vhdutil.VhdUtil(agent_config).scan_file_sr(os.path.join(root, "empty-sr")).records == []


def test_bitmap_of_a_vanished_or_fixed_vhd_is_an_error(host):
    root, agent_config = host
    with pytest.raises(vhdutil.VhdUtilError) as caught:
        vhdutil.VhdUtil(agent_config).read_bitmap(os.path.join(root, "gone.vhd"), 64 << 20)
    assert "exit 2" in str(caught.value) and "\n" not in str(caught.value)
    fixed = os.path.join(root, "fixed.vhd")
    vhdfile.create(fixed, 4, fixed=True)
    with pytest.raises(vhdutil.VhdUtilError) as caught:
        vhdutil.VhdUtil(agent_config).read_bitmap(fixed, 4 << 20)
    assert "Failed to get bat" in str(caught.value)


def test_lvm_sr_scan_reads_lv_sizes(host):
    root, agent_config = host
    sr_uuid = "1e0e1e0e-0000-4000-8000-00000000000b"
    vg = lvm_sr(root, sr_uuid)
    tool = vhdutil.VhdUtil(agent_config)
    by_uuid = {record.uuid: record for record in tool.scan_lvm_sr(sr_uuid).records}
    assert set(by_uuid) == {BASE, LEAF}
    assert by_uuid[LEAF].parent_uuid == BASE and by_uuid[LEAF].size == 72 * 1024 * 1024
    assert by_uuid[BASE].hidden and by_uuid[BASE].size == 8 * 1024 * 1024
    assert tool.read_bitmap(vg.lv_path("VHD-" + LEAF), 64 << 20) == bytes.fromhex("18000000")


def test_unknown_volume_group_is_an_sr_error(host):
    _, agent_config = host
    with pytest.raises(vhdutil.VhdUtilError) as caught:
        vhdutil.VhdUtil(agent_config).scan_lvm_sr("00000000-0000-4000-8000-0000000000ff")
    assert "exit 22" in str(caught.value) and "lvm_scan_vg failed -22" in str(caught.value)


def fake_tool(tmp_path, body):
    path = tmp_path / "vhd-util"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    agent_config = config.defaults()
    agent_config.tools.vhd_util = str(path)
    agent_config.tools.timeout_seconds = 1.0
    return vhdutil.VhdUtil(agent_config)


def scan_file_sr(tool, tmp_path):
    return tool.scan_file_sr(str(tmp_path))


@pytest.mark.parametrize("body, call, messages", [
    pytest.param("printf 'vhd=a.vhd capacity=1 size=1 hidden=0 parent=none\\n\\001\\002 core dumped\\n'",
                 scan_file_sr, ["printed unexpected output: line 2"], id="garbage-scan-output"),
    pytest.param("printf 'ab'", lambda tool, _: tool.read_bitmap("x.vhd", 64 << 20),
                 ["printed 2 bytes where a 4-byte bitmap was expected"], id="short-bitmap"),
    pytest.param("exec sleep 30", scan_file_sr, ["timed out after 1 s"], id="hung-tool-times-out"),
    pytest.param("kill -ABRT $$", lambda tool, _: tool.scan_lvm_sr(SR), ["exit 134"],
                 id="crash-has-the-shells-status"),
])
def test_misbehaving_tool_is_an_error_not_a_crash(tmp_path, body, call, messages):
    """`messages`: what the error says, any one of them."""
    tool = fake_tool(tmp_path, body)
    with pytest.raises(vhdutil.VhdUtilError) as caught:
        call(tool, tmp_path)
    assert any(message in str(caught.value) for message in messages)


def test_missing_binary_means_the_host_tools_are_unreachable(tmp_path):
    agent_config = config.defaults()
    agent_config.tools.vhd_util = str(tmp_path / "no-vhd-util")
    with pytest.raises(HostUnreachable) as caught:
        vhdutil.VhdUtil(agent_config).scan_file_sr(str(tmp_path))
    assert caught.value.exit_code == 3
    assert "cannot run {}".format(tmp_path / "no-vhd-util") in caught.value.message


def test_batched_bitmap_reads_keep_each_result_apart(host, tmp_path):
    root, agent_config = host
    directory = os.path.join(root, "sr-mount", SR)
    if not os.path.isdir(directory):
        file_sr(root)
    fixed = str(tmp_path / "fixed.vhd")
    vhdfile.create(fixed, 4, fixed=True)
    images = [(os.path.join(directory, BASE + ".vhd"), 64 << 20), (str(tmp_path / "gone.vhd"), 64 << 20),
              (fixed, 4 << 20), (os.path.join(directory, LEAF + ".vhd"), 64 << 20)]
    tool = vhdutil.VhdUtil(agent_config)
    results = tool.read_bitmaps(images)
    assert results[images[0][0]] == bytes.fromhex("e0000001")
    assert results[images[3][0]] == bytes.fromhex("e4200000")
    assert "exit 2" in str(results[images[1][0]])
    assert "exit 22" in str(results[images[2][0]]) and "Failed to get bat" in str(results[images[2][0]])
    assert (tool.spawned, tool.forked) == (4, 1)


def test_bitmap_reads_without_a_temporary_directory_are_errors_per_image(host, tmp_path, monkeypatch):
    """A batch's output goes to a temporary file: when none can be made, each image says why."""
    root, agent_config = host
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    results = vhdutil.VhdUtil(agent_config).read_bitmaps([(str(tmp_path / "a.vhd"), 64 << 20)])
    assert "cannot create a temporary file" in str(results[str(tmp_path / "a.vhd")])
    assert "No such file or directory" in str(results[str(tmp_path / "a.vhd")])


def test_an_agent_killed_outright_leaves_no_file_and_no_shell(tmp_path):
    """The tools' output files have no name and the shell ends with its pipe: a SIGKILL of the agent
    (the OOM killer, `kill -9`) leaves nothing in the temporary directory and no shell running."""
    fake_tool(tmp_path, "echo $PPID")
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    agent = ("import os, signal, sys\n"
             "from xcoalesce_agent import config\n"
             "from xcoalesce_agent.inspect import vhdutil\n"
             "settings = config.defaults()\n"
             "settings.tools.vhd_util = sys.argv[1]\n"
             "tool = vhdutil.VhdUtil(settings)\n"
             "print(tool.run(['scan']).decode().strip(), sorted(os.listdir(sys.argv[2])), flush=True)\n"
             "os.kill(os.getpid(), signal.SIGKILL)\n")
    process = subprocess.run([sys.executable, "-c", agent, str(tmp_path / "vhd-util"), str(temporary)],
                             stdout=subprocess.PIPE, universal_newlines=True,
                             env=dict(os.environ, TMPDIR=str(temporary)), timeout=60)
    assert process.returncode == -signal.SIGKILL
    shell, listed = process.stdout.split(" ", 1)
    assert listed.strip() == "[]"
    deadline = time.monotonic() + 30
    while os.path.exists("/proc/{}".format(shell)) and _state(shell) != "Z" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists("/proc/{}".format(shell)) or _state(shell) == "Z"
    assert os.listdir(str(temporary)) == []


def _state(pid):
    try:
        with open("/proc/{}/stat".format(pid)) as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
