"""Take docs/demo.png: start the demo on a loopback port, upload the bundled sample in Chromium
(Playwright), ask two questions, and screenshot the page.

    python tools/demo_screenshot.py                       # recipe "balanced"
    python tools/demo_screenshot.py --recipe none --out /tmp/demo.png
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

ROOT = os.path.join(os.path.dirname(__file__), "..")
ASSETS = os.path.join(ROOT, "mmkv", "assets")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="balanced")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "demo.png"))
    args = ap.parse_args()

    from playwright.sync_api import expect, sync_playwright

    from mmkv.demo import DemoConfig
    from mmkv.demo.app import close, launch

    exe = next((p for p in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"))
                if p and os.path.exists(p)), None)
    if exe is None:
        sys.exit("chromium is not installed (apt-get install -y chromium)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sample = json.load(open(os.path.join(ASSETS, "sample.json")))
    app = launch(DemoConfig(recipe=args.recipe, max_new_tokens=16), port=port, block=False, quiet=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            page.goto(app.local_url)
            page.locator("#mmkv-video input[type=file]").set_input_files(os.path.join(ASSETS, "sample.mp4"))
            status = page.locator("#mmkv-status")
            expect(status).to_contain_text("Ready", timeout=60_000)
            from mmkv.evaluation.prompts import videomme_prompt
            from mmkv.synthetic import QUESTIONS, SHAPES

            shape_q = videomme_prompt(QUESTIONS["shape"], [f"{'ABCD'[i]}. {s}" for i, s in enumerate(SHAPES)])
            bot = page.locator("#mmkv-chat .message.bot")
            for i, q in enumerate((sample["question"], shape_q)):
                page.locator("#mmkv-question textarea").fill(q)
                page.locator("#mmkv-ask").click()
                expect(bot).to_have_count(i + 1, timeout=30_000)
                expect(bot.nth(i)).not_to_contain_text("⏳", timeout=120_000)   # answered, not waiting
                expect(status).to_contain_text("Answered", timeout=30_000)
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        close(app)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
