"""The upload page in a real browser: headless Chromium (Debian's `chromium`, driven through Debian's
`chromium-driver` by Selenium; nothing is downloaded) opens the page of a real `superres serve`, uploads a real
image, waits for the result, moves the before/after slider, downloads the result and compares it with the one-shot
output; a bad file shows its reason; the page fits a phone-width screen. Screenshots are saved (to
SERVE_SCREENSHOT_DIR when set, e.g. docs/img, else the test's folder)."""

import os
import shutil
import time
from pathlib import Path

import pytest

from conftest import DATASETS, SHARED_MODELS, make_bad_inputs
from handler.cli import main
from serve_client import Served

pytestmark = pytest.mark.slow
MODEL = "fsrcnn-small-x2"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM and DRIVER):
        pytest.fail("Debian's chromium and chromium-driver are needed: apt-get install -y chromium chromium-driver "
                    "(.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1000,1250",
                "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


def wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def screenshot_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("SERVE_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_upload_progress_compare_and_download_in_headless_chromium(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    photo = tmp_path / "butterfly.png"
    shutil.copy(DATASETS / "Set5" / "LR_bicubic" / "X2" / "butterflyx2.png", photo)
    assert main(["upscale", str(photo), "--out", str(tmp_path / "oneshot"), "--model", MODEL, "--model-dir",
                 str(SHARED_MODELS), "--engine", "opencv", "-q"]) == 0
    expected = (tmp_path / "oneshot" / "butterfly.png").read_bytes()
    served = Served(tmp_path / "served", tmp_path / "serve.log").wait_ready()
    try:
        browser.get(served.url + "/")
        wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#model option"), 20, "the model list")
        chosen = browser.find_element(By.CSS_SELECTOR, "#model option:checked")
        assert chosen.get_attribute("value") == MODEL and chosen.is_enabled()
        assert browser.find_element(By.ID, "drop").get_attribute("tabindex") == "0"  # reachable by keyboard

        browser.find_element(By.ID, "files").send_keys(str(photo))
        card = wait(lambda: browser.find_elements(By.CSS_SELECTOR, ".job.done"), 60, "the result")[0]
        assert card.find_element(By.CSS_SELECTOR, ".job-name").text == "butterfly.png"
        assert "done" in card.find_element(By.CSS_SELECTOR, ".job-status").text
        after = card.find_element(By.CSS_SELECTOR, "img.after")
        wait(lambda: browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", after), 10,
             "the result picture")
        assert browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", after) == [256, 256]

        # the slider, by keyboard: the original's share of the picture follows it
        slider = card.find_element(By.CSS_SELECTOR, "input.slider")
        before = card.find_element(By.CSS_SELECTOR, "img.before")
        assert "inset(0px 50%" in before.value_of_css_property("clip-path")
        slider.send_keys(*[Keys.ARROW_RIGHT] * 15)
        assert slider.get_attribute("value") == "65"
        assert "inset(0px 35%" in before.value_of_css_property("clip-path")
        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(str(screenshot_dir(tmp_path) / "serve.png"))

        link = card.find_element(By.CSS_SELECTOR, "a.download")
        assert link.get_attribute("download") == "butterfly_x2.png"
        link.click()
        target = browser.downloads / "butterfly_x2.png"
        wait(lambda: target.exists() and not list(browser.downloads.glob("*.crdownload")), 20, "the download")
        assert target.read_bytes() == expected  # the very bytes `superres upscale` writes

        # a bad file: its card says why, with the failed record's reason
        bad = make_bad_inputs(tmp_path / "bad")
        assert bad["truncated.png"] == "truncated"
        browser.find_element(By.ID, "files").send_keys(str(tmp_path / "bad" / "truncated.png"))
        failed = wait(lambda: browser.find_elements(By.CSS_SELECTOR, ".job.failed"), 30, "the failure")[0]
        message = failed.find_element(By.CSS_SELECTOR, ".job-error").text
        assert "truncated" in message and "decode" in message, message

        # several at once, from one pick
        others = []
        for name in ("bird", "head"):
            path = tmp_path / f"{name}.png"
            shutil.copy(DATASETS / "Set5" / "LR_bicubic" / "X2" / f"{name}x2.png", path)
            others.append(str(path))
        browser.find_element(By.ID, "files").send_keys("\n".join(others))
        wait(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".job.done")) == 3, 60, "three results")

        # a phone-width screen: nothing wider than the screen
        browser.set_window_size(390, 844)
        width = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], width
        browser.save_screenshot(str(screenshot_dir(tmp_path) / "serve-phone.png"))
    finally:
        assert served.stop() == 0
