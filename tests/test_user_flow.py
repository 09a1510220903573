"""The whole user flow: export, publish to local bare repositories with Git LFS, clone the
distribution, fetch the variant with the documented commands, and run the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT
from test_publish import FILE_ALLOW, bare, dist, git, install_lfs_globally, isolated_git, shell

from llama2_onnx.export import ExportRequest, export_variant
from llama2_onnx.publish import publish_variant

__all__ = ["dist", "isolated_git"]  # fixtures shared with test_publish
NAME = "tiny_FT_float32"
FETCH = f"git submodule init {NAME} && git submodule update && git lfs pull"


def run_cli(variant: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "MinimumExample" / "Example_ONNX_LlamaV2.py"), "--variant",
         str(variant), "--prompt", "the cat sat", "--temperature", "0", "--max_gen_len", "16",
         "--provider", "cpu"], capture_output=True, text=True, timeout=120)


def greedy_text(variant: Path) -> str:
    run = run_cli(variant)
    assert run.returncode == 0, run.stderr
    return run.stdout


def publish_tiny_variant(tmp_path: Path, dist: Path, checkpoint: Path, tokenizer: Path) -> str:
    export_variant(ExportRequest(variant=NAME, precision="float32", hf=checkpoint,
                                 tokenizer=tokenizer, out=dist, chat=False, progress=False))
    before = greedy_text(dist / NAME)
    bare(tmp_path, NAME)
    publish_variant(dist / NAME, f"../{NAME}.git")
    git("push", "-q", "origin", "main", cwd=dist)
    return before


def test_fetch_without_lfs_says_git_lfs_pull_then_runs(tmp_path, dist, make_checkpoint,
                                                       tokenizer_path):
    before = publish_tiny_variant(tmp_path, dist, make_checkpoint("hf", True), tokenizer_path)
    git("clone", "-q", str(tmp_path / "remotes" / "dist.git"), "clone", cwd=tmp_path)
    clone = tmp_path / "clone"
    empty = run_cli(clone / NAME)
    assert empty.returncode == 2 and f"git submodule init {NAME}" in empty.stderr
    shell(FETCH, clone, env=FILE_ALLOW)  # no `git lfs install` yet: pointer files
    pointers = run_cli(clone / NAME)
    assert pointers.returncode == 2 and "git lfs pull" in pointers.stderr
    assert "Traceback" not in pointers.stderr
    shell("git lfs install && git lfs pull", clone / NAME)
    assert greedy_text(clone / NAME) == before


def test_documented_fetch_commands_give_the_same_text(tmp_path, dist, make_checkpoint,
                                                      tokenizer_path):
    before = publish_tiny_variant(tmp_path, dist, make_checkpoint("hf", True), tokenizer_path)
    install_lfs_globally(tmp_path)
    git("clone", "-q", str(tmp_path / "remotes" / "dist.git"), "clone", cwd=tmp_path)
    clone = tmp_path / "clone"
    shell(FETCH, clone, env=FILE_ALLOW)
    assert greedy_text(clone / NAME) == before
    assert before.startswith("the cat sat") and len(before) > len("the cat sat\n")
