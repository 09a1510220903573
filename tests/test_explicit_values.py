"""An explicit value is used or refused, never replaced by the default (issue 19, case 7).

`x or default` treated 0 as "not given": `--block-size 0` exported blocks of 32 and
`--max-seq-len 0` the full context. The same class elsewhere: the benchmark dropped
`--block-size 0` (and `--variant ""`) before calling the exporter, perplexity's window and
stride, and train_demo's `--n-kv-heads 0`.
"""

from __future__ import annotations

import subprocess
from types import SimpleNamespace

import pytest
from test_safe_export import assert_refused, export_cli, tree_digest
from test_tools_never_overwrite import assert_one_error, run_in_process, tool_module, train_args

from llama2_onnx.errors import UserError
from llama2_onnx.evaluate import perplexity


@pytest.mark.parametrize("flags,words", [
    (["--precision", "float32", "--max-seq-len", "0"], ["--max-seq-len 0 is too short"]),
    (["--precision", "float32", "--max-seq-len", "-4"], ["--max-seq-len -4 is too short"]),
    (["--precision", "int4", "--block-size", "0"], ["block size 0 is not one of 32, 64, 128"]),
])
def test_export_uses_or_refuses_an_explicit_zero(tmp_path, make_checkpoint, tokenizer_path,
                                                 flags, words):
    checkpoint = make_checkpoint("hf")
    before = tree_digest(checkpoint)
    run = export_cli("--hf", str(checkpoint), "--tokenizer", str(tokenizer_path), "--variant",
                     "v", "--out", str(tmp_path), "--no-progress", *flags)
    assert_refused(run, *words)
    assert list(tmp_path.iterdir()) == [] and tree_digest(checkpoint) == before


@pytest.mark.parametrize("window,stride", [(0, None), (8, 0), (0, 0)])
def test_perplexity_refuses_a_zero_window_or_stride(window, stride):
    engine = SimpleNamespace(context_len=16)  # refused before the engine is used
    with pytest.raises(UserError, match="does not fit a context of 16"):
        perplexity(engine, list(range(40)), window=window, stride=stride)


@pytest.mark.parametrize("option,value", [("block_size", 0), ("variant", "")])
def test_benchmark_passes_explicit_values_to_the_exporter(tmp_path, monkeypatch, option, value):
    benchmark = tool_module("benchmark")
    seen = []

    def run(cmd, **_):
        seen.append(cmd)
        return SimpleNamespace(returncode=2, stderr="refused")

    monkeypatch.setattr(subprocess, "run", run)
    args = SimpleNamespace(variant=None, hf=tmp_path, meta=None, precision="int4", out=tmp_path,
                           skip_verify=True, tokenizer=None, block_size=None)
    setattr(args, option, value)
    with pytest.raises(SystemExit):
        benchmark.bench_export(args)
    flag = "--" + option.replace("_", "-")
    assert seen[0][seen[0].index(flag) + 1] == str(value)


def test_train_demo_refuses_zero_kv_heads(tmp_path, monkeypatch, capsys):
    out = tmp_path / "ckpt"
    result = run_in_process(tool_module("train_demo"),
                            train_args(out, tmp_path / "unused.txt", "--n-kv-heads", "0"),
                            monkeypatch, capsys)
    assert_one_error(*result, "--n-kv-heads 0 must be between 1 and --n-heads 4")
    assert not out.exists()
