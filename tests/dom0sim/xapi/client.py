"""The real XenAPI client pointed at a simulated xapi socket, whatever its path."""
import http.client
import socket

import XenAPI


class _SocketPathConnection(http.client.HTTPConnection):
    def __init__(self, socket_path, timeout):
        http.client.HTTPConnection.__init__(self, "localhost")
        self._socket_path = socket_path
        self._socket_timeout = timeout

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self._socket_timeout)
        self.sock.connect(self._socket_path)


class UnixSocketTransport(XenAPI.UDSTransport):
    """XenAPI's unix-socket transport connecting to an explicit path instead of one spelled in the URL."""

    def __init__(self, socket_path, timeout=None):
        XenAPI.UDSTransport.__init__(self)
        self._socket_path = socket_path
        self._socket_timeout = timeout

    def make_connection(self, host):
        if not (self._connection and self._connection[0] == host):
            self._connection = host, _SocketPathConnection(self._socket_path, self._socket_timeout)
        return XenAPI.UDSTransport.make_connection(self, host)


def session(socket_path, timeout=None):
    """A XenAPI.Session on the socket, not logged in."""
    return XenAPI.Session("http://xapi/", transport=UnixSocketTransport(socket_path, timeout))


def connect(socket_path, user="root", password="", originator="dom0sim-tests", timeout=None):
    """A XenAPI.Session on the socket, logged in as `user`; log out with session.xenapi.session.logout()."""
    result = session(socket_path, timeout)
    result.xenapi.login_with_password(user, password, "1.0", originator)
    return result
