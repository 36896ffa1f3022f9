"""MVBench batch evaluation: the same as `mmkv eval mvbench ...` (see docs/eval.md).

    python eval/mvbench.py /data/MVBench --model Qwen/Qwen2.5-VL-7B-Instruct --recipe kivi:2 --out runs/mvb_kivi2
    accelerate launch --num_processes 8 eval/mvbench.py /data/MVBench --model ... --out runs/mvb
"""
import sys

from mmkv.eval_cli import main

if __name__ == "__main__":
    sys.exit(main(["mvbench", *sys.argv[1:]]))
