"""The Llama family beyond Llama 2 against transformers (an oracle that shares no code with the
package): rope scaling (llama3, linear), tied embeddings, grouped-query attention, a 128k
vocabulary and Mistral, each a tiny random model saved by transformers itself and exported with
our exporter; and every option the graph does not have refused with one sentence."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from test_oracle_transformers import free_running

from llama2_onnx.checkpoints import HF_CONFIG, hf_config
from llama2_onnx.config import Config
from llama2_onnx.errors import ConfigError
from llama2_onnx.export import ExportRequest, VerifyReport, export_variant
from llama2_onnx.generation import Engine
from llama2_onnx.rope import inverse_frequencies

STEPS = 32
PROMPT = ("the cat sat on the mat and the dog ran far away from the tree to the sun and "
          "the moon")
REL_BOUND = 1e-4  # float32: largest |logit difference| over the spread of the oracle's logits
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
# Llama 3.1 8B's own values, for the frequencies alone.
LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}


def random_hf(folder: Path, seed: int, arch: str = "llama", **options) -> Path:
    """A random transformers model saved with save_pretrained (safetensors): 2 layers, dim 64,
    4 heads of 16 and 2 KV heads, a vocabulary padded past the tokenizer's 320 ids. Weights
    have a trained model's magnitudes so its logits are not flat."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                             "mistral": (MistralConfig, MistralForCausalLM)}[arch]
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=384, rms_norm_eps=1e-5,
                max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(seed)
    options = {k: dict(v) if isinstance(v, dict) else v for k, v in options.items()}  # it edits
    model = model_cls(config_cls(**{**base, **options}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            elif "embed_tokens" in name:  # a tied table is the output projection too: logits
                param.normal_(0.0, 0.25)  # of a few units, and blocks outweighing the embedding
            else:
                param.normal_(0.0, param.shape[-1] ** -0.5)
    model.save_pretrained(folder)
    return folder


def oracle(folder: Path, **config_changes):
    """transformers' own model of the folder, in float64 (config attributes changed first)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    for key, value in config_changes.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float64)
    model.generation_config.eos_token_id = None  # 32 tokens whatever they are
    return model.eval()


def oracle_logits(model, tokens: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def oracle_greedy(model, prompt: list[int], steps: int) -> list[int]:
    import torch

    out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


def export(folder: Path, precision: str, tokenizer_path: Path, out: Path,
           **changes) -> tuple[Path, VerifyReport]:
    """Our exporter with its own verification on; returns the variant and the report."""
    reports: list[VerifyReport] = []
    variant = export_variant(ExportRequest(
        variant=f"{folder.name}_{precision}", precision=precision, hf=folder,
        tokenizer=tokenizer_path, out=out, progress=False, on_verified=reports.append,
        **changes))
    assert reports and reports[0].ok, reports
    return variant, reports[0]


def ours(variant: Path, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """Our greedy tokens (with the KV cache) and the logits (steps, vocab) they came from."""
    return free_running(Engine.from_variant(variant, provider="cpu"), prompt, steps)


def worst_relative(logits: np.ndarray, model, prompt: list[int], tokens: list[int]) -> float:
    """Largest |our logit - the oracle's| over the spread (std) of the oracle's, teacher-forced
    on our tokens, over every step."""
    expected = oracle_logits(model, prompt + tokens[:-1])[len(prompt) - 1:]
    return float((np.abs(logits - expected).max(axis=1) / expected.std(axis=1)).max())


def check_float32(folder: Path, tokenizer, tokenizer_path: Path, out: Path) -> tuple:
    """Export float32; the same 32 greedy tokens as transformers' generate and logits within
    REL_BOUND of its own. Returns (prompt, our tokens, our logits, the oracle)."""
    variant, _ = export(folder, "float32", tokenizer_path, out)
    prompt = tokenizer.encode(PROMPT)
    tokens, logits = ours(variant, prompt, STEPS)
    model = oracle(folder)
    assert tokens == oracle_greedy(model, prompt, STEPS)
    assert worst_relative(logits, model, prompt, tokens) <= REL_BOUND
    assert len(set(tokens)) > 3, "a degenerate continuation would prove little"
    return prompt, tokens, logits, model


# ------------------------------------------------------------------ the frequencies themselves

@pytest.mark.parametrize("scaling", [LLAMA31, {"rope_type": "linear", "factor": 4.0}, None],
                         ids=["llama3", "linear", "none"])
def test_inverse_frequencies_are_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0,
                         max_position_embeddings=131072,
                         rope_scaling=None if scaling is None else dict(scaling))  # it edits it
    if scaling is None:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        theirs = LlamaRotaryEmbedding.compute_default_rope_parameters(config)[0]
    else:
        theirs, factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config)
        assert factor == 1.0  # neither type scales the cos/sin values themselves
    mine = inverse_frequencies(128, 500000.0, Config(rope_scaling=scaling).rope_scaling)
    np.testing.assert_allclose(mine, theirs.double().numpy(), rtol=1e-6)  # theirs: float32
    plain = inverse_frequencies(128, 500000.0)
    if scaling is not None:  # the scaling changed most pairs; llama3 kept the fastest ones
        assert (mine < plain * 0.99).sum() > 10
        assert (mine[0] == plain[0]) == (scaling["rope_type"] == "llama3")


# ------------------------------------------------------------------ models against transformers

def test_llama3_rope_scaling_matches_transformers(tmp_path, tokenizer, tokenizer_path):
    """Llama 3.1's scaling, run past original_max_position_embeddings (32)."""
    folder = random_hf(tmp_path / "llama3", seed=31, rope_scaling=LLAMA3, rope_theta=10000.0)
    prompt, tokens, logits, _ = check_float32(folder, tokenizer, tokenizer_path, tmp_path / "out")
    assert len(prompt) + STEPS > 32 + 16
    assert json.loads((tmp_path / "out" / "llama3_float32" / "config.json").read_text())[
        "rope_scaling"] == LLAMA3
    card = (tmp_path / "out" / "llama3_float32" / "README.md").read_text()
    assert f"| rotary positions | theta 10000, llama3 scaling x{LLAMA3['factor']:g} from 32 " \
           "positions |" in card
    plain = oracle(folder, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    assert worst_relative(logits, plain, prompt, tokens) > 1000 * REL_BOUND  # scaling matters


def test_linear_rope_scaling_in_the_older_layout(tmp_path, tokenizer, tokenizer_path):
    """A config.json as transformers 4 wrote it: rope_theta beside rope_scaling, whose type
    is under the older key "type"."""
    folder = random_hf(tmp_path / "linear", seed=41, rope_theta=500.0)
    raw = json.loads((folder / HF_CONFIG).read_text())
    del raw["rope_parameters"]
    raw.update(rope_theta=500.0, rope_scaling={"type": "linear", "factor": 4.0})
    (folder / HF_CONFIG).write_text(json.dumps(raw))
    assert hf_config(folder / HF_CONFIG).rope_scaling == {"rope_type": "linear", "factor": 4.0}
    prompt, tokens, logits, _ = check_float32(folder, tokenizer, tokenizer_path, tmp_path / "out")
    plain = oracle(folder, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    assert worst_relative(logits, plain, prompt, tokens) > 1000 * REL_BOUND


def test_tied_embeddings_in_every_precision(tmp_path, tokenizer, tokenizer_path):
    """No lm_head in the checkpoint: the output projection is the embedding table, in float32
    (transformers' greedy tokens), float16 and int4 (the exporter's verification passes)."""
    from safetensors import safe_open

    folder = random_hf(tmp_path / "tied", seed=51, tie_word_embeddings=True)
    with safe_open(folder / "model.safetensors", "np") as f:
        assert "lm_head.weight" not in f.keys()
    check_float32(folder, tokenizer, tokenizer_path, tmp_path / "out")
    for precision in ("float16", "int4"):
        variant, report = export(folder, precision, tokenizer_path, tmp_path / "out")
        config = Config.load(variant / "config.json")
        assert config.provenance["tie_word_embeddings"] == "true"
        assert report.top1 >= (0.9 if precision == "float16" else 0.3)


def test_mistral_without_a_sliding_window(tmp_path, tokenizer, tokenizer_path):
    folder = random_hf(tmp_path / "mistral", seed=61, arch="mistral", sliding_window=None,
                       rope_theta=1e6, num_key_value_heads=1)
    assert json.loads((folder / HF_CONFIG).read_text())["model_type"] == "mistral"
    check_float32(folder, tokenizer, tokenizer_path, tmp_path / "out")


def test_a_128k_vocabulary_in_every_precision(tmp_path, tokenizer, tokenizer_path):
    """Llama 3's vocabulary of 128,256 (tied, as Llama 3.2 1B) on a dim-64 model, with the
    320-id tokenizer: float32 against transformers, float16 and int4 verified, and the files
    the size Config.weight_bytes says."""
    folder = random_hf(tmp_path / "vocab", seed=71, vocab_size=128256, tie_word_embeddings=True,
                       num_hidden_layers=1)
    check_float32(folder, tokenizer, tokenizer_path, tmp_path / "out")
    for precision in ("float16", "int4"):
        variant, _ = export(folder, precision, tokenizer_path, tmp_path / "out")
        config = Config.load(variant / "config.json")
        assert config.vocab_size == 128256
        stored = sum(p.stat().st_size for p in variant.rglob("*")
                     if p.suffix in (".data", ".safetensors"))
        assert abs(stored - config.weight_bytes()) < 0.02 * stored, (stored, config)
        engine = Engine.from_variant(variant, provider="cpu")
        assert engine.prefill(tokenizer.encode(PROMPT)).shape == (128256,)


# ------------------------------------------------------------------ the config's own rules

def test_config_json_keeps_rope_scaling_and_old_files_load_unchanged(tmp_path):
    path = tmp_path / "config.json"
    Config(rope_scaling={"type": "linear", "factor": 2}).save(path)
    assert json.loads(path.read_text())["rope_scaling"] == {"rope_type": "linear", "factor": 2}
    assert Config.load(path).rope_scaling == {"rope_type": "linear", "factor": 2}
    Config().save(path)  # a variant without scaling writes what earlier versions wrote
    assert "rope_scaling" not in json.loads(path.read_text())
    assert Config.load(path).rope_scaling is None


BAD_SCALING = {
    "not an object": ("linear", "must be an object or null"),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
             "type 'yarn' is not supported"),
    "no factor": ({"rope_type": "linear"}, "lacks factor"),
    "an extra key": ({**LLAMA3, "beta_fast": 32}, "does not use (beta_fast)"),
    "a negative factor": ({"rope_type": "linear", "factor": -2.0}, "factor=-2.0"),
    "high below low": ({**LLAMA3, "high_freq_factor": 0.5}, "must be greater than"),
    "a fractional length": ({**LLAMA3, "original_max_position_embeddings": 3.5},
                            "a positive integer"),
}


@pytest.mark.parametrize("case", BAD_SCALING)
def test_bad_rope_scaling_is_one_sentence(case):
    value, words = BAD_SCALING[case]
    with pytest.raises(ConfigError, match=re.escape(words)) as raised:
        Config(rope_scaling=value)
    message = str(raised.value)
    assert "\n" not in message and message.endswith(".")


def test_a_sliding_window_is_accepted_only_where_it_never_slides(tmp_path):
    folder = random_hf(tmp_path / "window", seed=1, arch="mistral", sliding_window=64)
    with pytest.raises(ConfigError, match="window of 64 tokens, shorter than the context of "
                                          "128; pass --max-seq-len 64 or less"):
        hf_config(folder / HF_CONFIG)
    assert hf_config(folder / HF_CONFIG, max_seq_len=64).max_seq_len == 128
    with pytest.raises(ConfigError, match="--max-seq-len 64 or less"):
        hf_config(folder / HF_CONFIG, max_seq_len=65)


# ------------------------------------------------------------------ refused through the CLI

BAD_CONFIGS = {
    "another architecture": ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]},
                             "model_type='qwen2'"),
    "a mismatched class": ({"architectures": ["MistralForCausalLM"]}, "MistralForCausalLM"),
    "yarn": ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
             "type 'yarn'"),
    "dynamic": ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "type 'dynamic'"),
    "longrope": ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0],
                                   "long_factor": [1.0]}}, "type 'longrope'"),
    "llama3 without its factors": ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
                                   "lacks low_freq_factor"),
    "attention bias": ({"attention_bias": True}, "attention_bias true"),
    "mlp bias": ({"mlp_bias": True}, "mlp_bias true"),
    "gelu": ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    "another head_dim": ({"head_dim": 32}, "head_dim=32"),
    "partial rotary": ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    "a short window": ({"model_type": "mistral", "architectures": ["MistralForCausalLM"],
                        "sliding_window": 16}, "pass --max-seq-len 16 or less"),
}


@pytest.fixture(scope="module")
def export_tool():
    """tools/export_and_publish.py as a module: its parser and exit path, in this process."""
    spec = importlib.util.spec_from_file_location("export_and_publish",
                                                  ROOT / "tools" / "export_and_publish.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    return random_hf(tmp_path_factory.mktemp("hf") / "llama", seed=2)


def bad_copy(llama_folder: Path, folder: Path, changes: dict) -> Path:
    import shutil

    shutil.copytree(llama_folder, folder)
    raw = json.loads((folder / HF_CONFIG).read_text())
    (folder / HF_CONFIG).write_text(json.dumps({**raw, **changes}))
    return folder


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_configs_exit_2_with_one_sentence(case, tmp_path, llama_folder, tokenizer_path,
                                              export_tool, capsys):
    changes, words = BAD_CONFIGS[case]
    folder = bad_copy(llama_folder, tmp_path / "bad", changes)
    argv = ["export", "--hf", str(folder), "--tokenizer", str(tokenizer_path), "--precision",
            "float32", "--variant", "v", "--out", str(tmp_path / "out"), "--no-progress"]
    with pytest.raises(SystemExit) as exited:
        export_tool.run_main(lambda: export_tool.export_command(export_tool.parse_args(argv),
                                                                export_tool.ROOT))
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith("."), lines
    assert words in lines[0]
    assert not (tmp_path / "out" / "v").exists()


def test_the_cli_process_refuses_a_bad_config(tmp_path, llama_folder, tokenizer_path):
    folder = bad_copy(llama_folder, tmp_path / "bad", {"rope_scaling": {"rope_type": "yarn",
                                                                         "factor": 2.0}})
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "export_and_publish.py"),
                          "export", "--hf", str(folder), "--tokenizer", str(tokenizer_path),
                          "--precision", "int4", "--variant", "v", "--out",
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1
    assert "type 'yarn'" in run.stderr and "Traceback" not in run.stderr
