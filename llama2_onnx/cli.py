"""Pieces shared by the command-line entry points: flags, error reporting, engine opening."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .checkpoints import HF_CONFIG, META_PARAMS
from .errors import UserError
from .placement import PROVIDER_CHOICES, RunOptions
from .sampling import SamplingSettings
from .variant_folder import TOKENIZER


def run_main(func: Callable[[], int | None]) -> None:
    """Run `func`; a UserError becomes one line on stderr and exit code 2, never a traceback."""
    try:
        code = func()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP turned into Interrupted
        raise SystemExit(128 + getattr(exc, "signum", 2)) from None
    raise SystemExit(code or 0)


def spell_both(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Accept every long flag with dashes and with underscores (`--max-seq-len` and
    `--max_seq_len`, as the original Llama-2-Onnx example spelled them); `--help` shows the
    dashed form only. Applies to subcommands too."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                spell_both(sub)
            continue
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs:
            continue
        shorts = [o for o in action.option_strings if not o.startswith("--")]
        canonical = "--" + longs[0][2:].replace("_", "-")
        action.option_strings = shorts + [canonical]
        for option in longs:
            for spelling in (option, "--" + option[2:].replace("_", "-"),
                             "--" + option[2:].replace("-", "_")):
                parser._option_string_actions[spelling] = action
    return parser


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    """--hf / --meta / --gguf (exactly one) and --tokenizer: where an export reads its
    weights."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", type=Path, help=f"Hugging Face folder ({HF_CONFIG} + safetensors)")
    src.add_argument("--meta", type=Path, help=f"Meta folder ({META_PARAMS} + consolidated.NN.pth)")
    src.add_argument("--gguf", type=Path, help="GGUF file (llama.cpp's format; its tokenizer "
                     "and chat template come with it)")
    parser.add_argument("--tokenizer", type=Path, help=f"{TOKENIZER} (default: beside the "
                        "checkpoint or in its parent folder)")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", help="variant name (a folder in the repository) or path; "
                        "default: the first ready variant, else the demo variant")
    parser.add_argument("--provider", choices=PROVIDER_CHOICES, default="auto",
                        help="execution provider (auto: DirectML, then CUDA, then WebGPU, "
                        "then CPU: the first installed)")
    parser.add_argument("--max_seq_len", "--max-seq-len", type=int, default=None,
                        help="context length to allocate the KV cache for (default: the model's)")
    capture = parser.add_mutually_exclusive_group()
    capture.add_argument("--graph_capture", "--graph-capture", action="store_const", const=True,
                         default="auto",
                         help="capture the decode step as a GPU graph (default: on with CUDA "
                         "and WebGPU)")
    capture.add_argument("--no_graph_capture", "--no-graph-capture", action="store_const",
                         const=False, dest="graph_capture",
                         help="run decode steps without graph capture")
    parser.add_argument("--parallel", type=parallel_count, default=1,
                        help="requests held in the KV cache and decoded together, on the CPU or "
                        "CUDA (slots; the cache grows N times; 1: one at a time, the default "
                        "except for tools/serve.py, whose default is auto: on CUDA as many as "
                        "half the free GPU memory holds, at most 16, one elsewhere)")


def parallel_count(text: str) -> int | str:
    """--parallel N or auto; anything else is kept for RunOptions to refuse in one sentence."""
    return int(text) if text.strip().lstrip("-").isdigit() else text


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    d = SamplingSettings()
    parser.add_argument("--temperature", type=float, default=d.temperature,
                        help=f"0 for greedy decoding (default {d.temperature})")
    parser.add_argument("--top_p", type=float, default=d.top_p, help=f"default {d.top_p}")
    parser.add_argument("--top_k", type=int, default=d.top_k, help="0 disables (default)")
    parser.add_argument("--repetition_penalty", type=float, default=None,
                        help="penalty on the last 64 tokens; 1.0 disables (default: 1.1 when "
                        "sampling, 1.0 with --temperature 0)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


def check_engine_flags(args: argparse.Namespace) -> None:
    """Flags of add_engine_args that can be refused without loading anything."""
    run_options_from_args(args)


def sampling_from_args(args: argparse.Namespace) -> SamplingSettings:
    return SamplingSettings(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            repetition_penalty=args.repetition_penalty, seed=args.seed)


def run_options_from_args(args: argparse.Namespace) -> RunOptions:
    """The flags of add_engine_args as one value, checked (RunOptions refuses bad values); a
    tool that offers only some of them gets the defaults for the rest."""
    return RunOptions(provider=getattr(args, "provider", "auto"),
                      max_seq_len=getattr(args, "max_seq_len", None),
                      graph_capture=getattr(args, "graph_capture", "auto"),
                      verify=getattr(args, "verify", False),
                      parallel=getattr(args, "parallel", 1))


def open_engine_from_args(args: argparse.Namespace, root: Path):
    """Open the engine named by --variant or by the original --onnx_file style flags.

    Returns:
        (engine, seconds it took to load).
    """
    from .generation import Engine
    from .loading import open_explicit
    from .variants import resolve_variant

    options = run_options_from_args(args)
    start = time.perf_counter()
    if getattr(args, "onnx_file", None):
        engine = Engine.from_parts(open_explicit(
            Path(args.onnx_file), args.embedding_file, args.tokenizer_path, options))
    else:
        engine = Engine.from_variant(resolve_variant(args.variant, root), options)
    return engine, time.perf_counter() - start
