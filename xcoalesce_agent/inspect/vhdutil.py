"""Runs the host's `vhd-util`: one `scan` per SR, `read -B` for block bitmaps; and `lvs`, `vgs`.

The configured binary runs with the configured PATH (it finds `lvs` and `vgs` through it) and a
timeout. A missing binary means the host tools are unreachable (`HostUnreachable`); anything
else that goes wrong with one run is a `VhdUtilError`, which the caller records for that SR.
"""
import binascii
import errno
import json
import os
import shutil
import stat

from . import qcow2meta, vhdtree
from .toolshell import ToolShell, ToolShellError
from ..errors import HostUnreachable

LVM_VG_PREFIX = "VG_XenStorage-"
LVM_LV_PATTERN = vhdtree.LV_PREFIX + "*"


class VhdUtilError(Exception):
    """One run of `vhd-util` failed or printed what it never prints; the message is one line."""


class VhdUtil(object):
    """The configured `vhd-util`, counting its runs and the processes forked for them (for the benchmark).

    Every command runs through one `ToolShell`, started on the first; `close()` ends it.
    """

    def __init__(self, config):
        self.binary = config.tools.vhd_util
        self.qcow2_helper = config.tools.qcow2_helper
        self.qemu_img = config.tools.qemu_img
        self.timeout = config.tools.timeout_seconds
        self.environment = dict(os.environ, PATH=config.tools.path, LC_ALL="C")
        self.spawned = 0      # runs of vhd-util, qcow2_helper and qemu-img
        self.shell = ToolShell(self.environment)

    @property
    def forked(self):
        """Processes this one started: the shells, which fork the tools."""
        return self.shell.started

    def start(self):
        """Starts the tools' shell now (else on the first command); a failure waits for that command."""
        try:
            self.shell.start()
        except (ToolShellError, OSError):
            pass

    def close(self):
        self.shell.close()

    def run(self, args):
        """stdout of `vhd-util ARGS` as bytes; a non-zero exit or a timeout raises VhdUtilError."""
        output = self._run_command([self.binary] + list(args), "vhd-util " + " ".join(args))
        self.spawned += 1
        return output

    def run_lvm(self, command, args):
        """stdout of the LVM reporting command `command` (`lvs`, `vgs`, found through the configured
        PATH) with `args`, as text; a failure raises VhdUtilError."""
        output = self._run_command([command] + list(args), "{} {}".format(command, " ".join(args)))
        return output.decode("utf-8", "replace")

    def _run_command(self, command, what):
        """stdout of `command`, or VhdUtilError; HostUnreachable when the program is not there to run."""
        if shutil.which(command[0], path=self.environment["PATH"]) is None:
            code = errno.EACCES if os.path.exists(command[0]) else errno.ENOENT
            raise HostUnreachable("cannot run {}: {}".format(command[0], os.strerror(code)))
        try:
            result = self.shell.run(command, self.timeout)
        except ToolShellError as error:
            raise VhdUtilError(str(error)) from None
        except OSError as error:
            raise VhdUtilError("cannot run {}: {}".format(command[0], os.strerror(error.errno))) from None
        if result is None:
            raise VhdUtilError("`{}` timed out after {:g} s".format(what, self.timeout))
        returncode, stdout, stderr = result
        if returncode != 0:
            raise VhdUtilError("`{}` failed (exit {}): {}".format(
                what, returncode, _first_line(stderr, stdout)))
        return stdout

    def qcow2_bitmap(self, path, header):
        """The QCOW2 image's own cluster bitmap (qcow2meta's order) from `qcow2_helper bitmap PATH`
        where it is installed and prints every cluster, else from `qemu-img map` of the image alone;
        None when neither is installed. A failed run raises VhdUtilError."""
        helper = header.whole_helper_bitmap() and os.access(self.qcow2_helper, os.X_OK)
        if helper:
            command = [self.qcow2_helper, "bitmap", path]
        elif os.access(self.qemu_img, os.X_OK):
            command = [self.qemu_img, "map", "-U", "--output=json", qemu_image_alone(path)]
        else:
            return None
        what = " ".join(command)
        output = self._run_command(command, what)
        self.spawned += 1
        try:
            if helper:
                return qcow2meta.helper_bitmap(output, header, "`{}`".format(what))
            return qcow2meta.map_bitmap(output.decode("utf-8", "replace"), header)
        except qcow2meta.Qcow2Error as error:
            raise VhdUtilError("{}: {}".format(path, error)) from None

    def scan_file_sr(self, sr_dir):
        """Scan records of every `*.vhd` in a file SR's directory."""
        return self._scan(["scan", "-f", "-c", "-m", os.path.join(sr_dir, "*" + vhdtree.FILE_SUFFIX)], lvm=False)

    def scan_lvm_sr(self, sr_uuid):
        """Scan records of every `VHD-*` LV in the SR's volume group."""
        return self._scan(["scan", "-f", "-c", "-l", lvm_vg_name(sr_uuid), "-m", LVM_LV_PATTERN], lvm=True)

    def _scan(self, args, lvm):
        output = self.run(args)
        try:
            return vhdtree.parse_scan(output.decode("utf-8", "replace"), lvm)
        except vhdtree.ScanOutputError as error:
            raise VhdUtilError("`vhd-util {}` printed unexpected output: {}".format(" ".join(args), error)) from None

    def read_bitmap(self, path, virtual_size):
        """The VHD's own block allocation bitmap (MSB first), checked against its expected length."""
        return _checked_bitmap(path, virtual_size, self.run(["read", "-B", "-n", path]))

    def read_bitmaps(self, images):
        """{path: bitmap or VhdUtilError} for [(path, virtual_size)]: one `read -B` per image.

        Each batch is one command of the tool shell: its output goes to the shell's file, read once
        at its end, rather than to a pipe that would wake this process per image.
        """
        results = {}
        for first in range(0, len(images), BITMAP_BATCH):
            batch = images[first:first + BITMAP_BATCH]
            try:
                results.update(self._read_batch(batch))
            except VhdUtilError as error:
                results.update((path, error) for path, _ in batch)
        return results

    def _read_batch(self, batch):
        boundary = "--xcoalesce-{}--".format(binascii.hexlify(os.urandom(12)).decode("ascii"))
        output = self._run_command(["/bin/sh", "-c", _BATCH_SCRIPT, "sh", boundary, self.binary]
                                   + [path for path, _ in batch], "vhd-util read -B (batch of {})".format(len(batch)))
        self.spawned += len(batch)
        parts = output.split(("\n" + boundary + " ").encode("ascii"))
        return {path: _batch_result(path, virtual_size, parts, index)
                for index, (path, virtual_size) in enumerate(batch)}


# For each path: the tool's output, then a line `<boundary> <exit status>`.
_BATCH_SCRIPT = 'b=$1; t=$2; shift 2; for p; do "$t" read -B -n "$p"; printf "\\n%s %d\\n" "$b" $?; done'
BITMAP_BATCH = 256


def _batch_result(path, virtual_size, parts, index):
    """One image's bitmap (or error) from the split output of a batch."""
    if index + 1 >= len(parts):
        return VhdUtilError("`vhd-util read -B -n {}`: no result in the batch output".format(path))
    output = parts[index]
    if index:
        output = output.partition(b"\n")[2]  # what follows the previous image's exit status
    status = parts[index + 1].split(b"\n", 1)[0]
    if status != b"0":
        return VhdUtilError("`vhd-util read -B -n {}` failed (exit {}): {}".format(
            path, status.decode("ascii", "replace"), _first_line(output)))
    try:
        return _checked_bitmap(path, virtual_size, output)
    except VhdUtilError as error:
        return error


def _checked_bitmap(path, virtual_size, output):
    expected = vhdtree.bitmap_length(virtual_size)
    if len(output) != expected:
        raise VhdUtilError("`vhd-util read -B -n {}` printed {} bytes where a {}-byte bitmap was expected: {}"
                           .format(path, len(output), expected, _first_line(output)))
    return output


def qemu_image_alone(path):
    """qemu's name of the QCOW2 image at `path` without its backing chain, opened as a file or as a
    block device (an LV)."""
    try:
        driver = "host_device" if stat.S_ISBLK(os.stat(path).st_mode) else "file"
    except OSError:
        driver = "file"
    return "json:" + json.dumps({"driver": "qcow2", "file": {"driver": driver, "filename": path}, "backing": None},
                                separators=(",", ":"))


def lvm_vg_name(sr_uuid):
    return LVM_VG_PREFIX + sr_uuid


def _first_line(*outputs):
    for output in outputs:
        text = output.decode("utf-8", "replace").strip()
        if text:
            line = text.splitlines()[0].strip()
            printable = "".join(char if char.isprintable() else "?" for char in line)
            return printable[:200]
    return "no output"
