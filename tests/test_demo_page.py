"""The demo page in Chromium at a laptop (1366x768) and a phone (390 px) width: what the page says
about the bundled model, questions asked while a video encodes, no stale errors, labels that
agree and read as words, cards that do not overlap, KV against the uncompressed cache."""
from __future__ import annotations

import contextlib
import os
import threading

import pytest

from demo_support import FRAMES, SAMPLE, _CountingDemo, _free_port, _upload, browser  # noqa: F401
from mmkv.demo.core import DemoConfig

HOLD_S = 60.0   # the longest an encoding waits for the test to let it go on


class _SlowEncodeDemo(_CountingDemo):
    """Encodings that take a while, as a long video does: the first progress step, then a pause
    until the test has looked at the page (`hold` cleared) -- an event, not a fixed sleep, so that
    a loaded machine cannot finish the encoding before the page is checked."""

    hold = threading.Event()

    def encode(self, *a, progress=None, **kw):
        if progress:
            progress(0.0, "decoding + encoding frames (0/2)")
        self.hold.wait(HOLD_S)
        return super().encode(*a, progress=progress, **kw)


@pytest.fixture(scope="module")
def slow_server():
    pytest.importorskip("gradio")
    from mmkv.demo.app import close, launch

    config = DemoConfig(frames=FRAMES, max_new_tokens=64, max_upload="5mb")
    _SlowEncodeDemo.hold.set()                    # encodings go on unless a test holds them
    app = launch(config, port=_free_port(), block=False, quiet=True, demo=_SlowEncodeDemo(config))
    yield app
    close(app)


def _one_line(page, selector: str) -> list[str]:
    """Texts of the elements matching `selector` that wrap onto more than one line."""
    return page.evaluate("""sel => [...document.querySelectorAll(sel)].filter(el => {
        const r = document.createRange(); r.selectNodeContents(el);
        const tops = new Set([...r.getClientRects()].map(b => Math.round(b.top)));
        return tops.size > 1; }).map(el => el.textContent)""", selector)


def _overlaps(page, selector: str) -> list[list[str]]:
    """Pairs of elements matching `selector` whose boxes overlap, or that stick out of the viewport."""
    return page.evaluate("""sel => {
        const els = [...document.querySelectorAll(sel)].filter(e => e.offsetParent !== null);
        const out = [], W = document.documentElement.clientWidth;
        const boxes = els.map(e => e.getBoundingClientRect());
        for (let i = 0; i < els.length; i++) {
            if (boxes[i].right > W + 0.5 || boxes[i].left < -0.5) out.push([els[i].id || els[i].className, "viewport"]);
            for (let j = i + 1; j < els.length; j++) {
                const a = boxes[i], b = boxes[j];
                if (a.left < b.right - 0.5 && b.left < a.right - 0.5
                    && a.top < b.bottom - 0.5 && b.top < a.bottom - 0.5)
                    out.push([els[i].id || els[i].className, els[j].id || els[j].className]);
            }
        }
        return out; }""", selector)


def _row_overlaps(page) -> list[str]:
    """Bars of the stat cards whose label, bar and value overlap each other."""
    return page.evaluate("""() => [...document.querySelectorAll('.mmkv-row')].filter(row => {
        const b = [...row.children].map(c => c.getBoundingClientRect());
        for (let i = 0; i < b.length; i++) for (let j = i + 1; j < b.length; j++)
            if (b[i].left < b[j].right - 0.5 && b[j].left < b[i].right - 0.5 && b[i].top < b[j].bottom - 0.5
                && b[j].top < b[i].bottom - 0.5) return true;
        return false; }).map(row => row.textContent)""")


def _sticking_out(page) -> list[str]:
    """Texts inside a stat card that reach outside it (into the next card, or off the page)."""
    return page.evaluate("""() => {
        const out = [];
        for (const card of document.querySelectorAll('.mmkv-card')) {
            const c = card.getBoundingClientRect();
            for (const el of card.querySelectorAll('*')) {
                const r = el.getBoundingClientRect();
                if (r.width && (r.left < c.left - 0.5 || r.right > c.right + 0.5))
                    out.push(card.id + ': ' + el.textContent);
            }
        }
        return out; }""")


class _Items:
    """Checks of separate items in one page session: each failure is recorded (not raised at once),
    so that one run says which items hold."""

    def __init__(self):
        self.failed: dict[str, str] = {}

    @contextlib.contextmanager
    def item(self, name: str):
        try:
            yield
        except AssertionError as e:
            self.failed[name] = (str(e).strip().splitlines() or [""])[0][:300]


@pytest.mark.browser
@pytest.mark.parametrize("width,height", [(1366, 768), (390, 844)])
def test_page_at_laptop_and_phone_width(slow_server, browser, width, height):
    from playwright.sync_api import expect

    from mmkv.demo.core import sample_question

    expect.set_options(timeout=15_000)
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(60_000)
    page.goto(slow_server.local_url)
    status = page.locator("#mmkv-status")
    box = page.locator("#mmkv-question textarea")
    bot = page.locator("#mmkv-chat .message.bot")
    items = _Items()

    with items.item("the page says what the bundled model is, how to run a real one; the sample question is filled in"):
        note = page.locator("#mmkv-model-note")
        expect(note).to_contain_text("answers with one letter only")
        expect(note).to_contain_text("mmkv demo --model Qwen/Qwen2.5-VL-7B-Instruct")
        expect(note).to_be_in_viewport()
        assert box.input_value() == sample_question()

    _upload(page, SAMPLE)
    expect(status).to_contain_text("Ready: sample.mp4", timeout=60_000)
    page.locator("#mmkv-recipe input").fill("zipvl")                        # ZipVL: per-layer figures of its own
    page.locator("#mmkv-recipe input").press("Enter")
    with items.item("no stale error: a refused fps shows its own message, not the one before"):
        box.fill("")
        page.locator("#mmkv-ask").click()
        expect(status).to_contain_text("the question is empty")
        page.locator("#mmkv-fps input").fill("-3")
        box.fill("What color is the shape?")
        page.locator("#mmkv-ask").click()
        expect(status).not_to_contain_text("the question is empty")
        expect(status).to_contain_text("fps must be 0 (uniform sampling) or positive, got -3")
        assert box.input_value() == "What color is the shape?"               # kept, to ask again
        expect(bot).to_have_count(0)
    page.locator("#mmkv-fps input").fill("2")
    box.fill("What color is the shape?")

    _SlowEncodeDemo.hold.clear()
    try:
        page.locator("#mmkv-encode").click()
        page.evaluate("window.scrollTo(0, 0)")
        box.press("Enter")
        with items.item("a question asked while the video encodes is in the chat at once, with the progress"):
            expect(page.locator("#mmkv-chat .message.user")).to_have_count(1)
            expect(page.locator("#mmkv-chat .message.user").first).to_contain_text("What color is the shape?")
            expect(bot.first).to_contain_text("waiting: the video is being encoded: decoding + encoding frames")
            expect(status).not_to_contain_text("Answered about sample.mp4", timeout=1_000)  # still encoding
            if height <= 768:  # a laptop with the page at the top: the chat and the question box are in view
                page.evaluate("window.scrollTo(0, 0)")
                expect(box).to_be_in_viewport()
                expect(bot.first).to_be_in_viewport()                       # the progress is where the user looks
        box.fill("a draft typed meanwhile")
    finally:
        _SlowEncodeDemo.hold.set()
    expect(status).to_contain_text("Answered about sample.mp4", timeout=120_000)
    with items.item("the queued question is answered with one letter, and the box keeps what was typed since"):
        expect(bot).to_have_count(1)
        assert bot.first.inner_text().strip() in ("A", "B", "C", "D")
        assert box.input_value() == "a draft typed meanwhile"

    with items.item("the status and the token card count the same frames, and say what they are"):
        phrase = f"{FRAMES} sampled frames = {FRAMES // 2} frame pairs of 4 tokens each"
        expect(page.locator("#mmkv-tokens")).to_contain_text(phrase)
        expect(page.locator("#mmkv-thumbs")).to_contain_text("Kept tokens per frame pair")
    with items.item("per-layer figures: human labels, counts not called ratios"):
        layers = page.locator("#mmkv-layers")
        expect(layers).to_contain_text("ZipVL KV: important tokens")
        text = layers.inner_text()
        assert "ratios" not in text.lower() and "_" not in text, text[:200]
    with items.item("KV memory against the uncompressed cache, no fp16 baseline"):
        expect(page.locator("#mmkv-memory")).to_contain_text("of uncompressed")
        assert "fp16" not in page.locator("body").inner_text()
    with items.item("the stat cards and their bars do not overlap, and fit the width"):
        expect(page.locator(".mmkv-card")).to_have_count(4)
        assert _overlaps(page, ".mmkv-card") == []
        assert _sticking_out(page) == []
        assert _row_overlaps(page) == []
    with items.item("the stages table: every column headed, kind and stage names on one line"):
        page.get_by_text("Presets and stages").click()
        heads = page.locator("#mmkv-recipes th")
        expect(heads.first).to_be_visible()
        assert all(t.strip() for t in heads.all_inner_texts())
        assert _one_line(page, "#mmkv-recipes th, #mmkv-recipes td:nth-child(-n+2)") == []
    page.close()
    if items.failed:
        pytest.fail("items that fail:\n" + "\n".join(f"- {k}: {v}" for k, v in items.failed.items()), pytrace=False)


@pytest.mark.browser
def test_a_second_question_waits_for_the_first(slow_server, browser):
    """Two questions typed one after the other, the first still encoding: both show at once, the
    second says it waits, both are answered in order."""
    from playwright.sync_api import expect

    expect.set_options(timeout=60_000)
    page = browser.new_page(viewport={"width": 1366, "height": 768})
    page.goto(slow_server.local_url)
    _upload(page, SAMPLE)
    expect(page.locator("#mmkv-status")).to_contain_text("Ready: sample.mp4")
    box = page.locator("#mmkv-question textarea")
    users, bots = page.locator("#mmkv-chat .message.user"), page.locator("#mmkv-chat .message.bot")
    _SlowEncodeDemo.hold.clear()
    try:
        for i, q in enumerate(("first question?", "second question?")):
            box.fill(q)
            box.press("Enter")
            expect(users).to_have_count(i + 1, timeout=15_000)            # shown at once, the first still encoding
        expect(bots.first).to_contain_text("encoding")
        expect(bots.nth(1)).to_contain_text("waiting")
    finally:
        _SlowEncodeDemo.hold.set()
    expect(page.locator("#mmkv-status")).to_contain_text("Answered about sample.mp4", timeout=120_000)
    expect(bots.nth(1)).not_to_contain_text("⏳", timeout=60_000)
    assert [b.strip() in ("A", "B", "C", "D") for b in bots.all_inner_texts()] == [True, True]
    assert os.path.isdir(slow_server.mmkv_uploads.path)
    page.close()
