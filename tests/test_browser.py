"""The web page in a real browser: Chromium's fake microphone asks, the page shows and plays the answer."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import soundfile as sf
from playwright.sync_api import expect, sync_playwright
from pydantic import SecretStr

from tests.conftest import silence
from tests.live_server import serve

# Debian's chromium (make system-test-deps); Playwright never downloads a browser here.
CHROMIUM = shutil.which("chromium")
QUESTION = "What is the capital of France?"
RATE = 48000
SCREENSHOT = "/tmp/voxbot-page.png"
# Generous: two shared CPU cores run the browser, the bot and maybe other work.
TIMEOUT_MS = 120_000


@pytest.fixture
def microphone_wav(speaker, tmp_path) -> str:
    """What the fake microphone says: a pause, the question, then quiet while the bot answers."""
    path = tmp_path / "question.wav"
    audio = np.concatenate(
        [silence(1.0, sample_rate=RATE), speaker(QUESTION, sample_rate=RATE), silence(30.0, sample_rate=RATE)]
    )
    sf.write(path, audio, RATE, subtype="PCM_16")
    return str(path)


def _launch(pw, microphone_wav: str):
    return pw.chromium.launch(
        executable_path=CHROMIUM,
        # Headless through the flag, so Playwright adds none of its own (such as --mute-audio).
        headless=False,
        args=[
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={microphone_wav}%noloop",
        ],
    )


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium: make system-test-deps")
def test_page_hears_the_user_and_plays_the_answer(base_config, models, microphone_wav):
    with serve(base_config, models=models) as host, sync_playwright() as pw:
        browser = _launch(pw, microphone_wav)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 700})
            problems: list[str] = []
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("console", lambda m: m.type == "error" and problems.append(m.text))
            page.goto(f"http://{host}/")
            expect(page.locator("#state")).to_have_text("idle")

            page.click("#toggle")
            expect(page.locator("#state")).to_have_text("live", timeout=TIMEOUT_MS)
            expect(page.locator("#transcript .user").first).to_contain_text(
                re.compile("capital of france", re.IGNORECASE), timeout=TIMEOUT_MS
            )
            expect(page.locator("#transcript .bot").first).to_have_text(re.compile(r"\w"), timeout=TIMEOUT_MS)
            page.wait_for_function("window.voxbot.receivedAudioBytes > 0", timeout=TIMEOUT_MS)
            expect(page.locator("#error")).to_be_hidden()
            page.screenshot(path=SCREENSHOT)

            page.click("#toggle")
            expect(page.locator("#state")).to_have_text("idle")
            assert not problems, problems
        finally:
            browser.close()


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium: make system-test-deps")
def test_page_sends_the_token_from_its_fragment_or_asks_for_it(base_config, models, microphone_wav):
    token = "page-token-0451"
    config = base_config.model_copy(deep=True)
    config.server.auth_token = SecretStr(token)
    with serve(config, models=models) as host, sync_playwright() as pw:
        browser = _launch(pw, microphone_wav)
        try:
            page = browser.new_page()
            asked: list[str] = []

            def answer(dialog):
                asked.append(dialog.message)
                dialog.accept(token)

            page.on("dialog", answer)
            page.goto(f"http://{host}/")
            page.click("#toggle")
            expect(page.locator("#state")).to_have_text("error", timeout=TIMEOUT_MS)
            expect(page.locator("#error")).to_contain_text("unauthorized")
            for _ in range(100):  # the prompt follows the close
                if asked:
                    break
                page.wait_for_timeout(50)
            assert asked and "token" in asked[0]
            page.click("#toggle")  # with the token typed in
            expect(page.locator("#state")).to_have_text("live", timeout=TIMEOUT_MS)
            page.click("#toggle")

            page = browser.new_page()
            page.goto(f"http://{host}/#token={token}")
            page.click("#toggle")
            expect(page.locator("#state")).to_have_text("live", timeout=TIMEOUT_MS)
            assert len(asked) == 1
        finally:
            browser.close()
