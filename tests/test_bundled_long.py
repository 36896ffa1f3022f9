"""The shipped long-video checkpoint (mmkv/assets/mmkv-long, docs/model.md run T): it loads through
from_pretrained in the M-RoPE layout it was trained in, is small, and finds needles in held-out
task v2 videos (seeds it never saw) through the whole mmkv pipeline, in one conversation."""
import mmkv
from mmkv.io import load_media
from mmkv.synthetic.long import make_long_example

from bundled import HELD_OUT, ask_in_one_conversation, shipped, small_trained_card

SHIPPED, pytestmark = shipped("mmkv-long")


def test_shipped_long_checkpoint_is_small_and_says_how_it_was_trained():
    card = small_trained_card("mmkv-long", SHIPPED)
    assert card["train"]["rope_layout"] == "released" and set(card["validation"]) == {"1024", "2048"}
    pipe = mmkv.load("mmkv-long")
    assert pipe.adapter.rope_layout == "released"
    assert pipe.adapter.model.config.text_config.num_attention_heads == 2     # 64-dim heads (run T)


def test_finds_needles_in_held_out_videos_in_one_conversation():
    """Six held-out 128-frame videos (1,024 visual tokens each), their three questions asked as one
    conversation (question 1, its answer, question 2, ...). Identify answers need one needle among
    distractors sharing its colour or shape: the checkpoint answers 92-100% of them at 1,024 frames
    (BENCHMARKS.md); here at least 5 of 6. All 18 answers: well above the answer prior (~10%)."""
    pipe = mmkv.load("mmkv-long")
    examples = [(load_media(ex.frames, video_fps=2.0), ex.questions)
                for ex in (make_long_example(HELD_OUT + i, 128) for i in range(6))]
    right, identify = ask_in_one_conversation(pipe, examples, "identify", max_new_tokens=12)
    assert sum(identify) >= 5 and right >= 9, (identify, right)
