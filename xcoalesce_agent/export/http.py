"""The /metrics endpoint: read-only HTTP, optionally TLS and basic auth, as Prometheus exporters serve it.

GET and HEAD only (anything else is 405); `/` is a small page linking `/metrics`. Basic auth compares
the username and the sha256 hex digest of the password in constant time. The body comes from
`collector.Exposition`, which never calls xapi or runs a tool.

Many scrapers at once cost bounded memory on Dom0: the listen backlog takes a burst of new
connections; a connection waiting for its (next) request waits in one selector (`connections.ConnectionPool`),
not in a thread; a fixed set of HANDLER_THREADS threads serves requests that have begun to arrive,
each within REQUEST_SECONDS (a client sending a byte at a time is cut off), the TLS handshake
included; beyond MAX_CONNECTIONS new connections are closed at once.
"""
import base64
import binascii
import hashlib
import hmac
import http.server
import io
import logging
import socket
import ssl
import sys
import threading
import time
from urllib.parse import urlsplit

from .. import __version__
from .connections import MAX_CONNECTIONS, ConnectionPool
from ..errors import ConfigError

LOG = logging.getLogger(__name__)

LISTEN_BACKLOG = 1024         # new connections the kernel queues (it caps this at net.core.somaxconn)
REQUEST_SECONDS = 10          # a request's line and headers (and TLS handshake) must arrive within this
RESPONSE_SECONDS = 30         # sending one response to a slow reader
REALM = "xcoalesce-agent"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ALLOWED_METHODS = "GET, HEAD"

INDEX_PAGE = b"""<!DOCTYPE html>
<html>
<head><meta charset="utf-8"><title>xcoalesce-agent</title></head>
<body>
<h1>xcoalesce-agent</h1>
<p>Leaf-coalesce inspection of this host's storage repositories.</p>
<p><a href="/metrics">Metrics</a></p>
</body>
</html>
"""


def parse_listen_address(value):
    """`host:port`, `:port` or `[v6]:port` -> (host, port); host "" means every address, port 0 any port."""
    host, separator, port = value.rpartition(":")
    if not separator or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError("listen address {!r}: expected ADDRESS:PORT".format(value))
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def tls_context(cert_file, key_file):
    """A server context for TLS 1.2 and later from PEM files; ConfigError when they do not load."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if sys.version_info < (3, 10):  # later versions refuse TLS 1.0 and 1.1 by default
        context.options |= ssl.OP_NO_TLSv1 | ssl.OP_NO_TLSv1_1
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError("[web] TLS certificate {} / key {}: {}".format(
            cert_file, key_file, getattr(error, "strerror", None) or error)) from None
    return context


class BasicAuth(object):
    """One username and the sha256 hex digest of its password."""

    def __init__(self, username, password_sha256):
        self._username = username.encode("utf-8")
        self._digest = password_sha256.lower().encode("ascii")

    def allows(self, header):
        """True when an Authorization header carries this username and password."""
        scheme, _, encoded = (header or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        username, separator, password = decoded.partition(b":")
        digest = hashlib.sha256(password).hexdigest().encode("ascii")
        name_matches = hmac.compare_digest(username, self._username)
        password_matches = hmac.compare_digest(digest, self._digest)
        return bool(separator) and name_matches and password_matches


class _RequestReader(io.RawIOBase):
    """The request side of a connection, read from the socket with no buffer (which would keep the
    next request of a kept-alive connection from the selector), until a deadline: a client sending
    its request a byte at a time holds a handler thread REQUEST_SECONDS at most."""

    def __init__(self, connection):
        super(_RequestReader, self).__init__()
        self._connection = connection
        self._deadline = time.monotonic() + REQUEST_SECONDS

    def readable(self):
        return True

    def readinto(self, buffer):
        self._before_waiting()
        return self._connection.recv_into(buffer)

    def peek(self, size=1):
        """What arrived, left unread, so that `readline` takes a line in one read; TLS cannot peek
        (its lines are read a byte at a time)."""
        if isinstance(self._connection, ssl.SSLSocket):
            return b""
        self._before_waiting()
        return self._connection.recv(max(size, 4096), socket.MSG_PEEK)

    def _before_waiting(self):
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("no complete request within {} s".format(REQUEST_SECONDS))
        self._connection.settimeout(remaining)


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves one request; a kept-alive connection then goes back to `_Connections` to wait."""
    server_version = "xcoalesce-agent/" + __version__
    protocol_version = "HTTP/1.1"
    timeout = REQUEST_SECONDS

    def setup(self):
        super(_Handler, self).setup()
        self.rfile.close()
        self.rfile = _RequestReader(self.connection)

    def handle(self):
        self.handle_one_request()

    def send_response(self, code, message=None):
        self.connection.settimeout(RESPONSE_SECONDS)  # whatever time the request took
        super(_Handler, self).send_response(code, message)

    def do_GET(self):
        self._respond(send_body=True)

    def do_HEAD(self):
        self._respond(send_body=False)

    def _refuse_method(self):
        self.close_connection = True  # any request body stays unread
        if self._authorized():
            self._send(405, b"method not allowed: this endpoint is read-only\n", True,
                       extra_headers={"Allow": ALLOWED_METHODS})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _refuse_method

    def _authorized(self, send_body=True):
        auth = self.server.auth
        if auth is None or auth.allows(self.headers.get("Authorization")):
            return True
        self._send(401, b"unauthorized\n", send_body,
                   extra_headers={"WWW-Authenticate": 'Basic realm="{}", charset="UTF-8"'.format(REALM)})
        return False

    def _respond(self, send_body):
        if not self._authorized(send_body):
            return
        path = urlsplit(self.path).path
        if path == "/":
            self._send(200, INDEX_PAGE, send_body, "text/html; charset=utf-8")
        elif path == "/metrics":
            gzipped = _accepts_gzip(self.headers.get("Accept-Encoding"))
            try:
                chunks = self.server.exposition.chunks(gzipped)
            except Exception:
                LOG.exception("rendering /metrics failed")
                self._send(500, b"rendering the metrics failed, see the agent's log\n", send_body)
                return
            self._send(200, chunks, send_body, CONTENT_TYPE,
                       {"Content-Encoding": "gzip"} if gzipped else None)
        else:
            self._send(404, b"not found: see /metrics\n", send_body)

    def _send(self, status, body, send_body, content_type="text/plain; charset=utf-8", extra_headers=None):
        """Answer with `body`, bytes or a list of byte strings sent one after the other."""
        chunks = [body] if isinstance(body, bytes) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(sum(len(chunk) for chunk in chunks)))
        for name, value in (extra_headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            for chunk in chunks:
                self.wfile.write(chunk)

    def log_message(self, format, *args):  # noqa: A002 - the base class names it so
        LOG.debug("%s %s", self.address_string(), format % args)


def _accepts_gzip(header):
    for item in (header or "").split(","):
        coding, _, parameters = item.strip().partition(";")
        if coding.strip().lower() == "gzip":
            return parameters.replace(" ", "") not in ("q=0", "q=0.0", "q=0.00", "q=0.000")
    return False


class _Server(http.server.HTTPServer):
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address, family, exposition, auth, context):
        self.address_family = family
        self.exposition = exposition
        self.auth = auth
        self._context = context
        self._connections = None
        http.server.HTTPServer.__init__(self, address, _Handler)
        self._connections = ConnectionPool(self._serve_connection, self.shutdown_request)

    def server_bind(self):
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "::":
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        http.server.HTTPServer.server_bind(self)

    def get_request(self):
        connection, address = self.socket.accept()
        # The body goes out in a few writes: without this, the last one can wait for a delayed ACK.
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._context is not None:
            connection = self._context.wrap_socket(connection, server_side=True, do_handshake_on_connect=False)
        return connection, address

    def process_request(self, request, client_address):
        if not self._connections.add(request, client_address):
            LOG.debug("%d connections held already: closing the one from %s", MAX_CONNECTIONS, client_address[0])
            self.shutdown_request(request)

    def _serve_connection(self, connection, address, first):
        """Serve the request that began to arrive; True when the connection stays open for another."""
        try:
            if first and isinstance(connection, ssl.SSLSocket):
                connection.settimeout(REQUEST_SECONDS)
                connection.do_handshake()
            return not self.RequestHandlerClass(connection, address, self).close_connection
        except Exception:
            self.handle_error(connection, address)
            return False

    def server_close(self):
        http.server.HTTPServer.server_close(self)
        if self._connections is not None:
            self._connections.close()

    def handle_error(self, request, client_address):
        LOG.debug("connection from %s failed", client_address[0], exc_info=True)


class MetricsServer(object):
    """The HTTP(S) server of /metrics, serving in its own thread between `start()` and `stop()`."""

    def __init__(self, exposition, listen_address, tls_cert_file="", tls_key_file="",
                 basic_auth_username="", basic_auth_password_sha256=""):
        self.listen_address = listen_address
        self._exposition = exposition
        self._context = tls_context(tls_cert_file, tls_key_file) if tls_cert_file else None
        self._auth = BasicAuth(basic_auth_username, basic_auth_password_sha256) if basic_auth_username else None
        self._server = None
        self._thread = None

    @property
    def port(self):
        return self._server.server_address[1]

    @property
    def tls(self):
        return self._context is not None

    def start(self):
        """Bind and serve; ConfigError when the address cannot be listened on."""
        host, port = parse_listen_address(self.listen_address)
        self._server = self._bind(host, port)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http")
        self._thread.daemon = True
        self._thread.start()
        LOG.info("serving /metrics on %s (%s%s)", self.listen_address, "https" if self.tls else "http",
                 ", basic auth" if self._auth else "")

    def _bind(self, host, port):
        candidates = [(host, socket.AF_INET6 if ":" in host else socket.AF_INET)]
        if not host:
            candidates = [("::", socket.AF_INET6), ("0.0.0.0", socket.AF_INET)] if socket.has_ipv6 \
                else [("0.0.0.0", socket.AF_INET)]
        for index, (address, family) in enumerate(candidates):
            try:
                return _Server((address, port), family, self._exposition, self._auth, self._context)
            except OSError as error:
                if index + 1 == len(candidates):
                    raise ConfigError("cannot listen on {}: {}".format(
                        self.listen_address, error.strerror or error)) from None

    def stop(self):
        """Stop accepting and close the listening socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None


def from_web_config(exposition, web, listen_address=None):
    """A MetricsServer from the `[web]` section; `listen_address` (the command line) overrides it."""
    return MetricsServer(exposition, listen_address or web.listen_address,
                         tls_cert_file=web.tls_cert_file, tls_key_file=web.tls_key_file,
                         basic_auth_username=web.basic_auth_username,
                         basic_auth_password_sha256=web.basic_auth_password_sha256)
