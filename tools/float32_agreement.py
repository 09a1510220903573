"""How often each measured form's greedy token is a float32 forward's argmax, along its own
tokens: the tokens a tools/webgpu_tune.py run produced (prompt and 256 new tokens) go through
one teacher-forced float32 forward of the same checkpoint, on the CPU.

    python tools/float32_agreement.py --hf WORK/rand7b --tune OUT/webgpu_tune_float16.json \\
        --configs packed,split_k8

Two forms that part at a near-tie say nothing about which is closer to the real numbers; this
does: at every position, the float32 argmax given the form's own prefix, and where the form
chose another token, the float32 margin between the two. The arithmetic is
llama2_onnx.reference's (float32 RMS norm, half-split rotary, softmax attention), the weights
read one layer at a time (a 7B's float32 weights need not fit in memory). The prompt is
tools/benchmark.py's random_prompt. Float checkpoints only: an int4 variant's weights are
its quantized codes, which this does not read. A 7B takes about 6 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama2_onnx.checkpoints import HFSource, hf_config  # noqa: E402
from llama2_onnx.tokenizer import Tokenizer  # noqa: E402


def forward_logits(folder: Path, sequences: list[list[int]], start: int):
    """float32 logits predicting positions start+1.. of each sequence (all the same length)."""
    import torch
    from torch.nn import functional as F

    from llama2_onnx.reference import apply_rotary, rotary_tables

    config, source = hf_config(folder / "config.json"), HFSource(folder)

    def weight(name: str):
        return torch.from_numpy(np.asarray(source.read(name), dtype=np.float32))

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.norm_eps) * w

    tokens = torch.tensor(sequences)
    batch, length = tokens.shape
    heads, kv_heads, dim = config.n_heads, config.n_kv_heads, config.head_dim
    cos, sin = rotary_tables(config, length)
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)
    with torch.no_grad():
        h = weight("tok_embeddings.weight")[tokens]
        for i in range(config.n_layers):
            p = f"layers.{i}."
            x = norm(h, weight(p + "attention_norm.weight"))
            q, k, v = ((x @ weight(p + f"attention.{w}.weight").T).view(batch, length, n, dim)
                       .transpose(1, 2) for w, n in (("wq", heads), ("wk", kv_heads),
                                                     ("wv", kv_heads)))
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            repeat = heads // kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
            scores = (q @ k.transpose(-1, -2)) / dim ** 0.5
            out = F.softmax(scores.masked_fill(causal, float("-inf")), -1) @ v
            h = h + out.transpose(1, 2).reshape(batch, length, -1) @ weight(
                p + "attention.wo.weight").T
            x = norm(h, weight(p + "ffn_norm.weight"))
            gated = F.silu(x @ weight(p + "feed_forward.w1.weight").T) * (
                x @ weight(p + "feed_forward.w3.weight").T)
            h = h + gated @ weight(p + "feed_forward.w2.weight").T
            print(f"layer {i + 1}/{config.n_layers}", file=sys.stderr, flush=True)
        return norm(h, weight("norm.weight"))[:, start - 1:-1] @ weight("output.weight").T


def agreement(logits, generated: list[int]) -> dict:
    top = logits.topk(2, -1)
    best = top.indices[:, 0]
    chosen = np.asarray(generated)
    misses = np.flatnonzero(best.numpy() != chosen).tolist()
    margins = (top.values[:, 0] - top.values[:, 1]).numpy()
    return {"agree": len(chosen) - len(misses), "of": len(chosen),
            "first_disagreement": misses[0] if misses else None,
            "median_top2_margin": round(float(np.median(margins)), 4),
            "disagreements": [{"at": j, "float32_margin": round(float(
                logits[j, best[j]] - logits[j, chosen[j]]), 4)} for j in misses]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf", type=Path, required=True, help="the checkpoint the variant "
                        "was exported from (Hugging Face folder)")
    parser.add_argument("--tune", type=Path, required=True, help="tools/webgpu_tune.py's JSON")
    parser.add_argument("--configs", default="", help="comma-separated configs (default: all "
                        "with tokens)")
    parser.add_argument("--prompt-tokens", type=int, default=128,
                        help="the tune run's prompt length (default 128)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    runs = [r for r in json.loads(args.tune.read_text()) if "tokens" in r]
    if args.configs:
        runs = [r for r in runs if r["config"] in args.configs.split(",")]
    bos = Tokenizer.from_file(args.hf / "tokenizer.model").bos_id
    vocab = hf_config(args.hf / "config.json").vocab_size
    prompt = [bos] + np.random.default_rng(0).integers(3, vocab, args.prompt_tokens - 1).tolist()
    logits = forward_logits(args.hf, [prompt + r["tokens"] for r in runs], len(prompt))
    report = {r["config"]: agreement(logits[b], r["tokens"]) for b, r in enumerate(runs)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
