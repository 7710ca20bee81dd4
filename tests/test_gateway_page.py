"""The page at `/` in a real headless browser (Debian's chromium + chromium-driver, driven by selenium)."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from emofleet.core.config import Settings
from emofleet.schemas.emotions import EMOTIONS

from audio_fixtures import wav
from gateway_helpers import KEY_A, gateway_process, gateway_settings, wait_for
from pipeline_helpers import create_topics, running_processor

pytestmark = pytest.mark.slow


def chromium() -> object:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    driver_path, browser = shutil.which("chromedriver"), shutil.which("chromium")
    assert driver_path and browser, "install Debian's chromium and chromium-driver (`bash infra/dev.sh setup`)"
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,900"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver_path), options=options)


def test_the_page_shows_nine_bars_and_the_timeline_of_a_long_clip(settings: Settings, redis_client, tiny_model,
                                                                 tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    create_topics(settings)
    settings = gateway_settings(settings)
    settings = replace(settings, audio=replace(settings.audio, window_seconds=1.0))  # 3 s: a 3-segment timeline
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav(3.0))
    with running_processor(settings, model=tiny_model), gateway_process(settings, tmp_path / "gateway.log") as url:
        browser = chromium()
        try:
            browser.get(f"{url}/")
            browser.find_element(By.ID, "key").send_keys(KEY_A)
            browser.find_element(By.ID, "file").send_keys(str(clip))
            browser.find_element(By.ID, "analyze").click()
            wait_for(lambda: browser.find_element(By.ID, "headline").text, "the answer on the page", timeout=60)
            bars = {row.get_attribute("data-emotion"): row.find_element(By.CSS_SELECTOR, ".fill").get_attribute("style")
                    for row in browser.find_elements(By.CSS_SELECTOR, "#bars .bar")}
            headline = browser.find_element(By.ID, "headline").text
            status = browser.find_element(By.ID, "status").text
            segments = [cell.text for cell in browser.find_elements(By.CSS_SELECTOR, "#timeline div")]
            screenshot = tmp_path / "gateway-page.png"
            browser.save_screenshot(str(screenshot))
            browser.find_element(By.ID, "key").clear()
            browser.find_element(By.ID, "key").send_keys("x" * 20 + "\t")
            browser.find_element(By.ID, "analyze").click()
            refused = wait_for(lambda: "403" in (text := browser.find_element(By.ID, "status").text) and text,
                               "the refusal on the page", timeout=30)
        finally:
            browser.quit()
    print(f"screenshot of the page: {screenshot}")
    assert list(bars) == list(EMOTIONS) and all("width:" in style.replace(" ", "") for style in bars.values())
    assert headline.split(" ")[0] in EMOTIONS and status.startswith("done in")
    assert len(segments) == 3 and set(segments) <= set(EMOTIONS)
    assert screenshot.stat().st_size > 10_000
    assert "unknown_api_key" in refused
