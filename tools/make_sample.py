"""Write the bundled sample video and its question: mmkv/assets/sample.mp4 + sample.json.

A 256-frame (128 s at 2 fps) synthetic needle video from `mmkv.synthetic`, seed 7, colour question,
H.264 (so the demo's browser player shows it).
Run: python tools/make_sample.py
"""
import json
import os

from mmkv.synthetic import FPS, make_example, write_video

ASSETS = os.path.join(os.path.dirname(__file__), "..", "mmkv", "assets")

if __name__ == "__main__":
    ex = make_example(seed=7, num_frames=256, task="color")
    os.makedirs(ASSETS, exist_ok=True)
    write_video(os.path.join(ASSETS, "sample.mp4"), ex.frames, FPS, codec="h264")  # plays in browsers
    with open(os.path.join(ASSETS, "sample.json"), "w") as f:
        json.dump({"question": ex.prompt, "answer": ex.answer, "frames": ex.num_frames, "seed": ex.seed,
                   "needles": [n.__dict__ for n in ex.needles]}, f, indent=1)
    print(ex.prompt, "->", ex.answer, ex.needles)
