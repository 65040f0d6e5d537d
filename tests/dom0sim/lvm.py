"""The simulated host's LVM: volume groups stored under DIR/lvm, and `lvs` / `vgs` stand-ins.

Layout (docs/design.md): DIR/lvm/<VG>/metadata.json describes the VG and its LVs, and
DIR/lvm/<VG>/<LV> holds the bytes stored in that LV (a VHD, footer at its end of data).
The LV size lives in the metadata only; the file never outgrows it.
DIR/lvm/mapper/<dm name> is a hard link to each LV's file, as /dev/mapper/<dm name> is the LV's
device on a host: a VHD snapshotted through these paths records the device-mapper parent name
(`VG_XenStorage--<sr>-VHD--<uuid>`) in its header and locators, as LVHD does.

Run as `python -m tests.dom0sim.lvm lvs ARGS` or `... vgs ARGS` with DOM0SIM_ROOT=DIR.
"""
import errno
import fcntl
import json
import os
import sys
from contextlib import contextmanager

EXTENT_SIZE = 4 * 1024 * 1024
PE_START = 1024 * 1024
PV_NAME = "/dev/sdb"
METADATA = "metadata.json"
MAPPER = "mapper"
LOCK = ".lock"
ROOT_ENV = "DOM0SIM_ROOT"


class LvmError(Exception):
    """An LVM operation that the real tools would refuse; `code` is the errno it maps to."""

    def __init__(self, message, code=errno.EINVAL):
        Exception.__init__(self, message)
        self.code = code


def sr_vg_name(sr_uuid):
    """The VG name XenServer gives an LVM SR."""
    return "VG_XenStorage-" + sr_uuid


def dm_name(vg_name, lv_name):
    """The device-mapper name of an LV: dashes doubled, VG and LV joined by one dash."""
    return vg_name.replace("-", "--") + "-" + lv_name.replace("-", "--")


def round_to_extents(size):
    """LV sizes are whole extents: round up, at least one extent."""
    size = max(int(size), 1)
    return (size + EXTENT_SIZE - 1) // EXTENT_SIZE * EXTENT_SIZE


def store_dir(root):
    return os.path.join(root, "lvm")


def root_from_env():
    root = os.environ.get(ROOT_ENV)
    if not root:
        raise LvmError("{} is not set".format(ROOT_ENV), errno.ENOENT)
    return root


def list_vg_names(root):
    base = store_dir(root)
    if not os.path.isdir(base):
        return []
    return sorted(name for name in os.listdir(base)
                  if os.path.isfile(os.path.join(base, name, METADATA)))


class VolumeGroup(object):
    """One VG of the store. Every change is a locked read-modify-write of metadata.json."""

    def __init__(self, root, name):
        self.root = root
        self.name = name
        self.path = os.path.join(store_dir(root), name)

    @classmethod
    def create(cls, root, name, pv_name=PV_NAME, pv_size=None):
        """Make an empty VG (as `vgcreate`); pv_size None means unlimited."""
        vg = cls(root, name)
        if vg.exists():
            raise LvmError('A volume group called {} already exists.'.format(name), errno.EEXIST)
        os.makedirs(vg.path)
        vg._save({"extent_size": EXTENT_SIZE, "pe_start": PE_START, "pv_name": pv_name,
                  "pv_size": pv_size, "lvs": []})
        return vg

    @classmethod
    def for_sr(cls, root, sr_uuid, create=False, **kwargs):
        name = sr_vg_name(sr_uuid)
        return cls.create(root, name, **kwargs) if create else cls(root, name)

    def exists(self):
        return os.path.isfile(os.path.join(self.path, METADATA))

    def metadata(self):
        """The parsed metadata.json; LvmError when the VG does not exist."""
        try:
            with open(os.path.join(self.path, METADATA)) as handle:
                return json.load(handle)
        except (IOError, OSError):
            raise LvmError('Volume group "{}" not found'.format(self.name), errno.ENOENT) from None
        except ValueError as exc:
            raise LvmError("{}: corrupt metadata: {}".format(self.name, exc)) from None

    def _save(self, meta):
        tmp = os.path.join(self.path, METADATA + ".tmp")
        with open(tmp, "w") as handle:
            handle.write(json.dumps(meta, sort_keys=True))
        os.rename(tmp, os.path.join(self.path, METADATA))

    @contextmanager
    def _locked(self):
        meta = self.metadata()
        with open(os.path.join(self.path, LOCK), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                meta = self.metadata()
                yield meta
                self._save(meta)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def lvs(self):
        """The LVs as dicts (name, size, start_extent, segtype), in metadata order."""
        return [dict(lv, segtype=lv.get("segtype", "linear")) for lv in self.metadata()["lvs"]]

    def lv(self, name):
        for lv in self.lvs():
            if lv["name"] == name:
                return lv
        raise LvmError('Failed to find logical volume "{}/{}"'.format(self.name, name), errno.ENOENT)

    def lv_path(self, name):
        """The file holding the LV's bytes (it may not exist yet: an LV reads as zeros)."""
        return os.path.join(self.path, name)

    def dm_path(self, name):
        """DIR/lvm/mapper/<dm name>: the same file as lv_path, under its device-mapper name."""
        return os.path.join(store_dir(self.root), MAPPER, dm_name(self.name, name))

    def _link(self, name):
        mapper = os.path.dirname(self.dm_path(name))
        if not os.path.isdir(mapper):
            os.makedirs(mapper)
        if os.path.exists(self.dm_path(name)):
            os.unlink(self.dm_path(name))
        os.link(self.lv_path(name), self.dm_path(name))

    def _unlink(self, name):
        for path in (self.lv_path(name), self.dm_path(name)):
            if os.path.exists(path):
                os.unlink(path)

    def lv_size(self, name):
        return self.lv(name)["size"]

    def free_bytes(self):
        """Unallocated bytes, or None for a VG without a size."""
        meta = self.metadata()
        if meta.get("pv_size") is None:
            return None
        usable = (meta["pv_size"] - meta["pe_start"]) // meta["extent_size"] * meta["extent_size"]
        return usable - sum(lv["size"] for lv in meta["lvs"])

    def create_lv(self, name, size, segtype="linear"):
        """As `lvcreate -n name -L size`: size rounded up to extents. Returns the LV's file path."""
        size = round_to_extents(size)
        with self._locked() as meta:
            if any(lv["name"] == name for lv in meta["lvs"]):
                raise LvmError('Logical volume "{}" already exists in volume group "{}"'.format(
                    name, self.name), errno.EEXIST)
            self._check_space(meta, size)
            lv = {"name": name, "size": size, "start_extent": _free_extent(meta["lvs"], size // EXTENT_SIZE)}
            if segtype != "linear":
                lv["segtype"] = segtype
            meta["lvs"].append(lv)
        open(self.lv_path(name), "ab").close()
        self._link(name)
        return self.lv_path(name)

    def resize_lv(self, name, size):
        """Inflate or deflate (as `lvresize`); refuses to cut below the bytes the file holds."""
        size = round_to_extents(size)
        path = self.lv_path(name)
        used = os.path.getsize(path) if os.path.exists(path) else 0
        if size < used:
            raise LvmError("{}: cannot shrink to {} bytes below its {} bytes of data".format(name, size, used))
        with self._locked() as meta:
            lv = _find(meta, self.name, name)
            self._check_space(meta, size - lv["size"])
            others = [other for other in meta["lvs"] if other is not lv]
            extents = size // EXTENT_SIZE
            if not _fits(others, lv["start_extent"], extents):
                lv["start_extent"] = _free_extent(others, extents)
            lv["size"] = size
        return size

    def remove_lv(self, name):
        with self._locked() as meta:
            lv = _find(meta, self.name, name)
            meta["lvs"].remove(lv)
        self._unlink(name)

    def rename_lv(self, old, new):
        with self._locked() as meta:
            lv = _find(meta, self.name, old)
            if any(other["name"] == new for other in meta["lvs"]):
                raise LvmError('Logical volume "{}" already exists in volume group "{}"'.format(
                    new, self.name), errno.EEXIST)
            lv["name"] = new
            if os.path.exists(self.lv_path(old)):
                os.rename(self.lv_path(old), self.lv_path(new))
                self._unlink(old)
                self._link(new)

    def _check_space(self, meta, extra):
        if extra <= 0 or meta.get("pv_size") is None:
            return
        usable = (meta["pv_size"] - meta["pe_start"]) // meta["extent_size"] * meta["extent_size"]
        free = usable - sum(lv["size"] for lv in meta["lvs"])
        if extra > free:
            raise LvmError('Volume group "{}" has insufficient free space ({} extents): {} required.'.format(
                self.name, free // EXTENT_SIZE, extra // EXTENT_SIZE), errno.ENOSPC)


def _find(meta, vg_name, name):
    for lv in meta["lvs"]:
        if lv["name"] == name:
            return lv
    raise LvmError('Failed to find logical volume "{}/{}"'.format(vg_name, name), errno.ENOENT)


def _fits(lvs, start, extents):
    return all(start + extents <= lv["start_extent"] or lv["start_extent"] + lv["size"] // EXTENT_SIZE <= start
               for lv in lvs)


def _free_extent(lvs, extents):
    """First extent where `extents` contiguous extents are free."""
    start = 0
    for lv in sorted(lvs, key=lambda item: item["start_extent"]):
        if start + extents <= lv["start_extent"]:
            return start
        start = max(start, lv["start_extent"] + lv["size"] // EXTENT_SIZE)
    return start


# ---- the `lvs` / `vgs` stand-ins ------------------------------------------------------------

VGS_FIELDS = ("vg_name", "vg_extent_size", "lv_count", "pv_count", "pv_name", "pe_start", "vg_size", "vg_free")
LVS_FIELDS = ("lv_name", "vg_name", "lv_size", "segtype", "seg_count", "seg_start", "seg_size", "devices", "lv_path")
HEADINGS = {"vg_name": "VG", "vg_extent_size": "Ext", "lv_count": "#LV", "pv_count": "#PV", "pv_name": "PV",
            "pe_start": "1st PE", "vg_size": "VSize", "vg_free": "VFree", "lv_name": "LV", "lv_size": "LSize",
            "segtype": "Type", "seg_count": "#Seg", "seg_start": "Start", "seg_size": "SSize",
            "devices": "Devices", "lv_path": "Path"}
SIZE_FIELDS = ("vg_extent_size", "pe_start", "vg_size", "vg_free", "lv_size", "seg_start", "seg_size")


class Report(object):
    """The command line of `lvs`/`vgs` as far as the simulation understands it."""

    def __init__(self, argv, allowed):
        self.vg_names = []
        self.headings = True
        self.suffix = True
        self.fields = None
        for arg in argv:
            if arg == "--noheadings":
                self.headings = False
            elif arg == "--nosuffix":
                self.suffix = False
            elif arg in ("--units=b", "--units=B"):
                pass
            elif arg.startswith("--options="):
                self.fields = arg[len("--options="):].split(",")
            elif arg == "--unbuffered":
                pass
            elif arg.startswith("-"):
                raise LvmError("unsupported option {} in the simulated LVM".format(arg))
            else:
                self.vg_names.append(arg)
        if self.fields is None:
            self.fields = list(allowed[:4])
        unknown = [field for field in self.fields if field not in allowed]
        if unknown:
            raise LvmError("Unrecognised field: {}".format(unknown[0]))

    def render(self, rows):
        lines = []
        if self.headings:
            lines.append("  " + " ".join(HEADINGS[field] for field in self.fields))
        for row in rows:
            cells = []
            for field in self.fields:
                value = row[field]
                if field in SIZE_FIELDS and self.suffix:
                    value = "{}B".format(value)
                cells.append(str(value))
            lines.append("  " + " ".join(cells))
        return "".join(line + "\n" for line in lines)


def vgs_rows(vg):
    meta = vg.metadata()
    free = vg.free_bytes()
    used = sum(lv["size"] for lv in meta["lvs"])
    return [{"vg_name": vg.name, "vg_extent_size": meta["extent_size"], "lv_count": len(meta["lvs"]),
             "pv_count": 1, "pv_name": meta["pv_name"], "pe_start": meta["pe_start"],
             "vg_size": used if free is None else used + free, "vg_free": 0 if free is None else free}]


def lvs_rows(vg):
    meta = vg.metadata()
    return [{"lv_name": lv["name"], "vg_name": vg.name, "lv_size": lv["size"],
             "segtype": lv.get("segtype", "linear"), "seg_count": 1, "seg_start": 0, "seg_size": lv["size"],
             "devices": "{}({})".format(meta["pv_name"], lv["start_extent"]),
             "lv_path": "/dev/{}/{}".format(vg.name, lv["name"])} for lv in meta["lvs"]]


def report_main(command, argv, out, err):
    """Run `vgs` or `lvs`; returns the exit status (5 for an unknown VG, like LVM)."""
    try:
        root = root_from_env()
        if command == "vgs":
            report, make_rows = Report(argv, VGS_FIELDS), vgs_rows
        else:
            report, make_rows = Report(argv, LVS_FIELDS), lvs_rows
    except LvmError as exc:
        err.write("  {}\n".format(exc))
        return 3
    names = report.vg_names or list_vg_names(root)
    rows = []
    status = 0
    for name in names:
        vg = VolumeGroup(root, name)
        if not vg.exists():
            err.write('  Volume group "{}" not found\n  Cannot process volume group {}\n'.format(name, name))
            status = 5
            continue
        rows.extend(make_rows(vg))
    out.write(report.render(rows))
    return status


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("lvs", "vgs"):
        sys.stderr.write("usage: python -m tests.dom0sim.lvm {lvs|vgs} ARGS\n")
        return 2
    return report_main(argv[0], argv[1:], sys.stdout, sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
