"""The `lvs` and `vgs` stand-ins of the simulated host: the options they understand, the rows of each VG
of tests/dom0sim/lvm.py, and the table printed as LVM prints it.

Run as `python -m tests.dom0sim.lvm lvs ARGS` or `... vgs ARGS` with DOM0SIM_ROOT=DIR (the host's
`lvs` / `vgs` wrappers run this module's `main`).
"""
import sys

from tests.dom0sim.lvm import LvmError, VolumeGroup, is_active, list_vg_names, root_from_env

VGS_FIELDS = ("vg_name", "vg_extent_size", "lv_count", "pv_count", "pv_name", "pe_start", "vg_size", "vg_free")
LVS_FIELDS = ("lv_name", "vg_name", "lv_attr", "lv_size", "segtype", "seg_count", "seg_start", "seg_start_pe",
              "seg_size", "seg_size_pe", "devices", "lv_path")
DEFAULT_FIELDS = {"vgs": ("vg_name", "pv_count", "lv_count", "vg_size", "vg_free"),
                  "lvs": ("lv_name", "vg_name", "lv_attr", "lv_size"),
                  "lvs --segments": ("lv_name", "vg_name", "lv_attr", "segtype", "seg_size")}
HEADINGS = {"vg_name": "VG", "vg_extent_size": "Ext", "lv_count": "#LV", "pv_count": "#PV", "pv_name": "PV",
            "pe_start": "1st PE", "vg_size": "VSize", "vg_free": "VFree", "lv_name": "LV", "lv_attr": "Attr",
            "lv_size": "LSize", "segtype": "Type", "seg_count": "#Seg", "seg_start": "Start",
            "seg_start_pe": "Start", "seg_size": "SSize", "seg_size_pe": "SSize", "devices": "Devices",
            "lv_path": "Path"}
SIZE_FIELDS = ("vg_extent_size", "pe_start", "vg_size", "vg_free", "lv_size", "seg_start", "seg_size")
NUMBER_FIELDS = ("lv_count", "pv_count", "seg_count", "seg_start_pe", "seg_size_pe")
UNITS = {"b": 1, "s": 512, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
VALUED_OPTIONS = {"-o": "options", "--options": "options", "--units": "units", "--separator": "separator",
                  "-O": "sort", "--sort": "sort"}
FLAG_OPTIONS = ("--noheadings", "--nosuffix", "--unbuffered", "--segments", "--aligned", "-a")


class Report(object):
    """The command line of `lvs`/`vgs` as far as the simulation understands it: --noheadings,
    --nosuffix, --units U, -o/--options F, --separator S (each also as --opt=value, -oF),
    --unbuffered, --segments, VG names."""

    def __init__(self, argv, command):
        self.command = command
        self.vg_names = []
        self.flags = set()
        self.values = {}
        args = list(argv)
        while args:
            arg = args.pop(0)
            name, value = self._split(arg)
            if name in VALUED_OPTIONS:
                if value is None:
                    if not args:
                        raise LvmError("Option {} requires an argument.".format(arg))
                    value = args.pop(0)
                key = VALUED_OPTIONS[name]
                if key == "options":
                    self.values.setdefault(key, []).append(value)
                else:
                    self.values[key] = value
            elif arg in FLAG_OPTIONS:
                self.flags.add(arg)
            elif arg.startswith("-"):
                raise LvmError("unsupported option {} in the simulated LVM".format(arg))
            else:
                self.vg_names.append(arg)
        self.fields = self._fields()
        self.units = self.values.get("units", "h")
        if self.units.lower() not in UNITS and self.units.lower() != "h":
            raise LvmError('Invalid units specification "{}".'.format(self.units))

    @staticmethod
    def _split(arg):
        if arg.startswith("--") and "=" in arg:
            name, value = arg.split("=", 1)
            return name, value
        if arg.startswith("-o") and len(arg) > 2 and not arg.startswith("--"):
            return "-o", arg[2:]
        if arg.startswith("-O") and len(arg) > 2:
            return "-O", arg[2:]
        return arg, None

    def _fields(self):
        key = self.command + (" --segments" if self.command == "lvs" and "--segments" in self.flags else "")
        allowed = LVS_FIELDS if self.command == "lvs" else VGS_FIELDS
        fields = list(DEFAULT_FIELDS[key])
        for option in self.values.get("options", []):
            extra = option.startswith("+")
            names = [name.strip() for name in option.lstrip("+").split(",") if name.strip()]
            fields = fields + names if extra else names
        unknown = [field for field in fields if field not in allowed]
        if unknown:
            raise LvmError("Unrecognised field: {}".format(unknown[0]))
        return fields

    def cell(self, field, value):
        """A value as printed: sizes in the chosen units (`--units b`: bytes, suffix B)."""
        if field not in SIZE_FIELDS:
            return str(value)
        unit = self.units.lower()
        if unit == "h":
            text, suffix = _human_size(value)
        elif unit in ("b", "s"):
            text, suffix = str(value // UNITS[unit]), "B" if unit == "b" else "S"
        else:
            text, suffix = "{:.2f}".format(value / float(UNITS[unit])), unit
        return text if "--nosuffix" in self.flags else text + suffix

    def render(self, rows):
        """Lines as LVM prints them: two leading spaces; columns padded to align (numbers to the
        right) unless a separator is given."""
        table = [[self.cell(field, row[field]) for field in self.fields] for row in rows]
        headings = [HEADINGS[field] for field in self.fields]
        show_headings = "--noheadings" not in self.flags
        separator = self.values.get("separator")
        lines = []
        if separator is not None:
            for cells in ([headings] if show_headings else []) + table:
                lines.append("  " + separator.join(cells))
        else:
            widths = [max([len(cells[i]) for cells in table] + [len(headings[i])]) for i in range(len(headings))]
            for cells in ([headings] if show_headings else []) + table:
                padded = []
                for index, field in enumerate(self.fields):
                    right = field in SIZE_FIELDS or field in NUMBER_FIELDS
                    padded.append(cells[index].rjust(widths[index]) if right else cells[index].ljust(widths[index]))
                lines.append("  " + " ".join(padded))
        return "".join(line + "\n" for line in lines)


def _human_size(value):
    """LVM's default human-readable size: (two decimals, lower-case unit)."""
    for suffix in ("t", "g", "m", "k"):
        if value >= UNITS[suffix]:
            return "{:.2f}".format(value / float(UNITS[suffix])), suffix
    return str(value), "B"


def lv_attr(lv):
    """The 10 characters of `lv_attr` for a linear LV: permissions, then state (`a` while active)."""
    return "-{}i-{}-----".format("r" if lv.get("readonly") else "w", "a" if is_active(lv) else "-")


def vgs_rows(vg):
    meta = vg.metadata()
    free = vg.free_bytes()
    used = sum(lv["size"] for lv in meta["lvs"])
    return [{"vg_name": vg.name, "vg_extent_size": meta["extent_size"], "lv_count": len(meta["lvs"]),
             "pv_count": 1, "pv_name": meta["pv_name"], "pe_start": meta["pe_start"],
             "vg_size": used if free is None else used + free, "vg_free": 0 if free is None else free}]


def lvs_rows(vg):
    meta = vg.metadata()
    return [{"lv_name": lv["name"], "vg_name": vg.name, "lv_attr": lv_attr(lv), "lv_size": lv["size"],
             "segtype": lv.get("segtype", "linear"), "seg_count": 1, "seg_start": 0, "seg_start_pe": 0,
             "seg_size": lv["size"], "seg_size_pe": lv["size"] // meta["extent_size"],
             "devices": "{}({})".format(meta["pv_name"], lv["start_extent"]),
             "lv_path": vg.lv_path(lv["name"])} for lv in meta["lvs"]]


def report_main(command, argv, out, err):
    """Run `vgs` or `lvs`; returns the exit status (5 for an unknown VG, like LVM)."""
    try:
        root = root_from_env()
        report = Report(argv, command)
        make_rows = vgs_rows if command == "vgs" else lvs_rows
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
