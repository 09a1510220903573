"""Perplexity of a variant over a text file, printed as one JSON line.

    python tools/evaluate.py --variant demo --text kjv.txt --max-tokens 20000
    python tools/evaluate.py --variant 7B_int4 --text wiki.test.raw --provider cuda

The text is tokenized as one document (BOS first) and scored in sliding windows of the
variant's context (or --max-seq-len), each starting half a window after the previous one, so
every token after the first is predicted once with at least half a window of context.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama2_onnx import require_core_packages  # noqa: E402

require_core_packages()

from llama2_onnx.cli import check_engine_flags, run_main, run_options_from_args, spell_both  # noqa: E402
from llama2_onnx.errors import UserError  # noqa: E402
from llama2_onnx.placement import PROVIDER_CHOICES  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--variant", required=True, help="variant name or folder")
    parser.add_argument("--text", type=Path, required=True, help="UTF-8 text file")
    parser.add_argument("--max-tokens", type=int, help="score only the first N tokens")
    parser.add_argument("--provider", choices=PROVIDER_CHOICES, default="auto",
                        help="execution provider (default auto: DirectML, then CUDA, then CPU)")
    parser.add_argument("--max_seq_len", type=int, help="window (default: the context)")
    return spell_both(parser).parse_args()


def evaluate(args: argparse.Namespace) -> int:
    from llama2_onnx.evaluate import perplexity
    from llama2_onnx.generation import Engine
    from llama2_onnx.variants import resolve_variant

    if args.max_tokens is not None and args.max_tokens < 2:
        raise UserError(f"--max-tokens {args.max_tokens} must be at least 2.")
    check_engine_flags(args)
    text = read_text(args.text)  # before loading anything
    folder = resolve_variant(args.variant, ROOT)
    engine = Engine.from_variant(folder, run_options_from_args(args))
    tokens = engine.tokenizer.encode(text)  # BOS first
    tokens = tokens[:args.max_tokens]
    start = time.perf_counter()
    result = perplexity(engine, tokens)
    config = engine.config
    print(json.dumps({
        "perplexity": round(result.perplexity, 4), "tokens": result.tokens,
        "variant": engine.name, "provider": engine.runner.provider, "dtype": config.dtype,
        "block_size": config.block_size, "window": result.window, "stride": result.stride,
        "seconds": round(time.perf_counter() - start, 1)}))
    return 0


def read_text(path: Path) -> str:
    """The text to score; refuses a missing, binary or empty file in one sentence."""
    from llama2_onnx.files import read_user_text

    text = read_user_text(path, "--text", "pass a UTF-8 text file")
    if not text.strip():
        raise UserError(f"--text {path} is empty; pass a text of at least a few words.")
    return text


if __name__ == "__main__":
    run_main(lambda: evaluate(parse_args()))
