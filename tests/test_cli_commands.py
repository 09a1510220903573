"""Every command of tools/export_and_publish.py run as a user types it, in a subprocess: export
(and `--force` over a variant it wrote), verify, publish to a local bare repository with Git
LFS, and `export --publish`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT
from test_publish import bare, dist, git, gitlink, isolated_git

from llama2_onnx.config import Config
from llama2_onnx.files import sha256_file
from llama2_onnx.variant_folder import write_manifest

__all__ = ["dist", "isolated_git"]  # fixtures shared with test_publish
TOOL = [sys.executable, str(ROOT / "tools" / "export_and_publish.py")]


def tool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(TOOL + list(args), cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def ok(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    return run.stdout


def export_args(checkpoint: Path, fmt: str, tokenizer_path: Path, out: Path, variant: str,
                precision: str = "float32") -> list[str]:
    return ["export", f"--{fmt}", str(checkpoint), "--tokenizer", str(tokenizer_path),
            "--precision", precision, "--variant", variant, "--out", str(out), "--no-progress"]


def test_export_and_force_over_the_exporters_own_variant(tmp_path, make_checkpoint,
                                                        tokenizer_path):
    meta = make_checkpoint("meta", True)
    out = ok(tool(*export_args(meta, "meta", tokenizer_path, tmp_path, "tiny"), cwd=tmp_path))
    assert "verify OK" in out and f"exported {tmp_path / 'tiny'}" in out
    assert Config.load(tmp_path / "tiny" / "config.json").dtype == "float32"
    again = tool(*export_args(meta, "meta", tokenizer_path, tmp_path, "tiny", "float16"),
                 cwd=tmp_path)
    assert again.returncode == 2 and "--force" in again.stderr
    forced = ok(tool(*export_args(meta, "meta", tokenizer_path, tmp_path, "tiny", "float16"),
                     "--force", cwd=tmp_path))
    assert "verify OK" in forced
    assert Config.load(tmp_path / "tiny" / "config.json").dtype == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "tiny"]  # nothing left over


def test_verify_passes_a_good_variant_and_fails_a_corrupted_one(tmp_path, make_variant):
    import shutil

    folder = tmp_path / "tiny"
    shutil.copytree(make_variant("hf", "float32", True), folder)
    assert f"OK {Path('tiny')}" in ok(tool("verify", "tiny", cwd=tmp_path))
    data = next((folder / "ONNX").glob("*.onnx.data"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 3] ^= 0x01  # same size, one bit: only the sha256 can tell
    data.write_bytes(bytes(raw))
    failed = tool("verify", "--variant", str(folder), cwd=tmp_path)  # as publish takes it
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert "FAIL" in failed.stdout and "sha256" in failed.stdout and data.name in failed.stdout
    missing = tool("verify", str(tmp_path / "absent"), cwd=tmp_path)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


def published_files_match(variant: Path, remote: Path, dist: Path) -> None:
    """The remote's main is the pinned commit and holds every large file as an LFS object."""
    assert git("rev-parse", "main", cwd=remote) == gitlink(dist, variant.name)
    manifest = json.loads((variant / "manifest.json").read_text())
    large = [rel for rel in manifest["files"] if rel.endswith((".onnx", ".data", ".safetensors"))]
    assert len(large) == 3
    for rel in large:
        oid = sha256_file(variant / rel)
        assert (remote / "lfs" / "objects" / oid[:2] / oid[2:4] / oid).is_file(), rel


def test_publish_command_pushes_and_pins(tmp_path, dist, make_checkpoint, tokenizer_path):
    ok(tool(*export_args(make_checkpoint("hf"), "hf", tokenizer_path, dist, "tiny"), cwd=dist))
    remote = bare(tmp_path, "tiny")
    out = ok(tool("publish", "--variant", "tiny", "--remote", "../tiny.git", cwd=dist))
    assert "tiny" in out
    published_files_match(dist / "tiny", remote, dist)
    assert git("config", "-f", ".gitmodules", "submodule.tiny.url", cwd=dist) == "../tiny.git"
    assert "| `tiny` | custom variant | published at" in (dist / "README.md").read_text()
    assert git("status", "--porcelain", cwd=dist) == ""


def test_export_with_publish(tmp_path, dist, make_checkpoint, tokenizer_path):
    remote = bare(tmp_path, "tiny_meta")
    args = export_args(make_checkpoint("meta"), "meta", tokenizer_path, dist, "tiny_meta")
    out = ok(tool(*args, "--publish", "--remote", f"file://{remote}", cwd=tmp_path))
    assert "verify OK" in out and f"exported {dist / 'tiny_meta'}" in out
    published_files_match(dist / "tiny_meta", remote, dist)
    assert git("log", "-1", "--format=%s", cwd=dist).startswith("Publish tiny_meta at ")
    lonely = tool(*args, "--force", "--remote", f"file://{remote}", cwd=tmp_path)
    assert lonely.returncode == 2 and "--publish" in lonely.stderr



def test_publish_again_after_a_change_moves_the_pin(tmp_path, dist, make_checkpoint,
                                                    tokenizer_path):
    ok(tool(*export_args(make_checkpoint("hf"), "hf", tokenizer_path, dist, "tiny"), cwd=dist))
    remote = bare(tmp_path, "tiny")
    ok(tool("publish", "--variant", "tiny", "--remote", "../tiny.git", cwd=dist))
    first = gitlink(dist, "tiny")
    card = dist / "tiny" / "README.md"
    card.write_text(card.read_text() + "\nEvaluated on the test set.\n")
    write_manifest(dist / "tiny", "tiny")  # as a re-export would
    ok(tool("publish", "--variant", "tiny", "--remote", "../tiny.git", cwd=dist))
    second = gitlink(dist, "tiny")
    assert second != first and second == git("rev-parse", "main", cwd=remote)
    assert git("rev-parse", "HEAD~1:tiny", cwd=dist) == first
    assert f"published at `{second[:12]}`" in (dist / "README.md").read_text()


def test_export_force_publish_over_a_published_variant(tmp_path, dist, make_checkpoint,
                                                       tokenizer_path):
    remote = bare(tmp_path, "tiny")
    checkpoint = make_checkpoint("hf")
    ok(tool(*export_args(checkpoint, "hf", tokenizer_path, dist, "tiny"), "--publish",
            "--remote", "../tiny.git", cwd=dist))
    first = gitlink(dist, "tiny")
    ok(tool(*export_args(checkpoint, "hf", tokenizer_path, dist, "tiny", "float16"), "--force",
            "--publish", "--remote", "../tiny.git", cwd=dist))
    assert gitlink(dist, "tiny") == git("rev-parse", "main", cwd=remote) != first
    assert git("rev-list", "--count", "main", cwd=remote) == "2"
