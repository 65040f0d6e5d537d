"""The /metrics endpoint: read-only HTTP, optionally TLS and basic auth, as Prometheus exporters serve it.

GET and HEAD only (anything else is 405); `/` is a small page linking `/metrics`. Each connection is
served by its own thread, and a TLS handshake happens in that thread, so a slow client holds up
nobody. Basic auth compares the username and the sha256 hex digest of the password in constant
time. The body comes from `collector.Exposition`, which never calls xapi or runs a tool.
"""
import base64
import binascii
import hashlib
import hmac
import http.server
import logging
import socket
import socketserver
import ssl
import sys
import threading
from urllib.parse import urlsplit

from . import __version__
from .errors import ConfigError

LOG = logging.getLogger(__name__)

CONNECTION_TIMEOUT_SECONDS = 30
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


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "xcoalesce-agent/" + __version__
    protocol_version = "HTTP/1.1"
    timeout = CONNECTION_TIMEOUT_SECONDS

    def setup(self):
        super(_Handler, self).setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()

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


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, family, exposition, auth, context):
        self.address_family = family
        self.exposition = exposition
        self.auth = auth
        self._context = context
        http.server.HTTPServer.__init__(self, address, _Handler)

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
