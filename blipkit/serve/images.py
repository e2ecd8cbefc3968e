"""Turn an ``image_url`` into bytes: data URIs always, http(s) only when allowed, local files never."""

from __future__ import annotations

import base64
import binascii
import hashlib
import urllib.error
import urllib.parse
import urllib.request

from blipkit.serve.errors import APIError

FETCH_TIMEOUT_S = 10.0


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


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise urllib.error.URLError(f"redirect to a non-http URL refused: {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_remote(url: str, limit: int, param: str) -> bytes:
    """Download an http(s) image (blocking), refusing more than ``limit`` bytes."""
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    request = urllib.request.Request(url, headers={"User-Agent": "blipkit-serve"})
    try:
        with opener.open(request, timeout=FETCH_TIMEOUT_S) as response:
            data = response.read(limit + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise APIError(f"cannot fetch image {url}: {e}", 400, "image_fetch_failed", param) from e
    if len(data) > limit:
        raise _too_large(len(data), limit, param)
    return data


def check_image_url(url: str, allow_remote: bool, param: str) -> str:
    """The URL's kind, ``"data"`` or ``"remote"``; anything else (file://, paths) is refused."""
    scheme = urllib.parse.urlsplit(url).scheme.lower() if ":" in url else ""
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
