"""task records as xapi keeps them for long operations (Async calls, SM's "Garbage Collection")."""
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
