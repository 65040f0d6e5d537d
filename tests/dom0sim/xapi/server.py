"""xapi's transport: XML-RPC over HTTP/1.1 (keep-alive) on a unix socket, one thread per connection.

Every call answers {"Status": "Success", "Value": v} or {"Status": "Failure", "ErrorDescription": [...]};
a request that is not XML-RPC gets an XML-RPC fault, a request that is not HTTP an HTTP error.
"""
import http.server
import logging
import os
import socket
import socketserver
import sys
import threading
import xmlrpc.client

from . import wire
from .api import Api
from .errors import XapiError

LOG = logging.getLogger(__name__)
PARSE_ERROR = -32700


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "xapi"
    sys_version = ""

    def do_POST(self):
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            length = -1
        if length < 0:
            self.send_error(411 if "Content-Length" not in self.headers else 400)
            return
        body = self.rfile.read(length)
        if self.server.xapi.db.faults.should_drop():
            self.close_connection = True
            return
        payload = self.server.xapi.respond(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self):
        self.send_error(404)

    def address_string(self):
        return "unix-socket"

    def log_message(self, format, *args):
        LOG.debug(format, *args)


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, path, xapi):
        self.xapi = xapi
        self.connections = set()
        self.connections_lock = threading.Lock()
        socketserver.UnixStreamServer.__init__(self, path, _Handler)

    def finish_request(self, request, client_address):
        with self.connections_lock:
            self.connections.add(request)
        try:
            socketserver.UnixStreamServer.finish_request(self, request, client_address)
        finally:
            with self.connections_lock:
                self.connections.discard(request)

    def handle_error(self, request, client_address):
        """A client that went away mid-reply (killed, timed out) is no error of the server's, as in
        xapi; anything else is still reported."""
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            socketserver.UnixStreamServer.handle_error(self, request, client_address)

    def close_connections(self):
        with self.connections_lock:
            for connection in self.connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class XapiServer(object):
    """The simulated xapi on `socket_path`: start() serves in a background thread, stop() ends it and
    removes the socket. Usable as a context manager."""

    def __init__(self, db, socket_path):
        self.db = db
        self.socket_path = socket_path
        self.api = Api(db)
        self._server = None
        self._thread = None

    def start(self):
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        self._server = _UnixServer(self.socket_path, self)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="xapi-server", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._server is None:
            return
        self._server.shutdown()
        self.db.wake_waiters()
        self._server.close_connections()
        self._server.server_close()
        self._thread.join()
        self._server = None
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def respond(self, body):
        """The HTTP body answering one XML-RPC request body."""
        try:
            params, method = xmlrpc.client.loads(body)
        except Exception as error:
            return _fault("XML-RPC parse error: {}".format(error))
        if not method:
            return _fault("XML-RPC parse error: no methodName")
        try:
            result = {"Status": "Success", "Value": self.api.call(method, params)}
        except XapiError as error:
            result = {"Status": "Failure", "ErrorDescription": error.details}
        except Exception as error:
            LOG.exception("%s failed", method)
            result = {"Status": "Failure", "ErrorDescription": ["INTERNAL_ERROR", str(error)]}
        try:
            return wire.response_xml(result).encode("utf-8")
        except Exception as error:
            LOG.exception("%s: cannot encode the result", method)
            failure = {"Status": "Failure", "ErrorDescription": ["INTERNAL_ERROR", str(error)]}
            return wire.response_xml(failure).encode("utf-8")


def _fault(message):
    return xmlrpc.client.dumps(xmlrpc.client.Fault(PARSE_ERROR, message), methodresponse=True).encode("utf-8")
