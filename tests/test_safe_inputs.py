"""Bad files and bad flags: each gives exit code 2, one `error:` line, no traceback, and leaves
everything the user had unchanged. Bad files are generated on the fly from a good variant or
checkpoint; byte flips and truncations are tried on every file of a variant."""

from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, tiny_config
from test_safe_export import assert_refused, export_cli, tree_digest

from llama2_onnx.errors import UserError

EXAMPLE = ROOT / "MinimumExample" / "Example_ONNX_LlamaV2.py"


def run_example(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLE), "--provider", "cpu", *args],
                          capture_output=True, text=True, timeout=120)


def verify_cli(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "export_and_publish.py"),
                           "verify", str(folder)], capture_output=True, text=True, timeout=120)


def graph_of(folder: Path) -> Path:
    return next((folder / "ONNX").glob("*.onnx"))


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    result = change(data)
    path.write_text(json.dumps(result if isinstance(result, list) else data))


def refresh_manifest(folder: Path) -> None:
    """Make the manifest agree with the files again (as a careless hand edit would)."""
    from llama2_onnx.variant_folder import write_manifest

    write_manifest(folder, folder.name)


def assert_run_refused(folder: Path, *words: str) -> None:
    before = tree_digest(folder)
    run = run_example("--variant", str(folder), "--prompt", "the cat", "--temperature", "0",
                      "--max_gen_len", "4")
    assert_refused(run, *words)
    assert tree_digest(folder) == before


# ------------------------------------------------------------------ case 6: the manifest

MANIFEST_DEFECTS = {
    "empty files": (lambda m: m.update(files={}), "does not list"),
    "a list": (lambda m: [m], "malformed"),
    "no files key": (lambda m: m.pop("files"), "malformed"),
    "entry without size": (lambda m: next(iter(m["files"].values())).pop("size"), "size"),
    "entry outside": (lambda m: m["files"].update({"../x": {"size": 1, "sha256": "0" * 64}}),
                      "not a path inside"),
    "embeddings unlisted": (lambda m: m["files"].pop("embeddings.safetensors"),
                            "embeddings.safetensors"),
}


def test_atomic_writes_keep_the_users_files_and_leave_no_temporary(tmp_path, monkeypatch):
    from llama2_onnx import files

    target, mine = tmp_path / "manifest.json", tmp_path / "manifest.json.tmp"
    target.write_text("old")
    mine.write_text("the user's")
    files.write_text_atomic(target, "new")
    assert target.read_text() == "new" and mine.read_text() == "the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "manifest.json.tmp"]

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(files.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        files.write_text_atomic(target, "newer")
    assert target.read_text() == "new"  # untouched, and no half-written temporary left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "manifest.json.tmp"]


@pytest.mark.parametrize("defect", MANIFEST_DEFECTS)
def test_incomplete_or_malformed_manifest_is_refused(variant, defect):
    change, words = MANIFEST_DEFECTS[defect]
    edit_json(variant / "manifest.json", change)
    assert_run_refused(variant, words)
    assert verify_cli(variant).returncode in (1, 2)


def test_empty_manifest_does_not_hide_a_corrupt_embeddings_file(variant):
    edit_json(variant / "manifest.json", lambda m: m.update(files={}))
    path = variant / "embeddings.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-100:] = b"\xff" * 100
    path.write_bytes(bytes(raw))
    assert_run_refused(variant)
    verify = verify_cli(variant)
    assert verify.returncode == 1 and "does not list" in verify.stdout


def test_second_graph_and_unlisted_onnx_files_are_refused(variant):
    shutil.copyfile(graph_of(variant), variant / "ONNX" / "another.onnx")
    assert_run_refused(variant, "2 graphs")
    (variant / "ONNX" / "another.onnx").unlink()
    (variant / "ONNX" / "stray.bin").write_bytes(b"x")
    assert_run_refused(variant, "stray.bin")


# ------------------------------------------------------- case 7: config.json vs the graph

CONFIG_DEFECTS = {"n_layers": 3, "n_kv_heads": 4, "dtype": "float16", "vocab_size": 321,
                  "max_seq_len": 256, "dim": 128}


@pytest.mark.parametrize("key", CONFIG_DEFECTS)
def test_config_that_does_not_describe_the_graph_is_refused(variant, key):
    edit_json(variant / "config.json", lambda c: c.update({key: CONFIG_DEFECTS[key]}))
    refresh_manifest(variant)  # sizes agree: only the graph can tell
    assert_run_refused(variant)


# ------------------------------------------------------------- case 10: malformed inputs

def _header(tensors: dict) -> bytes:
    blob = json.dumps(tensors).encode()
    return struct.pack("<Q", len(blob)) + blob


SAFETENSORS_DEFECTS = {
    "not an object": _header([1, 2]),  # type: ignore[arg-type]
    "no data_offsets": _header({"weight": {"dtype": "F32", "shape": [2]}}) + bytes(8),
    "shape vs span": _header({"weight": {"dtype": "F32", "shape": [3],
                                         "data_offsets": [0, 8]}}) + bytes(8),
    "negative span": _header({"weight": {"dtype": "F32", "shape": [2],
                                         "data_offsets": [8, 0]}}) + bytes(8),
    "overlap": _header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}) + bytes(12),
    "past the end": _header({"weight": {"dtype": "F32", "shape": [4],
                                        "data_offsets": [0, 16]}}) + bytes(8),
}


@pytest.mark.parametrize("defect", SAFETENSORS_DEFECTS)
def test_malformed_safetensors_headers(tmp_path, make_checkpoint, tokenizer_path, defect):
    from llama2_onnx.safetensors_io import read_header

    path = tmp_path / "x.safetensors"
    path.write_bytes(SAFETENSORS_DEFECTS[defect])
    with pytest.raises(UserError, match="corrupt safetensors header"):
        read_header(path)
    hf = tmp_path / "hf"
    shutil.copytree(make_checkpoint("hf"), hf)
    shutil.copyfile(path, next(hf.glob("*.safetensors")))
    before = tree_digest(tmp_path)
    run = export_cli("--hf", str(hf), "--tokenizer", str(tokenizer_path), "--precision",
                     "float32", "--out", str(tmp_path / "out"), "--variant", "v")
    assert_refused(run, "safetensors")
    assert tree_digest(tmp_path) == before


JSON_DEFECTS = {"invalid": "{not json", "a list": "[1, 2]", "missing keys": '{"model_type": '
                '"llama", "architectures": ["LlamaForCausalLM"]}',
                "wrong type": None}


@pytest.mark.parametrize("defect", JSON_DEFECTS)
def test_malformed_hf_config(tmp_path, make_checkpoint, tokenizer_path, defect):
    hf = tmp_path / "hf"
    shutil.copytree(make_checkpoint("hf"), hf)
    if JSON_DEFECTS[defect] is None:
        edit_json(hf / "config.json", lambda c: c.update(rms_norm_eps="1e-5"))
    else:
        (hf / "config.json").write_text(JSON_DEFECTS[defect])
    run = export_cli("--hf", str(hf), "--tokenizer", str(tokenizer_path), "--precision",
                     "float32", "--out", str(tmp_path / "out"), "--variant", "v",
                     "--skip-verify")
    assert_refused(run, "config")
    assert not (tmp_path / "out" / "v").exists()


@pytest.mark.parametrize("defect", ["invalid", "a list", "missing keys"])
def test_malformed_params_json(tmp_path, make_checkpoint, tokenizer_path, defect):
    meta = tmp_path / "meta"
    shutil.copytree(make_checkpoint("meta"), meta)
    text = {"invalid": "{", "a list": "[]", "missing keys": '{"norm_eps": 1e-5}'}[defect]
    (meta / "params.json").write_text(text)
    run = export_cli("--meta", str(meta), "--tokenizer", str(tokenizer_path), "--precision",
                     "float32", "--out", str(tmp_path / "out"), "--variant", "v")
    assert_refused(run, "params.json")


def test_checkpoints_without_the_embedding_table(tmp_path, tokenizer, tokenizer_path):
    import torch

    from llama2_onnx.synthetic import write_hf, write_meta

    config = tiny_config(tokenizer.n_words)
    hf = write_hf(tmp_path / "hf", config)
    edit_json(hf / "config.json", lambda c: c.update(tie_word_embeddings=True))
    shard = next(hf.glob("*.safetensors"))
    from llama2_onnx.safetensors_io import read_header, read_tensor, write_streaming

    infos = {k: v for k, v in read_header(shard).items() if k != "model.embed_tokens.weight"}
    arrays = {k: read_tensor(v) for k, v in infos.items()}
    write_streaming(shard, [(k, a.dtype, a.shape) for k, a in arrays.items()], arrays.__getitem__)
    meta = write_meta(tmp_path / "meta", config)
    state = torch.load(meta / "consolidated.00.pth")
    del state["tok_embeddings.weight"]
    torch.save(state, meta / "consolidated.00.pth")
    for flag, folder in (("--hf", hf), ("--meta", meta)):
        run = export_cli(flag, str(folder), "--tokenizer", str(tokenizer_path), "--precision",
                         "float32", "--out", str(tmp_path / "out"), "--variant", "v")
        assert_refused(run, "tok_embeddings")


@pytest.mark.parametrize("content", [b"not a zip at all", "list"])
def test_bad_legacy_embeddings_pth(tmp_path, content):
    import torch

    from llama2_onnx.legacy import load_pth_embeddings

    path = tmp_path / "embeddings.pth"
    if content == "list":
        torch.save({"weight": [1, 2, 3]}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(UserError, match="embeddings.pth|PyTorch file"):
        load_pth_embeddings(path)


def test_prompt_that_is_not_utf8_is_refused_before_loading():
    run = subprocess.run([sys.executable, str(EXAMPLE), "--prompt", b"caf\xe9".decode(
        "utf-8", "surrogateescape")], capture_output=True, text=True, timeout=60,
        errors="surrogateescape")
    assert_refused(run, "UTF-8")


def test_byte_flips_and_truncations_of_every_variant_file(variant):
    """Fuzz: each variant file truncated or with random bytes flipped is refused (sizes by
    default, sha256 with --verify), never run."""
    rng = random.Random(0)
    files = [p for p in sorted(variant.rglob("*")) if p.is_file() and ".cache" not in p.parts]
    for path in files:
        original = path.read_bytes()
        for mode in ("truncate", "flip"):
            if mode == "truncate":
                path.write_bytes(original[:rng.randrange(len(original))])
                args = []
            else:
                raw = bytearray(original)
                for _ in range(3):
                    raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
                path.write_bytes(bytes(raw))
                args = ["--verify"]
            run = run_example("--variant", str(variant), "--prompt", "the", "--temperature",
                              "0", "--max_gen_len", "2", *args)
            assert run.returncode == 2 and "Traceback" not in run.stderr, (path, mode, run)
            path.write_bytes(original)


# --------------------------------------------------------------------------- case 11: sizes

def test_huge_context_in_config_is_refused_with_numbers(variant):
    edit_json(variant / "config.json", lambda c: c.update(max_seq_len=10**9))
    run = run_example("--onnx_file", str(graph_of(variant)), "--prompt", "the",
                      "--max_gen_len", "2")
    assert_refused(run, "GiB")


def test_export_context_limits(tmp_path, make_checkpoint, tokenizer_path):
    base = ["--hf", str(make_checkpoint("hf")), "--tokenizer", str(tokenizer_path),
            "--precision", "float32", "--out", str(tmp_path), "--variant", "v"]
    assert_refused(export_cli(*base, "--max-seq-len", str(10**9)), "GiB")
    assert_refused(export_cli(*base, "--max-seq-len", "1"), "at least 2")
    assert_refused(export_cli(*base, "--max-seq-len", "1", "--skip-verify"), "at least 2")
    assert list(tmp_path.iterdir()) == []


def test_cli_context_flag_is_checked_before_loading(variant):
    run = run_example("--variant", str(variant), "--prompt", "the", "--max_seq_len", "1")
    assert_refused(run, "--max_seq_len")
    assert "[" not in run.stderr.split("error:")[0]  # nothing was loaded


# ------------------------------------------------------------- case 12: flags before loading

def test_max_gen_len_zero_fails_before_loading(variant):
    run = run_example("--variant", str(variant), "--prompt", "the", "--max_gen_len", "0")
    assert_refused(run, "--max_gen_len")
    assert run.stdout == ""


def test_over_long_prompt_is_not_echoed(variant):
    run = run_example("--variant", str(variant), "--prompt", "the cat " * 200,
                      "--max_gen_len", "2")
    assert_refused(run, "context holds")
    assert run.stdout == ""


def test_config_values_of_the_wrong_type_are_refused():
    from llama2_onnx.config import Config

    for change in ({"dim": True}, {"norm_eps": "1e-5"}, {"rope_theta": -1.0}, {"chat": "yes"},
                   {"multiple_of": 0}, {"ffn_dim_multiplier": float("nan")}):
        with pytest.raises(UserError, match="config value"):
            Config(**{"dim": 64, "n_heads": 4, **change})


def test_valid_files_still_run(variant):
    run = run_example("--variant", str(variant), "--prompt", "the cat", "--temperature", "0",
                      "--max_gen_len", "4")
    assert run.returncode == 0, run.stderr
    assert np.isfinite(len(run.stdout))


def test_missing_core_packages_are_one_sentence():
    """`-S` hides site-packages, as running the example with a Python outside the venv does."""
    run = subprocess.run([sys.executable, "-S", str(EXAMPLE), "--prompt", "hi"],
                         capture_output=True, text=True, timeout=60)
    assert_refused(run, "pip install -e .")


@pytest.mark.parametrize("script", ["MinimumExample/Example_ONNX_LlamaV2.py", "ChatApp/app.py",
                                    "tools/export_and_publish.py", "tools/evaluate.py",
                                    "tools/serve.py"])
def test_flags_take_both_spellings_and_help_shows_one(script):
    import importlib.util

    spec = importlib.util.spec_from_file_location("entry", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser_help = subprocess.run([sys.executable, str(ROOT / script), "--help"],
                                 capture_output=True, text=True, timeout=60).stdout
    long_flags = {w.strip("[],") for w in parser_help.split() if w.startswith(("--", "[--"))}
    assert long_flags and not any("_" in flag for flag in long_flags), long_flags
    if script.startswith("MinimumExample"):
        dashed = module.parse_args(["--max-gen-len", "7", "--top-p", "0.5", "--max-seq-len", "9"])
        underscored = module.parse_args(["--max_gen_len", "7", "--top_p", "0.5",
                                         "--max_seq_len", "9"])
        assert vars(dashed) == vars(underscored)
        assert dashed.max_gen_len == 7 and dashed.max_seq_len == 9


def test_missing_checkpoint_folder_is_named_not_the_tokenizer(tmp_path):
    run = export_cli("--hf", str(tmp_path / "nope"), "--precision", "float16", "--variant", "v",
                     "--out", str(tmp_path))
    assert_refused(run, "--hf", "nope")
    assert "tokenizer" not in run.stderr


def test_unpublished_slot_says_its_state_for_variant_and_onnx_file():
    for args in (["--variant", "7B_FT_float16"],
                 ["--onnx_file", "7B_FT_float16/ONNX/LlamaV2_7B_FT_float16.onnx"]):
        run = subprocess.run([sys.executable, str(EXAMPLE), *args, "--prompt", "hi"],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert_refused(run, "7B_FT_float16", "not published")
        assert "neither a folder nor a slot" not in run.stderr



@pytest.mark.parametrize("precision", ["float32", "int4"])
def test_export_progress_total_matches_what_it_counts(tmp_path, make_checkpoint, tokenizer_path,
                                                      monkeypatch, precision):
    import types

    from llama2_onnx.export import ExportRequest, export_variant

    bars = []

    class Bar:
        def __init__(self, total, **_):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, n):
            self.n += n

        def set_postfix_str(self, *_a, **_k):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "tqdm", types.SimpleNamespace(tqdm=Bar))
    export_variant(ExportRequest(variant="v", precision=precision, hf=make_checkpoint("hf"),
                                 tokenizer=tokenizer_path, out=tmp_path, skip_verify=True))
    assert len(bars) == 1 and bars[0].n == bars[0].total > 10


def test_context_full_is_said_and_a_base_variant_keeps_the_system_prompt(variant):
    """A base variant reads --system as plain text before the prompt, as the chat app and the
    server do (tests/test_prompt_agreement.py): nothing is ignored, so nothing is said."""
    run = run_example("--variant", str(variant), "--prompt", "the cat", "--temperature", "0",
                      "--max_gen_len", "500", "--max_seq_len", "12", "--system", "be brief")
    assert run.returncode == 0, run.stderr
    assert "context (12 tokens) is full" in run.stderr
    assert "ignored" not in run.stderr


@pytest.mark.parametrize("script", ["MinimumExample/Example_ONNX_LlamaV2.py", "ChatApp/app.py",
                                    "tools/export_and_publish.py", "tools/evaluate.py",
                                    "tools/serve.py", "tools/benchmark.py",
                                    "tools/make_random_checkpoint.py"])
def test_every_option_has_a_help_line(script, monkeypatch):
    import argparse
    import importlib.util

    class Parsed(Exception):
        pass

    def grab(self, *args, **kwargs):
        raise Parsed(self)

    spec = importlib.util.spec_from_file_location("entry", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    entry = getattr(module, "parse_args", None) or module.main
    with pytest.raises(Parsed) as caught:
        entry()
    bare, parsers = [], [("", caught.value.args[0])]
    while parsers:
        prefix, parser = parsers.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += [(f"{prefix}{name} ", sub) for name, sub in action.choices.items()]
            elif action.option_strings and action.dest != "help" and not action.help:
                bare.append(prefix + action.option_strings[-1])
    assert bare == []
