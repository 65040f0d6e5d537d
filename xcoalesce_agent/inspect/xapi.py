"""The XenAPI session over the configured unix socket, and the records an inspection needs.

The stock `XenAPI.UDSTransport` derives the socket path from the URL's host part (`_` for `/`),
which cannot name a path holding `_`; this transport connects to the configured path as given.
Connection failures become `HostUnreachable` with one line; xapi's own failures of a call made
through the session stay `XenAPI.Failure` for the caller to judge, while a record list that xapi
fails to give (`iter_records`) is `HostUnreachable`: nothing can be read.
"""
import contextlib
import http.client
import logging
import os
import socket
import xmlrpc.client

import XenAPI

from . import xmlrecords
from ..errors import HostUnreachable

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


# Below glibc's mmap threshold (128 KiB): each chunk reuses heap memory instead of faulting in fresh pages.
_CHUNK = 1 << 16


def iter_records(config, session, class_name, fields, where=None):
    """(ref, {field: value}) of each record of `class_name`, only `fields` of it, streamed from xapi
    (`xmlrecords`: the XML-RPC unmarshaller would build every field of tens of MB of records).

    With `where` (xapi's filter language, e.g. `field "SR" = "OpaqueRef:..."`), only the records
    it selects, through `get_all_records_where`. xapi failing the call (a pool member whose master
    is gone, a session ended) is `HostUnreachable`, as a dead socket is: nothing can be read.
    """
    params = (session.handle,) if where is None else (session.handle, where)
    method = class_name + (".get_all_records" if where is None else ".get_all_records_where")
    request = xmlrpc.client.dumps(params, method).encode("utf-8")
    connection = _SocketConnection(config.xapi.socket, config.xapi.timeout_seconds)
    try:
        connection.request("POST", "/", request, {"Content-Type": "text/xml", "User-Agent": ORIGINATOR})
        response = connection.getresponse()
        if response.status != 200:
            raise xmlrpc.client.ProtocolError(config.xapi.socket, response.status, response.reason, {})
        yield from xmlrecords.parse_records(iter(lambda: response.read(_CHUNK), b""), fields)
    except TRANSPORT_ERRORS as error:
        raise unreachable(config, error) from None
    except XenAPI.Failure as error:
        raise HostUnreachable("xapi at {} failed {}: {}".format(config.xapi.socket, method, describe(error))) from None
    except xmlrecords.ResponseError as error:
        raise HostUnreachable("xapi at {} sent a {} list this agent cannot read: {}".format(
            config.xapi.socket, class_name, error)) from None
    finally:
        connection.close()
