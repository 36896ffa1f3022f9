#!/usr/bin/env bash
# Every GPU measurement the open targets need, in one command (one device call):
#   - fused decode attention over the quantized cache (issue 6): kernel vs fp16/bf16 SDPA at
#     8K / 32K / 128K, GB/s on the bytes read and % of the card's peak;
#   - ZipVL sparse prefill (issue 5): whole prefill vs dense at 8K-32K tokens, and one layer's
#     kernel vs SDPA on the same gathered subset.
# Tables go to $OUT (or benchmarks/results/gpu), one markdown file per part, with nvidia-smi's
# header. Uses python3 with PYTHONPATH=. (the device image has torch, triton, transformers).
#
#   bash benchmarks/gpu_suite.sh              # on the GPU machine (its run time there is not known yet)
#   QUICK=1 bash benchmarks/gpu_suite.sh      # small sizes: a smoke run (also on CPU)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu}"
mkdir -p "$out"
py="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && py=.venv/bin/python
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
case "$gpu" in
  *H200*) peak=4800 ;;
  *H100*HBM3*|*H100*SXM*) peak=3350 ;;
  *H100*) peak=2000 ;;
  *A100*) peak=2039 ;;
  *) peak="" ;;
esac
{ echo "# GPU suite: ${gpu:-no GPU} (peak ${peak:-?} GB/s), $(date -u +%F)"; nvidia-smi 2>/dev/null | head -12; \
  "$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$out/machine.md"
peakarg=${peak:+--peak-gbps $peak}
if [ -n "${QUICK:-}" ]; then
  ctx=2048; lens=1024; reps=3; shape=tiny
else
  ctx=8192,32768,131072; lens=8192,16384,32768; reps=20; shape=0.5b
fi
status=0
run() {  # run NAME CMD...: its stdout to $out/NAME.md, its stderr tail on failure
  local name=$1; shift
  echo "== $name: $*"
  if ! "$@" > "$out/$name.md" 2> "$out/$name.err"; then
    echo "   FAILED:"; tail -5 "$out/$name.err"; status=1
  else
    rm -f "$out/$name.err"; head -40 "$out/$name.md"
  fi
}
run decode_fp16 "$py" benchmarks/quant_decode.py --contexts "$ctx" --repeats "$reps" $peakarg
run decode_bf16 "$py" benchmarks/quant_decode.py --dtype bf16 --contexts "$ctx" --repeats "$reps" $peakarg
run zipvl_prefill "$py" benchmarks/zipvl_prefill.py --shape "$shape" --lengths "$lens" --repeats 3
exit $status
