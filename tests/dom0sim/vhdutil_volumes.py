"""The LVs of a volume group as libvhd's lvm_scan_vg lists them for `vhd-util scan -l`: the `vgs`
and `lvs` command lines run through the shell, their output parsed."""
import errno
import subprocess

from tests.dom0sim.vhdformat import VhdError

VGS_COMMAND = ("vgs {} --noheadings --nosuffix --units=b --options=vg_name,vg_extent_size,lv_count,pv_count,"
               "pv_name,pe_start --unbuffered 2> /dev/null")
LVS_COMMAND = ("lvs {} --noheadings --nosuffix --units=b --options=lv_name,lv_size,segtype,seg_count,seg_start,"
               "seg_size,devices --unbuffered 2> /dev/null")


class LogicalVolume(object):
    """One LV of the `lvs` listing: its name, size in bytes and whether it is one linear segment."""

    def __init__(self, name, size, linear):
        self.name = name
        self.size = size
        self.linear = linear


def lvm_scan_vg(vg_name):
    """lvm_scan_vg: run `vgs` and `lvs` through the shell as libvhd's popen does; list the LVs."""
    vgs = _popen_lines(VGS_COMMAND.format(vg_name))
    if not vgs:
        raise VhdError(errno.EINVAL, "no vgs data")
    lv_count = None
    for line in vgs:
        fields = line.split()
        if len(fields) < 6 or fields[0] != vg_name or not all(f.isdigit() for f in fields[1:4]):
            raise VhdError(errno.EINVAL, "bad vgs line")
        lv_count = int(fields[2])
    lvs = []
    for line in _popen_lines(LVS_COMMAND.format(vg_name)):
        if len(lvs) >= lv_count:
            break
        fields = line.split()
        if len(fields) < 7 or not fields[1].isdigit():
            raise VhdError(errno.EINVAL, "bad lvs line")
        if fields[4] != "0":
            continue
        lvs.append(LogicalVolume(fields[0], int(fields[1]), fields[2] == "linear"))
    return lvs


def _popen_lines(command):
    """The non-blank lines a shell command prints (popen(3) and fgets)."""
    try:
        process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, universal_newlines=True)
    except OSError as exc:
        raise VhdError(exc.errno, "popen") from None
    text, _ = process.communicate()
    return [line for line in text.split("\n") if line.strip()]
