"""The simulated host's `vhd-util`: the commands SM and the agent use, with blktap 4.0.8's exact
stdout, stderr, ordering, exit codes and quirks (see shared reference vhd-util.md).

Run as `python -m tests.dom0sim.vhdutil_cli COMMAND ARGS...`. This module is the entry point:
the command dispatch, the process's buffered output and its end (exit status, or SIGABRT when
libvhd would ASSERT). The commands live in the sibling vhdutil_* modules.
"""
import errno
import os
import resource
import signal
import sys

from tests.dom0sim import lvm
from tests.dom0sim.vhdformat import VhdError
from tests.dom0sim.vhdutil_check import cmd_check
from tests.dom0sim.vhdutil_disk import Abort
from tests.dom0sim.vhdutil_edit import (
    COALESCE_USAGE, CREATE_USAGE, MODIFY_USAGE, SET_USAGE, SNAPSHOT_USAGE, cmd_coalesce, cmd_create, cmd_modify,
    cmd_set, cmd_snapshot,
)
from tests.dom0sim.vhdutil_glob import GLOB_ABORTED, GLOB_OK, Glob, Pattern
from tests.dom0sim.vhdutil_libc import c_basename
from tests.dom0sim.vhdutil_query import cmd_query
from tests.dom0sim.vhdutil_read import cmd_read
from tests.dom0sim.vhdutil_scan import SCAN_USAGE, cmd_scan, extract_volume_name

__all__ = [
    "main", "run", "Output", "Abort", "COMMANDS",
    "SCAN_USAGE", "COALESCE_USAGE", "CREATE_USAGE", "MODIFY_USAGE", "SET_USAGE", "SNAPSHOT_USAGE",
    "GLOB_ABORTED", "GLOB_OK", "Glob", "Pattern", "c_basename", "extract_volume_name",
]

COMMANDS = ("create", "snapshot", "query", "read", "set", "repair", "resize", "fill", "coalesce",
            "modify", "scan", "check", "revert")


class Output(object):
    """stdout and stderr of one run, written at exit (stdout is a pipe: fully buffered, like C)."""

    def __init__(self):
        self.out = bytearray()
        self.err = bytearray()

    def write(self, text):
        self.out += text if isinstance(text, (bytes, bytearray)) else text.encode("utf-8", "surrogateescape")

    def error(self, text):
        self.err += text.encode("utf-8", "surrogateescape")


HANDLERS = {"scan": cmd_scan, "query": cmd_query, "read": cmd_read, "check": cmd_check,
            "coalesce": cmd_coalesce, "set": cmd_set, "create": cmd_create, "snapshot": cmd_snapshot,
            "modify": cmd_modify}


def usage(out):
    out.write("usage: vhd-util COMMAND [OPTIONS]\nCOMMAND := { " + " | ".join(COMMANDS) + " }\n")


def run(argv, out):
    """One invocation; returns the exit status."""
    if not argv:
        usage(out)
        return 0
    command = argv[0]
    if command not in COMMANDS:
        out.error("invalid COMMAND {}\n".format(command))
        usage(out)
        return 0
    handler = HANDLERS.get(command)
    if handler is None:
        out.error("vhd-util {}: not available on the simulated host\n".format(command))
        return errno.ENOSYS
    args = [arg for arg in argv[1:] if arg != "--debug"]
    ret = handler(args, out)
    return ret if ret >= 0 else -ret


def die_by_abort():
    """What an ASSERT does: SIGABRT, no core file, nothing of the buffered stdout."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGABRT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGABRT)


def main(argv=None):
    """Run one command, write its buffered output; returns the exit status (never a traceback)."""
    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    out = Output()
    try:
        status = run(argv, out)
    except Abort:
        sys.stdout.flush()
        die_by_abort()
        return 134
    except (VhdError, IOError, OSError) as exc:
        out.error("vhd-util: {}\n".format(exc))
        status = exc.errno or errno.EIO
    except lvm.LvmError as exc:
        out.error("vhd-util: {}\n".format(exc))
        status = exc.code
    except Exception as exc:  # noqa: BLE001 - the tool never shows a traceback
        out.error("vhd-util: internal error: {}: {}\n".format(type(exc).__name__, exc))
        status = errno.EIO
    stdout = getattr(sys.stdout, "buffer", sys.stdout)
    stdout.write(bytes(out.out))
    stdout.flush()
    sys.stderr.write(out.err.decode("utf-8", "replace"))
    sys.stderr.flush()
    return status & 0xFF


if __name__ == "__main__":
    sys.exit(main())
