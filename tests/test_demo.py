"""The Gradio demo: its logic without a browser, its server through gradio_client, and the page in
a real browser (Playwright driving Debian's Chromium; `make test` installs chromium when it can).

The browser tests skip only where no chromium is installed (the Makefile's `test` target tries
`apt-get install -y chromium`; Playwright's own browser download does not work offline)."""
from __future__ import annotations

import dataclasses
import os
import threading
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import mmkv  # noqa: E402
from mmkv.demo.core import (Demo, DemoConfig, UploadDir, check_upload, layers_html, memory_html, overlay,  # noqa: E402
                            parse_size, recipe_choices, stage_rows, stats_rows, thumbnails, timing_html, tokens_html,
                            user_message)
from mmkv.errors import InputError, RecipeError  # noqa: E402

from demo_support import (FRAMES, MAX_NEW, SAMPLE, _text, _upload, _uploads, browser, files,  # noqa: E402,F401
                          server)


# ----------------------------------------------------------------------------- settings and recipes
def test_parse_size():
    assert parse_size("20gb") == 20 * 1000**3
    assert parse_size("1.5 MB") == 1_500_000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size(1234) == 1234
    assert parse_size("none") is None and parse_size(None) is None
    for bad in ("lots", "5 parsecs", "-3mb"):
        with pytest.raises(InputError):
            parse_size(bad)


def test_config_rejects_nonsense():
    assert DemoConfig().max_upload_bytes == 20 * 1000**3  # large by default
    with pytest.raises(InputError, match="max_frames"):
        DemoConfig(max_frames=0)
    with pytest.raises(InputError, match="exceed"):
        DemoConfig(frames=64, max_frames=32)
    with pytest.raises(InputError, match="max_duration"):
        DemoConfig(max_duration=-1)


def test_cli_options_make_the_config():
    from mmkv.cli import build_parser
    from mmkv.demo_cli import config_from_args

    args = build_parser().parse_args(["demo", "--model", "mmkv-tiny", "--model", "/models/other", "--max-upload",
                                      "1gb", "--max-duration", "0", "--frames", "8", "--concurrency", "2"])
    c = config_from_args(args)
    assert c.models == ["mmkv-tiny", "/models/other"] and c.max_upload_bytes == 10**9
    assert c.max_duration is None and c.frames == 8 and c.concurrency == 2 and not c.allow_custom_model
    assert config_from_args(build_parser().parse_args(["demo"])).models == ["mmkv-tiny"]


def test_recipe_choices_follow_the_registry(monkeypatch):
    from mmkv.recipe import PRESET_DOCS, PRESETS, available

    choices = recipe_choices()
    assert choices[0] == "none" and set(choices) == set(PRESETS)
    # a method registered later (another engineer's preset) shows up without editing the demo
    monkeypatch.setitem(PRESETS, "zz-demo-test", "streaming:recent=8")
    monkeypatch.setitem(PRESET_DOCS, "zz-demo-test", "a preset added at run time")
    assert "zz-demo-test" in recipe_choices()
    assert {(k, n) for k, n, _ in stage_rows()} == {(k, n) for k, items in available().items() for n, _ in items}
    from mmkv.demo.app import _recipes_html

    page = _recipes_html()
    assert "<code>zz-demo-test</code>" in page and all(f"<code>{n}</code>" in page for _, n, _ in stage_rows())


# ----------------------------------------------------------------------------- uploads
def test_check_upload_accepts_the_sample():
    info = check_upload(SAMPLE, DemoConfig())
    assert (info.frames, info.fps, info.duration) == (256, 2.0, 128.0)
    assert info.size == os.path.getsize(SAMPLE) and info.name == "sample.mp4"
    assert "2:08" in info.describe() and "256 frames" in info.describe()


@pytest.mark.parametrize("kind,pattern", [("garbage", "not a readable video"), ("empty", "empty"),
                                          ("image", "is an image"), ("zero", "zero video frames|no video stream")])
def test_check_upload_rejects_bad_files(files, kind, pattern):
    path = files[kind]
    with pytest.raises(InputError, match=pattern) as e:
        check_upload(path, DemoConfig())
    msg = str(e.value)
    assert os.path.basename(path) in msg and os.path.dirname(path) not in msg  # the user's name, not the server path


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"])
def test_check_upload_refuses_an_image_renamed_mp4(files, fmt):
    """An image named .mp4 decodes as a 1-frame video: refused by its content, naming the format."""
    path = files["disguised"][fmt]
    with pytest.raises(InputError, match=f"is an? {fmt} image, not a video") as e:
        check_upload(path, DemoConfig())
    assert os.path.basename(path) in str(e.value) and os.path.dirname(path) not in str(e.value)


def test_check_upload_limits(files):
    with pytest.raises(InputError, match="over this demo's upload limit"):
        check_upload(SAMPLE, DemoConfig(max_upload="50kb"))
    with pytest.raises(InputError, match="lasts 0:20, over this demo's limit of 0:10"):
        check_upload(files["long"], DemoConfig(max_duration=10))
    assert check_upload(files["long"], DemoConfig(max_duration=30)).frames == 40
    with pytest.raises(InputError, match="no video"):
        check_upload(None, DemoConfig())
    with pytest.raises(InputError, match="lost"):
        check_upload("/nonexistent/clip.mp4", DemoConfig())


def test_upload_dir_sweeps_and_removes(tmp_path):
    up = UploadDir()
    try:
        old, new = os.path.join(up.path, "a", "old.mp4"), os.path.join(up.path, "b", "new.mp4")
        for p in (old, new):
            os.makedirs(os.path.dirname(p))
            open(p, "wb").write(b"x")
        os.utime(old, (1, 1))
        assert up.contains(new) and not up.contains(str(tmp_path))
        assert up.sweep(3600) == 1
        assert not os.path.exists(old) and not os.path.exists(os.path.dirname(old)) and os.path.exists(new)
        up.discard(new)
        assert os.listdir(up.path) == []
        # files that no session claims are swept sooner than the age limit; claimed ones and the
        # demo's own folders only by age
        stray, used = os.path.join(up.path, "c" * 64, "stray.mp4"), os.path.join(up.path, "d" * 64, "used.mp4")
        own = up.own("mmkv-sample", "sample.mp4")
        for p in (stray, used, own):
            os.makedirs(os.path.dirname(p))
            open(p, "wb").write(b"x")
            os.utime(p, (time.time() - 120, time.time() - 120))
        up.claim(used, "session-1")
        assert up.sweep(3600, unclaimed_age=60) == 1
        assert not os.path.exists(stray) and os.path.exists(used) and os.path.exists(own)
        up.discard(used)                                    # a session still uses it: kept
        assert os.path.exists(used)
        up.release("session-1")
        assert not up.claimed(used) and up.sweep(3600, unclaimed_age=60) == 1 and not os.path.exists(used)
        up.discard(own)
        outside = tmp_path / "keep.mp4"
        outside.write_bytes(b"x")
        with pytest.raises(ValueError, match="not inside"):
            up.discard(str(outside))
        assert outside.exists()
    finally:
        up.remove()
    assert not os.path.exists(up.path)


def test_user_message_hides_server_paths():
    e = InputError("'/tmp/gradio/abc123/clip.mp4' is not a readable video")
    assert user_message(e, {"/tmp/gradio/abc123/clip.mp4": "clip.mp4"}) == "'clip.mp4' is not a readable video"
    assert "internal error (KeyError" in user_message(KeyError("x"))


# ----------------------------------------------------------------------------- encode once, ask many
@pytest.fixture(scope="module")
def demo():
    return Demo(DemoConfig(frames=FRAMES, max_new_tokens=64, max_encodings=2))


def test_encode_once_ask_many_streams_the_answer(demo):
    calls = []
    eid, enc = demo.encode(SAMPLE, "mmkv-tiny", "none", frames=FRAMES, progress=lambda f, d: calls.append((f, d)))
    assert enc.media.num_frames == FRAMES and enc.visual.grid == (FRAMES // 2, 2, 2)
    assert any("decoding + encoding frames" in d for _, d in calls) and calls[-1][0] == 1.0
    got, pipe = demo.encoding(eid)
    assert got is enc
    answers = []
    for q in ("What color is the shape?", "What happens?"):
        deltas, result = [], None
        for kind, value in demo.ask_stream(enc, pipe, q, max_new_tokens=MAX_NEW):
            if kind == "text":
                deltas.append(value)
            else:
                result = value
        assert result is not None and result.stats.new_tokens >= 1
        assert "".join(deltas).strip() == result.text          # the streamed text is the answer
        # the same answer as a one-shot generate with the same settings (the demo passes frames through)
        ref = mmkv.load("mmkv-tiny").generate(SAMPLE, q, frames=FRAMES, max_new_tokens=MAX_NEW)
        assert result.tokens == ref.tokens
        answers.append(result)
    assert answers[0].stats.kv_bytes > 0 and answers[0].stats.kv_len_per_layer
    with pytest.raises(InputError, match="empty"):
        next(demo.ask_stream(enc, pipe, "   "))
    with pytest.raises(InputError, match="max new tokens"):
        next(demo.ask_stream(enc, pipe, "q", max_new_tokens=10_000))


def test_closing_the_stream_stops_generation(demo):
    eid, enc = demo.encode(SAMPLE, "mmkv-tiny", "none", frames=4)
    enc, pipe = demo.encoding(eid)
    gen = demo.ask_stream(enc, pipe, "What happens?", max_new_tokens=64)
    kind, _ = next(gen)
    assert kind == "text"
    gen.close()  # the browser went away mid-answer
    assert not any(t.name == "mmkv-demo-ask" and t.is_alive() for t in threading.enumerate())
    kinds = [k for k, _ in demo.ask_stream(enc, pipe, "Again?", max_new_tokens=4)]
    assert kinds[-1] == "result"


def test_encodings_are_bounded_and_keyed(demo):
    ids = [demo.encode(SAMPLE, "mmkv-tiny", "none", frames=n)[0] for n in (2, 4, 6)]
    assert demo.encoding(ids[0]) is None                    # max_encodings=2: the oldest was dropped
    assert demo.encoding(ids[2]) is not None
    key = demo.settings_key(SAMPLE, "mmkv-tiny", "none", 6, None)
    assert demo.encoding(ids[2], key) is not None
    assert demo.encoding(ids[2], demo.settings_key(SAMPLE, "mmkv-tiny", "none", 8, None)) is None
    demo.drop(ids[2])
    assert demo.encoding(ids[2]) is None


def test_bad_settings_fail_before_loading(demo, files):
    with pytest.raises(InputError, match="not offered"):
        demo.encode(SAMPLE, "some/other-model", "none", frames=4)
    with pytest.raises(RecipeError):
        demo.encode(SAMPLE, "mmkv-tiny", "no-such-method:3", frames=4)
    with pytest.raises(InputError, match="frames must be between 1 and 512"):
        demo.encode(SAMPLE, "mmkv-tiny", "none", frames=0)
    with pytest.raises(InputError, match="garbage.mp4"):
        demo.encode(files["garbage"], "mmkv-tiny", "none", frames=4)


def test_recipes_share_the_loaded_model(demo):
    a = demo.pipeline("mmkv-tiny", "none")
    b = demo.pipeline("mmkv-tiny", "streaming:sink=2,recent=16")
    assert a.adapter is b.adapter and a is not b
    assert demo.pipeline("mmkv-tiny", "streaming:sink=2,recent=16") is b


# ----------------------------------------------------------------------------- pictures
def test_overlay_dims_dropped_cells_only():
    frame = np.full((60, 90, 3), 200, np.uint8)
    img = np.asarray(overlay(frame, (2, 3), [(0, 0), (1, 2)], width=90))
    assert img.shape == (60, 90, 3)
    cell = lambda r, c: img[r * 30 + 15, c * 30 + 15]  # noqa: E731 - centre pixel of a cell
    np.testing.assert_array_equal(cell(0, 0), [200, 200, 200])
    np.testing.assert_array_equal(cell(1, 2), [200, 200, 200])
    for r, c in [(0, 1), (0, 2), (1, 0), (1, 1)]:
        assert cell(r, c)[1] < 80 and cell(r, c)[0] > cell(r, c)[1]  # darkened, red tint


def test_thumbnails_show_kept_tokens_per_frame(demo):
    import torch

    eid, enc = demo.encode(SAMPLE, "mmkv-tiny", "none", frames=FRAMES)
    vt = enc.visual
    keep = torch.zeros(vt.num, dtype=torch.bool)
    keep[::3] = True                                        # as if a vision press kept every third token
    pruned = dataclasses.replace(enc, visual=vt.subset(keep))
    thumbs = thumbnails(pruned, n=20, width=64)
    counts = pruned.visual.per_slot_counts().tolist()
    assert len(thumbs) == vt.grid[0] == len(counts)
    for (img, caption), c in zip(thumbs, counts):
        assert img.size[0] == 64 and caption.endswith(f"kept {c}/4")
    # slot 1 holds sampled frames 2-3 (temporal patch of 2): its thumbnail is sampled frame 2
    assert thumbs[1][1].startswith(f"t={enc.media.timestamps[2]:.1f}s")
    full = thumbnails(enc, n=20, width=64)
    frame2 = enc.media.frames()[2]
    all_cells = [(r, c) for r in range(2) for c in range(2)]
    np.testing.assert_array_equal(np.asarray(full[1][0]), np.asarray(overlay(frame2, (2, 2), all_cells, width=64)))
    assert len(thumbnails(enc, n=3)) == 3


def test_stats_pictures(demo):
    eid, enc = demo.encode(SAMPLE, "mmkv-tiny", "none", frames=4)
    enc, pipe = demo.encoding(eid)
    res = [v for k, v in demo.ask_stream(enc, pipe, "What?", max_new_tokens=3) if k == "result"][0]
    s = res.stats
    mem = memory_html(s)
    assert "uncompressed" in mem and "stored" in mem and f"{s.kv_bytes / 1024:.2f} KiB" in mem
    t = timing_html(s, enc.stats.encode_s)
    assert all(w in t for w in ("encode (once)", "prefill", "decode", f"{s.decode_s:.3f} s"))
    assert "100.0% in every one of the 4 layers" in layers_html(s)
    # a method's per-layer shares in stats.extra get their own bars
    s2 = dataclasses.replace(s, extra={"layer_ratio": [0.5, 0.25]}, kv_len_per_layer=[10, 5])
    lh = layers_html(s2)
    assert "Layer share" in lh and "layer 1" in lh and "width:50.00%" in lh and "25.0%" in lh
    assert "encoder" in tokens_html(s, enc)
    rows = stats_rows(s)
    assert ["recipe", "none"] in rows and any(r[0] == "KV entries per layer" for r in rows)
    assert "<script" not in layers_html(dataclasses.replace(s, extra={"<script>": [1.0, 2.0]}))


def test_kv_memory_is_shown_against_the_uncompressed_cache():
    """The KV figures use Stats.kv_ratio, labelled "of uncompressed", and nowhere say fp16."""
    from mmkv.demo.render import answered_text

    s = mmkv.stats.Stats(recipe="kivi:2", kv_bytes=1024, kv_bytes_uncompressed=4096, kv_bytes_after_vision=4096,
                         prompt_tokens=10, kv_len_per_layer=[10, 10])
    mem = memory_html(s)
    assert "1.00 KiB (25.0% of uncompressed)" in mem and "4.00 KiB" in mem   # uncompressed = stored / kv_ratio
    res = mmkv.stats.Result(text="A", stats=s)
    texts = [mem, answered_text(res, "clip.mp4"), " ".join(" ".join(r) for r in stats_rows(s))]
    assert "25.0% of uncompressed" in texts[1]
    assert ["KV stored, share of uncompressed", "25.0%"] in stats_rows(s)
    assert not any("fp16" in t for t in texts)


def test_per_layer_figures_have_human_labels_and_units():
    """Raw stats keys become labels; counts are shown as counts, shares in percent; the card is
    not titled "ratios"."""
    from mmkv.demo.labels import label

    s = mmkv.stats.Stats(prompt_tokens=100, kv_len_per_layer=[100, 50],
                         extra={"zipvl_kv_important_per_layer": [40, 7], "zipvl_kv_ratio_per_layer": [0.4, 0.14],
                                "newmethod_kept_tokens_per_layer": [3, 9]})
    lh = layers_html(s)
    assert "ZipVL KV: important tokens" in lh and "ZipVL KV: share of tokens kept as important" in lh
    assert ">40<" in lh and ">7<" in lh and "14.0%" in lh and "50.0%" in lh
    assert "_per_layer" not in lh and "zipvl_" not in lh and "ratios" not in lh.lower()
    assert label("newmethod_kept_tokens_per_layer") == "Newmethod kept tokens"
    assert label("pvc_dropped_tokens").startswith("PVC:")
    rows = stats_rows(s)
    assert all("_" not in r[0] for r in rows), rows


def test_status_and_token_card_count_the_same_frames(demo):
    """Qwen2-VL encodes frames in pairs: the status and the token card both say 16 frames = 8 pairs."""
    from mmkv.demo.render import encoded_text

    eid, enc = demo.encode(SAMPLE, "mmkv-tiny", "none", frames=FRAMES)
    phrase = f"{FRAMES} sampled frames = {FRAMES // 2} frame pairs of 4 tokens each"
    assert phrase in encoded_text(enc, "sample.mp4", 1.0)
    card = tokens_html(enc.stats, enc)
    assert phrase in card and "kept tokens per frame pair" in card


def test_bundled_model_stops_after_one_letter(demo, monkeypatch):
    """The bundled model answers one letter: generation stops there even when the model would
    run on (here: it never emits its stop token) and max new tokens allows 64."""
    eid, enc = demo.encode(SAMPLE, "mmkv-tiny", "none", frames=4)
    enc, pipe = demo.encoding(eid)
    monkeypatch.setattr(pipe.adapter, "stop_ids", lambda: set())
    res = [v for k, v in demo.ask_stream(enc, pipe, "What happens in this film?", max_new_tokens=64)
           if k == "result"][0]
    assert len(res.tokens) == 1 and res.text in ("A", "B", "C", "D")


def test_page_says_what_the_bundled_model_answers():
    from mmkv.cli import build_parser
    from mmkv.demo.state import model_note

    note = model_note("mmkv-tiny")
    assert "one letter" in note and "multiple-choice" in note
    cmd = note.split("`mmkv demo ")[1].split("`")[0].split()
    args = build_parser().parse_args(["demo", *cmd])                 # the command shown is one the CLI takes
    assert args.models == ["Qwen/Qwen2.5-VL-7B-Instruct"]
    assert model_note("Qwen/Qwen2.5-VL-7B-Instruct") == ""


def test_questions_queue_behind_an_encoding(demo):
    """A question asked while the video encodes is in the chat at once, shows the encoding's
    progress while it waits, and is answered on that encoding once it is done."""
    from mmkv.demo.session import Session, Settings, run_job

    sess = Session()
    sess.video, sess.name = SAMPLE, "sample.mp4"
    st = Settings(SAMPLE, "sample.mp4", "mmkv-tiny", "none", FRAMES, None, MAX_NEW)
    sess.encode(st)                                         # the Encode button
    q = sess.ask("What color is the shape?", st)            # typed while it waits / runs
    assert [m["content"] for m in sess.chat()] == ["What color is the shape?", "⏳ waiting for the model…"]
    seen, kinds = [], []
    for kind, _ in run_job(demo, sess, sess.next_job()):
        kinds.append(kind)
        seen.append(sess.chat()[1]["content"])
    assert "encoded" in kinds and "error" not in kinds
    assert any(c.startswith("⏳ waiting: the video is being encoded: decoding + encoding frames (") for c in seen)
    eid = sess.eid
    kinds = [k for k, _ in run_job(demo, sess, sess.next_job())]
    assert kinds[-1] == "result" and "encoded" not in kinds and sess.eid == eid      # the same encoding
    assert q.reply["content"] in ("A", "B", "C", "D") and sess.pending() == 0
    sess.ask("Again?", st)
    assert sess.cancel("another video was uploaded") == 1
    assert sess.chat()[-1]["content"] == "✗ not asked: another video was uploaded"


def test_server_queue_serves_concurrent_users(server):
    """Two users at once through the HTTP API: each uploads, asks, and gets its own answer."""
    from gradio_client import Client, handle_file

    out, errors = {}, []

    def user(i):
        try:
            c = Client(server.local_url, verbose=False)
            c.predict(handle_file(SAMPLE), api_name="/upload")
            c.predict(f"question {i}?", api_name="/ask")          # shown and queued at once
            job = c.submit(api_name="/answer")                     # ... then answered in the model queue
            job.result(timeout=120)
            out[i] = job.outputs()[-1]
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    for i in range(2):
        chat = out[i][0]
        assert _text(chat[0]["content"]) == f"question {i}?" and chat[1]["role"] == "assistant"
        assert _text(chat[1]["content"]).strip()
        assert "Answered" in out[i][1]
    assert server.mmkv_demo.most == 1           # the queue ran the model calls one at a time (concurrency=1)
    assert all(server.mmkv_uploads.contains(p) for p in _uploads(server))


def _post_upload(app, name: str, data: bytes):
    """A file posted straight to Gradio's upload endpoint, as a script could (no page, no checks)."""
    import httpx

    return httpx.post(app.local_url + "gradio_api/upload", files={"files": (name, data)}, timeout=60)


def test_files_posted_to_the_upload_endpoint_are_limited_and_swept(server):
    """The size limit holds on the endpoint itself, and a file no session ever checked is swept
    after `unclaimed_ttl`, while an accepted upload of the same age stays (until `upload_ttl`)."""
    from gradio_client import Client, handle_file

    assert _post_upload(server, "big.mp4", b"\0" * 6_000_000).status_code == 413   # over the 5 MB limit
    r = _post_upload(server, "stray.mp4", b"not checked by anyone" * 10)
    assert r.status_code == 200
    stray = r.json()[0]
    c = Client(server.local_url, verbose=False)
    c.predict(handle_file(SAMPLE), api_name="/upload")
    accepted = [p for p in _uploads(server) if p.endswith("sample.mp4") and server.mmkv_uploads.claimed(p)]
    assert accepted and os.path.exists(stray)
    old = time.time() - server.mmkv_config.unclaimed_ttl - 60
    for p in (stray, *accepted):
        os.utime(p, (old, old))
    server.mmkv_sweeper.sweep()                                  # what the sweeper thread runs
    assert not os.path.exists(stray) and all(os.path.exists(p) for p in accepted)
    assert server.mmkv_sweeper.every <= server.mmkv_config.unclaimed_ttl / 4


def test_app_launched_by_hand_keeps_the_upload_limit():
    """`build_app(config).launch()` (without max_file_size) still refuses uploads over max_upload."""
    from demo_support import _free_port

    from mmkv.demo.app import build_app, close

    app = build_app(DemoConfig(max_upload="1mb"))
    app.mmkv_sweeper.start()
    app.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True)
    try:
        assert _post_upload(app, "big.mp4", b"\0" * 1_200_000).status_code == 413
        assert _post_upload(app, "small.mp4", b"\0" * 1000).status_code == 200
    finally:
        close(app)


@pytest.mark.browser
def test_browser_upload_ask_bad_upload_ask_again(server, browser, files):
    from playwright.sync_api import expect

    expect.set_options(timeout=60_000)   # generous: the CI machine is small and shared
    page = browser.new_page(viewport={"width": 1400, "height": 1600})
    page.set_default_timeout(60_000)
    page.goto(server.local_url)
    status = page.locator("#mmkv-status")
    expect(status).to_contain_text("Upload a video to start")
    # the recipe choices are the registered presets
    page.locator("#mmkv-recipe input").click()
    for name in recipe_choices():
        expect(page.get_by_role("option", name=name, exact=True)).to_be_visible()
    page.keyboard.press("Escape")

    # 1. upload the bundled sample, ask, see the streamed answer and the stats
    _upload(page, SAMPLE)
    expect(status).to_contain_text("Ready: sample.mp4: 2:08 (256 frames at 2 fps)")
    uploaded = [p for p in _uploads(server) if p.endswith("sample.mp4")]
    assert uploaded and all(server.mmkv_uploads.contains(p) for p in uploaded)   # only in the upload folder
    # the browser's own player can show the sample (H.264): metadata loads, no media error
    # (where this Chromium build plays H.264 at all; builds without proprietary codecs do not)
    if page.evaluate("() => document.createElement('video').canPlayType('video/mp4; codecs=\"avc1.64001e\"')"):
        page.wait_for_function("() => [...document.querySelectorAll('video')].some("
                               "v => v.readyState >= 1 && !v.error && v.duration > 127)")
    q1 = "What color is the shape that appears?"
    page.locator("#mmkv-question textarea").fill(q1)
    page.locator("#mmkv-ask").click()
    expect(status).to_contain_text("Answered about sample.mp4", timeout=120_000)
    bot = page.locator("#mmkv-chat .message.bot")
    expect(page.locator("#mmkv-chat .message.user")).to_have_count(1)
    expect(page.locator("#mmkv-chat .message.user").first).to_contain_text(q1)
    expect(bot).to_have_count(1)
    assert bot.first.inner_text().strip()                                         # a non-empty answer
    expect(page.locator("#mmkv-memory")).to_contain_text("of uncompressed")
    expect(page.locator("#mmkv-memory")).to_contain_text("KiB")
    expect(page.locator("#mmkv-time")).to_contain_text("decode")
    expect(page.locator("#mmkv-layers")).to_contain_text("4 layers")
    expect(page.locator("#mmkv-tokens")).to_contain_text("encoder")
    expect(page.locator("#mmkv-thumbs img")).to_have_count(FRAMES // 2)           # one overlay per temporal slot
    expect(page.locator("#mmkv-thumbs")).to_contain_text("kept 4/4")

    # 2. bad uploads: a clear error in the page, the app keeps running
    for kind, text in (("garbage", "is not a readable video"), ("zero", "zero.mp4"),
                       ("png_mp4", "'png_photo.mp4' is a PNG image, not a video")):
        _upload(page, files[kind])
        expect(status).to_contain_text("Error: upload rejected")
        expect(status).to_contain_text(text)
        assert server.mmkv_uploads.path not in status.inner_text()               # no server paths shown
        assert not any(p.endswith(os.path.basename(files[kind])) for p in _uploads(server))  # deleted at once
        expect(status).to_contain_text("Still using 'sample.mp4'")
    # over the upload limit: refused by the page before anything is stored
    _upload(page, files["big"])
    expect(page.locator(".toast-body").filter(has_text="exceed the maximum allowed size")).to_be_visible()
    assert not any(p.endswith("big.mp4") for p in _uploads(server))
    # not a video by its type: refused by the page too
    _upload(page, files["text"])
    expect(page.locator(".toast-body").filter(has_text="notes.txt")).to_be_visible()
    assert not any(p.endswith("notes.txt") for p in _uploads(server))

    # 3. a second question still works, on the same encoding (encode once, ask many)
    n_enc = len(server.mmkv_demo._encodings)
    q2 = "What happens at the end?"
    page.locator("#mmkv-question textarea").fill(q2)
    page.locator("#mmkv-question textarea").press("Enter")
    expect(bot).to_have_count(2, timeout=120_000)
    expect(status).to_contain_text("Answered about sample.mp4")
    expect(page.locator("#mmkv-chat .message.user").nth(1)).to_contain_text(q2)
    assert bot.nth(1).inner_text().strip()
    assert len(server.mmkv_demo._encodings) == n_enc                              # not encoded again
    page.close()
