"""The console in a real headless browser (Debian's chromium + chromium-driver, driven by Selenium): open the page,
upload an image and see its prediction, label five queue items (clicks and keys), train, see the new version in the
history, roll back. The console is the real ``edgetl device serve`` process on 127.0.0.1.

``EDGETL_SCREENSHOTS=docs`` saves the screenshots there (the README's pictures); otherwise into the test's tmp dir.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_folder

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow, pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                       reason="Debian's chromium and chromium-driver are not installed (tools/setup.sh installs them: "
                              "apt-get install chromium chromium-driver)"),
]

KNOWN = ["ankle_boot", "bag", "coat", "trouser"]
TOKEN = "browser-test-token-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=30) as res:
        return json.loads(res.read())


@pytest.fixture()
def console(_pretrained_bundle: Path, demo_train: Path, demo_test: Path, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    from edgetl.device import DeviceRuntime

    bundle = Path(shutil.copytree(_pretrained_bundle, tmp_path / "bundle"))
    DeviceRuntime(bundle).train(make_folder(tmp_path / "train", {c: 12 for c in KNOWN}, demo_train), seed=0)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for c in KNOWN:
        for p in sorted((demo_test / c).glob("*.png"))[:5]:
            shutil.copy(p, inbox / f"{c}-{p.name}")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    port = _free_port()
    cmd = [sys.executable, "-m", "edgetl.cli", "device", "serve", str(bundle), "--inbox", str(inbox), "--port",
           str(port), "--token-file", str(token_file), "--settle", "0", "--interval", "0.2", "--threads", "2"]
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if len(_get(port, "/api/results?limit=100")["results"]) == 4 * 5:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise AssertionError(f"the console did not start: {(tmp_path / 'serve.log').read_text()}")
            time.sleep(0.2)
        yield port, bundle
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _full_page(driver: Any, out: Path) -> None:
    """A screenshot of the whole page (the window grown to the page's height for the picture)."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(int(height) + 20, 4000))
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(out))
    driver.set_window_size(1400, 1500)


def test_label_train_rollback_in_chromium(console: tuple[int, Path], demo_test: Path, tmp_path: Path) -> None:
    pytest.importorskip("selenium", reason="selenium is not installed: pip install 'edgetl[browser]'")
    pytest.importorskip("starlette", reason="the serve extra is not installed: pip install 'edgetl[serve]'")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port, bundle = console
    shots = Path(os.environ.get("EDGETL_SCREENSHOTS") or tmp_path)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1500",
                "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=options)
    wait = WebDriverWait(driver, 60)
    try:
        driver.get(f"http://127.0.0.1:{port}/#token={TOKEN}")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#queue .item")) >= 5)
        assert "token=" not in driver.current_url  # the page took the token out of the address bar
        assert "head v0001" in driver.find_element(By.ID, "status").text

        # upload an image and see its prediction
        image = max((demo_test / "bag").glob("*.png"))
        driver.find_element(By.ID, "upload-input").send_keys(str(image))
        label = wait.until(lambda d: d.find_element(By.ID, "predicted-label").text or None)
        assert label.split()[0] == "bag"

        # label five queue items with their true class: three clicks, two keys
        def top_item() -> Any:
            return driver.find_element(By.CSS_SELECTOR, "#queue .item.selected")

        for k in range(5):
            item = top_item()
            item_id = item.get_attribute("data-id")
            truth = item.find_element(By.CSS_SELECTOR, ".meta .hint").text.split("-")[0]
            if k < 3:
                item.find_element(By.CSS_SELECTOR, f"button.label-btn[data-class='{truth}']").click()
            else:
                driver.find_element(By.TAG_NAME, "body").send_keys(str(KNOWN.index(truth) + 1))
            wait.until(lambda d, i=item_id: not d.find_elements(By.CSS_SELECTOR, f"#queue .item[data-id='{i}']"))
        assert "5 labelled" in driver.find_element(By.ID, "labelled-count").text
        labels = (bundle.parent / "inbox" / "_watch" / "labels.jsonl").read_text().splitlines()
        assert len(labels) == 5

        # train: the new version appears in the history
        driver.find_element(By.ID, "train-btn").click()
        wait.until(lambda d: "v0002" in d.find_element(By.ID, "train-result").text)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#history tr[data-version='v0002']"))
        promoted = "promoted" in driver.find_element(By.ID, "train-result").text.split("—")[0]
        if promoted:
            wait.until(lambda d: "head v0002" in d.find_element(By.ID, "status").text)
        _full_page(driver, shots / "serve-console.png")

        # roll back: v0001 is current again, in the page and on disk
        if not promoted:  # the gate kept v0002 as a candidate: promote it first, then roll back
            driver.find_element(By.CSS_SELECTOR, "#history tr[data-version='v0002'] button.promote-btn").click()
            wait.until(lambda d: "head v0002" in d.find_element(By.ID, "status").text)
        driver.find_element(By.ID, "rollback-btn").click()
        wait.until(lambda d: "head v0001" in d.find_element(By.ID, "status").text)
        wait.until(lambda d: "current" in d.find_element(By.CSS_SELECTOR, "#history tr[data-version='v0001']")
                   .get_attribute("class"))
        _full_page(driver, shots / "serve-rollback.png")
        assert _get(port, "/api/health")["head_version"] == "v0001"
        audit = [json.loads(line) for line in (bundle / "state" / "audit.jsonl").read_text().splitlines()]
        assert audit[-1]["action"] == "rollback" and audit[-1]["version"] == "v0001"
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()
