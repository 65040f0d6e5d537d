"""What a run asks of an inspection about a VDI's chain: is it shorter than planned, is nothing
left to leaf-coalesce, how many bytes does its own part hold. Pure: comparing the answers before
and after a run verifies it and measures what it freed."""
from .. import model


def find_vdi(inspection, vdi_uuid):
    """(SrReport, VdiReport) of the VDI, or (None, None) when the inspection does not show it."""
    for sr in inspection.srs or ():
        for vdi in sr.vdis or ():
            if vdi.uuid == vdi_uuid:
                return sr, vdi
    return None, None


def own_chain_bytes(inspection, sr_uuid, vdi_uuid):
    """Physical bytes of the VDI's own part of its chain: the VHD and every ancestor up to (not
    including) one that other VHDs share. A leaf coalesce, and the GC's merges below it, only
    change this part; comparing it before and after gives the bytes a run freed."""
    reports = {}
    children = {}
    for sr in inspection.srs or ():
        if sr.uuid == sr_uuid:
            for vdi in sr.vdis or ():
                reports[vdi.uuid] = vdi
                children[vdi.parent_uuid] = children.get(vdi.parent_uuid, 0) + 1
    total = 0
    current = reports.get(vdi_uuid)
    while current is not None:
        total += current.physical_bytes or 0
        parent = reports.get(current.parent_uuid) if current.parent_uuid else None
        if parent is None or children.get(parent.uuid, 0) != 1:
            break
        current = parent
    return total


def sr_free_bytes(inspection, sr_uuid):
    for sr in inspection.srs or ():
        if sr.uuid == sr_uuid:
            return sr.free_bytes or 0
    return 0


def shortened(inspection, entry):
    """The planned entry's chain is shorter than when it was planned."""
    _, report = find_vdi(inspection, entry.vdi_uuid)
    return report is not None and report.chain_length < entry.chain_length


def merged(inspection, entry):
    """The chain is shorter and nothing is left to leaf-coalesce (a GC merging only a hidden parent
    also shortens it, but leaves the leaf leaf-coalesceable)."""
    _, report = find_vdi(inspection, entry.vdi_uuid)
    return shortened(inspection, entry) and report.state != model.LEAF_COALESCEABLE


def vm_vdis(inspection, vm_uuid):
    """UUIDs of the VDIs the inspection shows in use by the VM (none for an empty `vm_uuid`)."""
    return {vdi.uuid for sr in inspection.srs or () for vdi in sr.vdis or () if vm_uuid and vdi.vm_uuid == vm_uuid}
