"""GPU time of single operators at a model's decode shapes on WebGPU, each timed alone.

    python tools/webgpu_ops.py --shape 7b --out ops.json

ONNX Runtime's profiler times when the WebGPU EP records a node's work on the host, not when
the GPU runs it, so this measures the GPU side directly: a graph holds R independent copies of
one operator (each with its own random weights, R sized so the copies together are several
times the L2), is captured as a WebGPU graph, and is replayed T times back to back; one read of
an output at the end waits for the GPU. Time per copy = total / (T R). A graph of R tiny Adds
gives the cost of one dispatch. Weights are read once per copy, so bytes / time is the
bandwidth a decode step's products reach (against about 4.3 TB/s for a device copy on an H200).

Prints JSON: per operator the microseconds per call, GB/s of its weights, and the decode step
they add up to (products per layer x layers + output projection), for int4 (MatMulNBits at
accuracy_level 4 and 0, the fused MatMulNBitsQkv / MatMulNBitsMlp) and float16 (MatMul, and
split-K products as graph_forms.SPLIT_K builds them).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama2_onnx import webgpu  # noqa: E402

F16 = TensorProto.FLOAT16
SHAPES = {"7b": dict(dim=4096, hidden=11008, vocab=32000, layers=32),
          "tiny": dict(dim=64, hidden=192, vocab=320, layers=2)}
TARGET_BYTES = 400e6  # weights per graph: several times an H200's 50 MB L2
WARM_S = 0.3  # seconds of replays before timing, and the least time timed
RNG = np.random.default_rng(0)


def random_f16(shape) -> np.ndarray:
    """Small random float16 values (never zeros), fast: random bit patterns in [2^-7, 2^-3)
    (float32 with --float32, for adapters without shader-f16)."""
    values = RNG.integers(0x2000, 0x3000, size=shape, dtype=np.uint16).view(np.float16)
    return values.astype(np.float32) if F16 == TensorProto.FLOAT else values


def random_codes(n: int, k: int) -> np.ndarray:
    return RNG.integers(0, 256, size=(n, k // 32, 16), dtype=np.uint8)


def copies(weight_bytes: int, most: int = 16) -> int:
    return int(max(2, min(most, TARGET_BYTES // max(weight_bytes, 1))))


def matmul_nbits(k: int, n: int, accuracy: int):
    r = copies(n * k // 2)
    nodes, inits = [], []
    for i in range(r):
        inits += [numpy_helper.from_array(random_codes(n, k), f"b{i}"),
                  numpy_helper.from_array(random_f16((n, k // 32)), f"s{i}")]
        nodes.append(helper.make_node("MatMulNBits", ["x", f"b{i}", f"s{i}"], [f"y{i}"],
                                      domain="com.microsoft", K=k, N=n, bits=4, block_size=32,
                                      accuracy_level=accuracy))
    return nodes, inits, {"x": (1, 1, k)}, [(f"y{i}", (1, 1, n)) for i in range(r)], \
        n * k // 2 + n * k // 16


def matmul_f16(k: int, n: int, parts: int = 1):
    r = copies(n * k * 2)
    nodes, inits = [], []
    if parts > 1:
        inits += [helper.make_tensor("rows", TensorProto.INT64, [3], [-1, parts, k // parts]),
                  helper.make_tensor("out", TensorProto.INT64, [3], [1, -1, n]),
                  helper.make_tensor("axis0", TensorProto.INT64, [1], [0])]
        nodes += [helper.make_node("Reshape", ["x", "rows"], ["xr"]),
                  helper.make_node("Transpose", ["xr"], ["xp"], perm=[1, 0, 2])]
    for i in range(r):
        if parts > 1:
            inits.append(numpy_helper.from_array(random_f16((parts, k // parts, n)), f"w{i}"))
            nodes += [helper.make_node("MatMul", ["xp", f"w{i}"], [f"p{i}"]),
                      helper.make_node("ReduceSum", [f"p{i}", "axis0"], [f"q{i}"], keepdims=0),
                      helper.make_node("Reshape", [f"q{i}", "out"], [f"y{i}"])]
        else:
            inits.append(numpy_helper.from_array(random_f16((k, n)), f"w{i}"))
            nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]))
    return nodes, inits, {"x": (1, 1, k)}, [(f"y{i}", (1, 1, n)) for i in range(r)], n * k * 2


def fused_qkv(k: int, n: int):
    r = copies(3 * n * k // 2)
    nodes, inits = [], [numpy_helper.from_array(random_f16((k,)), "g")]
    for i in range(r):
        ins = ["x", "skip", "g"]
        for part in "qkv":
            inits += [numpy_helper.from_array(random_codes(n, k), f"{part}b{i}"),
                      numpy_helper.from_array(random_f16((n, k // 32)), f"{part}s{i}")]
            ins += [f"{part}b{i}", f"{part}s{i}", ""]
        nodes.append(helper.make_node(
            "MatMulNBitsQkv", ins[:-1], [f"y{i}", f"k{i}", f"v{i}", f"r{i}"],
            domain="com.microsoft", K=k, Nq=n, Nkv=n, bits=4, block_size=32, accuracy_level=4,
            epsilon=1e-5))
    outs = [(f"{p}{i}", (1, 1, n)) for i in range(r) for p in "ykv"]
    outs += [(f"r{i}", (1, 1, k)) for i in range(r)]
    return nodes, inits, {"x": (1, 1, k), "skip": (1, 1, k)}, outs, 3 * (n * k // 2 + n * k // 16)


def fused_mlp(k: int, n: int):
    r = copies(2 * n * k // 2)
    nodes, inits = [], [numpy_helper.from_array(random_f16((k,)), "g")]
    for i in range(r):
        ins = ["x", "skip", "g"]
        for part in ("gate", "up"):
            inits += [numpy_helper.from_array(random_codes(n, k), f"{part}b{i}"),
                      numpy_helper.from_array(random_f16((n, k // 32)), f"{part}s{i}")]
            ins += [f"{part}b{i}", f"{part}s{i}", ""]
        nodes.append(helper.make_node(
            "MatMulNBitsMlp", ins[:-1], [f"y{i}", f"r{i}"], domain="com.microsoft", K=k, N=n,
            bits=4, block_size=32, accuracy_level=4, activation="silu", epsilon=1e-5))
    outs = [(f"y{i}", (1, 1, n)) for i in range(r)] + [(f"r{i}", (1, 1, k)) for i in range(r)]
    return nodes, inits, {"x": (1, 1, k), "skip": (1, 1, k)}, outs, 2 * (n * k // 2 + n * k // 16)


def skip_norm(k: int):
    r = 16
    inits = [numpy_helper.from_array(random_f16((k,)), "g")]
    nodes = [helper.make_node("SkipSimplifiedLayerNormalization", ["x", "skip", "g"],
                              [f"y{i}", "", "", f"r{i}"], domain="com.microsoft", epsilon=1e-5)
             for i in range(r)]
    outs = [(f"y{i}", (1, 1, k)) for i in range(r)] + [(f"r{i}", (1, 1, k)) for i in range(r)]
    return nodes, inits, {"x": (1, 1, k), "skip": (1, 1, k)}, outs, 0


def tiny_add():
    r = 32
    nodes = [helper.make_node("Add", ["x", "x"], [f"y{i}"]) for i in range(r)]
    return nodes, [], {"x": (1, 1, 64)}, [(f"y{i}", (1, 1, 64)) for i in range(r)], 0


def time_graph(built, reps: int) -> dict:
    nodes, inits, inputs, outputs, weight_bytes = built
    graph = helper.make_graph(
        nodes, "op", [helper.make_tensor_value_info(n, F16, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, F16, s) for n, s in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_provider_for_devices([webgpu.device()], {"enableGraphCapture": "1"})
    session = ort.InferenceSession(model.SerializeToString(), sess_options=so)
    binding = session.io_binding()
    keep = []
    for name, shape in inputs.items():
        value = ort.OrtValue.ortvalue_from_numpy(random_f16(shape), "webgpu", 0)
        keep.append(value)
        binding.bind_ortvalue_input(name, value)
    outs = []
    for name, shape in outputs:
        value = ort.OrtValue.ortvalue_from_numpy(random_f16(shape), "webgpu", 0)
        outs.append(value)
        binding.bind_ortvalue_output(name, value)
    host = ort.OrtValue.ortvalue_from_numpy(random_f16(outputs[0][1]))
    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", "1")

    def wait() -> None:
        ort.copy_tensors([outs[0]], [host])
        host.numpy()

    # Warm up for WARM_S of replays first: the GPU idles at low clocks between cases, and a
    # first try without this read 2-3x slower than the same products inside a decode step.
    start = time.perf_counter()
    while time.perf_counter() - start < WARM_S:
        for _ in range(3):
            session.run_with_iobinding(binding, options)
        wait()
    done, start = 0, time.perf_counter()
    while done < reps or time.perf_counter() - start < WARM_S:
        for _ in range(reps):
            session.run_with_iobinding(binding, options)
        done += reps
        wait()
    total, reps = time.perf_counter() - start, done
    calls = len(nodes) if nodes[0].op_type != "Reshape" else (len(nodes) - 2) // 3
    per_call = total / reps / calls
    result = {"copies": calls, "us_per_call": round(per_call * 1e6, 2)}
    if weight_bytes:
        result["gb_per_s"] = round(weight_bytes / per_call / 1e9, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--reps", type=int, default=30, help="graph replays timed (default 30)")
    parser.add_argument("--only", default="", help="comma-separated groups: int4,float16,misc")
    parser.add_argument("--float32", action="store_true", help="float32 activations and "
                        "scales (an adapter without shader-f16)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    global F16
    if args.float32:
        F16 = TensorProto.FLOAT
    s = SHAPES[args.shape]
    d, h, v, layers = s["dim"], s["hidden"], s["vocab"], s["layers"]
    products = {"qkv": (d, 3 * d), "o": (d, d), "gate_up": (d, 2 * h), "down": (h, d),
                "lm_head": (d, v)}
    groups = set(args.only.split(",")) if args.only else {"int4", "float16", "misc"}
    cases = {}
    if "misc" in groups:
        cases["dispatch (tiny Add)"] = tiny_add
        cases["SkipSimplifiedLayerNormalization"] = lambda: skip_norm(d)
    if "int4" in groups:
        for level in (4, 0):
            for name, (k, n) in products.items():
                cases[f"int4 acc{level} {name}"] = lambda k=k, n=n, a=level: matmul_nbits(k, n, a)
        cases["int4 MatMulNBitsQkv (skip norm + q,k,v)"] = lambda: fused_qkv(d, d)
        cases["int4 MatMulNBitsMlp (skip norm + gate,up,silu)"] = lambda: fused_mlp(d, h)
    if "float16" in groups:
        for name, (k, n) in products.items():
            cases[f"float16 {name}"] = lambda k=k, n=n: matmul_f16(k, n)
        for parts in (4, 8):
            for name, (k, n) in products.items():
                if name != "lm_head":
                    cases[f"float16 split_k{parts} {name}"] = \
                        lambda k=k, n=n, p=parts: matmul_f16(k, n, p)
    report = {}
    for name, build in cases.items():
        try:
            report[name] = time_graph(build(), args.reps)
        except Exception as exc:  # keep the other cases
            report[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        print(name, json.dumps(report[name]), flush=True)
    step = {}
    for prefix in ("int4 acc4", "int4 acc0", "float16", "float16 split_k8", "float16 split_k4"):
        parts = [report.get(f"{prefix} {name}", {}).get("us_per_call") for name in products]
        if prefix.startswith("float16 split") and parts[-1] is None:
            parts[-1] = report.get("float16 lm_head", {}).get("us_per_call")
        if all(p is not None for p in parts):
            step[prefix] = round((layers * sum(parts[:4]) + parts[4]) / 1e3, 3)
    report["products_ms_per_decode_step"] = step
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
