"""`mmkv bench quality --task image`: the JSON contract on a tiny random AnyRes LLaVA-OneVision (3 x 3
crops of 84 px), equal budgets across the compared methods, and GlobalCom²'s uniform allocation."""
import json

import pytest
import torch

import mmkv
from mmkv.bench.image import RECIPES
from mmkv.synthetic.hires import make_hires_example

KEYS = {"recipe", "protocol", "task", "frames", "n", "accuracy", "delta", "ci_low", "ci_high",
        "visual_kept_fraction", "kv_bytes_ratio", "bits_per_element", "prefill_s", "decode_s", "skipped"}


@pytest.fixture(scope="module")
def hires_dir(tmp_path_factory):
    from mmkv.models.tiny import build_tiny

    return build_tiny("llava_onevision", str(tmp_path_factory.mktemp("hires") / "ov"), seed=3, image_size=84,
                      max_crops=3)


@pytest.fixture(scope="module")
def image():
    from PIL import Image

    return Image.fromarray(make_hires_example(1_000_003).image)


def patches_per_view(vt) -> list[int]:
    """Kept patch tokens: the thumbnail, then each of the 3 x 3 crops (row-major)."""
    c = vt.coords[vt.is_patch]
    out = [int((c[:, 0] == 0).sum())]
    crop = c[c[:, 0] == 1]
    cid = (crop[:, 1] // 6) * 3 + crop[:, 2] // 6
    return out + torch.bincount(cid, minlength=9).tolist()


def test_image_layout_is_thumbnail_plus_3x3_crops(hires_dir, image):
    vt = mmkv.load(hires_dir).encode(image, prefill=False).visual
    assert vt.meta["crop_grid"] == (3, 3) and vt.meta["base_grid"] == (6, 6)
    assert patches_per_view(vt) == [36] * 10 and int((~vt.is_patch).sum()) == 18 and vt.n_total == 378


def test_uniform_allocation_keeps_the_same_fraction_in_every_crop(hires_dir, image):
    base = mmkv.load(hires_dir)
    thumb = base.with_recipe("globalcom2:0.25").encode(image, prefill=False)
    uni = base.with_recipe("globalcom2:0.25,allocation=uniform").encode(image, prefill=False)
    assert uni.stats.extra["globalcom2_crop_ratios"] == [0.25] * 9
    assert patches_per_view(uni.visual) == [9] * 10
    ratios = thumb.stats.extra["globalcom2_crop_ratios"]
    assert ratios != [0.25] * 9                                          # the default allocates from the thumbnail
    kept = patches_per_view(thumb.visual)
    assert kept[0] == 9                             # each crop keeps floor(36 x its ratio); the stat is rounded to 4 digits
    assert all(int(36 * r - 1e-3) <= k <= int(36 * r + 1e-3) for k, r in zip(kept[1:], ratios)), (kept, ratios)
    is_thumb = lambda vt: vt.coords[:, 0] == 0                           # noqa: E731 same thumbnail either way
    assert torch.equal(thumb.visual.index[is_thumb(thumb.visual)], uni.visual.index[is_thumb(uni.visual)])
    with pytest.raises(mmkv.RecipeError, match="allocation"):
        mmkv.load(hires_dir, recipe="globalcom2:allocation=even")


@pytest.mark.parametrize("budget", ["0.25", "0.1112"])
def test_budgets_are_equal_across_the_compared_methods(hires_dir, image, budget):
    specs = [s for s, _ in RECIPES if budget in s or (s.startswith("pool") and ("size=3" in s) == (budget != "0.25"))]
    assert len(specs) == 4, specs
    base = mmkv.load(hires_dir)
    kept = {s: sum(patches_per_view(base.with_recipe(s).encode(image, prefill=False).visual)) for s in specs}
    want = 90 if budget == "0.25" else 40                                # 25% or 1/9 of 360 patch tokens
    exact = [s for s in specs if not (s.startswith("globalcom2") and "uniform" not in s)]
    assert all(kept[s] == want for s in exact), kept
    (g,) = set(specs) - set(exact)                                       # GlobalCom² rounds each crop down
    assert want - 9 <= kept[g] <= want


@pytest.mark.parametrize("protocol", ["encode", "multiturn"])
def test_image_bench_contract_and_resume(hires_dir, tmp_path, protocol, capsys):
    from mmkv.cli import main

    out = tmp_path / "r.json"
    args = ["bench", "quality", "--task", "image", "--model", hires_dir, "--n", "2", "--protocol", protocol,
            "--recipes", "none;globalcom2:0.25;pool:images=true;random:0.25,images=true;vidkv", "--data-dir",
            str(tmp_path / "data"), "--json", str(out), "--no-progress"]
    assert main(args) == 0
    res = json.load(open(out))
    assert [r["recipe"] for r in res] == ["none", "globalcom2:0.25", "pool:images=true", "random:0.25,images=true",
                                          "vidkv"]
    for r in res:
        assert KEYS <= set(r) and r["protocol"] == protocol and r["task"] == "image" and r["frames"] == 1
    none, gc, pool, rnd, vidkv = res
    assert none["n"] == 6 and none["images"] == 2 and none["delta"] == 0 and none["ci_low"] == none["ci_high"] == 0
    assert none["visual_kept_fraction"] == 1.0 and none["kv_bytes_ratio"] == pytest.approx(1.0)
    assert none["needle_kept"] == 1.0 and none["needle_crop_ratio"] is None
    for r in (gc, pool, rnd):
        assert r["n"] == 6 and r["visual_kept_fraction"] <= (90 + 18) / 378 and r["kv_bytes_ratio"] < 0.5
    assert pool["needle_kept"] == 0                                      # merged into its 2 x 2 block
    assert 0 < gc["needle_crop_ratio"] <= 1
    if protocol == "encode":                                             # VidKV's STP needs the question
        assert vidkv["skipped"] and vidkv["accuracy"] is None
    else:
        assert vidkv["skipped"] is None and vidkv["n"] == 6
    records = open(str(out) + ".records.jsonl").read().splitlines()
    assert len(records) == 2 * (4 if protocol == "encode" else 5)
    assert main(args) == 0                                               # resumed: nothing recomputed
    assert open(str(out) + ".records.jsonl").read().splitlines() == records
    assert json.load(open(out)) == res
    assert "| `globalcom2:0.25`" in capsys.readouterr().out


def test_image_bench_rejects_frames(hires_dir, tmp_path):
    from mmkv.cli import main

    assert main(["bench", "quality", "--task", "image", "--model", hires_dir, "--frames", "16", "--n", "1",
                 "--data-dir", str(tmp_path)]) == 2


def test_image_records_resume_by_resolved_recipe_and_parameters(hires_dir, tmp_path):
    """As the long task: records are reused by the recipe a name resolves to (a second spelling of
    a measured recipe reuses its records), and a record whose parameters, defaults included, are
    not what its recipe reads as today is measured again."""
    from mmkv.cli import main

    out = tmp_path / "r.json"
    records = str(out) + ".records.jsonl"

    def args(recipes):
        return ["bench", "quality", "--task", "image", "--model", hires_dir, "--n", "1", "--protocol", "encode",
                "--recipes", recipes, "--data-dir", str(tmp_path / "data"), "--json", str(out), "--no-progress"]

    assert main(args("none;kivi:4")) == 0
    first = [json.loads(x) for x in open(records).read().splitlines()]
    assert [r["spec"] for r in first] == ["none", "kivi:4"] and first[1]["params"].startswith("kivi:4,group=32,")
    assert main(args("none;kivi:bits=4,group=32")) == 0                       # the same recipe, spelled out
    assert len(open(records).read().splitlines()) == 2
    res = json.load(open(out))
    assert res[1]["recipe"] == "kivi:bits=4,group=32" and res[1]["spec"] == "kivi:4" and res[1]["n"] == 3
    first[1]["params"] = first[1]["params"].replace("group=32", "group=64")    # as if another default then
    with open(records, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in first))
    assert main(args("none;kivi:4")) == 0
    lines = [json.loads(x) for x in open(records).read().splitlines()]
    assert len(lines) == 3 and lines[-1]["spec"] == "kivi:4" and "group=32" in lines[-1]["params"]
