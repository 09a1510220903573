#!/usr/bin/env bash
# The GPU measurements in the README, side by side with onnxruntime-genai on the same weights.
# Needs an NVIDIA GPU, onnxruntime-gpu and onnxruntime-genai-cuda (same ONNX Runtime version),
# PyTorch and transformers (for genai's builder). Random Llama-2-7B-shaped weights, no download.
#
#   bash tools/gpu_bench.sh prepare WORK [PRECISIONS]   # checkpoint, our exports, genai's models
#                                                       # (= stages `ours` then `genai`)
#   bash tools/gpu_bench.sh bench   WORK [PRECISIONS]   # decode/TTFT/memory, ours vs genai
#   bash tools/gpu_bench.sh checks  WORK                # graph capture = no capture; profiles
#   bash tools/gpu_bench.sh webgpu  WORK [PRECISIONS]   # our WebGPU path: capture on and off
#   bash tools/gpu_bench.sh webgpu_tune WORK [PRECISIONS]  # WebGPU forms/options; int4 profile
#   bash tools/gpu_bench.sh webgpu_float32 WORK         # float16 forms' tokens against float32
#   bash tools/gpu_bench.sh genai_webgpu WORK [PRECISIONS] # genai's builder with -e webgpu
#   bash tools/gpu_bench.sh side WORK [PRECISIONS]      # ours CUDA, ours WebGPU, genai-webgpu
#   bash tools/gpu_bench.sh serve WORK [PRECISIONS]     # the server: --parallel 1, 16, 64
#   bash tools/gpu_bench.sh slots_profile WORK          # a batched decode step's host time
#   bash tools/gpu_bench.sh slots_check WORK [PRECISIONS]  # 16 slots captured = uncaptured;
#                                                       # divergences from one slot: margins
#
# PRECISIONS: float16 and/or int4 (default "float16"). JSON results go to $OUT (or WORK/results).
#
# The WebGPU stages need our exports (stage `ours`), onnxruntime >= 1.24.4 (CPU package) with
# onnxruntime-ep-webgpu 0.4, and a Vulkan loader with the glvnd libraries; on a machine that has
# the NVIDIA driver but no loader (../shared/gpu/WEBGPU.md), unpack libvulkan1 libglvnd0 libgl1
# libglx0 libegl1 libopengl0 libgles2 and export
# VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json first. `webgpu` runs
# tools/benchmark.py with graph capture on and off (128 -> 256 greedy, median of 3; the two
# tokens_sha1 must be equal); `webgpu_tune` runs tools/webgpu_ops.py (GPU time of single
# operators at 7B decode shapes) and tools/webgpu_tune.py: int4 in the shipped packed form
# against the exported form, accuracy_level 0, the fused MatMulNBitsQkv/Mlp form and
# validationMode=disabled, then ONNX Runtime's profile of 16 decode steps; float16 packed
# against split-K products (graph_forms.SPLIT_K, 8 and 16 parts). `webgpu_float32` (CPU only,
# after webgpu_tune float16) sends each float16 form's tokens through a float32 forward of the
# checkpoint (tools/float32_agreement.py): how often each form picked the float32 argmax.
# `side` runs tools/webgpu_tune.py with our CUDA path first (the reference for the tokens), our
# WebGPU default form, onnxruntime-genai on the plugin (stage `genai_webgpu` builds its model)
# and, for int4, the split-K int4 experiments (nbits_split4/8), each 128 -> 256 greedy, median
# of 3. `serve` runs tools/benchmark.py serve (128-token prompts, 128 new tokens, one request
# per client, a 1,024-token context): --parallel 1 and 16 at 1, 4 and 16 clients, then 16 and
# 64 at 16 and 64 clients (greedy answers compared with the first value's), then --parallel 16
# again with SERVE_PREFILL_TOKENS (default 512) prompt tokens a tick
# (batching.PREFILL_TOKENS_PER_TICK).
# `slots_profile` times decode steps on the GPU (tools/gpu_profile.py): one slot captured and
# uncaptured, 16 and 64 slots (captured): the host's share of a batched step.
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

webgpu() {
  for p in $precisions; do
    v="$work/ours_$p"
    $py tools/benchmark.py run --variant "$v" --provider webgpu --reps 3 --graph-capture \
      | tee "$out/webgpu_${p}_capture.json"
    $py tools/benchmark.py run --variant "$v" --provider webgpu --reps 3 --no-graph-capture \
      | tee "$out/webgpu_${p}_no_capture.json"
  done
}

webgpu_tune() {
  $py tools/webgpu_ops.py --out "$out/webgpu_ops.json"
  for p in $precisions; do
    case $p in
      int4) configs=packed,exported,acc0,fused,novalid,profile ;;
      *) configs=packed,split_k8,split_k16 ;;
    esac
    $py tools/webgpu_tune.py --variant "$work/ours_$p" --configs "$configs" \
      --out "$out/webgpu_tune_$p.json"
  done
}

webgpu_float32() {
  $py tools/float32_agreement.py --hf "$work/rand7b" --tune "$out/webgpu_tune_float16.json" \
    | tee "$out/webgpu_float32_agreement.json"
}

genai_webgpu() {  # genai's own WebGPU model of the same checkpoint
  checkpoint
  for p in $precisions; do
    [ -f "$work/genai_webgpu_$p/genai_config.json" ] && continue
    /usr/bin/time -v $py -m onnxruntime_genai.models.builder -i "$work/rand7b" \
      -o "$work/genai_webgpu_$p" -p "$(genai_precision "$p")" -e webgpu -c "$work/hfcache" \
      > "$out/genai_webgpu_build_$p.log" 2>&1 || tail -20 "$out/genai_webgpu_build_$p.log"
    grep -E "Elapsed|Maximum resident" "$out/genai_webgpu_build_$p.log" || true
  done
}

side() {
  for p in $precisions; do
    case $p in
      int4) configs=cuda,packed,genai,nbits_split4,nbits_split8 ;;
      *) configs=cuda,packed,genai ;;
    esac
    $py tools/webgpu_tune.py --variant "$work/ours_$p" --configs "$configs" \
      --genai "$work/genai_webgpu_$p" --out "$out/side_$p.json"
  done
}

serve() {  # one request per client: --parallel 1 at 64 clients alone would take minutes
  for p in $precisions; do
    common=(--variant "$work/ours_$p" --provider cuda --requests-per-client 1
            --prompt-tokens 128 --new-tokens 128 --max-seq-len 1024)
    $py tools/benchmark.py serve "${common[@]}" --clients 1,4,16 --parallel 1,16 \
      > "$out/serve_$p.json"
    $py tools/benchmark.py serve "${common[@]}" --clients 16,64 --parallel 16,64 \
      > "$out/serve_${p}_64.json"
    LLAMA2_ONNX_PREFILL_TOKENS_PER_TICK=${SERVE_PREFILL_TOKENS:-512} \
      $py tools/benchmark.py serve "${common[@]}" --clients 16 --parallel 16 \
      > "$out/serve_${p}_prefill.json"
  done
}

slots_check() {  # tools/slots_capture_check.py: 40 greedy requests through 16 slots
  for p in $precisions; do
    $py tools/slots_capture_check.py --variant "$work/ours_$p" --parallel 16 --requests 40 \
      | tee "$out/slots_check_$p.json"
  done
}

slots_profile() {
  v="$work/ours_float16"
  $py tools/gpu_profile.py --variant "$v" --steps 32 --max-seq-len 1024 \
    > "$out/profile_p1_capture.json"
  $py tools/gpu_profile.py --variant "$v" --steps 32 --max-seq-len 1024 --no-graph-capture \
    > "$out/profile_p1_nocapture.json"
  for n in 16 64; do
    $py tools/gpu_profile.py --variant "$v" --steps 32 --max-seq-len 1024 --parallel $n \
      > "$out/profile_p$n.json"
  done
}

"$stage"
