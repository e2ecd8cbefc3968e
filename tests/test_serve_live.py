"""The server on a real port (uvicorn): 100 concurrent clients, and the web page in headless Chromium."""

from __future__ import annotations

import asyncio
import base64
import io
import shutil

import numpy as np
import pytest
from live_server import live
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

import blipkit  # noqa: E402
from blipkit.serve import create_app  # noqa: E402

CHROME_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    yy, xx = np.mgrid[0:96, 0:128]
    rng = np.random.default_rng(seed)
    base = np.stack([xx * 2, yy * 2, np.full_like(xx, 40 * seed % 255)], axis=-1)
    arr = np.clip(base + rng.integers(0, 40, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def model(opt_dir):
    return blipkit.load(opt_dir)


@pytest.fixture(scope="module")
def server(model):
    """Base URL of a uvicorn server on a free port of 127.0.0.1, in a thread."""
    with live(create_app(model, model_name="tiny", max_batch_size=16, batch_window_ms=20)) as url:
        yield url


def test_100_concurrent_requests_are_all_answered(server):
    images = [data_uri(png(i)) for i in range(4)]

    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, str]:
        content = [
            {"type": "image_url", "image_url": {"url": images[i % 4]}},
            {"type": "text", "text": f"question number {i}?"},
        ]
        payload = {"messages": [{"role": "user", "content": content}], "max_tokens": 4, "stream": i % 5 == 0}
        r = await client.post(f"{server}/v1/chat/completions", json=payload)
        if payload["stream"]:
            return r.status_code, r.text.strip().splitlines()[-1]
        return r.status_code, r.json()["choices"][0]["finish_reason"]

    async def main() -> list[tuple[int, str]]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(100)))

    results = asyncio.run(main())
    assert [status for status, _ in results] == [200] * 100
    for i, (_, last) in enumerate(results):
        assert last == "data: [DONE]" if i % 5 == 0 else last in ("stop", "length")
    health = httpx.get(f"{server}/health").json()
    assert health["largest_batch"] > 1 and health["cache"]["size"] == 4


def _chromium() -> tuple[str, str]:
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip(
            "chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)"
        )
    return binary, driver


def test_web_page_chat_in_headless_chromium(server, model, tmp_path):
    binary, driver_path = _chromium()
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "shapes.png"
    image.write_bytes(png(7))
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in [*CHROME_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    phone = {"width": 390, "height": 844, "pixelRatio": 1}
    options.add_experimental_option("mobileEmulation", {"deviceMetrics": phone})
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        browser.get(server + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(ec.text_to_be_present_in_element((By.ID, "model-name"), "tiny"))
        browser.find_element(By.ID, "file-input").send_keys(str(image))
        wait.until(ec.element_to_be_clickable((By.ID, "send")))
        # count the page's updates of the answer bubbles: a streamed answer arrives in several pieces
        browser.execute_script(
            "window.updates = 0; new MutationObserver((m) => { window.updates += m.length; })"
            ".observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});"
        )
        for question in ("what is in the picture?", "what color is it?"):
            browser.find_element(By.ID, "question").send_keys(question)
            browser.find_element(By.ID, "send").click()
            n = 1 if question.startswith("what is") else 2
            done = f"#log .msg.assistant[data-state='done']:nth-of-type({2 * n})"
            answer = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, done))).text
            assert answer
        first = browser.find_elements(By.CSS_SELECTOR, "#log .msg.assistant")[0].text
        expected = model.generate([image.read_bytes()], ["Question: what is in the picture? Answer:"], 30)[0]
        assert first == (expected or "(empty answer)")
        assert len(browser.find_elements(By.CSS_SELECTOR, "#log .msg.user")) == 2  # history shown
        assert browser.execute_script("return window.updates") > 10  # 2 questions, 2 bubbles, many deltas
        widths = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert widths[0] <= widths[1] <= 390  # fits a phone screen without sideways scrolling
        shot = tmp_path / "serve-screenshot.png"  # never into the tracked reports/
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 1000
    finally:
        browser.quit()
