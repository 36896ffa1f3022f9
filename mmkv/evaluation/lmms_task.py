"""A small offline lmms-eval task on the synthetic needle videos (mmkv.synthetic), to check the
lmms-eval plugin, and `accelerate launch` data parallelism, without downloading a benchmark:

    python -m mmkv.evaluation.lmms_task /tmp/needle_task --n 8
    accelerate launch --num_processes 2 -m lmms_eval --model mmkv --model_args max_num_frames=8 \\
        --include_path /tmp/needle_task --tasks mmkv_needle --batch_size 1 --log_samples --output_path logs/

`write_task(folder, n)` writes n needle videos, `rows.jsonl` (Video-MME's fields plus the video's
absolute path; the first video also gets a "shape" question, so two requests share a video),
`mmkv_needle.yaml` (lmms-eval's task config: the JSON rows through HF `datasets`, Video-MME's
prompt, 4 new tokens, greedy) and `utils.py` (the functions below). The task's metric `acc` is
the fraction of extracted letters (lmms-eval 0.7.2's rule) equal to the answer.
"""
from __future__ import annotations

import json
import os

from .answers import extract
from .prompts import videomme_prompt

TASK = "mmkv_needle"
YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {rows}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""
UTILS = "from mmkv.evaluation.lmms_task import doc_to_text, doc_to_visual, process_results  # noqa: F401\n"


def doc_to_visual(doc):
    return [doc["video"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return videomme_prompt(doc["question"], doc["options"])


def process_results(doc, results):
    return {"acc": float(extract(results[0]) == doc["answer"])}


def write_task(folder: str, n: int = 4, num_frames: int = 32, seed: int = 1_000_000) -> list[dict]:
    """Write the task into `folder` (see the module docstring); returns its rows."""
    from ..synthetic import make_example, write_dataset

    folder = os.path.abspath(folder)
    with open(write_dataset(folder, n, num_frames, seed), encoding="utf-8") as f:
        rows = json.load(f)
    extra = make_example(seed, num_frames, task="shape", render_frames=False)  # same video as rows[0]
    rows.append({**rows[0], **extra.row(rows[0]["videoID"]), "question_id": rows[0]["videoID"] + "-2"})
    for r in rows:
        r.pop("needles", None)
        r["video"] = os.path.join(folder, r["videoID"] + ".mp4")
    rows_path = os.path.join(folder, "rows.jsonl")
    with open(rows_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(folder, f"{TASK}.yaml"), "w", encoding="utf-8") as f:
        f.write(YAML.format(task=TASK, rows=json.dumps(rows_path)))
    with open(os.path.join(folder, "utils.py"), "w", encoding="utf-8") as f:
        f.write(UTILS)
    return rows


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m mmkv.evaluation.lmms_task", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--n", type=int, default=4, help="needle videos (one question each, two for the first)")
    p.add_argument("--num-frames", type=int, default=32)
    p.add_argument("--seed", type=int, default=1_000_000, help="first seed (held out from the bundled model's training)")
    a = p.parse_args(argv)
    rows = write_task(a.folder, a.n, a.num_frames, a.seed)
    print(f"wrote {len(rows)} questions on {a.n} videos; run lmms-eval with --include_path {a.folder} --tasks {TASK}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
