"""The XenAPI session over the configured unix socket, and the records an inspection needs.

The stock `XenAPI.UDSTransport` derives the socket path from the URL's host part (`_` for `/`),
which cannot name a path holding `_`; this transport connects to the configured path as given.
Connection failures become `HostUnreachable` with one line; xapi's own failures stay
`XenAPI.Failure` for the caller to judge.
"""
import contextlib
import html
import http.client
import logging
import os
import re
import socket
import xmlrpc.client

import XenAPI

from .errors import HostUnreachable

ORIGINATOR = "xcoalesce-agent"
NULL_REF = "OpaqueRef:NULL"

# What a vanished, refusing or garbled xapi raises through the XML-RPC client.
TRANSPORT_ERRORS = (OSError, http.client.HTTPException, xmlrpc.client.ProtocolError,
                    xmlrpc.client.Fault, xmlrpc.client.ResponseError)

log = logging.getLogger(__name__)


class _SocketConnection(http.client.HTTPConnection):
    """HTTP over a unix socket at a fixed path."""

    def __init__(self, socket_path, timeout):
        super(_SocketConnection, self).__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class SocketTransport(xmlrpc.client.Transport):
    """XML-RPC transport to the unix socket at `socket_path`, whatever characters the path holds."""

    def __init__(self, socket_path, timeout):
        super(SocketTransport, self).__init__()
        self.socket_path = socket_path
        self.timeout = timeout

    def make_connection(self, host):
        if self._connection[1] is None:
            self._connection = host, _SocketConnection(self.socket_path, self.timeout)
        return self._connection[1]


def describe(error):
    """One line for a transport error or an xapi failure."""
    if isinstance(error, XenAPI.Failure):
        return " ".join(str(item) for item in error.details) or "failure"
    if isinstance(error, xmlrpc.client.Fault):
        return "fault {}: {}".format(error.faultCode, error.faultString)
    if isinstance(error, xmlrpc.client.ProtocolError):
        return "HTTP {} {}".format(error.errcode, error.errmsg)
    if isinstance(error, socket.timeout):
        return "timed out"
    if isinstance(error, OSError) and error.errno:
        return os.strerror(error.errno)
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def unreachable(config, error):
    """The `HostUnreachable` for a failure talking to xapi."""
    return HostUnreachable("xapi at {} unreachable: {}".format(config.xapi.socket, describe(error)))


@contextlib.contextmanager
def open_session(config):
    """A logged-in `XenAPI.Session` as root over the local socket; logs out when the block ends."""
    session = XenAPI.Session("http://localhost/",
                             transport=SocketTransport(config.xapi.socket, config.xapi.timeout_seconds))
    try:
        session.xenapi.login_with_password("root", "", "1.0", ORIGINATOR)
    except XenAPI.Failure as error:
        raise HostUnreachable("xapi at {} refused the login: {}".format(
            config.xapi.socket, describe(error))) from None
    except TRANSPORT_ERRORS as error:
        raise unreachable(config, error) from None
    try:
        yield session
    finally:
        try:
            session.xenapi.session.logout()
        except (XenAPI.Failure,) + TRANSPORT_ERRORS as error:
            log.debug("logout from xapi failed: %s", describe(error))


def fetch_all(config, session, class_name):
    """`<class>.get_all_records()`: {ref: record}; transport failures become `HostUnreachable`."""
    try:
        return getattr(session.xenapi, class_name).get_all_records()
    except TRANSPORT_ERRORS as error:
        raise unreachable(config, error) from None


# `get_all_records` of thousands of VMs is tens of MB of XML: the XML-RPC unmarshaller would spend
# seconds and as many MB building every field of every record. `fetch_fields` streams the response
# and decodes only the fields asked for, finding them with regular expressions at C speed.

_CHUNK = 1 << 20
_RECORD = re.compile(rb"<member>\s*<name>(OpaqueRef:[^<]*)</name>\s*<value>\s*<struct>")
_SCALAR = re.compile(rb"\s*(?:<(string|boolean|int|i4|i8|double|dateTime\.iso8601)>([^<]*)</\1>|<string\s*/>|([^<]*))"
                     rb"\s*</value>")
_MAP_ITEM = re.compile(rb"<name>([^<]*)</name>\s*<value>\s*(?:<string>([^<]*)</string>|<string\s*/>|([^<]*))")
_ARRAY_ITEM = re.compile(rb"<value>\s*(?:<string>([^<]*)</string>|<string\s*/>|([^<]*)</value>)")


class ResponseError(ValueError):
    """A `get_all_records` response this reader does not understand."""


def _text(raw):
    text = raw.decode("utf-8")
    return html.unescape(text) if "&" in text else text


def _scalar(kind, raw):
    if kind == b"boolean":
        return raw.strip() == b"1"
    if kind in (b"int", b"i4", b"i8"):
        return int(raw)
    if kind == b"double":
        return float(raw)
    return _text(raw)


def _value(data, start):
    """(value, end) of the XML-RPC value whose text starts at `start`, just after `<value>`."""
    stripped = data[start:start + 16].lstrip()
    if stripped.startswith(b"<struct>"):
        end = data.index(b"</struct>", start)
        return {_text(name): _text(a or b) for name, a, b in _MAP_ITEM.findall(data, start, end)}, end + 9
    if stripped.startswith(b"<array>"):
        end = data.index(b"</array>", start)
        return [_text(a or b) for a, b in _ARRAY_ITEM.findall(data, start, end)], end + 8
    match = _SCALAR.match(data, start)
    if match is None:
        raise ResponseError("unexpected value at byte {}: {!r}".format(start, data[start:start + 40]))
    kind, raw, bare = match.groups()
    return (_scalar(kind, raw) if kind else _text(bare or b"")), match.end()


def _field_pattern(fields):
    """A wanted field's member, with the value itself when it is a plain string or boolean."""
    names = b"|".join(re.escape(name.encode("ascii")) for name in fields)
    return re.compile(rb"<member>\s*<name>(" + names + rb")</name>\s*<value>(?:"
                      rb"\s*<string>([^<]*)</string>\s*</value>|\s*<string\s*/>()\s*</value>"
                      rb"|\s*<boolean>([01])</boolean>\s*</value>|([^<]*)</value>|)")


def _record(data, start, end, field_pattern):
    """The wanted fields of the record whose struct spans data[start:end]."""
    record = {}
    depth = 0
    position = start
    for match in field_pattern.finditer(data, start, end):
        found = match.start()
        if found < position:
            continue
        if depth or data.find(b"<struct>", position, found) != -1:  # count only past a nested struct
            depth += data.count(b"<struct>", position, found) - data.count(b"</struct>", position, found)
        if depth:
            position = found
            continue
        name, string, empty, boolean, bare = match.groups()
        if string is not None or bare is not None:
            value = _text(string if string is not None else bare)
        elif empty is not None:
            value = ""
        elif boolean is not None:
            value = boolean == b"1"
        else:
            value, position = _value(data, match.end())
            record[name.decode("ascii")] = value
            continue
        record[name.decode("ascii")] = value
        position = match.end()
    return record


def parse_records(chunks, fields, convert=None):
    """{ref: {field: value}} from the chunks of a `get_all_records` response, keeping only `fields`.

    Records are parsed as soon as the next one starts, so memory holds one chunk and the records;
    `convert(record)`, when given, replaces each record as it is parsed (by something smaller).
    """
    convert = convert or _same
    field_pattern = _field_pattern(fields)
    records = {}
    pending = b""
    succeeded = False
    for chunk in chunks:
        pending += chunk
        if not succeeded:
            succeeded = b"<name>Value</name>" in pending  # a failure has an ErrorDescription instead
            if not succeeded:
                continue
        starts = list(_RECORD.finditer(pending))
        for index in range(len(starts) - 1):
            records[starts[index].group(1).decode("ascii")] = convert(_record(
                pending, starts[index].end(), starts[index + 1].start(), field_pattern))
        if starts:
            pending = pending[starts[-1].start():]
    if not succeeded:
        return _failure(pending)
    last = _RECORD.search(pending)
    if last is not None:
        records[last.group(1).decode("ascii")] = convert(_record(pending, last.end(), len(pending), field_pattern))
    return records


def _same(record):
    return record


def _failure(body):
    try:
        (result,), _ = xmlrpc.client.loads(body.decode("utf-8"))
    except (ValueError, xmlrpc.client.ResponseError) as error:
        raise ResponseError("unreadable failure: {}".format(error)) from None
    raise XenAPI.Failure(result.get("ErrorDescription") or ["failure without a description"])


def fetch_fields(config, session, class_name, fields, convert=None):
    """Like `fetch_all`, with only `fields` of each record: {ref: {field: value}} or {ref: convert(record)}."""
    request = xmlrpc.client.dumps((session.handle,), class_name + ".get_all_records").encode("utf-8")
    connection = _SocketConnection(config.xapi.socket, config.xapi.timeout_seconds)
    try:
        connection.request("POST", "/", request, {"Content-Type": "text/xml", "User-Agent": ORIGINATOR})
        response = connection.getresponse()
        if response.status != 200:
            raise xmlrpc.client.ProtocolError(config.xapi.socket, response.status, response.reason, {})
        return parse_records(iter(lambda: response.read(_CHUNK), b""), fields, convert)
    except TRANSPORT_ERRORS as error:
        raise unreachable(config, error) from None
    except ResponseError as error:
        raise HostUnreachable("xapi at {} sent a {} list this agent cannot read: {}".format(
            config.xapi.socket, class_name, error)) from None
    finally:
        connection.close()
