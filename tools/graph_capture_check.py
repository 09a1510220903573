"""Check on a GPU that graph capture changes no token: the same long chat with and without it.

    python tools/graph_capture_check.py --variant /data/out/rand7b_float16 --provider cuda

Plays one scripted chat twice through the chat session (the path the chat app and the server
use), once on an engine with the decode step captured as a CUDA graph and once without: many
turns until the cache is nearly full, history clipping, a regenerate, a removed turn, greedy and
seeded sampling with every filter. Prints JSON with the total tokens generated and whether every
answer's tokens were identical.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama2_onnx import chat_session as chat  # noqa: E402
from llama2_onnx.generation import Engine  # noqa: E402
from llama2_onnx.sampling import SamplingSettings  # noqa: E402

WORDS = "the a of and to in is was he she it they we you that for on with as his her".split()


def script(turns: int) -> list[tuple[str, str, SamplingSettings]]:
    """(action, user text, sampling) for each step of the chat."""
    steps = []
    for i in range(turns):
        user = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(10 + i % 13))
        sampling = SamplingSettings(temperature=0) if i % 3 else SamplingSettings(
            temperature=0.8, top_p=0.9, top_k=40, repetition_penalty=1.1, seed=i)
        steps.append(("respond", user, sampling))
        if i % 5 == 4:
            steps.append(("regenerate", "", sampling))
        if i % 7 == 6:
            steps.append(("remove", "", sampling))
    return steps


def play(engine: Engine, steps, max_new_tokens: int, history: int) -> tuple[list, int]:
    pool = chat.EnginePool(lambda _: engine)
    conv, answers, total = chat.Conversation(variant="v"), [], 0
    for action, user, sampling in steps:
        settings = chat.ChatSettings(sampling=sampling, max_new_tokens=max_new_tokens,
                                max_history_tokens=history)
        if action == "remove":
            chat.remove_last(conv)
            continue
        run = chat.respond(pool, conv, user, settings) if action == "respond" else chat.regenerate(
            pool, conv, settings)
        for _ in run:
            pass
        tokens = list(engine.last_stats.tokens)
        answers.append(tokens)
        total += len(tokens)
    return answers, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", type=Path, required=True, help="variant folder")
    parser.add_argument("--provider", default="cuda", help="cuda or dml")
    parser.add_argument("--turns", type=int, default=40, help="user turns in the chat")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="tokens per answer")
    parser.add_argument("--max-seq-len", type=int, default=1024,
                        help="context (small, so the chat fills it and clips its history)")
    args = parser.parse_args()
    steps = script(args.turns)
    results = {}
    for capture in (False, True):
        engine = Engine.from_variant(args.variant, provider=args.provider,
                                     max_seq_len=args.max_seq_len, graph_capture=capture)
        start = time.perf_counter()
        results[capture] = play(engine, steps, args.max_new_tokens, args.max_seq_len)
        results[capture] += (round(time.perf_counter() - start, 1),)
        del engine
    (plain, total, plain_s), (captured, _, captured_s) = results[False], results[True]
    first_diff = next((i for i, (a, b) in enumerate(zip(plain, captured, strict=True))
                       if a != b), None)
    print(json.dumps({"variant": args.variant.name, "provider": args.provider,
                      "answers": len(plain), "tokens_generated": total,
                      "identical": first_diff is None, "first_differing_answer": first_diff,
                      "seconds_without_capture": plain_s, "seconds_with_capture": captured_s},
                     indent=2))


if __name__ == "__main__":
    main()
