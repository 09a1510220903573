#!/usr/bin/env bash
# The GPU measurements in the README, side by side with onnxruntime-genai on the same weights.
# Needs an NVIDIA GPU, onnxruntime-gpu and onnxruntime-genai-cuda (same ONNX Runtime version),
# PyTorch and transformers (for genai's builder). Random Llama-2-7B-shaped weights, no download.
#
#   bash tools/gpu_bench.sh prepare WORK [PRECISIONS]   # checkpoint, our exports, genai's models
#                                                       # (= stages `ours` then `genai`)
#   bash tools/gpu_bench.sh bench   WORK [PRECISIONS]   # decode/TTFT/memory, ours vs genai
#   bash tools/gpu_bench.sh checks  WORK                # graph capture = no capture; profiles
#
# PRECISIONS: float16 and/or int4 (default "float16"). JSON results go to $OUT (or WORK/results).
set -euo pipefail
cd "$(dirname "$0")/.."
stage=$1; work=$2; precisions=${3:-float16}
out=${OUT:-$work/results}; mkdir -p "$out" "$work"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
genai_precision() { [ "$1" = float16 ] && echo fp16 || echo int4; }

checkpoint() {
  if [ ! -f "$work/rand7b/config.json" ]; then
    $py tools/make_random_checkpoint.py --shape 7b --format hf --dtype float16 --shards 1 \
      --out "$work/rand7b"
    echo '{"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>"}' \
      > "$work/rand7b/tokenizer_config.json"
  fi
}

ours() {  # our exports (random weights: int4's verification bound is for trained models)
  checkpoint
  for p in $precisions; do
    $py tools/benchmark.py export --hf "$work/rand7b" --precision "$p" --variant "ours_$p" \
      --out "$work" --skip-verify | tee "$out/export_ours_$p.json"
  done
}

genai() {  # onnxruntime-genai's builder on the same checkpoint, timed with its peak RSS
  checkpoint
  for p in $precisions; do
    /usr/bin/time -v $py -m onnxruntime_genai.models.builder -i "$work/rand7b" \
      -o "$work/genai_$p" -p "$(genai_precision "$p")" -e cuda -c "$work/hfcache" \
      > "$out/genai_build_$p.log" 2>&1 || tail -20 "$out/genai_build_$p.log"
    grep -E "Elapsed|Maximum resident" "$out/genai_build_$p.log" || true
  done
}

prepare() { ours; genai; }

bench() {
  for p in $precisions; do
    v="$work/ours_$p"
    $py tools/benchmark.py run --variant "$v" --provider cuda --reps 3 \
      --compare-genai "$work/genai_$p" | tee "$out/run_${p}_default.json"
    $py tools/benchmark.py run --variant "$v" --provider cuda --reps 3 \
      --no-graph-capture | tee "$out/run_${p}_no_capture.json"
    $py tools/benchmark.py ttft --variant "$v" --provider cuda \
      | tee "$out/ttft_${p}_chunked.json"
    $py tools/benchmark.py ttft --variant "$v" --provider cuda \
      --prefill-chunk 0 | tee "$out/ttft_${p}_whole.json"
  done
}

checks() {
  $py tools/graph_capture_check.py --variant "$work/ours_float16" --provider cuda \
    | tee "$out/graph_capture_check.json"
  $py tools/gpu_check.py --variant "$work/ours_float16" --provider cuda \
    | tee "$out/gpu_check.json"
  $py tools/benchmark.py load --variant "$work/ours_float16" --provider cuda \
    | tee "$out/load_levels.json"
}

"$stage"
