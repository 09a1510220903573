"""Benchmarks that print JSON: export memory/time, and generation speed of a variant.

    python tools/benchmark.py export --hf /data/rand7b --precision float16 --out /data/out
    python tools/benchmark.py run --variant demo --provider cpu --prompt-tokens 128 --new-tokens 256
    python tools/benchmark.py export --hf /data/rand7b --precision int4 --out /data/out
    python tools/benchmark.py compare --variants out/r_float32,out/r_int4 --genai genai_int4

`export` runs the exporter in a child process and reports its peak resident memory (the
kernel's high-water mark for that process), wall time and bytes written. `run` reports load
time, time to first token, prefill and decode tokens/s, effective weight bandwidth (bytes of
weights read per decode step times decode tokens/s) and the host time per decode step spent
outside ONNX Runtime's Run (sampling, embedding lookup, binding, streaming text).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def bench_export(args: argparse.Namespace) -> dict:
    name = args.variant or f"bench_{args.precision}"
    source = ["--hf", str(args.hf)] if args.hf else ["--meta", str(args.meta)]
    cmd = [sys.executable, str(ROOT / "tools" / "export_and_publish.py"), "export", *source,
           "--precision", args.precision, "--variant", name, "--out", str(args.out),
           "--no-progress", "--force"] + (["--skip-verify"] if args.skip_verify else [])
    if args.tokenizer:
        cmd += ["--tokenizer", str(args.tokenizer)]
    if args.block_size:
        cmd += ["--block-size", str(args.block_size)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(done.stderr)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    written = folder_bytes(args.out / name)
    return {"command": " ".join(cmd), "wall_s": round(wall, 1),
            "peak_rss_gib": round(peak_kib / 2**20, 3), "bytes_written": written,
            "write_gb_per_s": round(written / wall / 1e9, 3)}


def bench_run(args: argparse.Namespace) -> dict:
    import numpy as np

    from llama2_onnx.generation import Engine
    from llama2_onnx.sampling import SamplingSettings
    from llama2_onnx.variants import resolve_variant

    start = time.perf_counter()
    engine = Engine.from_variant(resolve_variant(args.variant, ROOT), provider=args.provider,
                                 max_seq_len=args.max_seq_len, graph_capture=args.graph_capture)
    load_s = time.perf_counter() - start
    run_time = _time_session_runs(engine)
    rng = np.random.default_rng(0)
    prompt = [engine.tokenizer.bos_id] + rng.integers(
        3, engine.config.vocab_size, args.prompt_tokens - 1).tolist()
    settings = SamplingSettings(temperature=0)
    list(engine.generate(prompt[:8], settings, max_new_tokens=4))  # warm-up
    engine.reset()
    run_time["total"], run_time["calls"] = 0.0, 0
    text = list(engine.generate(prompt, settings, max_new_tokens=args.new_tokens,
                                ignore_eos=True))
    stats = engine.last_stats
    return _run_report(engine, args, load_s, stats, run_time, len(text))


def bench_compare(args: argparse.Namespace) -> dict:
    """Decode speed of several variants (and optionally an onnxruntime-genai model folder) on
    the same prompt, alternating runs in one process; medians over --reps."""
    import numpy as np

    from llama2_onnx.generation import Engine
    from llama2_onnx.sampling import SamplingSettings
    from llama2_onnx.variants import resolve_variant

    engines = {name: Engine.from_variant(resolve_variant(name, ROOT), provider=args.provider)
               for name in filter(None, args.variants.split(","))}
    rng = np.random.default_rng(0)  # the same prompt as `run`: BOS, then random token ids
    prompt = [1] + rng.integers(3, args.vocab_size, args.prompt_tokens - 1).tolist()
    runners = {name: _ours_runner(engine, SamplingSettings(temperature=0))
               for name, engine in engines.items()}
    if args.genai:
        runners["genai:" + args.genai.name] = _genai_runner(args.genai)
    for run in runners.values():  # warm-up
        run(prompt[:8], 4)
    speeds: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.reps):
        for name, run in runners.items():
            speeds[name].append(run(prompt, args.new_tokens))
    medians = {name: round(float(np.median(v)), 1) for name, v in speeds.items()}
    base = medians[next(iter(medians))]
    return {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "provider": args.provider, "reps": args.reps, "decode_tok_s": medians,
            "all_runs": speeds, "ratio_to_first": {k: round(v / base, 2)
                                                   for k, v in medians.items()}}


def _ours_runner(engine, settings):
    def run(prompt: list[int], new_tokens: int) -> float:
        engine.reset()
        list(engine.generate(prompt, settings, max_new_tokens=new_tokens, ignore_eos=True))
        return engine.last_stats.decode_tok_s
    return run


def _genai_runner(folder: Path):
    """Greedy decode with onnxruntime-genai (pip install onnxruntime-genai) on its own model."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))

    def run(prompt: list[int], new_tokens: int) -> float:
        params = og.GeneratorParams(model)
        total = len(prompt) + new_tokens
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        generator = og.Generator(model, params)
        generator.append_tokens(prompt)
        generator.generate_next_token()  # first token: from the prefill's logits
        start, steps = time.perf_counter(), 0
        while not generator.is_done():
            generator.generate_next_token()
            steps += 1
        return steps / (time.perf_counter() - start)
    return run


def _time_session_runs(engine) -> dict:
    """Wrap the session's run to measure time spent inside ONNX Runtime."""
    runtime, timing = engine.runner, {"total": 0.0, "calls": 0}
    owner, attr = (runtime, "_run") if hasattr(runtime, "_run") else (runtime.session, "run")
    original = getattr(owner, attr)

    def timed(*a, **k):
        t = time.perf_counter()
        out = original(*a, **k)
        timing["total"] += time.perf_counter() - t
        timing["calls"] += 1
        return out

    setattr(owner, attr, timed)
    return timing


def _run_report(engine, args, load_s, stats, run_time, pieces) -> dict:
    import numpy as np

    config = engine.config
    from llama2_onnx.config import NP_DTYPES

    # Weights read per decode step: the graph's (the embedding table stays outside).
    table = config.vocab_size * config.dim * np.dtype(NP_DTYPES[config.dtype]).itemsize
    weight_bytes = config.weight_bytes() - table
    decode_steps = max(stats.new_tokens - 1, 1)
    decode_run_s = run_time["total"] - stats.prefill_s
    overhead_us = (stats.decode_s - decode_run_s) / decode_steps * 1e6
    return {
        "variant": engine.name, "provider": engine.runner.provider, "dtype": config.dtype,
        "block_size": config.block_size, "graph_weight_gb": round(weight_bytes / 1e9, 3),
        "params_b": round(config.n_params() / 1e9, 3), "prompt_tokens": stats.prompt_tokens,
        "new_tokens": stats.new_tokens, "stop_reason": stats.stop_reason,
        "load_s": round(load_s, 2), "ttft_ms": round(stats.ttft_s * 1e3, 2),
        "prefill_tok_s": round(stats.prefill_tok_s, 1),
        "decode_tok_s": round(stats.decode_tok_s, 1),
        "weight_gb_per_s": round(weight_bytes * stats.decode_tok_s / 1e9, 1),
        "host_overhead_us_per_token": round(overhead_us, 1), "text_pieces": pieces,
        "graph_capture": args.graph_capture,
        "tokens_sha1": hashlib.sha1(str(stats.tokens).encode()).hexdigest()[:16],
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="peak RSS, wall time and bytes of an export")
    src = export.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", type=Path)
    src.add_argument("--meta", type=Path)
    export.add_argument("--tokenizer", type=Path)
    export.add_argument("--precision", choices=("float32", "float16", "int4"), default="float16")
    export.add_argument("--block-size", type=int, help="int4 only (default 32)")
    export.add_argument("--variant")
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--skip-verify", action="store_true")
    run = sub.add_parser("run", help="load time, TTFT, prefill/decode tok/s of a variant")
    run.add_argument("--variant", default=None)
    run.add_argument("--provider", default="auto")
    run.add_argument("--prompt-tokens", type=int, default=128)
    run.add_argument("--new-tokens", type=int, default=256)
    run.add_argument("--max_seq_len", type=int, default=None)
    run.add_argument("--graph-capture", action="store_true")
    compare = sub.add_parser("compare", help="decode tok/s of variants side by side")
    compare.add_argument("--variants", default="", help="comma-separated names or folders")
    compare.add_argument("--vocab-size", type=int, default=32000, help="for the random prompt")
    compare.add_argument("--genai", type=Path, help="an onnxruntime-genai model folder to add")
    compare.add_argument("--provider", default="cpu")
    compare.add_argument("--prompt-tokens", type=int, default=128)
    compare.add_argument("--new-tokens", type=int, default=128)
    compare.add_argument("--reps", type=int, default=3)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    commands = {"export": bench_export, "run": bench_run, "compare": bench_compare}
    result = commands[args.command](args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
