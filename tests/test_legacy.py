"""The original Llama-2-Onnx format: a tiny variant in that layout against the PyTorch reference."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_config
from legacy_graph import build_legacy_variant

from llama2_onnx.chat_format import PromptBuilder
from llama2_onnx.checkpoints import canonical_shapes
from llama2_onnx.errors import UserError, VariantError
from llama2_onnx.generation import Engine
from llama2_onnx.legacy import LegacyRuntime
from llama2_onnx.reference import Transformer, greedy_tokens
from llama2_onnx.sampling import SamplingSettings
from llama2_onnx.synthetic import random_tensor

SEED = 2
PROMPT = "the cat sat on the mat"
STEPS = 20
EXAMPLE = ROOT / "MinimumExample" / "Example_ONNX_LlamaV2.py"
GREEDY = SamplingSettings(temperature=0)
LFS_POINTER = ("version https://git-lfs.github.com/spec/v1\n"
               "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
               "size 262144000\n")


def canonical_weights(config) -> dict[str, np.ndarray]:
    return {name: random_tensor(name, shape, SEED)
            for name, shape in canonical_shapes(config).items()}


@pytest.fixture(scope="module", params=[False, True], ids=["mha", "gqa"])
def legacy(request, tmp_path_factory, tokenizer, tokenizer_path):
    """(variant folder, expected greedy tokens of the reference model) for PROMPT."""
    config = tiny_config(tokenizer.n_words, gqa=request.param)
    weights = canonical_weights(config)
    root = tmp_path_factory.mktemp("Llama-2-Onnx")
    folder = build_legacy_variant(root / "7B_FT_float32", config, weights, tokenizer_path)
    model = Transformer(config)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    expected = greedy_tokens(model.eval(), base_prompt(tokenizer), STEPS)
    assert tokenizer.eos_id not in expected, "pick another SEED: the reference stops early"
    return folder, expected


def test_folder_has_the_original_layout(legacy):
    folder, _ = legacy
    assert (folder / "ONNX" / "LlamaV2_7B_FT_float32.onnx").is_file()
    assert (folder / "embeddings.pth").is_file()
    assert (folder.parent / "tokenizer.model").is_file()
    assert not (folder / "config.json").exists()


def test_engine_detects_the_format_and_decodes_like_the_reference(legacy, tokenizer):
    folder, expected = legacy
    engine = Engine.from_variant(folder, provider="cpu")
    assert isinstance(engine.runner, LegacyRuntime)
    assert engine.config.provenance == {"format": "original Llama-2-Onnx"}

    prompt = base_prompt(tokenizer)
    logits, got = engine.prefill(prompt), []
    for _ in range(STEPS):
        got.append(int(np.argmax(logits)))
        logits = engine.decode_step(got[-1])
    assert got == expected

    # The cache still holds the prompt, so generate() recomputes only its last token.
    assert "".join(engine.generate(prompt, GREEDY, max_new_tokens=STEPS))
    assert engine.last_stats.prefilled_tokens == 1
    assert engine.last_stats.tokens == expected
    assert engine.last_stats.stop_reason == "max tokens"


def run_example(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLE), "--provider", "cpu", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def base_prompt(tokenizer) -> list[int]:
    return PromptBuilder(tokenizer, chat=False).completion(PROMPT)


def expected_cli_text(folder: Path, tokenizer, max_new_tokens: int) -> str:
    engine = Engine.from_variant(folder, provider="cpu")
    pieces = engine.generate(base_prompt(tokenizer), GREEDY, max_new_tokens)
    return PROMPT + "".join(pieces) + "\n"


def original_style_args(folder: Path) -> list[str]:
    return ["--onnx_file", str(next((folder / "ONNX").glob("*.onnx"))),
            "--embedding_file", str(folder / "embeddings.pth"),
            "--tokenizer_path", str(folder.parent / "tokenizer.model")]


@pytest.mark.parametrize("style", ["files", "variant"])
def test_example_cli_prints_what_the_engine_generates(legacy, tokenizer, style):
    folder, _ = legacy
    where = original_style_args(folder) if style == "files" else ["--variant", str(folder)]
    result = run_example(*where, "--prompt", PROMPT, "--temperature", "0",
                         "--max_gen_len", "10")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_cli_text(folder, tokenizer, 10)
    assert "[LlamaV2_7B_FT_float32 on cpu]" in result.stderr


@pytest.mark.parametrize("style", ["files", "variant"])
def test_lfs_pointer_embeddings_name_the_fix(legacy, tmp_path, style):
    folder, _ = legacy
    shutil.copytree(folder.parent, tmp_path / "repo")
    copy = tmp_path / "repo" / folder.name
    (copy / "embeddings.pth").write_text(LFS_POINTER)
    where = original_style_args(copy) if style == "files" else ["--variant", str(copy)]
    result = run_example(*where, "--prompt", PROMPT, "--temperature", "0")
    assert result.returncode == 2, result.stderr
    assert "git lfs pull" in result.stderr
    assert "embeddings.pth" in result.stderr
    assert "Traceback" not in result.stderr


def _copy_with_graph_edit(legacy, tmp_path, edit) -> Path:
    """A copy of the original-format folder (and its ../tokenizer.model) whose graph inputs
    or outputs `edit` changes (the weights stay in the copied data file)."""
    import onnx

    folder, _ = legacy
    root = tmp_path / "Llama-2-Onnx"
    shutil.copytree(folder, root / folder.name)
    shutil.copy(folder.parent / "tokenizer.model", root / "tokenizer.model")
    graph = next((root / folder.name / "ONNX").glob("*.onnx"))
    model = onnx.load(str(graph), load_external_data=False)
    edit(model.graph)
    onnx.save(model, str(graph))
    return root / folder.name


def test_a_symbolic_layer_count_is_one_sentence(legacy, tmp_path):
    def symbolic_layers(graph):
        cache = next(i for i in graph.input if i.name == "k_cache")
        cache.type.tensor_type.shape.dim[1].dim_param = "layers"

    folder = _copy_with_graph_edit(legacy, tmp_path, symbolic_layers)
    with pytest.raises(VariantError, match="fixes the layer count.*not one of its variants"):
        Engine.from_variant(folder, provider="cpu")


def test_a_tokenizer_smaller_than_the_graphs_vocabulary_is_one_sentence(legacy, tmp_path):
    def bigger_vocabulary(graph):
        logits = next(o for o in graph.output if o.name == "logits")
        logits.type.tensor_type.shape.dim[-1].dim_value += 7

    folder = _copy_with_graph_edit(legacy, tmp_path, bigger_vocabulary)
    with pytest.raises(VariantError, match="the tokenizer has .* tokens but .* writes logits"):
        Engine.from_variant(folder, provider="cpu")


def test_a_longer_context_than_the_graphs_is_refused_not_clipped(legacy):
    folder, _ = legacy
    engine = Engine.from_variant(folder, provider="cpu")
    with pytest.raises(UserError, match=f"must be between 2 and {engine.context_len}"):
        Engine.from_variant(folder, provider="cpu", max_seq_len=engine.context_len + 1)
    with pytest.raises(UserError, match="original Llama-2-Onnx format runs without it"):
        Engine.from_variant(folder, provider="cpu", graph_capture=True)
