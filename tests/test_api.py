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
    assert res["stats"]["recipe"] == "kivi:bits=2" or res["stats"]["recipe"] == "kivi"
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
    assert rc == 0 and "= evs:0.25+zipvl" in out and "mmkv info zipvl" in out
    rc, out, _ = run_cli(capsys, "info", "look-m")  # aliases resolve to the stage
    assert rc == 0 and out.startswith("lookm (kv stage)")
    rc, _, err = run_cli(capsys, "info", "nope")
    assert rc == 2 and "unknown stage or preset 'nope'" in err
