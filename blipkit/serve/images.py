"""Turn an ``image_url`` into a decoded image: data URIs always, http(s) only when allowed, local files never.

Remote downloads refuse non-public addresses (after resolving the host, on every redirect, and on the socket
actually connected), keep to a total deadline, and fail with one neutral error whatever the reason.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import functools
import hashlib
import http.client
import io
import ipaddress
import logging
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable

from PIL import Image

from blipkit.serve.errors import APIError

FETCH_TIMEOUT_S = 10.0  # total, across name resolution, connecting and reading every hop
MAX_REDIRECTS = 3
FETCH_FAILED = "cannot fetch image"
_REDIRECT_STATUSES = {301, 302, 303, 307, 308}
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_READ_CHUNK = 64 * 1024

log = logging.getLogger("blipkit.serve")


def image_hash(data: bytes) -> str:
    """Cache key of an image: SHA-256 of its encoded bytes."""
    return hashlib.sha256(data).hexdigest()


def _too_large(size: int, limit: int, param: str) -> APIError:
    return APIError(f"image is {size} bytes, over the limit of {limit} bytes", 413, "image_too_large", param)


def decode_data_uri(url: str, limit: int, param: str) -> bytes:
    """The bytes of a ``data:[<type>];base64,<data>`` URI, refusing more than ``limit`` bytes."""
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise APIError(
            "image data URI must be base64: data:image/png;base64,...", 400, "invalid_image_url", param
        )
    payload = "".join(payload.split())
    estimate = len(payload) * 3 // 4
    if estimate > limit + 2:
        raise _too_large(estimate, limit, param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(f"image data URI is not valid base64: {e}", 400, "invalid_base64", param) from e
    if len(data) > limit:
        raise _too_large(len(data), limit, param)
    if not data:
        raise APIError("image data URI is empty", 400, "invalid_image", param)
    return data


def _globally_routable(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return addr.is_global and not (
        addr.is_private
        or addr.is_loopback
        or addr.is_link_local
        or addr.is_multicast
        or addr.is_reserved
        or addr.is_unspecified
    )


def is_public_address(ip: str) -> bool:
    """Whether ``ip`` is a public unicast address; IPv4-mapped IPv6 is judged as its IPv4 address, and
    6to4, Teredo and NAT64 addresses only pass when the IPv4 addresses they embed are public too."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return _globally_routable(addr.ipv4_mapped)
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [addr]
    if isinstance(addr, ipaddress.IPv6Address):
        found += [a for a in (addr.sixtofour, *(addr.teredo or ())) if a is not None]
        if addr in _NAT64:
            found.append(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    return all(_globally_routable(a) for a in found)


class _Refused(Exception):
    """A download stopped on purpose: address, scheme, host, redirects, status or deadline."""


class _Download:
    """One remote image download: a total deadline, and an address check on every connection."""

    def __init__(self, limit: int, param: str, allow_private: bool, domains: set[str] | None, seconds: float):
        self.limit = limit
        self.param = param
        self.allow_private = allow_private
        self.domains = domains
        self.end = time.monotonic() + seconds
        self.expired = False
        self.sock: socket.socket | None = None
        self.lock = threading.Lock()

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0 or self.expired:
            raise _Refused("deadline passed")
        return left

    def address_ok(self, ip: str) -> bool:
        return self.allow_private or is_public_address(ip)

    def watch(self, sock: socket.socket) -> None:
        """Make ``sock`` the one the deadline shuts down."""
        with self.lock:
            if self.expired:
                raise _Refused("deadline passed")
            self.sock = sock

    def expire(self) -> None:
        with self.lock:
            self.expired = True
            if self.sock is not None:
                try:  # wakes a blocked read in the downloading thread; the base method also works for TLS
                    socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
                except OSError:
                    pass

    def resolve(self, host: str, port: int) -> list[str]:
        """The public addresses of ``host`` (all of them with ``allow_private``), in resolver order."""
        found: list[tuple] = []

        def lookup() -> None:
            try:
                found.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
            except (OSError, UnicodeError):
                pass

        thread = threading.Thread(target=lookup, daemon=True)
        thread.start()
        thread.join(self.left())
        addresses = list(dict.fromkeys(sockaddr[0] for *_, sockaddr in list(found)))
        usable = [ip for ip in addresses if self.address_ok(ip)]
        if not usable:
            raise _Refused(f"{host!r} has no address that may be fetched")
        return usable

    def get(self, url: str) -> bytes:
        for _ in range(MAX_REDIRECTS + 1):
            parts = urllib.parse.urlsplit(url)
            scheme = parts.scheme.lower()
            host = (parts.hostname or "").rstrip(".")
            if scheme not in ("http", "https") or not host:
                raise _Refused("not an http(s) URL")
            if self.domains is not None and host not in self.domains:
                raise _Refused(f"host {host!r} is not in the allowed media domains")
            port = parts.port or (443 if scheme == "https" else 80)
            conn = _PinnedConnection(self, host, port, self.resolve(host, port), scheme == "https")
            try:
                target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
                headers = {"User-Agent": "blipkit-serve", "Accept": "image/*", "Connection": "close"}
                conn.request("GET", target, headers=headers)
                response = conn.getresponse()
                location = response.getheader("location")
                if response.status in _REDIRECT_STATUSES and location:
                    url = urllib.parse.urljoin(url, location)
                    continue
                if not 200 <= response.status < 300:
                    raise _Refused(f"HTTP status {response.status}")
                return self.read(response)
            finally:
                conn.close()
        raise _Refused(f"more than {MAX_REDIRECTS} redirects")

    def read(self, response: http.client.HTTPResponse) -> bytes:
        length = (response.getheader("content-length") or "").strip()
        if length.isdigit() and int(length) > self.limit:
            raise _too_large(int(length), self.limit, self.param)
        chunks: list[bytes] = []
        size = 0
        while chunk := response.read1(_READ_CHUNK):
            size += len(chunk)
            if size > self.limit:
                raise _too_large(size, self.limit, self.param)
            chunks.append(chunk)
        self.left()  # a body cut short by the deadline is not an image
        if response.length:
            raise _Refused("connection closed before the end of the body")
        return b"".join(chunks)


class _PinnedConnection(http.client.HTTPConnection):
    """HTTP(S) to checked addresses only; Host header, TLS SNI and certificate check use the URL's host."""

    def __init__(self, download: _Download, host: str, port: int, addresses: list[str], tls: bool):
        super().__init__(host, port, timeout=download.left())
        self.download = download
        self.addresses = addresses
        self.tls = tls
        self.default_port = 443 if tls else 80

    def connect(self) -> None:
        error: OSError | None = None
        for address in self.addresses:
            try:
                sock = socket.create_connection((address, self.port), self.download.left())
                break
            except OSError as e:
                error = e
        else:
            raise error or _Refused("no address to connect to")
        try:
            self.download.watch(sock)
            if not self.download.address_ok(sock.getpeername()[0]):
                raise _Refused("connected to an address that may not be fetched")
            if self.tls:
                context = ssl.create_default_context()
                sock = context.wrap_socket(sock, server_hostname=self.host, do_handshake_on_connect=False)
                self.download.watch(sock)
                sock.do_handshake()
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def fetch_remote(
    url: str,
    limit: int,
    param: str,
    *,
    allow_private_networks: bool = False,
    allowed_domains: Iterable[str] | None = None,
    timeout_s: float = FETCH_TIMEOUT_S,
) -> bytes:
    """Download an http(s) image (blocking), refusing more than ``limit`` bytes.

    Only public addresses are fetched unless ``allow_private_networks``; with ``allowed_domains`` only those
    hosts. At most ``MAX_REDIRECTS`` redirects, each checked like the first, all within ``timeout_s`` seconds.
    Every refusal and failure raises the same ``cannot fetch image`` error (the reason is only logged).
    """
    domains = normalize_domains(allowed_domains)
    download = _Download(limit, param, allow_private_networks, domains, timeout_s)
    timer = threading.Timer(timeout_s, download.expire)
    timer.daemon = True
    timer.start()
    try:
        return download.get(url)
    except (_Refused, OSError, ValueError, http.client.HTTPException) as e:
        log.info("remote image not fetched (%s): %.200s", e, url)
        raise APIError(FETCH_FAILED, 400, "image_fetch_failed", param) from None
    finally:
        timer.cancel()


def normalize_domains(domains: Iterable[str] | None) -> set[str] | None:
    """Host names as URLs' ``hostname`` gives them: lower case, no trailing dot; None stays None."""
    if domains is None:
        return None
    return {d.strip().lower().rstrip(".") for d in domains if d.strip()}


def open_image(data: bytes, max_pixels: int, param: str, draft_size: int | None = None) -> Image.Image:
    """Decode ``data``, refusing images over ``max_pixels`` from their header, before decoding them.

    A JPEG larger than ``draft_size`` on both sides is decoded reduced (by 1/2, 1/4 or 1/8), staying at
    least ``draft_size`` on each side.
    """
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        message = f"image is over the limit of {max_pixels} pixels: {e}"
        raise APIError(message, 400, "too_many_pixels", param) from None
    except Exception as e:  # PIL raises many kinds for unreadable headers
        raise APIError(f"cannot decode image: {e}", 400, "invalid_image", param) from None
    width, height = image.size
    if width * height > max_pixels:
        raise APIError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} pixels",
            400,
            "too_many_pixels",
            param,
        )
    if draft_size and image.format == "JPEG":
        image.draft("RGB", (draft_size, draft_size))
    try:
        image.load()
    except Exception as e:
        raise APIError(
            f"cannot decode image: truncated or corrupt: {e}", 400, "invalid_image", param
        ) from None
    return image


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def release_memory() -> None:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim``); does nothing elsewhere."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def check_image_url(url: str, allow_remote: bool, param: str) -> str:
    """The URL's kind, ``"data"`` or ``"remote"``; anything else (file://, paths) is refused."""
    # only the scheme goes to urlsplit: it keeps its last 128 URLs (an lru_cache), and a data URI is an image
    scheme = urllib.parse.urlsplit(url[: url.find(":") + 1]).scheme.lower() if ":" in url else ""
    if scheme == "data":
        return "data"
    if scheme in ("http", "https"):
        if not allow_remote:
            raise APIError(
                "remote image URLs are disabled on this server (start it with --allow-remote-images); "
                "send the image as a data: URI",
                400,
                "remote_images_disabled",
                param,
            )
        return "remote"
    if scheme == "file" or not scheme or len(scheme) == 1:  # file://, /abs/path, rel/path, C:\path
        raise APIError(
            "local files cannot be used as images; send a data: URI", 400, "local_image_refused", param
        )
    raise APIError(f"unsupported image URL scheme {scheme!r}", 400, "invalid_image_url", param)
