"""MVBench (Li et al., CVPR 2024, arXiv 2311.17005) as lmms-eval's 20 `mvbench_<task>` tasks
define it.

Layout read (a local folder, or the HF id `OpenGVLab/MVBench`, branch `video`):
- 20 task files `json/<task>.json` (the HF layout) or `<task>.json`, each a list of
  {"video", "question", "candidates", "answer"} (the answer is the text of one candidate;
  some tasks also carry start/end, which lmms-eval ignores (its videos are the segments), and
  so do we, except for videos found in the main-branch layout, below);
- videos under `<folder>/<video>`, where `<folder>` is lmms-eval's per-task folder (DATA_LIST,
  e.g. action_sequence -> star/Charades_segment), also looked for under `video/` and, as
  lmms-eval does for clevrer and star, `data0613/`; then MVBench's own `main`-branch folder
  (MAIN_LIST: star/Charades_v1_480, ssv2_video, nturgbd, tvqa/frames_fps3_hq, ...) under the
  root or `video/`, whose start/end tasks hold whole videos: there only the [start, end] seconds
  are sampled (the segment lmms-eval's `video` branch has cut), episodic_reasoning's frames at
  3 fps. A name is also found with another video extension (ssv2's .webm). `--video-dir`
  overrides the folder. A video that is a folder of frames (.jpg/.png) is read frame by frame
  (sorted by name; only the sampled frames are decoded).

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
# task -> (folder, has a segment) in MVBench's own `main` branch (its video/*.zip archives, the
# official evaluation's data_list): there the start/end tasks hold the whole source videos and ask
# about [start, end] seconds of them (lmms-eval's `video` branch has those segments cut), and
# episodic_reasoning is a folder of frames extracted at 3 fps
MAIN_LIST = {
    "action_sequence": ("star/Charades_v1_480", True),
    "moving_count": ("clevrer/video_validation", False),
    "action_prediction": ("star/Charades_v1_480", True),
    "episodic_reasoning": ("tvqa/frames_fps3_hq", True),
    "action_antonym": ("ssv2_video", False),
    "action_count": ("perception/videos", False),
    "scene_transition": ("scene_qa/video", False),
    "object_shuffle": ("perception/videos", False),
    "object_existence": ("clevrer/video_validation", False),
    "fine_grained_pose": ("nturgbd", False),
    "unexpected_action": ("FunQA_test/test", False),
    "moving_direction": ("clevrer/video_validation", False),
    "state_change": ("perception/videos", False),
    "object_interaction": ("star/Charades_v1_480", True),
    "character_order": ("perception/videos", False),
    "action_localization": ("sta/sta_video", True),
    "counterfactual_inference": ("clevrer/video_validation", False),
    "fine_grained_action": ("Moments_in_Time_Raw/videos", False),
    "moving_attribute": ("clevrer/video_validation", False),
    "egocentric_navigation": ("vlnqa", False),
}
FRAME_FPS = {"episodic_reasoning": 3.0}
# a row's file name may carry another container than the file (ssv2: .webm files; NTU: .avi)
VIDEO_EXTS = (".mp4", ".webm", ".avi", ".mkv", ".MP4")
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

    def _video(self, task: str, name: str) -> tuple[str | None, bool]:
        """(path, found in the main-branch layout) of a row's video: lmms-eval's folder (under the
        root, video/ or data0613/) first, then MVBench's own (main-branch) folder; a name whose
        file has another video extension is found too."""
        if self.video_dir:
            places = [(self.video_dir, False)]
        else:
            places = [(os.path.join(self.root, sub, DATA_LIST[task]), False) for sub in ("", "video", "data0613")]
            places += [(os.path.join(self.root, sub, MAIN_LIST[task][0]), True) for sub in ("", "video")]
        stem, ext = os.path.splitext(name)
        names = [name] + ([stem + e for e in VIDEO_EXTS if e != ext] if ext.lower() in VIDEO_EXTS else [])
        for folder, main in places:
            for n in names:
                p = os.path.join(folder, n)
                if os.path.exists(p):
                    return p, main
        return None, False

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
        s.video, main = self._video(task, str(row["video"]))
        if s.video is None:
            s.error = (f"missing video {row['video']} (looked in {DATA_LIST[task]} and {MAIN_LIST[task][0]} "
                       f"under {self.video_dir or self.root})")
            s.reason = "missing video"
        elif main and MAIN_LIST[task][1] and row.get("start") not in (None, "") and row.get("end") not in (None, ""):
            try:
                s.extra["segment"] = [float(row["start"]), float(row["end"])]
            except (TypeError, ValueError):
                s.error, s.reason = f"start/end must be seconds, got {row['start']!r}, {row['end']!r}", "malformed row"
                return s
            if task in FRAME_FPS:
                s.extra["frame_fps"] = FRAME_FPS[task]
        return s

    def prompt(self, sample: Sample, media=None, frames: int | None = None) -> str:
        return mvbench_prompt(sample.question, sample.options, self.post_prompt)

    def score(self, sample: Sample, response: str) -> dict:
        return {"pred": mvbench_normalize(response), "correct": mvbench_score(sample.answer, response)}
