"""Install the stand-in host tools (`vhd-util`, `lvs`, `vgs`) as shell wrappers in a bin directory."""
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TOOLS = {
    "vhd-util": "tests.dom0sim.vhdutil_cli",
    "lvs": "tests.dom0sim.lvm lvs",
    "vgs": "tests.dom0sim.lvm vgs",
}

WRAPPER = """#!/bin/sh
DOM0SIM_ROOT={root}
PYTHONPATH={repo}
export DOM0SIM_ROOT PYTHONPATH
exec {python} -m {module} "$@"
"""


def _quote(text):
    return "'" + text.replace("'", "'\"'\"'") + "'"


def install_tools(state_dir, bin_dir):
    """Write executable wrappers running this interpreter; returns {tool name: path}."""
    if not os.path.isdir(bin_dir):
        os.makedirs(bin_dir)
    paths = {}
    for name, module in sorted(TOOLS.items()):
        path = os.path.join(bin_dir, name)
        text = WRAPPER.format(root=_quote(os.path.abspath(state_dir)), repo=_quote(REPO_ROOT),
                              python=_quote(sys.executable), module=module)
        tmp = path + ".tmp"
        with open(tmp, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o755)
        os.rename(tmp, path)
        paths[name] = path
    return paths
