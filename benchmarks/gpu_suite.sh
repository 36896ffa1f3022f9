#!/usr/bin/env bash
# Every GPU check and measurement the open targets need, in one command (one device call):
#   0. correctness on the device: `pytest -m gpu tests/test_gpu.py` (every kernel and format against
#      its reference, fp16/bf16, GPU tiles, generate on CUDA == CPU). If anything fails, nothing is
#      timed and the script exits 1;
#   1. fused decode attention over the quantized cache, bf16, batch 1 and 8, 8K / 32K / 128K:
#      kernel alone (CUDA graph, L2 flushed) and the whole layer, against SDPA, GB/s on every byte
#      the launches move (segment + split partials) and % of the card's peak;
#   2. ZipVL sparse prefill, bf16: whole prefill vs dense at 8K-32K tokens, and one layer's kernel
#      vs SDPA on the same gathered subset.
# Tables go to $OUT (or benchmarks/results/gpu), one markdown file per part, with nvidia-smi's
# header and the time each part took. Uses python3 with PYTHONPATH=. (the device image has torch,
# triton, transformers). Part 0 needs pytest: where the device lacks it, install it beside the
# checkout first (`pip install --target .gpu_deps pytest`, git-ignored) and send `.gpu_deps` with the
# run (the device tool's `carry`); it is put on PYTHONPATH when present.
#
#   bash benchmarks/gpu_suite.sh              # on the GPU machine: sized for one call of <= 8 minutes
#   QUICK=1 bash benchmarks/gpu_suite.sh      # small sizes: a smoke run (also on CPU, where part 0
#                                             # skips and part 2 runs ZipVL's sparse path)
# The static kernel counts need no GPU: `python tools/kernel_counts.py` (benchmarks/results/kernel_counts.md).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu}"
mkdir -p "$out"
py="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && py=.venv/bin/python
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
[ -d .gpu_deps ] && export PYTHONPATH="$PYTHONPATH:$PWD/.gpu_deps"
if ! "$py" -c "import pytest" 2>/dev/null; then
  echo "pytest is not importable by $py: the device correctness suite cannot run, so nothing is timed"
  echo "(pip install --target .gpu_deps pytest, then send .gpu_deps along)"; exit 1
fi
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
case "$gpu" in
  *H200*) peak=4800 ;;
  *H100*HBM3*|*H100*SXM*) peak=3350 ;;
  *H100*) peak=2000 ;;
  *A100*) peak=2039 ;;
  *) peak="" ;;
esac
{ echo "# GPU suite: ${gpu:-no GPU} (peak ${peak:-?} GB/s), $(date -u +%F)"; nvidia-smi 2>/dev/null | head -12; \
  "$py" -c "import torch, triton, numpy, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'numpy', numpy.__version__, 'transformers', transformers.__version__)"; } > "$out/machine.md"
cat "$out/machine.md"
peakarg=${peak:+--peak-gbps $peak}
if [ -n "${QUICK:-}" ]; then
  ctx=2048; batches=1,2; lens=1024; reps=3; shape=tiny; heads="--heads 4 --kv-heads 2 --head-dim 64"
else
  ctx=8192,32768,131072; batches=1,8; lens=8192,16384,32768; reps=20; shape=0.5b; heads=""
fi
status=0
run() {  # run NAME CMD...: its stdout to $out/NAME.md, its stderr tail on failure, the time it took
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name: $*"
  if ! "$@" > "$out/$name.md" 2> "$out/$name.err"; then
    echo "   FAILED after $((SECONDS - t0)) s:"; tail -40 "$out/$name.md"; tail -15 "$out/$name.err"; status=1
  else
    rm -f "$out/$name.err"; head -60 "$out/$name.md"; echo "   ($((SECONDS - t0)) s)"
  fi
  echo "$name: $((SECONDS - t0)) s" >> "$out/machine.md"
}
run correctness "$py" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
if [ $status -ne 0 ]; then
  echo "correctness failed on the device: nothing timed"; exit 1
fi
run decode_bf16 "$py" benchmarks/quant_decode.py --dtype bf16 --contexts "$ctx" --batches "$batches" \
  --repeats "$reps" --splits-per-sm 2,4 $heads $peakarg
run zipvl_prefill "$py" benchmarks/zipvl_prefill.py --shape "$shape" --lengths "$lens" --repeats 3
echo "total: $SECONDS s" | tee -a "$out/machine.md"
exit $status
