"""The `vhd-util` stand-in against the real tool's transcripts, run as a real command on real files.

Each transcript block (`$ command`, stdout, stderr, exit status) whose command uses only vhd-util
and ordinary shell tools is replayed through `sh` in a lab laid out like the transcripts' /srv/lab,
with the disks made the same way (vhd-write / vhd-readraw are small helpers here). Paths, UUIDs,
timestamps and the checksums that depend on them are masked before comparing.
"""
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from tests.dom0sim import lvm, tools, vhdfile, vhdutil_cli

TRANSCRIPTS = "/work/shared/reference/vhd-util-transcripts"
LAB = "/srv/lab"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VG = "VG_XenStorage-0a1b2c3d-1111-4222-8333-444455556666"
DM_PREFIX = "VG_XenStorage--0a1b2c3d--1111--4222--8333--444455556666-VHD--"
B_UUID = "b0000000-0000-4000-8000-00000000000b"
LEAF_UUID = "1eaf0000-0000-4000-8000-00000000001f"
ORPHAN_UUID = "0f000000-0000-4000-8000-0000000000ff"

VHD_WRITE = """#!{python}
import sys
sys.path.insert(0, {repo!r})
from tests.dom0sim import vhdfile
path, offset, length, value = sys.argv[1:5]
units = {{"K": 1024, "M": 1024 * 1024}}
count = int(length[:-1]) * units[length[-1]] if length[-1] in units else int(length)
with vhdfile.Vhd.open(path, writable=True) as vhd:
    vhd.write(int(offset), bytes([int(value, 0)]) * count)
"""
VHD_READRAW = """#!{python}
import sys
sys.path.insert(0, {repo!r})
from tests.dom0sim import vhdfile
data = vhdfile.read_chain(sys.argv[1])
if len(sys.argv) > 2:
    with open(sys.argv[2], "wb") as handle:
        handle.write(data)
else:
    getattr(sys.stdout, "buffer", sys.stdout).write(data)
"""

SKIPPED_COMMANDS = re.compile(r"(^|[;&|(]\s*)(ls|du|stat|qemu-img|qemu-io|vhdiinfo|cat|/usr/bin/python3|"
                              r"\./probe\.sh|/srv/lab/blktap|python3 /srv)\b|sha256sum (leaf|base|/srv/lab/sr/\*)")
UUID = re.compile(r"(?<!VHD-)\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")
TIME = re.compile(r"\b(?!Sat Jan  1 00:00:00 2000)[A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4}\b")
GOOD_CHECKSUM = re.compile(r"0x[0-9a-f]+\|0x[0-9a-f]+ \(Good!\)")


class Block(object):
    """One `$ command` of a transcript with what the real tool printed."""

    def __init__(self, command, stdout, stderr, status):
        self.command = command
        self.stdout = stdout
        self.stderr = stderr
        self.status = status

    def __repr__(self):
        return "<$ {}>".format(self.command)


def parse_transcript(name):
    path = os.path.join(TRANSCRIPTS, name)
    if not os.path.exists(path):
        pytest.skip("reference transcripts not available at " + TRANSCRIPTS)
    with open(path) as handle:
        lines = handle.read().split("\n")
    blocks = []
    index = 0
    while index < len(lines):
        if not lines[index].startswith("$ "):
            index += 1
            continue
        command = lines[index][2:]
        index += 1
        out, err, target, newline = [], [], None, True
        target = out
        while not lines[index].startswith("[exit "):
            line = lines[index]
            if line == "[stderr:]":
                target = err
            elif line.startswith("[note: stdout did not end with a newline]"):
                newline = False
            else:
                target.append(line)
            index += 1
        status = int(lines[index][len("[exit "):-1])
        stdout = "".join(line + "\n" for line in out)
        if not newline:
            stdout = stdout[:-1]
        blocks.append(Block(command, stdout, "".join(line + "\n" for line in err), status))
        index += 1
    return blocks


def mask(text, root):
    text = text.replace(root, LAB)
    text = UUID.sub("<uuid>", text)
    text = TIME.sub("<time>", text)
    return GOOD_CHECKSUM.sub("<checksum> (Good!)", text)


class Lab(object):
    """A /srv/lab look-alike: stand-in tools on PATH, DOM0SIM_ROOT for the LVM store."""

    def __init__(self, root):
        self.root = root
        self.bin = os.path.join(root, "bin")
        tools.install_tools(root, self.bin)
        for name, text in (("vhd-write", VHD_WRITE), ("vhd-readraw", VHD_READRAW)):
            path = os.path.join(self.bin, name)
            with open(path, "w") as handle:
                handle.write(text.format(python=sys.executable, repo=REPO))
            os.chmod(path, 0o755)
        self.env = dict(os.environ, PATH=self.bin + ":" + os.environ.get("PATH", "/usr/bin:/bin"),
                        TZ="UTC", DOM0SIM_ROOT=root, PYTHONPATH=REPO)

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def sh(self, command, cwd):
        process = subprocess.Popen(["sh", "-c", command.replace(LAB, self.root)], cwd=cwd, env=self.env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = process.communicate()
        return out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), process.returncode

    def replay(self, blocks, cwd, expect=None):
        """Run each block; returns a list of mismatch descriptions. `expect(block)` may adjust
        the expected (stdout, status) for directory-order dependent output."""
        failures = []
        for block in blocks:
            stdout, stderr, status = self.sh(block.command, cwd)
            want_out, want_status = expect(block) if expect else (block.stdout, block.status)
            got = (mask(stdout, self.root), mask(stderr, self.root), status)
            want = (mask(want_out, LAB), mask(block.stderr, LAB), want_status)
            if got != want:
                failures.append("$ {}\n--- expected ---\n{}[stderr]\n{}[exit {}]\n--- got ---\n{}[stderr]\n{}"
                                "[exit {}]".format(block.command, want[0], want[1], want[2], got[0], got[1], got[2]))
        return failures


def runnable(blocks):
    return [block for block in blocks if not SKIPPED_COMMANDS.search(block.command)]


def listdir_order(directory):
    """Reorder expected scan lines into this directory's readdir order (what `scan -f` follows)."""
    names = os.listdir(directory)

    def key(line):
        name = os.path.basename(line.split(" ", 1)[0][len("vhd="):])
        return names.index(name) if name in names else len(names)

    def reorder(text):
        return "".join(line + "\n" for line in sorted(text.splitlines(), key=key))
    return reorder


def fast_glob(block):
    return (" -f" in block.command and " -p" not in block.command and "-m '" in block.command
            and "*" in block.command and block.command.startswith(("vhd-util scan", "cd / && vhd-util scan")))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("lab"))
    for name in ("sr", "sr-err", "edge", "interop", "lvmsim/mapper", "vgx"):
        os.makedirs(os.path.join(root, name))
    return Lab(root)


def test_chain_create_write_snapshot_query_read_check_coalesce(lab):
    """Transcripts 1-3: the 64 MiB base/leaf chain, every scan/query/read/check form, coalesce."""
    blocks = runnable(parse_transcript("1-chain.txt") + parse_transcript("2-scan-query-read-check.txt")
                      + parse_transcript("3-coalesce.txt"))
    sr = lab.path("sr")
    reorder = listdir_order(sr)

    def expect(block):
        if fast_glob(block) and "sr/*.vhd" in block.command or block.command == "vhd-util scan -f -m '*.vhd'":
            return reorder(block.stdout), block.status
        return block.stdout, block.status

    failures = lab.replay(blocks, sr, expect)
    assert not failures, "\n\n".join(failures)
    assert len(blocks) > 80


def make_error_disks(directory):
    """sr-err of transcript 4: child of p, an orphan, empty, garbage and truncated files."""
    def path(name):
        return os.path.join(directory, name)
    vhdfile.create(path("p.vhd"), 8)
    vhdfile.snapshot(path("child.vhd"), path("p.vhd"))
    vhdfile.create(path("gone.vhd"), 8)
    vhdfile.snapshot(path("orphan.vhd"), path("gone.vhd"))
    os.unlink(path("gone.vhd"))
    open(path("empty.vhd"), "wb").close()
    with open(path("garbage.vhd"), "wb") as handle:
        handle.write(b"this is not a vhd file".ljust(4096, b"\0"))
    vhdfile.create(path("trunc.vhd"), 8)
    with open(path("trunc.vhd"), "r+b") as handle:
        handle.truncate(2048)


def test_scan_errors_orphans_garbage_and_parents(lab):
    """Transcript 4 (after transcript 3's coalesce, as recorded): error lines, -c, -a, -p, check dumps."""
    if not os.path.exists(lab.path("sr", "leaf.vhd")):
        pytest.skip("needs the chain of the previous test")
    make_error_disks(lab.path("sr-err"))
    blocks = runnable(parse_transcript("4-scan-errors.txt"))
    reorder = listdir_order(lab.path("sr-err"))
    continued = next(b for b in blocks if b.command == "vhd-util scan -f -c -m '/srv/lab/sr-err/*.vhd'")

    def expect(block):
        if block.command == "vhd-util scan -f -m '/srv/lab/sr-err/*.vhd'":
            lines = reorder(continued.stdout).splitlines(True)
            first_error = next(i for i, line in enumerate(lines) if "scan-error=" in line)
            status = -int(re.search(r"scan-error=(-\d+)", lines[first_error]).group(1))
            return "".join(lines[:first_error + 1]), status
        if fast_glob(block) and "sr-err/*.vhd" in block.command:
            return reorder(block.stdout), block.status
        return block.stdout, block.status

    failures = lab.replay(blocks, lab.path("sr-err"), expect)
    assert not failures, "\n\n".join(failures)
    assert len(blocks) >= 30


def test_fixed_disks(lab):
    """Transcript 5's vhd-util fixed disk: check silent, read/query -a/scan -f fail with -22."""
    blocks = [block for block in parse_transcript("5-interop.txt")
              if "v-fixed" in block.command and "q-" not in block.command and "qemu" not in block.command]
    vhdfile.create(lab.path("interop", "v-fixed.vhd"), 16, fixed=True)
    failures = lab.replay(runnable(blocks), lab.path("interop"))
    assert not failures, "\n\n".join(failures)
    assert len(blocks) >= 5


def test_read_bitmap_edges_and_snapshot_of_empty_parents(lab):
    """Transcript 7: read -B lengths and bit order on odd sizes; snapshot skips empty parents unless -e."""
    blocks = runnable(parse_transcript("7-readB-edges-libvhdi-probe.txt"))
    reorder = listdir_order(lab.path("edge"))

    def expect(block):
        if "empty*.vhd" in block.command:
            text = block.stdout.splitlines(True)
            scan_lines = [line for line in text if line.startswith("vhd=")]
            others = [line for line in text if not line.startswith("vhd=")]
            return "".join(others) + reorder("".join(scan_lines)), block.status
        return block.stdout, block.status

    failures = lab.replay(blocks, lab.path("edge"), expect)
    assert not failures, "\n\n".join(failures)
    assert len(blocks) == 7


def make_volume_group(lab):
    """Transcript 6's VG: MGT, a hidden base, its child, an orphan whose parent LV is gone, a striped LV."""
    mapper = lab.path("lvmsim", "mapper")

    def dm(uuid):
        return os.path.join(mapper, DM_PREFIX + uuid.replace("-", "--"))
    vhdfile.create(dm(B_UUID), 8)
    with vhdfile.Vhd.open(dm(B_UUID), writable=True) as vhd:
        vhd.write(0, b"\x5a" * 4096)
        vhd.set_hidden(1)
    vhdfile.snapshot(dm(LEAF_UUID), dm(B_UUID))
    vhdfile.create(dm("gone"), 8)
    vhdfile.snapshot(dm(ORPHAN_UUID), dm("gone"))
    os.unlink(dm("gone"))
    vg = lvm.VolumeGroup.create(lab.root, VG, pv_name=lab.path("lvmsim", "pv0.img"))
    for name, size, source in (("MGT", 4, None), ("VHD-" + B_UUID, 8, dm(B_UUID)),
                               ("VHD-" + LEAF_UUID, 8, dm(LEAF_UUID)), ("VHD-" + ORPHAN_UUID, 4, dm(ORPHAN_UUID)),
                               ("VHD-striped", 4, None)):
        path = vg.create_lv(name, size * lvm.EXTENT_SIZE // 4, segtype="striped" if name == "VHD-striped" else "linear")
        if source:
            shutil.copyfile(source, path)
    with open(vg.lv_path("MGT"), "wb") as handle:
        handle.write(b"XenStorage management volume".ljust(8192, b"\0"))
    vhdfile.create(lab.path("vgx", "p.vhd"), 8)
    vhdfile.snapshot(lab.path("vgx", "child.vhd"), lab.path("vgx", "p.vhd"))
    vgx = lvm.VolumeGroup.create(lab.root, "VGX")
    shutil.copyfile(lab.path("vgx", "child.vhd"), vgx.create_lv("VHD-child", lvm.EXTENT_SIZE))


def test_lvm_scan_through_vgs_and_lvs(lab):
    """Transcript 6: vgs/lvs output, scan -l in every mode, -38 for a striped LV, MGT, unknown VG,
    and the abort when a -f parent name is not a device-mapper name."""
    make_volume_group(lab)
    blocks = runnable(parse_transcript("6-lvm-sim.txt"))
    aborting = [block for block in blocks if "echo \"(exit $?" in block.command]
    reports = [block for block in blocks if block.command.startswith(("vgs ", "lvs "))]
    plain = [block for block in blocks if block not in aborting and block not in reports]
    failures = lab.replay(plain, lab.path("vgx"))
    for block in reports:       # the transcript's stand-ins did not pad columns as LVM does
        stdout, stderr, status = lab.sh(block.command, lab.path("vgx"))
        squeezed = "".join("  " + " ".join(line.split()) + "\n" for line in mask(stdout, lab.root).splitlines())
        if (squeezed, stderr, status) != (mask(block.stdout, lab.root), block.stderr, block.status):
            failures.append("$ {}\n{}".format(block.command, stdout))
    assert len(reports) == 2
    assert not failures, "\n\n".join(failures)
    assert len(plain) >= 15 and len(aborting) == 1
    stdout, _, status = lab.sh(aborting[0].command, lab.path("vgx"))
    assert (stdout, status) == (aborting[0].stdout, 0)
    stdout, stderr, status = lab.sh("vhd-util scan -f -l VGX -m 'VHD-*'", lab.path("vgx"))
    assert (stdout, status) == ("", 134)


def test_lvm_scan_runs_the_real_vgs_and_lvs_command_lines(lab):
    """libvhd's popen command lines reach `vgs`/`lvs` on PATH exactly (transcript 6's calls.log)."""
    logbin = lab.path("logbin")
    os.makedirs(logbin)
    log = lab.path("calls.log")
    for name in ("vgs", "lvs"):
        with open(os.path.join(logbin, name), "w") as handle:
            handle.write('#!/bin/sh\necho "{} $*" >> {}\nexec {} "$@"\n'.format(name, log, os.path.join(lab.bin, name)))
        os.chmod(os.path.join(logbin, name), 0o755)
    env = dict(lab.env, PATH=logbin + ":" + lab.env["PATH"])
    process = subprocess.Popen(["vhd-util", "scan", "-l", "VGX", "-m", "VHD-*"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, _ = process.communicate()
    assert process.returncode == 0 and out.startswith(b"vhd=VHD-child ")
    with open(log) as handle:
        calls = handle.read().splitlines()
    assert calls == [
        "vgs VGX --noheadings --nosuffix --units=b --options=vg_name,vg_extent_size,lv_count,pv_count,pv_name,"
        "pe_start --unbuffered",
        "lvs VGX --noheadings --nosuffix --units=b --options=lv_name,lv_size,segtype,seg_count,seg_start,seg_size,"
        "devices --unbuffered"]


# ---- behaviour that holds without the transcripts ---------------------------------------------


TOOL_USAGE = ("usage: vhd-util COMMAND [OPTIONS]\nCOMMAND := { create | snapshot | query | read | set | repair | "
              "resize | fill | coalesce | modify | scan | check | revert }\n")


def run_tool(args, cwd, env=None):
    process = subprocess.Popen([sys.executable, "-m", "tests.dom0sim.vhdutil_cli"] + args, cwd=cwd,
                               env=dict(os.environ, PYTHONPATH=REPO, TZ="UTC", **(env or {})),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = process.communicate()
    return out.decode(), err.decode(), process.returncode


def test_command_line_errors_are_clean(tmp_path):
    cwd = str(tmp_path)
    vhdfile.create(os.path.join(cwd, "d.vhd"), 4)
    checks = [
        (["scan"], vhdutil_cli.SCAN_USAGE, "", 22),
        (["scan", "-h"], vhdutil_cli.SCAN_USAGE, "", 0),
        (["scan", "-z", "x"], vhdutil_cli.SCAN_USAGE, "scan: invalid option -- 'z'\n", 22),
        (["scan", "-m"], vhdutil_cli.SCAN_USAGE, "scan: option requires an argument -- 'm'\n", 22),
        (["frob"], TOOL_USAGE, "invalid COMMAND frob\n", 0),
        (["--debug", "scan", "d.vhd"], TOOL_USAGE, "invalid COMMAND --debug\n", 0),
        ([], TOOL_USAGE, "", 0),
        (["scan", "--debug", "d.vhd"], "vhd=d.vhd capacity=4194304 size=3584 hidden=0 parent=none\n", "", 0),
        (["query", "-n", "d.vhd", "-d", "-f", "-v"], "4\nhidden: 0\nchain depth: 1\n", "", 0),
        (["query", "-n", "."], "error opening .: -21\n", "", 21),
        (["read", "-b", "40", "-n", "d.vhd"], "", "block 41 past end of file\n", 34),
        (["set", "-n", "d.vhd", "-f", "colour", "-v", "1"], "invalid field colour\n" + vhdutil_cli.SET_USAGE, "", 22),
        (["set", "-n", "d.vhd", "-f", "hidden", "-v", "300"], "invalid value 300\n" + vhdutil_cli.SET_USAGE, "", 22),
        (["create", "-n", "x.vhd"], vhdutil_cli.CREATE_USAGE, "", 22),
        (["snapshot", "-n", "x.vhd"], vhdutil_cli.SNAPSHOT_USAGE, "", 22),
        (["check", "-n", "missing.vhd"], "cannot stat missing.vhd: 2\n", "", 2),
        (["coalesce", "-n", "d.vhd", "extra"], vhdutil_cli.COALESCE_USAGE, "", 22),
        (["resize", "-n", "d.vhd"], "", "vhd-util resize: not available on the simulated host\n", 38),
        (["modify", "-n", "d.vhd", "-z"], "", "vhd-util modify -z: not available on the simulated host\n", 38),
    ]
    for args, stdout, stderr, status in checks:
        out, err, code = run_tool(args, cwd)
        assert (out, err, code) == (stdout, stderr, status), args
        assert "Traceback" not in err


def test_set_create_snapshot_and_marker(tmp_path):
    cwd = str(tmp_path)
    out, err, code = run_tool(["create", "-n", "b.vhd", "-s", "5"], cwd)
    assert (out, err, code) == ("", "", 0)
    for args in (["snapshot", "-n", "c.vhd", "-p", "b.vhd"], ["set", "-n", "b.vhd", "-f", "hidden", "-v", "1"],
                 ["set", "-n", "c.vhd", "-f", "marker", "-v", "1"]):
        assert run_tool(args, cwd) == ("", "", 0)
    out, _, code = run_tool(["scan", "-M", "-m", os.path.join(cwd, "*.vhd")], cwd)
    assert out == ("vhd=b.vhd capacity=6291456 size=3584 hidden=1 marker=0 keyhash= parent=none\n"
                   "vhd=c.vhd capacity=6291456 size=5120 hidden=0 marker=1 keyhash= parent=b.vhd\n")
    assert run_tool(["snapshot", "-n", "d.vhd", "-p", "gone.vhd"], cwd) == ("", "", 2)
    assert run_tool(["query", "-n", "c.vhd", "-p", "-u", "-m"], cwd) == ("./b.vhd\nmarker: 1\n", "", 0)


def test_scan_stops_at_the_first_missing_file_and_c_leaves_a_phantom(tmp_path):
    cwd = str(tmp_path)
    vhdfile.create(os.path.join(cwd, "p.vhd"), 8)
    out, err, code = run_tool(["scan", "-f", "no.vhd", "p.vhd"], cwd)
    assert (out, err, code) == ("vhd=no.vhd scan-error=-2 error-message='failure scanning target'\n",
                                "scan failed: -2. Check syslog for details\n", 2)
    out, _, code = run_tool(["scan", "-c", "-v", "no.vhd", "p.vhd"], cwd)
    assert out.splitlines()[1:] == ["vhd= capacity=0 size=0 hidden=1 parent=none",
                                    "vhd=p.vhd capacity=8388608 size=3584 hidden=0 parent=none"]
    out, _, _ = run_tool(["scan", "-c", "-p", "no.vhd", "p.vhd"], cwd)
    assert out.splitlines()[1] == "vhd= scan-error=-2 error-message='resolving name'"
    assert run_tool(["scan", "-m", os.path.join(cwd, "none*.vhd")], cwd) == ("", "", 0)
    out, err, code = run_tool(["scan", "-m", os.path.join(cwd, "absent.vhd")], cwd)
    assert code == 2 and err == "scan failed: -2. Check syslog for details\n"


def test_scan_lvm_unknown_vg_fails_like_lvm_scan_vg(tmp_path):
    root = str(tmp_path)
    bin_dir = os.path.join(root, "bin")
    tools.install_tools(root, bin_dir)
    env = {"PATH": bin_dir + ":" + os.environ.get("PATH", "/usr/bin:/bin")}
    for args in (["scan", "-f", "-c", "-l", "NoSuchVG", "-m", "VHD-*"], ["scan", "-l", "NoSuchVG", "x"]):
        assert run_tool(args, root, env) == (
            "", "lvm_scan_vg failed -22\nscan failed: -22. Check syslog for details\n", 22)


def test_abort_dies_by_sigabrt_without_output(tmp_path):
    root = str(tmp_path)
    vhdfile.create(os.path.join(root, "p.vhd"), 8)
    vhdfile.snapshot(os.path.join(root, "c.vhd"), os.path.join(root, "p.vhd"))
    vg = lvm.VolumeGroup.create(root, "VGA")
    shutil.copyfile(os.path.join(root, "c.vhd"), vg.create_lv("VHD-c", 4 << 20))
    bin_dir = os.path.join(root, "bin")
    tools.install_tools(root, bin_dir)
    env = {"PATH": bin_dir + ":" + os.environ.get("PATH", "/usr/bin:/bin"), "DOM0SIM_ROOT": root}
    assert run_tool(["scan", "-f", "-l", "VGA", "-m", "VHD-*"], root, env) == ("", "", -signal.SIGABRT)
    assert run_tool(["scan", "-l", "VGA", "-m", "VHD-*"], root, env) == (
        "vhd=VHD-c capacity=8388608 size=4194304 hidden=0 parent=p.vhd\n", "", 0)


@pytest.mark.parametrize("pattern,name,matches", [
    ("VHD-*", "VHD-1234", True), ("VHD-*", "MGT", False), ("*", "a/b", False), ("V?D-[0-9]*", "VHD-1", True),
    ("V[!H]D", "VHD", False), ("@(MGT|VHD-a)", "VHD-a", True), ("+(ab)", "ababab", True), ("!(MGT)", "VHD", True),
    ("!(MGT)", "MGT", False), ("*(x)y", "y", True), (r"a\*", "a*", True), (r"a\*", "ab", False),
])
def test_lv_name_patterns_follow_fnmatch_pathname_extmatch(pattern, name, matches):
    assert vhdutil_cli.Pattern(pattern).match(name) is matches


@pytest.mark.parametrize("name,volume", [
    ("VG_XenStorage--0a1b-VHD--b000", "VHD-b000"), ("./VG_XenStorage--x-VHD--y", "VHD-y"),
    ("/dev/mapper/VG--a-VHD--c", "VHD-c"), ("./p.vhd", "p.vhd"), ("base-x.vhd", "x.vhd"),
])
def test_device_mapper_names_become_lv_names(name, volume):
    assert vhdutil_cli.extract_volume_name(name) == volume


def test_header_names_without_dm_structure_abort():
    with pytest.raises(vhdutil_cli.Abort):
        vhdutil_cli.extract_volume_name("p.vhd")


def test_glob_braces_keep_alternative_order_and_sort_within(tmp_path):
    for name in ("b.vhd", "a.vhd", "c.vhd", "z.raw"):
        open(str(tmp_path / name), "w").close()
    errors = []
    glob = vhdutil_cli.Glob(False, lambda path, code: errors.append((path, code)) or code)
    assert glob.run(str(tmp_path) + "/{c,*}.vhd") == vhdutil_cli.GLOB_OK
    assert [os.path.basename(p) for p in glob.paths] == ["c.vhd", "a.vhd", "b.vhd", "c.vhd"]
    missing = vhdutil_cli.Glob(False, lambda path, code: errors.append((path, code)) or code)
    assert missing.run(str(tmp_path) + "/nodir/*.vhd") == vhdutil_cli.GLOB_ABORTED
    assert errors == [(str(tmp_path) + "/nodir", 2)]


def test_c_basename():
    assert [vhdutil_cli.c_basename(p) for p in ("", "/", "a/b/", "/x/y.vhd", "y")] == [".", "/", "b", "y.vhd", "y"]


def test_lvhd_chain_snapshotted_through_device_mapper_paths(tmp_path):
    """Disks snapshotted through DIR/lvm/mapper carry dm parent names, which scan -l turns into LV names."""
    root = str(tmp_path)
    vg = lvm.VolumeGroup.for_sr(root, "5e5e", create=True)
    base, leaf = "VHD-" + B_UUID, "VHD-" + LEAF_UUID
    vg.create_lv(base, 8 << 20)
    vg.create_lv(leaf, 8 << 20)
    vhdfile.create(vg.dm_path(base), 8)
    with vhdfile.Vhd.open(vg.lv_path(base), writable=True) as vhd:
        vhd.set_hidden(1)
    vhdfile.snapshot(vg.dm_path(leaf), vg.dm_path(base))
    bin_dir = os.path.join(root, "bin")
    tools.install_tools(root, bin_dir)
    env = {"PATH": bin_dir + ":" + os.environ.get("PATH", "/usr/bin:/bin"), "DOM0SIM_ROOT": root}
    expected = ("vhd={} capacity=8388608 size=8388608 hidden=1 parent=none\n"
                "   vhd={} capacity=8388608 size=8388608 hidden=0 parent={}\n".format(base, leaf, base))
    assert run_tool(["scan", "-p", "-l", vg.name, "-m", "VHD-*"], root, env) == (expected, "", 0)
    out, err, code = run_tool(["scan", "-f", "-c", "-l", vg.name, "-m", "VHD-*"], root, env)
    assert (sorted(out.splitlines()), err, code) == (sorted(line.strip() for line in expected.splitlines()), "", 0)


def test_agent_facing_outputs_without_transcripts(tmp_path):
    """The lines the agent parses, checked inline: scan, read -B bytes, coalesce text, check -p."""
    cwd = str(tmp_path)
    vhdfile.create(os.path.join(cwd, "base.vhd"), 64)
    with vhdfile.Vhd.open(os.path.join(cwd, "base.vhd"), writable=True) as vhd:
        vhd.write(0, b"\xaa" * 4096)
        vhd.write(31 * 2 * 1024 * 1024, b"\xcc" * 512)
    vhdfile.snapshot(os.path.join(cwd, "leaf.vhd"), os.path.join(cwd, "base.vhd"))
    with vhdfile.Vhd.open(os.path.join(cwd, "leaf.vhd"), writable=True) as vhd:
        vhd.write(5 * 2 * 1024 * 1024, b"\x22" * (2 * 1024 * 1024))
    assert run_tool(["set", "-n", "base.vhd", "-f", "hidden", "-v", "1"], cwd) == ("", "", 0)
    out, _, code = run_tool(["scan", "-p", "-m", os.path.join(cwd, "*.vhd")], cwd)
    assert (out, code) == ("vhd=base.vhd capacity=67108864 size=4203008 hidden=1 parent=none\n"
                           "   vhd=leaf.vhd capacity=67108864 size=2105856 hidden=0 parent=base.vhd\n", 0)
    process = subprocess.Popen([sys.executable, "-m", "tests.dom0sim.vhdutil_cli", "read", "-B", "-n", "base.vhd"],
                               cwd=cwd, env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE)
    assert process.communicate()[0] == b"\x80\x00\x00\x01"
    assert run_tool(["coalesce", "-n", "leaf.vhd"], cwd) == ("Coalesced 4096 sectors", "", 0)
    assert run_tool(["check", "-p", "-n", "leaf.vhd"], cwd) == (
        "leaf.vhd is valid\n{} is valid\n".format(os.path.realpath(os.path.join(cwd, "base.vhd"))), "", 0)
    assert run_tool(["query", "-n", "base.vhd", "-a", "-p"], cwd) == ("base.vhd has no parent\n3\n", "", 0)


def test_coalesce_of_an_orphan_and_chain_statistics(tmp_path):
    cwd = str(tmp_path)
    vhdfile.create(os.path.join(cwd, "gone.vhd"), 8)
    vhdfile.snapshot(os.path.join(cwd, "orphan.vhd"), os.path.join(cwd, "gone.vhd"))
    os.unlink(os.path.join(cwd, "gone.vhd"))
    assert run_tool(["coalesce", "-n", "orphan.vhd"], cwd) == (
        "error finding orphan.vhd parent: -2\nerror coalescing: -2\n", "", 2)
    vhdfile.create(os.path.join(cwd, "p.vhd"), 8)
    with vhdfile.Vhd.open(os.path.join(cwd, "p.vhd"), writable=True) as vhd:
        vhd.write(0, b"\x01" * 4096)
    vhdfile.snapshot(os.path.join(cwd, "c.vhd"), os.path.join(cwd, "p.vhd"))
    with vhdfile.Vhd.open(os.path.join(cwd, "c.vhd"), writable=True) as vhd:
        vhd.write(2048, b"\x02" * 4096)
    assert run_tool(["check", "-s", "-p", "-n", "c.vhd"], cwd) == (
        "p.vhd: secs allocated: 0x1000 secs written: 0x8 (0.20%)\n"
        "c.vhd: secs allocated: 0x1000 secs written: 0x8 (0.20%) secs not in parent: 0x4 (50.00%)"
        " secs not in ancestors: 0x4 (50.00%)\n", "", 0)
    assert run_tool(["coalesce", "-p", "-n", "c.vhd"], cwd) == (
        "\r  0.00%\r 25.00%\r 50.00%\r 75.00%\r100.00%\nCoalesced 8 sectors", "", 0)


def test_modify_points_a_child_at_another_parent(tmp_path):
    cwd = str(tmp_path)
    for name in ("a.vhd", "b.vhd"):
        vhdfile.create(os.path.join(cwd, name), 8)
    vhdfile.snapshot(os.path.join(cwd, "c.vhd"), os.path.join(cwd, "a.vhd"))
    assert run_tool(["modify", "-n", "c.vhd", "-p", "b.vhd"], cwd) == ("", "", 0)
    assert run_tool(["query", "-n", "c.vhd", "-p"], cwd) == (os.path.realpath(os.path.join(cwd, "b.vhd")) + "\n", "", 0)
    assert run_tool(["modify", "-n", "c.vhd", "-p", "x.vhd"], cwd) == ("failed to set parent to 'x.vhd': -2\n", "", 2)
    assert run_tool(["modify", "-n", "a.vhd", "-p", "b.vhd"], cwd) == ("failed to set parent to 'b.vhd': -22\n", "", 22)
    assert run_tool(["modify"], cwd) == (vhdutil_cli.MODIFY_USAGE, "", 22)


def test_bracket_patterns_with_set_characters_scan_without_warnings(tmp_path):
    """`[`, `-`, `&&` and the like inside a bracket are plain characters to fnmatch: no Python
    FutureWarning on stderr, and a range that runs backwards matches nothing, as in glibc."""
    root = str(tmp_path)
    vhdfile.create(os.path.join(root, "[x1.vhd"), 4)
    vg = lvm.VolumeGroup.create(root, "VGB")
    vhdfile.create(vg.create_lv("VHD-a", 4 << 20), 4)
    bin_dir = os.path.join(root, "bin")
    tools.install_tools(root, bin_dir)
    env = {"PATH": bin_dir + ":" + os.environ.get("PATH", "/usr/bin:/bin"), "DOM0SIM_ROOT": root,
           "PYTHONWARNINGS": "default"}
    found_file = "vhd=[x1.vhd capacity=4194304 size=3584 hidden=0 parent=none\n"
    found_lv = "vhd=VHD-a capacity=4194304 size=4194304 hidden=0 parent=none\n"
    for args, stdout in ((["-m", os.path.join(root, "[[]x*.vhd")], found_file),
                         (["-m", os.path.join(root, "[!-a&&]x*.vhd")], found_file),
                         (["-m", os.path.join(root, "[a-[]*.vhd")], ""),
                         (["-l", "VGB", "-m", "VHD-[[a]"], found_lv),
                         (["-l", "VGB", "-m", "VHD-[a--z||]"], "")):
        assert run_tool(["scan"] + args, root, env) == (stdout, "", 0), args
