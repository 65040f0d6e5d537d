"""A real Prometheus scraping the agent that watches the simulated host, checked through its HTTP API.

Target up; reclaimable bytes per SR and per VDI; after a leaf coalesce (`xcoalesce-agent --now`,
the real runner against the simulated xapi and storage manager) reclaimable drops and the reclaimed
counter rises by the bytes the run freed; every expression of the shipped rules and dashboard
evaluates without error.
"""
import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest

from tests.agent_process import REPOSITORY, Agent, free_port, wait_for
from tests.helpers import require_tool
from tests.test_alert_rules import RULES, dashboard_expressions

WAIT_SECONDS = 20.0

PROMETHEUS_CONFIG = """global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - {rules}
scrape_configs:
  - job_name: xcoalesce
    static_configs:
      - targets: ['127.0.0.1:{port}']
"""


class Prometheus(object):
    """The Debian `prometheus` server on 127.0.0.1, and its HTTP API."""

    def __init__(self, directory, agent_port):
        self.port = free_port()
        self.config = os.path.join(directory, "prometheus.yml")
        with open(self.config, "w") as stream:
            stream.write(PROMETHEUS_CONFIG.format(rules=RULES, port=agent_port))
        self._log = open(os.path.join(directory, "prometheus.log"), "w")
        self.process = subprocess.Popen(
            [require_tool("prometheus"), "--config.file=" + self.config,
             "--storage.tsdb.path=" + os.path.join(directory, "tsdb"),
             "--web.listen-address=127.0.0.1:{}".format(self.port), "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT)

    def api(self, path, **parameters):
        url = "http://127.0.0.1:{}/api/v1/{}?{}".format(self.port, path, urllib.parse.urlencode(parameters))
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read().decode("utf-8"))

    def query(self, expression):
        """[(labels, value)] of an instant query; AssertionError when Prometheus reports an error."""
        answer = self.api("query", query=expression)
        assert answer["status"] == "success", (expression, answer)
        return [(item["metric"], float(item["value"][1])) for item in answer["data"]["result"]]

    def value(self, expression):
        results = self.query(expression)
        return results[0][1] if len(results) == 1 else None

    def target_up(self):
        try:
            targets = self.api("targets")["data"]["activeTargets"]
        except OSError:
            return False
        return bool(targets) and all(target["health"] == "up" for target in targets)

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


@pytest.fixture
def agent(demo_host, tmp_path):
    config = str(tmp_path / "agent.conf")
    with open(demo_host.agent_conf) as source, open(config, "w") as target:
        target.write(source.read() + "\n[inspection]\ninterval_seconds = 1\n")
    with Agent(config) as running:
        yield running


@pytest.fixture
def prometheus(agent, tmp_path):
    require_tool("prometheus")
    server = Prometheus(str(tmp_path), agent.port)
    yield server
    server.stop()


def leaf_coalesce(config_path, vm_uuid):
    """`xcoalesce-agent --now --vm UUID --json`: the real runner, as an operator would run it."""
    output = subprocess.check_output([sys.executable, "-m", "xcoalesce_agent", "--config", config_path, "--now",
                                      "--vm", vm_uuid, "--json"], cwd=REPOSITORY, stderr=subprocess.DEVNULL)
    return json.loads(output.decode("utf-8"))


def test_prometheus_scrapes_the_agent_watching_the_simulated_host(demo_host, agent, prometheus):
    wait_for(prometheus.target_up, WAIT_SECONDS, 0.25, "Prometheus to scrape the agent")
    per_sr = wait_for(lambda: prometheus.query("xcoalesce_sr_reclaimable_bytes"), WAIT_SECONDS, 0.25,
                      "reclaimable bytes per SR in Prometheus")
    assert {labels["sr_uuid"] for labels, _ in per_sr} == set(demo_host.srs.values())
    assert all(value > 0 for _, value in per_sr)
    per_vdi = prometheus.query("xcoalesce_vdi_reclaimable_bytes")
    assert per_vdi and all(value > 0 for _, value in per_vdi)

    labels, _ = max(per_vdi, key=lambda item: item[1])
    sr_uuid, vdi_uuid = labels["sr_uuid"], labels["vdi_uuid"]
    sr_before = prometheus.value('xcoalesce_sr_reclaimable_bytes{{sr_uuid="{}"}}'.format(sr_uuid))
    reclaimed_before = prometheus.value('xcoalesce_reclaimed_bytes_total{{sr_uuid="{}"}}'.format(sr_uuid))
    assert reclaimed_before == 0, "the counter exists at 0 before the first run"

    report = leaf_coalesce(agent.config_path, labels["vm_uuid"])
    (run,) = [run for run in report["runs"] if run["vdi_uuid"] == vdi_uuid]
    assert run["result"] == "success" and run["reclaimed_bytes"] > 0

    expected = reclaimed_before + run["reclaimed_bytes"]
    wait_for(lambda: prometheus.value('xcoalesce_reclaimed_bytes_total{{sr_uuid="{}"}}'.format(sr_uuid)) == expected,
             WAIT_SECONDS, 0.25, "the reclaimed counter to rise by {} bytes".format(run["reclaimed_bytes"]))
    wait_for(lambda: not prometheus.query('xcoalesce_vdi_reclaimable_bytes{{vdi_uuid="{}"}}'.format(vdi_uuid)),
             WAIT_SECONDS, 0.25, "the coalesced VDI to have nothing left to reclaim")
    assert prometheus.value('xcoalesce_sr_reclaimable_bytes{{sr_uuid="{}"}}'.format(sr_uuid)) < sr_before
    assert prometheus.value('sum(xcoalesce_leaf_coalesce_runs_total{{sr_uuid="{}",result="success"}})'
                            .format(sr_uuid)) == 1

    for expression in dashboard_expressions():
        prometheus.query(expression)
    rules = wait_for(lambda: _evaluated_rules(prometheus), WAIT_SECONDS, 0.25, "every rule to be evaluated")
    for rule in rules:
        assert rule["health"] == "ok", rule
        prometheus.query(rule["query"])


def _evaluated_rules(prometheus):
    groups = prometheus.api("rules")["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    return rules if rules and all(rule["health"] != "unknown" for rule in rules) else None
