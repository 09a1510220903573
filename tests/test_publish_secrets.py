"""Publishing never ships or prints a secret (issue 9, cases 8, 9 and the Hub part of 10).

Only manifest.json and the files it lists are committed, pushed or uploaded; URLs that carry
credentials are refused with the fix, and every message that shows a URL masks its secrets.
CLI cases: exit code 2, one `error:` line, no traceback, nothing the user had changed.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import test_publish
from conftest import ROOT
from test_publish import NAME, bare, calls, fake_api, git, make_variant

from llama2_onnx.errors import PublishError, mask_secrets
from llama2_onnx.publish import publish_variant
from llama2_onnx.variant_folder import published_files

# test_publish's fixtures: a distribution repository, and git isolated from the user's config.
dist, isolated_git = test_publish.dist, test_publish.isolated_git
TOOL = ROOT / "tools" / "export_and_publish.py"
SECRET = "hf_SECRETtoken123"
STRAYS = {".env": f"HF_TOKEN={SECRET}\n", "notes.txt": "my notes\n",
          "drafts/todo.md": "- publish\n"}


def add_strays(folder: Path) -> None:
    for rel, text in STRAYS.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text, encoding="utf-8")


def snapshot(*folders: Path) -> dict[str, str]:
    """sha256 of every file under `folders` (their .git included): what the user had."""
    out = {}
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def listed(folder: Path) -> set[str]:
    import json

    return {"manifest.json", *json.loads((folder / "manifest.json").read_text())["files"]}


def run_tool(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def assert_one_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def all_objects(repo: Path) -> bytes:
    proc = subprocess.run(["git", "cat-file", "--batch-all-objects", "--batch"], cwd=repo,
                          capture_output=True, check=True)
    return proc.stdout


# ---------------------------------------------------------------------------- case 8: git


def test_publish_commits_exactly_the_manifest(tmp_path: Path, dist: Path) -> None:
    make_variant(dist / NAME)
    add_strays(dist / NAME)
    remote = bare(tmp_path)
    result = publish_variant(dist / NAME, f"file://{remote}")
    pushed = set(git("ls-tree", "-r", "--name-only", "main", cwd=remote).splitlines())
    assert pushed == listed(dist / NAME)
    for repo in (remote, dist / NAME / ".git"):
        assert SECRET.encode() not in all_objects(repo)
    assert result.left_out == (".env", "drafts/todo.md", "notes.txt")
    warning = result.warning
    assert "\n" not in warning and all(rel in warning for rel in STRAYS)
    assert SECRET not in warning
    for rel, text in STRAYS.items():  # left where they were, untouched
        assert (dist / NAME / rel).read_text() == text


def test_republish_drops_files_committed_before(tmp_path: Path, dist: Path) -> None:
    make_variant(dist / NAME)
    remote = bare(tmp_path)
    publish_variant(dist / NAME, str(remote))
    (dist / NAME / "notes.txt").write_text("notes\n")
    git("add", "-f", "notes.txt", cwd=dist / NAME)  # staged by hand (or by an older publish)
    result = publish_variant(dist / NAME, str(remote))
    assert "notes.txt" not in git("ls-tree", "-r", "--name-only", "main", cwd=remote)
    assert result.left_out == ("notes.txt",)


def test_checked_out_submodule_warns_about_nothing(tmp_path: Path, dist: Path) -> None:
    # In a clone of the distribution the variant's .git is a file; it is not a stray file.
    make_variant(dist / NAME)
    publish_variant(dist / NAME, str(bare(tmp_path)))
    git("-c", "protocol.file.allow=always", "clone", "-q", "--recurse-submodules",
        str(dist), "clone", cwd=tmp_path, env={"GIT_LFS_SKIP_SMUDGE": "1"})
    assert (tmp_path / "clone" / NAME / ".git").is_file()
    (tmp_path / "clone" / NAME / ".env").write_text(f"HF_TOKEN={SECRET}\n")
    assert published_files(tmp_path / "clone" / NAME)[1] == [".env"]


def test_cli_names_left_out_files_in_one_warning_line(tmp_path: Path, dist: Path) -> None:
    make_variant(dist / NAME)
    add_strays(dist / NAME)
    proc = run_tool("publish", "--variant", str(dist / NAME), "--remote", str(bare(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and all(rel in warnings[0] for rel in STRAYS), proc.stderr
    assert SECRET not in proc.stdout + proc.stderr


# ---------------------------------------------------------------------------- case 8: Hub


def test_hub_upload_sends_exactly_the_manifest(dist: Path) -> None:
    make_variant(dist / NAME)
    add_strays(dist / NAME)
    api = fake_api()
    left_out = list(publish_variant(dist / NAME, "me/model", hub=True, api=api).left_out)
    (_, _, upload), = [call for call in calls(api) if call[0] == "upload_folder"]
    folder_files = {p.relative_to(dist / NAME).as_posix() for p in (dist / NAME).rglob("*")
                    if p.is_file() and ".git" not in p.parts}
    sent = {rel for rel in folder_files
            if any(fnmatch.fnmatchcase(rel, pattern) for pattern in upload["allow_patterns"])}
    assert sent == listed(dist / NAME)
    assert upload["delete_patterns"] == "*"  # what the repository held before goes too
    assert left_out == sorted(STRAYS)


def test_hub_publish_returns_the_warning(dist: Path) -> None:
    make_variant(dist / NAME)
    add_strays(dist / NAME)
    result = publish_variant(dist / NAME, "me/model", hub=True, api=fake_api())
    assert result.left_out == tuple(sorted(STRAYS)) and ".env" in result.warning


# ---------------------------------------------------------------------------- case 9: URLs


SECRET_URLS = [
    f"https://example.com/me/model.git?access_token={SECRET}",
    f"https://example.com/me/model.git?token={SECRET}",
    f"https://example.com/me/model.git#{SECRET}",
    f"ssh://git@example.com/me/model.git?{SECRET}",
    f"git@example.com:me/model.git?token={SECRET}",
]


@pytest.mark.parametrize("url", SECRET_URLS)
def test_url_with_credentials_is_refused_and_masked(tmp_path: Path, dist: Path,
                                                    url: str) -> None:
    make_variant(dist / NAME)
    before = snapshot(dist)
    with pytest.raises(PublishError, match="credential helper") as info:
        publish_variant(dist / NAME, url)
    assert SECRET not in str(info.value) and "***" in str(info.value)
    assert snapshot(dist) == before and not (dist / NAME / ".git").exists()
    with pytest.raises(PublishError, match="credential helper") as info:
        publish_variant(dist / NAME, url, hub=True, api=fake_api())  # --hub URL too
    assert SECRET not in str(info.value) and snapshot(dist) == before


def test_file_url_with_token_is_refused(tmp_path: Path, dist: Path) -> None:
    make_variant(dist / NAME)
    remote = bare(tmp_path)
    with pytest.raises(PublishError, match="credential helper"):
        publish_variant(dist / NAME, f"file://{remote}?access_token={SECRET}")
    assert git("for-each-ref", cwd=remote) == ""


@pytest.mark.parametrize("relative", [f"../{NAME}.git", f"./{NAME}.git"])
def test_relative_url_against_origin_with_token_is_refused(tmp_path: Path, dist: Path,
                                                           relative: str) -> None:
    origin = f"file://{tmp_path}/remotes/dist.git?access_token={SECRET}"
    git("remote", "set-url", "origin", origin, cwd=dist)
    bare(tmp_path)
    make_variant(dist / NAME)
    before = snapshot(dist)
    with pytest.raises(PublishError, match="credential helper") as info:
        publish_variant(dist / NAME, relative)
    assert SECRET not in str(info.value)
    assert snapshot(dist) == before
    assert SECRET not in (dist / ".git" / "config").read_text().replace(origin, "")


def test_cli_refuses_token_url_with_one_line(tmp_path: Path, dist: Path) -> None:
    make_variant(dist / NAME)
    before = snapshot(dist)
    proc = run_tool("publish", "--variant", str(dist / NAME), "--remote",
                    f"https://example.com/me/model.git?access_token={SECRET}")
    line = assert_one_error(proc, "credential helper", "SSH")
    assert SECRET not in proc.stdout + proc.stderr and "***" in line
    assert snapshot(dist) == before


@pytest.mark.parametrize("text,shown", [
    (f"to https://u:{SECRET}@h.org/x.git failed", "to https://***@h.org/x.git failed"),
    (f"fatal: repository 'https://h.org/x.git?access_token={SECRET}/' not found",
     "fatal: repository 'https://h.org/x.git?***' not found"),
    (f"at ssh://git@h.org/x#{SECRET} and file:///a/b?token={SECRET}&x=1 (twice)",
     "at ssh://***@h.org/x#*** and file:///a/b?*** (twice)"),
    (f"git@h.org:x.git?token={SECRET} but not /tmp/a?b", "git@h.org:x.git?*** but not /tmp/a?b"),
])
def test_mask_secrets(text: str, shown: str) -> None:
    assert mask_secrets(text) == shown
    assert mask_secrets(shown) == shown


def test_git_stderr_in_errors_is_masked(tmp_path: Path, dist: Path) -> None:
    # git echoes the URL it failed on; one git got from the user's config (here Git LFS's
    # endpoint, with a token in it) still reaches the error message masked.
    make_variant(dist / NAME)
    lfs_url = f"https://127.0.0.1:{closed_port()}/x.git/info/lfs?token={SECRET}"
    git("config", "--global", "lfs.url", lfs_url, cwd=tmp_path)
    with pytest.raises(PublishError, match="failed") as info:
        publish_variant(dist / NAME, str(bare(tmp_path)))
    assert "127.0.0.1" in str(info.value) and SECRET not in str(info.value)


# ---------------------------------------------------------------------------- case 10: Hub


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_hub_upload_without_connection_is_one_sentence(tmp_path: Path, dist: Path) -> None:
    import huggingface_hub  # noqa: F401  (the publish extra, installed by the dev extra)
    make_variant(dist / NAME)
    before = snapshot(dist)
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_TOKEN": SECRET,
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = run_tool("publish", "--variant", str(dist / NAME), "--hub", "me/model", env=env)
    assert_one_error(proc, "uploading", "connection", "hf auth login")
    assert SECRET not in proc.stdout + proc.stderr
    assert snapshot(dist) == before
