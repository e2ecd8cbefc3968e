"""The server against hostile input: SSRF, slow origins, endless bodies, pixel bombs, odd JSON, bad flags."""

from __future__ import annotations

import contextlib
import ctypes
import http.server
import io
import json
import logging
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image
from test_serve_live import data_uri, png

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
from fastapi.testclient import TestClient  # noqa: E402
from live_server import live  # noqa: E402

import blipkit  # noqa: E402
from blipkit.serve import create_app  # noqa: E402
from blipkit.serve import images as serve_images  # noqa: E402
from blipkit.serve.errors import APIError  # noqa: E402

NEUTRAL = {"message": "cannot fetch image", "code": "image_fetch_failed", "status": 400}


def chat(url: str, question: str = "what is it?", **options) -> dict:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **options}


def rss_mb() -> float:
    """This process's resident memory, from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@contextlib.contextmanager
def peak_rss() -> Iterator[dict[str, float]]:
    """Samples RSS every few ms while the block runs: ``{"start", "peak", "end"}`` in MB."""
    seen = {"start": rss_mb(), "peak": rss_mb()}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            seen["peak"] = max(seen["peak"], rss_mb())
            time.sleep(0.003)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        done.set()
        thread.join()
        seen["end"] = rss_mb()


def flat_png(width: int, height: int, shade: int = 0) -> bytes:
    """A one-colour RGB PNG of any size, built row by row (small on the wire, large decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(1)
    row = b"\x00" + bytes([shade]) * (3 * width)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class Origin(http.server.ThreadingHTTPServer):
    """A local image origin that records each request's path and Host header.

    ``/img.png`` is an image, ``redirects`` maps paths to Location headers, ``/drip`` sends its body a
    byte every 0.1 s (for ``drip_s`` seconds), anything else is a 404.
    """

    daemon_threads = True

    def __init__(self, host: str = "127.0.0.1", port: int = 0, image: bytes = b"", drip_s: float = 8.0):
        super().__init__((host, port), _OriginHandler)
        self.image = image or png(1)
        self.drip_s = drip_s
        self.redirects: dict[str, str] = {}
        self.hits: list[tuple[str, str]] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def url(self, path: str, host: str | None = None) -> str:
        return f"http://{host or self.server_address[0]}:{self.port}{path}"

    def paths(self) -> list[str]:
        return [path for path, _ in self.hits]

    def handle_error(self, request, client_address) -> None:  # noqa: ANN001
        pass  # clients hanging up on the drip are expected


class _OriginHandler(http.server.BaseHTTPRequestHandler):
    server: Origin

    def do_GET(self) -> None:  # noqa: N802
        self.server.hits.append((self.path, self.headers.get("Host", "")))
        if self.path in self.server.redirects:
            self.send_response(302)
            self.send_header("Location", self.server.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/img.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(self.server.image)))
            self.end_headers()
            self.wfile.write(self.server.image)
        elif self.path == "/drip":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            end = time.monotonic() + self.server.drip_s
            with contextlib.suppress(OSError):
                while time.monotonic() < end:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
        else:
            self.send_error(404)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def model(opt_dir):
    return blipkit.load(opt_dir)


@pytest.fixture()
def origin():
    server = Origin()
    yield server
    server.shutdown()
    server.server_close()


def neutral(error: dict | APIError, status: int | None = None) -> bool:
    if isinstance(error, APIError):
        return (error.message, error.code, error.status) == tuple(NEUTRAL.values())
    return (error["message"], error["code"], status) == tuple(NEUTRAL.values())


# --- SSRF ---------------------------------------------------------------------------------------------


def test_remote_images_from_private_addresses_are_refused(model, origin):
    client = TestClient(create_app(model, allow_remote_images=True))
    hosts = ["127.0.0.1", "localhost", "2130706433", "0x7f000001", "127.1", "0.0.0.0", "[::1]"]
    hosts += ["[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[::]"]
    for host in hosts:
        r = client.post("/v1/chat/completions", json=chat(origin.url("/img.png", host)))
        assert neutral(r.json()["error"], r.status_code), (host, r.text)
    assert origin.hits == []  # refused before connecting


@pytest.mark.parametrize(
    "ip,public",
    [
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("::ffff:8.8.8.8", True),
        ("10.0.0.1", False),
        ("172.16.5.4", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("224.0.0.1", False),
        ("240.0.0.1", False),
        ("255.255.255.255", False),
        ("0.0.0.0", False),
        ("::", False),
        ("::1", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("ff02::1", False),
        ("::ffff:10.0.0.1", False),
        ("::127.0.0.1", False),
        ("2002:7f00:1::", False),
        ("64:ff9b::a00:1", False),
    ],
)
def test_public_address_rule(ip, public):
    assert serve_images.is_public_address(ip) is public


def test_every_fetch_failure_gives_the_same_error(origin):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    origin.redirects = {"/loop": "/loop", "/to-file": "file:///etc/passwd", "/to-ftp": "ftp://127.0.0.1/x"}
    cases = [
        (f"http://127.0.0.1:{closed_port}/img.png", True),  # closed port
        (origin.url("/missing.png"), True),  # open port, 404
        (origin.url("/loop"), True),
        (origin.url("/to-file"), True),
        (origin.url("/to-ftp"), True),
        ("http://name.invalid/img.png", True),
        (origin.url("/img.png"), False),  # a refused address
    ]
    seen = set()
    for url, allow_private in cases:
        with pytest.raises(APIError) as caught:
            serve_images.fetch_remote(url, 10**6, "p", allow_private_networks=allow_private, timeout_s=3)
        seen.add((caught.value.status, caught.value.code, caught.value.message))
    assert seen == {(400, "image_fetch_failed", "cannot fetch image")}
    assert serve_images.fetch_remote(origin.url("/img.png"), 10**6, "p", allow_private_networks=True)


@pytest.fixture()
def second_origin(origin):
    """An origin on 127.0.0.2 (same port as ``origin``); only 127.0.0.1 counts as public here."""
    try:
        other = Origin("127.0.0.2", origin.port)
    except OSError:
        pytest.skip("cannot bind 127.0.0.2 on this machine")
    yield other
    other.shutdown()
    other.server_close()


@pytest.fixture()
def only_127_0_0_1_is_public(monkeypatch):
    monkeypatch.setattr(serve_images, "is_public_address", lambda ip: ip == "127.0.0.1", raising=False)


def test_redirects_are_checked_again_and_capped(origin, second_origin, only_127_0_0_1_is_public):
    fetch = serve_images.fetch_remote
    assert fetch(origin.url("/img.png"), 10**6, "p") == origin.image  # the first hop is allowed
    origin.redirects = {"/hop": second_origin.url("/img.png"), "/loop": "/loop"}
    for path in ("/hop", "/loop"):
        with pytest.raises(APIError) as caught:
            fetch(origin.url(path), 10**6, "p")
        assert neutral(caught.value)
    assert second_origin.hits == []  # the redirect to a private address was not followed
    assert origin.paths().count("/loop") == 1 + serve_images.MAX_REDIRECTS


def test_the_checked_address_is_the_one_connected(
    origin, second_origin, only_127_0_0_1_is_public, monkeypatch
):
    real = socket.getaddrinfo
    answers = iter(["127.0.0.1"] + ["127.0.0.2"] * 10)  # DNS rebinding: public first, private after

    def rebinding(host, port, *args, **kwargs):
        if host != "rebind.test":
            return real(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    url = f"http://rebind.test:{origin.port}/img.png"
    assert serve_images.fetch_remote(url, 10**6, "p") == origin.image
    assert origin.hits == [("/img.png", f"rebind.test:{origin.port}")] and second_origin.hits == []


def test_allowed_media_domains(model, origin):
    app = create_app(model, allowed_media_domains=["LocalHost"], allow_private_networks=True)
    client = TestClient(app)
    ok = client.post("/v1/chat/completions", json=chat(origin.url("/img.png", "localhost")))
    assert ok.status_code == 200, ok.text
    refused = client.post("/v1/chat/completions", json=chat(origin.url("/img.png", "127.0.0.1")))
    assert neutral(refused.json()["error"], refused.status_code)
    assert len(origin.hits) == 1


def test_slow_origins_do_not_hold_up_other_requests(model, origin):
    timeout = 2.0
    app = create_app(
        model, allow_remote_images=True, allow_private_networks=True, image_fetch_timeout_s=timeout
    )
    with live(app) as base, httpx.Client(base_url=base, timeout=30) as client:
        client.post("/v1/chat/completions", json=chat(data_uri(png(3))))  # warm up

        def drip() -> tuple[int, dict, float]:
            start = time.monotonic()
            r = client.post("/v1/chat/completions", json=chat(origin.url("/drip")))
            return r.status_code, r.json()["error"], time.monotonic() - start

        with ThreadPoolExecutor(8) as pool:
            drips = [pool.submit(drip) for _ in range(8)]
            deadline = time.monotonic() + 10
            while origin.paths().count("/drip") < 8:
                assert time.monotonic() < deadline, "the drip fetches did not all start"
                time.sleep(0.02)
            start = time.monotonic()
            assert client.get("/health").status_code == 200
            health_s = time.monotonic() - start
            start = time.monotonic()
            answered = client.post("/v1/chat/completions", json=chat(data_uri(png(4))))
            chat_s = time.monotonic() - start
            still_dripping = not any(d.done() for d in drips)
            results = [d.result() for d in drips]
    assert health_s < 1.0
    assert answered.status_code == 200 and still_dripping, (chat_s, answered.text)
    for status, error, took in results:
        assert neutral(error, status)
        assert timeout - 0.2 < took < timeout + 2.0


def test_a_long_history_is_fitted_off_the_event_loop(model):
    """A 2,000-turn conversation: its prompt is fitted (linear in the turns, in a worker thread) while
    ``/health`` keeps answering."""
    url = data_uri(png(5))
    turns = []
    for i in range(2000):
        turns += [
            {"role": "user", "content": f"is the shape number {i} red?"},
            {"role": "assistant", "content": "no"},
        ]
    turns[0] = chat(url, "is the shape number 0 red?")["messages"][0]
    body = {"messages": [*turns, {"role": "user", "content": "and its colour?"}], "max_tokens": 2}
    with live(create_app(model)) as base, httpx.Client(base_url=base, timeout=60) as client:
        client.post("/v1/chat/completions", json=chat(url))  # warm up
        with ThreadPoolExecutor(4) as pool:
            long = [pool.submit(client.post, "/v1/chat/completions", json=body) for _ in range(3)]
            waits = []
            while not all(f.done() for f in long):
                start = time.monotonic()
                assert client.get("/health").status_code == 200
                waits.append(time.monotonic() - start)
            answers = [f.result() for f in long]
    assert all(r.status_code == 200 for r in answers), answers[0].text
    assert max(waits) < 1.0 and len(waits) >= 1


# --- bodies, pixels, memory ------------------------------------------------------------------------------


def test_chunked_body_is_refused_at_the_limit_while_it_streams(model):
    app = create_app(model, max_image_bytes=1_000_000)  # a body limit of about 2.3 MB
    block = b" " * (1 << 20)

    def body() -> Iterator[bytes]:
        yield b'{"messages": "'
        for _ in range(200):
            yield block
        yield b'"}'

    with live(app) as base:
        request = httpx.Request("POST", f"{base}/v1/chat/completions", content=body())
        assert request.headers["transfer-encoding"] == "chunked" and "content-length" not in request.headers
        with peak_rss() as mem, httpx.Client(timeout=60) as client:
            r = client.send(request)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert mem["peak"] - mem["start"] < 64, mem  # 200 MB were sent


def test_too_many_pixels_are_refused_before_decoding(model):
    bomb = flat_png(9000, 9000)  # 81 Mpx, about 1 MB as PNG
    client = TestClient(create_app(model, max_image_bytes=4_000_000))
    with peak_rss() as mem:
        r = client.post("/v1/chat/completions", json=chat(data_uri(bomb)))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "too_many_pixels" and "9000x9000" in error["message"]
    assert "25000000" in error["message"]
    assert mem["peak"] - mem["start"] < 100, mem  # decoded it would be 243 MB or more
    small = TestClient(create_app(model, max_image_pixels=1000))
    r = small.post("/v1/chat/completions", json=chat(data_uri(png(2))))  # 128 x 96
    assert r.status_code == 400 and "over the limit of 1000 pixels" in r.json()["error"]["message"]


@pytest.mark.slow  # heavy, and its RSS baseline depends on what earlier tests left in the process's heap
def test_memory_comes_back_after_a_burst_of_large_images(model):
    client = TestClient(create_app(model, max_image_bytes=4_000_000))
    images = [data_uri(flat_png(4000, 3000, shade)) for shade in range(10, 17)]  # 12 Mpx each

    def ask(url: str) -> int:
        return client.post("/v1/chat/completions", json=chat(url)).status_code

    assert ask(images[-1]) == 200  # warm up
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is None:
        pytest.skip("needs glibc's malloc_trim to take a clean baseline")
    trim(0)  # the baseline: free memory other tests left in the heap handed back
    with peak_rss() as mem, ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(ask, images[:6]))
    assert statuses == [200] * 6
    assert mem["peak"] - mem["start"] > 150, mem  # the burst did take memory ...
    deadline = time.monotonic() + 2.0  # the engine trims the heap once it is idle, just after the replies
    while mem["end"] - mem["start"] >= 80 and time.monotonic() < deadline:
        time.sleep(0.05)
        mem["end"] = rss_mb()
    assert mem["end"] - mem["start"] < 80, mem  # ... and gave it back


def test_large_jpegs_are_decoded_reduced():
    buf = io.BytesIO()
    Image.new("RGB", (4000, 3000), (200, 40, 90)).save(buf, "JPEG")
    image = serve_images.open_image(buf.getvalue(), 25_000_000, "p", draft_size=448)
    assert image.mode == "RGB" and image.size == (1000, 750)  # 1/4 scale, still at least 448 a side
    full = serve_images.open_image(buf.getvalue(), 25_000_000, "p")
    assert full.size == (4000, 3000)


# --- every error is JSON ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings"])
def test_deeply_nested_json_is_a_400(model, path):
    client = TestClient(create_app(model), raise_server_exceptions=False)
    r = client.post(path, content=b"[" * 100_000 + b"]" * 100_000)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_json"


def test_unexpected_errors_are_openai_json(model, monkeypatch):
    from blipkit.serve.app import Server

    def broken(self, requested):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(Server, "check_model", broken)
    client = TestClient(create_app(model), raise_server_exceptions=False)
    r = client.post("/v1/chat/completions", json=chat(data_uri(png(1))))
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert "secret" not in r.text


def test_client_disconnects_are_not_logged_as_errors(model, caplog):
    caplog.set_level(logging.INFO)
    payload = json.dumps(chat(data_uri(png(5)), max_tokens=100, stream=True)).encode()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    with live(create_app(model)) as base:
        port = int(base.rsplit(":", 1)[1])

        def send(data: bytes, read: bool = False) -> None:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(data)
                if read:
                    assert sock.recv(100).startswith(b"HTTP/1.1 200")
                time.sleep(0.3)

        send(head + b"Content-Length: 100000\r\n\r\n" + payload[:1000])  # gone mid-upload
        send(head + b"Transfer-Encoding: chunked\r\n\r\n3e8\r\n" + payload[:1000] + b"\r\n")
        send(head + b"Content-Length: %d\r\n\r\n" % len(payload) + payload, read=True)  # gone mid-stream
        time.sleep(0.5)
        assert httpx.get(f"{base}/health").status_code == 200
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert errors == [], [r.getMessage() for r in errors]


# --- flags ------------------------------------------------------------------------------------------------

BAD_FLAGS = [
    (["--max-image-mb", "-1"], "--max-image-mb must be over 0, got -1"),
    (["--cache-size", "-5"], "--cache-size must be at least 0, got -5"),
    (["--max-batch-size", "0"], "--max-batch-size must be at least 1, got 0"),
    (["--port", "99999"], "--port must be between 1 and 65535, got 99999"),
    (["--batch-window-ms", "-1"], "--batch-window-ms must be at least 0, got -1"),
    (["--max-image-pixels", "0"], "--max-image-pixels must be at least 1, got 0"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[f[0][0] for f in BAD_FLAGS])
def test_bad_flags_are_one_line_usage_errors(flags, message, capsys):
    from blipkit import cli

    with pytest.raises(SystemExit) as caught:
        cli.build_parser().parse_args(["serve", *flags])
    assert caught.value.code == 2
    assert capsys.readouterr().err == f"blipkit: error: {message}\n"


def blipkit_serve(*args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "blipkit", "serve", "--model", "/nonexistent/model", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_bad_port_and_taken_port_fail_before_the_model_loads():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        bad, in_use = blipkit_serve("--port", "99999"), blipkit_serve("--port", str(port))
        (_, bad_err), (_, in_use_err) = bad.communicate(timeout=120), in_use.communicate(timeout=120)
    finally:
        taken.close()
    assert (bad.returncode, bad_err) == (2, "blipkit: error: --port must be between 1 and 65535, got 99999\n")
    assert in_use.returncode == 1  # and no attempt to load the (missing) model
    assert in_use_err == f"blipkit: error: cannot listen on 127.0.0.1:{port}: the port is already in use\n"


def test_new_flags_are_parsed():
    from blipkit import cli

    args = cli.build_parser().parse_args(
        ["serve", "--max-image-pixels", "1000", "--allowed-media-domains", "a.com, b.org"]
    )
    assert args.max_image_pixels == 1000 and args.allowed_media_domains == ["a.com", "b.org"]
    assert cli.build_parser().parse_args(["serve"]).max_image_pixels == 25_000_000
