"""`systemctl` of the simulated host, as systemd 219 (EL7) answers `is-active` for SM's units.

SM starts its GC as `systemctl --no-block start SMGC@<sr>` with the SR UUID's dashes escaped (`\\x2d`),
so the unit is `SMGC@<sr with \\x2d>.service`: while its oneshot service runs it is "activating", after a
run "inactive" (or "failed" after a GC that exited non-zero); a unit systemd has not loaded (never
started, or asked for under another name such as the UUID with plain dashes) is "unknown". `is-active`
prints one state per unit and exits 0 when one is active or reloading, else 3. Anything else it is
asked prints an error and exits 1. The states are files under DOM0SIM_ROOT/run/systemd/units that the
simulated SM writes.
"""
import os
import sys

GOOD_STATES = ("active", "reloading")
EXIT_PROGRAM_NOT_RUNNING = 3
UNIT_SUFFIXES = (".service", ".socket", ".target", ".device", ".mount", ".automount", ".swap", ".timer",
                 ".path", ".slice", ".scope", ".snapshot")
QUIET_OPTIONS = ("-q", "--quiet")
IGNORED_OPTIONS = ("--no-block", "--no-pager", "--no-legend", "--system")


def unit_dir(root):
    return os.path.join(root, "run", "systemd", "units")


def mangle(name):
    """unit_name_mangle: a name without a unit type is a service."""
    return name if name.endswith(UNIT_SUFFIXES) else name + ".service"


def active_state(root, unit):
    try:
        with open(os.path.join(unit_dir(root), unit)) as handle:
            return handle.read().strip() or "unknown"
    except (IOError, OSError):
        return "unknown"


def is_active(root, units, quiet):
    found = False
    for name in units:
        state = active_state(root, mangle(name))
        if not quiet:
            sys.stdout.write(state + "\n")
        found = found or state in GOOD_STATES
    sys.stdout.flush()
    return 0 if found else EXIT_PROGRAM_NOT_RUNNING


def main(argv):
    root = os.environ.get("DOM0SIM_ROOT", "")
    quiet = False
    words = []
    for arg in argv:
        if arg in QUIET_OPTIONS:
            quiet = True
        elif arg in IGNORED_OPTIONS:
            continue
        elif arg.startswith("-"):
            sys.stderr.write("systemctl: unrecognized option '{}'\n".format(arg))
            return 1
        else:
            words.append(arg)
    if not words:
        sys.stderr.write("systemctl: the simulated host answers only is-active\n")
        return 1
    verb, units = words[0], words[1:]
    if verb != "is-active":
        sys.stderr.write("Unknown operation '{}'.\n".format(verb))
        return 1
    if not units:
        sys.stderr.write("Too few arguments.\n")
        return 1
    return is_active(root, units, quiet)
