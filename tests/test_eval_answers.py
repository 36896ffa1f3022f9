"""Answer extraction, scoring, prompts and subtitles as lmms-eval does them (no model needed).

Expected values are worked out by hand from lmms-eval's rules (v0.7.2 and the legacy <= v0.7.1
Video-MME extraction; MVBench mcq_acc), not by running the code under test."""
from __future__ import annotations

import json
import math

import pytest

from mmkv.evaluation.answers import extract, extract_mcq_answer, mvbench_normalize, mvbench_score
from mmkv.evaluation.metrics import clustered_stderr
from mmkv.evaluation.prompts import mvbench_prompt, videomme_prompt, videomme_subtitle_prompt
from mmkv.evaluation.subtitles import parse_srt, select_subtitles


# ----------------------------------------------------------------------------- extraction
@pytest.mark.parametrize("response,new,legacy,mvb_gold_b", [
    ("The answer is (B).", "B", "B", 1),
    ("B", "B", "B", 1),
    ("(B) the man", "B", "B", 1),
    ("B. He opens the door.", "B", "B", 1),
    # lower-case letters: Video-MME's extractors only look for capitals (scored wrong there);
    # MVBench lower-cases and finds the standalone "b"
    ("b) because the man turns left", "", "", 1),
    # no letter at all
    ("the video shows nothing", "", "", 0),
    ("", "", "", 0),
    # 0.7.2's last resort takes any capital, even inside a word (a quirk kept on purpose)
    ("Cannot tell", "C", "C", 0),
    # the conventions disagree: legacy takes the first capital, 0.7.2 the answer at the end;
    # MVBench takes the first standalone letter (b)
    ("I think B, no, the answer is C", "C", "B", 1),
    # 0.7.2: a standalone letter at the start beats an explanation mentioning another option
    ("D, because option (A) is wrong", "D", "D", 0),
])
def test_extraction(response, new, legacy, mvb_gold_b):
    assert extract(response, "0.7.2") == new
    assert extract_mcq_answer(response) == new
    assert extract(response, "legacy") == legacy
    assert mvbench_score("B", response) == mvb_gold_b


def test_extraction_bad_convention():
    with pytest.raises(ValueError, match="convention"):
        extract("B", "0.6")


def test_mvbench_normalize_quirks():
    assert mvbench_normalize("B. because") == "B"
    assert mvbench_normalize("it is a cat (B)") == "A"   # first standalone a-e wins
    assert mvbench_normalize("Dog.") == "dog"            # no letter: the normalized text itself
    assert mvbench_score("C", "(C)") == 1
    assert mvbench_score("C", "") == 0


# ----------------------------------------------------------------------------- prompts
def test_videomme_prompts_exact():
    q, opts = "What is shown?", ["A. a cat", "B. a dog", "C. a car", "D. a cup"]
    instr = ("Select the best answer to the following multiple-choice question based on the video and the "
             "subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")
    assert videomme_prompt(q, opts) == (instr + "\nWhat is shown?\nA. a cat\nB. a dog\nC. a car\nD. a cup\n\n"
                                        "Answer with the option's letter from the given choices directly.")
    assert videomme_subtitle_prompt(q, opts, "hello\nworld") == (
        "This video's subtitles are listed below: \nhello\nworld\n" + instr +
        "\nWhat is shown?\nA. a cat\nB. a dog\nC. a car\nD. a cup\nThe best answer is:")
    assert videomme_subtitle_prompt(q, opts, None).startswith(
        "This video's subtitles are listed below: \nNo subtitles available\nSelect")
    assert videomme_subtitle_prompt(q, opts, "").startswith("This video's subtitles are listed below: \n\nSelect")


def test_mvbench_prompt_exact():
    assert mvbench_prompt("Why?", ["left", "right", "up"]) == (
        "Question:Why?\nOption:\n(A) left\n(B) right\n(C) up\nOnly give the best option.\n")


# ----------------------------------------------------------------------------- subtitles
SRT = ('1\r\n00:00:00,000 --> 00:00:01,000\r\n<font color="white" size=".72c">first</font>\r\n\r\n'
       '2\r\n00:00:03,000 --> 00:00:04,000\r\n<font color="white" size=".72c">second</font>\r\n\r\n'
       '3\r\n00:00:04,500 --> 00:00:05,000\r\n<font color="white" size=".72c">third</font>\r\n\r\n'
       '4\r\n00:00:09,800 --> 00:00:10,000\r\nuntagged line\r\n\r\n'
       'garbage block\r\n\r\n')


def test_subtitle_selection_by_sampled_frames():
    cues = parse_srt(SRT)
    assert [c.start for c in cues] == [0.0, 3.0, 4.5, 9.8]
    # 100 frames at 10 fps, 5 sampled frames: linspace(0, 99, 5) floored = 0, 24, 49, 74, 99
    # cue spans in frames: [0, 10) has 0; [30, 40) none; [45, 50) has 49; [98, 100) has 99 but is untagged
    assert select_subtitles(cues, 100, 10.0, 5) == "first\nthird"
    # every frame sampled: all tagged cues
    assert select_subtitles(cues, 100, 10.0, -1) == "first\nsecond\nthird"
    # a plain .srt (no font tags anywhere) keeps its text
    plain = parse_srt("1\n00:00:00,000 --> 00:00:02,000\nhi <i>there</i>\n\n")
    assert select_subtitles(plain, 100, 10.0, 5) == "hi there"


# ----------------------------------------------------------------------------- metrics
def test_clustered_stderr_by_hand():
    # mean .75, sample variance .25 -> var/n = 1/16; within-cluster cross terms -1/4 / n^2
    assert clustered_stderr([1, 0, 1, 1], ["a", "a", "b", "b"]) == pytest.approx(math.sqrt(0.046875))
    # one sample per cluster: the plain standard error sqrt(var / n)
    assert clustered_stderr([1, 0, 1, 1], ["a", "b", "c", "d"]) == pytest.approx(0.25)
    assert math.isnan(clustered_stderr([1], ["a"]))


# ----------------------------------------------------------------------------- row files
def test_read_rows_formats(tmp_path):
    from mmkv.errors import InputError
    from mmkv.evaluation.data import as_list, read_rows

    rows = [{"videoID": "v", "options": ["A. x", "B. y"], "answer": "A"}]
    (tmp_path / "r.json").write_text(json.dumps(rows))
    (tmp_path / "r.jsonl").write_text(json.dumps(rows[0]) + "\n{broken\n")
    (tmp_path / "r.csv").write_text('videoID,options,answer\nv,"[\'A. x\', \'B. y\']",A\n')
    assert read_rows(str(tmp_path / "r.json")) == rows
    jl = read_rows(str(tmp_path / "r.jsonl"))
    assert jl[0] == rows[0] and "__malformed__" in jl[1]
    csv_rows = read_rows(str(tmp_path / "r.csv"))
    assert as_list(csv_rows[0]["options"]) == ["A. x", "B. y"]
    (tmp_path / "r.txt").write_text("x")
    with pytest.raises(InputError, match="unsupported"):
        read_rows(str(tmp_path / "r.txt"))
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        (tmp_path / "t.parquet").write_bytes(b"PAR1")
        with pytest.raises(InputError, match="pyarrow"):
            read_rows(str(tmp_path / "t.parquet"))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "t.parquet"))
        assert read_rows(str(tmp_path / "t.parquet")) == rows


def test_hub_ids_offline_give_a_clear_error(monkeypatch):
    hf_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # never download in tests
    from mmkv.errors import InputError
    from mmkv.evaluation.mvbench import MVBench
    from mmkv.evaluation.videomme import VideoMME

    for repo in ("lmms-eval/Video-MME", "lmms-lab/Video-MME"):
        with pytest.raises(InputError, match=f"cannot download the dataset '{repo}'.*local folder"):
            VideoMME(repo)
    with pytest.raises(InputError, match="OpenGVLab/MVBench"):
        MVBench("OpenGVLab/MVBench")
