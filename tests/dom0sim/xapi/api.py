"""The XenAPI methods: one generic set per class from the schema, plus sessions, power operations, plugins,
SR.scan, messages, tasks and events. `Api.call(name, params)` returns the wire value or raises XapiError."""
import collections
import logging
import threading

from . import events, query, schema, tasks, vm, wire
from .errors import XapiError
from .schema import NULL_REF

LOG = logging.getLogger(__name__)

Method = collections.namedtuple("Method", "handler arities needs_session times_itself")
Context = collections.namedtuple("Context", "session task")

SUPERUSER = "root"
# message.create's class names and the classes they name.
MESSAGE_CLASSES = {"VM": "VM", "Host": "host", "SR": "SR", "Pool": "pool", "VDI": "VDI",
                   "VMPP": None, "VMSS": None, "PVS_proxy": None, "Certificate": None}
POWER_OPERATIONS = {
    "start": ("start_paused", "force"), "resume": ("start_paused", "force"),
    "clean_shutdown": (), "hard_shutdown": (), "clean_reboot": (), "hard_reboot": (),
    "suspend": (), "pause": (), "unpause": (),
}


def _method(handler, args, needs_session=True, times_itself=False):
    arities = {n + (1 if needs_session else 0) for n in (args if isinstance(args, tuple) else (args,))}
    return Method(handler, arities, needs_session, times_itself)


class Api(object):
    def __init__(self, db):
        self.db = db
        self._local_sessions = set()
        self.methods = {}
        for cls in schema.CLASSES:
            self._add_class_methods(cls)
        self._add_special_methods()

    def call(self, name, params):
        """Run one XML-RPC call; "Async.<method>" runs in the background and returns a task ref."""
        is_async = name.startswith("Async.")
        base = name[len("Async."):] if is_async else name
        method = self.methods.get(base)
        if method is None or (is_async and not method.needs_session):
            raise XapiError("MESSAGE_METHOD_UNKNOWN", name)
        if len(params) not in method.arities:
            raise XapiError("MESSAGE_PARAMETER_COUNT_MISMATCH", name, max(method.arities), len(params))
        if method.needs_session:
            session, args = params[0], params[1:]
            self._check_session(session)
        else:
            session, args = None, params
        self.db.faults.check_method(base)
        if is_async:
            return self._run_async(base, method, session, args)
        return self._run(base, method, Context(session, None), args)

    # ---- dispatch ------------------------------------------------------------------------------

    def _run(self, name, method, context, args):
        if not method.times_itself:
            self.db.faults.take_time(name)
        try:
            return method.handler(context, *args)
        except XapiError:
            raise
        except Exception as error:
            LOG.warning("%s failed: %s: %s", name, type(error).__name__, error)
            raise XapiError("INTERNAL_ERROR", "{}: {}".format(type(error).__name__, error)) from error

    def _run_async(self, name, method, session, args):
        task = tasks.create(self.db, "Async." + name)

        def work():
            try:
                result = self._run(name, method, Context(session, task), args)
            except XapiError as error:
                tasks.fail(self.db, task, error.details)
            else:
                tasks.succeed(self.db, task, result)
            tasks.destroy_if_asked(self.db, task)

        threading.Thread(target=work, name="xapi-" + name, daemon=True).start()
        return task

    def _check_session(self, session):
        if not isinstance(session, str) or not self.db.exists("session", session):
            raise XapiError("SESSION_INVALID", session)

    def _add(self, name, handler, args, **options):
        self.methods[name] = _method(handler, args, **options)

    # ---- generic per-class methods -------------------------------------------------------------

    def _add_class_methods(self, cls):
        db = self.db
        self._add(cls + ".get_all", lambda c: db.all(cls), 0)
        self._add(cls + ".get_all_records", lambda c: {
            ref: wire.encode_record(cls, record) for ref, record in db.records(cls).items()}, 0)
        self._add(cls + ".get_all_records_where", lambda c, expr: {
            ref: wire.encode_record(cls, record)
            for ref, record in query.select(cls, db.records(cls), expr).items()}, 1)
        self._add(cls + ".get_record", lambda c, ref: wire.encode_record(cls, db.get(cls, ref)), 1)
        self._add(cls + ".get_by_uuid", lambda c, uuid: db.ref_of(cls, uuid), 1)
        if "name_label" in schema.FIELDS[cls]:
            self._add(cls + ".get_by_name_label", lambda c, label: db.find(cls, name_label=label), 1)
        for f in schema.CLASSES[cls]:
            self._add_field_methods(cls, f)

    def _add_field_methods(self, cls, f):
        db = self.db
        name = f.name
        self._add("{}.get_{}".format(cls, name), lambda c, ref: wire.encode(f.kind, db.get_field(cls, ref, name)), 1)
        if not f.writable:
            return
        self._add("{}.set_{}".format(cls, name), lambda c, ref, value: db.set(cls, ref, name, value), 2)
        if f.kind == "map":
            self._add("{}.add_to_{}".format(cls, name), lambda c, ref, key, value: db.add_to_map(
                cls, ref, name, _string(name, key), _string(name, value)), 3)
            self._add("{}.remove_from_{}".format(cls, name),
                      lambda c, ref, key: db.remove_from_map(cls, ref, name, key), 2)
        elif f.kind == "strs":
            self._add("{}.add_{}".format(cls, name),
                      lambda c, ref, value: db.add_to_set(cls, ref, name, _string(name, value)), 2)
            self._add("{}.remove_{}".format(cls, name),
                      lambda c, ref, value: db.remove_from_set(cls, ref, name, value), 2)

    # ---- special methods -----------------------------------------------------------------------

    def _add_special_methods(self):
        db = self.db
        self._add("session.login_with_password", self._login, (2, 3, 4), needs_session=False)
        self._add("session.slave_local_login_with_password", self._local_login, 2, needs_session=False)
        self._add("session.logout", lambda c: self._logout(c.session, local=False), 0)
        self._add("session.local_logout", lambda c: self._logout(c.session, local=True), 0)
        for op, flags in POWER_OPERATIONS.items():
            self._add("VM." + op, self._power_operation(op), 1 + len(flags), times_itself=True)
        self._add("host.call_plugin", self._call_plugin, 4)
        self._add("SR.scan", self._scan, 1)
        self._add("message.create", self._create_message, 5)
        self._add("message.destroy", lambda c, ref: db.destroy("message", ref), 1)
        self._add("message.get_since", self._messages_since, 1)
        self._add("task.create", lambda c, label, description: tasks.create(db, label, description), 2)
        self._add("task.destroy", lambda c, ref: tasks.destroy(db, ref), 1)
        self._add("task.cancel", lambda c, ref: tasks.cancel(db, ref, vm.new_ref()), 1)
        self._add("event.from", lambda c, classes, token, timeout: events.event_from(db, classes, token, timeout), 3)
        self._add("event.inject", lambda c, cls, ref: events.inject(db, cls, ref), 2)

    def _login(self, context, user, password, version="1.0", originator=""):
        return self._open_session(user, originator, local=False)

    def _local_login(self, context, user, password):
        return self._open_session(user, "", local=True)

    def _open_session(self, user, originator, local):
        if user != SUPERUSER:
            raise XapiError("SESSION_AUTHENTICATION_FAILED", user, "Authentication failure")
        masters = [self.db.get_field("pool", pool, "master") for pool in self.db.all("pool")]
        ref = self.db.create("session", this_host=masters[0] if masters else NULL_REF, originator=originator,
                             auth_user_name=user, last_active=wire.now(), validation_time=wire.now(),
                             is_local_superuser=True)
        if local:
            with self.db.lock:
                self._local_sessions.add(ref)
        return ref

    def _logout(self, session, local):
        with self.db.lock:
            if (session in self._local_sessions) != local:
                raise XapiError("SESSION_INVALID", session)
            self._local_sessions.discard(session)
            self.db.destroy("session", session)
        return ""

    def _power_operation(self, op):
        def run(context, vm_ref, start_paused=False, force=False):
            if not isinstance(start_paused, bool) or not isinstance(force, bool):
                raise XapiError("FIELD_TYPE_ERROR", "start_paused" if not isinstance(start_paused, bool) else "force")
            vm.run(self.db, vm_ref, op, start_paused=start_paused, operation_key=context.task)
            return ""
        return run

    def _call_plugin(self, context, host, plugin, fn, args):
        self.db.get("host", host)
        if not isinstance(args, dict) or not all(isinstance(v, str) for v in args.values()):
            raise XapiError("FIELD_TYPE_ERROR", "args")
        handler = self.db.plugin_handler(plugin, fn)
        try:
            result = handler(host, dict(args))
        except XapiError:
            raise
        except Exception as error:
            raise XapiError("XENAPI_PLUGIN_FAILURE", fn, type(error).__name__, str(error)) from error
        return "" if result is None else str(result)

    def _scan(self, context, sr):
        self.db.get("SR", sr)
        for handler in self.db.sr_scan_handlers():
            handler(sr)
        return ""

    def _messages_since(self, context, since):
        since = wire.decode(schema.field("message", "timestamp"), since)
        return {ref: wire.encode_record("message", record) for ref, record in self.db.records("message").items()
                if record["timestamp"] > since}

    def _create_message(self, context, name, priority, cls, obj_uuid, body):
        if cls not in MESSAGE_CLASSES:
            raise XapiError("INVALID_VALUE", "cls", cls)
        target = MESSAGE_CLASSES[cls]
        if target is not None and not self.db.find(target, uuid=obj_uuid):
            raise XapiError("UUID_INVALID", cls, obj_uuid)
        return self.db.create("message", name=name, priority=priority, cls=cls, obj_uuid=obj_uuid,
                              timestamp=wire.now(), body=body)


def _string(name, value):
    if not isinstance(value, str):
        raise XapiError("FIELD_TYPE_ERROR", name)
    return value
