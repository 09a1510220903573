"""Where a decode step's GPU time goes: every CUDA kernel of a few decode steps, timed on the GPU.

    python tools/gpu_profile.py --variant /data/out/rand7b_float16 --prompt-tokens 128 --steps 32

Runs the variant as the chat app does (graph capture and all), pre-fills a prompt, then records
`--steps` greedy decode steps with PyTorch's profiler, whose CUPTI tracer sees every kernel in
the process, ONNX Runtime's included (ONNX Runtime's own profiler times how long launching a
node takes on the host, not the kernel). Needs PyTorch built with CUDA, which the project does
not: run it where one is installed. Prints JSON: wall time per step, GPU time per step in
kernels, kernels per step, time per group of kernels (matrix products, attention, norms,
element-wise, copies), the bandwidth the matrix products reach on the graph's weights, and the
kernels that take longest.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Kernel name patterns per group, first match wins (cuBLAS' nvjet/gemv/splitK kernels and
# MatMulNBits' kernels are the matrix products; GroupQueryAttention's helpers are attention).
GROUPS = (
    ("matrix products", r"nvjet|gemm|gemv|splitK|MatMul|Dequantize|cutlass"),
    ("attention", r"mha|flash|sdpa|Attention|RoPE|Rotary|SequenceLengths"),
    ("norms", r"LayerNorm"),
    ("copies", r"Memcpy|Memset|memset|memcpy|_Fill"),
    ("element-wise", r"ElementWise|Split|Concat|Slice|Cast|Gelu|Sigmoid"),
)


def group_of(name: str) -> str:
    return next((group for group, pattern in GROUPS if re.search(pattern, name)), "other")


def summarize(kernels: Iterable[tuple[str, float]], steps: int, wall_s: float,
              weight_bytes: int, top: int = 12) -> dict:
    """Per-step figures from (kernel name, GPU microseconds) pairs recorded over `steps`."""
    total, count = defaultdict(float), defaultdict(int)
    for name, us in kernels:
        total[name] += us
        count[name] += 1
    busy = sum(total.values())
    groups = defaultdict(float)
    for name, us in total.items():
        groups[group_of(name)] += us
    products_us = groups.get("matrix products", 0.0) / steps
    return {
        "steps": steps, "wall_us_per_step": round(wall_s / steps * 1e6, 1),
        "kernel_us_per_step": round(busy / steps, 1),
        "kernels_per_step": round(sum(count.values()) / steps, 1),
        "us_per_step_by_group": {g: round(us / steps, 1) for g, us in
                                 sorted(groups.items(), key=lambda kv: -kv[1])},
        "matrix_products_tb_per_s": round(weight_bytes / products_us / 1e6, 2)
        if products_us else None,
        "top_kernels": [{"name": name[:100], "per_step": round(count[name] / steps, 2),
                         "us_per_step": round(us / steps, 1)}
                        for name, us in sorted(total.items(), key=lambda kv: -kv[1])[:top]],
    }


def refuse(sentence: str) -> None:
    print(sentence, file=sys.stderr)
    sys.exit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", type=Path, required=True, help="variant folder")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32, help="decode steps recorded")
    parser.add_argument("--no-graph-capture", action="store_true")
    parser.add_argument("--max-seq-len", type=int, default=None, help="context (default: the "
                        "model's)")
    parser.add_argument("--parallel", type=int, default=1, help="slots: each decode step runs "
                        "this many rows together (session.Runtime.run_rows), every row at the "
                        "prompt's length; no graph capture")
    args = parser.parse_args()
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        refuse("tools/gpu_profile.py needs PyTorch: install a CUDA build of torch on the GPU "
               "machine.")
    if not torch.cuda.is_available():
        refuse("tools/gpu_profile.py needs a CUDA GPU and a CUDA build of PyTorch (this one "
               "sees no GPU); run it on the GPU machine.")
    import numpy as np

    from llama2_onnx.config import NP_DTYPES
    from llama2_onnx.generation import Engine

    torch.zeros(1, device="cuda")  # PyTorch's CUDA context first, so CUPTI sees all kernels
    engine = Engine.from_variant(args.variant, provider="cuda", parallel=args.parallel,
                                 max_seq_len=args.max_seq_len,
                                 graph_capture=not args.no_graph_capture)
    prompt = engine.tokenizer.encode("", bos=True) + [100 + i * 37 % 20000
                                          for i in range(args.prompt_tokens - 1)]

    rows = args.parallel

    def decode(steps: int, recorder=None) -> float:
        if rows > 1:
            return decode_rows(steps, recorder)
        engine.reset()
        token = int(np.argmax(engine.prefill(prompt)))
        if recorder:
            recorder.__enter__()
        start = time.perf_counter()
        for _ in range(steps):
            token = int(np.argmax(engine.decode_step(token)))
        wall = time.perf_counter() - start
        if recorder:
            recorder.__exit__(None, None, None)
        return wall

    def decode_rows(steps: int, recorder=None) -> float:
        """The same prompt in every slot, then steps of all rows (as batching.SlotEngine)."""
        runner = engine.runner
        first = [runner.run(engine.embeddings[prompt], 0, row=r).copy() for r in range(rows)]
        tokens = np.array([int(np.argmax(x)) for x in first])
        if recorder:
            recorder.__enter__()
        start = time.perf_counter()
        for step in range(steps):
            logits = runner.run_rows(engine.embeddings[tokens], [len(prompt) + step] * rows)
            tokens = logits.reshape(rows, -1).argmax(-1)
        wall = time.perf_counter() - start
        if recorder:
            recorder.__exit__(None, None, None)
        return wall

    decode(8)  # capture the graph and warm up
    wall = decode(args.steps)
    recorder = profile(activities=[ProfilerActivity.CUDA])
    decode(args.steps, recorder)
    kernels = [(e.name, e.device_time_total) for e in recorder.events()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    config = engine.config
    table = config.vocab_size * config.dim * np.dtype(NP_DTYPES[config.dtype]).itemsize
    report = summarize(kernels, args.steps, wall, config.weight_bytes() - table)
    report["host_gap_us_per_step"] = round(report["wall_us_per_step"]
                                           - report["kernel_us_per_step"], 1)
    print(json.dumps({"variant": args.variant.name, "prompt_tokens": args.prompt_tokens,
                      "parallel": rows, "graph_capture": engine.runner.graph_capture, **report},
                     indent=2))


if __name__ == "__main__":
    main()
