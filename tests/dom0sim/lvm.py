"""The simulated host's LVM: volume groups stored under DIR/lvm, LV activation, and `lvs` / `vgs` stand-ins.

Layout (docs/design.md):
  DIR/lvm/<VG>/metadata.json  the VG and its LVs (sizes, extents, data length, holders, read-only flag)
  DIR/lvm/pv/<VG>             the VG's physical volume: a sparse file; an LV's bytes live at
                              pe_start + start_extent * extent_size (what `lvs -o devices` says)
  DIR/lvm/mapper/<dm name>    the LV's device node, present only while it is active: a VHD snapshotted
                              through these records `VG_XenStorage--<sr>-VHD--<uuid>` as its parent,
                              as LVHD does
  DIR/lvm/<VG>/<LV>           /dev/<VG>/<LV>: a symbolic link to that node while the LV is active
An LV is active while any holder holds it (`activate(names, holder)` / `deactivate(names, holder)`,
counted per holder and kept in the metadata, since the stand-ins run as other processes). Activation
copies the LV's bytes out of the PV into its device node; deactivation copies them back to the LV's
current extents and removes the nodes. A removed LV leaves its old bytes in the PV, as real LVM does.
`open_vhd` reads an LV as `vhd-util scan -l` does, whether or not it is active: from the device node
while the LV is active (a real PV is always current), from the PV otherwise.

The bytes and extents of the PV are lvmpv.py's; the `lvs` / `vgs` stand-ins are lvmreport.py's, also
run as `python -m tests.dom0sim.lvm lvs ARGS` or `... vgs ARGS` with DOM0SIM_ROOT=DIR.
"""
import errno
import fcntl
import json
import os
import re
import sys
from contextlib import contextmanager

from tests.dom0sim import vhdfile
from tests.dom0sim.lvmpv import EXTENT_SIZE, Extents, copy_sparse, punch

PE_START = 1024 * 1024
METADATA = "metadata.json"
MAPPER = "mapper"
PV_DIR = "pv"
LOCK = ".lock"
ROOT_ENV = "DOM0SIM_ROOT"
HOLDER_ATTACH = "attach"        # the chain of a VDI attached on this host
HOLDER_GC = "gc"                # SM working on the LV (GC, snapshot, inflate, deflate)
HOLDER_CREATE = "lvcreate"      # lvcreate leaves a new LV active until someone deactivates it
HOLDER_SR = "sr"                # the SR's management volume, active while the SR is plugged
HOLDER_BUILD = "build"          # a scenario being built: everything it touches, released at the end

_BATCHES = {}           # VG directory -> metadata kept in memory by VolumeGroup.batch()
_CACHE = {}             # metadata path -> [text, parsed, {LV name: LV} or None]


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


def lv_name_of(dm_path):
    """The LV name inside a device-mapper name or path (`./VG--x-VHD--y` -> `VHD-y`), or None."""
    parts = re.split(r"(?<!-)-(?!-)", os.path.basename(dm_path))
    return parts[-1].replace("--", "-") if len(parts) == 2 else None


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


def is_active(lv):
    return any(lv.get("holders", {}).values())


class _State(object):
    """Metadata being changed, indexed: the LVs by name (metadata order kept) and the extents."""

    def __init__(self, meta):
        self.meta = meta
        self.order = {}         # serial -> LV, in metadata order
        self.serials = {}       # id(LV) -> serial
        self.by_name = {}
        self.next_serial = 0
        for lv in meta["lvs"]:
            self.add(lv)
        self.extents = Extents(meta["lvs"])

    def add(self, lv):
        self.order[self.next_serial] = lv
        self.serials[id(lv)] = self.next_serial
        self.by_name[lv["name"]] = lv
        self.next_serial += 1

    def remove(self, lv):
        del self.order[self.serials.pop(id(lv))]
        del self.by_name[lv["name"]]

    def rename(self, lv, new):
        del self.by_name[lv["name"]]
        lv["name"] = new
        self.by_name[new] = lv

    def find(self, vg_name, name):
        lv = self.by_name.get(name)
        if lv is None:
            raise LvmError('Failed to find logical volume "{}/{}"'.format(vg_name, name), errno.ENOENT)
        return lv

    def existing(self, names):
        return [self.by_name[name] for name in set(names) if name in self.by_name]

    def materialise(self):
        self.meta["lvs"] = list(self.order.values())
        return self.meta


class VolumeGroup(object):
    """One VG of the store. Every change is a locked read-modify-write of metadata.json; within
    `batch()` (building a scenario) changes stay in memory until the batch ends."""

    def __init__(self, root, name):
        self.root = root
        self.name = name
        self.path = os.path.join(store_dir(root), name)
        self._meta_path = os.path.join(self.path, METADATA)

    @classmethod
    def create(cls, root, name, pv_name=None, pv_size=None):
        """Make an empty VG (as `vgcreate`) on a new sparse PV file (default DIR/lvm/pv/<VG>);
        pv_size None means unlimited."""
        vg = cls(root, name)
        if vg.exists():
            raise LvmError('A volume group called {} already exists.'.format(name), errno.EEXIST)
        os.makedirs(vg.path)
        pv_name = os.path.abspath(pv_name or os.path.join(store_dir(root), PV_DIR, name))
        if not os.path.isdir(os.path.dirname(pv_name)):
            os.makedirs(os.path.dirname(pv_name))
        open(pv_name, "wb").close()
        vg._save({"extent_size": EXTENT_SIZE, "pe_start": PE_START, "pv_name": pv_name,
                  "pv_size": pv_size, "lvs": []})
        return vg

    @classmethod
    def for_sr(cls, root, sr_uuid, create=False, **kwargs):
        name = sr_vg_name(sr_uuid)
        return cls.create(root, name, **kwargs) if create else cls(root, name)

    def exists(self):
        return self.path in _BATCHES or os.path.isfile(self._meta_path)

    # -- metadata

    def metadata(self):
        """The parsed metadata.json (not to be changed); LvmError when the VG does not exist."""
        if self.path in _BATCHES:
            return _BATCHES[self.path].materialise()
        return self._read()[1]

    def _lookup(self, name):
        """The LV's metadata entry (not to be changed)."""
        if self.path in _BATCHES:
            return _BATCHES[self.path].find(self.name, name)
        cached = self._read()
        if cached[2] is None:
            cached[2] = dict((lv["name"], lv) for lv in cached[1]["lvs"])
        lv = cached[2].get(name)
        if lv is None:
            raise LvmError('Failed to find logical volume "{}/{}"'.format(self.name, name), errno.ENOENT)
        return lv

    def _read(self):
        """[text, parsed, index by LV name] of metadata.json: parsed again only when the text changed."""
        try:
            with open(self._meta_path) as handle:
                text = handle.read()
        except (IOError, OSError):
            raise LvmError('Volume group "{}" not found'.format(self.name), errno.ENOENT) from None
        cached = _CACHE.get(self._meta_path)
        if cached is not None and cached[0] == text:
            return cached
        try:
            parsed = json.loads(text)
        except ValueError as exc:
            raise LvmError("{}: corrupt metadata: {}".format(self.name, exc)) from None
        _CACHE[self._meta_path] = [text, parsed, None]
        return _CACHE[self._meta_path]

    def _save(self, meta):
        tmp = self._meta_path + ".tmp"
        with open(tmp, "w") as handle:
            handle.write(json.dumps(meta, sort_keys=True))
        os.rename(tmp, self._meta_path)

    @contextmanager
    def _lock(self, mode):
        with open(os.path.join(self.path, LOCK), "a") as lock:
            fcntl.flock(lock, mode)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @contextmanager
    def _locked(self):
        """The metadata to change (a _State) under the VG's lock; saved when the block ends."""
        if self.path in _BATCHES:
            yield _BATCHES[self.path]
            return
        self.metadata()
        with self._lock(fcntl.LOCK_EX):
            state = _State(json.loads(self._read()[0]))
            yield state
            self._save(state.materialise())

    @contextmanager
    def batch(self):
        """Keep the metadata in memory while a scenario is built (one process, one thread), saved once
        at the end: thousands of LVs cost no metadata rewrite each."""
        _BATCHES[self.path] = _State(json.loads(self._read()[0]))
        try:
            yield self
        finally:
            state = _BATCHES.pop(self.path)
            with self._lock(fcntl.LOCK_EX):
                self._save(state.materialise())

    @contextmanager
    def reading(self):
        """Hold the VG still (a shared lock: nothing activates or deactivates) while reading LVs."""
        if self.path in _BATCHES or not os.path.isdir(self.path):
            yield self
            return
        with self._lock(fcntl.LOCK_SH):
            yield self

    # -- LVs

    def lvs(self):
        """The LVs as dicts (name, size, start_extent, segtype, data_len, holders, readonly, active)."""
        return [_lv_view(lv) for lv in self.metadata()["lvs"]]

    def lv(self, name):
        return _lv_view(self._lookup(name))

    def has_lv(self, name):
        try:
            self._lookup(name)
        except LvmError:
            return False
        return True

    def lv_path(self, name):
        """/dev/<VG>/<LV>: a symbolic link to the LV's device node, present while the LV is active."""
        return os.path.join(self.path, name)

    def dm_path(self, name):
        """DIR/lvm/mapper/<dm name>: the LV's device node, present while the LV is active."""
        return os.path.join(store_dir(self.root), MAPPER, dm_name(self.name, name))

    def node_paths(self, name):
        return (self.lv_path(name), self.dm_path(name))

    def pv_path(self):
        return self.metadata()["pv_name"]

    def lv_size(self, name):
        return self.lv(name)["size"]

    def is_active(self, name):
        return is_active(self._lookup(name))

    def free_bytes(self):
        """Unallocated bytes, or None for a VG without a size."""
        meta = self.metadata()
        if meta.get("pv_size") is None:
            return None
        return _usable(meta) - sum(lv["size"] for lv in meta["lvs"])

    def locate(self, name):
        """Where the LV's bytes are read from, active or not: (device node, None) while it is active,
        else (PV path, (offset, data length)) -- the PV view `vhd-util scan -l` reads."""
        meta = self.metadata() if self.path not in _BATCHES else _BATCHES[self.path].meta
        lv = self._lookup(name)
        if is_active(lv):
            return self.lv_path(name), None
        return meta["pv_name"], (_pv_offset(meta, lv), lv.get("data_len", 0))

    def open_vhd(self, name, fast=False):
        """The LV's VHD opened read-only through its PV view (see locate). VhdError when it is no VHD."""
        path, window = self.locate(name)
        return vhdfile.Vhd.open(path, fast=fast, window=window)

    def read_lv(self, name, offset, length):
        """Up to `length` bytes at `offset` of the LV's data, active or not (zeros past its data)."""
        path, window = self.locate(name)
        if window is not None:
            length = max(0, min(length, window[1] - offset))
            offset += window[0]
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read(length)

    # -- changes

    def create_lv(self, name, size, segtype="linear", holder=HOLDER_CREATE):
        """As `lvcreate -n name -L size`: size rounded up to extents; the new LV is empty and active,
        held by `holder`. Returns its device node."""
        size = round_to_extents(size)
        with self._locked() as state:
            if name in state.by_name:
                raise LvmError('Logical volume "{}" already exists in volume group "{}"'.format(
                    name, self.name), errno.EEXIST)
            self._check_space(state, size)
            lv = {"name": name, "size": size, "start_extent": state.extents.allocate(size // EXTENT_SIZE),
                  "data_len": 0, "holders": {holder: 1}}
            if segtype != "linear":
                lv["segtype"] = segtype
            state.add(lv)
            self._make_nodes(state.meta, lv, copy=False)
        return self.lv_path(name)

    def resize_lv(self, name, size):
        """Inflate or deflate (as `lvresize`); refuses to cut below the bytes the LV holds. An LV
        that cannot grow in place moves to free extents, its bytes with it."""
        size = round_to_extents(size)
        with self._locked() as state:
            meta, extents = state.meta, state.extents
            lv = state.find(self.name, name)
            used = self._data_len(lv)
            if size < used:
                raise LvmError("{}: cannot shrink to {} bytes below its {} bytes of data".format(name, size, used))
            self._check_space(state, size - lv["size"])
            old_start, old_extents, new_extents = lv["start_extent"], lv["size"] // EXTENT_SIZE, size // EXTENT_SIZE
            if new_extents < old_extents:
                extents.free(old_start + new_extents, old_extents - new_extents)
            elif new_extents > old_extents and not extents.grow_in_place(old_start, old_extents,
                                                                            new_extents - old_extents):
                extents.free(old_start, old_extents)
                lv["start_extent"] = extents.allocate(new_extents)
                if not is_active(lv):
                    self._move_in_pv(meta, old_start, lv)
            lv["size"] = size
        return size

    def remove_lv(self, name):
        """As `lvremove -f`: the LV and its device nodes go; its bytes stay in the PV."""
        with self._locked() as state:
            lv = state.find(self.name, name)
            state.remove(lv)
            state.extents.free(lv["start_extent"], lv["size"] // EXTENT_SIZE)
            self._remove_nodes(name)

    def rename_lv(self, old, new):
        """As `lvrename`: an active LV's device nodes take the new name; its holders stay with it."""
        with self._locked() as state:
            lv = state.find(self.name, old)
            if new in state.by_name:
                raise LvmError('Logical volume "{}" already exists in volume group "{}"'.format(
                    new, self.name), errno.EEXIST)
            state.rename(lv, new)
            if is_active(lv):
                os.rename(self.dm_path(old), self.dm_path(new))
                os.unlink(self.lv_path(old))
                self._link_nodes(new)

    def set_readonly(self, name, readonly):
        """As `lvchange -p r|rw`."""
        with self._locked() as state:
            lv = state.find(self.name, name)
            if readonly:
                lv["readonly"] = True
            else:
                lv.pop("readonly", None)

    def activate(self, names, holder):
        """`holder` takes one more hold on each LV; an inactive one gets its device nodes, filled
        from the PV. Names of LVs that no longer exist are skipped."""
        with self._locked() as state:
            for lv in state.existing(names):
                holders = lv.setdefault("holders", {})
                if not is_active(lv):
                    self._make_nodes(state.meta, lv, copy=True)
                holders[holder] = holders.get(holder, 0) + 1

    def deactivate(self, names, holder):
        """`holder` lets go of one hold on each LV; the last hold copies the LV back to the PV and
        removes its device nodes."""
        with self._locked() as state:
            for lv in state.existing(names):
                holders = lv.get("holders", {})
                if holders.get(holder, 0) <= 0:
                    continue
                holders[holder] -= 1
                if not holders[holder]:
                    del holders[holder]
                if not is_active(lv):
                    self._store_nodes(state.meta, lv)

    def set_held(self, names, holder):
        """Exactly the LVs `names` are held by `holder` (once each): the others lose its holds."""
        wanted = set(names)
        with self._locked() as state:
            for lv in state.order.values():
                holders = lv.setdefault("holders", {})
                if lv["name"] in wanted:
                    if not is_active(lv):
                        self._make_nodes(state.meta, lv, copy=True)
                    holders[holder] = 1
                elif holder in holders:
                    del holders[holder]
                    if not is_active(lv):
                        self._store_nodes(state.meta, lv)

    # -- device nodes

    def _data_len(self, lv):
        if is_active(lv):
            return os.path.getsize(self.lv_path(lv["name"]))
        return lv.get("data_len", 0)

    def _make_nodes(self, meta, lv, copy):
        path = self.dm_path(lv["name"])
        if not os.path.isdir(os.path.dirname(path)):
            os.makedirs(os.path.dirname(path))
        with open(path, "wb") as device:
            length = lv.get("data_len", 0)
            if copy and length:
                device.truncate(length)
                with open(meta["pv_name"], "rb") as pv:
                    copy_sparse(pv.fileno(), _pv_offset(meta, lv), device.fileno(), 0, length)
        self._link_nodes(lv["name"])

    def _store_nodes(self, meta, lv):
        """Deactivation: the device node's bytes go back to the LV's extents, the nodes go."""
        path = self.dm_path(lv["name"])
        length = os.path.getsize(path)
        offset = _pv_offset(meta, lv)
        with open(meta["pv_name"], "r+b") as pv, open(path, "rb") as device:
            if os.fstat(pv.fileno()).st_size < offset + length:
                pv.truncate(offset + length)
            punch(pv.fileno(), offset, lv["size"])
            copy_sparse(device.fileno(), 0, pv.fileno(), offset, length)
        lv["data_len"] = length
        self._remove_nodes(lv["name"])

    def _move_in_pv(self, meta, old_start, lv):
        """An inactive LV moved to other extents: its bytes follow (through a copy: the ranges may overlap)."""
        length = lv.get("data_len", 0)
        if not length:
            return
        old = meta["pe_start"] + old_start * meta["extent_size"]
        tmp = os.path.join(self.path, ".move")
        with open(meta["pv_name"], "r+b") as pv, open(tmp, "w+b") as scratch:
            scratch.truncate(length)
            copy_sparse(pv.fileno(), old, scratch.fileno(), 0, length)
            punch(pv.fileno(), old, length)
            new = _pv_offset(meta, lv)
            if os.fstat(pv.fileno()).st_size < new + length:
                pv.truncate(new + length)
            punch(pv.fileno(), new, lv["size"])
            copy_sparse(scratch.fileno(), 0, pv.fileno(), new, length)
        os.unlink(tmp)

    def _link_nodes(self, name):
        """/dev/<VG>/<LV> -> ../mapper/<dm name>, as udev links them: a VHD opened through either path
        resolves its parent's relative locator (`./<dm name>`) in the mapper directory."""
        path = self.lv_path(name)
        if os.path.lexists(path):
            os.unlink(path)
        os.symlink(os.path.join("..", MAPPER, dm_name(self.name, name)), path)

    def _remove_nodes(self, name):
        for path in self.node_paths(name):
            if os.path.lexists(path):
                os.unlink(path)

    def _check_space(self, state, extra):
        if extra <= 0 or state.meta.get("pv_size") is None:
            return
        free = _usable(state.meta) - state.extents.used * EXTENT_SIZE
        if extra > free:
            raise LvmError('Volume group "{}" has insufficient free space ({} extents): {} required.'.format(
                self.name, free // EXTENT_SIZE, extra // EXTENT_SIZE), errno.ENOSPC)


def _lv_view(lv):
    view = dict(lv, segtype=lv.get("segtype", "linear"), data_len=lv.get("data_len", 0),
                holders=dict(lv.get("holders", {})), readonly=bool(lv.get("readonly")))
    view["active"] = is_active(view)
    return view


def _usable(meta):
    return (meta["pv_size"] - meta["pe_start"]) // meta["extent_size"] * meta["extent_size"]


def _pv_offset(meta, lv):
    return meta["pe_start"] + lv["start_extent"] * meta["extent_size"]


def report_main(command, argv, out, err):
    """Run `vgs` or `lvs` (lvmreport.py); returns the exit status."""
    from tests.dom0sim import lvmreport     # the report reads the VGs through this module
    return lvmreport.report_main(command, argv, out, err)


if __name__ == "__main__":
    from tests.dom0sim import lvmreport
    sys.exit(lvmreport.main())
