"""Publishing pushes no commit the manifest check did not cover, and leaves other submodules'
sections of .gitmodules alone (issue 19, cases 1 and 3).

A push sends the whole history behind HEAD, so a variant folder whose repository has a commit
publish did not make (one holding files its manifest does not list, such as an `.env`) is
refused; the remote's every commit and object is searched for the secret afterwards.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import test_publish
from test_publish import FILE_ALLOW, IDENTITY, NAME, bare, git, install_lfs_globally, shell
from test_publish import make_variant as make_fake_variant
from test_publish_secrets import SECRET, all_objects, assert_one_error, run_tool, snapshot

from llama2_onnx.errors import PublishError
from llama2_onnx.publish import publish_variant
from llama2_onnx.variant_folder import write_manifest

dist, isolated_git = test_publish.dist, test_publish.isolated_git


def remote_history(remote: Path) -> tuple[set[str], bytes]:
    """Every path in every commit of the remote (all refs), and all its objects' bytes."""
    commits = git("rev-list", "--all", cwd=remote).split()
    paths = {rel for commit in commits
             for rel in git("ls-tree", "-r", "--name-only", commit, cwd=remote).splitlines()}
    return paths, all_objects(remote)


def assert_secret_never_pushed(remote: Path) -> None:
    paths, objects = remote_history(remote)
    assert ".env" not in paths
    assert SECRET.encode() not in objects
    lfs = remote / "lfs" / "objects"
    assert not any(SECRET.encode() in p.read_bytes() for p in lfs.rglob("*") if p.is_file())


def commit_all(folder: Path, message: str) -> str:
    git("add", "-A", "-f", ".", cwd=folder)
    git(*IDENTITY, "commit", "-q", "-m", message, cwd=folder)
    return git("rev-parse", "HEAD", cwd=folder)


# ---------------------------------------------------------------------------- case 1


@pytest.mark.parametrize("env_still_there", [True, False])
def test_a_folder_with_its_own_history_is_refused(tmp_path: Path, dist: Path,
                                                  env_still_there: bool) -> None:
    """The user made the folder a repository and committed an `.env`, then perhaps deleted
    it again: HEAD's tree is clean then, but the commit that held it is behind HEAD."""
    folder = dist / NAME
    make_fake_variant(folder)
    (folder / ".env").write_text(f"HF_TOKEN={SECRET}\n")
    git("init", "-q", "-b", "main", cwd=folder)
    leaky = commit_all(folder, "my work")
    if not env_still_there:
        git("rm", "-q", ".env", cwd=folder)
        git(*IDENTITY, "commit", "-q", "-m", "remove the token", cwd=folder)
    remote = bare(tmp_path)
    before = snapshot(dist)
    proc = run_tool("publish", "--variant", str(folder), "--remote", str(remote))
    line = assert_one_error(proc, "not published", leaky[:12], ".env", "publish from a clean copy")
    assert SECRET not in proc.stdout + proc.stderr
    assert "reset --soft" not in line  # no clean commit to go back to: only the fresh start
    assert snapshot(dist) == before
    assert git("for-each-ref", cwd=remote) == ""
    assert_secret_never_pushed(remote)


def test_a_commit_on_top_of_published_history_is_refused_until_dropped(tmp_path: Path,
                                                                       dist: Path) -> None:
    """A published variant's repository gets a user's commit with an `.env`; the next publish
    (of an updated variant) is refused with the command that drops it, which then works."""
    folder = dist / NAME
    make_fake_variant(folder)
    remote = bare(tmp_path)
    first = publish_variant(folder, str(remote))
    (folder / "tokenizer.model").write_bytes(b"new tokenizer" * 100)
    write_manifest(folder, NAME)  # the update (a re-export would keep the .git too)
    (folder / ".env").write_text(f"HF_TOKEN={SECRET}\n")
    git("add", "-f", ".env", cwd=folder)
    git(*IDENTITY, "commit", "-q", "-m", "keep my token here", cwd=folder)
    before = snapshot(dist)
    with pytest.raises(PublishError, match="publish from a clean copy") as info:
        publish_variant(folder, str(remote))
    assert f"reset --soft {first.commit[:12]}" in str(info.value)
    assert snapshot(dist) == before
    assert git("rev-parse", "main", cwd=remote) == first.commit
    assert_secret_never_pushed(remote)
    git("reset", "-q", "--soft", first.commit, cwd=folder)  # the fix the error names
    second = publish_variant(folder, str(remote))
    assert git("rev-parse", f"{second.commit}~1", cwd=remote) == first.commit
    assert second.left_out == (".env",)
    assert_secret_never_pushed(remote)


def test_a_clone_of_a_published_variant_publishes_its_update(tmp_path: Path,
                                                            dist: Path) -> None:
    """Publish's commits are recognised by what they hold, not by a note in one folder: a
    fresh clone of the distribution (the variant's .git is then a file) publishes again."""
    make_fake_variant(dist / NAME)
    bare(tmp_path)
    first = publish_variant(dist / NAME, f"../{NAME}.git")
    git("push", "-q", "origin", "main", cwd=dist)
    git("clone", "-q", str(tmp_path / "remotes" / "dist.git"), "clone", cwd=tmp_path)
    clone = tmp_path / "clone"
    install_lfs_globally(tmp_path)
    shell(f"git submodule init {NAME} && git submodule update && git lfs pull", clone,
          env=FILE_ALLOW)
    assert (clone / NAME / ".git").is_file()
    (clone / NAME / "tokenizer.model").write_bytes(b"updated" * 300)
    write_manifest(clone / NAME, NAME)
    second = publish_variant(clone / NAME, f"../{NAME}.git")
    remote = tmp_path / "remotes" / f"{NAME}.git"
    assert git("rev-parse", "main", cwd=remote) == second.commit != first.commit
    assert git("rev-parse", f"{second.commit}~1", cwd=remote) == first.commit


# ---------------------------------------------------------------------------- case 3


def add_other_submodule(other: Path, dist: Path, section: str, path: str) -> None:
    """Another submodule of the distribution (a repository made in `other`), at `path`, whose
    .gitmodules section is named `section`."""
    other.mkdir()
    git("init", "-q", "-b", "main", cwd=other)
    (other / "data.txt").write_text("other\n")
    commit_all(other, "other")
    git("-c", "protocol.file.allow=always", "submodule", "add", "-q", "--name", section,
        str(other), path, cwd=dist)
    git(*IDENTITY, "commit", "-q", "-m", "vendor another submodule", cwd=dist)


def sections(dist: Path) -> dict[str, dict[str, str]]:
    found = git("config", "-f", ".gitmodules", "--get-regexp", r"^submodule\.", cwd=dist)
    out: dict[str, dict[str, str]] = {}
    for line in found.splitlines():
        key, _, value = line.partition(" ")
        name, _, field = key[len("submodule."):].rpartition(".")
        out.setdefault(name, {})[field] = value
    return out


@pytest.mark.parametrize("taken", [[NAME], [NAME, f"{NAME}-2"]])
def test_a_variant_named_like_another_submodules_section_leaves_it_alone(
        tmp_path: Path, dist: Path, taken: list[str]) -> None:
    others = {}
    for i, section in enumerate(taken):
        add_other_submodule(tmp_path / f"other{i}", dist, section, f"vendor/other{i}")
        others[section] = sections(dist)[section]
    make_fake_variant(dist / NAME)
    remote = bare(tmp_path)
    proc = run_tool("publish", "--variant", str(dist / NAME), "--remote", str(remote))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    after = sections(dist)
    for section, fields in others.items():
        assert after[section] == fields  # path and URL as they were
    ours = [name for name, fields in after.items() if fields.get("path") == NAME]
    assert ours == [f"{NAME}-{len(taken) + 1}"]
    assert after[ours[0]]["url"] == str(remote)
    status = git("submodule", "status", cwd=dist)
    assert all(f"vendor/other{i}" in status for i in range(len(taken))) and NAME in status
    again = publish_variant(dist / NAME, str(remote))  # a re-publish finds its own section
    assert sections(dist) == after and again.commit == git("rev-parse", "main", cwd=remote)

