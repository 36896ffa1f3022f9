"""Prompts of the benchmarks, as lmms-eval builds them (lmms_eval/tasks/videomme/utils.py)."""
from __future__ import annotations

VIDEOMME_INSTRUCTION = ("Select the best answer to the following multiple-choice question based on the video and "
                        "the subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")
VIDEOMME_POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."


def videomme_prompt(question: str, options: list[str], post_prompt: str = VIDEOMME_POST_PROMPT) -> str:
    """Video-MME without subtitles: instruction, question, the options ("A. ...") one per line,
    then the post prompt. `options` already carry their letters."""
    return VIDEOMME_INSTRUCTION + "\n" + question + "\n" + "\n".join(options) + "\n" + post_prompt
