"""Publishing variants: git + LFS push to local bare remotes, submodule pins, Hub uploads."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import create_autospec

import numpy as np
import pytest

from llama2_onnx.config import Config
from llama2_onnx.errors import VariantError
from llama2_onnx.files import is_lfs_pointer, sha256_file
from llama2_onnx.hub import PublishError, parse_repo_id, resolve_relative_url
from llama2_onnx.publish import (
    FALLBACK_IDENTITY,
    SLOTS,
    TABLE_END,
    TABLE_START,
    human_size,
    publish_variant,
)
from llama2_onnx.variant_folder import check_files, write_manifest

NAME = "7B_FT_float16"
LARGE = [f"ONNX/LlamaV2_{NAME}.onnx", f"ONNX/LlamaV2_{NAME}.onnx.data",
         "embeddings.safetensors", "tokenizer.model"]
README_TEXT = f"# Llama 2 ONNX\n\nIntro.\n\n{TABLE_START}\nold table\n{TABLE_END}\n\nFooter.\n"
IDENTITY = ["-c", "user.name=Test", "-c", "user.email=test@example.com"]
FILE_ALLOW = {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "protocol.file.allow",
              "GIT_CONFIG_VALUE_0": "always"}


@pytest.fixture(autouse=True)
def isolated_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh HOME (no user identity, no global LFS filter) and no system git config."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for var in ("XDG_CONFIG_HOME", "GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME",
                "GIT_COMMITTER_EMAIL", "GIT_LFS_SKIP_SMUDGE", "GIT_DIR", "GIT_WORK_TREE",
                "GIT_INDEX_FILE", "GIT_CONFIG_COUNT"):
        monkeypatch.delenv(var, raising=False)


def git(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, f"git {args} failed: {proc.stderr}"
    return proc.stdout.strip()


def shell(command: str, cwd: Path, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(command, shell=True, cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, f"{command} failed: {proc.stderr}"


def make_variant(folder: Path, name: str = NAME, seed: int = 0) -> dict[str, bytes]:
    """A variant folder with small random 'large' files; returns every file's bytes."""
    rng = np.random.default_rng(seed)
    large = [rel.replace(NAME, name) for rel in LARGE]
    (folder / "ONNX").mkdir(parents=True)
    for rel, size in zip(large, (3000, 20000, 5000, 4000), strict=True):
        (folder / rel).write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    config = Config(dim=64, n_layers=2, n_heads=4, vocab_size=100, max_seq_len=64, chat=True)
    config.save(folder / "config.json")
    (folder / "README.md").write_text(f"# {name}\n", encoding="utf-8")
    (folder / ".gitattributes").write_text(
        "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n"
                for p in ("*.onnx", "*.onnx.data", "*.safetensors", "*.model")))
    write_manifest(folder, name)
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in folder.rglob("*") if p.is_file() and ".git" not in p.parts}


@pytest.fixture
def dist(tmp_path: Path) -> Path:
    """A distribution repo with a README holding the table markers; origin = a bare repo."""
    remotes = tmp_path / "remotes"
    remotes.mkdir()
    git("init", "-q", "--bare", "-b", "main", "dist.git", cwd=remotes)
    repo = tmp_path / "dist"
    repo.mkdir()
    git("init", "-q", "-b", "main", cwd=repo)
    (repo / "README.md").write_text(README_TEXT, encoding="utf-8")
    git("add", "README.md", cwd=repo)
    git(*IDENTITY, "commit", "-q", "-m", "init", cwd=repo)
    git("remote", "add", "origin", str(remotes / "dist.git"), cwd=repo)
    git("push", "-q", "origin", "main", cwd=repo)
    return repo


def bare(tmp_path: Path, name: str = NAME) -> Path:
    path = tmp_path / "remotes" / f"{name}.git"
    git("init", "-q", "--bare", "-b", "main", str(path), cwd=tmp_path)
    return path


def gitlink(dist: Path, path: str = NAME) -> str:
    mode, sha, _ = git("ls-files", "-s", "--", path, cwd=dist).split(maxsplit=2)
    assert mode == "160000"
    return sha


def install_lfs_globally(cwd: Path) -> None:
    """What users do once after installing git-lfs: filters in their global git config."""
    git("lfs", "install", "--skip-repo", cwd=cwd)


# ---------------------------------------------------------------------------- git remotes


def test_publish_pushes_commit_and_lfs_objects(tmp_path: Path, dist: Path) -> None:
    files = make_variant(dist / NAME)
    remote = bare(tmp_path)
    result = publish_variant(dist / NAME, f"file://{remote}")
    assert git("rev-parse", "main", cwd=remote) == result.commit
    assert str(result) == (f"published {NAME} at file://{remote} (commit {result.commit[:12]}); "
                           f"the distribution pins it as submodule {NAME} in commit "
                           f"{result.dist_commit[:12]}.")
    for rel in LARGE:
        oid = sha256_file(dist / NAME / rel)
        assert (remote / "lfs" / "objects" / oid[:2] / oid[2:4] / oid).is_file()
    install_lfs_globally(tmp_path)
    git("clone", "-q", "-b", "main", f"file://{remote}", "full", cwd=tmp_path)
    git("lfs", "pull", cwd=tmp_path / "full")
    for rel, data in files.items():
        assert (tmp_path / "full" / rel).read_bytes() == data, rel
    git("clone", "-q", "-b", "main", f"file://{remote}", "pointers", cwd=tmp_path,
        env={"GIT_LFS_SKIP_SMUDGE": "1"})
    assert all(is_lfs_pointer(tmp_path / "pointers" / rel) for rel in LARGE)
    assert (tmp_path / "pointers" / "config.json").read_bytes() == files["config.json"]


def test_dist_is_pinned_at_pushed_commit(tmp_path: Path, dist: Path) -> None:
    files = make_variant(dist / NAME)
    url = f"file://{bare(tmp_path)}"
    result = publish_variant(dist / NAME, url, message="Export 7B chat")
    assert gitlink(dist) == result.commit == git("rev-parse", "HEAD", cwd=dist / NAME)
    assert git("config", "-f", ".gitmodules", f"submodule.{NAME}.path", cwd=dist) == NAME
    assert git("config", "-f", ".gitmodules", f"submodule.{NAME}.url", cwd=dist) == url
    assert git("config", f"submodule.{NAME}.url", cwd=dist) == url
    assert git("log", "-1", "--format=%s", cwd=dist) == f"Publish {NAME} at {result.commit}"
    assert git("rev-parse", "HEAD", cwd=dist) == result.dist_commit
    assert git("status", "--porcelain", cwd=dist) == ""
    assert git("show", "HEAD:.gitmodules", cwd=dist) + "\n" == (dist / ".gitmodules").read_text()
    author = git("log", "-1", "--format=%an <%ae>|%s", cwd=dist / NAME)
    assert author == (f"{FALLBACK_IDENTITY['user.name']} <{FALLBACK_IDENTITY['user.email']}>"
                      "|Export 7B chat")
    listed = sum(len(data) for rel, data in files.items() if rel != "manifest.json")
    _check_readme(dist, result.commit, listed)


def _check_readme(dist: Path, sha: str, n_bytes: int) -> None:
    readme = (dist / "README.md").read_text()
    assert readme == git("show", "HEAD:README.md", cwd=dist) + "\n"
    assert readme.startswith("# Llama 2 ONNX\n\nIntro.\n\n") and readme.endswith("\n\nFooter.\n")
    assert "old table" not in readme
    rows = {line.split("|")[1].strip(" `"): line for line in readme.splitlines()
            if line.startswith("| `")}
    assert list(rows) == [s.name for s in SLOTS]
    assert f"published at `{sha[:12]}`" in rows[NAME] and human_size(n_bytes) in rows[NAME]
    assert all("not published yet" in row for name, row in rows.items() if name != NAME)


def test_user_identity_is_used_when_configured(tmp_path: Path, dist: Path) -> None:
    git("config", "--global", "user.name", "Ada Publisher", cwd=tmp_path)
    git("config", "--global", "user.email", "ada@example.com", cwd=tmp_path)
    make_variant(dist / NAME)
    publish_variant(dist / NAME, str(bare(tmp_path)))
    for repo in (dist, dist / NAME):
        assert git("log", "-1", "--format=%an <%ae>", cwd=repo) == "Ada Publisher <ada@example.com>"


def test_relative_url_resolves_against_origin(tmp_path: Path, dist: Path) -> None:
    make_variant(dist / NAME)
    remote = bare(tmp_path)
    result = publish_variant(dist / NAME, f"../{NAME}.git")
    assert result.url == f"../{NAME}.git"
    assert git("config", "-f", ".gitmodules", f"submodule.{NAME}.url", cwd=dist) == result.url
    assert git("remote", "get-url", "origin", cwd=dist / NAME) == str(remote)
    assert git("rev-parse", "main", cwd=remote) == result.commit == gitlink(dist)


@pytest.mark.parametrize("base,url,expected", [
    ("https://host/org/dist.git", "../v.git", "https://host/org/v.git"),
    ("https://host/org/dist.git", "../../v.git", "https://host/v.git"),
    ("https://host/org/dist.git", "./sub/v/", "https://host/org/dist.git/sub/v"),
    ("git@github.com:org/dist.git", "../v.git", "git@github.com:org/v.git"),
    ("git@github.com:org/dist.git", "../../v.git", "git@github.com:v.git"),
    ("/srv/git/dist.git/", "../v.git", "/srv/git/v.git"),
    ("file:///tmp/r/dist.git", "../v.git", "file:///tmp/r/v.git"),
    ("host:dist.git", "../v.git", "host:v.git"),
    ("../up/dist.git", "../../v.git", "../v.git"),
])
def test_resolve_relative_url_matches_git(base: str, url: str, expected: str) -> None:
    # Expected values are what `git submodule init` (2.39) writes for these remotes.
    assert resolve_relative_url(url, base) == expected


def test_republish_moves_the_pin(tmp_path: Path, dist: Path) -> None:
    make_variant(dist / NAME)
    remote = bare(tmp_path)
    first = publish_variant(dist / NAME, str(remote))
    again = publish_variant(dist / NAME, str(remote))
    assert (again.commit, again.dist_commit) == (first.commit, first.dist_commit)
    (dist / NAME / "tokenizer.model").write_bytes(b"new tokenizer" * 100)
    write_manifest(dist / NAME, NAME)
    second = publish_variant(dist / NAME, str(remote))
    assert second.commit != first.commit
    assert gitlink(dist) == second.commit == git("rev-parse", "main", cwd=remote)
    assert git("rev-parse", "HEAD~1", cwd=dist) == first.dist_commit
    sections = git("config", "-f", ".gitmodules", "--get-regexp", "url", cwd=dist)
    assert sections.splitlines() == [f"submodule.{NAME}.url {remote}"]
    assert f"published at `{second.commit[:12]}`" in (dist / "README.md").read_text()


def test_second_variant_keeps_first_row_and_adds_custom_row(tmp_path: Path, dist: Path) -> None:
    make_variant(dist / NAME)
    first = publish_variant(dist / NAME, str(bare(tmp_path)))
    make_variant(dist / "tiny_demo", name="tiny_demo", seed=1)
    publish_variant(dist / "tiny_demo", str(bare(tmp_path, "tiny_demo")))
    readme = (dist / "README.md").read_text()
    assert f"published at `{first.commit[:12]}`" in readme
    assert "| `tiny_demo` | custom variant | published at" in readme
    assert gitlink(dist) == first.commit


@pytest.mark.parametrize("url", [
    "https://user:hf_SECRET@huggingface.co/me/model",
    "https://ghp_SECRET@github.com/me/model.git",
    "ssh://git:SECRET@example.com/me/model.git",
])
def test_credentials_in_url_are_refused(tmp_path: Path, dist: Path, url: str) -> None:
    make_variant(dist / NAME)
    head = git("rev-parse", "HEAD", cwd=dist)
    with pytest.raises(PublishError, match="contains credentials") as info:
        publish_variant(dist / NAME, url)
    assert "SECRET" not in str(info.value)
    assert not (dist / NAME / ".git").exists()
    assert git("rev-parse", "HEAD", cwd=dist) == head
    with pytest.raises(PublishError, match="contains credentials"):
        parse_repo_id(url)


def test_relative_url_against_origin_with_credentials_is_refused(dist: Path) -> None:
    git("remote", "set-url", "origin", "https://me:SECRET@example.com/org/dist.git", cwd=dist)
    make_variant(dist / NAME)
    with pytest.raises(PublishError, match="contains credentials"):
        publish_variant(dist / NAME, f"../{NAME}.git")


def test_failed_push_leaves_dist_unchanged(tmp_path: Path, dist: Path) -> None:
    make_variant(dist / NAME)
    before = [git(*args, cwd=dist) for args in (("rev-parse", "HEAD"), ("ls-files", "-s"))]
    for url in (str(tmp_path / "missing" / "nowhere.git"), f"file://{tmp_path}/nowhere.git"):
        with pytest.raises(PublishError, match="does not exist; create it first.*git init --bare"):
            publish_variant(dist / NAME, url)
    after = [git(*args, cwd=dist) for args in (("rev-parse", "HEAD"), ("ls-files", "-s"))]
    assert after == before
    assert not (dist / ".gitmodules").exists()
    assert (dist / "README.md").read_text() == README_TEXT


def test_dirty_gitmodules_is_refused_before_pushing(tmp_path: Path, dist: Path) -> None:
    make_variant(dist / NAME)
    (dist / ".gitmodules").write_text("# hand edit\n")
    head = git("rev-parse", "HEAD", cwd=dist)
    remote = bare(tmp_path)
    with pytest.raises(PublishError, match="uncommitted changes"):
        publish_variant(dist / NAME, str(remote))
    assert git("rev-parse", "HEAD", cwd=dist) == head
    assert git("for-each-ref", cwd=remote) == ""
    assert (dist / ".gitmodules").read_text() == "# hand edit\n"


def test_variant_outside_the_distribution_is_refused(tmp_path: Path, dist: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    make_variant(tmp_path / "elsewhere" / NAME)
    with pytest.raises(PublishError, match="not a folder inside the distribution"):
        publish_variant(tmp_path / "elsewhere" / NAME, str(bare(tmp_path)), dist=dist)
    with pytest.raises(PublishError, match="not inside a git repository"):
        publish_variant(tmp_path / "elsewhere" / NAME, str(bare(tmp_path, "other")))


def test_readme_without_markers_is_left_alone(tmp_path: Path, dist: Path) -> None:
    (dist / "README.md").write_text("# No table here\n")
    git(*IDENTITY, "commit", "-q", "-am", "no markers", cwd=dist)
    make_variant(dist / NAME)
    publish_variant(dist / NAME, str(bare(tmp_path)))
    assert (dist / "README.md").read_text() == "# No table here\n"
    assert git("diff", "HEAD~1", "--name-only", cwd=dist).splitlines() == [".gitmodules", NAME]


def test_missing_lfs_patterns_are_added_and_manifest_kept_valid(tmp_path: Path,
                                                                 dist: Path) -> None:
    make_variant(dist / NAME)
    (dist / NAME / ".gitattributes").write_text("*.onnx filter=lfs diff=lfs merge=lfs -text\n")
    write_manifest(dist / NAME, NAME)
    publish_variant(dist / NAME, str(bare(tmp_path)))
    attributes = (dist / NAME / ".gitattributes").read_text()
    assert all(p in attributes for p in ("*.onnx.data ", "*.safetensors ", "*.model "))
    assert check_files(dist / NAME, sha256=True) == []
    assert git("lfs", "ls-files", "--name-only", cwd=dist / NAME).splitlines() == sorted(LARGE)


def test_runtime_cache_is_not_published(tmp_path: Path, dist: Path) -> None:
    make_variant(dist / NAME)
    (dist / NAME / ".cache").mkdir()
    (dist / NAME / ".cache" / "optimized.onnx").write_bytes(b"cache")
    publish_variant(dist / NAME, str(bare(tmp_path)))
    assert ".cache/optimized.onnx" not in git("ls-files", cwd=dist / NAME).splitlines()


# ---------------------------------------------------------------------------- verify


def test_verify_detects_corrupted_and_truncated_files(tmp_path: Path) -> None:
    folder = tmp_path / NAME
    make_variant(folder)
    assert check_files(folder, sha256=True) == []
    data = folder / LARGE[1]
    raw = bytearray(data.read_bytes())
    raw[1234] ^= 0xFF
    data.write_bytes(bytes(raw))
    problems = check_files(folder, sha256=True)
    assert len(problems) == 1 and "sha256" in problems[0] and LARGE[1] in problems[0]
    data.write_bytes(bytes(raw[:1000]))
    problems = check_files(folder, sha256=True)
    assert len(problems) == 1 and "truncated" in problems[0]


def test_corrupted_variant_is_not_published(tmp_path: Path, dist: Path) -> None:
    make_variant(dist / NAME)
    (dist / NAME / "tokenizer.model").write_bytes(b"x" * 4000)
    remote = bare(tmp_path)
    with pytest.raises(VariantError, match="does not match its manifest"):
        publish_variant(dist / NAME, str(remote))
    assert git("for-each-ref", cwd=remote) == ""


# ---------------------------------------------------------------------------- Hugging Face


def fake_api(error: Exception | None = None):
    """A stand-in for huggingface_hub.HfApi built from its real signatures (an autospec): a
    call with an argument HfApi does not take fails here as it would against the Hub.
    `calls(api)` lists (method, args, kwargs) in call order."""
    from huggingface_hub import HfApi

    api = create_autospec(HfApi, instance=True, spec_set=True)
    if error is not None:
        api.create_repo.side_effect = error
    else:
        api.create_repo.side_effect = lambda repo_id, **_: f"https://huggingface.co/{repo_id}"
    api.upload_folder.return_value = SimpleNamespace(
        oid="ab" * 20, commit_url="https://huggingface.co/x/commit")
    return api


def calls(api) -> list[tuple[str, tuple, dict]]:
    return [(name, args, kwargs) for name, args, kwargs in api.mock_calls]


def test_hub_mode_registers_the_upload_commit(dist: Path) -> None:
    make_variant(dist / NAME)
    api = fake_api()
    result = publish_variant(dist / NAME, "me/llama-2-7b-chat-onnx", hub=True, api=api,
                             message="Upload 7B chat")
    (create, args, kwargs), (upload, _, up) = calls(api)
    assert (create, args) == ("create_repo", ("me/llama-2-7b-chat-onnx",))
    assert kwargs["repo_type"] == "model" and kwargs["exist_ok"] is True
    assert upload == "upload_folder" and up["folder_path"] == str((dist / NAME).resolve())
    assert (up["repo_id"], up["repo_type"], up["commit_message"]) == (
        "me/llama-2-7b-chat-onnx", "model", "Upload 7B chat")
    assert up["token"] is None
    url = "https://huggingface.co/me/llama-2-7b-chat-onnx"
    assert result.url == url and result.commit == "ab" * 20 == gitlink(dist)
    assert git("config", "-f", ".gitmodules", f"submodule.{NAME}.url", cwd=dist) == url
    assert git("status", "--porcelain", "--", ".gitmodules", "README.md", cwd=dist) == ""


def test_hub_token_is_left_to_huggingface_hub_and_written_nowhere(dist: Path,
                                                                  monkeypatch) -> None:
    make_variant(dist / NAME)
    monkeypatch.setenv("HF_TOKEN", "hf_SECRET")
    api = fake_api()
    result = publish_variant(dist / NAME, "https://huggingface.co/me/model", hub=True, api=api)
    assert result.url == "https://huggingface.co/me/model" and result.left_out == ()
    assert all(kwargs["token"] is None for _, _, kwargs in calls(api))
    texts = [dist / ".gitmodules", dist / ".git" / "config", dist / "README.md",
             *(p for p in (dist / NAME).rglob("*") if p.is_file())]
    assert not any(b"hf_SECRET" in p.read_bytes() for p in texts)


def test_hub_upload_failure_leaves_dist_unchanged(dist: Path) -> None:
    make_variant(dist / NAME)
    head = git("rev-parse", "HEAD", cwd=dist)
    with pytest.raises(PublishError, match="hf auth login"):
        publish_variant(dist / NAME, "me/model", hub=True, api=fake_api(OSError("401")))
    assert git("rev-parse", "HEAD", cwd=dist) == head and not (dist / ".gitmodules").exists()


def test_hub_mode_replaces_plain_files_tracked_in_dist(dist: Path) -> None:
    make_variant(dist / NAME)
    git("add", NAME, cwd=dist)
    git(*IDENTITY, "commit", "-q", "-m", "variant as plain files", cwd=dist)
    publish_variant(dist / NAME, "me/model", hub=True, api=fake_api())
    assert git("ls-files", "--", NAME, cwd=dist) == NAME
    assert git("ls-tree", "HEAD", NAME, cwd=dist).split()[:3] == ["160000", "commit", "ab" * 20]


@pytest.mark.parametrize("bad", ["model", "me/model/extra", "https://example.com/me/model"])
def test_bad_repo_id_is_refused(bad: str) -> None:
    with pytest.raises(PublishError, match="owner/name"):
        parse_repo_id(bad)


# ---------------------------------------------------------------------------- user flow


def _publish_and_clone(tmp_path: Path, dist: Path) -> tuple[dict[str, bytes], Path]:
    files = make_variant(dist / NAME)
    bare(tmp_path)
    publish_variant(dist / NAME, f"../{NAME}.git")
    git("push", "-q", "origin", "main", cwd=dist)
    git("clone", "-q", str(tmp_path / "remotes" / "dist.git"), "clone", cwd=tmp_path)
    return files, tmp_path / "clone"


def test_user_flow_with_git_lfs_installed(tmp_path: Path, dist: Path) -> None:
    files, clone = _publish_and_clone(tmp_path, dist)
    install_lfs_globally(tmp_path)
    # git >= 2.38 refuses local (file) transport for submodules unless allowed.
    shell(f"git submodule init {NAME} && git submodule update && git lfs pull", clone,
          env=FILE_ALLOW)
    for rel, data in files.items():
        assert (clone / NAME / rel).read_bytes() == data, rel
    assert check_files(clone / NAME, sha256=True) == []


def test_user_flow_without_git_lfs_install_leaves_pointers(tmp_path: Path, dist: Path) -> None:
    # Without `git lfs install` (no smudge filter) the same commands leave pointer files and
    # the `git lfs pull` run in the superproject does not reach the submodule's objects.
    files, clone = _publish_and_clone(tmp_path, dist)
    shell(f"git submodule init {NAME} && git submodule update && git lfs pull", clone,
          env=FILE_ALLOW)
    assert all(is_lfs_pointer(clone / NAME / rel) for rel in LARGE)
    assert any("git lfs pull" in p for p in check_files(clone / NAME, sha256=True))
    shell("git lfs install && git lfs pull", clone / NAME)
    for rel, data in files.items():
        assert (clone / NAME / rel).read_bytes() == data, rel


# ---------------------------------------------------------------------------- slots


def test_slots_name_their_export_command() -> None:
    assert [s.name for s in SLOTS] == [
        "7B_float16", "7B_FT_float16", "13B_float16", "13B_FT_float16",
        "7B_float32", "7B_FT_float32", "13B_float32", "13B_FT_float32",
        "7B_int4", "7B_FT_int4", "13B_int4", "13B_FT_int4"]
    for slot in SLOTS:
        size, *chat, precision = slot.name.split("_")
        meta = f"llama-2-{size.lower()}" + ("-chat" if chat else "")
        assert f"--meta {meta} " in slot.command and f"--variant {slot.name} " in slot.command
        assert f"--precision {precision} " in slot.command
        assert ("--chat" in slot.command) == bool(chat) == ("chat" in slot.description)
        assert slot.command.endswith("--publish --remote <URL>")


def test_manifest_json_is_valid_after_publish(tmp_path: Path, dist: Path) -> None:
    make_variant(dist / NAME)
    publish_variant(dist / NAME, str(bare(tmp_path)))
    manifest = json.loads((dist / NAME / "manifest.json").read_text())
    assert manifest["variant"] == NAME and set(LARGE) <= set(manifest["files"])
