"""The service as a real process watching the simulated host: signals, reload, failed inspections."""
import json
import os
import signal
import subprocess

from tests.agent_process import Agent, free_port, wait_for
from tests.helpers import require_tool


def write_config(demo_host, path, extra="", socket_path=None):
    with open(demo_host.agent_conf) as stream:
        text = stream.read()
    if socket_path:
        text = text.replace("socket = {}".format(demo_host.socket_path), "socket = {}".format(socket_path))
    with open(str(path), "w") as stream:
        stream.write(text + "\n[inspection]\ninterval_seconds = 3600\n" + extra)
    return str(path)


def value(metrics, name, **labels):
    found = [sample_value for sample_labels, sample_value in metrics.get(name, ())
             if set(labels.items()) <= set(sample_labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def test_serves_the_simulated_host_and_stops_cleanly_on_sigterm(demo_host, tmp_path):
    with Agent(write_config(demo_host, tmp_path / "agent.conf")) as agent:
        metrics = agent.wait_for_metric("xcoalesce_sr_reclaimable_bytes")
        served = {labels["sr_uuid"] for labels, _ in metrics["xcoalesce_sr_reclaimable_bytes"]}
        assert served == set(demo_host.srs.values())
        assert sum(sample for _, sample in metrics["xcoalesce_vdi_reclaimable_bytes"]) > 0
        assert value(metrics, "xcoalesce_xapi_reachable") == 1
        live = agent.get().encode("utf-8")
        checked = subprocess.Popen([require_tool("promtool"), "check", "metrics"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        output = checked.communicate(live)[0]
        assert checked.returncode == 0 and not output.strip(), output
        agent.signal(signal.SIGTERM)
        assert agent.wait() == 0
        assert "Traceback" not in agent.stderr() and "stopped" in agent.stderr()
        assert agent.get() is None


def test_sigint_stops_cleanly_too(demo_host, tmp_path):
    with Agent(write_config(demo_host, tmp_path / "agent.conf")) as agent:
        wait_for(agent.get, what="the agent to listen")
        agent.signal(signal.SIGINT)
        assert agent.wait() == 0
        assert "Traceback" not in agent.stderr()


def test_an_address_in_use_is_a_one_line_error(demo_host, tmp_path):
    with Agent(write_config(demo_host, tmp_path / "first.conf")) as first:
        wait_for(first.get, what="the first agent to listen")
        second = Agent(write_config(demo_host, tmp_path / "second.conf"), port=first.port).start()
        assert second.wait() == 2
        assert second.stderr().splitlines()[-1] == "xcoalesce-agent: error: cannot listen on 127.0.0.1:{}: " \
                                                   "Address already in use".format(first.port)
        second.stop()


def test_sighup_rereads_the_config_and_keeps_it_when_broken(demo_host, tmp_path):
    config = tmp_path / "agent.conf"
    first_port, second_port = free_port(), free_port()
    write_config(demo_host, config, "[web]\nlisten_address = 127.0.0.1:{}\n".format(first_port))
    with Agent(str(config), port=first_port, override_address=False) as agent:
        agent.wait_for_metric("xcoalesce_sr_reclaimable_bytes")
        write_config(demo_host, config, "[web]\nlisten_address = 127.0.0.1:{}\n".format(second_port))
        agent.signal(signal.SIGHUP)
        agent.wait_for_metric("xcoalesce_sr_reclaimable_bytes", port=second_port)
        assert agent.get(port=first_port) is None
        config.write_text("[web]\nlisten_address = nowhere\n")
        agent.signal(signal.SIGHUP)
        wait_for(lambda: "keeping the running configuration" in agent.stderr(), what="the reload error")
        assert agent.metrics(port=second_port)["xcoalesce_sr_reclaimable_bytes"]
        assert agent.process.poll() is None


def test_a_failed_inspection_keeps_serving_the_last_good_one(demo_host, tmp_path):
    config = tmp_path / "agent.conf"
    write_config(demo_host, config)
    with Agent(str(config)) as agent:
        good = agent.wait_for_metric("xcoalesce_sr_reclaimable_bytes")
        write_config(demo_host, config, socket_path=str(tmp_path / "no-xapi-here.sock"))
        agent.signal(signal.SIGHUP)

        def failed():
            metrics = agent.metrics()
            return metrics if value(metrics, "xcoalesce_inspections_total", result="failure") else None
        metrics = wait_for(failed, what="a failed inspection in the metrics")
        assert value(metrics, "xcoalesce_xapi_reachable") == 0
        assert value(metrics, "xcoalesce_inspection_errors_total", stage="xapi") == 1
        assert value(metrics, "xcoalesce_inspection_errors_total", stage="host") == 0
        assert sorted(metrics["xcoalesce_sr_reclaimable_bytes"], key=repr) == \
            sorted(good["xcoalesce_sr_reclaimable_bytes"], key=repr)
        assert value(metrics, "xcoalesce_last_inspection_success_timestamp_seconds") == \
            value(good, "xcoalesce_last_inspection_success_timestamp_seconds")
        assert "serving the last good inspection" in agent.stderr()


def test_the_inspection_thread_survives_what_it_did_not_expect(demo_host, tmp_path):
    """A journal and run totals the agent cannot make sense of (written by hand, or by another version):
    each failure is one log line and counted, and the thread inspects again once they are gone."""
    config = write_config(demo_host, tmp_path / "agent.conf")
    state_dir = os.path.join(demo_host.state_dir, "agent-state")
    if not os.path.isdir(state_dir):
        os.makedirs(state_dir)
    totals = os.path.join(state_dir, "totals.json")
    for path, content in ((os.path.join(state_dir, "journal.json"), {"steps": [1]}),
                          (totals, {"format": 1, "runs": 1, "srs": [1], "frozen_seconds": 1})):
        with open(path, "w") as stream:
            json.dump(content, stream)
    with Agent(config) as agent:
        wait_for(lambda: "serving the last good inspection" in agent.stderr(), what="the failed inspection")
        os.remove(totals)
        agent.signal(signal.SIGHUP)
        metrics = agent.wait_for_metric("xcoalesce_sr_reclaimable_bytes")
        assert value(metrics, "xcoalesce_inspection_errors_total", stage="internal") >= 1
        assert value(metrics, "xcoalesce_inspections_total", result="failure") >= 1
        lines = agent.stderr().splitlines()
        assert "Traceback" not in agent.stderr()
        assert all(line.split(":")[0] in ("INFO", "WARNING", "ERROR") for line in lines), lines
        assert any(line.startswith("ERROR: repairing what an interrupted run left failed: ") for line in lines)
        assert any(line.startswith("ERROR: inspection failed: ") for line in lines)
