"""The simulated xapi, driven through the real XenAPI client over a real unix socket."""
import http.client
import os
import shutil
import socket
import tempfile
import threading
import time
import xmlrpc.client

import pytest
import XenAPI

from tests.dom0sim.xapi import NULL_REF, Database, XapiError, XapiServer, connect, tasks
from tests.dom0sim.xapi.client import UnixSocketTransport

GIB = 1024 ** 3


class Host(object):
    """A one-host pool: an ext SR with two VDIs, a running VM using one of them, and dom0."""

    def __init__(self, db):
        self.db = db
        self.host = db.create("host", name_label="xcp1", address="192.0.2.10", hostname="xcp1")
        self.pool = db.create("pool", name_label="pool", master=self.host)
        self.sr = db.create("SR", name_label="Local storage", type="ext", content_type="user",
                            physical_size=900 * GIB, physical_utilisation=300 * GIB, virtual_allocation=400 * GIB)
        self.pbd = db.create("PBD", host=self.host, SR=self.sr, currently_attached=True,
                             device_config={"device": "/dev/sdb"})
        self.vdi = db.create("VDI", name_label="disk", SR=self.sr, virtual_size=20 * GIB,
                             physical_utilisation=3 * GIB, sm_config={"vhd-parent": "abc", "vdi_type": "vhd"})
        self.spare = db.create("VDI", name_label="spare", SR=self.sr, virtual_size=GIB)
        self.vm = db.create("VM", name_label="web", power_state="Running", resident_on=self.host, domid=3)
        self.vbd = db.create("VBD", VM=self.vm, VDI=self.vdi, device="xvda", currently_attached=True)
        self.dom0 = db.create("VM", name_label="Control domain", is_control_domain=True,
                              power_state="Running", resident_on=self.host, domid=0)
        self.vm_uuid = db.get_field("VM", self.vm, "uuid")


@pytest.fixture
def socket_dir():
    path = tempfile.mkdtemp(prefix="xapi")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sim(socket_dir):
    db = Database()
    host = Host(db)
    server = XapiServer(db, os.path.join(socket_dir, "xapi.sock")).start()
    host.server = server
    host.path = server.socket_path
    yield host
    server.stop()


@pytest.fixture
def api(sim):
    session = connect(sim.path)
    yield session.xenapi
    if session._session:
        session.xenapi.session.logout()


def raw(sim):
    """A plain XML-RPC proxy: results come back as the raw Status/Value structs."""
    return xmlrpc.client.ServerProxy("http://xapi/", transport=UnixSocketTransport(sim.path), allow_none=True)


def failure(call, *args):
    with pytest.raises(XenAPI.Failure) as caught:
        call(*args)
    return caught.value.details


def event_from(api, classes, token, timeout):
    return getattr(api.event, "from")(classes, token, timeout)


def wait_until(predicate, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# ---- sessions ----------------------------------------------------------------------------------

def test_login_and_logout(sim):
    session = connect(sim.path)
    ref = session._session
    assert ref.startswith("OpaqueRef:")
    assert session.xenapi.session.get_this_host(ref) == sim.host
    assert session.xenapi.session.get_originator(ref) == "dom0sim-tests"
    session.xenapi.session.logout()
    assert raw(sim).VM.get_all(ref) == {"Status": "Failure", "ErrorDescription": ["SESSION_INVALID", ref]}


def test_wrong_user_fails_authentication(sim):
    assert failure(connect, sim.path, "admin", "secret") == [
        "SESSION_AUTHENTICATION_FAILED", "admin", "Authentication failure"]


def test_slave_local_session(sim):
    session = XenAPI.Session("http://xapi/", transport=UnixSocketTransport(sim.path))
    session.slave_local_login_with_password("root", "")
    ref = session._session
    assert session.xenapi.host.get_all() == [sim.host]
    assert raw(sim).session.logout(ref)["ErrorDescription"] == ["SESSION_INVALID", ref]
    session.xenapi.session.logout()
    assert not sim.db.exists("session", ref)


def test_api_version_from_pool_master(sim):
    session = connect(sim.path)
    assert session.API_version == "2.16"
    session.xenapi.session.logout()


# ---- wire format and records -------------------------------------------------------------------

def test_records_carry_64_bit_ints_as_strings_maps_refs_and_dates(sim, api):
    sr = api.SR.get_all_records()[sim.sr]
    assert sr["physical_size"] == str(900 * GIB)
    assert int(sr["physical_size"]) - int(sr["physical_utilisation"]) == 600 * GIB
    assert sorted(sr["VDIs"]) == sorted([sim.vdi, sim.spare])
    assert sr["PBDs"] == [sim.pbd]
    vdi = api.VDI.get_record(sim.vdi)
    assert vdi["virtual_size"] == str(20 * GIB) and vdi["SR"] == sim.sr and vdi["VBDs"] == [sim.vbd]
    assert vdi["sm_config"] == {"vhd-parent": "abc", "vdi_type": "vhd"}
    assert vdi["snapshot_of"] == NULL_REF and vdi["type"] == "user" and vdi["on_boot"] == "persist"
    assert isinstance(vdi["snapshot_time"], xmlrpc.client.DateTime)
    assert vdi["snapshot_time"].value == "19700101T00:00:00Z"
    host = api.host.get_record(sim.host)
    assert host["software_version"]["product_brand"] == "XCP-ng"
    assert sorted(host["resident_VMs"]) == sorted([sim.vm, sim.dom0]) and host["PBDs"] == [sim.pbd]
    assert api.PBD.get_device_config(sim.pbd) == {"device": "/dev/sdb"}
    assert api.VBD.get_record(sim.vbd)["mode"] == "RW"
    assert api.pool.get_master(sim.pool) == sim.host
    assert api.VM.get_domid(sim.vm) == "3"


def test_wire_bytes_and_keep_alive(sim):
    session = connect(sim.path)
    connection = _raw_connection(sim)
    connection.request("POST", "/", xmlrpc.client.dumps((session._session, sim.sr), "SR.get_physical_size"))
    response = connection.getresponse()
    text = response.read().decode()
    assert response.status == 200 and response.getheader("Content-Type") == "text/xml"
    assert not response.will_close
    assert text == ('<?xml version="1.0"?><methodResponse><params><param><value><struct><member><name>Status</name>'
                    '<value>Success</value></member><member><name>Value</name><value>{}</value></member></struct>'
                    '</value></param></params></methodResponse>'.format(900 * GIB))
    session.xenapi.VM.set_name_label(sim.vm, 'a<b>&"c\td')
    connection.request("POST", "/", xmlrpc.client.dumps((session._session, sim.vm), "VM.get_name_label"))
    assert "<value>a&lt;b&gt;&amp;&quot;c\td</value>" in connection.getresponse().read().decode()
    assert session.xenapi.VM.get_name_label(sim.vm) == 'a<b>&"c\td'
    connection.request("POST", "/", xmlrpc.client.dumps((session._session, sim.vdi), "VDI.get_snapshot_time"))
    assert "<dateTime.iso8601>19700101T00:00:00Z</dateTime.iso8601>" in connection.getresponse().read().decode()
    connection.close()
    session.xenapi.session.logout()


def _raw_connection(sim):
    connection = http.client.HTTPConnection("localhost")
    connection.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.sock.connect(sim.path)
    return connection


def test_lookups_and_their_errors(sim, api):
    vm_uuid = sim.vm_uuid
    assert api.VM.get_by_uuid(vm_uuid) == sim.vm
    assert api.host.get_by_uuid(sim.db.get_field("host", sim.host, "uuid")) == sim.host
    assert api.VM.get_by_name_label("web") == [sim.vm]
    assert failure(api.VM.get_by_uuid, "no-such-uuid") == ["UUID_INVALID", "VM", "no-such-uuid"]
    assert failure(api.VDI.get_record, "OpaqueRef:nope") == ["HANDLE_INVALID", "VDI", "OpaqueRef:nope"]
    assert failure(api.VDI.get_record, sim.vm) == ["HANDLE_INVALID", "VDI", sim.vm]
    assert failure(api.VM.frobnicate, sim.vm) == ["MESSAGE_METHOD_UNKNOWN", "VM.frobnicate"]
    assert failure(api.VDI.set_virtual_size, sim.vdi, "1") == ["MESSAGE_METHOD_UNKNOWN", "VDI.set_virtual_size"]
    assert failure(api.VM.get_record, sim.vm, "extra") == [
        "MESSAGE_PARAMETER_COUNT_MISMATCH", "VM.get_record", "2", "3"]


def test_setters_maps_and_sets(sim, api):
    api.VDI.set_name_label(sim.vdi, "renamed")
    assert api.VDI.get_name_label(sim.vdi) == "renamed"
    api.VDI.add_to_other_config(sim.vdi, "leaf-coalesce", "false")
    assert api.VDI.get_other_config(sim.vdi) == {"leaf-coalesce": "false"}
    assert failure(api.VDI.add_to_other_config, sim.vdi, "leaf-coalesce", "force") == [
        "MAP_DUPLICATE_KEY", "VDI", "other_config", sim.vdi, "leaf-coalesce"]
    api.VDI.remove_from_other_config(sim.vdi, "leaf-coalesce")
    api.VDI.remove_from_other_config(sim.vdi, "absent")
    assert api.VDI.get_other_config(sim.vdi) == {}
    api.SR.add_to_other_config(sim.sr, "gc", "false")
    api.SR.set_other_config(sim.sr, {"a": "1"})
    assert api.SR.get_other_config(sim.sr) == {"a": "1"}
    api.VM.add_tags(sim.vm, "prod")
    api.VM.add_tags(sim.vm, "prod")
    assert api.VM.get_tags(sim.vm) == ["prod"]
    api.VM.remove_tags(sim.vm, "prod")
    assert api.VM.get_tags(sim.vm) == []
    assert failure(api.VDI.set_name_label, sim.vdi, 42) == ["FIELD_TYPE_ERROR", "name_label"]


# ---- VM power states ---------------------------------------------------------------------------

def test_power_state_cycle(sim, api):
    vm = sim.vm
    api.VM.pause(vm)
    assert api.VM.get_power_state(vm) == "Paused"
    assert api.VM.get_allowed_operations(vm) == ["checkpoint", "hard_reboot", "hard_shutdown", "snapshot", "unpause"]
    api.VM.unpause(vm)
    api.VM.suspend(vm)
    assert api.VM.get_power_state(vm) == "Suspended"
    assert api.VM.get_resident_on(vm) == NULL_REF and vm not in api.host.get_resident_VMs(sim.host)
    assert api.VBD.get_currently_attached(sim.vbd) is False
    assert "resume" in api.VM.get_allowed_operations(vm)
    api.VM.resume(vm, True, False)
    assert api.VM.get_power_state(vm) == "Paused"
    assert api.VBD.get_currently_attached(sim.vbd) is True and api.VM.get_resident_on(vm) == sim.host
    api.VM.hard_shutdown(vm)
    assert api.VM.get_power_state(vm) == "Halted" and api.VM.get_domid(vm) == "-1"
    api.VM.start(vm, False, False)
    assert api.VM.get_power_state(vm) == "Running"
    api.VM.clean_shutdown(vm)
    assert api.VM.get_power_state(vm) == "Halted"


def test_bad_power_state_errors(sim, api):
    assert failure(api.VM.unpause, sim.vm) == ["VM_BAD_POWER_STATE", sim.vm, "paused", "running"]
    assert failure(api.VM.resume, sim.vm, False, False) == ["VM_BAD_POWER_STATE", sim.vm, "suspended", "running"]
    assert failure(api.VM.start, sim.vm, False, False) == ["VM_BAD_POWER_STATE", sim.vm, "halted", "running"]
    api.VM.suspend(sim.vm)
    assert failure(api.VM.pause, sim.vm) == ["VM_BAD_POWER_STATE", sim.vm, "running", "suspended"]
    assert failure(api.VM.suspend, sim.dom0) == [
        "OPERATION_NOT_ALLOWED", "This operation is not allowed on a control domain"]


def test_other_operation_in_progress(sim, api):
    sim.db.faults.set_duration("VM.suspend", 0.5)
    worker = threading.Thread(target=connect(sim.path).xenapi.VM.suspend, args=(sim.vm,))
    worker.start()
    wait_until(lambda: api.VM.get_current_operations(sim.vm))
    assert list(api.VM.get_current_operations(sim.vm).values()) == ["suspend"]
    assert api.VM.get_allowed_operations(sim.vm) == []
    assert failure(api.VM.pause, sim.vm) == ["OTHER_OPERATION_IN_PROGRESS", "VM.suspend", sim.vm]
    worker.join()
    assert api.VM.get_current_operations(sim.vm) == {}
    assert api.VM.get_power_state(sim.vm) == "Suspended"


def test_blocked_operations(sim, api):
    api.VM.add_to_blocked_operations(sim.vm, "suspend", "coalesce in progress")
    assert "suspend" not in api.VM.get_allowed_operations(sim.vm)
    assert failure(api.VM.suspend, sim.vm) == ["OPERATION_BLOCKED", sim.vm, "coalesce in progress"]
    api.VM.remove_from_blocked_operations(sim.vm, "suspend")
    api.VM.suspend(sim.vm)


def test_async_operation_leaves_a_task(sim, api):
    task = api.Async.VM.suspend(sim.vm)
    wait_until(lambda: api.task.get_status(task) != "pending")
    record = api.task.get_record(task)
    assert record["status"] == "success" and record["name_label"] == "Async.VM.suspend"
    task = api.Async.VM.suspend(sim.vm)
    wait_until(lambda: api.task.get_status(task) != "pending")
    assert api.task.get_error_info(task) == ["VM_BAD_POWER_STATE", sim.vm, "running", "suspended"]


# ---- downtime ----------------------------------------------------------------------------------

def test_downtime_intervals(sim, api):
    sim.db.faults.set_duration("VM.suspend", 0.05)
    api.VM.suspend(sim.vm)
    time.sleep(0.05)
    api.VM.resume(sim.vm, False, False)
    api.VM.pause(sim.vm)
    api.VM.unpause(sim.vm)
    with sim.db.io_frozen(sim.vm_uuid):
        sim.db.freeze_io(sim.vm_uuid)
        sim.db.thaw_io(sim.vm_uuid)
        time.sleep(0.02)
    intervals = sim.db.downtime(sim.vm_uuid)
    assert [i.kind for i in intervals] == ["suspended", "paused", "io-frozen"]
    assert all(i.end is not None and i.end >= i.start for i in intervals)
    assert intervals[0].duration >= 0.1
    assert intervals[2].duration >= 0.02
    assert intervals[0].end <= intervals[1].start <= intervals[1].end <= intervals[2].start
    with pytest.raises(ValueError):
        sim.db.thaw_io(sim.vm_uuid)
    api.VM.suspend(sim.vm)
    assert sim.db.downtime(sim.vm_uuid)[-1].end is None


# ---- extension points --------------------------------------------------------------------------

class SMException(Exception):
    pass


def test_plugins(sim, api):
    calls = []

    def leaf_coalesce(host, args):
        calls.append((host, args))
        return "Success"

    def broken(host, args):
        raise SMException("Failed to suspend the VM")

    def refused(host, args):
        raise XapiError("SR_BACKEND_FAILURE_44", "", "There is insufficient space", "")

    sim.db.register_plugin("coalesce-leaf", "leaf-coalesce", leaf_coalesce)
    sim.db.register_plugin("coalesce-leaf", "broken", broken)
    sim.db.register_plugin("coalesce-leaf", "refused", refused)
    assert api.host.call_plugin(sim.host, "coalesce-leaf", "leaf-coalesce", {"vm_uuid": sim.vm_uuid}) == "Success"
    assert calls == [(sim.host, {"vm_uuid": sim.vm_uuid})]
    assert failure(api.host.call_plugin, sim.host, "coalesce-leaf", "broken", {}) == [
        "XENAPI_PLUGIN_FAILURE", "broken", "SMException", "Failed to suspend the VM"]
    assert failure(api.host.call_plugin, sim.host, "coalesce-leaf", "refused", {})[0] == "SR_BACKEND_FAILURE_44"
    assert failure(api.host.call_plugin, sim.host, "coalesce-leaf", "nope", {}) == [
        "UNKNOWN_XENAPI_PLUGIN_FUNCTION", "nope"]
    assert failure(api.host.call_plugin, sim.host, "missing", "fn", {}) == ["XENAPI_MISSING_PLUGIN", "missing"]
    assert failure(api.host.call_plugin, "OpaqueRef:x", "coalesce-leaf", "leaf-coalesce", {})[0] == "HANDLE_INVALID"


def test_sr_scan_handlers(sim, api):
    scanned = []

    def refresh(sr):
        scanned.append(sr)
        sim.db.set("SR", sr, "physical_utilisation", 123 * GIB)

    sim.db.register_sr_scan(refresh)
    api.SR.scan(sim.sr)
    assert scanned == [sim.sr]
    assert api.SR.get_physical_utilisation(sim.sr) == str(123 * GIB)
    assert failure(api.SR.scan, "OpaqueRef:x") == ["HANDLE_INVALID", "SR", "OpaqueRef:x"]


def test_gc_task_records(sim, api):
    with tasks.running(sim.db, "Garbage Collection", "Garbage collection for SR x") as task:
        tasks.set_progress(sim.db, task, 0.5)
        record = api.task.get_all_records()[task]
        assert (record["status"], record["progress"], record["resident_on"]) == ("pending", 0.5, sim.host)
    assert api.task.get_status(task) == "success"
    with pytest.raises(XapiError):
        with tasks.running(sim.db, "Garbage Collection") as failed:
            raise XapiError("SR_BACKEND_FAILURE_40", "", "GC failed")
    assert api.task.get_error_info(failed) == ["SR_BACKEND_FAILURE_40", "", "GC failed"]


# ---- events and messages -----------------------------------------------------------------------

def test_event_from_add_mod_del(sim, api):
    first = event_from(api, ["*"], "", 1.0)
    assert {(e["class"], e["operation"]) for e in first["events"]} >= {("vm", "add"), ("sr", "add"), ("pool", "add")}
    assert first["valid_ref_counts"]["vdi"] == 2
    token = first["token"]
    vdi = sim.db.create("VDI", SR=sim.sr, name_label="new", virtual_size=2 * GIB)
    api.VM.pause(sim.vm)
    sim.db.destroy("VDI", sim.spare)
    result = event_from(api, ["VDI", "vm"], token, 1.0)
    seen = [(e["class"], e["operation"], e["ref"]) for e in result["events"]]
    assert seen == [("vdi", "add", vdi), ("vm", "mod", sim.vm), ("vdi", "del", sim.spare)]
    assert result["events"][0]["snapshot"]["virtual_size"] == str(2 * GIB)
    assert result["events"][1]["snapshot"]["power_state"] == "Paused"
    assert "snapshot" not in result["events"][2]
    assert result["token"] > token
    assert event_from(api, ["vm/" + sim.dom0], token, 0.1)["events"] == []
    assert [e["ref"] for e in event_from(api, ["VM/" + sim.vm], token, 0.1)["events"]] == [sim.vm]


def test_event_from_blocks_until_timeout_or_change(sim, api):
    token = event_from(api, ["vm"], "", 1.0)["token"]
    started = time.monotonic()
    result = event_from(api, ["vm"], token, 0.3)
    assert result["events"] == [] and 0.25 <= time.monotonic() - started < 2
    timer = threading.Timer(0.2, sim.db.set, ("VM", sim.vm, "name_label", "renamed"))
    timer.start()
    started = time.monotonic()
    result = event_from(api, ["vm"], token, 10.0)
    assert time.monotonic() - started < 5
    assert [(e["operation"], e["snapshot"]["name_label"]) for e in result["events"]] == [("mod", "renamed")]
    assert failure(event_from, api, ["vm"], "bogus", 1.0) == ["EVENT_FROM_TOKEN_PARSE_FAILURE", "bogus"]
    timer.join()


def test_event_inject(sim, api):
    token = api.event.inject("VM", sim.vm)
    assert [e["operation"] for e in event_from(api, ["vm"], token, 1.0)["events"]] == ["mod"]


def test_messages(sim, api):
    ref = api.message.create("LEAF_COALESCE_FAILED", "3", "VM", sim.vm_uuid, "no space")
    record = api.message.get_all_records()[ref]
    assert (record["name"], record["priority"], record["cls"], record["obj_uuid"], record["body"]) == (
        "LEAF_COALESCE_FAILED", "3", "VM", sim.vm_uuid, "no space")
    assert isinstance(record["timestamp"], xmlrpc.client.DateTime)
    assert list(api.message.get_since(xmlrpc.client.DateTime("20000101T00:00:00Z"))) == [ref]
    assert api.message.get_since(xmlrpc.client.DateTime("29990101T00:00:00Z")) == {}
    assert failure(api.message.create, "X", "3", "SR", "no-such-uuid", "") == ["UUID_INVALID", "SR", "no-such-uuid"]


# ---- failure injection -------------------------------------------------------------------------

def test_injected_method_failure(sim, api):
    sim.db.faults.fail_method("SR.scan", "SR_BACKEND_FAILURE_47", "", "The SR is not available", "", times=1)
    assert failure(api.SR.scan, sim.sr) == ["SR_BACKEND_FAILURE_47", "", "The SR is not available", ""]
    api.SR.scan(sim.sr)
    sim.db.faults.fail_method("*", "HOST_IS_SLAVE", "192.0.2.1")
    assert failure(api.VM.get_all) == ["HOST_IS_SLAVE", "192.0.2.1"]
    assert failure(connect, sim.path) == ["HOST_IS_SLAVE", "192.0.2.1"]
    sim.db.faults.clear()
    assert api.VM.get_all()


def test_injected_suspend_and_resume_failures(sim, api):
    sim.db.faults.fail_vm_operation(sim.vm_uuid, "suspend")
    details = failure(api.VM.suspend, sim.vm)
    assert details[0] == "INTERNAL_ERROR"
    assert api.VM.get_power_state(sim.vm) == "Running" and api.VM.get_current_operations(sim.vm) == {}
    assert sim.db.downtime(sim.vm_uuid)[-1].end is not None
    sim.db.faults.clear_vm_operation(sim.vm_uuid, "suspend")
    sim.db.faults.fail_vm_operation(sim.vm_uuid, "resume", "SR_BACKEND_FAILURE_46", "", "The VDI is not available")
    api.VM.suspend(sim.vm)
    assert failure(api.VM.resume, sim.vm, False, False) == [
        "SR_BACKEND_FAILURE_46", "", "The VDI is not available"]
    assert api.VM.get_power_state(sim.vm) == "Suspended"


def test_dropped_connections(sim, api):
    sim.db.faults.drop_connections(from_call=2)
    api.VM.get_all()
    with pytest.raises((http.client.HTTPException, OSError)):
        api.VM.get_all()
    sim.db.faults.clear()
    assert sim.vm in connect(sim.path).xenapi.VM.get_all()
    sim.db.faults.drop_connections(times=1)
    assert sim.vm in api.VM.get_all()


def test_garbage_on_the_socket(sim, api):
    for garbage, answer in ((b"\x00\x01garbage\r\n\r\n", b"Bad request syntax"),
                            (b"POST / HTTP/1.1\r\nContent-Length: many\r\n\r\n", b"HTTP/1.1 400")):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(sim.path)
            sock.sendall(garbage)
            assert answer in _read_to_end(sock)
    connection = _raw_connection(sim)
    connection.request("POST", "/", b"<methodCall><not-xml", {"Content-Type": "text/xml"})
    with pytest.raises(xmlrpc.client.Fault):
        xmlrpc.client.loads(connection.getresponse().read())
    connection.close()
    assert sim.vm in api.VM.get_all()


def _read_to_end(sock):
    chunks = []
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def test_concurrent_clients(sim):
    errors = []

    def client():
        try:
            session = connect(sim.path)
            for _ in range(20):
                session.xenapi.VDI.get_all_records()
            session.xenapi.session.logout()
        except Exception as error:
            errors.append(error)

    workers = [threading.Thread(target=client) for _ in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []


def test_stop_releases_blocked_calls_and_removes_the_socket(sim, socket_dir):
    session = connect(sim.path)
    token = event_from(session.xenapi, ["vm"], "", 1.0)["token"]
    worker = threading.Thread(target=lambda: _ignore_errors(event_from, session.xenapi, ["vm"], token, 60.0))
    worker.start()
    time.sleep(0.1)
    started = time.monotonic()
    sim.server.stop()
    worker.join(5)
    assert not worker.is_alive() and time.monotonic() - started < 5
    assert not os.path.exists(sim.path)


def _ignore_errors(call, *args):
    try:
        call(*args)
    except Exception:
        pass


# ---- Python-side database API ------------------------------------------------------------------

def test_database_api(sim):
    db = sim.db
    assert db.find("VDI", name_label="spare") == [sim.spare]
    assert db.ref_of("VM", sim.vm_uuid) == sim.vm
    with pytest.raises(XapiError) as caught:
        db.ref_of("VM", "nope")
    assert caught.value.details == ["UUID_INVALID", "VM", "nope"]
    with pytest.raises(ValueError):
        db.create("VDI", no_such_field=1)
    with pytest.raises(ValueError):
        db.set("SR", sim.sr, "VDIs", [])
    with pytest.raises(XapiError):
        db.set("VDI", sim.vdi, "virtual_size", "lots")
    new_uuid = "0bd4c2d6-7d0f-4e4a-9f57-000000000001"
    db.set("VDI", sim.spare, "uuid", new_uuid)
    assert db.ref_of("VDI", new_uuid) == sim.spare
    with pytest.raises(ValueError):
        db.create("VDI", uuid=new_uuid)
    db.destroy("VBD", sim.vbd)
    assert db.get_field("VDI", sim.vdi, "VBDs") == [] and db.get_field("VM", sim.vm, "VBDs") == []
