"""`distill serve` in a real headless browser: type a query, submit, check the images that come back.

Debian's chromium and chromedriver (installed by `.ci/run`), driven by Selenium. Skipped only
when chromium is not installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from distill.commands.cli import main
from distill.deploy.embedders import CheckpointEmbedder
from distill.deploy.search_index import load_search_index

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason="chromium is not installed (apt-get install chromium chromium-driver)")
QUERY, K = "a big red circle", 5


@pytest.fixture(scope="module")
def index_file(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight drawn images indexed by the tiny checkpoint's student."""
    folder = tmp_path_factory.mktemp("gallery")
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    for i, colour in enumerate(colours):
        image = Image.new("RGB", (48, 48), "grey")
        draw = ImageDraw.Draw(image)
        (draw.ellipse if i % 2 else draw.rectangle)([8, 8, 40, 40], fill=colour)
        image.save(folder / f"{i}_{colour}.png")
    out = folder / "gallery.idx"
    assert main(["index", "build", str(folder), "--model", str(tiny_checkpoint), "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def server(index_file: Path) -> Iterator[str]:
    """`distill serve INDEX --port 0` in a subprocess; yields its base URL."""
    proc = subprocess.Popen([sys.executable, "-m", "distill", "serve", str(index_file), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline, url, seen = time.monotonic() + 180, None, []
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            seen.append(line)
            if m := re.search(r"serving \d+ images at (http://\S+/)", line):
                url = m.group(1)
        assert url, f"distill serve did not start: {''.join(seen)[-2000:]}"
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1200,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def expected_top(index_file: Path, checkpoint: Path, text: str, k: int) -> list[str]:
    """The top-k ids by brute force with the same model, computed outside the server."""
    data = load_search_index(index_file)
    scores = data["embeddings"].numpy() @ CheckpointEmbedder(checkpoint).encode_texts([text])[0]
    return [data["ids"][i] for i in np.argsort(-scores, kind="stable")[:k]]


def test_query_in_a_real_browser(server: str, browser: object, index_file: Path, tiny_checkpoint: Path,
                                 tmp_path: Path) -> None:  # fmt: skip
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver = browser
    driver.get(server)
    WebDriverWait(driver, 30).until(lambda d: "8 images" in d.find_element(By.ID, "info").text)
    Select(driver.find_element(By.ID, "k")).select_by_visible_text(str(K))
    box = driver.find_element(By.ID, "q")
    box.send_keys(QUERY)
    driver.find_element(By.ID, "go").click()
    loaded = """return [...document.querySelectorAll('#results figure.result img')]
                  .map(img => img.complete ? img.naturalWidth : -1)"""
    WebDriverWait(driver, 30).until(lambda d: (w := d.execute_script(loaded)) and len(w) == K and min(w) != -1)
    widths = driver.execute_script(loaded)
    assert widths == [48] * K  # every image came back and decoded (the 48-px thumbnails)
    figures = driver.find_elements(By.CSS_SELECTOR, "#results figure.result")
    ids = [f.get_attribute("data-id") for f in figures]
    scores = [float(f.get_attribute("data-score")) for f in figures]
    want = expected_top(index_file, tiny_checkpoint, QUERY, K)
    assert ids[0] == want[0] and sorted(ids) == sorted(want)
    assert scores == sorted(scores, reverse=True)
    assert figures[0].find_element(By.CSS_SELECTOR, ".score").text.startswith("#1 ")
    latency = driver.find_element(By.ID, "latency").text
    assert re.search(r"query latency \d+\.\d ms \(tokenize \+ encode \d+\.\d ms, search \d+\.\d ms over 8 images\)", latency), latency
    assert "q=a%20big%20red%20circle" in driver.current_url  # the query is in the address, to share
    driver.save_screenshot(str(tmp_path / "page.png"))
    assert (tmp_path / "page.png").stat().st_size > 5_000


def test_json_api(server: str, index_file: Path, tiny_checkpoint: Path) -> None:
    with urllib.request.urlopen(f"{server}api/search?q=a+blue+square&k=3") as resp:
        data = json.load(resp)
    assert data["items"] == 8 and data["k"] == 3 and data["total_ms"] > 0
    assert [r["id"] for r in data["results"]] == expected_top(index_file, tiny_checkpoint, "a blue square", 3)
    with urllib.request.urlopen(server + data["results"][0]["image"].lstrip("/")) as resp:
        assert resp.headers["Content-Type"] == "image/jpeg" and Image.open(resp).size == (48, 48)
    for bad, status in (("api/search?q=", 400), ("api/search?q=x&k=0", 400), ("image/99", 404), ("nope", 404)):
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(server + bad)
        assert exc.value.code == status and "error" in json.load(exc.value)


def test_chromedriver_is_there_too() -> None:
    assert shutil.which("chromedriver") or Path(CHROMEDRIVER).is_file(), "install chromium-driver with chromium"
