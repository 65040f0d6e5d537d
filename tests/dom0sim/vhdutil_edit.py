"""The `vhd-util` commands that change disks: create, snapshot, set, modify and coalesce."""
import errno
import os

from tests.dom0sim import vhdfile
from tests.dom0sim.vhdformat import VhdError
from tests.dom0sim.vhdutil_disk import Disk, open_failed
from tests.dom0sim.vhdutil_libc import c_strtol, c_strtoul
from tests.dom0sim.vhdutil_options import CommandLine

COALESCE_USAGE = "options: <-n name> [-s sparse] [-p progress] [-h help]\n"
SET_USAGE = "options: <-n name> <-f field> <-v value> [-h help]\n"
CREATE_USAGE = ("options: <-n name> <-s size (MB)> [-r reserve] [-h help] "
                "[<-S size (MB) for metadata preallocation (see vhd-util resize)>]\n")
SNAPSHOT_USAGE = ("options: <-n name> <-p parent name> [-l snapshot depth limit] [-m parent_is_raw] "
                  "[-S size (MB) for metadata preallocation (see vhd-util resize)] "
                  "[-e link to supplied parent name even if it's empty] [-h help]\n")


def cmd_coalesce(args, out):
    """`vhd-util coalesce -n CHILD [-s] [-p]`: merge the child's data into its parent."""
    line = CommandLine(args, "n:o:a:x:sph", "coalesce", out, COALESCE_USAGE)
    if line.incomplete("n"):
        return line.usage()
    name = line.get("n")
    result = coalesce(name, line.given("s"), line.given("p"), out)
    if result < 0:
        out.write("error coalescing: {}\n".format(result))
        return result
    out.write("Coalesced {} sectors".format(result))
    return 0


def coalesce(name, sparse, progress, out):
    """vhd_util_coalesce_parent: sectors copied into the parent, or a negative errno."""
    try:
        disk = Disk.open(name)
    except VhdError as exc:
        return open_failed(out, name, exc)
    if not disk.differencing:
        out.write("coalescing of non-differencing disks is not supported\n")
        return -errno.EINVAL
    try:
        parent = disk.parent_path()
    except VhdError as exc:
        out.write("error finding {} parent: {}\n".format(name, -exc.errno))
        return -exc.errno
    if sparse:
        out.write("opening for sparse writes\n")
    try:
        Disk.open(parent)
    except VhdError as exc:
        return open_failed(out, parent, exc)
    sectors = vhdfile.coalesce(name)
    if progress:
        entries = len(disk.bat)
        for index in range(entries):
            out.write("\r{:6.2f}%".format(float(index) / float(entries) * 100.0))
        out.write("\r100.00%\n")
    return sectors


def cmd_set(args, out):
    """`vhd-util set -n NAME -f hidden|marker -v VALUE`."""
    line = CommandLine(args, "n:f:v:h", "set", out, SET_USAGE)
    if line.incomplete("n", "f", "v"):
        return line.usage()
    name, field, value = line.get("n"), line.get("f"), c_strtol(line.get("v"))
    if len(field) >= 25:
        out.write("invalid field\n" + SET_USAGE)
        return -errno.EINVAL
    if field not in ("hidden", "marker"):
        out.write("invalid field {}\n{}".format(field, SET_USAGE))
        return -errno.EINVAL
    if value < 0 or value > 255:
        out.write("invalid value {}\n{}".format(value, SET_USAGE))
        return -errno.EINVAL
    try:
        vhd = vhdfile.Vhd.open(name, writable=True)
    except VhdError as exc:
        return open_failed(out, name, exc)
    try:
        if field == "hidden":
            vhd.set_hidden(value)
        else:
            vhd.set_marker(value)
    except VhdError as exc:
        return -exc.errno
    finally:
        vhd.close()
    return 0


def cmd_create(args, out):
    """`vhd-util create -n NAME -s MiB [-r] [-S MiB]`: a new dynamic (or, with -r, fixed) disk."""
    line = CommandLine(args, "n:s:S:rh", "create", out, CREATE_USAGE)
    if line.incomplete("n") or not (line.given("s") or line.given("S")):
        return line.usage()
    name, size, max_size = line.get("n"), c_strtoul(line.get("s", "")), c_strtoul(line.get("S", ""))
    if max_size and max_size < size:
        out.write("Error: <-S size> must be greater than <-s size>\n")
        return -errno.EINVAL
    try:
        vhdfile.create(name, size, fixed=line.given("r"))
    except VhdError as exc:
        return -exc.errno
    return 0


def cmd_snapshot(args, out):
    """`vhd-util snapshot -n CHILD -p PARENT [-l limit] [-e]`: a new differencing child."""
    line = CommandLine(args, "n:p:S:l:meh", "snapshot", out, SNAPSHOT_USAGE, help_succeeds=True)
    if line.incomplete("n", "p"):
        return line.usage()
    name, parent, limit = line.get("n"), line.get("p"), c_strtol(line.get("l", ""))
    if not os.path.exists(parent):
        return -errno.ENOENT
    parent = os.path.realpath(parent)
    try:
        backing = parent if line.given("e") else vhdfile.snapshot_target(parent)
        if limit:
            try:
                depth = Disk.open(backing).chain_depth()
            except VhdError as exc:
                out.write("error checking snapshot depth: {}\n".format(-exc.errno))
                return -exc.errno
            if depth + 1 > limit:
                out.write("snapshot depth exceeded: current depth: {}, limit: {}\n".format(depth, limit))
                return -errno.ENOSPC
        vhdfile.snapshot(name, backing, skip_empty_parents=False)
    except VhdError as exc:
        return -exc.errno
    except (IOError, OSError) as exc:
        return -exc.errno
    return 0


MODIFY_USAGE = ("*** Dangerous operations, use with care ***\noptions: <-n name> [-p NEW_PARENT set parent [-m raw]] "
                "[-s NEW_SIZE set size] [-z zero (kill data)] [-h help]\n")


def cmd_modify(args, out):
    """`modify -n child -p parent`: re-point a child (SM's setParent); -s, -z and -m are not simulated."""
    line = CommandLine(args, "n:s:p:mzh", "modify", out, MODIFY_USAGE)
    for opt, _ in line.options:
        if opt in "smz":
            out.error("vhd-util modify -{}: not available on the simulated host\n".format(opt))
            return -errno.ENOSYS
    if line.incomplete("n"):
        return line.usage()
    name, parent = line.get("n"), line.get("p")
    try:
        Disk.open(name).close()
    except VhdError as exc:
        return open_failed(out, name, exc)
    if parent is None:
        return 0
    try:
        if not os.path.exists(parent):
            raise VhdError(errno.ENOENT, "no parent")
        vhdfile.set_parent(name, parent)
    except VhdError as exc:
        out.write("failed to set parent to '{}': {}\n".format(parent, -exc.errno))
        return -exc.errno
    return 0
