"""`mmkv bench quality --task long`: the JSON contract, the three protocols, skipped presses,
resuming, and the paired bootstrap interval."""
import json
import os

import numpy as np
import torch
import pytest

from mmkv.bench.stats import interval, paired_interval

KEYS = {"recipe", "protocol", "task", "frames", "n", "accuracy", "delta", "ci_low", "ci_high",
        "visual_kept_fraction", "kv_bytes_ratio", "bits_per_element", "prefill_s", "decode_s", "skipped"}


def test_paired_interval():
    rng = np.random.default_rng(0)
    base = {f"v{i}": rng.integers(0, 2, 3).tolist() for i in range(200)}
    assert paired_interval(base, base) == (0.0, 0.0, 0.0)              # identical answers: no difference at all
    worse = {v: [0] + o[1:] for v, o in base.items()}                   # first question always wrong
    d, lo, hi = paired_interval(worse, base)
    want = -100 * sum(o[0] for o in base.values()) / 600
    assert d == pytest.approx(want) and lo < d < hi <= 0
    acc, lo, hi = interval(base)
    assert lo < acc < hi and acc == pytest.approx(100 * sum(map(sum, base.values())) / 600)
    # the interval narrows with more videos (about 1/sqrt(n))
    _, lo_all, hi_all = paired_interval(worse, base)
    _, lo_s, hi_s = paired_interval(dict(list(worse.items())[:50]), base)
    assert hi_s - lo_s > 1.5 * (hi_all - lo_all)
    with pytest.raises(ValueError, match="same questions"):
        paired_interval({"a": [1]}, {"a": [1, 0]})


def long_args(model: str, tmp_path, recipes: str, n: int = 1, protocol: str = "encode") -> list[str]:
    """`mmkv bench quality --task long` on 96-frame videos into tmp_path/r.json."""
    return ["bench", "quality", "--task", "long", "--model", model, "--frames", "96", "--n", str(n),
            "--protocol", protocol, "--recipes", recipes, "--data-dir", str(tmp_path / "data"),
            "--json", str(tmp_path / "r.json"), "--no-progress"]


@pytest.mark.parametrize("protocol", ["encode", "ask", "multiturn"])
def test_long_bench_contract_and_resume(tiny_dir, tmp_path, protocol, capsys):
    from mmkv.cli import main

    out = tmp_path / "r.json"
    args = long_args(tiny_dir["qwen2_vl"], tmp_path, "none;kivi:2;vidkv;pvc:ratio=0.5", n=2, protocol=protocol)
    assert main(args) == 0
    res = json.load(open(out))
    assert [r["recipe"] for r in res] == ["none", "kivi:2", "vidkv", "pvc:ratio=0.5"]
    for r in res:
        assert KEYS <= set(r) and r["protocol"] == protocol and r["task"] == "long" and r["frames"] == 96
    none, kivi, vidkv, pvc = res
    assert none["n"] == 6 and none["delta"] == 0 and none["ci_low"] == none["ci_high"] == 0
    assert (none["answers_equal"], none["gained"], none["lost"], none["prefill_speedup"]) == (6, 0, 0, 1.0)
    # against uncompressed, question by question, from the records
    recs = [json.loads(x) for x in open(str(out) + ".records.jsonl")]
    outputs = {(r["recipe"], q["question_id"]): (q["output"], q["correct"]) for r in recs for q in r["questions"]}
    ids = [q for (rec, q) in outputs if rec == "none"]
    for r in (kivi, pvc):
        pairs = [(outputs[("none", q)], outputs[(r["recipe"], q)]) for q in ids]
        assert r["answers_equal"] == sum(a[0] == b[0] for a, b in pairs)
        assert r["delta"] == pytest.approx(100 * (r["gained"] - r["lost"]) / 6)
        assert r["prefill_speedup"] > 0
    assert none["kv_bytes_ratio"] == pytest.approx(1.0) and none["visual_kept_fraction"] == 1.0
    assert pvc["visual_kept_fraction"] <= 0.5 and pvc["kv_bytes_ratio"] < 1
    assert kivi["kv_bytes_ratio"] < 1
    if protocol == "encode":   # VidKV's STP needs the question: marked, not scored
        assert vidkv["skipped"] and "vidkv" in vidkv["skipped"] and vidkv["accuracy"] is None
    else:
        assert vidkv["skipped"] is None and vidkv["n"] == 6
    records = open(str(out) + ".records.jsonl").read().splitlines()
    assert len(records) == 2 * (3 if protocol == "encode" else 4)
    assert main(args) == 0                                              # resumed: nothing recomputed
    assert open(str(out) + ".records.jsonl").read().splitlines() == records
    assert json.load(open(out)) == res
    assert "| `none`" in capsys.readouterr().out


def test_needle_json_has_the_contract(tmp_path, tiny_dir):
    from mmkv.cli import main

    out = tmp_path / "n.json"
    assert main(["bench", "quality", "--model", tiny_dir["qwen2_vl"], "--frames", "32", "--n", "3", "--recipes",
                 "none;kivi:2", "--data-dir", str(tmp_path / "d"), "--json", str(out), "--no-progress"]) == 0
    res = json.load(open(out))
    assert len(res) == 2 and all(KEYS <= set(r) for r in res) and res[0]["task"] == "needle"
    assert res[0]["protocol"] == "encode" and res[1]["n"] == 3


def test_visual_cache_gives_the_same_encodings(tiny_dir):
    """encode(visual_cache=...) reuses the vision tower's output across recipes: every recipe's
    answer and kept tokens equal those of a fresh encode."""
    import mmkv
    from conftest import frames_for

    base = mmkv.load(tiny_dir["qwen2_vl"], chunk_frames=4)
    video = frames_for("qwen2_vl", n=12, seed=9)
    shared: dict = {}
    for spec in ["none", "pvc:ratio=0.5", "evs:0.25+kivi:2", "random:0.5"]:
        pipe = base.with_recipe(spec)
        a = pipe.encode(video, visual_cache=shared)
        b = pipe.encode(video)
        assert torch.equal(a.visual.index, b.visual.index) and torch.equal(a.visual.embeds, b.visual.embeds)
        assert pipe.ask(a, "What?", max_new_tokens=4).tokens == pipe.ask(b, "What?", max_new_tokens=4).tokens
    assert len(shared) == 3                                          # 12 frames in chunks of 4


@pytest.mark.parametrize("task", ["needle", "long", "image"])
def test_missing_model_or_bad_recipe_is_refused_before_any_data(tmp_path, task, capsys, monkeypatch):
    """A missing bundled checkpoint or a recipe that does not parse is an error (exit 2) before the
    held-out data is written (at 1,024 frames that is minutes of rendering)."""
    from mmkv.cli import main

    data = tmp_path / "data"
    base = ["bench", "quality", "--task", task, "--n", "1", "--data-dir", str(data), "--no-progress"]
    with monkeypatch.context() as m:
        m.setattr("mmkv.models.loading.ASSETS", str(tmp_path / "no-assets"))   # an installation without it
        assert main(base + ["--model", "mmkv-long"]) == 2 and not data.exists()
    assert "mmkv-long" in capsys.readouterr().err
    assert main(base + ["--model", "mmkv-tiny", "--recipes", "none;kivi:bits=2,bits=4"]) == 2 and not data.exists()
    assert "bits" in capsys.readouterr().err


@pytest.mark.slow
def test_headline_recipes_all_run_under_encode(tiny_dir, tmp_path):
    """Every row of the headline table runs on a short v2 video under `encode` (or is marked
    skipped with its reason), with the bytes and fractions the contract names."""
    from mmkv.bench import long

    data = tmp_path / "d"
    videos = long.dataset(str(data), 1, 96, long.HELD_OUT_SEED)
    res = long.run(tiny_dir["qwen2_vl"], long.RECIPES, videos, str(data), "encode", 96, str(tmp_path / "r.jsonl"),
                   progress=False)
    assert [r["recipe"] for r in res] == [s for s, _ in long.RECIPES]
    for r in res:
        if r["skipped"]:
            assert r["recipe"] == "vidkv" and "question" in r["skipped"]
            continue
        assert r["n"] == 3 and 0 < r["kv_bytes_ratio"] <= 1.0 + 1e-9, r
        # fp32 model; a mass merge (bilevel's default, the observed rows') adds an fp32 log-weight
        # per entry and head, 32 / (2 head_dim) bits per K/V element: 1 at the tiny model's head_dim 16
        assert 0 < r["visual_kept_fraction"] <= 1 and 0 < r["bits_per_element"] <= 32 + 32 / (2 * 16) + 1e-6, r
    by = {r["recipe"]: r for r in res}
    assert by["bilevel"]["offloaded_bytes_ratio"] > 0.5 and by["bilevel"]["kv_bytes_ratio"] < 0.5
    m = "observed:0.75,share=1,probes=16,merge=mass"
    assert by[m + "+kivi:2,salient=0.05"]["kv_bytes_ratio"] < by[m]["kv_bytes_ratio"] < 0.5
    assert by["kivi:2"]["kv_bytes_ratio"] < by["kivi:2,salient=0.05"]["kv_bytes_ratio"] < 1


def test_resume_does_not_reuse_records_of_another_checkpoint(tiny_dir, tmp_path):
    """Records are reused only for the same checkpoint files read the same way: the same folder
    with a changed card (another M-RoPE layout) or retrained weights is measured again."""
    import shutil

    from mmkv.cli import main

    d = str(tmp_path / "m")
    shutil.copytree(tiny_dir["qwen2_vl"], d)
    out = tmp_path / "r.json"
    args = long_args(d, tmp_path, "none")
    records = str(out) + ".records.jsonl"
    assert main(args) == 0 and len(open(records).read().splitlines()) == 1
    assert main(args) == 0 and len(open(records).read().splitlines()) == 1      # same checkpoint: resumed
    with open(os.path.join(d, "mmkv.json"), "w") as f:
        json.dump({"train": {"rope_layout": "transformers"}}, f)
    assert main(args) == 0 and len(open(records).read().splitlines()) == 2      # read another way: again
    weights = os.path.join(d, "model.safetensors")
    os.utime(weights, (os.path.getatime(weights), os.path.getmtime(weights) + 100))
    assert main(args) == 0 and len(open(records).read().splitlines()) == 3      # retrained in place: again


def test_dtype_is_the_models_and_records_resume_per_dtype(tiny_dir, tmp_path):
    """--dtype loads the model in that dtype: the uncompressed cache is then bf16 (half the bytes of
    the float32 run's) and the ratios are against it; a float32 run's records are not reused."""
    from mmkv.cli import main

    out = tmp_path / "r.json"
    records = str(out) + ".records.jsonl"
    base = long_args(tiny_dir["qwen2_vl"], tmp_path, "none;kivi:2")
    assert main(base) == 0
    f32 = [json.loads(x) for x in open(records).read().splitlines()]
    assert main(base + ["--dtype", "bfloat16"]) == 0
    lines = [json.loads(x) for x in open(records).read().splitlines()]
    assert len(lines) == 4                                               # measured again, not resumed
    bf = [r for r in lines if r["dtype"] == "bfloat16"]
    assert [r["dtype"] for r in f32] == ["float32"] * 2 and len(bf) == 2
    q32, q16 = f32[0]["questions"][0], bf[0]["questions"][0]
    assert q16["kv_bytes_uncompressed"] * 2 == q32["kv_bytes_uncompressed"]
    res = json.load(open(out))
    assert res[1]["kv_bytes_ratio"] > 0 and res[1]["bits_per_element"] <= 16 + 1e-6


def test_a_presets_records_resume_only_while_it_means_the_same(tiny_dir, tmp_path, monkeypatch):
    """Records hold the recipe a preset resolved to and are reused by it: redefining the preset
    measures it again unless what it now names was measured; the same definition resumes."""
    from mmkv import recipe
    from mmkv.cli import main

    out = tmp_path / "r.json"
    records = str(out) + ".records.jsonl"
    args = long_args(tiny_dir["qwen2_vl"], tmp_path, "none;balanced;kivi:4")
    assert main(args) == 0
    first = [json.loads(x) for x in open(records).read().splitlines()]
    assert [r["spec"] for r in first] == ["none", recipe.Recipe.parse(recipe.PRESETS["balanced"]).spec(), "kivi:4"]
    assert main(args) == 0 and len(open(records).read().splitlines()) == 3          # unchanged: resumed
    monkeypatch.setitem(recipe.PRESETS, "balanced", "kivi:2")
    assert main(args) == 0
    lines = [json.loads(x) for x in open(records).read().splitlines()]
    assert len(lines) == 4 and lines[-1]["recipe"] == "balanced"                   # only the preset again
    assert lines[-1]["spec"] == recipe.Recipe.parse("kivi:2").spec() != first[1]["spec"]
    monkeypatch.setitem(recipe.PRESETS, "balanced", "kivi:4")                      # names a recipe measured
    assert main(args) == 0 and len(open(records).read().splitlines()) == 4          # its records serve
    res = json.load(open(out))
    assert res[1]["accuracy"] == res[2]["accuracy"] and res[1]["spec"] == res[2]["spec"] == "kivi:4"
    monkeypatch.setitem(recipe.PRESETS, "balanced", "kivi:2")
    # a record written before specs were stored: a plain recipe resumes, a preset does not
    old = [{k: v for k, v in r.items() if k != "spec"} for r in lines]
    with open(records, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in old))
    assert main(args) == 0
    again = [json.loads(x) for x in open(records).read().splitlines()]
    assert len(again) == 5 and again[-1]["recipe"] == "balanced"


def test_records_go_stale_when_a_default_changes(tiny_dir, tmp_path):
    """A record stores every parameter its recipe ran with ("params", defaults included); a record
    whose parameters are not what its recipe reads as today (a default changed since) is measured
    again instead of reused."""
    from mmkv.cli import main

    out = tmp_path / "r.json"
    records = str(out) + ".records.jsonl"
    args = long_args(tiny_dir["qwen2_vl"], tmp_path, "none;kivi:4")
    assert main(args) == 0
    first = [json.loads(x) for x in open(records).read().splitlines()]
    assert first[1]["params"].startswith("kivi:4,group=32,residual=128,")
    assert main(args) == 0 and len(open(records).read().splitlines()) == 2          # same defaults: resumed
    first[1]["params"] = first[1]["params"].replace("group=32", "group=64")        # as written under another default
    with open(records, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in first))
    assert main(args) == 0
    lines = [json.loads(x) for x in open(records).read().splitlines()]
    assert len(lines) == 3 and lines[-1]["recipe"] == "kivi:4" and "group=32" in lines[-1]["params"]
