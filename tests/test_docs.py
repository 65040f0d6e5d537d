"""The documentation holds together: its links resolve, and its configuration and metrics references
name exactly what the code has (keys with their defaults and ranges, every exported metric)."""
import glob
import os
import re
import tempfile

import pytest

from tests import model_samples
from xcoalesce_agent import config
from xcoalesce_agent.export import collector
from xcoalesce_agent.reclaim import history

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
CONFIGURATION = os.path.join(REPO, "docs", "configuration.md")
METRICS = os.path.join(REPO, "docs", "metrics.md")

_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_CODE = re.compile(r"`[^`\n]*`")


def read(path):
    with open(path, encoding="utf-8") as stream:
        return stream.read()


def anchor(heading):
    """GitHub's anchor of a heading: lower case, punctuation but `-` and `_` dropped, spaces to `-`."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    """Every anchor of a Markdown file, with GitHub's `-1`, `-2` for repeated headings."""
    found, seen = set(), {}
    for line in _FENCE.sub("", read(path)).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = anchor(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else "{}-{}".format(base, count))
    return found


def links(path):
    """(target, fragment) of every relative link outside code."""
    text = _CODE.sub("", _FENCE.sub("", read(path)))
    for target in _LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            continue
        file_part, _, fragment = target.partition("#")
        yield file_part, fragment


def test_anchors_follow_github():
    assert anchor("What is stuck: `--report`") == "what-is-stuck---report"
    assert anchor("QCOW2 VDIs (XCP-ng 8.3)") == "qcow2-vdis-xcp-ng-83"
    assert anchor("`gave_up`") == "gave_up"
    assert anchor("Dom0's firewall") == "dom0s-firewall"


@pytest.mark.parametrize("path", DOCS, ids=lambda path: os.path.relpath(path, REPO))
def test_every_relative_link_and_anchor_resolves(path):
    broken = []
    for file_part, fragment in links(path):
        target = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        if not os.path.exists(target):
            broken.append(file_part)
        elif fragment and (not target.endswith(".md") or fragment not in anchors(target)):
            broken.append("{}#{}".format(file_part, fragment))
    assert not broken, broken


def test_the_readme_stays_a_front_door():
    assert len(read(DOCS[0]).splitlines()) <= 210
    for path in DOCS[1:]:
        assert "docs/" + os.path.basename(path) in read(DOCS[0]), os.path.basename(path)


# ---- configuration.md against config.SCHEMA ------------------------------------------------------

def configuration_rows():
    """{(section, key): (default cell, range cell)} of the table in docs/configuration.md."""
    rows, section = {}, None
    for line in read(CONFIGURATION).splitlines():
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)][1:-1]
        if len(cells) != 5 or not cells[1].startswith("`"):
            continue
        section = cells[0].strip("`[]") or section
        rows[(section, cells[1].strip("`"))] = (cells[2].strip("`"), cells[3])
    return rows


def shown_default(default):
    if default in ("", []):
        return "empty"
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, list):
        return ", ".join(default)
    if isinstance(default, float):
        return "{:g}".format(default)
    return str(default)


def shown_bound(value):
    """A bound as the table writes it: a plain number, or a size with its largest exact suffix."""
    forms = {"{:g}".format(value)}
    for power, suffix in ((40, "T"), (30, "G"), (20, "M"), (10, "K")):
        if value and value % (1 << power) == 0:
            forms.add("{}{}".format(int(value) >> power, suffix))
            break
    return forms


def test_every_config_key_is_documented_with_its_default_and_range():
    rows = configuration_rows()
    assert set(rows) == {(key.section, key.name) for key in config.SCHEMA}
    for key in config.SCHEMA:
        default, range_cell = rows[(key.section, key.name)]
        assert default == shown_default(key.default), (key.section, key.name, default)
        bounds = getattr(key.parse, "bounds", None)
        if bounds is None:
            assert range_cell, (key.section, key.name)
            continue
        minimum, maximum = bounds
        try:
            key.parse(str(minimum))
            lower = "{} to ".format
        except ValueError:
            lower = "above {} to ".format
        assert any(re.search(r"(^|\W)" + re.escape(lower(low) + high) + r"($|\W)", range_cell.replace("`", ""))
                   for low in shown_bound(minimum) for high in shown_bound(maximum)), (key.name, range_cell)


# ---- metrics.md against the collector ------------------------------------------------------------

def exported_metrics():
    """Every xcoalesce_ metric of an exposition, by the name a query uses (counters with `_total`)."""
    status = collector.AgentStatus(host="xen-01")
    status.succeeded(model_samples.small_inspection(), 1700000100.0)
    with tempfile.TemporaryDirectory() as state_dir:
        body = collector.Exposition(status, history.RunHistory(state_dir)).body().decode("utf-8")
    names = set()
    for name, kind in re.findall(r"^# TYPE (xcoalesce_\w+) (\w+)$", body, re.MULTILINE):
        names.add(name + "_total" if kind == "counter" and not name.endswith("_total") else name)
    return names


def documented_metrics():
    """Metric names in docs/metrics.md; the sample suffixes of a histogram name the histogram."""
    names = set(re.findall(r"\bxcoalesce_[a-z0-9_]*[a-z0-9]", read(METRICS)))
    return {re.sub(r"_(bucket|sum|count)$", "", name) if re.search(r"_seconds_(bucket|sum|count)$", name)
            else name for name in names}


def test_every_exported_metric_is_documented_and_every_documented_one_exists():
    exported = exported_metrics()
    assert len(exported) > 30
    documented = documented_metrics()
    assert exported - documented == set(), "exported but not in docs/metrics.md"
    assert documented - exported == set(), "in docs/metrics.md but not exported"
