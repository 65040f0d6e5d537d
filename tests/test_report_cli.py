"""`--report` output and the command line: exit codes and one-line errors."""
import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from tests.dom0sim.host import SimHost
from xcoalesce_agent import model
from xcoalesce_agent.inspect import report

UUID_SR = "5e1ec7ed-0000-4000-8000-00000000000a"


def sample_inspection():
    vdis = [
        model.VdiReport(uuid="1eaf0000-0000-4000-8000-000000000001", name="web root", vm_uuid="vm-1",
                        vm_name="web-01", chain_length=2, state=model.LEAF_COALESCEABLE, reason="",
                        reclaimable_bytes=25219584, merge_bytes=16777216, merge_free_bytes=16809984,
                        physical_bytes=42029568, virtual_size_bytes=268435456,
                        parent_uuid="ba5e0000-0000-4000-8000-000000000001", hidden=False),
        model.VdiReport(uuid="ba5e0000-0000-4000-8000-000000000001", name="", vm_uuid="", vm_name="",
                        chain_length=1, state=model.HIDDEN_PARENT, reason="base of the chain",
                        reclaimable_bytes=0, merge_bytes=0, merge_free_bytes=0, physical_bytes=50343424,
                        virtual_size_bytes=268435456, parent_uuid="", hidden=True),
    ]
    sr_report = model.SrReport(uuid=UUID_SR, name="Local storage", type="ext", shared=False,
                               size_bytes=2 << 30, free_bytes=1 << 30, reclaimable_bytes=25219584,
                               gc_pending_bytes=4096, merge_free_bytes=16809984, longest_chain=2, gc_running=True,
                               gc_running_seconds=42.0, skipped_vdis=1, errors=["junk: scan error -22: opening file"],
                               vdis=vdis)
    return model.Inspection(host={"uuid": "h-1", "name": "xcp-ng-1", "product_version": "8.3.0"}, started=1.0,
                            duration_seconds=0.5, srs=[sr_report],
                            skipped_srs=[{"uuid": "iso-1", "name": "ISOs", "type": "iso",
                                          "reason": "type iso does not hold VHDs"}],
                            errors=[])


@pytest.mark.parametrize("value, text", [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
                                         (25219584, "24.1 MiB"), (2 << 30, "2.0 GiB"), (3 << 40, "3.0 TiB")])
def test_human_bytes_are_iec(value, text):
    assert report.human_bytes(value) == text


def test_text_report_has_a_table_per_sr_and_totals():
    text = report.render_text(sample_inspection())
    lines = text.splitlines()
    assert lines[0] == "Host xcp-ng-1 (h-1)"
    assert "SR Local storage (ext, {})".format(UUID_SR) in text
    assert "reclaimable by leaf coalesce 24.1 MiB" in text and "GC running for 42 s" in text
    header = next(line for line in lines if "STATE" in line)
    assert header.split() == ["VM", "VDI", "CHAIN", "STATE", "RECLAIMABLE", "REASON"]
    assert any(line.split()[:6] == ["web-01", "web", "root", "(1eaf0000)", "2", "leaf_coalesceable"]
               and "24.1 MiB" in line for line in lines)
    assert any("hidden_parent" in line and line.rstrip().endswith("base of the chain") for line in lines)
    assert "  1 raw VDI skipped" in lines
    assert "  error: junk: scan error -22: opening file" in lines
    assert "Skipped SR ISOs (iso, iso-1): type iso does not hold VHDs" in lines
    assert lines[-1] == "Total: 24.1 MiB reclaimable by leaf coalesce on 1 SR; the GC's own pending work frees 4.0 KiB"


def test_json_report_has_stable_keys():
    document = json.loads(report.render_json(sample_inspection()))
    assert set(document) >= {"host", "srs", "skipped_srs", "errors", "reclaimable_bytes", "gc_pending_bytes"}
    sr_document = document["srs"][0]
    assert set(sr_document) >= {"uuid", "name", "type", "size_bytes", "free_bytes", "reclaimable_bytes",
                                "gc_pending_bytes", "vdis", "state_counts"}
    assert sr_document["state_counts"][model.LEAF_COALESCEABLE] == 1
    assert set(sr_document["state_counts"]) == set(model.STATES)
    vdi = sr_document["vdis"][0]
    assert set(vdi) >= {"uuid", "vm_uuid", "vm_name", "chain_length", "state", "reclaimable_bytes", "reason"}
    assert vdi["reclaimable_bytes"] == 25219584 and document["reclaimable_bytes"] == 25219584
    assert report.render_json(sample_inspection()) == report.render_json(sample_inspection())


def run_agent(*args):
    process = subprocess.run([sys.executable, "-m", "xcoalesce_agent"] + list(args), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, universal_newlines=True)
    return process.returncode, process.stdout, process.stderr


def test_version():
    code, out, _ = run_agent("--version")
    assert code == 0 and out.startswith("xcoalesce-agent ")


@pytest.mark.parametrize("args, message", [
    (["--json"], "--json goes with --report, --now or --repair"),
    (["--report", "--dry-run"], "--dry-run goes with --now"),
    (["--report", "--vm", "x"], "--vm goes with --now"),
    (["--report", "--now"], "not allowed with argument"),
    (["--web.listen-address", "nowhere"], "--web.listen-address: expected ADDRESS:PORT"),
    (["--report", "--web.listen-address", ":9100"], "--web.listen-address is for the service mode"),
    (["--now", "--max-freeze-seconds", "0"], "--max-freeze-seconds: must be greater than 0 and at most 600"),
    (["--now", "--max-freeze-seconds", "1e999"], "--max-freeze-seconds: expected a finite number"),
    (["--now", "--max-freeze-seconds", "nan"], "--max-freeze-seconds: expected a finite number"),
    (["--web.listen-address", "a_b:9100"], "--web.listen-address: neither an IP address nor a host name"),
])
def test_usage_errors_exit_2(args, message):
    code, out, err = run_agent(*args)
    assert code == 2 and out == ""
    assert err.splitlines()[-1].startswith("xcoalesce-agent: error: ") and message in err


def write_config(tmp_path, text):
    path = tmp_path / "agent.conf"
    path.write_text(text)
    return str(path)


def test_malformed_config_is_one_line_and_exit_2(tmp_path):
    conf = write_config(tmp_path, "[xapi]\ntimeout_seconds = 60\n\n[coalesce]\nmax_freeze_seconds = ten\n")
    code, out, err = run_agent("--config", conf, "--report")
    assert code == 2 and out == ""
    assert err == "xcoalesce-agent: error: {}:5: [coalesce] max_freeze_seconds: expected a number, got 'ten'\n" \
        .format(conf)


def host_config(tmp_path, socket_path, vhd_util="/usr/bin/vhd-util"):
    inventory = tmp_path / "xensource-inventory"
    inventory.write_text("INSTALLATION_UUID='1ba5ab07-fc62-51ac-8c08-37586af5e89a'\n")
    return write_config(tmp_path, "[xapi]\nsocket = {}\ninventory = {}\ntimeout_seconds = 5\n"
                                  "[tools]\nvhd_util = {}\n".format(socket_path, inventory, vhd_util))


def test_missing_xapi_socket_is_exit_3(tmp_path):
    socket_path = tmp_path / "no_such_dir" / "xapi"
    code, out, err = run_agent("--config", host_config(tmp_path, socket_path), "--report")
    assert code == 3 and out == ""
    assert err == "xcoalesce-agent: error: xapi at {} unreachable: No such file or directory\n".format(socket_path)


def test_xapi_socket_nobody_listens_on_is_exit_3(tmp_path):
    socket_path = str(tmp_path / "xapi")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(socket_path)
    dead.close()
    code, _, err = run_agent("--config", host_config(tmp_path, socket_path), "--report")
    assert code == 3 and err == "xcoalesce-agent: error: xapi at {} unreachable: Connection refused\n".format(
        socket_path)


def test_xapi_answering_garbage_is_exit_3(tmp_path):
    socket_path = str(tmp_path / "xapi")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(socket_path)
    server.listen(4)

    def answer_garbage():
        for _ in range(4):
            try:
                connection, _ = server.accept()
            except OSError:
                return
            connection.recv(65536)
            connection.sendall(b"\x00\x01 this is not HTTP\r\n\r\n")
            connection.close()

    thread = threading.Thread(target=answer_garbage)
    thread.daemon = True
    thread.start()
    try:
        code, _, err = run_agent("--config", host_config(tmp_path, socket_path), "--report")
    finally:
        server.close()
    assert code == 3 and err.count("\n") == 1
    assert err.startswith("xcoalesce-agent: error: xapi at {} unreachable: ".format(socket_path))


def test_missing_inventory_is_exit_3(tmp_path):
    conf = write_config(tmp_path, "[xapi]\ninventory = {}\n".format(tmp_path / "inventory"))
    code, _, err = run_agent("--config", conf, "--report")
    assert code == 3
    assert err == "xcoalesce-agent: error: cannot read the host inventory {}: No such file or directory\n".format(
        tmp_path / "inventory")


@pytest.fixture(scope="module")
def demo_host(tmp_path_factory):
    from tests.dom0sim.host import SimHost
    host = SimHost(str(tmp_path_factory.mktemp("demo")), "demo").build().start()
    yield host
    host.stop()


def test_missing_vhd_util_is_exit_3(demo_host, tmp_path):
    with open(demo_host.agent_conf) as handle:
        text = handle.read()
    missing = str(tmp_path / "vhd-util")
    conf = write_config(tmp_path, text.replace(os.path.join(demo_host.state_dir, "bin", "vhd-util"), missing))
    code, out, err = run_agent("--config", conf, "--report")
    assert code == 3 and out == ""
    assert err == "xcoalesce-agent: error: cannot run {}: No such file or directory\n".format(missing)


def test_text_report_of_the_demo(demo_host):
    code, out, err = run_agent("--config", demo_host.agent_conf, "--report")
    assert code == 0 and err == ""
    assert "SR Local storage (ext" in out and "SR iSCSI SAN (lvmoiscsi" in out
    assert out.count("leaf_coalesceable") == 3
    assert out.splitlines()[-1].startswith("Total: ")


def test_xapi_failing_a_read_is_one_line_and_exit_3(tmp_path_factory):
    host = SimHost(str(tmp_path_factory.mktemp("failing-read")), "demo").build().start()
    try:
        host.db.faults.fail_method("VDI.get_all_records_where", "HOST_IS_SLAVE", "192.0.2.10")
        code, out, err = run_agent("--config", host.agent_conf, "--report")
    finally:
        host.stop()
    assert code == 3 and out == ""
    assert err == "xcoalesce-agent: error: xapi at {} failed VDI.get_all_records_where: HOST_IS_SLAVE 192.0.2.10\n" \
        .format(host.socket_path)
