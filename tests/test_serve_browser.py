"""The web page of vv-serve in a real headless Chromium (Debian's chromium + chromium-driver, driven by
selenium): load the page from a real server, upload a voice, speak a two-speaker script and hear it
stream (WebAudio), checked through the page's own state (window.vvState).

`make setup` installs the browser where it is missing (as root, with apt-get). Without it this test
skips, except under CI=true, where a missing browser is a failure.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from conftest import ServerProcess

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "Speaker 1: Hello there.\nSpeaker 2: Hi, nice to meet you."


def _browser_paths() -> tuple[str, str]:
    chromium = next((p for p in ("/usr/lib/chromium/chromium", shutil.which("chromium"),
                                 shutil.which("chromium-browser"), shutil.which("google-chrome")) if p and
                     os.path.exists(p)), None)
    driver = shutil.which("chromedriver") or next((p for p in ("/usr/lib/chromium/chromedriver",)
                                                    if os.path.exists(p)), None)
    if chromium is None or driver is None:
        reason = "headless Chromium not installed (make setup installs chromium + chromium-driver as root)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return chromium, driver


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = _browser_paths()
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (dev extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--autoplay-policy=no-user-gesture-required", "--mute-audio", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_script_timeout(120)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page_server(random_engine_dir, presets):
    srv = ServerProcess(["--engine-dir", random_engine_dir, "--voices", presets, "--threads", "1"]).start()
    yield srv
    assert srv.stop() == 0
    assert "Traceback" not in srv.log(), srv.log()


def wait_js(driver, expression: str, timeout: float = 120.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: d.execute_script(f"return {expression}"))


def test_page_uploads_a_voice_and_streams_a_script(browser, page_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(page_server.url + "/")
    wait_js(browser, "window.vvState && window.vvState.voices.length >= 2")
    assert browser.find_element(By.ID, "status").text.startswith("state: idle")

    # upload a voice through the page's form; it joins the speaker menus
    browser.find_element(By.ID, "upload-file").send_keys(str(REPO / "examples" / "voice_b.wav"))
    browser.find_element(By.ID, "upload-name").send_keys("from_page")
    browser.find_element(By.ID, "upload").click()
    wait_js(browser, "document.getElementById('upload-status').textContent.startsWith('added')", 60)
    wait_js(browser, "window.vvState.voices.some(v => v.id === 'from_page')", 30)

    script = browser.find_element(By.ID, "script")
    script.clear()
    script.send_keys(SCRIPT)
    wait_js(browser, "document.querySelectorAll('#speakers select').length === 2", 10)
    Select(browser.find_element(By.ID, "voice-0")).select_by_value("voice_a")
    Select(browser.find_element(By.ID, "voice-1")).select_by_value("from_page")
    browser.find_element(By.ID, "seed").send_keys("1")

    browser.find_element(By.ID, "speak").click()
    wait_js(browser, "['done', 'error'].includes(window.vvState.state)", 120)
    state = browser.execute_script("return window.vvState")
    assert state["state"] == "done" and state["error"] is None, state
    assert state["bytes"] > 0 and state["seconds"] > 0 and state["chunks"] >= 1
    assert state["seconds"] == pytest.approx(state["bytes"] / 2 / 24000)
    assert state["ttfaMs"] is not None and state["ttfaMs"] > 0
    assert state["requestId"]
    shown = browser.find_element(By.ID, "status").text
    assert "time to first audio:" in shown and " ms" in shown
    # the page received every byte of the same request made directly
    direct = httpx.post(page_server.url + "/v1/speech/script", timeout=120,
                        json={"script": SCRIPT, "voices": ["voice_a", "from_page"], "seed": 1,
                              "response_format": "pcm"})
    assert direct.status_code == 200 and len(direct.content) == state["bytes"]
    # and the audio went to WebAudio: the context ran and the replay player holds the whole wav
    assert browser.execute_script("return document.getElementById('player').src.startsWith('blob:')")
    wait_js(browser, "window.vvState.played === true", 60)


def test_page_shows_errors(browser, page_server):
    from selenium.webdriver.common.by import By

    browser.get(page_server.url + "/")
    wait_js(browser, "window.vvState && window.vvState.voices.length >= 2")
    script = browser.find_element(By.ID, "script")
    script.clear()
    script.send_keys("Speaker 1: fine\nthis line has no speaker")   # plain + speaker lines mixed: refused
    browser.find_element(By.ID, "speak").click()
    wait_js(browser, "['done', 'error'].includes(window.vvState.state)", 60)
    state = browser.execute_script("return window.vvState")
    assert state["state"] == "error" and "Speaker N" in state["error"], state
    assert "error:" in browser.find_element(By.ID, "status").text


def test_page_hides_upload_where_uploads_are_off(browser, page_server, random_engine_dir, tmp_path):
    """Where /health says "voice_uploads": false (--no-voice-uploads, always under --ray) the page hides
    its upload form; elsewhere it shows it."""
    from selenium.webdriver.common.by import By

    browser.get(page_server.url + "/")
    wait_js(browser, "window.vvState && window.vvState.voices.length >= 2")
    assert browser.find_element(By.ID, "upload-row").is_displayed()
    presets = tmp_path / "presets"
    presets.mkdir()
    shutil.copy(REPO / "examples" / "voice_a.wav", presets / "voice_a.wav")
    srv = ServerProcess(["--engine-dir", random_engine_dir, "--voices", presets, "--threads", "1",
                         "--no-voice-uploads"]).start()
    try:
        browser.get(srv.url + "/")
        wait_js(browser, "window.vvState && window.vvState.voices.length >= 1")
        wait_js(browser, "document.getElementById('upload-row').hidden === true", 30)
        assert not browser.find_element(By.ID, "upload-row").is_displayed()
    finally:
        assert srv.stop() == 0
    assert "Traceback" not in srv.log()


def test_page_types_and_hears_on_a_realtime_engine(browser, realtime_voiced_engine_dir):
    """On a VibeVoice-Realtime server the page offers "type and hear": typed text goes over the WebSocket as it
    is typed, and audio frames come back (the page's counter) before the text is finished."""
    from selenium.webdriver.common.by import By

    srv = ServerProcess(["--engine-dir", realtime_voiced_engine_dir, "--threads", "1"]).start()
    try:
        browser.get(srv.url + "/")
        wait_js(browser, "window.vvState && window.vvState.realtime === true && window.vvState.voices.length === 1")
        assert browser.find_element(By.ID, "live").is_displayed()
        wait_js(browser, "document.getElementById('upload-row').hidden === true", 30)   # presets only
        browser.find_element(By.ID, "seed").send_keys("3")
        browser.find_element(By.ID, "live-start").click()
        wait_js(browser, "window.vvState.state === 'streaming'", 60)
        typed = "Hello there, this is typed into the page while the model speaks it. "
        browser.find_element(By.ID, "live-text").send_keys(typed)
        wait_js(browser, f"window.vvState.liveSent === {len(typed)}", 30)
        wait_js(browser, "window.vvState.liveFrames > 0", 60)      # audio while the text is still open
        assert browser.execute_script("return window.vvState.state") == "streaming"
        assert "frames back" in browser.find_element(By.ID, "status").text
        browser.find_element(By.ID, "live-finish").click()
        wait_js(browser, "['done', 'error'].includes(window.vvState.state)", 120)
        state = browser.execute_script("return window.vvState")
        assert state["state"] == "done" and state["error"] is None, state
        figures = state["figures"]
        assert figures["frames"] == state["liveFrames"] > 0 and figures["text_chars"] == len(typed)
        assert state["bytes"] == figures["frames"] * 3200 * 2 and state["ttfaMs"] > 0
        assert browser.execute_script("return document.getElementById('player').src.startsWith('blob:')")
    finally:
        assert srv.stop() == 0
    assert "Traceback" not in srv.log(), srv.log()
