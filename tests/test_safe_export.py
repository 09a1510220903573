"""Nothing the exporter is told destroys data: variant names, --force, signals, full disks.

Every case runs the real command line and checks exit code 2, one `error:` line, no traceback,
and that every file the user had is byte for byte unchanged. Cases that aim at the checkout run
in a throwaway clone of this repository under a temporary folder.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from llama2_onnx.errors import UserError
from llama2_onnx.export import ExportRequest, export_variant
from llama2_onnx.variant_folder import STAGING_MARK
from llama2_onnx.variants import check_variant_name

DEAD_PID = 2**22 + 12345  # above Linux's pid_max: never a running process
BAD_NAMES = ["", ".", "..", "a/b", "../x", "-x", ".hidden", "a b", "x" * 101, "a\\b", "7B\n"]


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (.git included), by relative path."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def export_cli(*args: str, cwd: Path | None = None, tool_root: Path = ROOT,
               **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(tool_root / "tools" / "export_and_publish.py"),
                           "export", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, **popen)


def assert_refused(run: subprocess.CompletedProcess, *words: str) -> None:
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert "Traceback" not in run.stderr
    for word in words:
        assert word in lines[0]


@pytest.fixture
def hf_args(make_checkpoint, tokenizer_path):
    return ["--hf", str(make_checkpoint("hf")), "--tokenizer", str(tokenizer_path),
            "--precision", "float32", "--no-progress"]


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A throwaway clone of this repository with the code under test (the working tree's, not
    only what is committed): destructive cases aim at it, never at ROOT."""
    target = tmp_path_factory.mktemp("clone") / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(target)], check=True)
    for folder in ("llama2_onnx", "tools"):
        shutil.copytree(ROOT / folder, target / folder, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return target


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_variant_names_are_refused(name):
    with pytest.raises(UserError, match="variant name"):
        check_variant_name(name)


@pytest.mark.parametrize("name", ["", ".", "..", "../escape", "sub/dir", "-rf"])
def test_bad_names_with_force_never_touch_the_default_out(clone, hf_args, name):
    before = tree_digest(clone)
    run = export_cli(*hf_args, "--variant=" + name, "--force", tool_root=clone)
    assert_refused(run, "variant name")
    assert tree_digest(clone) == before
    assert not (clone.parent / "escape").exists()


def test_force_never_replaces_the_source_checkpoint(tmp_path, make_checkpoint, tokenizer_path):
    src = tmp_path / "src"
    shutil.copytree(make_checkpoint("hf"), src)
    before = tree_digest(tmp_path)
    run = export_cli("--hf", str(src), "--tokenizer", str(tokenizer_path), "--precision",
                     "float32", "--no-progress", "--out", str(tmp_path), "--variant", "src",
                     "--force")
    assert_refused(run, "src")
    assert tree_digest(tmp_path) == before


def test_force_never_replaces_the_checkout(clone, hf_args):
    before = tree_digest(clone)
    run = export_cli(*hf_args, "--out", str(clone.parent), "--variant", clone.name, "--force",
                     tool_root=clone)
    assert_refused(run)
    assert tree_digest(clone) == before


def test_force_never_replaces_the_demo_the_repository_tracks(clone, hf_args):
    """The demo is an exporter-written variant folder (manifest, config) and part of the
    repository's own files: --force refuses it and names why."""
    before = tree_digest(clone / "demo")
    run = export_cli(*hf_args, "--variant", "demo", "--force", tool_root=clone)
    assert_refused(run, "part of the git repository around it", "demo/")
    assert tree_digest(clone / "demo") == before


def test_force_refuses_folders_it_did_not_write(tmp_path, hf_args):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    (tmp_path / "afile").write_text("a file at the target")
    before = tree_digest(tmp_path)
    for name in ("notes", "afile"):
        run = export_cli(*hf_args, "--out", str(tmp_path), "--variant", name, "--force")
        assert_refused(run, "--force")
    run = export_cli(*hf_args, "--out", str(tmp_path), "--variant", "notes", "--force")
    assert f"but {notes} holds no manifest.json and config.json of this exporter; move it " \
        "away or choose another --variant/--out." in " ".join(run.stderr.split())
    assert tree_digest(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "notes"]  # no leftovers


def test_force_refuses_an_export_with_a_file_added(tmp_path, hf_args):
    assert export_cli(*hf_args, "--out", str(tmp_path), "--variant", "v").returncode == 0
    (tmp_path / "v" / ".env").write_text("HF_TOKEN=secret\n")
    before = tree_digest(tmp_path)
    run = export_cli(*hf_args, "--out", str(tmp_path), "--variant", "v", "--force")
    assert_refused(run, ".env")
    assert "holds .env, which it did not write; move it away" in run.stderr
    assert tree_digest(tmp_path) == before


def test_force_replaces_an_export_and_keeps_its_git_repository(tmp_path, hf_args):
    assert export_cli(*hf_args, "--out", str(tmp_path), "--variant", "v").returncode == 0
    subprocess.run(["git", "init", "-q", str(tmp_path / "v")], check=True)
    head = (tmp_path / "v" / ".git" / "HEAD").read_text()
    (tmp_path / "v" / "ONNX" / ".cache").mkdir()
    (tmp_path / "v" / "ONNX" / ".cache" / "x.onnx").write_text("cache")
    run = export_cli(*hf_args, "--out", str(tmp_path), "--variant", "v", "--force")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "v" / ".git" / "HEAD").read_text() == head
    assert not (tmp_path / "v" / "ONNX" / ".cache").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]


def test_out_that_is_a_file_is_refused(tmp_path, hf_args):
    (tmp_path / "f").write_text("x")
    assert_refused(export_cli(*hf_args, "--out", str(tmp_path / "f"), "--variant", "v"), "file")
    assert (tmp_path / "f").read_text() == "x"


def test_full_disk_mid_write_leaves_nothing(tmp_path, make_checkpoint, tokenizer_path,
                                            monkeypatch):
    import llama2_onnx.export as export

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(export, "_write_embeddings", full)
    request = ExportRequest(variant="v", precision="float32", hf=make_checkpoint("hf"),
                            tokenizer=tokenizer_path, out=tmp_path, progress=False)
    with pytest.raises(UserError, match="disk filled up"):
        export_variant(request)
    assert list(tmp_path.iterdir()) == []


def _start_export(tmp_path: Path, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "export_and_publish.py"), "export", *args,
         "--out", str(tmp_path), "--variant", "v", "--force"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_staging(tmp_path: Path, proc: subprocess.Popen, extra_delay: float) -> bool:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if list(tmp_path.glob(".v.partial-*")):
            time.sleep(extra_delay)
            return proc.poll() is None
        time.sleep(0.005)
    return False


# The staging folder lives ~0.1 s for this tiny model (PyTorch is imported before it exists),
# so the delays land inside it or at its end.
@pytest.mark.parametrize("sig,delay", [(signal.SIGTERM, 0.0), (signal.SIGTERM, 0.05),
                                       (signal.SIGINT, 0.02), (signal.SIGHUP, 0.04)])
def test_signals_leave_the_previous_variant_and_no_partial(tmp_path, hf_args, sig, delay):
    assert export_cli(*hf_args, "--out", str(tmp_path), "--variant", "v").returncode == 0
    before = tree_digest(tmp_path / "v")
    proc = _start_export(tmp_path, hf_args)
    interrupted = _wait_for_staging(tmp_path, proc, delay)
    if interrupted:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if interrupted:
        # 0: it finished before the signal landed; -sig: it landed after the export was done
        # and in place, while the process was exiting (the tree is checked below either way).
        assert proc.returncode in (128 + sig, 0, -sig), err
        if proc.returncode != -sig:
            assert "Traceback" not in err
        if proc.returncode == 128 + sig:  # the cleanup is said, not silent
            assert "interrupted: the partial export of v was removed" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]
    after = tree_digest(tmp_path / "v")
    assert after == before or proc.returncode == 0  # an export that finished wrote the same
    assert set(after) == set(before)


def test_signals_never_land_inside_the_import_of_pytorch(tmp_path, hf_args):
    """A SIGHUP during `import torch` (verification's reference, imported lazily) aborted the
    exporter with pybind11's error_already_set and left its staging folder; PyTorch is now
    imported before signals become interrupts."""
    script = ("import runpy, sys\n"
              "import llama2_onnx.export as export\n"
              "real = export.begin_staging\n"
              "def begin(path):\n"
              "    assert 'torch' in sys.modules, 'torch imported after staging began'\n"
              "    return real(path)\n"
              "export.begin_staging = begin\n"
              f"sys.argv = ['export_and_publish.py', 'export', *{hf_args!r}, '--out', "
              f"{str(tmp_path)!r}, '--variant', 'v']\n"
              f"runpy.run_path({str(ROOT / 'tools' / 'export_and_publish.py')!r}, "
              "run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]


def test_sigkill_partial_is_removed_by_the_next_export(tmp_path, hf_args):
    proc = _start_export(tmp_path, hf_args)
    if _wait_for_staging(tmp_path, proc, 0.1):
        proc.kill()
    proc.communicate(timeout=120)
    assert not (tmp_path / "v").exists() or (tmp_path / "v" / "manifest.json").exists()
    stale = tmp_path / f".v.partial-{DEAD_PID}"  # what a killed export leaves: marked
    stale.mkdir()
    (stale / STAGING_MARK).write_text("1\n")
    (stale / "big.data").write_bytes(b"\0" * 1000)
    run = export_cli(*hf_args, "--out", str(tmp_path), "--variant", "v", "--force")
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]


def test_lookalike_folders_of_others_are_never_removed(tmp_path, hf_args):
    """Named like leftovers, but not marked or not entirely the exporter's: kept."""
    partial = tmp_path / f".mine.partial-{DEAD_PID}"
    partial.mkdir()
    (partial / "thesis.tex").write_text("mine")
    old = tmp_path / f".notes.old-{DEAD_PID}"
    old.mkdir()
    (old / "todo.txt").write_text("mine")
    (tmp_path / "notes").mkdir()  # so the .old- folder is not "restored" either
    before = tree_digest(tmp_path)
    assert export_cli(*hf_args, "--out", str(tmp_path), "--variant", "v").returncode == 0
    after = tree_digest(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("v/")} == before


def test_staging_name_taken_by_someone_else_is_refused_and_kept(tmp_path, make_checkpoint,
                                                               tokenizer_path):
    import os

    taken = tmp_path / f".v.partial-{os.getpid()}"
    taken.mkdir()
    (taken / "mine.txt").write_text("mine")
    request = ExportRequest(variant="v", precision="float32", hf=make_checkpoint("hf"),
                            tokenizer=tokenizer_path, out=tmp_path, progress=False)
    with pytest.raises(UserError, match="not made by this exporter"):
        export_variant(request)
    assert (taken / "mine.txt").read_text() == "mine" and not (tmp_path / "v").exists()


def test_a_variant_hidden_by_a_killed_swap_comes_back(tmp_path, hf_args):
    """SIGKILL between the two renames of --force leaves the old variant as .v.old-PID and no
    v: the next export in that folder renames it back (and does not treat v as replaceable
    without --force)."""
    assert export_cli(*hf_args, "--out", str(tmp_path), "--variant", "v").returncode == 0
    before = tree_digest(tmp_path / "v")
    (tmp_path / "v").rename(tmp_path / f".v.old-{DEAD_PID}")
    assert export_cli(*hf_args, "--out", str(tmp_path), "--variant", "w").returncode == 0
    assert tree_digest(tmp_path / "v") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v", "w"]
    again = export_cli(*hf_args, "--out", str(tmp_path), "--variant", "v")
    assert_refused(again, "--force")


def test_signals_wait_until_the_swap_is_done(tmp_path, monkeypatch):
    """A SIGTERM arriving between the renames of --force is held until both are done."""
    import os

    from llama2_onnx import staging
    from llama2_onnx.errors import Interrupted

    final, new = tmp_path / "v", tmp_path / ".v.partial-1"
    for folder, text in ((final, "old"), (new, "new")):
        folder.mkdir()
        (folder / "weights").write_text(text)
    (final / ".git").mkdir()
    (new / STAGING_MARK).write_text("1\n")
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # lands right after the first rename
        real_replace(src, dst)

    monkeypatch.setattr(staging.os, "replace", replace)
    with pytest.raises(Interrupted), staging.signals_as_interrupts():
        staging.move_into_place(new, final)
    assert (final / "weights").read_text() == "new" and (final / ".git").is_dir()
    assert len(calls) == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["v"]


def test_leftovers_of_running_processes_are_kept(tmp_path, hf_args):
    mine = tmp_path / f".other.partial-{os.getppid()}"  # the test runner's parent: alive
    mine.mkdir()
    assert export_cli(*hf_args, "--out", str(tmp_path), "--variant", "v").returncode == 0
    assert mine.exists()
