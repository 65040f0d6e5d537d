"""Install the stand-in host tools (`vhd-util`, `lvs`, `vgs`, `systemctl`, `qcow2_helper`) as shell wrappers
in a bin directory. QEMU's own `qemu-img` / `qemu-io` (Debian's qemu-utils) are the real ones, from PATH."""
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TOOLS = {
    "vhd-util": ("tests.dom0sim.vhdutil_cli", "sys.argv[1:]"),
    "lvs": ("tests.dom0sim.lvmreport", "['lvs'] + sys.argv[1:]"),
    "vgs": ("tests.dom0sim.lvmreport", "['vgs'] + sys.argv[1:]"),
    "systemctl": ("tests.dom0sim.systemd", "sys.argv[1:]"),
    "qcow2_helper": ("tests.dom0sim.qcow2_helper", "sys.argv[1:]"),
}

WRAPPER = """#!/bin/sh
DOM0SIM_ROOT={root}
PYTHONPATH={repo}
export DOM0SIM_ROOT PYTHONPATH
exec {python} -c {program} "$@"
"""
PROGRAM = "import sys; sys.path.insert(0, {repo!r}); from {module} import main; sys.exit(main({args}))"


def _quote(text):
    return "'" + text.replace("'", "'\"'\"'") + "'"


def install_tools(state_dir, bin_dir, omit=()):
    """Write executable wrappers running this interpreter, but for the tools named in `omit` (a host
    without them); returns {tool name: path}.

    The repository goes first on sys.path, so a `tests` package in the caller's directory
    cannot shadow the simulation."""
    if not os.path.isdir(bin_dir):
        os.makedirs(bin_dir)
    paths = {}
    for name, (module, args) in sorted(TOOLS.items()):
        if name in omit:
            continue
        path = os.path.join(bin_dir, name)
        program = PROGRAM.format(repo=REPO_ROOT, module=module, args=args)
        text = WRAPPER.format(root=_quote(os.path.abspath(state_dir)), repo=_quote(REPO_ROOT),
                              python=_quote(sys.executable), program=_quote(program))
        tmp = path + ".tmp"
        with open(tmp, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o755)
        os.rename(tmp, path)
        paths[name] = path
    return paths
