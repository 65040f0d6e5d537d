"""`vhd-util query`: one line per asked field of a VHD (sizes, parent, hidden, marker, chain depth,
allocated blocks), in the tool's fixed order whatever the order of the options."""

from tests.dom0sim.vhdformat import UNUSED, VhdError
from tests.dom0sim.vhdutil_disk import Disk, open_failed
from tests.dom0sim.vhdutil_options import CommandLine

QUERY_USAGE = ("options: <-n name> [-v print virtual size (in MB)] [-s print physical utilization (bytes)] "
               "[-p print parent] [-f print fields] [-m print marker] [-d print chain depth] "
               "[-S print max virtual size (MB) for fast resize] [-a print allocated block count] "
               "[-u don't resolve parent path] [-h help]\n")


def _answers(disk, name, resolve):
    """(option, line, failure) in print order; `failure` is the line printed, with the negative
    errno, when reading the answer fails (None where it cannot fail)."""
    def parent():
        if not disk.differencing:
            return "{} has no parent\n".format(name)
        return "{}\n".format(disk.parent_path() if resolve else disk.unresolved_parent())

    return (
        ("v", lambda: "{}\n".format(disk.footer.current_size >> 20), None),
        ("s", lambda: "{}\n".format(disk.physical_size), "failed to get physical size: {}\n"),
        ("p", parent, "query failed\n"),
        ("f", lambda: "hidden: {}\n".format(disk.footer.hidden), None),
        ("m", lambda: "marker: {}\n".format(disk.marker), "error checking 'marker' field: {}\n"),
        ("d", lambda: "chain depth: {}\n".format(disk.chain_depth()), "error checking chain depth: {}\n"),
        ("a", lambda: "{}\n".format(sum(1 for entry in disk.bat if entry != UNUSED)), "error reading bat: {}\n"),
        ("S", lambda: "{}\n".format((disk.header.max_bat_size if disk.header else 0) << 1), None),
    )


def cmd_query(args, out):
    """`vhd-util query -n NAME [-vspfdSma] [-u]`: returns the first failure's negative errno, or 0."""
    line = CommandLine(args, "n:vspfdSmauh", "query", out, QUERY_USAGE, help_succeeds=True)
    if line.incomplete("n"):
        return line.usage()
    name = line.get("n")
    try:
        disk = Disk.open(name)
    except VhdError as exc:
        return open_failed(out, name, exc)
    err = 0
    for option, answer, failure in _answers(disk, name, not line.given("u")):
        if not line.given(option):
            continue
        try:
            out.write(answer())
        except VhdError as exc:
            out.write(failure.format(-exc.errno))
            err = err or -exc.errno
    return err
