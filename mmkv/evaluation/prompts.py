"""Prompts of the benchmarks, as lmms-eval builds them (checked against lmms-eval v0.7.2 and HEAD
75571cfe, 2026-08-06: `lmms_eval/tasks/videomme/utils.py`, `videomme*.yaml`,
`lmms_eval/tasks/mvbench/utils.py`, `mvbench_*.yaml`; the prompt text has not changed since 2025).

Video-MME, without subtitles (task `videomme`, the "default" model kwargs):
    INSTRUCTION \\n question \\n "A. ..." \\n "B. ..." ... \\n post_prompt
with post_prompt "\\nAnswer with the option's letter from the given choices directly." (so a blank
line precedes it). The instruction mentions subtitles even when there are none (lmms-eval's text).

Video-MME with subtitles (task `videomme_w_subtitle`):
    "This video's subtitles are listed below: \\n" subtitles \\n INSTRUCTION \\n question \\n options
    \\n "The best answer is:"
The yaml's post_prompt is ignored there (hard-coded "The best answer is:"), as in lmms-eval.
`subtitles=None` (no .srt file) gives "No subtitles available"; an .srt with no line at the
sampled frames gives an empty string, as in lmms-eval.

MVBench (every subtask): "Question:" question "\\nOption:\\n" "(A) c0\\n(B) c1\\n..." post_prompt,
with post_prompt "Only give the best option.\\n".
"""
from __future__ import annotations

import string

VIDEOMME_INSTRUCTION = ("Select the best answer to the following multiple-choice question based on the video and "
                        "the subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")
VIDEOMME_POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
VIDEOMME_SUBTITLE_HEADER = "This video's subtitles are listed below: \n"
VIDEOMME_NO_SUBTITLES = "No subtitles available"
VIDEOMME_SUBTITLE_POST_PROMPT = "The best answer is:"
MVBENCH_POST_PROMPT = "Only give the best option.\n"


def videomme_prompt(question: str, options: list[str], post_prompt: str = VIDEOMME_POST_PROMPT) -> str:
    """Video-MME without subtitles: instruction, question, the options ("A. ...") one per line,
    then the post prompt. `options` already carry their letters (as in the dataset)."""
    return VIDEOMME_INSTRUCTION + "\n" + question + "\n" + "\n".join(options) + "\n" + post_prompt


def videomme_subtitle_prompt(question: str, options: list[str], subtitles: str | None) -> str:
    """Video-MME with subtitles: the subtitle block, then the instruction, question and options,
    then "The best answer is:". `subtitles` is the selected subtitle text (lines joined by
    newlines), "" when the .srt has no line at the sampled frames, None when there is no .srt."""
    sub = VIDEOMME_NO_SUBTITLES if subtitles is None else subtitles
    return (VIDEOMME_SUBTITLE_HEADER + sub + "\n" + VIDEOMME_INSTRUCTION + "\n" + question + "\n"
            + "\n".join(options) + "\n" + VIDEOMME_SUBTITLE_POST_PROMPT)


def mvbench_prompt(question: str, candidates: list[str], post_prompt: str = MVBENCH_POST_PROMPT) -> str:
    """MVBench: "Question:" + question, then "Option:" and the candidates as "(A) text" lines."""
    letters = string.ascii_uppercase
    options = "".join(f"({letters[i]}) {c}\n" for i, c in enumerate(candidates))
    return "Question:" + question + "\nOption:\n" + options + post_prompt
