"""The classes the simulated xapi serves: their fields, types, defaults and which ones clients may set.

One table drives everything: record defaults, getters, setters, map and set operations, the wire
encoding of each field and the back-reference sets xapi keeps (SR.VDIs, VM.VBDs, ...).
"""
import collections
import copy
import datetime

NULL_REF = "OpaqueRef:NULL"
EPOCH = datetime.datetime(1970, 1, 1)

# Field kinds: str (also enums), int (64-bit: a string on the wire), float, bool, ref, refs (set of
# refs), strs (set of strings), ints (set of 64-bit ints), map (string -> string), date.
KIND_DEFAULTS = {
    "str": "", "int": 0, "float": 0.0, "bool": False, "ref": NULL_REF,
    "refs": [], "strs": [], "ints": [], "map": {}, "date": EPOCH,
}

Field = collections.namedtuple("Field", "name kind default writable")


def _f(name, kind, default=None, rw=False):
    return Field(name, kind, KIND_DEFAULTS[kind] if default is None else default, rw)


def _named(rw=True):
    return [_f("uuid", "str"), _f("name_label", "str", rw=rw), _f("name_description", "str", rw=rw)]


def _operations():
    return [_f("allowed_operations", "strs"), _f("current_operations", "map")]


SOFTWARE_VERSION = {
    "product_brand": "XCP-ng", "product_version": "8.2.1", "product_version_text": "8.2",
    "product_version_text_short": "8.2", "platform_name": "XCP", "platform_version": "3.2.1",
    "build_number": "release/yangtze/master/58", "xapi": "1.20", "xen": "4.13.5-9.40",
    "linux": "4.19.0+1", "xencenter_min": "2.16", "xencenter_max": "2.16", "network_backend": "openvswitch",
    "db_schema": "5.602",
}

CLASSES = collections.OrderedDict([
    ("session", [
        _f("uuid", "str"), _f("this_host", "ref"), _f("this_user", "ref"), _f("last_active", "date"),
        _f("pool", "bool"), _f("other_config", "map", rw=True), _f("is_local_superuser", "bool", True),
        _f("subject", "ref"), _f("validation_time", "date"), _f("auth_user_sid", "str"),
        _f("auth_user_name", "str"), _f("rbac_permissions", "strs"), _f("tasks", "refs"),
        _f("parent", "ref"), _f("originator", "str"), _f("client_certificate", "bool"),
    ]),
    ("pool", [
        _f("uuid", "str"), _f("name_label", "str", rw=True), _f("name_description", "str", rw=True),
        _f("master", "ref"), _f("default_SR", "ref", rw=True), _f("suspend_image_SR", "ref", rw=True),
        _f("crash_dump_SR", "ref", rw=True), _f("other_config", "map", rw=True), _f("ha_enabled", "bool"),
        _f("ha_configuration", "map"), _f("ha_statefiles", "strs"), _f("ha_host_failures_to_tolerate", "int", rw=True),
        _f("ha_plan_exists_for", "int"), _f("ha_allow_overcommit", "bool", rw=True), _f("ha_overcommitted", "bool"),
        _f("blobs", "map"), _f("tags", "strs", rw=True), _f("gui_config", "map", rw=True),
        _f("health_check_config", "map", rw=True), _f("wlb_url", "str"), _f("wlb_username", "str"),
        _f("wlb_enabled", "bool", rw=True), _f("wlb_verify_cert", "bool", rw=True),
        _f("redo_log_enabled", "bool"), _f("redo_log_vdi", "ref"), _f("vswitch_controller", "str"),
        _f("restrictions", "map"), _f("metadata_VDIs", "refs"), _f("ha_cluster_stack", "str", "xhad"),
    ] + _operations() + [
        _f("guest_agent_config", "map"), _f("cpu_info", "map"), _f("policy_no_vendor_device", "bool", rw=True),
        _f("live_patching_disabled", "bool", rw=True), _f("igmp_snooping_enabled", "bool"),
        _f("uefi_certificates", "str"), _f("is_psr_pending", "bool"), _f("tls_verification_enabled", "bool"),
        _f("repositories", "refs"), _f("client_certificate_auth_enabled", "bool"),
        _f("client_certificate_auth_name", "str"), _f("repository_proxy_url", "str"),
        _f("repository_proxy_username", "str"), _f("migration_compression", "bool", rw=True),
        _f("coordinator_bias", "bool", True, rw=True),
    ]),
    ("host", _named() + [
        _f("memory_overhead", "int"),
    ] + _operations() + [
        _f("API_version_major", "int", 2), _f("API_version_minor", "int", 16),
        _f("API_version_vendor", "str", "XenSource"), _f("API_version_vendor_implementation", "map"),
        _f("enabled", "bool", True), _f("software_version", "map", SOFTWARE_VERSION),
        _f("other_config", "map", rw=True), _f("capabilities", "strs"), _f("cpu_configuration", "map"),
        _f("sched_policy", "str", "credit"), _f("supported_bootloaders", "strs", ["pygrub", "eliloader"]),
        _f("resident_VMs", "refs"), _f("logging", "map", rw=True), _f("PIFs", "refs"),
        _f("suspend_image_sr", "ref", rw=True), _f("crash_dump_sr", "ref", rw=True), _f("crashdumps", "refs"),
        _f("patches", "refs"), _f("updates", "refs"), _f("PBDs", "refs"), _f("host_CPUs", "refs"),
        _f("cpu_info", "map"), _f("hostname", "str"), _f("address", "str", rw=True), _f("metrics", "ref"),
        _f("license_params", "map"), _f("ha_statefiles", "strs"), _f("ha_network_peers", "strs"),
        _f("blobs", "map"), _f("tags", "strs", rw=True), _f("external_auth_type", "str"),
        _f("external_auth_service_name", "str"), _f("external_auth_configuration", "map"),
        _f("edition", "str", "xcp-ng"), _f("license_server", "map", rw=True), _f("bios_strings", "map"),
        _f("power_on_mode", "str"), _f("power_on_config", "map"), _f("local_cache_sr", "ref"),
        _f("chipset_info", "map"), _f("PCIs", "refs"), _f("PGPUs", "refs"), _f("PUSBs", "refs"),
        _f("ssl_legacy", "bool"), _f("guest_VCPUs_params", "map", rw=True), _f("display", "str", "enabled"),
        _f("virtual_hardware_platform_versions", "ints", [0, 1, 2]), _f("control_domain", "ref"),
        _f("updates_requiring_reboot", "refs"), _f("features", "refs"), _f("iscsi_iqn", "str"),
        _f("multipathing", "bool"), _f("uefi_certificates", "str"), _f("certificates", "refs"),
        _f("editions", "strs", ["xcp-ng"]), _f("pending_guidances", "strs"),
        _f("tls_verification_enabled", "bool"), _f("last_software_update", "date"),
        _f("https_only", "bool"),
    ]),
    ("SR", _named() + _operations() + [
        _f("VDIs", "refs"), _f("PBDs", "refs"), _f("virtual_allocation", "int"),
        _f("physical_utilisation", "int"), _f("physical_size", "int"), _f("type", "str"),
        _f("content_type", "str"), _f("shared", "bool", rw=True), _f("other_config", "map", rw=True),
        _f("tags", "strs", rw=True), _f("sm_config", "map", rw=True), _f("blobs", "map"),
        _f("local_cache_enabled", "bool"), _f("introduced_by", "ref"), _f("clustered", "bool"),
        _f("is_tools_sr", "bool"),
    ]),
    ("PBD", [
        _f("uuid", "str"), _f("host", "ref"), _f("SR", "ref"), _f("device_config", "map"),
        _f("currently_attached", "bool"), _f("other_config", "map", rw=True),
    ]),
    ("VDI", _named() + _operations() + [
        _f("SR", "ref"), _f("VBDs", "refs"), _f("crash_dumps", "refs"), _f("virtual_size", "int"),
        _f("physical_utilisation", "int"), _f("type", "str", "user"), _f("sharable", "bool", rw=True),
        _f("read_only", "bool", rw=True), _f("other_config", "map", rw=True), _f("storage_lock", "bool"),
        _f("location", "str"), _f("managed", "bool", True), _f("missing", "bool"), _f("parent", "ref"),
        _f("xenstore_data", "map", rw=True), _f("sm_config", "map", rw=True), _f("is_a_snapshot", "bool"),
        _f("snapshot_of", "ref"), _f("snapshots", "refs"), _f("snapshot_time", "date"),
        _f("tags", "strs", rw=True), _f("allow_caching", "bool", rw=True), _f("on_boot", "str", "persist", rw=True),
        _f("metadata_of_pool", "ref"), _f("metadata_latest", "bool"), _f("is_tools_iso", "bool"),
        _f("cbt_enabled", "bool"),
    ]),
    ("VBD", [_f("uuid", "str")] + _operations() + [
        _f("VM", "ref"), _f("VDI", "ref"), _f("device", "str"), _f("userdevice", "str", rw=True),
        _f("bootable", "bool", rw=True), _f("mode", "str", "RW", rw=True), _f("type", "str", "Disk", rw=True),
        _f("unpluggable", "bool", True, rw=True), _f("storage_lock", "bool"), _f("empty", "bool"),
        _f("other_config", "map", rw=True), _f("currently_attached", "bool"), _f("status_code", "int"),
        _f("status_detail", "str"), _f("runtime_properties", "map"), _f("qos_algorithm_type", "str", rw=True),
        _f("qos_algorithm_params", "map", rw=True), _f("qos_supported_algorithms", "strs"), _f("metrics", "ref"),
    ]),
    ("VM", [_f("uuid", "str")] + _operations() + [
        _f("name_label", "str", rw=True), _f("name_description", "str", rw=True),
        _f("power_state", "str", "Halted"), _f("user_version", "int", 1, rw=True),
        _f("is_a_template", "bool", rw=True), _f("is_default_template", "bool"), _f("suspend_VDI", "ref"),
        _f("resident_on", "ref"), _f("scheduled_to_be_resident_on", "ref"), _f("affinity", "ref", rw=True),
        _f("memory_overhead", "int", 11534336), _f("memory_target", "int"),
        _f("memory_static_max", "int", 2147483648), _f("memory_dynamic_max", "int", 2147483648),
        _f("memory_dynamic_min", "int", 2147483648), _f("memory_static_min", "int", 1073741824),
        _f("VCPUs_params", "map", rw=True), _f("VCPUs_max", "int", 2), _f("VCPUs_at_startup", "int", 2),
        _f("actions_after_softreboot", "str", "soft_reboot", rw=True),
        _f("actions_after_shutdown", "str", "destroy", rw=True),
        _f("actions_after_reboot", "str", "restart", rw=True), _f("actions_after_crash", "str", "restart", rw=True),
        _f("consoles", "refs"), _f("VIFs", "refs"), _f("VBDs", "refs"), _f("VUSBs", "refs"),
        _f("crash_dumps", "refs"), _f("VTPMs", "refs"), _f("PV_bootloader", "str", rw=True),
        _f("PV_kernel", "str", rw=True), _f("PV_ramdisk", "str", rw=True), _f("PV_args", "str", rw=True),
        _f("PV_bootloader_args", "str", rw=True), _f("PV_legacy_args", "str", rw=True),
        _f("HVM_boot_policy", "str", "BIOS order", rw=True), _f("HVM_boot_params", "map", {"order": "cd"}, rw=True),
        _f("HVM_shadow_multiplier", "float", 1.0), _f("platform", "map", rw=True), _f("PCI_bus", "str"),
        _f("other_config", "map", rw=True), _f("domid", "int", -1), _f("domarch", "str"),
        _f("last_boot_CPU_flags", "map"), _f("is_control_domain", "bool"), _f("metrics", "ref"),
        _f("guest_metrics", "ref"), _f("last_booted_record", "str"), _f("recommendations", "str", rw=True),
        _f("xenstore_data", "map", rw=True), _f("ha_always_run", "bool"),
        _f("ha_restart_priority", "str", rw=True), _f("is_a_snapshot", "bool"), _f("snapshot_of", "ref"),
        _f("snapshots", "refs"), _f("snapshot_time", "date"), _f("transportable_snapshot_id", "str"),
        _f("blobs", "map"), _f("tags", "strs", rw=True), _f("blocked_operations", "map", rw=True),
        _f("snapshot_info", "map"), _f("snapshot_metadata", "str"), _f("parent", "ref"), _f("children", "refs"),
        _f("bios_strings", "map"), _f("protection_policy", "ref"), _f("is_snapshot_from_vmpp", "bool"),
        _f("snapshot_schedule", "ref"), _f("is_vmss_snapshot", "bool"), _f("appliance", "ref"),
        _f("start_delay", "int"), _f("shutdown_delay", "int"), _f("order", "int"), _f("VGPUs", "refs"),
        _f("attached_PCIs", "refs"), _f("suspend_SR", "ref", rw=True), _f("version", "int"),
        _f("generation_id", "str"), _f("hardware_platform_version", "int"), _f("has_vendor_device", "bool"),
        _f("requires_reboot", "bool"), _f("reference_label", "str"), _f("domain_type", "str", "hvm"),
        _f("NVRAM", "map"), _f("pending_guidances", "strs"),
    ]),
    ("task", _named(rw=False) + _operations() + [
        _f("created", "date"), _f("finished", "date"), _f("status", "str", "pending"),
        _f("resident_on", "ref"), _f("progress", "float"), _f("type", "str"), _f("result", "str"),
        _f("error_info", "strs"), _f("other_config", "map", rw=True), _f("subtask_of", "ref"),
        _f("subtasks", "refs"), _f("backtrace", "str", "()"),
    ]),
    ("message", [
        _f("uuid", "str"), _f("name", "str"), _f("priority", "int"), _f("cls", "str", "VM"),
        _f("obj_uuid", "str"), _f("timestamp", "date"), _f("body", "str"),
    ]),
])

# Classes whose changes event.from reports (xapi keeps sessions out of the event stream).
EVENT_CLASSES = [name for name in CLASSES if name != "session"]

# Back-references xapi derives from a forward reference: (class, ref field) -> (target class, set field).
RELATIONS = {
    ("VDI", "SR"): ("SR", "VDIs"),
    ("PBD", "SR"): ("SR", "PBDs"),
    ("PBD", "host"): ("host", "PBDs"),
    ("VBD", "VDI"): ("VDI", "VBDs"),
    ("VBD", "VM"): ("VM", "VBDs"),
    ("VM", "resident_on"): ("host", "resident_VMs"),
    ("VDI", "snapshot_of"): ("VDI", "snapshots"),
    ("VM", "snapshot_of"): ("VM", "snapshots"),
    ("VM", "parent"): ("VM", "children"),
    ("task", "subtask_of"): ("task", "subtasks"),
}
BACK_REFERENCES = set(RELATIONS.values())

FIELDS = {cls: collections.OrderedDict((f.name, f) for f in fields) for cls, fields in CLASSES.items()}


def field(cls, name):
    """The Field of `cls.name`, or None."""
    return FIELDS[cls].get(name)


def defaults(cls):
    """A fresh record of `cls` with every field at its default."""
    return {f.name: copy.deepcopy(f.default) for f in CLASSES[cls]}


def is_back_reference(cls, name):
    return (cls, name) in BACK_REFERENCES
