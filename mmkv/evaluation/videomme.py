"""Video-MME (Fu et al., CVPR 2025, arXiv 2405.21075) as lmms-eval's `videomme` and
`videomme_w_subtitle` tasks define it.

Layouts read (a folder, a row file, or an HF dataset id):
- rows with videoID, question_id, duration, domain, sub_category, task_type, question,
  options (["A. ...", ...]) and answer ("A".."D"), in JSON / JSONL / CSV / Parquet: the HF repo
  (`lmms-eval/Video-MME`, formerly `lmms-lab/Video-MME`) stores `videomme/test-*.parquet`;
  `mmkv.synthetic.write_dataset` writes `videomme.json`;
- videos `<videoID>.mp4` (or .MP4 / .mkv, lmms-eval's fallbacks) in the folder, `data/` (the HF
  zips' layout), `videos/`, or `--video-dir`;
- subtitles `<videoID>.srt` in `subtitle/` (the HF layout), `subtitles/`, or beside the videos.

Scoring per sample: the extracted letter (see answers.py, convention "0.7.2" or "legacy") equals
the answer, case-insensitively. Summary: accuracy overall and per duration, domain, sub-category
and task type (lmms-eval computes those only in its logs), with a standard error clustered by
video (the 3 questions of a video are correlated; lmms-eval's `cluster_key: videoID`).
"""
from __future__ import annotations

import os
import string

from ..errors import InputError
from .answers import CONVENTION_NOTES, CONVENTIONS, DEFAULT_CONVENTION, extract
from .data import as_list, fetch_hub_dataset, find_row_files, is_hub_id, read_rows
from .prompts import VIDEOMME_POST_PROMPT, videomme_prompt, videomme_subtitle_prompt
from .runner import Sample, Task
from .subtitles import subtitles_for

HUB_IDS = ("lmms-eval/Video-MME", "lmms-lab/Video-MME")
ROW_PATTERNS = ["videomme.json", "videomme.jsonl", "test.json", "test.jsonl", "*.jsonl", "*.csv",
                "videomme/test-*.parquet", "*.parquet", "**/*.parquet"]
VIDEO_EXTS = (".mp4", ".MP4", ".mkv")
REQUIRED = ("videoID", "question", "options", "answer")
GROUPS = ("duration", "domain", "sub_category", "task_type")


class VideoMME(Task):
    name = "videomme"
    group_keys = GROUPS

    def __init__(self, data: str, *, video_dir: str | None = None, subtitles: bool = False,
                 subtitle_dir: str | None = None, subtitle_frames: int | None = None,
                 convention: str = DEFAULT_CONVENTION, post_prompt: str = VIDEOMME_POST_PROMPT,
                 durations: list[str] | None = None):
        if convention not in CONVENTIONS:
            raise InputError(f"unknown lmms-eval convention {convention!r}; choose one of {CONVENTIONS}")
        if subtitle_frames is not None and subtitle_frames <= 0 and subtitle_frames != -1:
            raise InputError(f"subtitle_frames must be positive (or -1 for every frame), got {subtitle_frames}")
        self.data = data
        if is_hub_id(data):
            root = fetch_hub_dataset(data)
            row_files = find_row_files(root, ROW_PATTERNS)
        elif os.path.isfile(data):
            root, row_files = os.path.dirname(os.path.abspath(data)), [data]
        elif os.path.isdir(data):
            root, row_files = data, find_row_files(data, ROW_PATTERNS)
        else:
            raise InputError(f"no such dataset file or folder: {data!r} (or give an HF id: {', '.join(HUB_IDS)})")
        self.root, self.row_files = root, row_files
        self.video_dirs = [video_dir] if video_dir else [root, os.path.join(root, "data"),
                                                        os.path.join(root, "videos")]
        self.subtitle_dirs = ([subtitle_dir] if subtitle_dir else
                              [os.path.join(root, "subtitle"), os.path.join(root, "subtitles")] + self.video_dirs)
        self.subtitles = subtitles
        self.subtitle_frames = subtitle_frames
        self.convention = convention
        self.post_prompt = post_prompt
        self.durations = durations

    def config(self) -> dict:
        return {"task": "videomme_w_subtitle" if self.subtitles else "videomme", "convention": self.convention,
                "convention_note": CONVENTION_NOTES[self.convention], "subtitles": self.subtitles,
                "subtitle_frames": self.subtitle_frames, "post_prompt": None if self.subtitles else self.post_prompt,
                "durations": self.durations, "data": os.path.abspath(self.root) if os.path.exists(self.root) else self.data}

    # ------------------------------------------------------------------ rows -> samples
    def _find(self, dirs, stem, exts):
        for d in dirs:
            for ext in exts:
                p = os.path.join(d, stem + ext)
                if os.path.isfile(p):
                    return p
        return None

    def samples(self) -> list[Sample]:
        rows = []
        for f in self.row_files:
            rows.extend(read_rows(f))
        out, seen = [], set()
        for i, row in enumerate(rows):
            s = self._sample(i, row)
            if s.key in seen:
                s.key, s.error, s.reason = f"{s.key}#row{i}", f"duplicate question_id {s.key!r}", "malformed row"
            seen.add(s.key)
            if self.durations and s.group.get("duration") not in self.durations:
                continue
            out.append(s)
        return out

    def _sample(self, i: int, row) -> Sample:
        if not isinstance(row, dict):
            return Sample(key=f"row{i}", index=i, cluster=f"row{i}", error=f"row {i} is a {type(row).__name__}, "
                          "not an object", reason="malformed row")
        qid = str(row.get("question_id") or f"row{i}")
        vid = str(row.get("videoID") or "")
        group = {k: str(row.get(k, "")) for k in GROUPS}
        s = Sample(key=qid, index=i, cluster=vid or qid, group=group, video_id=vid)
        if "__malformed__" in row:
            s.error, s.reason = row["__malformed__"], "malformed row"
            return s
        missing = [k for k in REQUIRED if row.get(k) in (None, "")]
        options = as_list(row.get("options"))
        if missing:
            s.error, s.reason = f"missing field(s) {', '.join(missing)}", "malformed row"
            return s
        if not options or not all(isinstance(o, str) for o in options):
            s.error, s.reason = f"options must be a list of strings, got {row.get('options')!r:.80}", "malformed row"
            return s
        letters = tuple(string.ascii_uppercase[:max(4, len(options))])
        answer = str(row["answer"]).strip()
        s.answer, s.question, s.options = answer, str(row["question"]), options
        if answer.upper() not in letters[:len(options)]:
            s.error = f"answer {answer!r} is not one of the options {letters[0]}-{letters[len(options) - 1]}"
            s.reason = "answer outside the options"
            return s
        s.video = self._find(self.video_dirs, vid, VIDEO_EXTS)
        if s.video is None:
            s.error, s.reason = f"missing video {vid}.mp4 (looked in {', '.join(self.video_dirs)})", "missing video"
            return s
        if self.subtitles:
            s.extra["subtitle_path"] = self._find(self.subtitle_dirs, vid, (".srt",))
        return s

    # ------------------------------------------------------------------ prompt and score
    def prompt(self, sample: Sample, media=None, frames: int | None = None) -> str:
        if not self.subtitles:
            return videomme_prompt(sample.question, sample.options, self.post_prompt)
        srt = sample.extra.get("subtitle_path")
        n = self.subtitle_frames or frames or 32
        fallback = (media.total_frames, media.source_fps) if media is not None and media.source_fps else None
        text = subtitles_for(srt, sample.video, n, fallback)
        return videomme_subtitle_prompt(sample.question, sample.options, text)

    def score(self, sample: Sample, response: str) -> dict:
        pred = extract(response, self.convention)
        return {"pred": pred, "correct": int(pred.lower() == sample.answer.lower())}
