"""Outbound URL allow-list: the check every URL a user or a registry entry gave us passes
before Stagegate connects to it (reference data sources, alert webhooks).

`check_url` refuses other schemes, userinfo, path traversal (plain or percent-encoded, up to
three times), and hosts that resolve to addresses a server-side request must not reach: cloud
metadata, link-local, unspecified, multicast and reserved addresses always; loopback and
private networks (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7 and every other non-global
range) unless `allow_private` or the exact host is in `allowed_hosts`. IPv4 embedded in IPv6
(mapped `::ffff:a.b.c.d`, NAT64, 6to4, compatible) is judged as the IPv4 it carries, and IPv4
hosts written in decimal, octal, hex or short form (`2130706433`, `0x7f.1`) are read the way
the C resolver reads them, then written back in dotted form.

DNS rebinding: a name checked now may resolve elsewhere when the client connects. Either call
`check_url` right before each request (a narrow window), or close the window with
`resolve_url`, which returns the checked addresses, and connect to one of them:

    checked = resolve_url(url)
    httpx.get(checked.pinned_url, headers={"Host": checked.host_header},
              extensions={"sni_hostname": checked.host})  # TLS still verifies the name

Use a client with `trust_env=False` (a proxy from the environment would resolve the name
itself) and follow redirects by hand, checking each `Location`.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

from stagegate.errors import InvalidInput

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_Refuse = Callable[[str], InvalidInput]  # builds the error, naming the URL

MAX_URL_CHARS = 2048
DEFAULT_PORTS = {"http": 80, "https": 443}
# How many times a path is percent-decoded while looking for `..` (`%252e` is `.` twice).
_DECODE_ROUNDS = 3

# Instance metadata services answer with credentials: never reachable, whatever the settings.
METADATA_HOSTS = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "metadata.azure.internal",
        "instance-data",
        "instance-data.ec2.internal",
    }
)
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, Oracle
        "169.254.170.2",  # AWS ECS task credentials
        "100.100.100.200",  # Alibaba Cloud
        "fd00:ec2::254",  # AWS over IPv6
    )
)
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_V4_COMPATIBLE = ipaddress.ip_network("::/96")
_HOST_RE = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*$")
_NUMERIC_LABEL_RE = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")


@dataclass(frozen=True)
class CheckedURL:
    """A URL that passed the check, with every address its host resolved to (all checked)."""

    url: str  # normalised: lower-case scheme and host, dotted IPv4, no fragment
    scheme: str
    host: str  # a DNS name or an IP address, without brackets
    port: int  # explicit, or the scheme's default
    addresses: tuple[str, ...]

    @property
    def address(self) -> str:
        """The address to connect to (the first the resolver gave)."""
        return self.addresses[0]

    @property
    def host_header(self) -> str:
        """The `Host` header the server expects: the name, with the port when not the default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if DEFAULT_PORTS.get(self.scheme) == self.port else f"{host}:{self.port}"

    @property
    def pinned_url(self) -> str:
        """`url` with the host replaced by `address`: connecting to it skips a second lookup."""
        parts = urlsplit(self.url)
        ip = f"[{self.address}]" if ":" in self.address else self.address
        return urlunsplit((parts.scheme, f"{ip}:{self.port}", parts.path, parts.query, ""))


def check_url(
    url: str,
    *,
    allow_private: bool = False,
    allowed_hosts: frozenset[str] = frozenset(),
    schemes: tuple[str, ...] = ("https", "http"),
) -> str:
    """The normalised URL if Stagegate may send a request to it; InvalidInput with the reason
    otherwise. Resolves the host (every address must pass)."""
    return resolve_url(
        url, allow_private=allow_private, allowed_hosts=allowed_hosts, schemes=schemes
    ).url


def resolve_url(
    url: str,
    *,
    allow_private: bool = False,
    allowed_hosts: frozenset[str] = frozenset(),
    schemes: tuple[str, ...] = ("https", "http"),
) -> CheckedURL:
    """`check_url`, returning the checked addresses too, so the caller can connect to one of
    them instead of resolving the name again (DNS rebinding)."""
    if not isinstance(url, str) or not url:
        raise InvalidInput("URL refused: empty")
    shown = url if len(url) <= 200 else url[:200] + "..."
    if len(url) > MAX_URL_CHARS:
        raise InvalidInput(f"URL refused: longer than {MAX_URL_CHARS} characters: {shown!r}")

    def refuse(reason: str) -> InvalidInput:
        return InvalidInput(f"URL {shown!r} refused: {reason}")

    parts, scheme, port = _parse(url, tuple(s.lower() for s in schemes), refuse)
    host, ip = _normalise_host(parts.hostname or "", refuse)
    if host in METADATA_HOSTS:
        raise refuse(f"host {host!r} is a cloud metadata service")
    trusted = host in {h.lower().rstrip(".") for h in allowed_hosts}
    addresses = [ip] if ip is not None else _resolve(host, port, refuse)
    for address in addresses:
        problem = classify(address)
        if problem is not None and (problem[1] or not (allow_private or trusted)):
            via = "" if ip is not None else f" (resolves to {address})"
            raise refuse(f"host {host!r}{via} is {problem[0]}")

    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    normalised = urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))
    return CheckedURL(
        url=normalised,
        scheme=scheme,
        host=host,
        port=port,
        addresses=tuple(dict.fromkeys(str(a) for a in addresses)),
    )


def classify(ip: IPAddress) -> tuple[str, bool] | None:
    """None for a public address; else (what it is, whether it is refused even when private
    addresses are allowed)."""
    embedded = _embedded_ipv4(ip)
    if embedded is not None:
        inner = classify(embedded)
        return None if inner is None else (f"IPv4 {embedded} inside IPv6: {inner[0]}", inner[1])
    v4 = ip.version == 4
    rules = (  # first match wins: metadata before private, for 100.100.100.200 and fd00:ec2::254
        (ip in METADATA_ADDRESSES, "a cloud metadata address", True),
        (ip.is_unspecified or (v4 and ip in _THIS_NETWORK), "an unspecified address", True),
        (ip.is_link_local, "a link-local address", True),
        (ip.is_multicast, "a multicast address", True),
        (v4 and ip.is_reserved, "a reserved address", True),  # 240/4, broadcast included
        (ip.is_loopback, "a loopback address", False),
        (not ip.is_global, "a private (non-global) address", False),
    )
    return next(((what, never) for hit, what, never in rules if hit), None)


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    if ip.version != 6:
        return None
    assert isinstance(ip, ipaddress.IPv6Address)
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or (ip in _V4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _parse(url: str, schemes: tuple[str, ...], refuse: _Refuse) -> tuple[SplitResult, str, int]:
    """(the split URL, its scheme, its port) after the checks that need no DNS."""
    # urlsplit silently drops tabs and newlines, and some clients read `\` as `/`.
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F or ch == "\\" for ch in url):
        raise refuse("it contains whitespace, control characters or backslashes")
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unbalanced or invalid bracketed host
        raise refuse(f"not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        raise refuse(f"scheme {scheme or '(none)'!r} is not one of {', '.join(schemes)}")
    if "@" in parts.netloc:
        raise refuse("credentials (user info) in URLs are not allowed")
    try:
        port = parts.port
    except ValueError:
        raise refuse("invalid port") from None
    if port == 0:
        raise refuse("invalid port 0")
    port = port or DEFAULT_PORTS.get(scheme)
    if port is None:
        raise refuse(f"no port given and scheme {scheme!r} has no default")
    _check_path(parts.path, refuse)
    return parts, scheme, port


def _check_path(path: str, refuse: _Refuse) -> None:
    text = path
    for _ in range(_DECODE_ROUNDS + 1):
        # `..;x` is `..` to some servers (Tomcat); `\` was refused above but may be encoded.
        if any(seg.split(";", 1)[0] == ".." for seg in re.split(r"[/\\]", text)):
            raise refuse("path traversal ('..') in the path")
        decoded = unquote(text)
        if decoded == text:
            return
        text = decoded
    raise refuse(f"path is percent-encoded more than {_DECODE_ROUNDS} times")


def _normalise_host(raw: str, refuse: _Refuse) -> tuple[str, IPAddress | None]:
    """(host, its address when it is an IP literal). Names are IDNA-encoded and lower-cased."""
    host = raw.lower()
    if host.endswith("."):
        host = host[:-1]
    if not host:
        raise refuse("no host")
    if ":" in host:  # urlsplit only gives colons for a bracketed IPv6 literal
        if "%" in host:
            raise refuse("IPv6 zone ids are not allowed")
        try:
            return host, ipaddress.IPv6Address(host)
        except ValueError:
            raise refuse(f"invalid IPv6 address {host!r}") from None
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise refuse(f"invalid host name {raw!r}") from None
    labels = host.split(".")
    # As in the WHATWG URL standard: a numeric last label makes the whole host an IPv4 address,
    # which the C resolver reads in decimal, octal or hex, with 1 to 4 parts.
    if _NUMERIC_LABEL_RE.fullmatch(labels[-1]):
        try:
            packed = socket.inet_aton(host)
        except OSError:
            raise refuse(f"invalid IPv4 address {host!r}") from None
        ip = ipaddress.IPv4Address(packed)
        return str(ip), ip
    if not _HOST_RE.fullmatch(host) or len(host) > 253:
        raise refuse(f"invalid host name {raw!r}")
    return host, None


def _resolve(host: str, port: int, refuse: _Refuse) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise refuse(f"host {host!r} does not resolve ({exc})") from None
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        text = str(sockaddr[0]).split("%", 1)[0]  # drop an IPv6 zone id
        addresses.append(ipaddress.ip_address(text))
    if not addresses:
        raise refuse(f"host {host!r} has no address")
    return addresses
