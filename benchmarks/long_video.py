"""Hour-long video on CPU: peak memory against video length with streaming PVC.

A synthetic 1-fps video (10-minute needle scenes) of 450, 900, 1800 and 3600 frames (one hour) is
decoded, encoded and compressed chunk by chunk with a tiny Qwen2-VL; each measurement runs in a
fresh process and reports the peak resident set above the process's steady state (after loading
the model and a short warm-up run), next to the visual tokens kept. The uncompressed recipe is
run beside it for contrast. See mmkv/bench/longvideo.py for the method, docs/vision.md for the
memory formula.

    python benchmarks/long_video.py                                  # 450..3600 frames, pvc and none
    python benchmarks/long_video.py --frames 450,3600 --recipes pvc --threads 1
"""
from mmkv.bench.longvideo import main

if __name__ == "__main__":
    raise SystemExit(main())
