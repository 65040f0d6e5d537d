"""The host facts read only the fields of xapi's records that the planner reads, with the values xapi
gives: on a simulated host, against the full records and through a plan that refuses any other field."""
import pytest

from tests.dom0sim.scenarios import delete_snapshot, disk, pool, snapshot, sr, vm, write
from xcoalesce_agent import config
from xcoalesce_agent.reclaim import facts, planner, plans
from xcoalesce_agent.inspect import inspection, xapi

MERGED_SNAPSHOT = [write(0, 2), snapshot("s"), write(2, 2), delete_snapshot("s")]


def varied_pool():
    """Records whose planner fields are not all defaults: tags, HA, flags, maps, both power states."""
    srs = [sr("ext", "ext", 64, other_config={"gc": "true"}), sr("lvm", "lvm", 64)]
    vms = [vm("app", [disk("app-root", "lvm", 8, steps=MERGED_SNAPSHOT),
                      disk("app-data", "ext", 8, steps=MERGED_SNAPSHOT, other_config={"xcoalesce-exclude": "no"})]),
           vm("ha", [disk("ha-root", "ext", 8, steps=MERGED_SNAPSHOT)], ha_restart_priority="restart", tags=("prod",)),
           vm("off", [disk("off-root", "ext", 8, steps=MERGED_SNAPSHOT, on_boot="reset"),
                      disk("off-cached", "ext", 8, steps=MERGED_SNAPSHOT, allow_caching=True)], power_state="Halted")]
    return pool("varied", srs, vms)


@pytest.fixture
def varied(sim_host):
    host = sim_host(varied_pool())
    settings = config.load(host.agent_conf)
    with xapi.open_session(settings) as session:
        yield settings, session


def test_records_hold_exactly_the_listed_fields_with_xapi_values(varied):
    settings, session = varied
    gathered = facts.gather_facts(settings, session, [])
    for name, fields, records in (("VM", facts.VM_FIELDS, gathered.vms), ("VDI", facts.VDI_FIELDS, gathered.vdis),
                                  ("SR", facts.SR_FIELDS, gathered.srs)):
        full = getattr(session.xenapi, name).get_all_records().values()
        assert records == {record["uuid"]: {field: record[field] for field in fields} for record in full}, name
    assert {vm["ha_restart_priority"] for vm in gathered.vms.values()} >= {"restart", ""}
    assert any(vm["tags"] for vm in gathered.vms.values())
    assert {vdi["on_boot"] for vdi in gathered.vdis.values()} == {"persist", "reset"}
    assert {vdi["allow_caching"] for vdi in gathered.vdis.values()} == {False, True}
    assert {vm["power_state"] for vm in gathered.vms.values()} >= {"Running", "Halted"}


class ListedFieldsOnly(dict):
    """A record that fails a test when code asks it for a field it does not hold, even with a default."""

    def get(self, key, default=None):
        assert key in self, "field {!r} read but not gathered".format(key)
        return dict.get(self, key, default)

    def __getitem__(self, key):
        assert key in self, "field {!r} read but not gathered".format(key)
        return dict.__getitem__(self, key)


def test_planning_reads_no_field_beyond_the_lists(varied):
    settings, session = varied
    inspected = inspection.inspect(settings)
    gathered = facts.gather_facts(settings, session, [sr_report.uuid for sr_report in inspected.srs])
    for records in (gathered.vms, gathered.vdis, gathered.srs):
        records.update((uuid, ListedFieldsOnly(record)) for uuid, record in records.items())
    entries = {entry.vdi_name: entry for entry in planner.plan(inspected, gathered, planner.Policy())}
    assert plans.PLUGIN in entries["app-root"].fallbacks  # every check and every strategy weighed
    assert entries["app-data"].result == plans.PLANNED
    assert entries["ha-root"].reason.startswith("VM is HA-protected (ha_restart_priority=restart)")
