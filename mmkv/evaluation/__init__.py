"""Batch evaluation: prompts and answer extraction as lmms-eval does them, runners, scoring.

    from mmkv.evaluation.videomme import VideoMME
    from mmkv.evaluation.runner import run
    summary = run(VideoMME("/data/videomme"), "runs/base", model="Qwen/Qwen2.5-VL-7B-Instruct")

Modules: prompts (benchmark prompts), answers (answer extraction / scoring conventions),
subtitles (Video-MME .srt handling), data (row files, HF downloads), videomme, mvbench (tasks),
runner (resume, sharding, merge), metrics (summary), compare (two runs side by side),
lmms_plugin (the lmms-eval model plugin), lmms_task (an offline lmms-eval task on synthetic videos).
See docs/eval.md.
"""
from .answers import extract, extract_legacy, extract_mcq_answer, mvbench_normalize, mvbench_score
from .prompts import mvbench_prompt, videomme_prompt, videomme_subtitle_prompt

__all__ = ["videomme_prompt", "videomme_subtitle_prompt", "mvbench_prompt", "extract", "extract_mcq_answer",
           "extract_legacy", "mvbench_normalize", "mvbench_score"]
