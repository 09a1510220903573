"""Benchmarks that print JSON: export memory/time, and generation speed of a variant.

    python tools/benchmark.py export --hf /data/rand7b --precision float16 --out /data/out
    python tools/benchmark.py run --variant demo --provider cpu --prompt-tokens 128 --new-tokens 256
    python tools/benchmark.py export --hf /data/rand7b --precision int4 --out /data/out
    python tools/benchmark.py compare --variants out/r_float32,out/r_int4 --genai genai_int4
    python tools/benchmark.py serve --variant demo --provider cpu --clients 1,4,16
    python tools/benchmark.py serve --variant demo --provider cpu --clients 1,4,16 --parallel 4

`export` runs the exporter in a child process and reports its peak resident memory (the
kernel's high-water mark for that process), wall time and bytes written. `run` reports load
time, time to first token, prefill and decode tokens/s, effective weight bandwidth (bytes of
weights read per decode step times decode tokens/s) and the host time per decode step spent
outside ONNX Runtime's Run (sampling, embedding lookup, binding, streaming text). `serve` starts
tools/serve.py (with --parallel N slots) and reports, for each number of concurrent streaming
clients, requests/s, time to first token and tokens/s, then what prefix reuse saves on a
follow-up chat request.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama2_onnx.cli import add_checkpoint_args, run_main  # noqa: E402
from llama2_onnx.errors import UserError, is_whole_number  # noqa: E402
from llama2_onnx.placement import PROVIDER_CHOICES  # noqa: E402

PROVIDERS_HELP = ", ".join(PROVIDER_CHOICES)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def bench_export(args: argparse.Namespace) -> dict:
    name = f"bench_{args.precision}" if args.variant is None else args.variant
    source = ["--hf", str(args.hf)] if args.hf else ["--meta", str(args.meta)]
    cmd = [sys.executable, str(ROOT / "tools" / "export_and_publish.py"), "export", *source,
           "--precision", args.precision, "--variant", name, "--out", str(args.out),
           "--no-progress", "--force"] + (["--skip-verify"] if args.skip_verify else [])
    if args.tokenizer:
        cmd += ["--tokenizer", str(args.tokenizer)]
    if args.block_size is not None:  # passed on as given: the exporter refuses a bad one
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


def open_engine(args: argparse.Namespace):
    from llama2_onnx.generation import Engine
    from llama2_onnx.variants import resolve_variant

    chunk = "auto" if args.prefill_chunk is None else (args.prefill_chunk or None)
    return Engine.from_variant(resolve_variant(args.variant, ROOT), provider=args.provider,
                               max_seq_len=args.max_seq_len, graph_capture=args.graph_capture,
                               prefill_chunk=chunk)


def random_prompt(engine, length: int, seed: int = 0) -> list[int]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return engine.tokenizer.encode("", bos=True) + rng.integers(3, engine.config.vocab_size,
                                                    length - 1).tolist()


def bench_run(args: argparse.Namespace) -> dict:
    """Median of --reps generations after one warm-up generation at the same lengths."""
    import statistics

    from llama2_onnx.sampling import SamplingSettings

    start = time.perf_counter()
    engine = open_engine(args)
    load_s = time.perf_counter() - start
    run_time = _time_session_runs(engine)
    prompt = random_prompt(engine, args.prompt_tokens)
    settings = SamplingSettings(temperature=0)
    reports = []
    for rep in range(args.reps + 1):
        engine.reset()
        run_time["total"], run_time["calls"] = 0.0, 0
        text = list(engine.generate(prompt, settings, max_new_tokens=args.new_tokens,
                                    ignore_eos=True))
        if rep:  # the first run warms up
            reports.append(_run_report(engine, args, load_s, engine.last_stats, run_time,
                                       len(text)))
    median = dict(reports[len(reports) // 2])
    for key in ("ttft_ms", "prefill_tok_s", "decode_tok_s", "weight_gb_per_s",
                "host_overhead_us_per_token"):
        median[key] = statistics.median(r[key] for r in reports)
        median[key + "_all"] = [r[key] for r in reports]
    median["reps"] = args.reps
    median["gpu_memory_mib"] = gpu_memory_mib()
    median["gpu_memory_used_total_mib"] = gpu_memory_used_total_mib()
    if args.compare_genai:
        median["genai"] = bench_genai(args, prompt)
        median["ratio_decode_vs_genai"] = round(
            median["decode_tok_s"] / median["genai"]["decode_tok_s"], 3)
    return median


def gpu_memory_mib(pid: int | None = None) -> int | None:
    """GPU memory this process (or `pid`) holds, from nvidia-smi (None without it)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    pid_asked = pid
    for line in out.splitlines():
        pid, used = (x.strip() for x in line.split(","))
        if pid == str(os.getpid() if pid_asked is None else pid_asked):
            return int(used)
    return None


def gpu_memory_used_total_mib() -> int | None:
    """The GPU's used memory, all processes (nvidia-smi; None without it). A WebGPU (Vulkan)
    process is not always listed among nvidia-smi's compute apps, so gpu_memory_mib misses it."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=20).stdout
        return int(out.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def bench_genai(args: argparse.Namespace, prompt: list[int]) -> dict:
    """onnxruntime-genai on its own model of the same weights: same prompt, greedy, median."""
    import statistics

    import onnxruntime_genai as og

    model = og.Model(str(args.compare_genai))
    runs = []
    for rep in range(args.reps + 1):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + args.new_tokens, do_sample=False)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(prompt)
        generator.generate_next_token()
        first = time.perf_counter()
        steps = 0
        while not generator.is_done() and steps < args.new_tokens - 1:
            generator.generate_next_token()
            steps += 1
        end = time.perf_counter()
        if rep:
            runs.append({"ttft_ms": (first - start) * 1e3, "decode_tok_s": steps / (end - first)})
        del generator
    return {key: round(statistics.median(r[key] for r in runs), 2) for key in runs[0]} | {
        "decode_tok_s_all": [round(r["decode_tok_s"], 1) for r in runs]}


def bench_load(args: argparse.Namespace) -> dict:
    """Load time and decode speed at each ONNX Runtime optimization level:
    what the first start costs, and what the optimizations buy once the model is loaded."""
    import onnxruntime as ort

    from llama2_onnx import session
    from llama2_onnx.sampling import SamplingSettings

    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    original, rows = session.session_options, []
    for name in args.levels.split(","):
        def options(*a, _level=levels[name], **k):
            so = original(*a, **k)
            so.graph_optimization_level = _level
            return so

        session.session_options = options
        start = time.perf_counter()
        engine = open_engine(args)
        load_s = time.perf_counter() - start
        prompt = random_prompt(engine, 128)
        settings = SamplingSettings(temperature=0)
        for _ in range(2):
            engine.reset()
            list(engine.generate(prompt, settings, max_new_tokens=128, ignore_eos=True))
        rows.append({"level": name, "load_s": round(load_s, 2),
                     "decode_tok_s": round(engine.last_stats.decode_tok_s, 1),
                     "ttft_ms": round(engine.last_stats.ttft_s * 1e3, 2)})
        del engine
    session.session_options = original
    return {"variant": args.variant, "provider": args.provider, "levels": rows}


def bench_startup(args: argparse.Namespace) -> dict:
    """A user's first run, as a whole script in a fresh process: import, load the variant,
    then one prefill per length in --lengths (each new to the process). With --compare-genai,
    onnxruntime-genai does the same on its model; the two alternate for --reps rounds."""
    from llama2_onnx.variants import resolve_variant

    lengths = [int(x) for x in args.lengths.split(",")]
    prompt = "[1] + [100 + i % 1000 for i in range(n - 1)]"
    scripts = {"ours": (
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "from llama2_onnx.generation import Engine\n"
        f"e = Engine.from_variant({str(resolve_variant(args.variant, ROOT))!r}, "
        f"provider={args.provider!r})\n"
        f"for n in {lengths!r}:\n    e.reset(); e.prefill({prompt})\n")}
    if args.compare_genai:
        scripts["genai"] = (
            "import onnxruntime_genai as og\n"
            f"m = og.Model({str(args.compare_genai)!r})\n"
            f"for n in {lengths!r}:\n"
            "    p = og.GeneratorParams(m); p.set_search_options(max_length=n + 1)\n"
            f"    og.Generator(m, p).append_tokens({prompt})\n")
    seconds: dict[str, list[float]] = {name: [] for name in scripts}
    for _ in range(args.reps):
        for name, code in scripts.items():
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
            seconds[name].append(round(time.perf_counter() - start, 2))
    result = {"variant": args.variant, "provider": args.provider, "lengths": lengths,
              "seconds": seconds,
              "median_s": {k: round(statistics.median(v), 2) for k, v in seconds.items()}}
    if args.compare_genai:
        result["ratio_vs_genai"] = round(result["median_s"]["ours"] / result["median_s"]["genai"],
                                         2)
    return result


def bench_ttft(args: argparse.Namespace) -> dict:
    """First-token time for each prompt length the first time it is seen, then again."""
    start = time.perf_counter()
    engine = open_engine(args)
    load_s = time.perf_counter() - start
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        prompt, times = random_prompt(engine, length, seed=length), []
        for _ in range(2):
            engine.reset()
            t = time.perf_counter()
            logits = engine.prefill(prompt)
            int(logits.argmax())
            times.append(round((time.perf_counter() - t) * 1e3, 2))
        rows.append({"length": length, "first_ms": times[0], "again_ms": times[1]})
    return {"variant": engine.name, "provider": engine.runner.provider, "load_s": round(load_s, 2),
            "prefill_lengths": engine.runner.prefill_lengths(), "ttft": rows}


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
        "graph_capture": engine.runner.graph_capture,
        "tokens_sha1": hashlib.sha1(str(stats.tokens).encode()).hexdigest()[:16],
    }


SERVE_WORDS = ("LORD", "king", "people", "prophet", "priest", "servant", "son", "elders")


def bench_serve(args: argparse.Namespace) -> dict:
    """One server per --parallel value, in turn; with several values, also how many greedy
    answers of each equal the first value's (the same prompts at each level)."""
    reports = [_serve_once(args, parallel) for parallel in args.parallel]
    if len(reports) == 1:
        return reports[0]
    tokenizer = _serve_tokenizer(args)
    base = reports[0]
    for report in reports[1:]:
        report["answers_vs_first"] = _agreement(base["answers"], report["answers"], tokenizer)
    for report in reports:
        report.pop("answers")
    return {"parallel": args.parallel, "runs": reports,
            "vs_first": {r["parallel"]: _speedups(base, r) for r in reports[1:]}}


def _serve_once(args: argparse.Namespace, parallel: int) -> dict:
    cmd = [sys.executable, str(ROOT / "tools" / "serve.py"), "--port", "0", "--provider",
           args.provider, "--max-queue", "128", "--parallel", str(parallel)] + (
        ["--variant", args.variant] if args.variant else []) + (
        ["--max-seq-len", str(args.max_seq_len)] if args.max_seq_len else []) + (
        [] if args.graph_capture == "auto" else
        ["--graph-capture" if args.graph_capture else "--no-graph-capture"])
    server = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        seen = []  # the server's notes and warnings before its "serving" line
        while not (found := re.search(r"serving (\S+) .* at (http://\S+)/v1",
                                      line := server.stderr.readline())):
            seen.append(line)
            if not line:  # the server ended
                raise SystemExit("".join(seen))
        threading.Thread(target=server.stderr.read, daemon=True).start()  # keep the pipe empty
        model, url = found.groups()
        _wait_for_health(url, server)
        _stream_chat(url, model, [{"role": "user", "content": "warm up"}], 8)
        words = _prompt_words(url, model, args.prompt_tokens) if args.prompt_tokens else None
        answers: dict[str, str] = {}
        levels = [_serve_level(url, model, n, args, words, answers) for n in args.clients]
        memory = {"gpu_memory_server_mib": gpu_memory_mib(server.pid),
                  "gpu_memory_used_total_mib": gpu_memory_used_total_mib()}
        return {"command": " ".join(cmd), "model": model, "parallel": parallel,
                "max_tokens": args.new_tokens, "prompt_words": words,
                "requests_per_client": args.requests_per_client, "levels": levels,
                "prefix_reuse": _prefix_reuse(url, model), **memory, "answers": answers}
    finally:
        server.terminate()
        server.wait(30)


def _serve_tokenizer(args: argparse.Namespace):
    """The variant's tokenizer, to count the tokens two answers share (None if not found)."""
    try:
        from llama2_onnx.tokenizer import Tokenizer
        from llama2_onnx.variant_folder import TOKENIZER
        from llama2_onnx.variants import resolve_variant

        return Tokenizer.from_file(resolve_variant(args.variant, ROOT) / TOKENIZER)
    except Exception:  # noqa: BLE001  # the comparison then counts characters only
        return None


def _agreement(base: dict[str, str], other: dict[str, str], tokenizer) -> dict:
    """How many answers equal the base's; for the others, where they first differ (characters,
    and about how many tokens of the answer came before: the shared text, encoded)."""
    keys = sorted(set(base) & set(other))
    differ = [k for k in keys if base[k] != other[k]]
    first = []
    for key in differ:
        shared = len(os.path.commonprefix([base[key], other[key]]))
        tokens = None if tokenizer is None else len(tokenizer.encode(base[key][:shared], bos=False,
                                                                     eos=False))
        first.append({"request": key, "chars_equal": shared, "tokens_equal_about": tokens})
    first.sort(key=lambda d: d["chars_equal"])
    return {"requests": len(keys), "equal": len(keys) - len(differ),
            "share_equal": round((len(keys) - len(differ)) / max(len(keys), 1), 3),
            "first_divergences": first[:8]}


def _speedups(base: dict, run: dict) -> list[dict]:
    """Per level, total tokens/s and median first token against the first --parallel value."""
    rows = []
    for a, b in zip(base["levels"], run["levels"], strict=True):
        rows.append({"clients": b["clients"],
                     "tokens_per_s_total_ratio": round(b["tokens_per_s_total"]
                                                       / a["tokens_per_s_total"], 2),
                     "ttft_ms_median": b["ttft_ms_median"],
                     "slowest_stream_vs_single": round(
                         b["tokens_per_s_slowest_stream"]
                         / run["levels"][0]["tokens_per_s_per_stream"], 2)})
    return rows


def _prompt_words(url: str, model: str, tokens: int) -> int:
    """How many filler words make a chat prompt of about `tokens` tokens (two requests measure
    this tokenizer's tokens per word)."""
    def count(words: int) -> int:
        text = _prompt_text(0, 0, words)
        return _stream_chat(url, model, [{"role": "user", "content": text}], 1)["prompt_tokens"]

    low, high = count(8), count(72)
    per_word = max((high - low) / 64, 1e-3)
    return max(1, round(8 + (tokens - low) / per_word))


def _prompt_text(index: int, k: int, words: int | None) -> str:
    head = f"And the {SERVE_WORDS[(index + k) % len(SERVE_WORDS)]} said unto them ({index}, {k})"
    if words is None:
        return head
    filler = [SERVE_WORDS[(index * 7 + k * 3 + j * (1 + index % 5)) % len(SERVE_WORDS)]
              for j in range(words)]
    return head + " " + " ".join(filler)


def _wait_for_health(url: str, server: subprocess.Popen, seconds: float = 60) -> None:
    """Return once GET /health answers 200: the server accepts requests."""
    import urllib.request

    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server at {url} did not answer /health within {seconds:g} s.")
        time.sleep(0.1)


def _serve_level(url: str, model: str, clients: int, args: argparse.Namespace,
                 words: int | None = None, answers: dict[str, str] | None = None) -> dict:
    """`clients` threads, each sending `requests_per_client` streamed chat requests in turn."""
    results: list[dict] = []

    def client(index: int) -> None:
        for k in range(args.requests_per_client):
            text = _prompt_text(index, k, words)
            result = _stream_chat(url, model, [{"role": "user", "content": text}],
                                  args.new_tokens)
            results.append(result)
            if answers is not None:
                answers[f"{clients}/{index}/{k}"] = result["text"]

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttft = sorted(r["ttft_s"] for r in results)
    tokens = sum(r["completion_tokens"] for r in results)
    rates = [r["completion_tokens"] / r["stream_s"] for r in results]
    return {"clients": clients, "requests": len(results), "wall_s": round(wall, 2),
            "requests_per_s": round(len(results) / wall, 2),
            "prompt_tokens_median": statistics.median(r["prompt_tokens"] for r in results),
            "ttft_ms_median": round(statistics.median(ttft) * 1e3, 1),
            "ttft_ms_p90": round(ttft[int(0.9 * (len(ttft) - 1))] * 1e3, 1),
            "tokens_per_s_total": round(tokens / wall, 1),
            "tokens_per_s_per_stream": round(statistics.median(rates), 1),
            "tokens_per_s_slowest_stream": round(min(rates), 1)}


def _prefix_reuse(url: str, model: str) -> dict:
    """A four-turn chat's last request, right after its third turn (warm) and after an
    unrelated request (cold): prompt tokens pre-filled and time to first token."""
    messages: list[dict] = []
    for text in ("In the beginning", "And the earth", "And God said"):
        messages.append({"role": "user", "content": text})
        answer = _stream_chat(url, model, messages, 64)
        messages.append({"role": "assistant", "content": answer["text"]})
    messages.append({"role": "user", "content": "And the evening"})
    warm = _stream_chat(url, model, messages, 8)
    _stream_chat(url, model, [{"role": "user", "content": "Unrelated"}], 8)
    cold = _stream_chat(url, model, messages, 8)
    return {phase: {"prompt_tokens": r["prompt_tokens"],
                    "prefilled_tokens": r["prompt_tokens"] - r["cached_tokens"],
                    "ttft_ms": round(r["ttft_s"] * 1e3, 2)}
            for phase, r in (("warm", warm), ("cold", cold))}


def _stream_chat(url: str, model: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed greedy chat request: its text, time to first text, duration and usage."""
    import http.client

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json"})
    reply, pieces, first, usage = conn.getresponse(), [], None, {}
    for line in reply:
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        usage = chunk.get("usage") or usage
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            first = first or time.perf_counter()
            pieces.append(chunk["choices"][0]["delta"]["content"])
    end = time.perf_counter()
    conn.close()
    first = first or end
    return {"text": "".join(pieces), "ttft_s": first - start, "stream_s": max(end - first, 1e-9),
            "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"],
            "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="peak RSS, wall time and bytes of an export")
    add_checkpoint_args(export)
    export.add_argument("--precision", choices=("float32", "float16", "int4"),
                        default="float16", help="variant precision (default float16)")
    export.add_argument("--block-size", type=int, help="int4 only (default 32)")
    export.add_argument("--variant", help="variant name (default bench_<precision>)")
    export.add_argument("--out", type=Path, required=True, help="folder to export into")
    export.add_argument("--skip-verify", action="store_true", help="skip the reference check")
    run = sub.add_parser("run", help="load time, TTFT, prefill/decode tok/s of a variant")
    add_engine_options(run)
    run.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default 128)")
    run.add_argument("--new-tokens", type=int, default=256, help="greedy tokens (default 256)")
    run.add_argument("--reps", type=int, default=3, help="measured runs after one warm-up; the "
                     "median is reported (default 3)")
    run.add_argument("--compare-genai", type=Path, metavar="DIR", help="also run "
                     "onnxruntime-genai on its model in DIR (same weights) and report the ratio")
    ttft = sub.add_parser("ttft", help="first-token time per prompt length, first seen and again")
    add_engine_options(ttft)
    ttft.add_argument("--lengths", default="128,100,200,300,400,512,1000,1500",
                      help="comma-separated prompt lengths, in the order they are tried")
    load = sub.add_parser("load", help="load time and decode speed per optimization level")
    add_engine_options(load)
    load.add_argument("--levels", default="disable,basic,extended,all",
                      help="comma-separated ONNX Runtime optimization levels to try")
    startup = sub.add_parser("startup", help="a fresh process: import, load, a prefill per "
                             "length; optionally onnxruntime-genai's too")
    startup.add_argument("--variant", default=None, help="variant name or folder")
    startup.add_argument("--provider", default="auto", choices=PROVIDER_CHOICES,
                         help=PROVIDERS_HELP)
    startup.add_argument("--lengths", default="100,200,300,400,500,600,700,800,900,1000,1100",
                         help="prompt lengths pre-filled after loading (default: 11 lengths)")
    startup.add_argument("--reps", type=int, default=2, help="alternating rounds (default 2)")
    startup.add_argument("--compare-genai", type=Path, metavar="DIR",
                         help="onnxruntime-genai model folder of the same weights")
    compare = sub.add_parser("compare", help="decode tok/s of variants side by side")
    compare.add_argument("--variants", default="", help="comma-separated names or folders")
    compare.add_argument("--vocab-size", type=int, default=32000, help="for the random prompt")
    compare.add_argument("--genai", type=Path, help="an onnxruntime-genai model folder to add")
    compare.add_argument("--provider", default="cpu", choices=PROVIDER_CHOICES,
                         help=PROVIDERS_HELP + " (default cpu)")
    compare.add_argument("--prompt-tokens", type=int, default=128,
                         help="prompt length (default 128)")
    compare.add_argument("--new-tokens", type=int, default=128,
                         help="greedy tokens per run (default 128)")
    compare.add_argument("--reps", type=int, default=3,
                         help="alternating rounds; the median is reported (default 3)")
    serve = sub.add_parser("serve", help="requests/s, TTFT and tokens/s of tools/serve.py")
    serve.add_argument("--variant", default=None, help="variant name or folder (default: the "
                       "first ready variant, else the demo)")
    serve.add_argument("--provider", default="cpu", choices=PROVIDER_CHOICES,
                       help=PROVIDERS_HELP + " (default cpu)")
    serve.add_argument("--clients", type=lambda s: [int(n) for n in s.split(",")],
                       default=[1, 4, 16], help="concurrency levels (default 1,4,16)")
    serve.add_argument("--requests-per-client", type=int, default=4,
                       help="streamed requests each client sends in turn (default 4)")
    serve.add_argument("--new-tokens", type=int, default=128, help="max_tokens per request")
    serve.add_argument("--parallel", type=_whole_numbers, default=[1],
                       help="the server's slots, requests decoded together (default 1); "
                       "several, comma-separated: one server each, in turn, and how many "
                       "greedy answers equal the first's")
    serve.add_argument("--prompt-tokens", type=int, default=None, help="about this many prompt "
                       "tokens per request (default: a short sentence)")
    serve.add_argument("--max-seq-len", "--max_seq_len", type=int, default=None,
                       help="the server's context (default: the model's)")
    add_capture_options(serve)
    return parser.parse_args()


def _whole_numbers(text: str) -> list[int]:
    """'1,16,64' -> [1, 16, 64]; a bad item is kept as text for check_args to refuse."""
    return [int(n) if n.strip().isdigit() else n for n in text.split(",")]


def add_capture_options(parser: argparse.ArgumentParser) -> None:
    capture = parser.add_mutually_exclusive_group()
    capture.add_argument("--graph-capture", "--graph_capture", action="store_const", const=True,
                         default="auto", help="capture the decode step as a GPU graph "
                         "(default: the provider's default, on for CUDA and WebGPU)")
    capture.add_argument("--no-graph-capture", "--no_graph_capture", action="store_const",
                         const=False, dest="graph_capture", help="no graph capture")


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", default=None, help="variant name or folder (default: the "
                        "first ready variant, else the demo)")
    parser.add_argument("--provider", default="auto", choices=PROVIDER_CHOICES,
                        help=PROVIDERS_HELP)
    parser.add_argument("--max_seq_len", "--max-seq-len", type=int, default=None,
                        help="context to allocate (default: the model's)")
    add_capture_options(parser)
    parser.add_argument("--prefill-chunk", "--prefill_chunk", type=int, default=None,
                        help="longest prefill chunk (power of two); 0: whole prompts; default: "
                        "the provider's")


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad counts and lists before anything loads (one sentence each, exit code 2)."""
    for name in ("prompt_tokens", "new_tokens", "reps", "requests_per_client", "vocab_size",
                 "parallel"):
        values = getattr(args, name, None)
        for value in values if isinstance(values, list) else [values]:
            if value is not None and not is_whole_number(value):
                raise UserError(f"--{name.replace('_', '-')} {value} is invalid; use a whole "
                                "number of at least 1.")
    if getattr(args, "prompt_tokens", None) is not None and args.prompt_tokens < 2 \
            and args.command == "compare":
        raise UserError("--prompt-tokens must be at least 2 for compare (BOS and one token).")
    lengths = getattr(args, "lengths", None)
    if lengths is not None and not re.fullmatch(r"[1-9]\d*(,[1-9]\d*)*", lengths):
        raise UserError(f"--lengths {lengths!r} is invalid; give prompt lengths of at least 1 "
                        "separated by commas, e.g. 128,512,1000.")
    if args.command == "compare" and not any(args.variants.split(",")) and not args.genai:
        raise UserError("--variants is empty; name the variants to compare, separated by "
                        "commas (e.g. --variants demo,/data/out/r_int4).")
    if args.command == "serve" and not all(n >= 1 for n in args.clients):
        raise UserError(f"--clients {args.clients} is invalid; give concurrency levels of at "
                        "least 1, e.g. 1,4,16.")


def main() -> None:
    args = parse_args()
    commands = {"export": bench_export, "run": bench_run, "ttft": bench_ttft,
                "load": bench_load, "startup": bench_startup, "compare": bench_compare,
                "serve": bench_serve}

    def run() -> None:
        check_args(args)
        print(json.dumps(commands[args.command](args), indent=2))

    run_main(run)


if __name__ == "__main__":
    main()
