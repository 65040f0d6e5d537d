"""Runs the host's `vhd-util`: one `scan` per SR, `read -B` for block bitmaps.

The configured binary runs with the configured PATH (it finds `lvs` and `vgs` through it) and a
timeout. A missing binary means the host tools are unreachable (`HostUnreachable`); anything
else that goes wrong with one run is a `VhdUtilError`, which the caller records for that SR.
"""
import errno
import os
import subprocess

from . import vhdtree
from .errors import HostUnreachable

LVM_VG_PREFIX = "VG_XenStorage-"
LVM_LV_PATTERN = vhdtree.LV_PREFIX + "*"


class VhdUtilError(Exception):
    """One run of `vhd-util` failed or printed what it never prints; the message is one line."""


class VhdUtil(object):
    """The configured `vhd-util`; `spawned` counts the processes started (for the benchmark)."""

    def __init__(self, config):
        self.binary = config.tools.vhd_util
        self.timeout = config.tools.timeout_seconds
        self.environment = dict(os.environ, PATH=config.tools.path, LC_ALL="C")
        self.spawned = 0

    def run(self, args):
        """stdout of `vhd-util ARGS` as bytes; a non-zero exit or a timeout raises VhdUtilError."""
        command = [self.binary] + list(args)
        try:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, env=self.environment, close_fds=True)
        except OSError as error:
            if error.errno in (errno.ENOENT, errno.EACCES, errno.ENOEXEC, errno.ENOTDIR):
                raise HostUnreachable("cannot run {}: {}".format(self.binary, os.strerror(error.errno))) from None
            raise VhdUtilError("cannot run {}: {}".format(self.binary, os.strerror(error.errno))) from None
        self.spawned += 1
        try:
            stdout, stderr = process.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise VhdUtilError("`vhd-util {}` timed out after {:g} s".format(" ".join(args), self.timeout)) from None
        if process.returncode != 0:
            raise VhdUtilError("`vhd-util {}` failed (exit {}): {}".format(
                " ".join(args), _exit_status(process.returncode), _first_line(stderr, stdout)))
        return stdout

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
        output = self.run(["read", "-B", "-n", path])
        expected = vhdtree.bitmap_length(virtual_size)
        if len(output) != expected:
            raise VhdUtilError("`vhd-util read -B -n {}` printed {} bytes where a {}-byte bitmap was expected: {}"
                               .format(path, len(output), expected, _first_line(output)))
        return output


def lvm_vg_name(sr_uuid):
    return LVM_VG_PREFIX + sr_uuid


def _exit_status(returncode):
    return "signal {}".format(-returncode) if returncode < 0 else str(returncode)


def _first_line(*outputs):
    for output in outputs:
        text = output.decode("utf-8", "replace").strip()
        if text:
            line = text.splitlines()[0].strip()
            printable = "".join(char if char.isprintable() else "?" for char in line)
            return printable[:200]
    return "no output"
