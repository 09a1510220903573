"""Write a seeded random Llama 2 checkpoint (Hugging Face or Meta format) with real model shapes.

    python tools/make_random_checkpoint.py --shape 7b --format hf --dtype float16 --out /data/rand7b

For export and runtime benchmarks without downloading weights: a Llama-2-7B-shaped float16
checkpoint is about 13.5 GB. A matching 32000-token tokenizer.model is written beside it.
--out must be a new or empty folder, or one this tool (or train_demo.py) wrote: a folder
holding anything else, a real download say, is refused, never overwritten.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama2_onnx.cli import run_main  # noqa: E402
from llama2_onnx.config import Config  # noqa: E402
from llama2_onnx.errors import UserError  # noqa: E402
from llama2_onnx.staging import claim_tool_out  # noqa: E402
from llama2_onnx.synthetic import (  # noqa: E402
    check_shards,
    checkpoint_files,
    write_hf,
    write_meta,
    write_tokenizer,
)

TOKENIZER = "tokenizer.model"

SHAPES = {
    "7b": Config(dim=4096, n_layers=32, n_heads=32, vocab_size=32000),
    "13b": Config(dim=5120, n_layers=40, n_heads=40, vocab_size=32000),
    "70b-2layers": Config(dim=8192, n_layers=2, n_heads=64, n_kv_heads=8, vocab_size=32000,
                          ffn_dim_multiplier=1.3, multiple_of=4096),
    "110m": Config(dim=768, n_layers=12, n_heads=12, vocab_size=32000),
    "small": Config(dim=512, n_layers=4, n_heads=8, vocab_size=32000),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sizes = ", ".join(f"{name} ({config.n_params() / 1e9:.2f} B parameters, "
                      f"{config.n_params() * 2 / 1e9:.1f} GB in float16)"
                      for name, config in SHAPES.items())
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small",
                        help=f"model shape (default small): {sizes}")
    parser.add_argument("--format", choices=("hf", "meta"), default="hf",
                        help="hf: config.json + safetensors; meta: params.json + "
                        "consolidated.NN.pth (default hf)")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                        help="stored dtype (Hugging Face format only; Meta is bfloat16)")
    parser.add_argument("--shards", type=int, default=2, help="number of weight files "
                        "(default 2; Hugging Face shards come with model.safetensors.index.json)")
    parser.add_argument("--seed", type=int, default=0, help="weights' seed (default 0)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write (new, empty, "
                        "or written by this tool before)")
    return parser.parse_args(argv)


def make_checkpoint(args: argparse.Namespace) -> int:
    """Check every argument, then write the checkpoint and its tokenizer into --out."""
    config = SHAPES[args.shape]
    if args.seed < 0:
        raise UserError(f"--seed {args.seed} must be 0 or more.")
    check_shards(config, args.format, args.shards)
    claim_tool_out(args.out, [*checkpoint_files(args.format, args.shards), TOKENIZER],
                   "tools/make_random_checkpoint.py")
    if args.format == "hf":
        write_hf(args.out, config, seed=args.seed, dtype=np.dtype(args.dtype), shards=args.shards)
    else:
        write_meta(args.out, config, seed=args.seed, shards=args.shards, bfloat16=True)
    write_tokenizer(args.out / TOKENIZER, config.vocab_size)
    print(f"wrote {args.out}: {config.n_params() / 1e9:.2f} B parameters")
    return 0


def main() -> None:
    args = parse_args()
    run_main(lambda: make_checkpoint(args))


if __name__ == "__main__":
    main()
