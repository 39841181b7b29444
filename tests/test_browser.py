"""The web page in a real browser: headless Chromium (Selenium) uploads a zipped study, reads the result and
scrolls the study in the viewer (windows, Grad-CAM overlay, key-slice marks, clickable score curve)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
import zipfile
from pathlib import Path

import pytest
from conftest import require_system_tool
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
VIEWER_SCREENSHOT = os.environ.get("MSNET_VIEWER_SCREENSHOT")
"""Where to copy the viewer screenshot (docs/img/viewer.png is made with MSNET_VIEWER_SCREENSHOT=docs/img/viewer.png)."""
SECRET_NAME = "Doe^Jane"



@pytest.fixture(autouse=True)
def _chromium() -> None:
    require_system_tool(Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists(),
                        "chromium and chromedriver are not installed (apt-get install -y chromium chromium-driver)")


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
    strip = browser.find_element(By.ID, "key-slices")
    assert strip.size["width"] > 200 and strip.size["height"] > 50
    # the viewer replaces the static score curve with its own, clickable one
    assert not browser.find_element(By.ID, "slice-scores").is_displayed()
    assert browser.find_element(By.ID, "score-curve").size["width"] > 200
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
    print(f"screenshot: {shot}")


def _zip_study(tmp_path: Path, size: int, seed: int, slices: tuple[int, int]) -> Path:
    """A synthetic study with lesions, zipped; its headers carry a (fake) patient name."""
    import pydicom

    from msnet.data.synthetic import synth_cohort

    synth_cohort(tmp_path / "data", n_patients=1, size=size, seed=seed, slices=slices, classes=("COVID-19",))
    folder = next(p for p in (tmp_path / "data").iterdir() if p.is_dir())
    out = tmp_path / "study.zip"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.iterdir()):
            ds = pydicom.dcmread(f)
            ds.PatientName = SECRET_NAME
            ds.save_as(f)
            zf.write(f, f"{folder.name}/{f.name}")
    return out


def test_viewer_scroll_windows_and_gradcam_overlay(server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    study_zip = _zip_study(tmp_path, size=256, seed=3, slices=(14, 16))
    browser.get(server + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    browser.find_element(By.ID, "file").send_keys(str(study_zip))
    browser.find_element(By.ID, "study-id").send_keys("viewer-case")
    browser.find_element(By.ID, "analyse").click()
    wait.until(EC.visibility_of_element_located((By.ID, "viewer")))

    canvas = browser.find_element(By.ID, "slice-canvas")
    stage = browser.find_element(By.ID, "stage")
    slider = browser.find_element(By.ID, "slice-slider")
    n = int(slider.get_attribute("max")) + 1
    assert 14 <= n <= 16
    assert (int(canvas.get_attribute("width")), int(canvas.get_attribute("height"))) == (256, 256)
    marks = browser.find_elements(By.CSS_SELECTOR, "#key-marks .mark")
    keys = [int(m.get_attribute("data-index")) for m in marks]
    assert keys and all(0 <= k < n for k in keys)
    key = keys[0]

    def drawn(state: str) -> str:
        wait.until(lambda d: canvas.get_attribute("data-drawn") == state)
        return state

    def pixels() -> list[int]:
        return browser.execute_script(
            "const c = arguments[0]; const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "const out = []; for (let j = 0; j < d.length; j += 4) out.push(d[j], d[j + 1], d[j + 2]); return out;",
            canvas)

    def differ(a: list[int], b: list[int]) -> int:
        return sum(abs(x - y) for x, y in zip(a, b))

    drawn(f"lung:{key}:0")  # the viewer opens on the top key slice
    # keyboard: to the head, then down, slice by slice, to the key slice
    stage.click()
    ActionChains(browser).send_keys(Keys.HOME).perform()
    drawn("lung:0:0")
    head = pixels()
    ActionChains(browser).send_keys(*([Keys.ARROW_DOWN] * key)).perform()
    drawn(f"lung:{key}:0")
    assert int(slider.get_attribute("value")) == key
    text = browser.find_element(By.ID, "slice-info").text
    assert f"slice {key} of 0–" in text and " mm" in text and "score " in text and "key slice #1" in text
    at_key = pixels()
    assert key == 0 or differ(head, at_key) > 0
    # mouse wheel: one notch down, one up
    other = key + 1 if key + 1 < n else key - 1
    ActionChains(browser).scroll_from_origin(ScrollOrigin.from_element(stage), 0, 100 * (other - key)).perform()
    drawn(f"lung:{other}:0")
    ActionChains(browser).scroll_from_origin(ScrollOrigin.from_element(stage), 0, 100 * (key - other)).perform()
    drawn(f"lung:{key}:0")
    # the slider with the keyboard, and a key-slice mark
    slider.send_keys(Keys.ARROW_RIGHT if other > key else Keys.ARROW_LEFT)
    drawn(f"lung:{other}:0")
    marks[0].click()
    drawn(f"lung:{key}:0")
    # the score curve: click on slice 0's column, then on the key slice's
    curve = browser.find_element(By.ID, "score-curve")
    width = curve.size["width"]
    for target in (0, key):
        x = int((target + 0.5) / n * width - width / 2)
        ActionChains(browser).move_to_element_with_offset(curve, x, 0).click().perform()
        drawn(f"lung:{target}:0")
    # window presets change the picture
    browser.find_element(By.CSS_SELECTOR, "#windows button[data-window=mediastinum]").click()
    drawn(f"mediastinum:{key}:0")
    assert differ(pixels(), at_key) > 1000
    browser.find_element(By.CSS_SELECTOR, "#windows button[data-window=lung]").click()
    drawn(f"lung:{key}:0")
    assert pixels() == at_key

    # Grad-CAM overlay on: the pixels change; more opacity changes them more
    browser.find_element(By.ID, "cam-on").click()
    drawn(f"lung:{key}:1")
    with_cam = pixels()
    assert differ(with_cam, at_key) > 1000
    opacity = browser.find_element(By.ID, "cam-opacity")
    browser.execute_script("arguments[0].value = 90; arguments[0].dispatchEvent(new Event('input'))", opacity)
    wait.until(lambda d: differ(pixels(), at_key) > differ(with_cam, at_key))
    browser.execute_script("arguments[0].value = 55; arguments[0].dispatchEvent(new Event('input'))", opacity)
    # overlay stays on while scrolling: the next slice gets its own map
    stage.click()
    ActionChains(browser).send_keys(Keys.ARROW_DOWN if other > key else Keys.ARROW_UP).perform()
    drawn(f"lung:{other}:1")
    ActionChains(browser).send_keys(Keys.ARROW_UP if other > key else Keys.ARROW_DOWN).perform()
    drawn(f"lung:{key}:1")

    page = browser.find_element(By.TAG_NAME, "body").text
    assert "Doe" not in page and SECRET_NAME not in page and "viewer-case" in page
    assert not browser.find_element(By.ID, "viewer-error").is_displayed()

    height = int(browser.execute_script("return document.documentElement.scrollHeight"))
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 1366, "height": min(height, 3000), "deviceScaleFactor": 1, "mobile": False})
    drawn(f"lung:{key}:1")
    shot = tmp_path / "viewer.png"
    assert browser.save_screenshot(str(shot))
    with Image.open(shot) as img:
        assert img.size[0] >= 1000 and len(set(img.convert("L").getdata())) > 50  # a page, not a blank
    if VIEWER_SCREENSHOT:
        shutil.copyfile(shot, VIEWER_SCREENSHOT)


SCREENSHOT_DIR = os.environ.get("MSNET_VIEWER_SCREENSHOT_DIR")
"""Where to copy the two window sizes' screenshots of the viewer test, to look at them."""


def test_viewer_fits_the_window_zooms_pans_and_windows_freely(server, browser, tmp_path):
    """At 1366 x 900 and at 1024 x 768: the page needs no sideways scrolling, the image is larger than the
    old fixed 512 px where the window allows and never taller than the window, orientation markers and
    the keyboard help show; zoom, pan, free window/level by dragging and the presets change the picture
    and come back exactly; a screenshot is kept at each size."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    study_zip = _zip_study(tmp_path, size=256, seed=4, slices=(14, 16))
    for width, height in ((1366, 900), (1024, 768)):
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        browser.get(server + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        browser.find_element(By.ID, "file").send_keys(str(study_zip))
        browser.find_element(By.ID, "analyse").click()
        wait.until(EC.visibility_of_element_located((By.ID, "viewer")))
        canvas = browser.find_element(By.ID, "slice-canvas")
        stage = browser.find_element(By.ID, "stage")
        key = int(browser.find_elements(By.CSS_SELECTOR, "#key-marks .mark")[0].get_attribute("data-index"))
        wait.until(lambda d: canvas.get_attribute("data-drawn") == f"lung:{key}:0")

        def pixels() -> list[int]:
            return browser.execute_script(
                "const c = arguments[0]; const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                "const out = []; for (let j = 0; j < d.length; j += 16) out.push(d[j]); return out;", canvas)

        def differ(a: list[int], b: list[int]) -> int:
            return sum(abs(x - y) for x, y in zip(a, b))

        def info() -> str:
            return browser.find_element(By.ID, "slice-info").text

        inner_w, inner_h, scroll_w = browser.execute_script(
            "return [innerWidth, innerHeight, document.documentElement.scrollWidth]")
        assert scroll_w <= inner_w, (width, scroll_w, inner_w)
        box = browser.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.width, r.height]", stage)
        assert box[1] <= inner_h - 150 and box[0] >= 300, box
        if width == 1366:
            assert box[0] > 600, box  # larger than the old fixed 512 px
        letters = {e.text for e in browser.find_elements(By.CSS_SELECTOR, "#orientation span") if e.is_displayed()}
        assert letters == {"A", "P", "R", "L"}

        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", stage)
        stage.click()
        plain = pixels()
        ActionChains(browser).send_keys("?").perform()
        assert browser.find_element(By.ID, "viewer-help").is_displayed()
        assert "window/level" in browser.find_element(By.ID, "viewer-help").text
        ActionChains(browser).send_keys(Keys.ESCAPE).perform()
        assert not browser.find_element(By.ID, "viewer-help").is_displayed()
        # zoom in, pan, reset: back to the same picture
        ActionChains(browser).send_keys("+", "+").perform()
        wait.until(lambda d: "zoom 1.6×" in info())
        zoomed = pixels()
        assert differ(zoomed, plain) > 1000
        ActionChains(browser).key_down(Keys.SHIFT).click_and_hold(stage).move_by_offset(40, 25).release() \
            .key_up(Keys.SHIFT).perform()
        wait.until(lambda d: differ(pixels(), zoomed) > 1000)
        ActionChains(browser).send_keys("0").perform()
        wait.until(lambda d: pixels() == plain)
        # free window/level: drag right 50 px (wider by 200 HU) and up 25 px (level up by 100 HU)
        ActionChains(browser).click_and_hold(stage).move_by_offset(25, -10).move_by_offset(25, -15).release().perform()
        wait.until(lambda d: canvas.get_attribute("data-drawn") == f"custom:{key}:0")
        assert "W 1700 L -500" in info()
        assert not [b for b in browser.find_elements(By.CSS_SELECTOR, "#windows button")
                    if b.get_attribute("aria-pressed") == "true"]
        assert differ(pixels(), plain) > 1000
        if width == 1024:  # a screenshot with a free window and zoom at the small size
            ActionChains(browser).send_keys("+").perform()
            wait.until(lambda d: "zoom 1.3×" in info())
        else:  # and one with the Grad-CAM overlay at the large size
            browser.find_element(By.ID, "cam-on").click()
            wait.until(lambda d: canvas.get_attribute("data-drawn") == f"custom:{key}:1")
            browser.find_element(By.ID, "cam-on").click()
            wait.until(lambda d: canvas.get_attribute("data-drawn") == f"custom:{key}:0")
            browser.find_element(By.ID, "cam-on").click()
            wait.until(lambda d: canvas.get_attribute("data-drawn") == f"custom:{key}:1")
        shot = tmp_path / f"viewer-{width}x{height}.png"
        browser.execute_script("window.scrollTo(0, 0); document.getElementById('viewer').scrollIntoView()")
        assert browser.save_screenshot(str(shot))
        with Image.open(shot) as img:
            assert img.size == (width, height) and len(set(img.convert("L").getdata())) > 50
        if SCREENSHOT_DIR:
            Path(SCREENSHOT_DIR).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, Path(SCREENSHOT_DIR) / shot.name)
        if width == 1366:
            browser.find_element(By.ID, "cam-on").click()
        stage.click()
        ActionChains(browser).send_keys("0").perform()  # reset: the lung preset again, the same picture
        wait.until(lambda d: canvas.get_attribute("data-drawn") == f"lung:{key}:0")
        wait.until(lambda d: pixels() == plain)
