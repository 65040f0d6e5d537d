"""The shipped alerting rules: valid for promtool, and every alert unit-tested."""
import json
import os
import re
import subprocess

from tests.helpers import require_tool

MONITORING = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "monitoring")
RULES = os.path.join(MONITORING, "xcoalesce-alerts.yml")
RULE_TESTS = os.path.join(MONITORING, "xcoalesce-alerts.test.yml")


def promtool(*arguments):
    process = subprocess.Popen([require_tool("promtool")] + list(arguments), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, universal_newlines=True, cwd=MONITORING)
    output = process.communicate()[0]
    return process.returncode, output


def read(path):
    with open(path, encoding="utf-8") as stream:
        return stream.read()


def alert_names():
    return re.findall(r"^\s*- alert: (\w+)$", read(RULES), re.MULTILINE)


def test_promtool_check_rules():
    code, output = promtool("check", "rules", RULES)
    assert code == 0, output
    assert "SUCCESS: {} rules found".format(len(alert_names())) in output, output


def test_promtool_test_rules():
    code, output = promtool("test", "rules", RULE_TESTS)
    assert code == 0 and "SUCCESS" in output, output


def test_every_alert_has_a_unit_test_that_fires_it():
    tests = read(RULE_TESTS)
    fired = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n\s+- exp_labels", tests))
    assert set(alert_names()) == fired


def test_every_alert_says_how_bad_and_what_happened():
    blocks = re.split(r"^\s*- alert: ", read(RULES), flags=re.MULTILINE)[1:]
    assert len(blocks) == len(alert_names()) >= 10
    for block in blocks:
        name = block.split("\n", 1)[0]
        assert re.search(r"severity: (info|warning|critical)\n", block), name
        assert "summary: " in block and "description: " in block, name


DASHBOARD = os.path.join(MONITORING, "xcoalesce-dashboard.json")
GRAFANA_VARIABLES = (("$__rate_interval", "1m"), ("$__range", "1h"), ("$__interval", "1m"), ("$host", ".*"))


def dashboard_expressions():
    """Every PromQL expression of the dashboard, Grafana's variables replaced as Grafana would."""
    with open(DASHBOARD, encoding="utf-8") as stream:
        dashboard = json.load(stream)
    expressions = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", ()):
            expression = target["expr"]
            for variable, value in GRAFANA_VARIABLES:
                expression = expression.replace(variable, value)
            expressions.append(expression)
    return expressions


def test_dashboard_is_templated_on_host():
    with open(DASHBOARD, encoding="utf-8") as stream:
        dashboard = json.load(stream)
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["host"]["multi"] and variables["host"]["includeAll"]
    assert "xcoalesce_" in variables["host"]["query"]["query"]
    for panel in dashboard["panels"]:
        for target in panel.get("targets", ()):
            assert 'host=~"$host"' in target["expr"], target["expr"]


def test_every_dashboard_expression_parses(tmp_path):
    expressions = dashboard_expressions()
    assert len(expressions) >= 20
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": "dashboard:expression_{}".format(index), "expr": expression}
        for index, expression in enumerate(expressions)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps(rules))
    code, output = promtool("check", "rules", str(path))
    assert code == 0, output
