"""The /metrics server over real sockets: read-only, real TLS, basic auth, gzip."""
import base64
import gzip
import hashlib
import http.client
import selectors
import socket
import ssl
import subprocess
import time

import pytest

from tests import model_samples
from tests.helpers import require_tool
from xcoalesce_agent.export import collector
from xcoalesce_agent.reclaim import history
from xcoalesce_agent.errors import ConfigError
from xcoalesce_agent.export.connections import HANDLER_THREADS
from xcoalesce_agent.export.http import MetricsServer, parse_listen_address

PASSWORD = "s3cret: with colon ✓"
PASSWORD_SHA256 = hashlib.sha256(PASSWORD.encode("utf-8")).hexdigest()


@pytest.fixture(scope="module")
def exposition(tmp_path_factory):
    status = collector.AgentStatus()
    status.succeeded(model_samples.small_inspection(), 1700000100.0)
    return collector.Exposition(status, history.RunHistory(str(tmp_path_factory.mktemp("state"))))


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 made by the real openssl."""
    openssl = require_tool("openssl")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = str(directory / "cert.pem"), str(directory / "key.pem")
    subprocess.check_call([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                           "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return cert, key


def serving(exposition, **options):
    server = MetricsServer(exposition, "127.0.0.1:0", **options)
    server.start()
    return server


@pytest.fixture(scope="module")
def plain(exposition):
    server = serving(exposition)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def with_auth(exposition):
    server = serving(exposition, basic_auth_username="prometheus", basic_auth_password_sha256=PASSWORD_SHA256)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def with_tls(exposition, certificate):
    cert, key = certificate
    server = serving(exposition, tls_cert_file=cert, tls_key_file=key, basic_auth_username="prometheus",
                     basic_auth_password_sha256=PASSWORD_SHA256)
    yield server
    server.stop()


def request(server, method="GET", path="/metrics", headers=None, cafile=None):
    if cafile:
        connection = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=10,
                                                 context=ssl.create_default_context(cafile=cafile))
    else:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def basic(username, password):
    return {"Authorization": "Basic " + base64.b64encode("{}:{}".format(username, password).encode()).decode()}


def test_metrics_index_and_unknown_paths(plain):
    server = plain
    status, headers, body = request(server)
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b"xcoalesce_sr_reclaimable_bytes{" in body
    status, headers, body = request(server, path="/")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b'href="/metrics"' in body
    assert request(server, path="/metrics?debug=1")[0] == 200
    assert request(server, path="/nothing")[0] == 404


def test_head_sends_headers_only(plain):
    status, headers, body = request(plain, method="HEAD")
    assert status == 200 and int(headers["Content-Length"]) > 1000 and body == b""


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_the_endpoint_is_read_only(plain, method):
    status, headers, _ = request(plain, method=method)
    assert status == 405 and headers["Allow"] == "GET, HEAD"


def test_gzip_when_the_scraper_asks(plain):
    server = plain
    status, headers, body = request(server, headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert b"xcoalesce_build_info{" in gzip.decompress(body)
    assert "Content-Encoding" not in request(server, headers={"Accept-Encoding": "gzip;q=0"})[1]


def test_basic_auth(with_auth):
    server = with_auth
    status, headers, _ = request(server)
    assert status == 401 and headers["WWW-Authenticate"].startswith('Basic realm="xcoalesce-agent"')
    assert request(server, headers=basic("prometheus", "wrong"))[0] == 401
    assert request(server, headers=basic("someone", PASSWORD))[0] == 401
    assert request(server, headers={"Authorization": "Basic not-base64!"})[0] == 401
    assert request(server, headers={"Authorization": "Bearer x"})[0] == 401
    assert request(server, headers=basic("prometheus", PASSWORD))[0] == 200
    assert request(server, method="HEAD")[:3:2] == (401, b"")
    assert request(server, method="POST")[0] == 401
    assert request(server, method="POST", headers=basic("prometheus", PASSWORD))[0] == 405


def test_real_tls_with_basic_auth(with_tls, certificate):
    cert, server = certificate[0], with_tls
    assert request(server, cafile=cert)[0] == 401
    status, _, body = request(server, headers=basic("prometheus", PASSWORD), cafile=cert)
    assert status == 200 and b"xcoalesce_sr_info{" in body
    with pytest.raises((http.client.HTTPException, OSError)):
        request(server)


def test_a_silent_tls_client_does_not_hold_up_others(with_tls, certificate):
    silent = socket.create_connection(("127.0.0.1", with_tls.port))
    try:
        assert request(with_tls, headers=basic("prometheus", PASSWORD), cafile=certificate[0])[0] == 200
    finally:
        silent.close()


class Scraper(object):
    """One connection opened without waiting, that sends one GET /metrics and reads the whole answer."""

    REQUEST = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: Prometheus/2\r\n\r\n"

    def __init__(self, port):
        self.socket = socket.socket()
        self.socket.setblocking(False)
        self.started = time.monotonic()
        self.socket.connect_ex(("127.0.0.1", port))
        self.received = b""
        self.status = self.seconds = None

    def send(self):
        self.socket.sendall(self.REQUEST)

    def receive(self):
        """True once the whole answer is in."""
        chunk = self.socket.recv(65536)
        if not chunk:
            raise AssertionError("connection closed after {!r}".format(self.received[:100]))
        self.received += chunk
        head, separator, body = self.received.partition(b"\r\n\r\n")
        if not separator:
            return False
        lines = head.decode("latin-1").split("\r\n")
        length = int(next(line.split(":")[1] for line in lines if line.lower().startswith("content-length:")))
        if len(body) < length:
            return False
        self.status, self.seconds = int(lines[0].split()[1]), time.monotonic() - self.started
        return True


def test_two_hundred_scrapers_at_once_are_each_answered_within_a_second(plain):
    """Each scraper's clock starts when it connects: a connection the backlog dropped waits a SYN
    retransmission (1 s) before its request is even read."""
    selector = selectors.DefaultSelector()
    scrapers = [Scraper(plain.port) for _ in range(200)]
    try:
        for scraper in scrapers:
            selector.register(scraper.socket, selectors.EVENT_WRITE, scraper)
        done, deadline = 0, time.monotonic() + 10
        while done < len(scrapers) and time.monotonic() < deadline:
            for key, events in selector.select(1.0):
                scraper = key.data
                if events & selectors.EVENT_WRITE:
                    scraper.send()
                    selector.modify(scraper.socket, selectors.EVENT_READ, scraper)
                elif scraper.receive():
                    selector.unregister(scraper.socket)
                    done += 1
        assert [scraper.status for scraper in scrapers] == [200] * len(scrapers)
        slowest = max(scraper.seconds for scraper in scrapers)
        assert slowest < 1.0, "slowest answer after {:.2f} s".format(slowest)
    finally:
        selector.close()
        for scraper in scrapers:
            scraper.socket.close()


def test_idle_and_kept_alive_connections_hold_no_handler(plain):
    """More silent connections and idle kept-alive ones than there are handler threads: a scraper
    is still answered, and a kept-alive connection serves its next request."""
    silent = [socket.create_connection(("127.0.0.1", plain.port)) for _ in range(2 * HANDLER_THREADS)]
    kept = [http.client.HTTPConnection("127.0.0.1", plain.port, timeout=10) for _ in range(2 * HANDLER_THREADS)]
    try:
        for connection in kept:
            connection.request("GET", "/")
            response = connection.getresponse()
            assert response.status == 200 and response.getheader("Connection") != "close"
            response.read()
        assert request(plain)[0] == 200
        kept[0].request("GET", "/metrics")
        assert kept[0].getresponse().status == 200
    finally:
        for connection in silent + kept:
            connection.close()


def test_unloadable_certificate_is_a_one_line_config_error(exposition, tmp_path):
    with pytest.raises(ConfigError) as raised:
        MetricsServer(exposition, "127.0.0.1:0", tls_cert_file=str(tmp_path / "missing.pem"),
                      tls_key_file=str(tmp_path / "missing.key"))
    assert "missing.pem" in str(raised.value) and "\n" not in str(raised.value)


def test_an_address_in_use_is_a_config_error(plain, exposition):
    with pytest.raises(ConfigError, match="cannot listen on 127.0.0.1:{}".format(plain.port)):
        MetricsServer(exposition, "127.0.0.1:{}".format(plain.port)).start()


def test_listens_on_ipv6_loopback_when_asked(exposition):
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    server = MetricsServer(exposition, "[::1]:0")
    server.start()
    try:
        connection = http.client.HTTPConnection("::1", server.port, timeout=10)
        connection.request("GET", "/metrics")
        assert connection.getresponse().status == 200
        connection.close()
    finally:
        server.stop()


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:10530", ("127.0.0.1", 10530)),
    (":10530", ("", 10530)),
    ("[::]:10530", ("::", 10530)),
    ("localhost:1", ("localhost", 1)),
])
def test_listen_addresses(text, expected):
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize("text", ["10530", "host:", "host:65536", "host:http"])
def test_bad_listen_addresses(text):
    with pytest.raises(ConfigError):
        parse_listen_address(text)
