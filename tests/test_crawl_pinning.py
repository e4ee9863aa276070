"""The crawler connects to the address it vetted (no DNS-rebinding window), on every hop.

Real HTTP(S) servers on loopback addresses and the real httpx/httpcore stack; only the
resolver is scripted: `socket.getaddrinfo` is replaced in-process for names ending in
`.test` (asyncio's resolver calls it at call time), so a name can answer differently on each
lookup the way a rebinding DNS server would. "Allowed" is 127.0.0.1 (through
BLOGQA_CRAWL_ALLOW_NETWORKS) and 127.0.0.2 stands in for a refused address such as cloud
metadata: a server listens there too and counts every connection it accepts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from blogqa import crawl
from blogqa.config import Settings
from blogqa.errors import PageError
from blogqa.extract import Fetched
from blogqa.politeness import CrawlPolicy

ALLOWED_IP = "127.0.0.1"
REFUSED_IP = "127.0.0.2"
HOST = "rebind.test"
REFUSAL = "refused (set BLOGQA_CRAWL_ALLOW_PRIVATE=true"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def do_GET(self):
        server: _Server = self.server  # type: ignore[assignment]
        with server.lock:
            server.requests.append((self.path, self.headers.get("Host")))
        if self.path == "/redirect":
            self._answer(302, b"", {"Location": server.redirect_to})
        elif self.path == "/robots.txt":
            self._answer(200, b"User-agent: *\nAllow: /\n", {"Content-Type": "text/plain"})
        else:
            body = b"<html><head><title>t</title></head><body><p>hello</p></body></html>"
            self._answer(200, body, {"Content-Type": "text/html; charset=utf-8"})

    def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    """A page server on one loopback address that records connections, paths and Hosts."""

    daemon_threads = True

    def __init__(self, address: str, port: int = 0) -> None:
        super().__init__((address, port), _Handler)
        self.lock = threading.Lock()
        self.connections = 0
        self.requests: list[tuple[str, str | None]] = []
        self.redirect_to = ""
        self.sni: list[str | None] = []

    @property
    def port(self) -> int:
        return self.server_address[1]

    def verify_request(self, request, client_address) -> bool:
        with self.lock:
            self.connections += 1
        return True

    def handle_error(self, request, client_address) -> None:
        pass  # clients hanging up mid-handshake (certificate refused) are expected here

    def serve(self) -> _Server:
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def close(self) -> None:
        self.shutdown()
        self.server_close()


@pytest.fixture
def servers() -> Iterator[tuple[_Server, _Server]]:
    """(allowed, refused): the same port on 127.0.0.1 and on 127.0.0.2."""
    allowed = _Server(ALLOWED_IP).serve()
    refused = _Server(REFUSED_IP, allowed.port).serve()
    yield allowed, refused
    allowed.close()
    refused.close()


class _Resolver:
    """Scripted answers for `*.test` names, one list per lookup; the last repeats."""

    def __init__(self, real) -> None:
        self.real = real
        self.script: dict[str, list[list[str] | Exception]] = {}
        self.lookups: list[str] = []

    def __call__(self, host, port, family=0, type=0, proto=0, flags=0):
        name = host.decode() if isinstance(host, bytes) else host
        if not isinstance(name, str) or not name.endswith(".test"):
            return self.real(host, port, family, type, proto, flags)
        self.lookups.append(name)
        answers = self.script[name]
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, Exception):
            raise answer
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, int(port or 0)))
            for address in answer
        ]


@pytest.fixture
def resolver(monkeypatch) -> _Resolver:
    fake = _Resolver(socket.getaddrinfo)
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return fake


@pytest.fixture
def strict(settings) -> Settings:
    """Private addresses refused except 127.0.0.1, the allowed test server."""
    return dataclasses.replace(
        settings,
        crawl_allow_private=False,
        crawl_allow_networks=(ipaddress.ip_network(f"{ALLOWED_IP}/32"),),
        fetch_timeout=5.0,
    )


def _fetch(settings: Settings, url: str, policy: CrawlPolicy | None = None) -> Fetched:
    async def run() -> Fetched:
        async with crawl.http_client(settings) as client:
            return await crawl.fetch(client, url, settings, policy=policy)

    return asyncio.run(run())


def _fetch_error(settings: Settings, url: str, policy: CrawlPolicy | None = None) -> PageError:
    with pytest.raises(PageError) as info:
        _fetch(settings, url, policy)
    assert info.value.stage == "crawl"
    return info.value


@pytest.mark.parametrize("robots", [False, True], ids=["page", "robots-then-page"])
def test_rebinding_answer_after_the_check_is_never_connected(
    servers, resolver, strict, robots: bool
) -> None:
    """First lookup allowed, every later one refused: with the check and the connection
    resolving separately the request would land on the refused server."""
    allowed, refused = servers
    resolver.script[HOST] = [[ALLOWED_IP], [REFUSED_IP]]
    settings = dataclasses.replace(strict, respect_robots=robots)
    policy = CrawlPolicy(settings) if robots else None
    fetched = _fetch(settings, f"http://{HOST}:{allowed.port}/page", policy)
    assert fetched.status == 200 and b"hello" in fetched.body
    assert refused.connections == 0 and refused.requests == []
    expected = (["/robots.txt"] if robots else []) + ["/page"]
    assert [path for path, _ in allowed.requests] == expected
    # one lookup per connection opened, none "to check" besides it
    assert resolver.lookups == [HOST] * allowed.connections


def test_refused_first_answer_is_permanent_even_if_the_next_would_pass(
    servers, resolver, strict
) -> None:
    allowed, refused = servers
    resolver.script[HOST] = [[REFUSED_IP], [ALLOWED_IP]]
    error = _fetch_error(strict, f"http://{HOST}:{allowed.port}/page")
    assert error.permanent is True
    assert f"host '{HOST}' resolves to non-public address {REFUSED_IP}; {REFUSAL}" in str(error)
    assert allowed.connections == refused.connections == 0
    assert resolver.lookups == [HOST]


def test_every_address_of_an_answer_is_vetted(servers, resolver, strict) -> None:
    """One refused address among allowed ones refuses the host: the connection could fall
    back to it."""
    allowed, refused = servers
    resolver.script[HOST] = [[ALLOWED_IP, "169.254.169.254"]]
    error = _fetch_error(strict, f"http://{HOST}:{allowed.port}/page")
    assert error.permanent is True
    assert "non-public address 169.254.169.254" in str(error)
    assert allowed.connections == refused.connections == 0


def test_robots_txt_host_is_vetted_the_same_way(servers, resolver, strict) -> None:
    allowed, refused = servers
    resolver.script[HOST] = [[REFUSED_IP]]
    policy = CrawlPolicy(dataclasses.replace(strict, respect_robots=True))
    error = _fetch_error(strict, f"http://{HOST}:{allowed.port}/page", policy)
    assert error.permanent is True and REFUSAL in str(error)
    assert refused.connections == 0 and policy.fetched == {}


def test_redirect_hop_to_a_refused_address_is_not_connected(servers, resolver, strict) -> None:
    allowed, refused = servers
    resolver.script[HOST] = [[REFUSED_IP]]
    allowed.redirect_to = f"http://{HOST}:{allowed.port}/page"
    error = _fetch_error(strict, f"http://{ALLOWED_IP}:{allowed.port}/redirect")
    assert error.permanent is True
    assert f"non-public address {REFUSED_IP}; {REFUSAL}" in str(error)
    assert allowed.requests == [("/redirect", f"{ALLOWED_IP}:{allowed.port}")]
    assert refused.connections == 0


def test_redirect_to_cloud_metadata_is_refused(servers, strict) -> None:
    allowed, _ = servers
    allowed.redirect_to = "http://169.254.169.254/latest/meta-data/"
    error = _fetch_error(strict, f"http://{ALLOWED_IP}:{allowed.port}/redirect")
    assert error.permanent is True
    assert "host '169.254.169.254' resolves to non-public address 169.254.169.254" in str(error)


def test_dns_failure_is_transient(resolver, strict) -> None:
    resolver.script["nowhere.test"] = [socket.gaierror(socket.EAI_NONAME, "Name not known")]
    error = _fetch_error(strict, "http://nowhere.test/page")
    assert error.permanent is False
    assert "cannot resolve host 'nowhere.test'" in str(error)


def test_allow_private_fetches_loopback_by_name_with_the_name_as_host(servers, settings) -> None:
    allowed, _ = servers
    private = dataclasses.replace(settings, crawl_allow_private=True)
    fetched = _fetch(private, f"http://localhost:{allowed.port}/page")
    assert fetched.status == 200
    assert allowed.requests == [("/page", f"localhost:{allowed.port}")]


def test_unreachable_address_falls_back_to_the_next_vetted_one(servers, resolver, settings):
    allowed, _ = servers
    resolver.script[HOST] = [["127.0.0.3", ALLOWED_IP]]  # nothing listens on 127.0.0.3
    private = dataclasses.replace(settings, crawl_allow_private=True)
    assert _fetch(private, f"http://{HOST}:{allowed.port}/page").status == 200
    assert allowed.requests == [("/page", f"{HOST}:{allowed.port}")]
    assert resolver.lookups == [HOST]


def _self_signed_localhost(directory) -> tuple[str, str]:
    """A certificate for DNS name `localhost` only (no IP address), and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_file), str(key_file)


@pytest.fixture
def tls_server(tmp_path, monkeypatch) -> Iterator[_Server]:
    """HTTPS on 127.0.0.1 with a `localhost` certificate the crawler trusts (SSL_CERT_FILE)."""
    cert_file, key_file = _self_signed_localhost(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", cert_file)
    server = _Server(ALLOWED_IP)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    context.sni_callback = lambda sock, name, ctx: server.sni.append(name)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    yield server.serve()
    server.close()


def test_tls_uses_the_host_name_for_sni_and_certificate(tls_server, resolver, settings) -> None:
    """Connected to the IP, but SNI and verification use the URL's name: `localhost` passes,
    a name whose address is the same server but which the certificate does not cover fails."""
    private = dataclasses.replace(settings, crawl_allow_private=True, fetch_timeout=5.0)
    port = tls_server.port
    fetched = _fetch(private, f"https://localhost:{port}/page")
    assert fetched.status == 200
    assert tls_server.sni == ["localhost"]
    assert tls_server.requests == [("/page", f"localhost:{port}")]

    resolver.script[HOST] = [[ALLOWED_IP]]
    error = _fetch_error(private, f"https://{HOST}:{port}/page")
    assert error.permanent is False
    assert "CERTIFICATE_VERIFY_FAILED" in str(error)
    assert tls_server.sni[-1] == HOST  # the ClientHello named the host, not the IP
    assert len(tls_server.requests) == 1
