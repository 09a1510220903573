"""The checkpoint tools write only into a new or empty folder or one they wrote, and refuse bad
arguments before any work (issue 19, cases 2 and 19).

tools/make_random_checkpoint.py and tools/train_demo.py write exactly the names of a Hugging
Face download (config.json, tokenizer.model, model-0000N-of-0000M.safetensors), so a folder
holding anything they did not write (their mark lists what they wrote) is refused. Each refusal:
exit code 2, one `error:` line, no traceback, every file the user had unchanged, and for
train_demo.py no training started.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from test_safe_export import assert_refused, tree_digest

from llama2_onnx.errors import UserError
from llama2_onnx.staging import TOOL_MARK, check_tool_out, claim_tool_out

TOOLS = ROOT / "tools"
DOWNLOAD = {  # what `huggingface-cli download meta-llama/Llama-2-7b-hf` leaves, in small
    "config.json": '{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}\n',
    "tokenizer.model": "real sentencepiece model\n",
    "model-00001-of-00002.safetensors": "real weights, part 1\n",
    "model-00002-of-00002.safetensors": "real weights, part 2\n",
    "model.safetensors.index.json": '{"weight_map": {}}\n',
}


def tool_module(name: str):
    """tools/<name>.py as a module (registered, as its dataclasses need), loaded once."""
    key = f"tool_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, TOOLS / f"{name}.py")
        sys.modules[key] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[key]


@pytest.fixture(scope="module")
def random_tool():
    return tool_module("make_random_checkpoint")


@pytest.fixture(scope="module")
def train_tool():
    return tool_module("train_demo")


def run_in_process(module, argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """module.main() with `argv`, as the command line runs it: (exit code, stdout, stderr).
    An exception other than SystemExit (a traceback on the command line) fails the test."""
    monkeypatch.setattr(sys, "argv", [module.__file__, *argv])
    with pytest.raises(SystemExit) as exited:
        module.main()
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def assert_one_error(code: int, out: str, err: str, *words: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], lines[0]
    assert "wrote" not in out and "step" not in out, out  # nothing written, no training
    return lines[0]


def download(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name, text in DOWNLOAD.items():
        (folder / name).write_text(text)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Text in the `bible -f` format, with enough verses to pass train_demo's corpus check."""
    words = "and the lord said unto moses in beginning god created heaven earth light".split()
    lines = [f"Ge{chapter}:{verse} " + " ".join(words[(chapter + verse + i) % len(words)]
                                                for i in range(8))
             for chapter in range(1, 321) for verse in range(1, 51)]
    path = tmp_path_factory.mktemp("corpus") / "kjv.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train_args(out: Path, corpus: Path, *extra: str) -> list[str]:
    return ["--out", str(out), "--corpus", str(corpus), "--device", "cpu", "--steps", "2",
            "--dim", "64", "--n-layers", "1", "--vocab-size", "400", "--seq-len", "16", *extra]


# ---------------------------------------------------------------------------- case 2


def test_make_random_checkpoint_never_replaces_a_download(tmp_path, random_tool, monkeypatch,
                                                          capsys):
    folder = download(tmp_path / "Llama-2-7b-hf")
    before = tree_digest(folder)
    result = run_in_process(random_tool, ["--out", str(folder)], monkeypatch, capsys)
    assert_one_error(*result, str(folder), "did not write", "new or empty folder")
    assert tree_digest(folder) == before


def test_train_demo_never_replaces_a_download_and_says_so_before_training(tmp_path, corpus):
    folder = download(tmp_path / "Llama-2-7b-hf")
    before = tree_digest(folder)
    run = subprocess.run([sys.executable, str(TOOLS / "train_demo.py"),
                          *train_args(folder, corpus)], capture_output=True, text=True,
                         timeout=120)
    assert_refused(run, str(folder), "did not write", "new or empty folder")
    assert "step" not in run.stdout and "corpus:" not in run.stdout
    assert tree_digest(folder) == before


@pytest.mark.parametrize("tool", ["make_random_checkpoint", "train_demo"])
def test_out_that_is_a_file_is_refused(tmp_path, corpus, tool, monkeypatch, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("mine\n")
    args = train_args(path, corpus) if tool == "train_demo" else ["--out", str(path)]
    result = run_in_process(tool_module(tool), args, monkeypatch, capsys)
    assert_one_error(*result, "is a file", "new or empty folder")
    assert path.read_text() == "mine\n"


def test_a_tool_folder_with_a_file_added_is_refused(tmp_path, random_tool, monkeypatch,
                                                    capsys):
    out = tmp_path / "ckpt"
    claim_tool_out(out, ["config.json", "model.safetensors"], "test")
    (out / "config.json").write_text("{}")
    (out / "my_notes.md").write_text("mine\n")
    before = tree_digest(out)
    result = run_in_process(random_tool, ["--out", str(out)], monkeypatch, capsys)
    assert_one_error(*result, "my_notes.md", "did not write")
    assert tree_digest(out) == before


def test_claim_replaces_only_what_the_tool_wrote(tmp_path):
    out = tmp_path / "ckpt"
    assert check_tool_out(out) == [] and not out.exists()
    out.mkdir()
    claim_tool_out(out, ["config.json", "model-00001-of-00002.safetensors",
                         "model-00002-of-00002.safetensors"], "test")
    for name in ("config.json", "model-00001-of-00002.safetensors",
                 "model-00002-of-00002.safetensors", "half.safetensors.tmp"):
        (out / name).write_text("old run")
    claim_tool_out(out, ["config.json", "model.safetensors"], "test")
    # The earlier run's shards are gone (they would mix with the new weights), a .tmp stays.
    assert sorted(p.name for p in out.iterdir()) == [TOOL_MARK, "half.safetensors.tmp"]
    assert json.loads((out / TOOL_MARK).read_text())["files"] == ["config.json",
                                                                 "model.safetensors"]


@pytest.mark.parametrize("files", [["../outside.txt"], ["sub/x"], "config.json", [3], [".."]])
def test_a_mark_that_lists_other_places_is_not_ours(tmp_path, files):
    out = tmp_path / "ckpt"
    out.mkdir()
    (tmp_path / "outside.txt").write_text("keep\n")
    (out / TOOL_MARK).write_text(json.dumps({"files": files}))
    with pytest.raises(UserError, match="did not write"):
        claim_tool_out(out, ["config.json"], "test")
    assert (tmp_path / "outside.txt").read_text() == "keep\n"


def test_a_listed_name_that_became_a_folder_is_refused(tmp_path):
    out = tmp_path / "ckpt"
    claim_tool_out(out, ["config.json"], "test")
    (out / "config.json").mkdir()
    (out / "config.json" / "x").write_text("mine\n")
    with pytest.raises(UserError, match="config.json, which this tool did not write"):
        claim_tool_out(out, ["config.json"], "test")


# ---------------------------------------------------------------------------- case 19


@pytest.mark.parametrize("args,words", [
    (["--shards", "0"], ["--shards 0 must be at least 1"]),
    (["--shards", "-2"], ["--shards -2 must be at least 1"]),
    (["--shards", "1000"], ["--shards 1000 is more than the model's 39 tensors"]),
    (["--format", "meta", "--shards", "3"], ["--shards 3 does not divide"]),
    (["--seed", "-1"], ["--seed -1 must be 0 or more"]),
])
def test_make_random_checkpoint_refuses_bad_arguments(tmp_path, random_tool, monkeypatch,
                                                      capsys, args, words):
    out = tmp_path / "ckpt"
    result = run_in_process(random_tool, ["--out", str(out), *args], monkeypatch, capsys)
    assert_one_error(*result, *words)
    assert not out.exists()


@pytest.mark.parametrize("extra,words", [
    (["--dim", "8"], ["--dim 8 with --n-heads 4", "multiple of 64"]),
    (["--dim", "100"], ["--dim 100 with --n-heads 4"]),
    (["--n-heads", "0"], ["--n-heads 0 must be a positive number"]),
    (["--steps", "0"], ["--steps 0 must be a positive number"]),
    (["--lr", "-1"], ["--lr -1.0 must be a positive number"]),
    (["--warmup", "-5"], ["--warmup -5 must be 0 or more"]),
    (["--vocab-size", "100"], ["--vocab-size 100 is too small", "at least 277"]),
])
def test_train_demo_refuses_bad_arguments_before_training(tmp_path, corpus, train_tool,
                                                          monkeypatch, capsys, extra, words):
    out = tmp_path / "ckpt"
    result = run_in_process(train_tool, train_args(out, corpus, *extra), monkeypatch, capsys)
    assert_one_error(*result, *words)
    assert not out.exists()


def test_train_demo_refuses_a_binary_corpus(tmp_path, train_tool, monkeypatch, capsys):
    corpus = tmp_path / "kjv.txt"
    corpus.write_bytes(bytes(range(256)) * 8)
    before = tree_digest(tmp_path)
    result = run_in_process(train_tool, train_args(tmp_path / "ckpt", corpus), monkeypatch,
                            capsys)
    assert_one_error(*result, "is binary, not UTF-8 text", "bible -f")
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize("content,words", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", ["is binary, not UTF-8 text"]),
    ("caf\u00e9".encode("latin-1"), ["is binary, not UTF-8 text (at byte 3)"]),
    (b"", ["is empty"]),
    (b" \n\t\n", ["is empty"]),
])
def test_evaluate_refuses_binary_or_empty_text_before_loading(tmp_path, content, words):
    text = tmp_path / "text.txt"
    text.write_bytes(content)
    run = subprocess.run([sys.executable, str(TOOLS / "evaluate.py"), "--variant",
                          str(tmp_path / "no_such_variant"), "--text", str(text)],
                         capture_output=True, text=True, timeout=120)
    assert_refused(run, *words)  # the text is refused before the variant is even looked for
    assert text.read_bytes() == content
