"""task records as xapi keeps them for long operations (Async calls, SM's "Garbage Collection").

task.cancel as xapi does it for calls that never mark their task cancellable (host.call_plugin among
them: xapi runs the plugin with no cancellation hook): the task gets a "cancel" current operation and
stays pending, the call goes on (the plugin is not killed and is not told), and the task ends as the
call ends, success or failure. task.destroy of a pending task waits for its end the same way."""
import contextlib

from . import wire
from .errors import XapiError
from .schema import NULL_REF


def create(db, name_label, name_description="", **fields):
    """A pending task resident on the pool master; returns its ref."""
    masters = [db.get_field("pool", pool, "master") for pool in db.all("pool")]
    fields.setdefault("resident_on", masters[0] if masters else NULL_REF)
    return db.create("task", name_label=name_label, name_description=name_description,
                     created=wire.now(), status="pending", **fields)


def set_progress(db, ref, fraction):
    db.set("task", ref, "progress", float(fraction))


def succeed(db, ref, result=None):
    """Finish the task; `result` is stored as xapi does, as the XML-RPC value ("" for none)."""
    db.update("task", ref, status="success", progress=1.0, finished=wire.now(), result=encode_result(result))


COMPLETED = ("success", "failure", "cancelled")


def cancel(db, ref, operation_ref):
    """Xapi_task.cancel: records the cancel; nothing stops a call that does not look for it."""
    with db.lock:
        record = db.get("task", ref)
        if record["status"] == "pending":
            operations = dict(record["current_operations"], **{operation_ref: "cancel"})
            db.update("task", ref, current_operations=operations)
    return ""


def destroy(db, ref):
    """Xapi_task.destroy: a finished task goes; a pending one is marked and goes when it ends."""
    with db.lock:
        record = db.get("task", ref)
        if record["status"] in COMPLETED:
            db.destroy("task", ref)
        else:
            db.update("task", ref, current_operations=dict(record["current_operations"], task="destroy"))
    return ""


def destroy_if_asked(db, ref):
    with db.lock:
        if db.exists("task", ref) and "destroy" in db.get_field("task", ref, "current_operations").values():
            db.destroy("task", ref)


def fail(db, ref, details):
    db.update("task", ref, status="failure", progress=1.0, finished=wire.now(),
              error_info=[str(d) for d in details])


@contextlib.contextmanager
def running(db, name_label, name_description=""):
    """A task for the duration of the block: success at its end, failure with the error if it raises."""
    ref = create(db, name_label, name_description)
    try:
        yield ref
    except XapiError as error:
        fail(db, ref, error.details)
        raise
    except Exception as error:
        fail(db, ref, ["INTERNAL_ERROR", str(error)])
        raise
    succeed(db, ref)


def encode_result(value):
    if value is None or value == "":
        return ""
    return wire.value_xml(value)
