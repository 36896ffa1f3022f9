"""Answer extraction and scoring, as lmms-eval does them (re-implemented, not copied).

Two lmms-eval conventions exist for Video-MME, and scores move between them:

- ``"0.7.2"`` (default): `lmms_eval/tasks/_task_utils/mcq_extract.py::extract_mcq_answer`, used by
  Video-MME since commit 9ca4445d (2026-04-11, first released in lmms-eval v0.7.2, 2026-06-24;
  unchanged through 75571cfe, 2026-08-06). Every letter A-D is looked for in several formats,
  each with a priority; the highest-priority format wins, the later position breaks ties.
- ``"legacy"``: the `extract_characters_regex` of lmms-eval v0.7.1 and earlier: remove a few
  answer prefixes, then take the FIRST capital A-D anywhere in the text.

MVBench's `mcq_acc` (unchanged since 2024-10) normalizes both the prediction and the gold letter
(punctuation stripped, lowercased, first standalone a-e) and compares them.

Quirks reproduced on purpose (they change scores; see docs/eval.md):
- Both Video-MME conventions only see CAPITAL letters: "b) because..." extracts nothing there
  (scored wrong), while MVBench's normalizer accepts it as B.
- 0.7.2's last-resort fallback takes any capital A-D, even inside a word: "Cannot tell" -> "C".
- MVBench takes the first standalone letter a-e after lowercasing: "it is a cat (B)" -> "A".
- MVBench's period stripping removes at most 32 periods (lmms-eval passes `re.UNICODE`, 32, as
  the `count` argument of `re.sub`).
"""
from __future__ import annotations

import re

CONVENTIONS = ("0.7.2", "legacy")
DEFAULT_CONVENTION = "0.7.2"
CONVENTION_NOTES = {
    "0.7.2": "lmms-eval v0.7.2 (2026-06-24; answer extraction of commit 9ca4445d, 2026-04-11; task logic unchanged "
             "through 75571cfe, 2026-08-06): mcq_extract.extract_mcq_answer with choices A-D",
    "legacy": "lmms-eval v0.7.1 and earlier (before 2026-04-11): videomme extract_characters_regex "
              "(first capital A-D after removing answer prefixes)",
}
MVBENCH_NOTE = "lmms-eval mvbench mcq_acc (unchanged from 2024-10 through v0.7.2 / 75571cfe, 2026-08-06)"

# ---------------------------------------------------------------------------------------- 0.7.2
# Phrases after which the first choice letter counts as the answer (the list lmms-eval uses).
ANSWER_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select", "i pick",
    "my answer is", "my choice is",
    "옵션", "정답은", "답은", "답:",      # Korean
    "答案是", "答案为", "选",            # Chinese
    "答えは",                           # Japanese
)
# format -> priority (higher wins); the later position breaks ties within the winning format
PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4, "right_paren": 3,
            "space": 2, "fallback": 0}
_MARKED = (("parentheses", "({})"), ("period", "{}."), ("colon", "{}:"), ("right_paren", "{})"), ("space", "{} "))


def extract_mcq_answer(response: str, choices=("A", "B", "C", "D")) -> str:
    """The chosen letter in `response` (lmms-eval >= v0.7.2 semantics), or "" if none.

    >>> extract_mcq_answer("The answer is (B).")
    'B'
    """
    if not response or not response.strip():
        return ""
    text = response.strip()
    for ch in ",.!?;:'\"":  # one character class at a time, in this order (as lmms-eval)
        text = text.strip(ch)
    text = f" {text} "
    found: list[tuple[int, int, str]] = []  # (priority, position, letter)
    for fmt, pattern in _MARKED:
        for c in choices:
            pos = text.rfind(pattern.format(c))
            if pos >= 0:
                found.append((PRIORITY[fmt], pos, c))
    lower = text.lower()
    for phrase in ANSWER_PHRASES:
        at = lower.find(phrase)
        if at < 0:
            continue
        for c in choices:
            pos = text.find(c, at + len(phrase))
            if pos >= 0:
                found.append((PRIORITY["phrase"], pos, c))
    core = text.strip()
    for c in choices:
        if core.startswith(c) and (len(core) == 1 or not core[1].isalpha()):
            found.append((PRIORITY["start"], 0, c))
        if core.endswith(c) and (len(core) == 1 or not core[-2].isalpha()):
            found.append((PRIORITY["end"], len(text) - 1, c))
    if not found:
        for c in choices:
            pos = text.rfind(c)
            if pos >= 0:
                found.append((PRIORITY["fallback"], pos, c))
    if not found:
        return ""
    return max(found, key=lambda f: (f[0], f[1]))[2]


# --------------------------------------------------------------------------------------- legacy
# lmms-eval's list had two missing commas, so two entries are concatenations; kept as they were.
LEGACY_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                   "The best option isThe correct option is", "Best answer:Best option:")


def extract_legacy(response: str) -> str:
    """lmms-eval <= v0.7.1 Video-MME extraction: the first capital A-D after removing prefixes."""
    s = (response or "").strip()
    for p in LEGACY_PREFIXES:
        s = s.replace(p, "")
    m = re.search(r"[ABCD]", s)  # (the ">10 words and no letter" rule gives "" too)
    return m.group(0) if m else ""


def extract(response: str, convention: str = DEFAULT_CONVENTION) -> str:
    """Video-MME answer letter under `convention` ("0.7.2" or "legacy")."""
    if convention == "0.7.2":
        return extract_mcq_answer(response, ("A", "B", "C", "D"))
    if convention == "legacy":
        return extract_legacy(response)
    raise ValueError(f"unknown lmms-eval convention {convention!r}; choose one of {CONVENTIONS}")


# -------------------------------------------------------------------------------------- MVBench
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # lmms-eval's pattern, typo included: "." not followed by a digit
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_LETTER_DOT = re.compile(r"^([A-E])\.\s*(.+)$", re.IGNORECASE)
_LETTER = re.compile(r"\b([A-E])\b", re.IGNORECASE)


def _strip_punctuation(text: str) -> str:
    out = text
    digit_comma = _DIGIT_COMMA.search(text) is not None
    for p in _PUNCT:  # decided on the ORIGINAL text, applied cumulatively
        out = out.replace(p, "" if (p + " " in text or " " + p in text or digit_comma) else " ")
    return _PERIOD.sub("", out, 32)  # count=32: what lmms-eval's re.UNICODE argument means there


def mvbench_normalize(answer: str) -> str:
    """MVBench's normalization of a prediction or gold letter: "B. text" -> "B"; otherwise
    strip punctuation, lowercase, and take the first standalone a-e (upper-cased), else the text."""
    m = _LETTER_DOT.match(answer.strip())
    if m:
        return m.group(1).upper()
    s = answer.replace("\n", " ").replace("\t", " ").strip()
    s = _strip_punctuation(s)
    s = s.strip("'").strip('"').strip(")").strip("(").strip().lower()
    m = _LETTER.search(s)
    return m.group(1).upper() if m else s


def mvbench_score(gold_letter: str, response: str) -> int:
    """1 if the normalized response equals the normalized gold letter (lmms-eval `mcq_acc`)."""
    return int(mvbench_normalize(response) == mvbench_normalize(gold_letter))
