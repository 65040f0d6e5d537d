"""Field values between their Python form and xapi's XML-RPC form (64-bit ints as strings, dates), and
XML-RPC documents written byte for byte as xapi writes them (ocaml-rpc's non-strict writer)."""
import datetime
import re
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


# xapi writes strings bare (`<value>text</value>`, no `<string>`), escapes `<`, `>`, `&` and `"`,
# drops the control characters XML cannot hold, and puts no whitespace between elements.
_ESCAPES = {"<": "&lt;", ">": "&gt;", "&": "&amp;", '"': "&quot;"}
_TO_ESCAPE = re.compile(r'[<>&"\x00-\x08\x0b\x0c\x0e-\x1f]')


def _escape(text):
    return _TO_ESCAPE.sub(lambda match: _ESCAPES.get(match.group(0), ""), text) if _TO_ESCAPE.search(text) else text


def _write_value(value, out):
    if isinstance(value, str):
        out.append("<value>" + _escape(value) + "</value>")
    elif isinstance(value, bool):
        out.append("<value><boolean>1</boolean></value>" if value else "<value><boolean>0</boolean></value>")
    elif isinstance(value, int):  # xapi's 64-bit ints are strings already: what is left is int32
        out.append("<value><i4>{}</i4></value>".format(value))
    elif isinstance(value, float):
        out.append("<value><double>{:.16g}</double></value>".format(value))
    elif isinstance(value, xmlrpc.client.DateTime):
        out.append("<value><dateTime.iso8601>" + value.value + "</dateTime.iso8601></value>")
    elif isinstance(value, (list, tuple)):
        out.append("<value><array><data>")
        for item in value:
            _write_value(item, out)
        out.append("</data></array></value>")
    elif isinstance(value, dict):
        out.append("<value><struct>")
        for name, item in value.items():
            out.append("<member><name>" + _escape(str(name)) + "</name>")
            _write_value(item, out)
            out.append("</member>")
        out.append("</struct></value>")
    elif value is None:
        out.append("<value><nil/></value>")
    else:
        raise TypeError("cannot write {} to XML-RPC".format(type(value).__name__))


def value_xml(value):
    """One `<value>` element as xapi writes it (a task's result is stored in this form)."""
    out = []
    _write_value(value, out)
    return "".join(out)


def response_xml(outcome):
    """The methodResponse document xapi sends for `outcome`, its {"Status": ..., ...} struct."""
    out = ['<?xml version="1.0"?><methodResponse><params><param>']
    _write_value(outcome, out)
    out.append("</param></params></methodResponse>")
    return "".join(out)
