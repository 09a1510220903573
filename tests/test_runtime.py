"""Runtime and CLI: in-place KV cache, prefix reuse, streaming, and every bad input's message."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import ROOT

from llama2_onnx.errors import GenerationError, VariantError
from llama2_onnx.generation import Engine
from llama2_onnx.placement import PROVIDERS
from llama2_onnx.sampling import SamplingSettings

# Which execution providers this onnxruntime has: tests state what they need from it, so the
# suite holds with onnxruntime, onnxruntime-gpu or onnxruntime-directml installed.
INSTALLED = {short for short, name in PROVIDERS.items() if name in ort.get_available_providers()}
MISSING = [(short, package) for short, package in (("cuda", "onnxruntime-gpu"),
                                                   ("dml", "onnxruntime-directml"))
           if short not in INSTALLED]
CLI = [sys.executable, str(ROOT / "MinimumExample" / "Example_ONNX_LlamaV2.py")]
GREEDY = SamplingSettings(temperature=0)
POINTER = ("version https://git-lfs.github.com/spec/v1\n"
           "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
           "size 12345\n")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=120)


@pytest.fixture()
def variant_copy(make_variant, tmp_path) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(make_variant("hf", "float32", True), folder)
    return folder


def test_cache_is_bound_in_place_and_never_reallocated(make_variant):
    engine = Engine.from_variant(make_variant("hf", "float32", True), provider="cpu")
    runtime = engine.runner
    before = list(runtime.caches)
    list(engine.generate(engine.tokenizer.encode("the dog"), GREEDY, max_new_tokens=10))
    # Outputs come back in binding order: every present_* (cache) first, then logits.
    present = [o.data_ptr() for o in runtime.binding.get_outputs()[:-1]]
    assert present == before == runtime.caches
    assert len(before) == 2 * engine.config.n_layers
    layer = before[1] - before[0]  # one block, one buffer after the other
    assert layer > 0 and before == [before[0] + k * layer for k in range(len(before))]



def test_device_zeros_are_one_zero_filled_allocation(make_variant):
    """The CUDA cache block's allocator, run here on the CPU provider."""
    from llama2_onnx.session import device_zeros

    engine = Engine.from_variant(make_variant("hf", "float16", True), provider="cpu")
    value, maker = device_zeros(engine.runner.session, 3 * 1000 + 1, np.float16, device="cpu")
    array = value.numpy()
    assert array.shape == (3001,) and array.dtype == np.float16 and not array.any()
    assert maker is not None and value.data_ptr() != 0


def test_buffers_bound_by_address_or_as_values_give_the_same_tokens(make_variant):
    """CPU and CUDA bind parts of one block by address; DirectML binds one OrtValue each."""
    from llama2_onnx.session import Runtime

    engine = Engine.from_variant(make_variant("hf", "float16", True), provider="cpu")
    prompt = engine.tokenizer.encode("the dog ran")
    texts = []
    for by_address in (True, False):
        runtime = engine.runner
        placement = dataclasses.replace(runtime.placement, by_address=by_address)
        engine.runner = Runtime(runtime.session, runtime.config, placement)
        engine.reset()
        texts.append([*engine.generate(prompt, GREEDY, max_new_tokens=12, ignore_eos=True)])
        texts[-1].append(engine.last_stats.tokens)
    assert texts[0] == texts[1] and len(texts[0][-1]) == 12


def test_new_turn_prefills_only_new_tokens(make_variant):
    engine = Engine.from_variant(make_variant("hf", "float32", True), provider="cpu")
    first = engine.tokenizer.encode("the cat sat on the mat")
    list(engine.generate(first, GREEDY, max_new_tokens=5))
    follow = first + engine.last_stats.tokens + engine.tokenizer.encode("and ran", bos=False)
    logits = engine.prefill(follow)
    cached = len(first) + len(engine.last_stats.tokens) - 1
    assert engine.last_prefill_count == len(follow) - cached
    fresh = Engine.from_variant(make_variant("hf", "float32", True), provider="cpu")
    np.testing.assert_allclose(logits, fresh.prefill(follow), atol=1e-5)


def test_streamed_text_equals_decoded_text(make_variant, tokenizer):
    engine = Engine.from_variant(make_variant("hf", "float32", False), provider="cpu")
    prompt = tokenizer.encode("she was home")
    settings = SamplingSettings(temperature=1.0, top_p=1.0, seed=3)
    pieces = list(engine.generate(prompt, settings, max_new_tokens=30))
    full = tokenizer.decode(prompt[1:] + engine.last_stats.tokens)
    assert "".join(pieces) == full[len(tokenizer.decode(prompt[1:])):]
    assert len(pieces) > 1


def test_generation_stops_at_context_and_refuses_long_prompts(make_variant):
    engine = Engine.from_variant(make_variant("hf", "float32", True), provider="cpu",
                                 max_seq_len=16)
    prompt = engine.tokenizer.encode("the cat sat")
    list(engine.generate(prompt, GREEDY, max_new_tokens=100))
    assert engine.last_stats.stop_reason == "context full"
    assert len(engine.tokens) == 16
    with pytest.raises(GenerationError, match="context holds 16"):
        list(engine.generate(list(range(3, 20)), GREEDY))


def test_stop_strings_end_generation(make_variant):
    engine = Engine.from_variant(make_variant("hf", "float32", True), provider="cpu")
    prompt = engine.tokenizer.encode("the")
    text = "".join(engine.generate(prompt, GREEDY, max_new_tokens=30))
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip()
    engine.reset()
    clipped = "".join(engine.generate(prompt, GREEDY, max_new_tokens=30, stop=[stop]))
    assert clipped == text[:text.index(stop)]
    assert engine.last_stats.stop_reason == "stop string"





def test_cli_greedy_matches_engine_and_reports_stats(make_variant):
    folder = make_variant("hf", "float32", True)
    engine = Engine.from_variant(folder, provider="cpu")
    expected = "".join(engine.generate(engine.tokenizer.encode("the cat"), GREEDY,
                                       max_new_tokens=12))
    run = cli("--variant", str(folder), "--prompt", "the cat", "--temperature", "0",
              "--max_gen_len", "12", "--stats", "--provider", "cpu")
    assert run.returncode == 0, run.stderr
    assert run.stdout == "the cat" + expected + "\n"
    assert "time to first token" in run.stderr and "decode" in run.stderr


def expect_error(run: subprocess.CompletedProcess, *fragments: str) -> None:
    assert run.returncode == 2, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, run.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_lfs_pointer_files_say_git_lfs_pull(variant_copy):
    data = next((variant_copy / "ONNX").glob("*.onnx.data"))
    data.write_text(POINTER)
    expect_error(cli("--variant", str(variant_copy), "--prompt", "hi"), "git lfs pull")
    with pytest.raises(VariantError, match="git lfs pull"):
        Engine.from_variant(variant_copy, provider="cpu")


def test_uninitialised_submodule_says_what_to_run(tmp_path):
    empty = tmp_path / "7B_FT_float16"
    empty.mkdir()
    expect_error(cli("--variant", str(empty), "--prompt", "hi"),
                 "git submodule init 7B_FT_float16")


def test_truncated_and_corrupted_weights(variant_copy):
    data = next((variant_copy / "ONNX").glob("*.onnx.data"))
    blob = data.read_bytes()
    data.write_bytes(blob[:-100])
    expect_error(cli("--variant", str(variant_copy), "--prompt", "hi"), "truncated")
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0xFF
    data.write_bytes(bytes(flipped))
    expect_error(cli("--variant", str(variant_copy), "--prompt", "hi", "--verify"), "sha256")


def test_tokenizer_with_more_ids_than_the_model(variant_copy, tmp_path):
    from llama2_onnx.synthetic import write_tokenizer

    write_tokenizer(tmp_path / "other.model", 400)
    graph = next((variant_copy / "ONNX").glob("*.onnx"))
    expect_error(cli("--onnx_file", str(graph), "--tokenizer_path", str(tmp_path / "other.model"),
                     "--prompt", "hi"), "400 tokens", "expects at most 320")


def test_prompt_too_long_empty_prompt_and_bad_sampling(make_variant):
    folder = str(make_variant("hf", "float32", True))
    expect_error(cli("--variant", folder, "--prompt", "the cat sat " * 20, "--max_seq_len", "16"),
                 "context holds 16")
    expect_error(cli("--variant", folder, "--prompt", "   "), "prompt is empty")
    expect_error(cli("--variant", folder, "--prompt", "hi", "--temperature", "-1"), "temperature")
    expect_error(cli("--variant", folder, "--prompt", "hi", "--top_p", "1.5"), "top_p")
    for short, package in MISSING[:1]:  # none only with every provider installed
        expect_error(cli("--variant", folder, "--prompt", "hi", "--provider", short), package)
    expect_error(cli("--variant", folder, "--prompt", "hi", "--max_seq_len", "100000"),
                 "--max_seq_len")
    expect_error(cli("--variant", "no_such_variant", "--prompt", "hi"), "no_such_variant")


def test_list_shows_every_slot_state(tmp_path, make_variant, monkeypatch):
    from llama2_onnx import variant_folder, variants

    shutil.copytree(make_variant("hf", "float32", True), tmp_path / "7B_float16")
    (tmp_path / "7B_FT_float16").mkdir()
    pulled = tmp_path / "13B_float16"
    shutil.copytree(make_variant("hf", "float32", True), pulled)
    next((pulled / "ONNX").glob("*.onnx.data")).write_text(POINTER)
    states = {v.name: v.state for v in variants.list_variants(tmp_path)}
    assert states["7B_float16"] == variant_folder.READY
    assert states["7B_FT_float16"] == variant_folder.NOT_INITIALISED
    assert states["13B_float16"] == variant_folder.NOT_PULLED
    assert variants.default_variant(tmp_path) == tmp_path / "7B_float16"


def test_should_stop_ends_generation_before_the_next_token(make_variant):
    engine = Engine.from_variant(make_variant("hf", "float32", True), provider="cpu")
    calls = []
    list(engine.generate(engine.tokenizer.encode("the"), GREEDY, max_new_tokens=50,
                         ignore_eos=True, should_stop=lambda: calls.append(1) or len(calls) >= 3))
    assert engine.last_stats.stop_reason == "stopped"
    assert engine.last_stats.new_tokens == 3


def test_graph_capture_mode_decodes_the_same_tokens(make_variant):
    """With graph capture on, decode steps state the whole cache as total length (a captured
    graph cannot see new host values) and rely on seqlens_k; on CPU that path must agree."""
    folder = make_variant("hf", "float32", True)
    plain = Engine.from_variant(folder, provider="cpu")
    capture = Engine.from_variant(folder, provider="cpu", graph_capture=True)
    prompt = plain.tokenizer.encode("the cat sat")
    expected = "".join(plain.generate(prompt, GREEDY, max_new_tokens=30, ignore_eos=True))
    assert "".join(capture.generate(prompt, GREEDY, max_new_tokens=30, ignore_eos=True)) == expected
    assert capture.runner.total == capture.context_len


def test_continued_prefill_token_by_token_matches(make_variant):
    """DirectML's attention ignores the cache for multi-token inputs, so there a new turn is
    pre-filled one token at a time; that path must give the same logits."""
    folder = make_variant("hf", "float32", True)
    chunked = Engine.from_variant(folder, provider="cpu")
    stepwise = Engine.from_variant(folder, provider="cpu")
    stepwise.runner.supports_continued_prefill = False
    first = chunked.tokenizer.encode("the cat sat on the mat")
    follow = first + chunked.tokenizer.encode("and the dog ran far away", bos=False)
    for engine in (chunked, stepwise):
        engine.prefill(first)
    expected, got = chunked.prefill(follow).copy(), stepwise.prefill(follow)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert stepwise.last_prefill_count == chunked.last_prefill_count == len(follow) - len(first)


def test_missing_files_named_on_the_command_line(make_variant, tmp_path):
    graph = next((make_variant("hf", "float32", True) / "ONNX").glob("*.onnx"))
    expect_error(cli("--onnx_file", str(graph), "--embedding_file", str(tmp_path / "none"),
                     "--prompt", "hi"), "does not exist")
    expect_error(cli("--onnx_file", str(tmp_path / "none.onnx"), "--prompt", "hi"),
                 "does not exist")


def test_prefill_spans_cover_the_prompt_in_power_of_two_runs():
    from llama2_onnx.generation import prefill_spans

    assert prefill_spans(0, 1500, 1024) == [(0, 1024), (988, 1500)]
    assert prefill_spans(0, 100, 1024) == [(0, 64), (36, 100)]
    assert prefill_spans(0, 128, 1024) == [(0, 128)]
    assert prefill_spans(500, 530, 1024) == [(498, 530)]
    assert prefill_spans(3, 80, None) == [(3, 80)]
    # A runner that pads runs a short rest as it is, when the padded run fits the cache.
    assert prefill_spans(0, 100, 1024, pad_limit=4096) == [(0, 100)]
    assert prefill_spans(0, 1500, 1024, pad_limit=4096) == [(0, 1024), (1024, 1500)]
    assert prefill_spans(500, 530, 1024, pad_limit=4096) == [(500, 530)]
    assert prefill_spans(0, 100, 1024, pad_limit=120) == [(0, 64), (36, 100)]  # 128 > 120
    assert prefill_spans(90, 100, 1024, pad_limit=100) == [(84, 100)]
    for start in range(0, 40, 7):
        for end in range(start + 1, 300, 3):
            spans = prefill_spans(start, end, 32)
            covered = set()
            for a, b in spans:
                assert 0 <= a < b <= end and (b - a) & (b - a - 1) == 0 and b - a <= 32
                assert a <= max(covered, default=start - 1) + 1 or a == start  # no gaps
                covered |= set(range(a, b))
            assert set(range(start, end)) <= covered and spans[-1][1] == end
            assert len(spans) <= (end - start) // 32 + 2


@pytest.mark.parametrize("gqa", [False, True])
def test_chunked_prefill_equals_whole_prefill(make_variant, gqa):
    folder = make_variant("hf", "float32", gqa)
    whole = Engine.from_variant(folder, provider="cpu", prefill_chunk=None)
    chunked = Engine.from_variant(folder, provider="cpu", prefill_chunk=16)
    assert chunked.runner.prefill_lengths() == [1, 2, 4, 8, 16]
    prompt = whole.tokenizer.encode("the cat sat on the mat and the dog ran far away home " * 3)
    prompt = prompt[:85]  # 5 chunks of 16, then 5 tokens: padded to 8
    assert len(prompt) == 85
    lengths = []
    real_run = chunked.runner._run_once
    chunked.runner._run_once = lambda e, s, real=None: (
        lengths.append((e.shape[0], real or e.shape[0])), real_run(e, s, real))[1]
    np.testing.assert_allclose(chunked.prefill(prompt), whole.prefill(prompt), atol=1e-4)
    # Every run reaching ONNX Runtime has a length seen at load; the last one is padded.
    assert {n for n, _ in lengths} <= set(chunked.runner.prefill_lengths())
    assert lengths[-1] == (8, 5)
    assert sum(real for _, real in lengths) == len(prompt)
    short = prompt[:11]  # a first prompt shorter than a chunk: one padded run
    lengths.clear()
    chunked.reset()
    np.testing.assert_allclose(chunked.prefill(short), whole.prefill(short), atol=1e-4)
    assert lengths == [(16, 11)]
    chunked.reset()
    greedy = SamplingSettings(temperature=0)
    texts = []
    for engine in (whole, chunked):
        engine.reset()
        texts.append("".join(engine.generate(prompt, greedy, max_new_tokens=20)))
        texts.append(engine.last_stats.tokens)
    assert texts[0] == texts[2] and texts[1] == texts[3]
    follow = prompt + texts[1] + whole.tokenizer.encode("and the sun", bos=False)
    np.testing.assert_allclose(chunked.prefill(follow), whole.prefill(follow), atol=1e-4)


def test_gpu_check_tool_runs_a_profiled_engine_on_any_provider(make_variant, tmp_path):
    import json

    run = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--variant",
                          str(make_variant("hf", "float32", True)), "--provider", "cpu",
                          "--steps", "4", "--long-context", "96"], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["node_runs_by_provider"] and report["memcpy_bytes_total"] == 0
    assert report["cache_addresses_unchanged"] and report["present_bound_to_past"]
    assert "MatMul" in report["kernel_us_per_step_by_op"]


def test_gpu_profile_groups_kernels_per_step_and_refuses_without_a_gpu(make_variant):
    sys.path.insert(0, str(ROOT / "tools"))
    from gpu_profile import group_of, summarize

    names = {"nvjet_sm90_hsh_64x8_64x16_4x1_v_bz_NNT": "matrix products",
             "void onnxruntime::contrib::cuda::MatMulFloat4BitsKernelM1<__half, 32, false>":
             "matrix products",
             "onnxruntime::contrib::cuda::H128::grp1_fp16::kernel_mha(unsigned int)": "attention",
             "void onnxruntime::contrib::cuda::UnpackRoPEAppend<__half>": "attention",
             "void onnxruntime::contrib::cuda::SkipLayerNormKernelSmall<__half, 512u>": "norms",
             "Memcpy DtoH (Device -> Pageable)": "copies",
             "void onnxruntime::cuda::_SplitSmallInnerKernel<int4>": "element-wise"}
    assert {name: group_of(name) for name in names} == names
    gemv, mha = list(names)[0], list(names)[2]
    report = summarize([(gemv, 40.0), (mha, 10.0)] * 4 + [(gemv, 40.0)] * 4, steps=4,
                       wall_s=4 * 130e-6, weight_bytes=8_000_000)
    assert report["kernel_us_per_step"] == 90.0 and report["wall_us_per_step"] == 130.0
    assert report["kernels_per_step"] == 3.0
    assert report["us_per_step_by_group"] == {"matrix products": 80.0, "attention": 10.0}
    assert report["matrix_products_tb_per_s"] == 0.1  # 8 MB in 80 us
    assert report["top_kernels"][0] == {"name": gemv, "per_step": 2.0, "us_per_step": 80.0}
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_profile.py"), "--variant",
                           str(make_variant("hf", "float32", True))],
                          capture_output=True, text=True, timeout=120)
    if "cuda" not in INSTALLED:
        assert done.returncode == 2 and "GPU machine" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
