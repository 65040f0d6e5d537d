"""The simulated xapi's object database: records per class, change generations for event.from, and the
registries the rest of the simulated host plugs into (plugins, SR.scan handlers, faults, downtime).

Thread-safe: every method takes `db.lock` (re-entrant); hold it yourself to make several changes atomic.
"""
import collections
import contextlib
import copy
import threading
import time
import uuid as uuidlib

from . import schema, vm, wire
from .downtime import DowntimeLog
from .errors import XapiError
from .faults import Faults

Change = collections.namedtuple("Change", "generation operation cls ref")

# Fields xapi computes from the rest of the record.
DERIVED = {"VM": lambda record: {"allowed_operations": vm.allowed_operations(record)}}


def _derive(cls, record):
    if cls in DERIVED:
        record.update(DERIVED[cls](record))


class Database(object):
    def __init__(self):
        self.lock = threading.RLock()
        self._changed = threading.Condition(self.lock)
        self._tables = {cls: collections.OrderedDict() for cls in schema.CLASSES}
        self._by_uuid = {cls: {} for cls in schema.CLASSES}
        self._stamps = {}
        self._deleted = []
        self._wakeups = 0
        self._last_domid = 0
        self.generation = 0
        self.faults = Faults()
        self.downtime_log = DowntimeLog()
        self._plugins = {}
        self._sr_scan_handlers = []
        self._power_handlers = []

    # ---- objects -------------------------------------------------------------------------------

    def create(self, class_name, ref=None, **fields):
        """A new object with defaults for the fields not given; returns its ref ("OpaqueRef:<uuid>")."""
        cls = class_name
        chosen_ref = ref is not None
        ref = ref or "OpaqueRef:" + str(uuidlib.uuid4())
        with self.lock:
            record = schema.defaults(cls)
            record["uuid"] = str(uuidlib.uuid4())
            record.update(self._checked(cls, fields))
            if self._classes_of(ref) or record["uuid"] in self._by_uuid[cls]:
                raise ValueError("{} {} (uuid {}) already exists".format(cls, ref, record["uuid"]))
            _derive(cls, record)
            for (source, name), (target, back) in schema.RELATIONS.items():
                if target == cls and chosen_ref:
                    record[back] = [r for r, other in self._tables[source].items() if other[name] == ref]
            generation = self._next_generation()
            self._tables[cls][ref] = record
            self._by_uuid[cls][record["uuid"]] = ref
            self._stamps[ref] = [generation, generation]
            self._link(cls, ref, {}, record, generation)
            self._record_downtime(cls, ref, None, record)
            return ref

    def update(self, class_name, ref, **fields):
        """Set several fields of one object in one change (one "mod" event)."""
        cls = class_name
        with self.lock:
            record = self._record(cls, ref)
            checked = self._checked(cls, fields)
            new_uuid = checked.get("uuid", record["uuid"])
            if new_uuid != record["uuid"]:
                if new_uuid in self._by_uuid[cls]:
                    raise ValueError("{} uuid {} already exists".format(cls, new_uuid))
                del self._by_uuid[cls][record["uuid"]]
                self._by_uuid[cls][new_uuid] = ref
            old = copy.deepcopy(record)
            record.update(checked)
            _derive(cls, record)
            generation = self._next_generation()
            self._stamps[ref][1] = generation
            self._link(cls, ref, old, record, generation)
            self._record_downtime(cls, ref, old, record)

    def set(self, cls, ref, name, value):
        self.update(cls, ref, **{name: value})

    def destroy(self, cls, ref):
        with self.lock:
            record = self._record(cls, ref)
            generation = self._next_generation()
            del self._tables[cls][ref]
            del self._by_uuid[cls][record["uuid"]]
            created = self._stamps.pop(ref)[0]
            self._deleted.append((generation, cls, ref, created))
            self._link(cls, ref, record, {}, generation)
            self._record_downtime(cls, ref, record, None)

    def get(self, cls, ref):
        """A copy of the record; HANDLE_INVALID [cls, ref] if there is no such object."""
        with self.lock:
            return copy.deepcopy(self._record(cls, ref))

    def get_field(self, cls, ref, name):
        with self.lock:
            return copy.deepcopy(self._record(cls, ref)[name])

    def exists(self, cls, ref):
        with self.lock:
            return isinstance(ref, str) and ref in self._tables[cls]

    def all(self, cls):
        with self.lock:
            return list(self._tables[cls])

    def records(self, cls):
        """{ref: record copy} of every object of the class."""
        with self.lock:
            return copy.deepcopy(dict(self._tables[cls]))

    def find(self, cls, **criteria):
        """Refs of the objects whose fields equal all the criteria, e.g. find("VDI", location=uuid)."""
        with self.lock:
            return [ref for ref, record in self._tables[cls].items()
                    if all(record[name] == value for name, value in criteria.items())]

    def ref_of(self, cls, uuid):
        """The ref of the object with this uuid; UUID_INVALID [cls, uuid] if none."""
        with self.lock:
            ref = self._by_uuid[cls].get(uuid) if isinstance(uuid, str) else None
        if ref is None:
            raise XapiError("UUID_INVALID", cls, uuid)
        return ref

    def add_to_map(self, cls, ref, name, key, value):
        """xapi's add_to_<map>: MAP_DUPLICATE_KEY [cls, field, ref, key] if the key is there."""
        with self.lock:
            current = self.get_field(cls, ref, name)
            if key in current:
                raise XapiError("MAP_DUPLICATE_KEY", cls, name, ref, key)
            current[key] = value
            self.set(cls, ref, name, current)

    def remove_from_map(self, cls, ref, name, key):
        with self.lock:
            current = self.get_field(cls, ref, name)
            if key in current:
                del current[key]
                self.set(cls, ref, name, current)

    def add_to_set(self, cls, ref, name, value):
        with self.lock:
            current = self.get_field(cls, ref, name)
            if value not in current:
                self.set(cls, ref, name, current + [value])

    def remove_from_set(self, cls, ref, name, value):
        with self.lock:
            current = self.get_field(cls, ref, name)
            if value in current:
                self.set(cls, ref, name, [v for v in current if v != value])

    def next_domid(self):
        with self.lock:
            self._last_domid += 1
            return self._last_domid

    # ---- events --------------------------------------------------------------------------------

    def changes_since(self, generation):
        """Changes after `generation`, oldest first: one per object, "add" if it was created since,
        "mod" if only modified, "del" if it existed before and is gone."""
        with self.lock:
            changes = []
            for cls, table in self._tables.items():
                for ref in table:
                    created, modified = self._stamps[ref]
                    if created > generation:
                        changes.append(Change(created, "add", cls, ref))
                    elif modified > generation:
                        changes.append(Change(modified, "mod", cls, ref))
            for deleted, cls, ref, created in self._deleted:
                if deleted > generation and created <= generation:
                    changes.append(Change(deleted, "del", cls, ref))
            return sorted(changes)

    def wait_for_change(self, generation, deadline):
        """Block until the generation passes `generation`, `deadline` (time.monotonic()) passes, or
        wake_waiters() is called. Returns True if the generation moved."""
        with self.lock:
            wakeups = self._wakeups
            while self.generation <= generation and self._wakeups == wakeups:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            return self.generation > generation

    def wake_waiters(self):
        """Release every blocked event.from (a stopping server)."""
        with self.lock:
            self._wakeups += 1
            self._changed.notify_all()

    def counts(self):
        with self.lock:
            return {cls: len(table) for cls, table in self._tables.items()}

    # ---- VM downtime ---------------------------------------------------------------------------

    def freeze_io(self, vm_uuid):
        """The VM's disk I/O stops (a paused tapdisk); recorded as an "io-frozen" downtime interval."""
        self.downtime_log.freeze(vm_uuid)

    def thaw_io(self, vm_uuid):
        self.downtime_log.thaw(vm_uuid)

    @contextlib.contextmanager
    def io_frozen(self, vm_uuid):
        self.freeze_io(vm_uuid)
        try:
            yield
        finally:
            self.thaw_io(vm_uuid)

    def downtime(self, vm_uuid):
        """[Interval(kind, start, end)] for the VM: "paused", "suspended", "io-frozen"; monotonic seconds."""
        return self.downtime_log.intervals(vm_uuid)

    # ---- extension points ----------------------------------------------------------------------

    def register_plugin(self, plugin, fn, handler):
        """host.call_plugin(host, plugin, fn, args) calls handler(host_ref, args) -> str. A XapiError it
        raises reaches the client as is; any other exception as XENAPI_PLUGIN_FAILURE [fn, type, message]."""
        with self.lock:
            self._plugins[(plugin, fn)] = handler

    def plugin_handler(self, plugin, fn):
        """The handler, or XENAPI_MISSING_PLUGIN / UNKNOWN_XENAPI_PLUGIN_FUNCTION."""
        with self.lock:
            if not any(name == plugin for name, _ in self._plugins):
                raise XapiError("XENAPI_MISSING_PLUGIN", plugin)
            handler = self._plugins.get((plugin, fn))
        if handler is None:
            raise XapiError("UNKNOWN_XENAPI_PLUGIN_FUNCTION", fn)
        return handler

    def register_sr_scan(self, handler):
        """SR.scan(sr) calls handler(sr_ref) for every registered handler, in order."""
        with self.lock:
            self._sr_scan_handlers.append(handler)

    def sr_scan_handlers(self):
        with self.lock:
            return list(self._sr_scan_handlers)

    def register_power_handler(self, handler):
        """A VM power operation that changed the VM's power state calls handler(vm_ref) once it has
        ended, outside the database lock (the storage manager (de)activates the VM's disks)."""
        with self.lock:
            self._power_handlers.append(handler)

    def power_changed(self, vm_ref):
        with self.lock:
            handlers = list(self._power_handlers)
        for handler in handlers:
            handler(vm_ref)

    # ---- internals -----------------------------------------------------------------------------

    def _record(self, cls, ref):
        try:
            return self._tables[cls][ref]
        except (KeyError, TypeError):
            raise XapiError("HANDLE_INVALID", cls, ref) from None

    def _classes_of(self, ref):
        return [cls for cls, table in self._tables.items() if ref in table]

    def _checked(self, cls, fields):
        checked = {}
        for name, value in fields.items():
            f = schema.field(cls, name)
            if f is None:
                raise ValueError("{} has no field {}".format(cls, name))
            if schema.is_back_reference(cls, name):
                raise ValueError("{}.{} follows the references that point to it; set those".format(cls, name))
            checked[name] = wire.decode(f, value)
        return checked

    def _next_generation(self):
        self.generation += 1
        self._changed.notify_all()
        return self.generation

    def _link(self, cls, ref, old, new, generation):
        """Keep back-reference sets (SR.VDIs, VM.VBDs, ...) in step with a changed forward reference."""
        for (source, name), (target, back) in schema.RELATIONS.items():
            if source != cls or old.get(name) == new.get(name):
                continue
            for other, add in ((old.get(name), False), (new.get(name), True)):
                record = self._tables[target].get(other)
                if record is None:
                    continue
                if add:
                    record[back].append(ref)
                elif ref in record[back]:
                    record[back].remove(ref)
                self._stamps[other][1] = generation

    def _record_downtime(self, cls, ref, old, new):
        """Open or close VM downtime intervals after a change (old or new is None on create or destroy)."""
        if cls != "VM":
            return
        record = new if new is not None else old
        kind = vm.downtime_kind(new) if new is not None else None
        if old is None or new is None or kind != vm.downtime_kind(old):
            self.downtime_log.power_kind_changed(record["uuid"], kind)
