"""Video-MME batch evaluation: the same as `mmkv eval videomme ...` (see docs/eval.md).

    python eval/videomme.py /data/videomme --model Qwen/Qwen2.5-VL-7B-Instruct --recipe kivi:2 --out runs/vmme_kivi2
    accelerate launch --num_processes 8 eval/videomme.py /data/videomme --model ... --out runs/vmme
"""
import sys

from mmkv.eval_cli import main

if __name__ == "__main__":
    sys.exit(main(["videomme", *sys.argv[1:]]))
