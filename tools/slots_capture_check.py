"""Check on a GPU that slots change no token, captured or not, and where they differ from one slot.

    python tools/slots_capture_check.py --variant /data/out/rand7b_float16 --parallel 16

Plays one scripted workload of greedy requests (prompts of 8 to 400 tokens, 32 to 160 new
tokens, more requests than slots, each new one taking a slot as one frees) through
batching.SlotEngine twice: with the batched decode step captured as a CUDA graph (one graph per
width) and without. The two must give every request the same tokens. Then each request runs
alone on the one-slot engine (the server's --parallel 1), whose logits before each token are
kept: where a request's batched tokens first differ from its lone ones, the lone logits say how
far apart the two tokens were (a near-tie if the margin is a small share of the spread: float16
products of 16 rows add in another order than those of one). Prints JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama2_onnx.batching import SlotEngine  # noqa: E402
from llama2_onnx.cli import run_main  # noqa: E402
from llama2_onnx.generation import Engine  # noqa: E402
from llama2_onnx.placement import RunOptions  # noqa: E402
from llama2_onnx.sampling import SamplingSettings  # noqa: E402

GREEDY = SamplingSettings(temperature=0)


def workload(vocab: int, bos: list[int], requests: int, seed: int) -> list[dict]:
    """Requests in arrival order: prompt ids, new tokens, and the tick before which it waits."""
    rng = np.random.default_rng(seed)
    return [{"prompt": bos + [int(t) for t in rng.integers(3, vocab, int(rng.integers(8, 400)))],
             "new": int(rng.integers(32, 160)), "after": int(rng.integers(0, 40)) * (i > 0)}
            for i in range(requests)]


def play_slots(engine: Engine, asks: list[dict]) -> tuple[list[list[int]], float, int]:
    """Each request's tokens through SlotEngine, the wall time and the tokens made."""
    slots = SlotEngine(engine)
    waiting, started, tick = list(asks), [], 0
    start = time.perf_counter()
    while waiting or slots.requests:
        while waiting and waiting[0]["after"] <= tick and slots.free():
            ask = waiting.pop(0)
            started.append(slots.start(ask["prompt"], GREEDY, ask["new"], ignore_eos=True))
        slots.step()
        tick += 1
    wall = time.perf_counter() - start
    for request in started:
        assert request.error is None, request.error
    return [list(r.stats.tokens) for r in started], wall, sum(len(r.stats.tokens)
                                                              for r in started)


def play_alone(engine: Engine, asks: list[dict]) -> list[tuple[list[int], list[np.ndarray]]]:
    """Each request alone: greedy tokens and the logits before each."""
    results = []
    for ask in asks:
        engine.reset()
        logits, tokens, seen = engine.prefill(ask["prompt"]), [], []
        for step in range(ask["new"]):
            seen.append(logits.copy())
            tokens.append(int(logits.argmax()))
            if step + 1 < ask["new"]:
                logits = engine.decode_step(tokens[-1])
        results.append((tokens, seen))
    return results


def divergences(batched: list[list[int]], alone: list) -> list[dict]:
    """Per request whose batched tokens differ from its lone ones: where, and the lone margin
    between the two tokens there against the spread of those logits."""
    found = []
    for i, (ours, (tokens, seen)) in enumerate(zip(batched, alone, strict=True)):
        step = next((k for k, (a, b) in enumerate(zip(ours, tokens, strict=True)) if a != b),
                    None)
        if step is None:
            continue
        logits = seen[step]
        margin = float(logits[tokens[step]] - logits[ours[step]])
        found.append({"request": i, "first_differing_token": step, "of": len(tokens),
                      "lone_margin": round(margin, 4),
                      "margin_share_of_spread": round(margin / float(logits.std()), 5)})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", type=Path, required=True, help="variant folder")
    parser.add_argument("--provider", default="cuda", help="cuda (or cpu, slowly)")
    parser.add_argument("--parallel", type=int, default=16, help="slots (default 16)")
    parser.add_argument("--requests", type=int, default=40, help="requests (default 40)")
    parser.add_argument("--max-seq-len", type=int, default=1024, help="context (default 1024)")
    parser.add_argument("--seed", type=int, default=0, help="the workload's seed")
    args = parser.parse_args()
    base = RunOptions(provider=args.provider, max_seq_len=args.max_seq_len)
    runs = {}
    for capture in (True, False):
        engine = Engine.from_variant(args.variant, RunOptions(
            provider=args.provider, max_seq_len=args.max_seq_len, parallel=args.parallel,
            graph_capture=capture))
        assert engine.runner.graph_capture == capture or args.provider == "cpu"
        asks = workload(engine.config.vocab_size, engine.tokenizer.encode("", bos=True),
                        args.requests, args.seed)
        runs[capture] = play_slots(engine, asks)
        del engine
        gc.collect()
    engine = Engine.from_variant(args.variant, base)
    alone = play_alone(engine, asks)
    (captured, captured_s, made), (plain, plain_s, _) = runs[True], runs[False]
    differ = divergences(captured, alone)
    print(json.dumps({
        "variant": args.variant.name, "provider": args.provider, "parallel": args.parallel,
        "requests": len(asks), "tokens": made,
        "captured_equals_uncaptured": captured == plain,
        "requests_differing_captured_vs_uncaptured": sum(a != b for a, b in zip(
            captured, plain, strict=True)),
        "tokens_per_s_captured": round(made / captured_s, 1),
        "tokens_per_s_uncaptured": round(made / plain_s, 1),
        "capture_speedup": round(plain_s / captured_s, 3),
        "one_slot_graph_capture": engine.runner.graph_capture,
        "requests_equal_to_one_slot": len(asks) - len(differ),
        "largest_margin_share_at_a_divergence": max(
            (d["margin_share_of_spread"] for d in differ), default=None),
        "divergences_from_one_slot": differ}, indent=2))


if __name__ == "__main__":
    run_main(main)
