"""Hand-built inspections for the exporter's tests and the scrape benchmark (no host needed)."""
import uuid

from xcoalesce_agent import model

HOST = {"uuid": "0c3d5c4e-6a2b-4c1e-9d7f-3b2a1c0d9e8f", "name": "xen-01", "product_version": "8.2.1"}
SR_UUID = "a1b2c3d4-0000-4000-8000-000000000001"
MiB = 1 << 20


def vdi(state, chain_length=2, reclaimable_bytes=0, vm_name="web-01", hidden=False, **fields):
    values = dict(uuid=str(uuid.uuid4()), name="disk", vm_uuid=str(uuid.uuid4()), vm_name=vm_name,
                  chain_length=chain_length, state=state, reason="" if reclaimable_bytes else "not reclaimable",
                  reclaimable_bytes=reclaimable_bytes, merge_bytes=reclaimable_bytes,
                  merge_free_bytes=reclaimable_bytes, physical_bytes=8 * MiB, virtual_size_bytes=64 * MiB,
                  parent_uuid="", hidden=hidden)
    values.update(fields)
    return model.VdiReport(**values)


def sr(vdis, uuid_=SR_UUID, name="Local storage", type_="ext", **fields):
    values = dict(uuid=uuid_, name=name, type=type_, shared=False, size_bytes=64 << 30, free_bytes=32 << 30,
                  reclaimable_bytes=sum(item.reclaimable_bytes for item in vdis),
                  gc_pending_bytes=6 * MiB, merge_free_bytes=max([item.merge_free_bytes or 0 for item in vdis] + [0]),
                  longest_chain=max([item.chain_length for item in vdis] + [0]), gc_running=False,
                  gc_running_seconds=0, skipped_vdis=0, errors=[], vdis=vdis)
    values.update(fields)
    return model.SrReport(**values)


def inspection(srs, errors=(), host=None, started=1700000000.0):
    return model.Inspection(host=dict(host or HOST), started=started, duration_seconds=0.25, srs=list(srs),
                            skipped_srs=[], errors=list(errors))


def small_inspection(vm_name="web-01"):
    """One SR: a leaf-coalesceable VDI, its hidden parent, a plain leaf, a snapshot and a garbage VHD."""
    return inspection([sr([
        vdi(model.LEAF_COALESCEABLE, chain_length=2, reclaimable_bytes=4 * MiB, vm_name=vm_name),
        vdi(model.HIDDEN_PARENT, chain_length=1, vm_uuid="", vm_name="", hidden=True),
        vdi(model.LEAF, chain_length=1, vm_name="db-01"),
        vdi(model.SNAPSHOT, chain_length=2, vm_uuid="", vm_name=""),
        vdi(model.GARBAGE, chain_length=1, vm_uuid="", vm_name="", hidden=True),
    ])])


def large_inspection(vdi_count, sr_count=10):
    """`vdi_count` VHDs over `sr_count` SRs, a realistic mix of states (a third leaf-coalesceable)."""
    states = (model.LEAF_COALESCEABLE, model.HIDDEN_PARENT, model.LEAF, model.SNAPSHOT_PRESENT,
              model.SNAPSHOT, model.LEAF_COALESCEABLE)
    srs = []
    for sr_index in range(sr_count):
        vdis = []
        for index in range(vdi_count // sr_count):
            state = states[index % len(states)]
            vdis.append(vdi(state, chain_length=2 + index % 5,
                            reclaimable_bytes=(index + 1) * MiB if state == model.LEAF_COALESCEABLE else 0,
                            vm_name="vm-{:05d}".format(index), hidden=state == model.HIDDEN_PARENT))
        srs.append(sr(vdis, uuid_=str(uuid.uuid4()), name="SR {}".format(sr_index), type_="lvm"))
    return inspection(srs)
