"""Exporter: tiny seeded checkpoints in both formats, checked against the PyTorch reference."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_config

from llama2_onnx.checkpoints import HFSource, MetaSource, open_source
from llama2_onnx.config import Config
from llama2_onnx.errors import ConfigError, UserError, VerificationError
from llama2_onnx.export import ExportRequest, compare_with_reference, export_variant, load_reference
from llama2_onnx.files import sha256_file
from llama2_onnx.generation import Engine
from llama2_onnx.reference import Transformer, greedy_tokens
from llama2_onnx.sampling import SamplingSettings

CASES = [(fmt, precision, gqa) for fmt in ("hf", "meta") for precision in ("float32", "float16")
         for gqa in (False, True)]
BOUND = {"float32": 1e-4, "float16": 5e-2}
# The parity tests run on CPU in CI; on a GPU machine set LLAMA2_ONNX_TEST_PROVIDER=cuda.
PROVIDER = os.environ.get("LLAMA2_ONNX_TEST_PROVIDER", "cpu")


def provider_for(precision: str) -> str:
    """float32 variants run on the CPU on every machine (placement.place)."""
    return "cpu" if precision == "float32" else PROVIDER


@pytest.mark.parametrize("fmt,precision,gqa", CASES)
def test_export_matches_reference(make_variant, make_checkpoint, fmt, precision, gqa):
    folder = make_variant(fmt, precision, gqa)
    source = open_source(**{fmt: make_checkpoint(fmt, gqa)})
    report = compare_with_reference(folder, source, steps=20, provider=provider_for(precision))
    assert report.max_abs_diff <= BOUND[precision]
    assert report.tokens_agree


@pytest.mark.parametrize("fmt,precision,gqa", CASES[:2] + CASES[-2:])
def test_free_running_greedy_equals_reference(make_variant, make_checkpoint, fmt, precision, gqa):
    folder = make_variant(fmt, precision, gqa)
    engine = Engine.from_variant(folder, provider=provider_for(precision))
    reference = load_reference(open_source(**{fmt: make_checkpoint(fmt, gqa)}), Transformer)
    prompt = engine.tokenizer.encode("the cat sat on the mat")
    expected = greedy_tokens(reference, prompt, 20)
    logits, got = engine.prefill(prompt), []
    for _ in range(20):
        got.append(int(logits.argmax()))
        logits = engine.decode_step(got[-1])
    assert got == expected


def test_hf_and_meta_give_the_same_logits(make_variant):
    hf = Engine.from_variant(make_variant("hf", "float32", True), provider="cpu")
    meta = Engine.from_variant(make_variant("meta", "float32", True), provider="cpu")
    prompt = hf.tokenizer.encode("he ran far away home")
    np.testing.assert_allclose(hf.prefill(prompt), meta.prefill(prompt), atol=1e-5)


def test_meta_bfloat16_shards_read_like_hf(tmp_path, tokenizer):
    from llama2_onnx.synthetic import write_hf, write_meta

    config = tiny_config(tokenizer.n_words)
    meta = MetaSource(write_meta(tmp_path / "m", config, seed=3, shards=2, bfloat16=True))
    hf = HFSource(write_hf(tmp_path / "h", config, seed=3))
    for name in ("layers.1.attention.wq.weight", "layers.0.feed_forward.w2.weight",
                 "tok_embeddings.weight"):
        bf16 = torch.from_numpy(hf.read(name)).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(meta.read(name), bf16)


def test_variant_folder_contents(make_variant):
    folder = make_variant("hf", "float16", True)
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    graph = f"ONNX/LlamaV2_{folder.name}.onnx"
    assert {graph, graph + ".data", "embeddings.safetensors", "tokenizer.model", "config.json",
            "manifest.json", "README.md", ".gitattributes", ".gitignore"} <= names
    config = Config.load(folder / "config.json")
    assert (config.dtype, config.n_kv_heads, config.provenance["format"]) == (
        "float16", 2, "huggingface")
    manifest = json.loads((folder / "manifest.json").read_text())
    for rel, entry in manifest["files"].items():  # the data file's hash is taken while writing
        assert entry == {"size": (folder / rel).stat().st_size,
                         "sha256": sha256_file(folder / rel)}, rel
    assert "*.onnx.data filter=lfs" in (folder / ".gitattributes").read_text()
    assert not list(folder.parent.glob(".*partial*"))


@pytest.mark.parametrize("shape", [(1, 1), (3, 200), (129, 64), (64, 7), (300, 130)])
def test_banded_transpose_equals_numpys(shape):
    from llama2_onnx.graph import transposed

    a = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for dtype in (np.float32, np.float16):
        out = transposed(a, np.dtype(dtype))
        assert out.flags.c_contiguous and out.dtype == dtype
        np.testing.assert_array_equal(out, a.T.astype(dtype))


def test_graph_uses_only_portable_operators(make_variant):
    import onnx

    folder = make_variant("hf", "float16", False)
    model = onnx.load(str(next((folder / "ONNX").glob("*.onnx"))), load_external_data=False)
    ops = {(n.domain or "ai.onnx", n.op_type) for n in model.graph.node}
    assert ops == {("ai.onnx", "SimplifiedLayerNormalization"), ("ai.onnx", "MatMul"),
                   ("ai.onnx", "Sigmoid"), ("ai.onnx", "Mul"), ("ai.onnx", "Slice"),
                   ("ai.onnx", "Cast"), ("ai.onnx", "Split"), ("com.microsoft", "RotaryEmbedding"),
                   ("com.microsoft", "GroupQueryAttention"),
                   ("com.microsoft", "SkipSimplifiedLayerNormalization")}
    assert [o.name for o in model.graph.output][0] == "logits"
    assert all(not t.raw_data for t in model.graph.initializer if t.name.endswith("_t"))


def test_config_rejects_unknown_keys_and_bad_shapes():
    with pytest.raises(ConfigError, match="unknown keys"):
        Config.from_dict({"dim": 64, "n_heads": 4, "bogus": 1})
    with pytest.raises(ConfigError, match="multiple of 16"):
        Config(dim=96, n_heads=4)
    assert Config().hidden_dim == 11008 and Config(dim=5120, n_heads=40).hidden_dim == 13824
    seventy = Config(dim=8192, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096)
    assert seventy.hidden_dim == 28672


def _request(tmp_path, tokenizer_path, **changes) -> ExportRequest:
    base = dict(variant="v", precision="float32", tokenizer=tokenizer_path, out=tmp_path / "out",
                progress=False)
    return ExportRequest(**{**base, **changes})


def test_bad_inputs_are_refused_with_a_fix(tmp_path, make_checkpoint, tokenizer_path):
    hf = make_checkpoint("hf")
    with pytest.raises(UserError, match="does not exist"):
        export_variant(_request(tmp_path, tokenizer_path, hf=tmp_path / "nope"))
    other = tmp_path / "qwen2"
    shutil.copytree(hf, other)
    raw = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**raw, "model_type": "qwen2"}))
    with pytest.raises(ConfigError, match="model_type='qwen2'.*cannot export"):
        export_variant(_request(tmp_path, tokenizer_path, hf=other))
    (tmp_path / "out" / "v").mkdir(parents=True)
    with pytest.raises(UserError, match="--force"):
        export_variant(_request(tmp_path, tokenizer_path, hf=hf))


def test_tokenizer_with_more_ids_than_the_model_is_refused(tmp_path, tokenizer):
    """More ids than the model's rows is refused; fewer (a padded vocabulary) is allowed
    (tests/test_llama_family.py exports one)."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["the cat sat on the mat and ran home"] * 50),
        model_prefix=str(tmp_path / "small"), vocab_size=280, model_type="bpe",
        byte_fallback=True, minloglevel=2)
    from llama2_onnx.synthetic import write_hf

    hf = write_hf(tmp_path / "hf", tiny_config(tokenizer.n_words - 48))
    with pytest.raises(UserError, match="tokenizer .* has 280 tokens .* only vocab_size=272"):
        export_variant(_request(tmp_path, tmp_path / "small.model", hf=hf))


def test_missing_tensor_and_disk_space(tmp_path, tokenizer_path, tokenizer, monkeypatch):
    from llama2_onnx.synthetic import write_hf

    hf = write_hf(tmp_path / "hf", tiny_config(tokenizer.n_words), shards=2)
    (hf / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UserError, match="lacks"):
        export_variant(_request(tmp_path, tokenizer_path, hf=hf))
    full = write_hf(tmp_path / "hf2", tiny_config(tokenizer.n_words))
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10, 10, 10))
    with pytest.raises(UserError, match="free some space"):
        export_variant(_request(tmp_path, tokenizer_path, hf=full))


def test_failed_verification_leaves_nothing(tmp_path, make_checkpoint, tokenizer_path,
                                            monkeypatch):
    import llama2_onnx.export as export

    monkeypatch.setitem(export.BOUNDS, "float32", export.Bounds(0.0, 0.0, 1.0))
    with pytest.raises(VerificationError, match="not written"):
        export_variant(_request(tmp_path, tokenizer_path, hf=make_checkpoint("hf")))
    assert list((tmp_path / "out").iterdir()) == []


def test_cli_export_and_exit_codes(tmp_path, make_checkpoint, tokenizer_path):
    tool = [sys.executable, str(ROOT / "tools" / "export_and_publish.py"), "export"]
    args = ["--tokenizer", str(tokenizer_path), "--precision", "float32", "--variant", "cli",
            "--out", str(tmp_path), "--no-progress"]
    ok = subprocess.run(tool + ["--meta", str(make_checkpoint("meta"))] + args,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "verify OK" in ok.stdout and (tmp_path / "cli" / "config.json").exists()
    again = subprocess.run(tool + ["--meta", str(make_checkpoint("meta"))] + args,
                           capture_output=True, text=True)
    assert again.returncode == 2 and "pass --force" in again.stderr
    assert "Traceback" not in again.stderr
    missing = subprocess.run(tool + ["--hf", str(tmp_path / "absent")] + args + ["--variant", "x"],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_sampled_generation_from_export_is_reproducible(make_variant):
    engine = Engine.from_variant(make_variant("hf", "float32", True), provider="cpu")
    prompt = engine.tokenizer.encode("the sun")
    settings = SamplingSettings(temperature=1.0, top_p=0.95, seed=7)
    first = "".join(engine.generate(prompt, settings, max_new_tokens=15))
    engine.reset()
    assert "".join(engine.generate(prompt, settings, max_new_tokens=15)) == first



def test_meta_shards_are_remapped_without_changing_values(make_checkpoint, monkeypatch):
    reference = MetaSource(make_checkpoint("meta"))
    names = list(reference.shards[0])
    expected = {n: reference.read(n) for n in names if n in reference.available}
    monkeypatch.setattr(MetaSource, "REMAP_BYTES", 1)
    remapped = MetaSource(make_checkpoint("meta"))
    for name, value in expected.items():
        np.testing.assert_array_equal(remapped.read(name), value)
        assert remapped._shards is None  # closed after every read at this threshold


def test_llama_3_in_metas_own_format_is_refused_with_the_way_out(tmp_path, tokenizer):
    from llama2_onnx.synthetic import write_meta

    folder = write_meta(tmp_path / "m", tiny_config(tokenizer.n_words), seed=3)
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, "use_scaled_rope": True}))
    with pytest.raises(ConfigError, match=r"Llama 3 in Meta's own format \(use_scaled_rope\).*"
                                          "Hugging Face download of the same model with --hf"):
        MetaSource(folder)


def test_an_id_of_a_padded_embedding_row_decodes_to_no_text(tokenizer):
    ids = tokenizer.encode("the cat", bos=False)
    assert tokenizer.decode(ids + [tokenizer.n_words + 7]) == tokenizer.decode(ids) == "the cat"
