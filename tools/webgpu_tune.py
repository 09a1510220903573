"""Graph forms and options on WebGPU, side by side in one process: decode tokens/s, first token,
GPU memory and the greedy tokens of each, and where a decode step's time goes.

    python tools/webgpu_tune.py --variant WORK/ours_int4 --configs packed,exported,acc0,fused
    python tools/webgpu_tune.py --variant WORK/ours_float16 --configs packed,split_k8
    python tools/webgpu_tune.py --variant WORK/ours_int4 --configs profile
    python tools/webgpu_tune.py --variant WORK/ours_int4 --configs cuda,packed,genai \
        --genai WORK/genai_webgpu_int4

Each config opens the variant anew (one session at a time), runs one warm-up and --reps greedy
generations of --new-tokens after the same random --prompt-tokens prompt (tools/benchmark.py's
prompt and measure), and reports the median. Configs (graph capture on unless named _nocap):

    packed      the placement's form (graph_forms.PACKED), as shipped
    exported    the graph as exported (separate RotaryEmbedding nodes, Split of q, k, v)
    acc0        packed, every MatMulNBits at accuracy_level 0 (the exporter writes 4)
    fused       graph_forms.WEBGPU_FUSED: MatMulNBitsQkv / MatMulNBitsMlp (int4, blocks of 32)
    split_kP    graph_forms.SPLIT_K with P parts (float16)
    nbits_splitP  packed, with the 4096-wide int4 products (o_proj, down_proj) split along K
                in P parts as one MatMulNBits of P rows against P*N weight rows (the same
                bytes, reshaped), summing the diagonal (nbits_split_k below; int4)
    cuda        our CUDA path as placed by default (graph capture), for side-by-side numbers
    genai       onnxruntime-genai on the WebGPU plugin, its model in --genai (its builder's
                `-e webgpu`): decode tokens/s, first token and tokens
    novalid     packed, the EP's validationMode=disabled
    profile     packed, uncaptured, ONNX Runtime's profiler over --profile-steps decode steps

Tokens are compared with the first config's: the first differing position, and the first
config's top-2 logit margin there (a near-tie when small). The margins are read in the warm-up
run only, outside the timed ones. GPU memory: nvidia-smi's used memory with the engine loaded,
less what was used before it was opened (the only process on the GPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from benchmark import random_prompt  # noqa: E402

from llama2_onnx import graph_forms, placement, webgpu  # noqa: E402
from llama2_onnx.generation import Engine, common_prefix  # noqa: E402
from llama2_onnx.sampling import SamplingSettings  # noqa: E402
from llama2_onnx.variants import resolve_variant  # noqa: E402

GREEDY = SamplingSettings(temperature=0)


def gpu_used_mib() -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,"
                              "nounits"], capture_output=True, text=True, timeout=20).stdout
        return int(out.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def parse_config(name: str) -> dict:
    """What a config name changes: form, capture, accuracy level, EP options, profile."""
    spec = {"name": name, "form": None, "capture": True, "accuracy": None, "ep": {},
            "parts": None, "profile": False, "provider": "webgpu", "nbits_parts": None}
    base = name.removesuffix("_nocap")
    spec["capture"] = base == name
    if base == "exported":
        spec["form"] = graph_forms.EXPORTED
    elif base == "acc0":
        spec["accuracy"] = 0
    elif base == "fused":
        spec["form"] = graph_forms.WEBGPU_FUSED
    elif base.startswith("split_k"):
        spec["form"], spec["parts"] = graph_forms.SPLIT_K, int(base[7:] or 8)
    elif base.startswith("nbits_split"):
        spec["nbits_parts"] = int(base[11:] or 4)
    elif base in ("cuda", "genai"):
        spec["provider"] = base
    elif base == "novalid":
        spec["ep"] = {"validationMode": "disabled"}
    elif base == "profile":
        spec["capture"], spec["profile"] = False, True
    elif base != "packed":
        raise SystemExit(f"unknown config {name!r}")
    return spec


class Patched:
    """Apply a config's changes to the placement, the form rewrite and the EP options."""

    def __init__(self, spec: dict) -> None:
        self.spec, self.saved = spec, []

    def __enter__(self):
        spec = self.spec
        if spec["form"] is not None:
            form = spec["form"]
            self._set(placement, "_form", lambda *a, **k: form)
        if spec["parts"]:
            self._set(graph_forms, "SPLIT_K_PARTS", spec["parts"])
        if spec["nbits_parts"]:
            original_form, parts = graph_forms.to_form, spec["nbits_parts"]

            def split_form(model, form, folder=None):
                changed = original_form(model, form, folder)
                nbits_split_k(model.graph, parts)
                return changed
            self._set(graph_forms, "to_form", split_form)
        if spec["accuracy"] is not None:
            original, level = graph_forms.to_form, spec["accuracy"]

            def to_form(model, form, folder=None):
                changed = original(model, form, folder)
                for node in model.graph.node:
                    for attr in node.attribute:
                        if node.op_type.startswith("MatMulNBits") and \
                                attr.name == "accuracy_level":
                            attr.i = level
                return changed
            self._set(graph_forms, "to_form", to_form)
        if spec["ep"]:
            extra = dict(spec["ep"])

            def add_to(so, graph_capture=False):
                so.add_provider_for_devices([webgpu.device()], {
                    "enableGraphCapture": "1" if graph_capture else "0", **extra})
            self._set(webgpu, "add_to", add_to)
        return self

    def _set(self, owner, name, value) -> None:
        self.saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def __exit__(self, *exc) -> None:
        for owner, name, value in reversed(self.saved):
            setattr(owner, name, value)


def margins_recorder(engine: Engine, margins: list[float]):
    """Wrap the runner's run so each call's top-2 logit margin is appended (warm-up only)."""
    runner, original = engine.runner, engine.runner.run

    def run(*a, **k):
        logits = original(*a, **k)
        top = np.partition(logits, -2)[-2:]
        margins.append(float(top[1] - top[0]))
        return logits
    runner.run = run
    return lambda: setattr(runner, "run", original)


def nbits_split_k(graph, parts: int, width: int = 4096) -> int:
    """Split each MatMulNBits product with N = `width` outputs (o_proj, down_proj) along K:
    x (b, s, K) -> (b, s*P, K/P) rows (m, q) = x[m, q-th K/P]; the weight's N rows of K read as
    N*P rows of K/P (row (n, p) = W[n, p-th K/P]: the same bytes, blocks along K contiguous);
    one MatMulNBits gives (b, s*P, N*P); the wanted sums are its (m, p, n, p) diagonal:
    Reshape (b, s, P, N, P), Mul by an identity mask (P, 1, P), ReduceSum over axes 2 and 4."""
    from onnx import TensorProto, helper

    inits = {t.name: t for t in graph.initializer}
    kept, changed = [], 0
    mask = f"/nbits_split/mask_{parts}"
    for node in graph.node:
        attrs = {a.name: a for a in node.attribute}
        n = attrs["N"].i if "N" in attrs else 0
        k = attrs["K"].i if "K" in attrs else 0
        block = attrs["block_size"].i if "block_size" in attrs else 0
        if (node.op_type != "MatMulNBits" or len(node.input) != 3 or n != width
                or k % (block * parts) or node.input[1] not in inits):
            kept.append(node)
            continue
        codes, scales = inits[node.input[1]], inits[node.input[2]]
        blocks = k // block
        codes.dims[:] = [n * parts, blocks // parts, *codes.dims[2:]]
        if len(scales.dims) == 2:
            scales.dims[:] = [n * parts, blocks // parts]
        attrs["N"].i, attrs["K"].i = n * parts, k // parts
        x, out, p = node.input[0], node.output[0], node.name + "/nbits_split"
        for key, value in ((f"/nbits_split/in_{parts}_{k}", [0, -1, k // parts]),
                           (f"/nbits_split/out_{parts}_{n}", [0, -1, parts, n, parts]),
                           ("/nbits_split/axes24", [2, 4])):
            if key not in inits:
                inits[key] = helper.make_tensor(key, TensorProto.INT64, [len(value)], value)
                graph.initializer.append(inits[key])
        if mask not in inits:
            dtype = scales.data_type
            eye = np.eye(parts, dtype=np.float16 if dtype == TensorProto.FLOAT16
                         else np.float32).reshape(parts, 1, parts)
            inits[mask] = helper.make_tensor(mask, dtype, list(eye.shape),
                                             eye.tobytes(), raw=True)
            graph.initializer.append(inits[mask])
        node.input[0] = p + "/rows"
        node.output[0] = p + "/all"
        kept += [
            helper.make_node("Reshape", [x, f"/nbits_split/in_{parts}_{k}"], [p + "/rows"],
                             p + "/rows"),
            node,
            helper.make_node("Reshape", [p + "/all", f"/nbits_split/out_{parts}_{n}"],
                             [p + "/grid"], p + "/grid"),
            helper.make_node("Mul", [p + "/grid", mask], [p + "/diag"], p + "/diag"),
            helper.make_node("ReduceSum", [p + "/diag", "/nbits_split/axes24"], [out], p,
                             keepdims=0)]
        changed += 1
    del graph.node[:]
    graph.node.extend(kept)
    print(f"nbits_split_k: {changed} products split in {parts}", file=sys.stderr)
    return changed


def measure_genai(spec: dict, args) -> dict:
    """onnxruntime-genai's own WebGPU model on the same plugin: the prompt of `measure`."""
    import onnxruntime_genai as og

    og.register_execution_provider_library("WebGpuExecutionProvider", webgpu._plugin_library())
    before = gpu_used_mib()
    start = time.perf_counter()
    config = og.Config(str(args.genai))
    config.clear_providers()
    config.append_provider("webgpu")
    model = og.Model(config)
    load_s = time.perf_counter() - start
    vocab = json.loads((Path(args.genai) / "genai_config.json").read_text())["model"][
        "vocab_size"]
    prompt = [1] + np.random.default_rng(0).integers(3, vocab, args.prompt_tokens - 1).tolist()
    runs = []
    for _ in range(args.reps + 1):
        params = og.GeneratorParams(model)
        total = len(prompt) + args.new_tokens
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        generator = og.Generator(model, params)
        t0 = time.perf_counter()
        generator.append_tokens(prompt)
        generator.generate_next_token()
        t1 = time.perf_counter()
        steps = 0
        while not generator.is_done():
            generator.generate_next_token()
            steps += 1
        t2 = time.perf_counter()
        tokens = [int(t) for t in generator.get_sequence(0)][len(prompt):]
        runs.append({"decode_tok_s": steps / (t2 - t1), "ttft_ms": (t1 - t0) * 1e3,
                     "tokens": tokens})
        del generator
    used = gpu_used_mib()
    timed = runs[1:]
    report = {"config": spec["name"], "form": "onnxruntime-genai -e webgpu",
              "load_s": round(load_s, 1),
              "decode_tok_s": round(statistics.median(r["decode_tok_s"] for r in timed), 1),
              "decode_tok_s_all": [round(r["decode_tok_s"], 1) for r in timed],
              "ttft_ms": round(statistics.median(r["ttft_ms"] for r in timed), 1),
              "ttft_ms_all": [round(r["ttft_ms"], 1) for r in timed],
              "gpu_used_mib": used, "gpu_used_before_mib": before,
              "tokens_equal_across_reps": all(r["tokens"] == runs[0]["tokens"] for r in runs),
              "tokens": runs[0]["tokens"], "margins": []}
    if used is not None and before is not None:
        report["gpu_mib_for_engine"] = used - before
    del model
    gc.collect()
    return report


def measure(spec: dict, args) -> dict:
    if spec["provider"] == "genai":
        return measure_genai(spec, args)
    before = gpu_used_mib()
    start = time.perf_counter()
    profile = str(Path(tempfile.gettempdir()) / f"webgpu_{spec['name']}") if spec["profile"] \
        else None
    with Patched(spec):
        engine = Engine.from_variant(resolve_variant(args.variant, ROOT),
                                     provider=spec["provider"], graph_capture=spec["capture"]
                                     if spec["provider"] == "webgpu" else "auto",
                                     prefill_chunk="auto", profile=profile)
    load_s = time.perf_counter() - start
    report = {"config": spec["name"], "form": engine.runner.placement.form,
              "graph_capture": engine.runner.graph_capture, "load_s": round(load_s, 1)}
    if spec["profile"]:
        report.update(profile_steps(engine, args))
        del engine
        gc.collect()
        return report
    prompt = random_prompt(engine, args.prompt_tokens)
    runs, margins = [], []
    for rep in range(args.reps + 1):
        engine.reset()
        restore = margins_recorder(engine, margins) if rep == 0 else None
        list(engine.generate(prompt, GREEDY, max_new_tokens=args.new_tokens, ignore_eos=True))
        if restore:
            restore()
        stats = engine.last_stats
        runs.append({"decode_tok_s": stats.decode_tok_s, "ttft_ms": stats.ttft_s * 1e3,
                     "tokens": list(stats.tokens)})
    timed = runs[1:]
    report.update({
        "decode_tok_s": round(statistics.median(r["decode_tok_s"] for r in timed), 1),
        "decode_tok_s_all": [round(r["decode_tok_s"], 1) for r in timed],
        "ttft_ms": round(statistics.median(r["ttft_ms"] for r in timed), 1),
        "ttft_ms_all": [round(r["ttft_ms"], 1) for r in timed],
        "gpu_used_mib": gpu_used_mib(), "gpu_used_before_mib": before,
        "tokens_equal_across_reps": all(r["tokens"] == runs[0]["tokens"] for r in runs),
        "tokens": runs[0]["tokens"], "margins": [round(m, 4) for m in margins]})
    if report["gpu_used_mib"] is not None and before is not None:
        report["gpu_mib_for_engine"] = report["gpu_used_mib"] - before
    del engine
    gc.collect()
    return report


def profile_steps(engine: Engine, args) -> dict:
    """Prefill, then --profile-steps decode steps with the profiler on; time per op type."""
    prompt = random_prompt(engine, args.prompt_tokens)
    engine.reset()
    token = int(np.argmax(engine.prefill(prompt)))
    wall = time.perf_counter()
    for _ in range(args.profile_steps):
        token = int(np.argmax(engine.decode_step(token)))
    wall = time.perf_counter() - wall
    path = Path(engine.runner.session.end_profiling())
    events = json.loads(path.read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    decode = runs[-args.profile_steps:]
    steps = len(decode)

    def in_decode(e) -> bool:
        return any(a <= e["ts"] <= b for a, b in decode)
    by_cat = defaultdict(lambda: defaultdict(float))
    counts = defaultdict(lambda: defaultdict(int))
    names = defaultdict(float)
    for e in events:
        if "dur" not in e or e.get("cat") == "Session":
            continue
        if e.get("cat") == "Node":
            if not e["name"].endswith("_kernel_time") or not in_decode(e):
                continue
            key = e.get("args", {}).get("op_name", "?")
        else:  # the EP's own events (GPU timestamps where the EP records them)
            key = re.split(r"[|&]", e["name"])[0]
            names[e["name"][:120]] += e["dur"]
        by_cat[e.get("cat", "?")][key] += e["dur"]
        counts[e.get("cat", "?")][key] += 1
    out = {"profile_file": str(path), "decode_steps": steps,
           "wall_us_per_step": round(wall / max(steps, 1) * 1e6, 1),
           "model_run_us_per_step": round(sum(b - a for a, b in decode) / max(steps, 1), 1),
           "event_categories": {c: len(v) for c, v in counts.items()}}
    for cat, table in by_cat.items():
        total = sum(table.values())
        # Node events are decode steps only; other categories cover the whole profile.
        per = steps if cat == "Node" else 1
        out[f"{cat}_us"] = {k: {"us": round(v / per, 1), "share": round(v / total, 3),
                                "count": counts[cat][k] // per}
                            for k, v in sorted(table.items(), key=lambda kv: -kv[1])}
    out["top_ep_events_us"] = {k: round(v, 1) for k, v in
                               sorted(names.items(), key=lambda kv: -kv[1])[:25]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", required=True)
    parser.add_argument("--configs", default="packed")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--profile-steps", type=int, default=16)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--genai", type=Path, help="onnxruntime-genai WebGPU model folder "
                        "(config genai)")
    args = parser.parse_args()
    results = []
    for name in args.configs.split(","):
        spec = parse_config(name)
        try:
            results.append(measure(spec, args))
        except Exception as exc:  # one config failing must not lose the others
            results.append({"config": name, "error": f"{type(exc).__name__}: {exc}"[:600]})
        ref = next((r for r in results if "tokens" in r), None)
        last = results[-1]
        if ref is not None and "tokens" in last and last is not ref:
            first = common_prefix(ref["tokens"], last["tokens"])
            last["first_difference_vs_" + ref["config"]] = (
                None if first == len(ref["tokens"]) else first)
            if first < len(ref["tokens"]) and first < len(ref["margins"]):
                last["ref_margin_there"] = ref["margins"][first]
        print(json.dumps({k: v for k, v in last.items() if k not in ("tokens", "margins")}),
              flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))
    summary = [{k: r.get(k) for k in ("config", "decode_tok_s", "ttft_ms", "gpu_mib_for_engine",
                                      "error")} for r in results]
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
