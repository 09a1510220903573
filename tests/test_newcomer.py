"""What a newcomer's first runs say: which variant and what it is, a check that passed, a typo
found before Gradio loads, and a context message that offers only what is possible."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT

from llama2_onnx import chat_ui
from llama2_onnx.errors import GenerationError, VariantError
from llama2_onnx.generation import Engine

CLI = [sys.executable, str(ROOT / "MinimumExample" / "Example_ONNX_LlamaV2.py"), "--provider",
       "cpu", "--max_gen_len", "4", "--temperature", "0", "--prompt", "And God said"]


def test_the_cli_says_which_variant_it_chose_and_that_the_demo_is_not_llama_2():
    run = subprocess.run([*CLI, "--verify"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    assert lines[0].startswith("[demo on cpu] (the first ready variant; --variant picks")
    assert "not Llama 2" in run.stderr
    assert "every file of demo matches its manifest (sizes and sha256)" in run.stderr
    named = subprocess.run([*CLI, "--variant", "demo"], capture_output=True, text=True,
                           timeout=120, cwd=ROOT)
    assert named.stderr.splitlines()[0] == "[demo on cpu]"


def test_the_chat_app_refuses_a_variant_typo_before_importing_gradio(monkeypatch, tmp_path):
    def no_gradio():
        raise AssertionError("Gradio was imported before the variant was checked")

    monkeypatch.setattr(chat_ui, "import_gradio", no_gradio)
    with pytest.raises(VariantError, match="neither a folder nor a slot"):
        chat_ui.build_app(chat_ui.AppOptions(root=tmp_path, variant="demoo"))


def test_a_too_long_prompt_offers_a_longer_context_only_when_there_is_one(make_variant):
    folder = make_variant("hf", "float32", True)
    full = Engine.from_variant(folder, provider="cpu")
    with pytest.raises(GenerationError) as caught:
        full.check_fits(list(range(full.context_len)))
    assert "--max_seq_len" not in str(caught.value) and "shorten it." in str(caught.value)
    short = Engine.from_variant(folder, provider="cpu", max_seq_len=16)
    with pytest.raises(GenerationError, match="raise --max_seq_len .this variant allows up to"):
        short.check_fits(list(range(16)))


def test_a_weights_file_replaced_under_a_running_engine_is_refused(variant):
    """ONNX Runtime maps a CPU session's weights file; truncated under the process it would
    die of SIGBUS with no message. Checked before each generation, a change is one sentence."""
    import os
    import shutil

    engine = Engine.from_variant(variant, provider="cpu")
    prompt = engine.tokenizer.encode("the cat")
    assert list(engine.generate(prompt, max_new_tokens=2))
    data = next((variant / "ONNX").glob("*.onnx.data"))
    copy = data.with_name("copy.tmp")
    shutil.copyfile(data, copy)
    os.replace(copy, data)  # same bytes, another file: the mapped one is not this any more
    with pytest.raises(GenerationError, match="changed on disk after .* restart"):
        list(engine.generate(prompt, max_new_tokens=2))


def test_the_embedding_table_is_read_into_memory_not_mapped(variant):
    engine = Engine.from_variant(variant, provider="cpu")
    import mmap

    base = engine.embeddings
    while getattr(base, "base", None) is not None:
        base = base.base
    assert not isinstance(base, mmap.mmap)
