"""Field values between their Python form and xapi's XML-RPC form (64-bit ints as strings, dates)."""
import datetime
import xmlrpc.client

from . import schema
from .errors import XapiError

DATE_FORMAT = "%Y%m%dT%H:%M:%SZ"


def encode(kind, value):
    """The wire form of a stored value of this kind."""
    if kind == "int":
        return str(value)
    if kind == "ints":
        return [str(v) for v in value]
    if kind == "date":
        return xmlrpc.client.DateTime(value.strftime(DATE_FORMAT))
    if kind in ("refs", "strs"):
        return list(value)
    if kind == "map":
        return dict(value)
    return value


def encode_record(cls, record):
    return {name: encode(f.kind, record[name]) for name, f in schema.FIELDS[cls].items()}


def _date(value):
    if isinstance(value, datetime.datetime):
        return value
    text = value.value if isinstance(value, xmlrpc.client.DateTime) else str(value)
    return datetime.datetime.strptime(text.replace("-", ""), DATE_FORMAT)


def _int(value):
    if isinstance(value, bool):
        raise ValueError(value)
    return int(value)


def _strings(value):
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(value)
    return list(value)


def _map(value):
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError(value)
    return {str(k): v for k, v in value.items()}


def _typed(expected):
    def convert(value):
        if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
            raise ValueError(value)
        return value
    return convert


DECODERS = {
    "str": _typed(str), "ref": _typed(str), "bool": _typed(bool), "int": _int,
    "float": lambda v: float(_typed((int, float))(v)),
    "refs": _strings, "strs": _strings, "ints": lambda v: [_int(x) for x in v], "map": _map, "date": _date,
}


def decode(field, value):
    """A client-supplied value for `field` in its stored form; FIELD_TYPE_ERROR when it does not fit."""
    try:
        return DECODERS[field.kind](value)
    except (TypeError, ValueError):
        raise XapiError("FIELD_TYPE_ERROR", field.name) from None


def now():
    """The current UTC time at xapi's one-second resolution."""
    return datetime.datetime.utcnow().replace(microsecond=0)
