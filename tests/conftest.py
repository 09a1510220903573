"""Shared fixtures: a tiny SentencePiece tokenizer, seeded tiny checkpoints and their exports."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama2_onnx.config import Config  # noqa: E402

WORDS = ("the a of and to in is was he she it they we you that for on with as his her at by "
         "from this be cat dog sat mat ran far away home tree sun moon").split()


def tiny_config(vocab_size: int, gqa: bool = False, **changes) -> Config:
    """2 layers, dim 64, 4 heads of 16 (2 KV heads with grouped-query attention)."""
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2 if gqa else 4,
                vocab_size=vocab_size, multiple_of=32, max_seq_len=128, dtype="float32")
    return Config(**{**base, **changes})


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    """A 320-token BPE SentencePiece model with byte fallback, trained on generated text."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("tokenizer")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(3000)]
    (folder / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"),
        vocab_size=320, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, num_threads=1, minloglevel=2)
    return folder / "tokenizer.model"


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    from llama2_onnx.tokenizer import Tokenizer

    return Tokenizer.from_file(tokenizer_path)


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory, tokenizer):
    """make_checkpoint(fmt, gqa=False, seed=1) -> folder of a seeded tiny checkpoint."""
    from llama2_onnx.synthetic import write_hf, write_meta

    made: dict[tuple, Path] = {}

    def make(fmt: str, gqa: bool = False, seed: int = 1) -> Path:
        key = (fmt, gqa, seed)
        if key not in made:
            folder = tmp_path_factory.mktemp(f"{fmt}_{'gqa' if gqa else 'mha'}")
            config = tiny_config(tokenizer.n_words, gqa)
            if fmt == "hf":
                made[key] = write_hf(folder, config, seed=seed, shards=2)
            else:
                made[key] = write_meta(folder, config, seed=seed, shards=2)
        return made[key]

    return make


@pytest.fixture(scope="session")
def make_variant(tmp_path_factory, make_checkpoint, tokenizer_path):
    """make_variant(fmt="hf", precision="float32", gqa=False) -> exported, verified variant."""
    from llama2_onnx.export import ExportRequest, export_variant

    made: dict[tuple, Path] = {}

    def make(fmt: str = "hf", precision: str = "float32", gqa: bool = False,
             chat: bool = False) -> Path:
        key = (fmt, precision, gqa, chat)
        if key not in made:
            out = tmp_path_factory.mktemp("variants")
            name = f"tiny_{fmt}_{precision}_{'gqa' if gqa else 'mha'}{'_chat' if chat else ''}"
            request = ExportRequest(variant=name, precision=precision, tokenizer=tokenizer_path,
                                    out=out, chat=chat, progress=False,
                                    **{fmt: make_checkpoint(fmt, gqa)})
            made[key] = export_variant(request)
        return made[key]

    return make


@pytest.fixture(scope="session")
def bpe_variant(tmp_path_factory) -> Path:
    """A tiny random Llama (GQA, 12 padded embedding rows) with a byte-level BPE tokenizer.json
    and a ChatML chat template (tests/hf_tokenizers.py), exported with --hf: a chat variant."""
    from hf_tokenizers import write_tokenizer

    from llama2_onnx.export import ExportRequest, export_variant
    from llama2_onnx.synthetic import write_hf
    from llama2_onnx.tokenizer import open_tokenizer

    hf = tmp_path_factory.mktemp("hf_bpe") / "ckpt"
    tokenizer = open_tokenizer(write_tokenizer(hf))
    write_tokenizer(hf, stops=[tokenizer.plain.token_to_id("<|endoftext|>")])
    write_hf(hf, tiny_config(tokenizer.n_words + 12, gqa=True, max_seq_len=256), seed=3)
    out = tmp_path_factory.mktemp("bpe_variants")
    return export_variant(ExportRequest(variant="tiny_bpe", precision="float32", hf=hf, out=out,
                                        progress=False))


@pytest.fixture
def variant(make_variant, tmp_path) -> Path:
    """A private copy of a float32 GQA tiny variant, for tests that change its files."""
    import shutil

    folder = tmp_path / "v"
    shutil.copytree(make_variant("hf", "float32", True), folder)
    return folder


def stop_process(proc) -> None:
    """Terminate a server the test started (kill it if it does not stop within 10 s)."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
