"""MVBench (Li et al., CVPR 2024, arXiv 2311.17005) as lmms-eval's 20 `mvbench_<task>` tasks
define it.

Layout read (a local folder, or the HF id `OpenGVLab/MVBench`, branch `video`):
- 20 task files `json/<task>.json` (the HF layout) or `<task>.json`, each a list of
  {"video", "question", "candidates", "answer"} (the answer is the text of one candidate;
  some tasks also carry start/end, which lmms-eval ignores, and so do we);
- videos under `<folder>/<video>`, where `<folder>` is lmms-eval's per-task folder (DATA_LIST,
  e.g. action_sequence -> star/Charades_segment), also looked for under `video/` and, as
  lmms-eval does for clevrer and star, `data0613/`; `--video-dir` overrides the folder.
  A video that is a folder of frames (.jpg/.png) is read frame by frame (sorted by name).

Scoring: lmms-eval's `mcq_acc` (answers.py). Aggregation as lmms-eval: a task's accuracy counts
only samples whose response is not empty (its denominator quirk; `accuracy_all` counts them as
wrong), and the MVBench score is the mean of the per-task accuracies (lmms-eval's group has no
aggregate; MVBench has 200 questions per task, so the mean over tasks equals the mean over
questions on the full set).
"""
from __future__ import annotations

import os
import string

from ..errors import InputError
from .answers import MVBENCH_NOTE, mvbench_normalize, mvbench_score
from .data import fetch_hub_dataset, is_hub_id, read_rows
from .prompts import MVBENCH_POST_PROMPT, mvbench_prompt
from .runner import Sample, Task

HUB_ID = "OpenGVLab/MVBench"
# task -> video folder (lmms-eval's DATA_LIST), in the order of lmms-eval's `mvbench` group
DATA_LIST = {
    "action_sequence": "star/Charades_segment",
    "moving_count": "clevrer/video_validation",
    "action_prediction": "star/Charades_segment",
    "episodic_reasoning": "tvqa/video_fps3_hq_segment",
    "action_antonym": "ssv2_video_mp4",
    "action_count": "perception/videos",
    "scene_transition": "scene_qa/video",
    "object_shuffle": "perception/videos",
    "object_existence": "clevrer/video_validation",
    "fine_grained_pose": "nturgbd_convert",
    "unexpected_action": "FunQA_test/test",
    "moving_direction": "clevrer/video_validation",
    "state_change": "perception/videos",
    "object_interaction": "star/Charades_segment",
    "character_order": "perception/videos",
    "action_localization": "sta/sta_video_segment",
    "counterfactual_inference": "clevrer/video_validation",
    "fine_grained_action": "Moments_in_Time_Raw/videos",
    "moving_attribute": "clevrer/video_validation",
    "egocentric_navigation": "vlnqa",
}
TASKS = tuple(DATA_LIST)
REQUIRED = ("video", "question", "candidates", "answer")


class MVBench(Task):
    name = "mvbench"
    group_keys = ("task",)

    def __init__(self, data: str, *, tasks: list[str] | None = None, video_dir: str | None = None,
                 post_prompt: str = MVBENCH_POST_PROMPT):
        unknown = [t for t in (tasks or []) if t not in DATA_LIST]
        if unknown:
            raise InputError(f"unknown MVBench task(s) {unknown}; choose from {', '.join(TASKS)}")
        self.data = data
        if is_hub_id(data):
            root = fetch_hub_dataset(data, revision="video")
        elif os.path.isdir(data):
            root = data
        else:
            raise InputError(f"no such MVBench folder: {data!r} (or give the HF id {HUB_ID})")
        self.root = root
        self.video_dir = video_dir
        self.post_prompt = post_prompt
        self.task_files: dict[str, str] = {}
        for t in tasks or TASKS:
            for p in (os.path.join(root, "json", f"{t}.json"), os.path.join(root, f"{t}.json")):
                if os.path.isfile(p):
                    self.task_files[t] = p
                    break
        if tasks:
            missing = [t for t in tasks if t not in self.task_files]
            if missing:
                raise InputError(f"no task file for {missing} in {root!r} (looked for json/<task>.json and <task>.json)")
        if not self.task_files:
            raise InputError(f"no MVBench task file in {root!r} (looked for json/<task>.json and <task>.json "
                             f"for the 20 tasks: {', '.join(TASKS)})")
        self.tasks = [t for t in TASKS if t in self.task_files]

    def config(self) -> dict:
        return {"task": "mvbench", "tasks": self.tasks, "convention": "mvbench", "convention_note": MVBENCH_NOTE,
                "post_prompt": self.post_prompt, "data": os.path.abspath(self.root)}

    def _video(self, task: str, name: str) -> str | None:
        folder = DATA_LIST[task]
        roots = ([self.video_dir] if self.video_dir else
                 [os.path.join(self.root, folder), os.path.join(self.root, "video", folder),
                  os.path.join(self.root, "data0613", folder)])
        for r in roots:
            p = os.path.join(r, name)
            if os.path.exists(p):
                return p
        return None

    def samples(self) -> list[Sample]:
        out, index = [], 0
        for task in self.tasks:
            for j, row in enumerate(read_rows(self.task_files[task])):
                out.append(self._sample(task, j, index, row))
                index += 1
        return out

    def _sample(self, task: str, j: int, index: int, row) -> Sample:
        key = f"{task}/{j}"
        s = Sample(key=key, index=index, cluster=key, group={"task": task})
        if not isinstance(row, dict) or "__malformed__" in row:
            why = row["__malformed__"] if isinstance(row, dict) else f"row is a {type(row).__name__}, not an object"
            s.error, s.reason = why, "malformed row"
            return s
        missing = [k for k in REQUIRED if row.get(k) in (None, "")]
        if missing:
            s.error, s.reason = f"missing field(s) {', '.join(missing)}", "malformed row"
            return s
        cands = row["candidates"]
        if not isinstance(cands, list) or not cands or len(cands) > 26:
            s.error, s.reason = f"candidates must be a non-empty list, got {cands!r:.80}", "malformed row"
            return s
        s.video_id = f"{task}/{row['video']}"
        s.cluster = s.video_id  # questions about one video share its encoding
        s.question, s.options = str(row["question"]), [str(c) for c in cands]
        if row["answer"] not in cands:  # lmms-eval would crash on this row (gold letter None)
            s.error, s.reason = f"answer {row['answer']!r:.60} is not one of the candidates", "answer outside the options"
            return s
        s.answer = string.ascii_uppercase[cands.index(row["answer"])]
        s.video = self._video(task, str(row["video"]))
        if s.video is None:
            s.error = f"missing video {row['video']} (looked in {DATA_LIST[task]} under {self.video_dir or self.root})"
            s.reason = "missing video"
        return s

    def prompt(self, sample: Sample, media=None, frames: int | None = None) -> str:
        return mvbench_prompt(sample.question, sample.options, self.post_prompt)

    def score(self, sample: Sample, response: str) -> dict:
        return {"pred": mvbench_normalize(response), "correct": mvbench_score(sample.answer, response)}
