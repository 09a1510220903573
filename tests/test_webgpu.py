"""WebGPU (the onnxruntime-ep-webgpu plugin) through SwiftShader, the software Vulkan that
Debian's chromium package ships: greedy tokens against the CPU provider, a continued chat turn
against a cold prefill, graph capture against uncaptured, and the missing-piece messages.

SwiftShader compiles shaders on the CPU (seconds per session), so sessions are shared across
the module. It has no shader-f16, so the int4 variant runs in float32 activations here (the
form an adapter without float16 gets). The software adapter is chosen by two variables that
only these tests set: the package never selects it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ROOT

from llama2_onnx import graph_forms, webgpu
from llama2_onnx.generation import Engine
from llama2_onnx.sampling import SamplingSettings
from llama2_onnx.session import Runtime, create_session

SWIFTSHADER = Path(os.environ.get("LLAMA2_ONNX_SWIFTSHADER_ICD",
                                  "/usr/lib/chromium/vk_swiftshader_icd.json"))
SOFTWARE = {"VK_ICD_FILENAMES": str(SWIFTSHADER), "ORT_WEBGPU_EP_ALLOW_SOFTWARE_ADAPTER": "1",
            "XDG_RUNTIME_DIR": os.environ.get("XDG_RUNTIME_DIR", "/tmp")}
CLI = [sys.executable, str(ROOT / "MinimumExample" / "Example_ONNX_LlamaV2.py")]
GREEDY = SamplingSettings(temperature=0)
STEPS = 32
PRECISIONS = ("float32", "int4")

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("onnxruntime_ep_webgpu") is None,
                       reason="the WebGPU plugin is not installed (pip install -e '.[webgpu]')"),
    pytest.mark.skipif(not SWIFTSHADER.is_file(),
                       reason=f"no SwiftShader Vulkan driver at {SWIFTSHADER} (Debian: apt "
                       "install chromium; or set LLAMA2_ONNX_SWIFTSHADER_ICD)"),
]


@pytest.fixture(scope="module")
def software_adapter():
    """The software adapter's variables for this module; the plugin registers (once per
    process) while they are set."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in SOFTWARE.items():
            mp.setenv(name, value)
        webgpu.device()
        yield


@pytest.fixture(scope="module")
def engines(software_adapter, make_variant):
    """engines(precision, capture=False) -> a WebGPU engine, opened once per module."""
    made: dict[tuple, Engine] = {}

    def get(precision: str, capture: bool = False) -> Engine:
        if (precision, capture) not in made:
            made[precision, capture] = Engine.from_variant(
                make_variant("hf", precision, True), provider="webgpu", graph_capture=capture)
        made[precision, capture].reset()
        return made[precision, capture]

    return get


@pytest.fixture(scope="module")
def cpu_engines(make_variant):
    made: dict[str, Engine] = {}

    def get(precision: str) -> Engine:
        if precision not in made:
            made[precision] = exact_cpu_engine(make_variant("hf", precision, True))
        made[precision].reset()
        return made[precision]

    return get


def exact_cpu_engine(folder: Path) -> Engine:
    """The CPU provider's engine, its int4 products computed on the dequantized weights.

    The variant's MatMulNBits nodes ask for accuracy_level 4, with which the CPU kernel
    quantizes the activations to int8: its logits then differ from float arithmetic by up to
    0.05 on the tiny model, and a near-tie flips a greedy token within 32 steps. At level 0
    the CPU computes in float32 like WebGPU's kernels, so the tokens must agree exactly.
    """
    engine = Engine.from_variant(folder, provider="cpu")
    if engine.config.dtype != "int4":
        return engine
    graph = next((folder / "ONNX").glob("*.onnx"))
    model = onnx.load(str(graph), load_external_data=False)
    graph_forms.to_form(model, graph_forms.PACKED_FLOAT32, graph.parent)
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "MatMulNBits" and attr.name == "accuracy_level":
                attr.i = 0
    placement = engine.runner.placement
    so = placement.session_options()
    so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                str(graph.parent))
    session = ort.InferenceSession(model.SerializeToString(), so,
                                   providers=["CPUExecutionProvider"])
    runtime = Runtime(session, engine.config, placement)
    return Engine(runtime, engine.tokenizer, engine.embeddings, engine.config)


def greedy(engine: Engine, prompt: list[int], steps: int = STEPS) -> list[int]:
    list(engine.generate(prompt, GREEDY, max_new_tokens=steps, ignore_eos=True))
    return list(engine.last_stats.tokens)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_greedy_tokens_equal_the_cpu_providers(engines, cpu_engines, precision):
    engine = engines(precision)
    runtime = engine.runner
    prompt = engine.tokenizer.encode("the cat sat on the mat and")
    outputs = [o.data_ptr() for o in runtime.binding.get_outputs()]
    tokens = greedy(engine, prompt)
    assert tokens == greedy(cpu_engines(precision), prompt) and len(tokens) == STEPS
    # Cache, step inputs and logits stay in the same WebGPU buffers: nothing per step.
    assert [o.data_ptr() for o in runtime.binding.get_outputs()] == outputs
    assert {o.device_name() for o in runtime.binding.get_outputs()} == {"webgpu"}
    assert {v.device_name() for v in runtime.step_values.values()} == {"webgpu"}
    # SwiftShader has no shader-f16: int4 computes in float32, and the user is told once.
    assert runtime.dtype == np.float32 and not webgpu.has_shader_f16()
    assert len([n for n in engine.notes if "shader-f16" in n]) == (precision != "float32")


def test_a_float16_variant_computes_in_float32_its_weights_widened_at_load(
        software_adapter, make_variant, cpu_engines, monkeypatch):
    """As a float16 variant's weights are (graph_forms.WIDEN_IN_GRAPH_BYTES): a Cast left for
    WebGPU to run would fail here ("requires f16 but the device does not support it")."""
    monkeypatch.setattr(graph_forms, "WIDEN_IN_GRAPH_BYTES", 0)
    engine = Engine.from_variant(make_variant("hf", "float16", True), provider="webgpu")
    assert engine.runner.dtype == np.float32
    prompt = engine.tokenizer.encode("the moon was far away")
    assert greedy(engine, prompt) == greedy(cpu_engines("float16"), prompt)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_continued_turn_equals_a_cold_prefill(engines, cpu_engines, precision):
    """A second chat turn pre-fills only its new tokens, a multi-token run with a past, which
    WebGPU's GroupQueryAttention takes (DirectML's does not)."""
    engine = engines(precision)
    assert engine.runner.supports_continued_prefill
    first = engine.tokenizer.encode("the dog ran far away")
    answer = greedy(engine, first, 12)
    follow = first + answer + engine.tokenizer.encode("and the cat sat", bos=False)
    continued = greedy(engine, follow, 12)
    assert 1 < engine.last_stats.prefilled_tokens < len(follow) - len(answer)
    engine.reset()
    assert greedy(engine, follow, 12) == continued == greedy(cpu_engines(precision), follow, 12)


def chat_script(engine: Engine) -> list[list[int]]:
    """Turns with prefix reuse, a regenerated answer (the cache rewound) and seeded sampling."""
    encode = engine.tokenizer.encode
    first = encode("she was home with the dog")
    answers = [greedy(engine, first, 20)]
    second = first + answers[0] + encode("and they ran to the tree", bos=False)
    answers.append(greedy(engine, second, 12))
    answers.append(greedy(engine, second, 12))  # regenerate: the same prompt again
    sampled = SamplingSettings(temperature=0.9, top_p=0.9, top_k=20, seed=5)
    list(engine.generate(second + answers[-1], sampled, max_new_tokens=12, ignore_eos=True))
    return [*answers, list(engine.last_stats.tokens)]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_graph_capture_changes_no_token(engines, precision):
    captured = engines(precision, capture=True)
    assert captured.runner.graph_capture and captured.runner.total_on_device
    assert chat_script(captured) == chat_script(engines(precision))


def test_the_fused_form_gives_the_packed_forms_tokens(engines, make_variant):
    """graph_forms.WEBGPU_FUSED: the plugin's MatMulNBitsQkv and MatMulNBitsMlp (each layer's
    norms and 4-bit projections in one node) give the packed form's greedy tokens; here in
    float32 activations, as SwiftShader has no shader-f16. Its speed is measured on the GPU
    (tools/webgpu_tune.py)."""
    engine = engines("int4")
    placement = dataclasses.replace(engine.runner.placement,
                                    form=graph_forms.WEBGPU_FUSED_FLOAT32)
    graph = next((make_variant("hf", "int4", True) / "ONNX").glob("*.onnx"))
    fused = Engine(Runtime(create_session(graph, placement), engine.config, placement),
                   engine.tokenizer, engine.embeddings, engine.config)
    prompt = engine.tokenizer.encode("the dog sat on the tree and")
    assert greedy(fused, prompt) == greedy(engine, prompt)


def test_the_captured_graph_really_replays(engines):
    """Why every output of a captured step is a WebGPU buffer: logits bound in host memory
    are not written by a replay, so two different tokens would give the same stale logits."""
    engine = engines("float32", capture=True)
    runtime = engine.runner
    engine.prefill(engine.tokenizer.encode("the sun and the moon"))
    for token in (5, 6, 7):  # capture happens within the first decode steps
        engine.decode_step(token)
    device, runtime.logits_device = runtime.logits_device, None
    runtime.binding.bind_ortvalue_output("logits", runtime.logits_value)
    try:
        stale = [engine.decode_step(token).copy() for token in (8, 9)]
    finally:
        runtime.logits_device = device
        runtime.binding.bind_ortvalue_output("logits", device)
        engine.reset()
    assert np.array_equal(*stale)
    fresh = [engine.decode_step(token).copy() for token in (8, 9)]
    assert not np.array_equal(*fresh)


def cli_error(variant: Path, env: dict[str, str], tmp_path: Path) -> str:
    """Run the CLI on WebGPU in a fresh process, `env`'s paths put first in the variables of
    the same name; return its one `error:` line (exit code 2)."""
    env = {**os.environ, **SOFTWARE, **{
        name: os.pathsep.join(filter(None, (value, os.environ.get(name))))
        if name.endswith("PATH") else value for name, value in env.items()}}
    run = subprocess.run(CLI + ["--variant", str(variant), "--provider", "webgpu", "--prompt",
                                "the cat"], capture_output=True, text=True, timeout=120,
                         env=env, cwd=tmp_path)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].endswith("."), run.stderr
    return lines[0]


def test_a_missing_plugin_names_the_extra(make_variant, tmp_path):
    (tmp_path / "onnxruntime_ep_webgpu.py").write_text("raise ImportError('not installed')\n")
    line = cli_error(make_variant("hf", "float32", True), {"PYTHONPATH": str(tmp_path)},
                     tmp_path)
    assert 'pip install -e ".[webgpu]"' in line and "onnxruntime-ep-webgpu" in line


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the Vulkan loader is Linux's")
def test_a_missing_vulkan_loader_names_its_package(make_variant, tmp_path):
    (tmp_path / webgpu.VULKAN_LOADER).write_bytes(b"")  # found first, and no library
    line = cli_error(make_variant("hf", "float32", True), {"LD_LIBRARY_PATH": str(tmp_path)},
                     tmp_path)
    assert "apt install libvulkan1" in line and webgpu.VULKAN_LOADER in line


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Vulkan drivers are Linux's")
@pytest.mark.parametrize("software", ["1", "0"])
def test_no_adapter_is_one_sentence(make_variant, tmp_path, software):
    """No Vulkan driver: the plugin offers its device and finds no adapter when the session
    opens; without the software-adapter variable and without a GPU it offers no device."""
    env = {"VK_ICD_FILENAMES": str(tmp_path / "none.json"),
           "ORT_WEBGPU_EP_ALLOW_SOFTWARE_ADAPTER": software}
    line = cli_error(make_variant("hf", "float32", True), env, tmp_path)
    assert line == f"error: {webgpu.NO_ADAPTER}"
