"""`vhd-util scan`: targets from a file glob or a volume group's LVs, one line per VHD (or a tree
with -p), parents followed with -a, and the error lines of targets that cannot be read."""
import contextlib
import errno
import os
import re

from tests.dom0sim import lvm
from tests.dom0sim.vhdformat import DISK_DIFF, VhdError
from tests.dom0sim.vhdutil_disk import Abort, Disk, open_volume
from tests.dom0sim.vhdutil_glob import GLOB_ABORTED, GLOB_NOMATCH, Glob, Pattern
from tests.dom0sim.vhdutil_libc import c_basename
from tests.dom0sim.vhdutil_options import CommandLine
from tests.dom0sim.vhdutil_volumes import lvm_scan_vg

SCAN_FAST, SCAN_PRETTY, SCAN_VOLUME, SCAN_NOFAIL, SCAN_VERBOSE, SCAN_PARENTS, SCAN_MARKERS = (
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40)
TYPE_RAW_FILE, TYPE_VHD_FILE, TYPE_RAW_VOLUME, TYPE_VHD_VOLUME = 0x01, 0x02, 0x04, 0x08
SCAN_USAGE = ("usage: [OPTIONS] FILES\noptions: [-m match filter] [-f fast] [-c continue on failure] "
              "[-l LVM volume] [-p pretty print] [-a scan parents] [-v verbose] [-h help] [-M show markers]\n")


class Target(object):
    """One thing to scan; a zeroed Target is the slot a failed init leaves behind."""

    def __init__(self, name="", size=0, kind=0, path=None, window=None):
        self.name = name
        self.size = size
        self.kind = kind
        self.path = path
        self.window = window

    @property
    def volume(self):
        return self.kind in (TYPE_RAW_VOLUME, TYPE_VHD_VOLUME)

    @property
    def vhd(self):
        return self.kind in (TYPE_VHD_FILE, TYPE_VHD_VOLUME)


class Image(object):
    """What scan learnt about one target: the fields of its line, or its error, and its tree place."""

    def __init__(self, target):
        self.target = target
        self.name = target.name
        self.parent = None
        self.capacity = 0
        self.size = 0
        self.hidden = 0
        self.marker = 0
        self.keyhash = ""
        self.error = 0
        self.message = None
        self.children = []
        self.parent_image = None
        self.printed = False


def extract_volume_name(name):
    """The LV name inside a device-mapper name (`VG--x-VHD--y` -> `VHD-y`); Abort as libvhd's ASSERT."""
    tail = name[name.rfind("/"):] if "/" in name else name
    converted = re.sub(r"--|-", lambda m: "-" if m.group(0) == "--" else "/", tail)
    if "/" not in converted:
        raise Abort()
    return converted[converted.rfind("/") + 1:]


@contextlib.contextmanager
def _nothing_held():
    yield


class Scanner(object):
    """vhd-util scan: targets from a glob or the VG's LVs, then one line (or tree) per image."""

    def __init__(self, flags, out, vg_name=None):
        self.flags = flags
        self.out = out
        self.vg_name = vg_name
        self.lvs = []
        self.pretty_images = []
        self.pretty_names = set()

    def flag(self, bit):
        return bool(self.flags & bit)

    # -- targets

    def file_targets(self, filter_pattern, names):
        """(error, targets) as vhd_util_scan_find_file_targets."""
        paths = []
        if filter_pattern is not None:
            matcher = Glob(self.flag(SCAN_FAST), self.scan_error)
            status = matcher.run(filter_pattern)
            err = {GLOB_ABORTED: -errno.EIO, GLOB_NOMATCH: -matcher.last_errno}.get(status, 0)
            if err:
                self.scan_error(filter_pattern, err)
                return err, []
            paths = matcher.paths
        return self.collect(((path, path) for path in paths + names),
                            lambda path: self.file_target(path, TYPE_VHD_FILE))

    @staticmethod
    def file_target(path, kind):
        try:
            size = os.stat(path).st_size
        except OSError as exc:
            raise VhdError(exc.errno, "stat") from None
        return Target(path, size, kind, path)

    def volume_targets(self, filter_pattern, names):
        try:
            self.lvs = lvm_scan_vg(self.vg_name)
        except VhdError as exc:
            self.out.error("lvm_scan_vg failed {}\n".format(-exc.errno))
            return -exc.errno, []
        total = self.sort_volumes(self.lvs, 0, filter_pattern) if filter_pattern is not None else 0
        for name in names:
            total += self.sort_volumes(self.lvs, total, name)
        return self.collect(((lv.name, lv) for lv in self.lvs[:total]),
                            lambda lv: self.volume_target(lv, TYPE_VHD_VOLUME))

    def collect(self, named_items, make_target):
        """(error, targets) for (name, item) pairs: a target that cannot be made prints its error
        line and ends the scan, or with -c leaves a zeroed slot."""
        targets = []
        for name, item in named_items:
            try:
                targets.append(make_target(item))
            except VhdError as exc:
                self.scan_error(name, -exc.errno)
                if not self.flag(SCAN_NOFAIL):
                    return -exc.errno, []
                targets.append(Target())
        return 0, targets

    @staticmethod
    def sort_volumes(lvs, start, pattern):
        """Move the LVs matching `pattern` to the front of lvs[start:], as swap_volume does."""
        matcher = Pattern(pattern)
        matches = 0
        for index in range(start, len(lvs)):
            if matcher.match(lvs[index].name):
                dst = start + matches
                lvs[dst], lvs[index] = lvs[index], lvs[dst]
                matches += 1
        return matches

    def volume_target(self, lv, kind):
        if not lv.linear:
            raise VhdError(errno.ENOSYS, "not linear")
        try:
            path, window = self.volume_group().locate(lv.name)
        except lvm.LvmError:
            raise VhdError(errno.ENOENT, "no such LV") from None
        return Target(lv.name, lv.size, kind, path, window)

    def volume_group(self):
        return lvm.VolumeGroup(lvm.root_from_env(), self.vg_name)

    def volumes_held(self):
        """The VG held still while its LVs are read (nothing to hold without a simulated host)."""
        if not os.environ.get(lvm.ROOT_ENV):
            return _nothing_held()
        return self.volume_group().reading()

    # -- scanning

    def run(self, targets):
        """vhd_util_scan_targets: returns the error that stopped the scan (0 with -c)."""
        queue = list(targets)
        err = 0
        index = 0
        while index < len(queue):
            target = queue[index]
            index += 1
            image, disk, err = self.inspect(target)
            self.print_image(image)
            if self.flag(SCAN_PARENTS) and image.parent:
                self.add_parent(queue, disk, image)
            if disk is not None:
                disk.close()
            if err and not self.flag(SCAN_NOFAIL):
                break
        if self.flag(SCAN_PRETTY):
            self.print_tree()
        return 0 if self.flag(SCAN_NOFAIL) else err

    def inspect(self, target):
        """Open one target and fill its image; (image, disk, negative errno or 0)."""
        image = Image(target)
        disk = None
        try:
            disk = self.open(image)
            image.size = target.size
            image.capacity = disk.footer.current_size if target.vhd else target.size
            image.hidden = disk.footer.hidden if target.vhd else 1
            if self.flag(SCAN_MARKERS) and target.vhd:
                image.message = "checking markers"
                image.marker, image.keyhash = disk.marker, disk.keyhash
                image.message = None
            if disk is not None and disk.footer.disk_type == DISK_DIFF:
                image.message = "getting parent"
                image.parent = self.parent_of(disk, image)
                image.message = None
        except VhdError as exc:
            image.error = -exc.errno
            return image, disk, image.error
        return image, disk, 0

    def open(self, image):
        """The target's Disk, or None for a raw file (or a zeroed slot) that has no VHD to open."""
        target = image.target
        if not target.volume and self.flag(SCAN_PRETTY):
            image.message = "resolving name"
            if not target.name or not os.path.exists(target.name):
                raise VhdError(errno.ENOENT, "resolving name")
            image.name = os.path.realpath(target.name)
        if target.volume:
            return self.open_volume(image)
        if not target.vhd:
            image.message = None
            return None
        image.message = "opening file"
        disk = Disk.open(target.path, fast=self.flag(SCAN_FAST))
        image.message = None
        return disk

    @staticmethod
    def open_volume(image):
        try:
            return open_volume(image.target.path, image.target.size, image.target.window)
        except VhdError as exc:
            image.message = exc.message
            raise

    def parent_of(self, disk, image):
        """The parent as scan names it: the LV name for volumes, else the path or the raw name."""
        if image.target.volume:
            name = disk.header.parent_name if self.flag(SCAN_FAST) else None
            return extract_volume_name(name if name is not None else disk.scan_parent_name())
        if self.flag(SCAN_FAST):
            if disk.header.parent_name is not None:
                return disk.header.parent_name
        else:
            try:
                return disk.parent_path()
            except VhdError:
                pass
        return disk.scan_parent_name()

    def add_parent(self, queue, disk, image):
        """vhd_util_scan_add_parent: queue the parent; errors print a line but never fail the scan."""
        volume = image.target.volume
        if disk.parent_raw():
            kind = TYPE_RAW_VOLUME if volume else TYPE_RAW_FILE
        else:
            kind = TYPE_VHD_VOLUME if volume else TYPE_VHD_FILE
        try:
            if volume:
                if any(image.parent == target.name for target in queue):
                    return
                matcher = Pattern(image.parent)
                lv = next((lv for lv in self.lvs if matcher.match(lv.name)), None)
                if lv is None:
                    raise VhdError(errno.ENOENT, "no such LV")
                queue.append(self.volume_target(lv, kind))
            else:
                wanted = c_basename(image.parent)
                if any(c_basename(target.name) == wanted for target in queue):
                    return
                queue.append(self.file_target(image.parent, kind))
        except VhdError as exc:
            self.scan_error(image.parent, -exc.errno)

    # -- output

    def scan_error(self, name, code):
        """vhd_util_scan_error: an error line for a target; returns `code` (glob's errfunc aborts on it)."""
        image = Image(Target(name))
        image.error = code
        image.message = "failure scanning target"
        self.print_image(image)
        return code

    def print_image(self, image):
        """An error line now; with -p a good image waits for the tree (once per name)."""
        if not image.error and self.flag(SCAN_PRETTY):
            if image.name not in self.pretty_names:
                self.pretty_names.add(image.name)
                self.pretty_images.append(image)
            return
        self.print_line(image, 0)

    def print_line(self, image, indent):
        pad = " " * indent
        if image.error:
            self.out.write("{}vhd={} scan-error={} error-message='{}'\n".format(
                pad, image.name, image.error, image.message))
            return
        name, parent = image.name, image.parent or "none"
        if not self.flag(SCAN_VERBOSE):
            name = c_basename(image.name)
            if image.parent:
                parent = c_basename(image.parent)
        note = " (not found in scan)" if self.flag(SCAN_PRETTY) and image.parent and not image.parent_image else ""
        markers = " marker={} keyhash={}".format(image.marker, image.keyhash) if self.flag(SCAN_MARKERS) else ""
        self.out.write("{}vhd={} capacity={} size={} hidden={}{} parent={}{}\n".format(
            pad, name, image.capacity, image.size, image.hidden, markers, parent, note))

    def print_tree(self):
        images = sorted(self.pretty_images, key=lambda img: img.name.encode("utf-8", "surrogateescape"))
        by_name = dict((img.name, img) for img in images)
        for image in images:
            image.parent_image = by_name.get(image.parent) if image.parent else None
            if image.parent_image is not None:
                image.parent_image.children.append(image)
        for image in images:
            if image.parent_image is None and image.hidden:
                self.print_subtree(image, 0)
        for image in images:
            if not image.printed and image.parent_image is None:
                self.print_subtree(image, 0)
        for image in images:
            if not image.printed:
                self.print_subtree(image, 0)

    def print_subtree(self, image, depth):
        self.print_line(image, depth * 3)
        image.printed = True
        for hidden in (False, True):
            for child in image.children:
                if bool(child.hidden) == hidden:
                    self.print_subtree(child, depth + 1)


def cmd_scan(args, out):
    """`vhd-util scan [-m filter] [-l VG] [-fcpavM] [names]`: returns 0 or a negative errno."""
    line = CommandLine(args, "m:fcl:pavMh", "scan", out, SCAN_USAGE, help_succeeds=True)
    filter_pattern, vg_name, operands = line.get("m"), line.get("l"), line.operands
    if line.stop or (filter_pattern is None and not operands):
        return line.usage()
    bits = {"f": SCAN_FAST, "c": SCAN_NOFAIL, "p": SCAN_PRETTY, "a": SCAN_PARENTS, "v": SCAN_VERBOSE,
            "M": SCAN_MARKERS, "l": SCAN_VOLUME}
    flags = 0
    for opt in line.values:
        flags |= bits.get(opt, 0)
    if flags & SCAN_PRETTY:
        flags &= ~SCAN_FAST
    scanner = Scanner(flags, out, vg_name)
    if flags & SCAN_VOLUME:
        with scanner.volumes_held():
            err, targets = scanner.volume_targets(filter_pattern, operands)
            if not err:
                return scanner.run(targets)
    else:
        err, targets = scanner.file_targets(filter_pattern, operands)
    if err:
        out.error("scan failed: {}. Check syslog for details\n".format(err))
        return err
    return scanner.run(targets)
