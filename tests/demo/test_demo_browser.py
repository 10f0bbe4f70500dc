"""The demo in a real browser: headless Chromium (Debian's package, `make browser`) driven by playwright."""

import os
import socket

import pytest

from mlm.demo.app import build_app, launch
from mlm.demo.service import DemoService
from mlm.inference import checkpoint_id

CHROMIUM = os.environ.get("MLM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_uploading_a_photo_shows_its_caption_and_a_bad_file_its_reason(tiny_model, tiny_run, realdata, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    service = DemoService(tiny_model, checkpoint_id(tiny_run[0]), tiny_run[1] / "images", 10, tmp_path / "cache")
    app, port = build_app(service), free_port()
    launch(app, service, port=port, block=False)
    photo = sorted((realdata / "coco-mini-train" / "images").glob("*.jpg"))[0]
    fake = tmp_path / "holiday.jpg"
    fake.write_text("this is not a photo")
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1100, "height": 1300})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle")
            page.locator("#upload input[type=file]").set_input_files(str(photo))
            caption = page.locator("#caption textarea")
            expect(caption).not_to_have_value("", timeout=60_000)
            assert caption.input_value().strip() == service.caption(photo)
            if os.environ.get("MLM_DEMO_SCREENSHOT"):  # how docs/demo.png is made
                page.screenshot(path=os.environ["MLM_DEMO_SCREENSHOT"], full_page=True)
            page.reload(wait_until="networkidle")
            page.locator("#upload input[type=file]").set_input_files(str(fake))
            expect(page.get_by_text("holiday.jpg is not a usable image").first).to_be_visible(timeout=60_000)
            browser.close()
    finally:
        app.close()
        service.close()
