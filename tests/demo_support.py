"""What the demo's tests share: bad files, a server with a model-call counter, Chromium, uploading."""
from __future__ import annotations

import os
import shutil
import socket
import threading

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import mmkv  # noqa: E402
from mmkv.demo.core import Demo, DemoConfig  # noqa: E402

SAMPLE = os.path.join(os.path.dirname(mmkv.__file__), "assets", "sample.mp4")
FRAMES = 16          # 8 temporal slots of 2x2 tokens with the bundled Qwen2-VL
MAX_NEW = 8

# ----------------------------------------------------------------------------- bad files
def _write_video(path, n, codec="libx264", side=64):
    import av

    with av.open(path, "w") as c:
        s = c.add_stream(codec, rate=2)
        s.width = s.height = side
        s.pix_fmt = "yuv420p"
        c.start_encoding()  # write the header even when no frame follows
        for i in range(n):
            frame = np.full((side, side, 3), 20 * i % 255, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo_files")
    garbage = d / "garbage.mp4"
    garbage.write_bytes(b"this is not a video\n" * 64)
    empty = d / "empty.mp4"
    empty.write_bytes(b"")
    text = d / "notes.txt"
    text.write_text("a text file, not a video\n")
    big = d / "big.mp4"
    big.write_bytes(b"\0" * 6_000_000)  # over the 5 MB limit of the test server
    image = d / "photo.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(image)
    disguised = {}  # images renamed .mp4: their content, not their name, says what they are
    for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"):
        disguised[fmt] = str(d / f"{fmt.lower()}_photo.mp4")
        Image.new("RGB", (32, 32), (200, 10, 10)).save(disguised[fmt], format=fmt)
    return {"garbage": str(garbage), "empty": str(empty), "image": str(image), "big": str(big),
            "text": str(text), "png_mp4": disguised["PNG"], "disguised": disguised,
            "zero": _write_video(str(d / "zero.mp4"), 0), "long": _write_video(str(d / "long.mp4"), 40)}


# ----------------------------------------------------------------------------- the server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _CountingDemo(Demo):
    """A Demo that records how many model calls (encode, ask) ran at the same time."""

    def __init__(self, config):
        super().__init__(config)
        self.active, self.most, self._count_lock = 0, 0, threading.Lock()

    def _enter(self):
        with self._count_lock:
            self.active += 1
            self.most = max(self.most, self.active)

    def _exit(self):
        with self._count_lock:
            self.active -= 1

    def encode(self, *a, **kw):
        self._enter()
        try:
            return super().encode(*a, **kw)
        finally:
            self._exit()

    def ask_stream(self, *a, **kw):
        self._enter()
        try:
            yield from super().ask_stream(*a, **kw)
        finally:
            self._exit()


@pytest.fixture(scope="module")
def server():
    pytest.importorskip("gradio")
    from mmkv.demo.app import close, launch

    config = DemoConfig(frames=FRAMES, max_new_tokens=MAX_NEW, max_upload="5mb")
    app = launch(config, port=_free_port(), block=False, quiet=True, demo=_CountingDemo(config))
    yield app
    close(app)
    assert not os.path.exists(app.mmkv_uploads.path)  # uploads are deleted with the app


def _uploads(app) -> list[str]:
    return [os.path.join(r, f) for r, _, fs in os.walk(app.mmkv_uploads.path) for f in fs]


def _text(content) -> str:
    """A chat message's text (gradio 6 returns a list of {"type": "text", "text": ...} parts)."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


# ----------------------------------------------------------------------------- the page, in Chromium
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def browser():
    exe = next((p for p in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")) if p
                and os.path.exists(p)), None)
    if exe is None:
        pytest.skip("chromium is not installed and could not be installed here (`make test` runs "
                    "`apt-get install -y chromium` when it can; Playwright's own browser download needs network)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _upload(page, path):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    clear = page.locator("#mmkv-video button[aria-label='Clear']")
    file_input = page.locator("#mmkv-video input[type=file]")
    for _ in range(5):
        if file_input.count():
            break
        if clear.count():
            # a dispatched click: Gradio's player controls can overlap the toolbar (e.g. with a
            # video the browser cannot play) and would take a pointer click
            try:  # (the first may be the status tracker's own "Clear")
                clear.last.dispatch_event("click", timeout=5_000)
            except PlaywrightTimeout:  # the player re-rendered under us (a loaded machine): look again
                pass
        page.wait_for_timeout(500)
    file_input.set_input_files(path)
