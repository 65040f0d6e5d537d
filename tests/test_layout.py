"""The package's layout holds: imports point only downwards, and no module grows past a size a
reader can take in at once."""
import ast
import os

import pytest

import xcoalesce_agent

PACKAGE_DIR = os.path.dirname(os.path.abspath(xcoalesce_agent.__file__))
SIMULATION_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dom0sim")
PACKAGE = "xcoalesce_agent"

# What every layer may use; the jobs use it and each other only as the arrows in docs/design.md say.
FOUNDATION = frozenset("errors model printable jsonfile stopping progress statedir".split())
ENTRY_POINTS = frozenset(("cli", "daemon", "__main__"))
MAY_IMPORT = {
    "foundation": {"foundation"},
    "config": {"foundation", "config"},
    "inspect": {"foundation", "inspect"},
    "reclaim": {"foundation", "inspect", "reclaim"},
    "export": {"foundation", "inspect", "reclaim", "export"},
}
AGENT_MODULE_LINES = 400
SIMULATION_MODULE_LINES = 700


def modules():
    """(dotted name, path) of every module of the package."""
    for directory, _, files in os.walk(PACKAGE_DIR):
        if "_vendor" in directory or "__pycache__" in directory:
            continue
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                parts = os.path.relpath(path[:-3], os.path.dirname(PACKAGE_DIR)).split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                yield ".".join(parts), path


MODULE_NAMES = frozenset(name for name, _ in modules())


def layer(dotted):
    """The layer a module of the package belongs to."""
    parts = dotted.split(".")[1:]
    if not parts:
        return "foundation"
    if parts[0] in MAY_IMPORT and len(parts) > 1:
        return parts[0]
    if parts[0] in ("inspect", "reclaim", "export"):
        return parts[0]
    if parts[0] in FOUNDATION:
        return "foundation"
    if parts[0] in ("config", "configvalues"):
        return "config"
    if parts[0] in ENTRY_POINTS:
        return "entry"
    raise AssertionError("{} is in no layer: add it to one in tests/test_layout.py".format(dotted))


def imported(dotted, path):
    """The package's modules that the module at `path` imports, at any depth in its code."""
    package = dotted if path.endswith("__init__.py") else dotted.rpartition(".")[0]
    with open(path) as source:
        tree = ast.parse(source.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            if origin.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                candidate = origin + "." + alias.name
                yield candidate if candidate in MODULE_NAMES else origin


@pytest.mark.parametrize("dotted,path", sorted(modules()))
def test_imports_point_only_downwards(dotted, path):
    here = layer(dotted)
    if here == "entry":
        return
    for target in imported(dotted, path):
        there = layer(target)
        assert there in MAY_IMPORT[here], "{} ({}) imports {} ({})".format(dotted, here, target, there)


def test_every_agent_module_stays_small():
    long = {dotted: lines for dotted, lines in
            ((dotted, sum(1 for _ in open(path))) for dotted, path in modules())
            if lines > AGENT_MODULE_LINES}
    assert not long, "over {} lines: {}".format(AGENT_MODULE_LINES, long)


def test_every_simulation_module_stays_small():
    long = {}
    for name in os.listdir(SIMULATION_DIR):
        if name.endswith(".py"):
            with open(os.path.join(SIMULATION_DIR, name)) as source:
                lines = sum(1 for _ in source)
            if lines > SIMULATION_MODULE_LINES:
                long[name] = lines
    assert not long, "over {} lines: {}".format(SIMULATION_MODULE_LINES, long)
