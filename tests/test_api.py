"""Public API and CLI: encode once / ask many, stats, streaming text, bad input, exit codes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import mmkv
from conftest import frames_for
from mmkv.errors import InputError, ModelError, RecipeError

QS = ["What is happening in this video?", "Describe the colors.", "How many objects?"]


@pytest.mark.parametrize("recipe", ["none", "streaming:sink=2,recent=24", "kivi:bits=2,group=8,residual=8"])
def test_encode_once_ask_many_equals_separate_calls(tiny_dir, recipe):
    fam = "qwen2_5_vl"
    pipe = mmkv.load(tiny_dir[fam], recipe=recipe)
    video = frames_for(fam, n=8, seed=21)
    enc = pipe.encode(video)
    n_bytes = enc.cache.nbytes()
    many = [pipe.ask(enc, q, max_new_tokens=8, output_scores=True) for q in QS]
    assert enc.cache.nbytes() == n_bytes  # asking never changes the encoding
    for q, r in zip(QS, many):
        sep = pipe.generate(video, q, max_new_tokens=8, output_scores=True)
        assert r.tokens == sep.tokens  # (ask prefills the question on its own; generate does one pass)
        torch.testing.assert_close(torch.stack(r.scores), torch.stack(sep.scores), atol=1e-4, rtol=1e-4)


def test_compress_at_encode_shrinks_the_encoding(tiny_dir):
    fam = "llava_onevision"
    video = frames_for(fam, n=16, seed=22)
    pipe = mmkv.load(tiny_dir[fam], recipe="kivi:bits=2,group=8,residual=8", compress_at="encode")
    enc = pipe.encode(video)
    full = mmkv.load(tiny_dir[fam]).encode(video)
    assert enc.cache.nbytes() < 0.4 * full.cache.nbytes()  # 56 of 69 tokens at 6 bits (group 8) vs fp32
    a = pipe.ask(enc, QS[0], max_new_tokens=4)
    b = pipe.ask(enc, QS[0], max_new_tokens=4)
    assert a.tokens == b.tokens and len(a.tokens) > 0


def test_with_recipe_shares_the_model(tiny_dir):
    fam = "qwen2_vl"
    video = frames_for(fam, n=8, seed=23)
    base = mmkv.load(tiny_dir[fam])
    pipe = base.with_recipe("kivi:bits=2,group=8,residual=8")
    assert pipe.adapter is base.adapter and str(base.recipe) == "none"
    fresh = mmkv.load(tiny_dir[fam], recipe="kivi:bits=2,group=8,residual=8")
    a, b = pipe.generate(video, QS[0], max_new_tokens=6), fresh.generate(video, QS[0], max_new_tokens=6)
    assert a.tokens == b.tokens and a.stats.kv_bytes == b.stats.kv_bytes < base.generate(video, QS[0]).stats.kv_bytes
    with pytest.raises(RecipeError):
        base.with_recipe("kivi:bits=9")


def test_result_and_stats_are_measured(pipes):
    pipe = pipes["qwen2_vl"]
    res = pipe.generate(frames_for("qwen2_vl", n=6), QS[0], max_new_tokens=5)
    assert str(res) == res.text
    s = res.stats
    assert s.visual_tokens == [("encoder", 48, 48)]
    assert s.prompt_tokens == s.kv_len_per_layer[0]
    assert s.kv_bytes == s.kv_bytes_uncompressed and s.kv_ratio == 1.0  # nothing compressed
    assert s.encode_s > 0 and s.prefill_s > 0 and s.new_tokens == len(res.tokens)
    assert s.peak_memory_bytes > 0 and s.peak_memory_kind
    d = json.loads(res.to_json())
    assert d["text"] == res.text and d["stats"]["kv_bytes"] == s.kv_bytes
    assert "KV bytes" in s.table()


def test_streamed_text_equals_answer(pipes):
    pieces = []
    res = pipes["llava_onevision"].generate(frames_for("llava_onevision", n=4), QS[1], max_new_tokens=10,
                                            on_text=pieces.append)
    assert "".join(pieces).strip() == res.text


def test_sampling_is_seeded(pipes):
    pipe = pipes["qwen2_vl"]
    v = frames_for("qwen2_vl", n=4)
    a = pipe.generate(v, QS[0], max_new_tokens=6, do_sample=True, temperature=1.5, top_k=50, top_p=0.9, seed=3)
    b = pipe.generate(v, QS[0], max_new_tokens=6, do_sample=True, temperature=1.5, top_k=50, top_p=0.9, seed=3)
    assert a.tokens == b.tokens


def test_module_generate_and_untrained_note(tiny_dir, tmp_path, monkeypatch):
    res = mmkv.generate(frames_for("qwen2_vl", n=4), "What?", model=tiny_dir["qwen2_vl"], max_new_tokens=3)
    assert isinstance(res, mmkv.Result) and res.note == ""
    card = tmp_path / "m"
    import shutil
    shutil.copytree(tiny_dir["qwen2_vl"], card)
    (card / "mmkv.json").write_text(json.dumps({"trained": False}))
    assert "UNTRAINED" in mmkv.generate(frames_for("qwen2_vl", n=4), "What?", model=str(card),
                                        max_new_tokens=2).note


def test_bad_inputs_fail_before_the_model_loads(tmp_path, monkeypatch):
    import mmkv.api as api

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(api, "load_adapter", boom)
    with pytest.raises(InputError, match="no such file"):
        mmkv.generate(str(tmp_path / "nope.mp4"), "q?")
    with pytest.raises(InputError, match="zero frames"):
        mmkv.generate([], "q?")
    with pytest.raises(InputError, match="question"):
        mmkv.generate(np.zeros((2, 8, 8, 3), np.uint8), "  ")
    with pytest.raises(RecipeError, match="unknown stage"):
        mmkv.generate(np.zeros((2, 8, 8, 3), np.uint8), "q?", recipe="zipzap:3")
    with pytest.raises(RecipeError):
        mmkv.generate(np.zeros((2, 8, 8, 3), np.uint8), "q?", recipe="kivi:bits=3")


def test_unsupported_and_missing_models(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    d = tmp_path / "textonly"
    Qwen2ForCausalLM(Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=50)).save_pretrained(d)
    with pytest.raises(ModelError, match="does not support.*qwen2_vl"):
        mmkv.load(str(d))
    with pytest.raises(ModelError, match="cannot load"):
        mmkv.load(str(tmp_path / "empty_dir_that_does_not_exist"))
    with pytest.raises(ModelError, match="mmkv"):
        mmkv.load(str(d), attn_implementation="mmkv")


def test_bad_generation_arguments(pipes):
    pipe = pipes["qwen2_vl"]
    v = frames_for("qwen2_vl", n=2)
    with pytest.raises(InputError, match="max_new_tokens"):
        pipe.generate(v, "q", max_new_tokens=0)
    with pytest.raises(InputError, match="temperature"):
        pipe.generate(v, "q", do_sample=True, temperature=0)
    enc = pipe.encode(v)
    pipe.ask(enc, "q", reuse=False, max_new_tokens=1)
    with pytest.raises(InputError, match="consumed"):
        pipe.ask(enc, "q")


def run_cli(capsys, *args):
    """The CLI in-process: (exit code, stdout, stderr)."""
    from mmkv.cli import main
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_generate_json(tiny_dir, tmp_path, capsys):
    from mmkv.synthetic import make_example, write_video
    path = str(tmp_path / "v.mp4")
    write_video(path, make_example(1, 32).frames)
    code, out, err = run_cli(capsys, "generate", path, "What color?", "--model", tiny_dir["qwen2_vl"], "--recipe",
                             "kivi:2", "--frames", "8", "--max-new-tokens", "4", "--json")
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["stats"]["recipe"] == "kivi:2"
    assert res["stats"]["frames"] == 8


@pytest.mark.parametrize("args,code,needle", [
    (["generate", "/no/such/video.mp4", "q"], 2, "no such file"),
    (["generate", "--recipe", "nope"], 2, "unknown stage"),
    (["generate", "--frames", "0"], 2, "frames must be a positive"),
])
def test_cli_errors_are_one_line(capsys, args, code, needle):
    rc, out, err = run_cli(capsys, *args)
    assert rc == code
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err


def test_cli_model_error_and_debug(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "generate", "--model", str(tmp_path))
    assert rc == 2 and "cannot load" in err
    with pytest.raises(ModelError):  # --debug lets the exception (and its traceback) through
        run_cli(capsys, "--debug", "generate", "--model", str(tmp_path))


def test_console_script_runs():
    """The installed `mmkv` entry point (a real subprocess)."""
    exe = os.path.join(os.path.dirname(sys.executable), "mmkv")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "mmkv.cli"]
    r = subprocess.run(cmd + ["info"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for word in ("qwen2_5_vl", "llava_onevision", "kivi", "streaming", "none"):
        assert word in r.stdout
    r = subprocess.run(cmd + ["generate", "/no/such.mp4", "q"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == "mmkv: error: no such file: '/no/such.mp4'"


def test_cli_info_on_one_stage_or_preset(capsys):
    rc, out, _ = run_cli(capsys, "info", "vidkv")
    assert rc == 0 and "vidkv (kv stage)" in out
    assert "key_bits         = 1.5   <- vidkv:VALUE sets it" in out and "stats            = 8" in out
    rc, out, _ = run_cli(capsys, "info", "balanced")
    assert rc == 0 and "= evs:0.25+kivi:2,salient=0.05" in out and "mmkv info kivi" in out
    rc, out, _ = run_cli(capsys, "info", "look-m")  # aliases resolve to the stage
    assert rc == 0 and out.startswith("lookm (kv stage)")
    rc, _, err = run_cli(capsys, "info", "nope")
    assert rc == 2 and "unknown stage or preset 'nope'" in err


# ----------------------------------------------------------------------------- checked before loading
@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    from mmkv.models.tiny import build_tiny
    return build_tiny("llava_next", str(tmp_path_factory.mktemp("tiny") / "llava_next"), seed=7)


@pytest.fixture
def no_model_load(monkeypatch):
    import mmkv.api as api

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(api, "load_adapter", boom)
    api._PIPELINES.clear()


def _early_cases(tiny_dir, next_dir):
    from PIL import Image
    video, image = np.zeros((2, 8, 8, 3), np.uint8), Image.new("RGB", (60, 40))
    qwen = tiny_dir["qwen2_vl"]
    return [
        (video, "q?", dict(model=qwen, max_new_tokens=0), "max_new_tokens"),
        (video, "q?", dict(model=qwen, max_new_tokens=-3), "max_new_tokens"),
        (video, " \t\n ", dict(model=qwen), "question is empty"),
        (video, "q?", dict(model=qwen, recipe="globalcom2"), "this input is a video"),
        (image, "q?", dict(model=qwen, recipe="globalcom2"), "qwen2-vl"),
        (video, "q?", dict(model=next_dir), "images only"),
        (video, "q?", dict(model=qwen, chunk_frames=0), "chunk_frames must be a positive integer"),
        (video, "q?", dict(model=qwen, prefill_chunk=0), "prefill_chunk"),
        (video, "q?", dict(model=qwen, compress_at="later"), "compress_at"),
        (video, "q?", dict(model=qwen, do_sample=True, temperature=0), "temperature"),
        (video, "q?", dict(model=qwen, recipe="pvc+pvc"), "appears twice"),
    ]


def test_every_bad_request_fails_before_the_model_loads(tiny_dir, next_dir, no_model_load):
    for video, q, kw, needle in _early_cases(tiny_dir, next_dir):
        with pytest.raises((InputError, RecipeError), match=needle):
            mmkv.generate(video, q, **kw)
    with pytest.raises(InputError, match="chunk_frames"):
        mmkv.load(tiny_dir["qwen2_vl"], chunk_frames=0)


@pytest.mark.parametrize("extra,needle", [
    (["--max-new-tokens", "0"], "max_new_tokens must be a positive integer"),
    (["--chunk-frames", "0"], "chunk_frames must be a positive integer"),
    (["--recipe", "globalcom2"], "this input is a video"),
    (["--recipe", "++"], "empty stage"),
    (["--recipe", "kivi:bits=2,bits=4"], "bits is given twice"),
    (["--fps", "inf"], "fps must be a finite positive number"),
])
def test_cli_refuses_before_loading_and_before_printing(tiny_dir, capsys, no_model_load, extra, needle):
    rc, out, err = run_cli(capsys, "generate", "--model", tiny_dir["qwen2_vl"], *extra)
    lines = err.strip().splitlines()
    assert rc == 2 and out == "" and len(lines) == 1 and needle in lines[0], (rc, out, err)


def test_cli_whitespace_question_and_image_only_family(tiny_dir, next_dir, capsys, no_model_load):
    from mmkv.cli import SAMPLE_VIDEO
    for model, q, needle in ((tiny_dir["qwen2_vl"], "   ", "question is empty"), (next_dir, "q?", "images only")):
        rc, out, err = run_cli(capsys, "generate", SAMPLE_VIDEO, q, "--model", model)
        assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1 and needle in err


@pytest.mark.parametrize("kind", ["garbage", "png"])
def test_cli_unreadable_video_is_one_line_exit_2(tmp_path, capsys, kind):
    from PIL import Image
    path = tmp_path / f"{kind}.mp4"
    if kind == "garbage":
        path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    else:
        Image.new("RGB", (16, 16)).save(path, format="PNG")
    rc, out, err = run_cli(capsys, "generate", str(path), "q?")
    lines = err.strip().splitlines()
    assert rc == 2 and out == "" and len(lines) == 1 and f"{kind}.mp4" in lines[0]
    assert ("decord:" in lines[0] and "pyav:" in lines[0]) if kind == "garbage" else "PNG image" in lines[0]


def test_generate_takes_every_load_option(tiny_dir):
    fam = "qwen2_vl"
    video, q = frames_for(fam, n=8, seed=24), QS[0]
    for opts in (dict(chunk_frames=2, prefill_chunk=7), dict(system="You are terse."),
                 dict(recipe="kivi:bits=2,group=8,residual=8", compress_at="encode")):
        want = mmkv.load(tiny_dir[fam], **opts).generate(video, q, max_new_tokens=5)
        got = mmkv.generate(video, q, model=tiny_dir[fam], max_new_tokens=5, **opts)
        assert got.tokens == want.tokens and got.stats.prompt_tokens == want.stats.prompt_tokens
        assert got.stats.kv_bytes == want.stats.kv_bytes
    plain = mmkv.generate(video, q, model=tiny_dir[fam], max_new_tokens=1)
    terse = mmkv.generate(video, q, model=tiny_dir[fam], max_new_tokens=1, system="You are terse.")
    assert terse.stats.prompt_tokens > plain.stats.prompt_tokens  # the option reached the prompt


def test_truncated_video_counts_reach_the_stats(tiny_dir, tmp_path):
    from mmkv.errors import MmkvWarning
    from mmkv.synthetic import write_video
    frames = np.random.default_rng(0).integers(0, 255, (24, 112, 112, 3), dtype=np.uint8)
    path = tmp_path / "full.mp4"
    write_video(str(path), frames, fps=8, codec="h264")
    data = path.read_bytes()
    start = data.find(b"mdat") + 4
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: start + (len(data) - start) // 2])
    with pytest.warns(MmkvWarning, match="promises 24 frames"):
        res = mmkv.generate(str(cut), QS[0], model=tiny_dir["qwen2_vl"], max_new_tokens=1, frames=32)
    n = res.stats.extra["video_frames_decodable"]
    assert res.stats.extra["video_frames_in_header"] == 24 and 0 < n < 24 and res.stats.frames == n


# ----------------------------------------------------------------------------- context length
def test_prompt_longer_than_the_context_is_refused_before_prefill(tiny_dir, monkeypatch):
    import time

    from mmkv.pipeline import Pipeline
    pipe = mmkv.load(tiny_dir["qwen2_vl"])

    def no_prefill(*a, **k):
        raise AssertionError("prefill ran")

    video = frames_for("qwen2_vl", n=8)
    full = pipe.generate(video, QS[0], max_new_tokens=1).stats.prompt_tokens  # 8 frames: 64 visual tokens
    monkeypatch.setattr(Pipeline, "_prefill", no_prefill)
    t = time.perf_counter()
    with pytest.raises(InputError, match=r"32,768 positions.*shorten the question"):
        pipe.generate(video, "x" * 100_000, max_new_tokens=4)  # 100,000 tokens with this tokenizer
    monkeypatch.setattr(Pipeline, "_encode_visual", no_prefill)  # refused before the vision tower too
    with pytest.raises(InputError, match="100,0"):
        pipe.generate(video, "x" * 100_000, max_new_tokens=4)
    assert time.perf_counter() - t < 20
    monkeypatch.undo()
    monkeypatch.setattr(Pipeline, "_prefill", no_prefill)
    cfg = pipe.adapter.text_config
    monkeypatch.setattr(cfg, "max_position_embeddings", full - 10)
    with pytest.raises(InputError) as e:
        pipe.generate(video, QS[0], max_new_tokens=4)
    msg = str(e.value)
    assert f"the prompt is {full} tokens (64 visual + {full - 64} text) + 4 new tokens = {full + 4}" in msg
    assert f"over the {full - 10} positions" in msg and "fewer frames" in msg and "vision press" in msg
    enc = pipe.encode(video, prefill=False)   # (an encoding made by another loaded model is refused)
    monkeypatch.setattr(cfg, "max_position_embeddings", full + 2)
    with pytest.raises(InputError, match="at most 2 new tokens"):
        pipe.ask(enc, QS[0], max_new_tokens=4)


def test_rope_scaling_warns_instead(tiny_dir, monkeypatch):
    from mmkv.errors import MmkvWarning
    pipe = mmkv.load(tiny_dir["qwen2_vl"])
    video = frames_for("qwen2_vl", n=8)
    want = pipe.generate(video, QS[0], max_new_tokens=3)
    n = want.stats.prompt_tokens
    cfg = pipe.adapter.text_config
    rope = dict(cfg.rope_parameters, rope_type="yarn", factor=4.0, original_max_position_embeddings=n)
    monkeypatch.setattr(cfg, "rope_parameters", rope)  # (read by the check only: the model keeps its rope)
    monkeypatch.setattr(cfg, "max_position_embeddings", n)
    with pytest.warns(MmkvWarning, match=rf"past the {n} positions the model was trained on \(yarn rope scaling x4"):
        got = pipe.generate(video, QS[0], max_new_tokens=3)
    assert got.tokens == want.tokens
    with pytest.raises(InputError, match=f"over the {4 * n} positions this model takes with its yarn"):
        pipe.generate(frames_for("qwen2_vl", n=40), QS[0], max_new_tokens=3)


# ----------------------------------------------------------------------------- the terminal
def test_cli_stdout_holds_exactly_the_answer(tiny_dir, tmp_path):
    """A real subprocess: nothing but the answer and the stats reaches stdout, and transformers'
    deprecation of `past_key_values` (5.24) is not triggered."""
    from mmkv.synthetic import make_example, write_video
    path = str(tmp_path / "v.mp4")
    write_video(path, make_example(1, 32).frames)
    q, model = "What color?", tiny_dir["qwen2_vl"]
    exe = os.path.join(os.path.dirname(sys.executable), "mmkv")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "mmkv.cli"]
    r = subprocess.run(cmd + ["generate", path, q, "--model", model, "--frames", "8", "--max-new-tokens", "6"],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONWARNINGS="default"))
    assert r.returncode == 0, r.stderr
    assert "deprecated" not in r.stderr and "Warning" not in r.stderr, r.stderr
    want = mmkv.generate(path, q, model=model, frames=8, max_new_tokens=6)
    from mmkv.cli import _escape
    lines = r.stdout.split("\n")
    assert lines[:3] == [f"Q: {q}", f"A: {_escape(want.text)}", ""]
    table = want.stats.table().split("\n")
    assert [x.split("  ")[0] for x in lines[3:3 + len(table)]] == [x.split("  ")[0] for x in table]
    assert lines[3 + len(table):] == [""]


def test_cache_argument_matches_the_installed_transformers(pipes):
    import inspect
    a = pipes["qwen2_vl"].adapter
    params = inspect.signature(a.text_model.forward).parameters
    assert a.cache_kwarg in params and a.cache_kwarg in ("cache", "past_key_values")
    assert a.cache_kwarg == ("cache" if "cache" in params else "past_key_values")


def test_control_characters_are_printed_escaped(tiny_dir, capsys, monkeypatch):
    from mmkv.cli import SAMPLE_VIDEO, _escape
    from mmkv.pipeline import Pipeline
    from mmkv.stats import Result, Stats
    assert _escape("a\x00b\ufffd\x1b[2J\r\nok\tü\u200b") == "a\\x00b\\ufffd\\x1b[2J\\r\nok\tü\u200b"

    def fake(self, media, question, on_text=None, **kw):
        for piece in (" A\x00", "\x1b"):
            on_text(piece)
        return Result(text="A\x00\x1b\ufffd", stats=Stats(), tokens=[1, 2, 3])

    monkeypatch.setattr(Pipeline, "generate", fake)
    rc, out, _ = run_cli(capsys, "generate", SAMPLE_VIDEO, "q?", "--model", tiny_dir["qwen2_vl"])
    assert rc == 0 and out.split("\n")[1] == "A:  A\\x00\\x1b\\ufffd"  # the held-back U+FFFD printed at the end
    assert "\x00" not in out and "\x1b" not in out and "\ufffd" not in out


def test_cli_info_json(capsys):
    from mmkv.recipe import STAGES
    rc, out, _ = run_cli(capsys, "info", "--json")
    info = json.loads(out)
    assert rc == 0 and isinstance(info, list)
    assert sorted(d["name"] for d in info) == sorted({c.name for c in STAGES.values()})
    for d in info:
        assert set(d) == {"name", "kind", "main", "params", "needs_question", "doc"}
    rc, out, err = run_cli(capsys, "info", "kivi", "--json")
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1
