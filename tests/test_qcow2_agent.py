"""QCOW2 VDIs (XCP-ng 8.3) inspected, estimated and reclaimed like VHDs.

The first tests put real QCOW2 chains, made with Debian's qemu-img and qemu-io, beside the VHDs of a
simulated host's file SR: states, reasons, formats and estimates equal to what a real
`qemu-img commit` frees, and hostile images each a reason, none written to. The others run the
agent end to end on the simulated host's `qcow2` scenario, and skip while it has none.
"""
import re
import contextlib
import hashlib
import json
import os
import shutil
import struct
import subprocess
import uuid as uuid_module

import pytest

from tests.dom0sim import scenarios
from tests.helpers import require_tool
from tests.runner_support import REPOSITORY, agent_command, configure, run_now
from tests.test_qcow2meta import create, set_hidden, write
from xcoalesce_agent import config, model
from xcoalesce_agent.inspect import inspection

MIB = 1024 * 1024
CLUSTER = 65536


@pytest.fixture
def qcow2_demo(sim_host):
    require_tool("qemu-io")
    require_tool("qemu-img")
    return sim_host("demo")


def add_vdi(host, sr_key, image_uuid, name, size, hidden=False):
    host.db.create("VDI", uuid=image_uuid, name_label=name, SR=host.sr_ref(sr_key), virtual_size=size,
                   location=image_uuid, managed=not hidden,
                   sm_config={"vdi_type": "qcow2", "image-format": "qcow2"})


def new_uuid():
    return str(uuid_module.uuid4())


def file_sr_dir(host, key):
    return os.path.join(host.state_dir, "sr-mount", host.srs[key])


def chain(host, directory, leaf_ranges, base_ranges=((0, 4 * MIB),), size=64 * MIB):
    """A hidden base and a visible leaf, both with VDI records: (base uuid, leaf uuid)."""
    base, leaf = new_uuid(), new_uuid()
    base_path, leaf_path = os.path.join(directory, base + ".qcow2"), os.path.join(directory, leaf + ".qcow2")
    create(base_path, size)
    write(base_path, *base_ranges)
    create(leaf_path, 0, backing=base + ".qcow2")
    write(leaf_path, *leaf_ranges, pattern=2)
    set_hidden(base_path, True)
    set_hidden(leaf_path, False)
    add_vdi(host, "local", base, "base copy", size, hidden=True)
    add_vdi(host, "local", leaf, "q leaf", size)
    return base, leaf


def digest(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def test_file_sr_qcow2_chains_are_inspected_beside_vhds_and_estimated_exactly(qcow2_demo):
    host = qcow2_demo
    directory = file_sr_dir(host, "local")
    before = inspection.inspect(config.load(host.agent_conf))
    base, leaf = chain(host, directory, [(MIB, 2 * MIB), (4 * MIB, 17 * CLUSTER)])
    paths = {name: os.path.join(directory, name + ".qcow2") for name in (base, leaf)}
    contents = {path: digest(path) for path in paths.values()}
    result = inspection.inspect(config.load(host.agent_conf))
    local = next(sr for sr in result.srs if sr.uuid == host.srs["local"])
    vdis = {vdi.uuid: vdi for vdi in local.vdis}
    assert {vdi.format for vdi in local.vdis} == {model.VHD, model.QCOW2}
    assert (vdis[leaf].state, vdis[leaf].chain_length, vdis[leaf].format) == (model.LEAF_COALESCEABLE, 2, "qcow2")
    assert (vdis[base].state, vdis[base].hidden, vdis[base].reason) == (model.HIDDEN_PARENT, True,
                                                                        "base of the chain")
    assert {path: digest(path) for path in paths.values()} == contents   # read, never written
    old = next(sr for sr in before.srs if sr.uuid == host.srs["local"])
    assert local.reclaimable_bytes == old.reclaimable_bytes + vdis[leaf].reclaimable_bytes   # nothing twice
    leaf_size, parent_size = os.path.getsize(paths[leaf]), os.path.getsize(paths[base])
    subprocess.check_output(["qemu-img", "commit", "-f", "qcow2", paths[leaf], "-d"])
    growth = os.path.getsize(paths[base]) - parent_size
    assert growth == 17 * CLUSTER
    assert vdis[leaf].reclaimable_bytes == leaf_size - growth
    assert vdis[leaf].merge_free_bytes == growth


def test_without_qcow2_tools_the_images_own_tables_give_the_same_figures(qcow2_demo, tmp_path):
    host = qcow2_demo
    chain(host, file_sr_dir(host, "local"), [(0, MIB)])
    settings = config.load(host.agent_conf)
    cache = inspection.BitmapCache()
    first = inspection.inspect(settings, bitmaps=cache)
    no_tools = tmp_path / "agent.conf"
    text = open(host.agent_conf).read().replace("[tools]\n", "[tools]\nqemu_img = /nonexistent/qemu-img\n", 1)
    text = re.sub(r"(?m)^qcow2_helper = .*$", "qcow2_helper = /nonexistent/qcow2_helper", text)
    no_tools.write_text(text)
    own = inspection.inspect(config.load(str(no_tools)), bitmaps=inspection.BitmapCache())
    figures = [[(vdi.uuid, vdi.state, vdi.reclaimable_bytes) for vdi in sr.vdis] for sr in first.srs]
    assert figures == [[(vdi.uuid, vdi.state, vdi.reclaimable_bytes) for vdi in sr.vdis] for sr in own.srs]
    assert len(cache) >= 1


def hostile_image(directory, name, change):
    path = os.path.join(directory, name + ".qcow2")
    create(path, 16 * MIB)
    with open(path, "r+b") as handle:
        change(handle)
    return path


def test_hostile_qcow2_images_are_each_a_reason_never_a_crash_nor_a_write(qcow2_demo):
    host = qcow2_demo
    directory = file_sr_dir(host, "local")
    names = {kind: new_uuid() for kind in ("truncated", "feature", "outside", "loop_a", "loop_b", "mixed")}

    def backing(name):
        def change(handle):
            encoded = name.encode()
            handle.seek(8)
            handle.write(struct.pack(">QI", 65536 - 512, len(encoded)))
            handle.seek(65536 - 512)
            handle.write(encoded)
        return change

    hostile_image(directory, names["truncated"], lambda handle: handle.truncate(40))
    hostile_image(directory, names["feature"],
                  lambda handle: (handle.seek(72), handle.write(struct.pack(">Q", 1 << 20))))
    hostile_image(directory, names["outside"], backing("../../etc/" + new_uuid() + ".qcow2"))
    hostile_image(directory, names["loop_a"], backing(names["loop_b"] + ".qcow2"))
    hostile_image(directory, names["loop_b"], backing(names["loop_a"] + ".qcow2"))
    vhd = next(name for name in os.listdir(directory) if name.endswith(".vhd"))
    hostile_image(directory, names["mixed"], backing(vhd))
    for kind, image in names.items():
        add_vdi(host, "local", image, kind, 16 * MIB)
    contents = {name: digest(os.path.join(directory, name)) for name in os.listdir(directory)}
    result = inspection.inspect(config.load(host.agent_conf))
    local = next(sr for sr in result.srs if sr.uuid == host.srs["local"])
    vdis = {vdi.name: vdi for vdi in local.vdis if vdi.format == model.QCOW2}
    reasons = {kind: (vdis[kind].state, vdis[kind].reason) for kind in names}
    assert all(state == model.SCAN_ERROR for state, _ in reasons.values()), reasons
    assert "header cut short: 40 of 72 bytes" in reasons["truncated"][1]
    assert "unknown incompatible feature bits 0x100000: left alone" in reasons["feature"][1]
    assert "lies outside the SR" in reasons["outside"][1]
    assert reasons["loop_a"][1] == reasons["loop_b"][1] == "its parent chain loops back on itself"
    assert "a chain is one format: this QCOW2 image's parent" in reasons["mixed"][1]
    assert {name: digest(os.path.join(directory, name)) for name in os.listdir(directory)} == contents


# ---- end to end on the simulated host's `qcow2` scenario ------------------------------------------

@pytest.fixture
def qcow2_host(sim_host):
    if "qcow2" not in scenarios.names():
        pytest.skip("the simulated host has no `qcow2` scenario")
    require_tool("qemu-img")
    return sim_host("qcow2")


def report_json(host):
    process = subprocess.Popen(agent_command(host, "--report", "--json"), cwd=REPOSITORY, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, universal_newlines=True)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    return json.loads(stdout)


def qcow2_images(document):
    """{VDI uuid: SR uuid} of the readable QCOW2 images (the hostile ones left out: no tool may follow
    a backing loop)."""
    return {vdi["uuid"]: sr["uuid"] for sr in document["srs"] for vdi in sr["vdis"]
            if vdi["format"] == "qcow2" and vdi["state"] not in (model.SCAN_ERROR, model.ORPHAN)}


@contextlib.contextmanager
def readable(host, sr_uuid, vdi_uuid):
    """The image's path; on an LVM SR its chain is held active for the look, as a test may (the agent
    never activates an LV)."""
    store = host.store(next(key for key, uuid in host.srs.items() if uuid == sr_uuid))
    names = [store.lv_name(uuid) for uuid in store.chain(vdi_uuid)] if store.lvm else []
    if names:
        store.vg.activate(names, "test")
    try:
        yield store.path(vdi_uuid)
    finally:
        if names:
            store.vg.deactivate(names, "test")


def test_report_names_every_qcow2_vdi_with_its_state_and_estimate(qcow2_host):
    document = report_json(qcow2_host)
    vdis = [vdi for sr in document["srs"] for vdi in sr["vdis"]]
    assert all(vdi["format"] in ("vhd", "qcow2", "raw") for vdi in vdis)
    qcow2 = [vdi for vdi in vdis if vdi["format"] == "qcow2"]
    assert qcow2 and all(vdi["state"] in model.STATES for vdi in qcow2)
    assert all(vdi["reason"] for vdi in qcow2 if vdi["state"] != model.LEAF_COALESCEABLE)
    assert [vdi for vdi in qcow2 if vdi["state"] == model.LEAF_COALESCEABLE and vdi["reclaimable_bytes"] > 0]
    for sr in document["srs"]:   # mixed SRs: VHD and QCOW2 add up, nothing counted twice
        assert sr["reclaimable_bytes"] == sum(vdi["reclaimable_bytes"] for vdi in sr["vdis"])


def test_now_frees_each_qcow2_estimate_and_keeps_every_guest_disk(qcow2_host, tmp_path):
    before = report_json(qcow2_host)
    images = qcow2_images(before)
    visible = {vdi["uuid"] for sr in before["srs"] for vdi in sr["vdis"] if not vdi["hidden"]}
    saved = {}
    for vdi_uuid, sr_uuid in sorted(images.items()):
        if vdi_uuid not in visible:
            continue
        saved[vdi_uuid] = str(tmp_path / (vdi_uuid + ".raw"))
        with readable(qcow2_host, sr_uuid, vdi_uuid) as path:
            subprocess.check_call(["qemu-img", "convert", "-U", "-O", "raw", path, saved[vdi_uuid]])
    chains = {vdi["uuid"]: vdi["chain_length"] for sr in before["srs"] for vdi in sr["vdis"]}
    lvm = {vdi["uuid"] for sr in before["srs"] if sr["type"] in inspection.LVM_SR_TYPES for vdi in sr["vdis"]}
    assert saved.keys() & lvm and saved.keys() - lvm   # guest contents kept on both kinds of SR
    configure(qcow2_host, max_freeze_seconds=60)
    code, document, stderr = run_now(qcow2_host, timeout=600)
    assert code == 0, stderr
    runs = [run for run in document["runs"] if run.get("format") == "qcow2"]
    assert runs and all(run["result"] == "success" for run in runs), runs
    after = report_json(qcow2_host)
    lengths = {vdi["uuid"]: vdi["chain_length"] for sr in after["srs"] for vdi in sr["vdis"]}
    for run in runs:
        slack = 4 * MIB if run["vdi_uuid"] in lvm else CLUSTER
        assert lengths[run["vdi_uuid"]] < chains[run["vdi_uuid"]]
        if lengths[run["vdi_uuid"]] == chains[run["vdi_uuid"]] - 1:
            assert abs(run["reclaimed_bytes"] - run["estimated_bytes"]) <= slack, run
        else:   # the GC also merged a hidden parent of the chain: more is freed than the leaf's estimate
            assert run["reclaimed_bytes"] >= run["estimated_bytes"] - slack, run
    for vdi_uuid, sr_uuid in sorted(qcow2_images(after).items()):
        with readable(qcow2_host, sr_uuid, vdi_uuid) as path:
            subprocess.check_call(["qemu-img", "check", "-U", path], stdout=subprocess.DEVNULL)
            if vdi_uuid in saved:
                subprocess.check_call(["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", saved[vdi_uuid], path],
                                      stdout=subprocess.DEVNULL)
    assert set(saved) <= set(qcow2_images(after))
    shutil.rmtree(str(tmp_path), ignore_errors=True)
