"""The QCOW2 images of one SR (XCP-ng 8.3): listed, their headers read read-only, as scan records.

A file SR's images are the `<uuid>.qcow2` files of its directory (one listing); an LVM SR's are
its `QCOW2-<uuid>` LVs in the `lvs` the inspection runs for the SR. Each image is opened
read-only: a file or an active LV's device directly, an inactive LV through its PV extents
(lvmread), never activated. A backing name must name an image of the same SR: relative
`<parent>.qcow2` on a file SR, `/dev/VG_XenStorage-<sr>/QCOW2-<parent>` on an LVM SR; anything
else is that image's error, as is any header qcow2meta will not trust.
"""
import contextlib
import os

from . import lvmread, qcow2meta, vhdmeta, vhdtree

FILE_SUFFIX = ".qcow2"
LV_PREFIX = "QCOW2-"
FORMAT = "qcow2"


def image_uuid(name, lvm):
    """The VDI UUID a QCOW2 image name stands for, or None."""
    if lvm:
        return name[len(LV_PREFIX):] if name.startswith(LV_PREFIX) and len(name) > len(LV_PREFIX) else None
    return name[:-len(FILE_SUFFIX)] if name.endswith(FILE_SUFFIX) and len(name) > len(FILE_SUFFIX) else None


class ImageSource(object):
    """Opens one SR's images for reading: files of `sr_dir`, or LVs (`volumes`: lvmread's
    {name: LogicalVolume}) through `device_dir/<vg>/<lv>` when active, the PV when not.
    Use as a context manager: the PVs stay open until it ends."""

    def __init__(self, sr_dir=None, vg_name=None, volumes=None, device_dir="/dev"):
        self.sr_dir = sr_dir
        self.vg_name = vg_name
        self.volumes = volumes or {}
        self.device_dir = device_dir
        self.physical = lvmread.PhysicalVolumes()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.physical.__exit__(*exc_info)

    @property
    def lvm(self):
        return self.vg_name is not None

    def names(self):
        """Names of the SR's QCOW2 images (file names or LV names), sorted."""
        if self.lvm:
            return sorted(name for name in self.volumes if image_uuid(name, True))
        return sorted(entry.name for entry in os.scandir(self.sr_dir)
                      if entry.name.endswith(FILE_SUFFIX) and image_uuid(entry.name, False) and entry.is_file())

    def path(self, uuid):
        """Where the tools read the image: its file, or its LV's device (present when active)."""
        if self.lvm:
            return os.path.join(self.device_dir, self.vg_name, LV_PREFIX + uuid)
        return os.path.join(self.sr_dir, uuid + FILE_SUFFIX)

    def on_device(self, uuid):
        """The image can be given to a tool by its path (a file, or an LV active here)."""
        if not self.lvm:
            return True
        lv = self.volumes.get(LV_PREFIX + uuid)
        return lv is not None and lv.active and os.path.exists(self.path(uuid))

    @contextlib.contextmanager
    def reader(self, uuid):
        """(read(offset, length), image size) of the image, opened read-only; OSError or
        qcow2meta.Qcow2Error when it cannot be."""
        if self.lvm and not self.on_device(uuid):
            lv = self.volumes.get(LV_PREFIX + uuid)
            if lv is None:
                raise qcow2meta.Qcow2Error("no LV {}{} in `lvs` {}".format(LV_PREFIX, uuid, self.vg_name))
            try:
                read = lvmread.lv_reader(self.physical, lv)
            except vhdmeta.VhdMetadataError as error:
                raise qcow2meta.Qcow2Error(str(error)) from None
            yield read, lv.size
            return
        fd = os.open(self.path(uuid), os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
            if self.lvm:
                size = self.volumes[LV_PREFIX + uuid].size
            yield (lambda offset, length: os.pread(fd, length, offset)), size
        finally:
            os.close(fd)

    def record(self, name):
        """The scan record of the image `name` (its error set when it cannot be read)."""
        uuid = image_uuid(name, self.lvm)
        try:
            with self.reader(uuid) as (read, size):
                header = qcow2meta.read_header(read, size)
            parent = self.parent_uuid(header.backing_name)
        except qcow2meta.Qcow2Error as error:
            return vhdtree.ScanRecord(uuid, error=str(error), image_format=FORMAT)
        except OSError as error:
            return vhdtree.ScanRecord(uuid, error="cannot be read: {}".format(
                os.strerror(error.errno) if error.errno else error), image_format=FORMAT)
        return vhdtree.ScanRecord(uuid, header.virtual_size, size, header.hidden, parent, image_format=FORMAT,
                                  qcow2=header)

    def records(self):
        return [self.record(name) for name in self.names()]

    def parent_uuid(self, backing_name):
        """The UUID of the image a backing name names in this SR (a VHD's too: a chain mixing
        formats is reported as such); Qcow2Error when it names anything else."""
        if not backing_name:
            return ""
        directory, base = os.path.split(backing_name)
        if self.lvm:
            inside = directory in ("/dev/" + self.vg_name, os.path.join(self.device_dir, self.vg_name))
            uuid = image_uuid(base, True) or vhdtree.image_uuid(base, True)
        else:
            inside = directory in ("", self.sr_dir)
            uuid = image_uuid(base, False) or vhdtree.image_uuid(base, False)
        if not inside:
            raise qcow2meta.Qcow2Error("its backing file {} lies outside the SR".format(backing_name))
        if uuid is None:
            raise qcow2meta.Qcow2Error("its backing file {} is not an image of the SR".format(backing_name))
        return uuid

    def bitmap(self, uuid, header):
        """The image's own cluster bitmap, read from its tables here."""
        with self.reader(uuid) as (read, size):
            return qcow2meta.cluster_bitmap(read, header, size)

    def image_end(self, uuid, header):
        with self.reader(uuid) as (read, size):
            return qcow2meta.image_end(read, header, size)
