"""Check on a GPU that decode steps keep the KV cache on the device (no host copies per token).

    python tools/gpu_check.py --variant /data/out/rand7b_float16 --provider cuda

Runs a short greedy generation with ONNX Runtime's profiler on and prints JSON with: the
provider every node ran on, every memory-copy node executed per decode step and the bytes it
moved, whether each cache buffer kept its device address, and decode speed with a short and a
long cache (a per-token cache copy would make the long one much slower).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama2_onnx.generation import Engine  # noqa: E402
from llama2_onnx.sampling import SamplingSettings  # noqa: E402


def profiled_engine(folder: Path, provider: str, cache_len: int, prefix: str) -> Engine:
    """The variant with ONNX Runtime's profiler on; decode steps uncaptured so each node runs."""
    return Engine.from_variant(folder, provider=provider, max_seq_len=cache_len,
                               graph_capture=False, prefill_chunk=None,
                               profile=prefix)


def node_events(profile: Path) -> list[dict]:
    events = json.loads(profile.read_text())
    return [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]


def check(folder: Path, provider: str, steps: int, cache_len: int = 512) -> dict:
    prefix = str(Path(tempfile.gettempdir()) / "gpu_check")
    engine = profiled_engine(folder, provider, cache_len, prefix)
    addresses = list(engine.runner.caches)
    prompt = engine.tokenizer.encode("", bos=True) + list(range(100, 131))
    list(engine.generate(prompt, SamplingSettings(temperature=0), steps, ignore_eos=True))
    profile = Path(engine.runner.session.end_profiling())
    events = node_events(profile)
    providers = Counter(e["args"].get("provider", "?") for e in events)
    copies = [e for e in events if "Memcpy" in e["args"].get("op_name", "")]
    moved = sum(int(e["args"].get("output_size", 0)) for e in copies)
    op_us = Counter()
    for e in events:
        op_us[e["args"].get("op_name", "?")] += e.get("dur", 0)
    return {
        "variant": folder.name, "provider": provider, "decode_steps": steps,
        "node_runs_by_provider": dict(providers),
        "memcpy_node_runs": Counter(e["args"]["op_name"] for e in copies),
        "memcpy_bytes_total": moved, "memcpy_bytes_per_step": moved / (steps + 1),
        "kernel_us_per_step_by_op": {k: round(v / (steps + 1), 1)
                                     for k, v in op_us.most_common()},
        "cache_devices": sorted({o.device_name() for o in
                                 engine.runner.binding.get_outputs()[:-1]}),
        "cache_addresses_unchanged": addresses == [
            o.data_ptr() for o in engine.runner.binding.get_outputs()[:-1]],
        "present_bound_to_past": [o.data_ptr() for o in engine.runner.binding.get_outputs()[:-1]]
        == addresses,
    }


def decode_speed(folder: Path, provider: str, cache_len: int, fill: int, steps: int) -> float:
    engine = Engine.from_variant(folder, provider=provider, max_seq_len=cache_len)
    prompt = engine.tokenizer.encode("", bos=True) + [100 + i % 1000 for i in range(fill - 1)]
    list(engine.generate(prompt, SamplingSettings(temperature=0), steps, ignore_eos=True))
    return round(engine.last_stats.decode_tok_s, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", type=Path, required=True)
    parser.add_argument("--provider", default="cuda")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--long-context", type=int, default=4096)
    args = parser.parse_args()
    report = check(args.variant, args.provider, args.steps, min(512, args.long_context))
    start = time.perf_counter()
    long_fill = args.long_context - 4 * args.steps
    report["context"] = args.long_context
    report["decode_tok_s_after_64_tokens"] = decode_speed(
        args.variant, args.provider, args.long_context, 64, args.steps)
    report[f"decode_tok_s_after_{long_fill}_tokens"] = decode_speed(
        args.variant, args.provider, args.long_context, long_fill, args.steps)
    report["speed_check_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
