"""Complete a prompt with a Llama 2 variant on ONNX Runtime, streaming the text to stdout.

    python MinimumExample/Example_ONNX_LlamaV2.py --prompt "What is the lightest element?"

Without --variant it uses the first variant that is checked out and pulled, else the small
demo variant shipped in the repository. --list shows every variant slot and its state.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama2_onnx import require_core_packages  # noqa: E402

require_core_packages()

from llama2_onnx.chat_format import PromptBuilder  # noqa: E402
from llama2_onnx.cli import (  # noqa: E402
    add_engine_args,
    add_sampling_args,
    check_engine_flags,
    open_engine_from_args,
    run_main,
    sampling_from_args,
    spell_both,
)
from llama2_onnx.errors import UserError  # noqa: E402
from llama2_onnx.generation import check_max_new_tokens  # noqa: E402
from llama2_onnx.tokenizer import check_text  # noqa: E402
from llama2_onnx.variants import DEMO_VARIANT, list_variants  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", help="text to complete (chat variants: your message)")
    parser.add_argument("--system", default=None, help="system prompt for chat variants")
    parser.add_argument("--max_gen_len", type=int, default=256, help="most tokens to generate")
    parser.add_argument("--list", action="store_true", help="list variant slots and exit")
    parser.add_argument("--stats", action="store_true",
                        help="print load time, time to first token and tokens/s to stderr")
    parser.add_argument("--verify", action="store_true", help="check sha256 of every file first")
    parser.add_argument("--onnx_file", help="original-style: path to the .onnx graph")
    parser.add_argument("--embedding_file", help="original-style: embeddings file")
    parser.add_argument("--tokenizer_path", help="original-style: tokenizer.model")
    add_engine_args(parser)
    add_sampling_args(parser)
    return spell_both(parser).parse_args(argv)


def print_variants() -> None:
    for v in list_variants(ROOT):
        hint = f"  ({v.hint})" if v.hint else ""
        print(f"{v.name:16s} {v.state}{hint}")


def complete(args: argparse.Namespace) -> None:
    if args.list:
        return print_variants()
    check_flags(args)
    settings = sampling_from_args(args)
    engine, load_s = open_engine_from_args(args, ROOT)
    prompt = prompt_tokens(engine, args)
    engine.check_fits(prompt)  # before printing anything
    chosen = "" if args.variant or args.onnx_file else " (the first ready variant; --variant " \
        "picks another, --list shows them)"
    print(f"[{engine.name} on {engine.runner.provider}]{chosen}", file=sys.stderr)
    if engine.name == DEMO_VARIANT:
        print("note: the demo is a 4.5 M-parameter model this project trained on the King James "
              "Bible, not Llama 2; README 'Exporting and publishing' makes a Llama 2 variant.",
              file=sys.stderr)
    if args.verify:
        print(f"note: every file of {engine.name} matches its manifest (sizes and sha256).",
              file=sys.stderr)
    for note in engine.notes:
        print(f"note: {note}", file=sys.stderr)
    if not engine.config.chat:
        print(args.prompt, end="", flush=True)
    for piece in engine.generate(prompt, settings, max_new_tokens=args.max_gen_len):
        print(piece, end="", flush=True)
    print()
    if engine.last_stats.stop_reason == "context full":
        print(f"note: stopped because the context ({engine.context_len} tokens) is full; "
              "raise --max_seq_len or shorten the prompt.", file=sys.stderr)
    if args.stats:
        print_stats(engine.last_stats, load_s)


def prompt_tokens(engine, args: argparse.Namespace) -> list[int]:
    """Chat variants get Llama-2-chat's format; base variants continue the text (after the
    system prompt, if one is given, as plain text): the chat app and the server build the
    same tokens for the same input."""
    builder = PromptBuilder(engine.tokenizer, chat=engine.config.chat)
    return builder.prompt(args.system or "", [], args.prompt)


def check_flags(args: argparse.Namespace) -> None:
    """Every flag that can be wrong is refused before the model is loaded."""
    if args.prompt is None or not args.prompt.strip():
        raise UserError("the prompt is empty; pass some text with --prompt \"...\".")
    for flag in ("prompt", "system"):
        check_text(getattr(args, flag) or "", f"--{flag}")
    check_max_new_tokens(args.max_gen_len, "--max_gen_len")
    check_engine_flags(args)


def print_stats(stats, load_s: float) -> None:
    print(f"load {load_s:.2f} s | time to first token {stats.ttft_s * 1000:.0f} ms | "
          f"prefill {stats.prefill_tok_s:.1f} tok/s ({stats.prefilled_tokens} tokens) | "
          f"decode {stats.decode_tok_s:.1f} tok/s ({stats.new_tokens} tokens) | "
          f"stop: {stats.stop_reason}", file=sys.stderr)


def main() -> None:
    args = parse_args()
    run_main(lambda: complete(args))


if __name__ == "__main__":
    main()
