"""event.from: the changes since a token for the subscribed classes or objects, blocking up to a timeout."""
import time

from . import schema, wire
from .errors import XapiError

def parse_token(token):
    """The generation a token stands for; "" is the beginning."""
    if token == "":
        return 0
    parts = token.split(",") if isinstance(token, str) else []
    if len(parts) != 2 or not all(part.isdigit() for part in parts):
        raise XapiError("EVENT_FROM_TOKEN_PARSE_FAILURE", token)
    return int(parts[0])


def format_token(generation):
    return "{:020d},{:020d}".format(generation, 0)


def parse_subscriptions(classes):
    """[(class in lower case or "*", ref or None)] from ["*"], ["VM", "sr"], ["vm/OpaqueRef:..."]."""
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise XapiError("FIELD_TYPE_ERROR", "classes")
    subscriptions = []
    for entry in classes:
        name, _, ref = entry.partition("/")
        subscriptions.append((name.lower() if entry != "*" else "*", ref or None))
    return subscriptions


def matches(subscriptions, cls, ref):
    lower = cls.lower()
    return any(name == "*" or (name == lower and (wanted is None or wanted == ref))
               for name, wanted in subscriptions)


def event_from(db, classes, token, timeout):
    """xapi's event.from result: {"events": [...], "token": t, "valid_ref_counts": {...}}."""
    subscriptions = parse_subscriptions(classes)
    since = parse_token(token)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise XapiError("FIELD_TYPE_ERROR", "timeout")
    deadline = time.monotonic() + timeout
    while True:
        with db.lock:
            generation = db.generation
            changes = [c for c in db.changes_since(since)
                       if c.cls in schema.EVENT_CLASSES and matches(subscriptions, c.cls, c.ref)]
            if changes or time.monotonic() >= deadline:
                return _result(db, changes, generation)
        since = generation
        if not db.wait_for_change(generation, deadline):
            return _result(db, [], generation)


def inject(db, cls, ref):
    """event.inject: a "mod" event for the object; returns the token just before it."""
    if cls not in schema.EVENT_CLASSES:
        raise XapiError("HANDLE_INVALID", cls, ref)
    with db.lock:
        db.update(cls, ref)
        return format_token(db.generation - 1)


def _result(db, changes, generation):
    events = []
    stamp = "{:.6f}".format(time.time())
    for change in changes:
        event = {"id": str(change.generation), "timestamp": stamp, "class": change.cls.lower(),
                 "operation": change.operation, "ref": change.ref}
        if change.operation != "del":
            event["snapshot"] = wire.encode_record(change.cls, db.get(change.cls, change.ref))
        events.append(event)
    counts = {cls.lower(): count for cls, count in db.counts().items() if cls in schema.EVENT_CLASSES}
    return {"events": events, "token": format_token(generation), "valid_ref_counts": counts}
