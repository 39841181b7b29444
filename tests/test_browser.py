"""The web page in a real browser: headless Chromium (Selenium) uploads a zipped study and reads the result."""

from __future__ import annotations

import importlib.util
import shutil
import socket
import threading
import time
import zipfile
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOT_COPY = Path("/tmp/msnet-browser.png")

pytestmark = [
    pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
                       reason="chromium and chromedriver are not installed (apt-get install -y chromium chromium-driver)"),
    pytest.mark.skipif(importlib.util.find_spec("selenium") is None, reason="selenium is not installed (pip install selenium)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tiny_bundle, tmp_path):
    """The app under uvicorn on a free loopback port, in a thread."""
    import uvicorn

    from msnet.service.app import create_app

    port = _free_port()
    app = create_app(tiny_bundle, device="cpu", tmp_dir=str(tmp_path))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    th.join(10)


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1366,900", f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_page_uploads_study_and_shows_diagnosis(server, browser, tiny_bundle, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    from msnet.data.synthetic import synth_cohort

    synth_cohort(tmp_path / "data", n_patients=1, size=64, seed=21, slices=(10, 12))
    folder = next(p for p in (tmp_path / "data").iterdir() if p.is_dir())
    study_zip = tmp_path / "study.zip"
    with zipfile.ZipFile(study_zip, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f"{folder.name}/{f.name}")

    browser.get(server + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    assert "Research use only — not for diagnosis" in browser.find_element(By.ID, "banner").text
    assert "msnet-" in browser.find_element(By.ID, "model").text

    browser.find_element(By.ID, "file").send_keys(str(study_zip))
    assert "study.zip" in browser.find_element(By.ID, "chosen").text
    browser.find_element(By.ID, "study-id").send_keys("browser-case")
    browser.find_element(By.ID, "analyse").click()
    wait.until(EC.visibility_of_element_located((By.ID, "result")))

    prediction = browser.find_element(By.ID, "prediction").text
    classes = ["COVID-19", "CAP", "NORMAL"]
    assert prediction in classes
    bars = browser.find_elements(By.CSS_SELECTOR, "#probs .val")
    assert [b.get_attribute("data-cls") for b in bars] == classes
    widths = [b.size["width"] for b in bars]
    top = classes.index(prediction)
    assert widths[top] == max(widths) and widths[top] > 0
    for img_id in ("key-slices", "slice-scores"):
        img = browser.find_element(By.ID, img_id)
        assert img.get_attribute("src").startswith("data:image/png;base64,")
        wait.until(lambda d, el=img: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", el))
        assert img.size["width"] > 200 and img.size["height"] > 50
    assert "browser-case" in browser.find_element(By.ID, "meta").text
    assert not browser.find_element(By.ID, "error").is_displayed()

    # the same study through the API answers the same class
    import httpx

    r = httpx.post(server + "/v1/predict", files={"file": ("s.zip", study_zip.read_bytes(), "application/zip")},
                   timeout=60)
    assert r.status_code == 200 and r.json()["prediction"] == prediction

    height = int(browser.execute_script("return document.documentElement.scrollHeight"))
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",  # the whole page in one picture
                            {"width": 1366, "height": min(height, 3000), "deviceScaleFactor": 1, "mobile": False})
    shot = tmp_path / "msnet-browser.png"
    assert browser.save_screenshot(str(shot))
    shutil.copyfile(shot, SCREENSHOT_COPY)
    print(f"screenshot: {shot} (copy: {SCREENSHOT_COPY})")
