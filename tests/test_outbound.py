"""`stagegate.outbound`: which URLs Stagegate may send a request to, and pinning the address."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

import httpx
import pytest

from stagegate.errors import InvalidInput
from stagegate.outbound import check_url, resolve_url


class Listener:
    """A real HTTP server on 127.0.0.1 that records every request it gets.

    `routes` maps a path to (status, headers, body); other paths answer 404. A header
    `X-No-Length` leaves out Content-Length: the body then ends when the connection closes."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []  # (path, Host header)
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                listener.requests.append((self.path, self.headers.get("Host", "")))
                status, headers, body = listener.routes.get(self.path, (404, {}, b"not here"))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if "X-No-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Listener:
        self.thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def listener() -> Iterator[Listener]:
    with Listener() as running:
        yield running


# Refused whatever the settings: other schemes, credentials, no host, traversal, metadata,
# link-local, unspecified, multicast and reserved addresses, however they are written.
ALWAYS_REFUSED = {
    "file:///etc/passwd": "scheme 'file'",
    "FILE://localhost/etc/passwd": "scheme 'file'",
    "ftp://1.1.1.1/x": "scheme 'ftp'",
    "gopher://1.1.1.1:70/_x": "scheme 'gopher'",
    "data:text/plain,hello": "scheme 'data'",
    "javascript:alert(1)": "scheme 'javascript'",
    "//1.1.1.1/x": "scheme '(none)'",
    "http://user:secret@1.1.1.1/": "credentials",
    "http://user@127.0.0.1/": "credentials",
    "http://1.1.1.1@127.0.0.1/": "credentials",
    "http:///x": "no host",
    "http://:80/x": "no host",
    "http://1.1.1.1/a/../b": "traversal",
    "http://1.1.1.1/..": "traversal",
    "http://1.1.1.1/a/%2e%2e/b": "traversal",
    "http://1.1.1.1/a/%2E%2E/b": "traversal",
    "http://1.1.1.1/a/.%2e/b": "traversal",
    "http://1.1.1.1/a/%252e%252e/b": "traversal",
    "http://1.1.1.1/a/%25252e%25252e/b": "traversal",
    "http://1.1.1.1/a/..;/b": "traversal",
    "http://1.1.1.1/a/%2e%2e%5cb": "traversal",
    "http://1.1.1.1/%2525252e": "percent-encoded more than",
    "http://1.1.1.1\\@127.0.0.1/": "backslashes",
    "http://1.1.1.1/a b": "whitespace",
    "http://1.1.1.1/a\nb": "whitespace",
    "http://1.1.1.1:0/": "port",
    "http://1.1.1.1:99999/": "port",
    "http://1.1.1.1:x/": "port",
    "http://1.2.3.4.5/": "invalid IPv4",
    "http://08.0.0.1/": "invalid IPv4",
    "http://example.123/": "invalid IPv4",
    "http://exa_mple!.com/": "invalid host",
    "http://[fe80::1%25eth0]/": "zone ids",
    "http://[2606:4700::1%25eth0]/": "zone ids",
    "http://[1.2.3.4]/": "not a valid URL",
    "http://[::1/": "not a valid URL",
    "http://[zz::1]/": "not a valid URL",
    "http://no-such-host.invalid/": "does not resolve",
    "http://169.254.169.254/latest/meta-data/": "cloud metadata",
    "http://169.254.170.2/v2/credentials": "cloud metadata",
    "http://2852039166/": "cloud metadata",  # 169.254.169.254 in decimal
    "http://0xa9.0xfe.0xa9.0xfe/": "cloud metadata",
    "http://0251.0376.0251.0376/": "cloud metadata",
    "http://169.254.43518/": "cloud metadata",
    "http://[::ffff:169.254.169.254]/": "cloud metadata",
    "http://[::ffff:a9fe:a9fe]/": "cloud metadata",
    "http://[64:ff9b::a9fe:a9fe]/": "cloud metadata",  # NAT64
    "http://[2002:a9fe:a9fe::1]/": "cloud metadata",  # 6to4
    "http://[fd00:ec2::254]/": "cloud metadata",
    "http://100.100.100.200/": "cloud metadata",
    "http://metadata.google.internal/computeMetadata/v1/": "cloud metadata service",
    "http://METADATA.Google.Internal./": "cloud metadata service",
    "http://metadata/": "cloud metadata service",
    "http://169.254.1.1/": "link-local",
    "http://[fe80::1]/": "link-local",
    "http://[::ffff:169.254.1.1]/": "link-local",
    "http://0.0.0.0:8080/": "unspecified",
    "http://0/": "unspecified",
    "http://[::]/": "unspecified",
    "http://[::ffff:0.0.0.0]/": "unspecified",
    "http://224.0.0.1/": "multicast",
    "http://[ff02::1]/": "multicast",
    "http://240.0.0.1/": "reserved",
    "http://255.255.255.255/": "reserved",
}

# Refused by default; allowed with allow_private=True.
PRIVATE = {
    "http://127.0.0.1/": "loopback",
    "http://localhost/": "resolves to 127.0.0.1",
    "http://LOCALHOST./x": "loopback",
    "http://2130706433/": "loopback",
    "http://0x7f.1/": "loopback",
    "http://0x7f000001/": "loopback",
    "http://0177.0.0.1/": "loopback",
    "http://127.1/": "loopback",
    "http://[::1]/": "loopback",
    "http://[::ffff:127.0.0.1]/": "IPv4 127.0.0.1 inside IPv6: a loopback",
    "http://[::ffff:7f00:1]/": "loopback",
    "http://10.0.0.1/": "private",
    "http://172.16.5.4/": "private",
    "http://172.31.255.255/": "private",
    "http://192.168.1.1/": "private",
    "http://100.64.0.1/": "private",
    "http://[fc00::1]/": "private",
    "http://[fd12:3456::1]/": "private",
    "http://[::ffff:10.1.2.3]/": "private",
    "http://192.0.2.1/": "private",  # documentation range: not global either
}

PUBLIC = {
    "http://1.1.1.1/": "http://1.1.1.1/",
    "http://1.1.1.1": "http://1.1.1.1/",
    "HTTPS://8.8.8.8:8443/a/b.parquet?v=2#part": "https://8.8.8.8:8443/a/b.parquet?v=2",
    "http://16843009/x": "http://1.1.1.1/x",  # decimal form, written back dotted
    "http://0x01.1.1.1/": "http://1.1.1.1/",
    "http://[2606:4700:4700::1111]:8080/": "http://[2606:4700:4700::1111]:8080/",
    "http://172.32.0.1/": "http://172.32.0.1/",  # just outside 172.16/12
    "http://1.1.1.1/a/.../b%20c": "http://1.1.1.1/a/.../b%20c",  # '...' is a name, not '..'
}


@pytest.mark.parametrize(("url", "reason"), ALWAYS_REFUSED.items())
def test_always_refused(url: str, reason: str) -> None:
    for allow_private in (False, True):
        with pytest.raises(InvalidInput, match="refused") as info:
            check_url(url, allow_private=allow_private)
        assert reason in info.value.detail


@pytest.mark.parametrize(("url", "reason"), PRIVATE.items())
def test_private_refused_unless_allowed(url: str, reason: str) -> None:
    with pytest.raises(InvalidInput) as info:
        check_url(url)
    assert reason in info.value.detail
    assert check_url(url, allow_private=True).startswith("http://")


@pytest.mark.parametrize(("url", "normalised"), PUBLIC.items())
def test_public_addresses_pass_normalised(url: str, normalised: str) -> None:
    assert check_url(url) == normalised


def test_empty_and_long_urls() -> None:
    with pytest.raises(InvalidInput, match="empty"):
        check_url("")
    with pytest.raises(InvalidInput, match="longer than 2048"):
        check_url("http://1.1.1.1/" + "a" * 2048)


def test_schemes_can_be_narrowed() -> None:
    assert check_url("https://1.1.1.1/", schemes=("https",)) == "https://1.1.1.1/"
    with pytest.raises(InvalidInput, match="scheme 'http' is not one of https"):
        check_url("http://1.1.1.1/", schemes=("https",))


def test_allowed_hosts_open_private_hosts_but_never_metadata() -> None:
    assert check_url("http://localhost:9/x", allowed_hosts=frozenset({"LocalHost"})) == (
        "http://localhost:9/x"
    )
    with pytest.raises(InvalidInput, match="loopback"):
        check_url("http://127.0.0.1:9/x", allowed_hosts=frozenset({"localhost"}))  # exact host
    for host in ("169.254.169.254", "metadata.google.internal", "169.254.1.1"):
        with pytest.raises(InvalidInput, match=r"metadata|link-local"):
            check_url(f"http://{host}/", allowed_hosts=frozenset({host}))


def test_resolve_url_returns_the_checked_address_to_connect_to() -> None:
    checked = resolve_url("http://localhost:8123/data/x.parquet?v=1", allow_private=True)

    assert checked.url == "http://localhost:8123/data/x.parquet?v=1"
    assert (checked.host, checked.port) == ("localhost", 8123)
    assert "127.0.0.1" in checked.addresses or "::1" in checked.addresses
    assert checked.pinned_url.endswith(":8123/data/x.parquet?v=1")
    assert "localhost" not in checked.pinned_url
    assert checked.host_header == "localhost:8123"
    v6 = resolve_url("https://[2606:4700:4700::1111]/")
    assert v6.pinned_url == "https://[2606:4700:4700::1111]:443/"
    assert v6.host_header == "[2606:4700:4700::1111]"


def _send(url: str, *, allow_private: bool = False) -> httpx.Response:
    """What a careful caller does: check, then connect to the checked address."""
    checked = resolve_url(url, allow_private=allow_private)
    with httpx.Client(trust_env=False, follow_redirects=False, timeout=5) as client:
        return client.get(checked.pinned_url, headers={"Host": checked.host_header})


def test_nothing_reaches_a_local_listener_unless_private_is_allowed(listener: Listener) -> None:
    listener.routes["/hook"] = (200, {}, b"ok")
    port = listener.port
    forms = [
        f"http://127.0.0.1:{port}/hook",
        f"http://localhost:{port}/hook",
        f"http://2130706433:{port}/hook",
        f"http://0x7f.1:{port}/hook",
        f"http://0177.0.0.1:{port}/hook",
        f"http://[::ffff:127.0.0.1]:{port}/hook",
    ]
    for url in forms:
        with pytest.raises(InvalidInput, match="loopback"):
            _send(url)
    for url in (
        f"http://0.0.0.0:{port}/hook",  # Linux connects 0.0.0.0 to this host: never allowed
        f"http://127.0.0.1:{port}/a/%2e%2e/hook",
        f"file://127.0.0.1:{port}/hook",
    ):
        with pytest.raises(InvalidInput):
            _send(url, allow_private=True)
    assert listener.requests == []

    response = _send(f"http://localhost:{port}/hook", allow_private=True)
    assert (response.status_code, response.text) == (200, "ok")
    assert _send(f"http://2130706433:{port}/hook", allow_private=True).status_code == 200
    assert listener.requests == [
        ("/hook", f"localhost:{port}"),  # connected to the pinned address, Host kept
        ("/hook", f"127.0.0.1:{port}"),
    ]
