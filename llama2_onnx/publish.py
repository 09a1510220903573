"""Publish a variant folder: its own git + LFS repository, pushed, pinned as a submodule.

The flow (DESIGN.md, "Publish"):

    variant folder --verify--> git init + LFS --commit--> push to remote (git) ┐
                   \\--verify--> huggingface_hub upload_folder (hub.py) -------┤
                                                                              v
    distribution repo: gitlink pinned at the published commit + .gitmodules + README table,
    committed in one `update-ref`, so a failed push or upload leaves it unchanged.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import VariantError
from .files import write_text_atomic
from .hub import GIT_SHA, PublishError, check_url, parse_repo_id, remote_urls, upload_to_hub
from .slots import SLOTS
from .variant_card import LFS_ATTRS
from .variant_folder import (
    CACHE_DIR,
    GITATTRIBUTES,
    GITMODULES,
    LFS_PATTERNS,
    MANIFEST,
    check_files,
    left_out_warning,
    parse_manifest,
    published_files,
    read_manifest,
    refresh_manifest_entry,
)

BRANCH = "main"
README = "README.md"  # the distribution's, with the variant table (a variant's card is its own)
TABLE_START = "<!-- variants:start -->"
TABLE_END = "<!-- variants:end -->"
# Files in a variant folder that are never published (runtime caches, interrupted writes).
EXCLUDED = (f"{CACHE_DIR}/", "*.tmp", "*.partial-*")
FALLBACK_IDENTITY = {"user.name": "llama2-onnx publisher",
                     "user.email": "publisher@llama2-onnx.invalid"}


@dataclass(frozen=True)
class PublishResult:
    """What a publish did: where the variant went and which commits pin it."""

    variant: str       # folder name, e.g. "7B_FT_float16"
    path: str          # submodule path inside the distribution (posix)
    url: str           # URL written to .gitmodules (relative URLs kept relative)
    commit: str        # the variant commit the submodule is pinned at
    dist_commit: str   # the distribution commit that records the pin
    left_out: tuple[str, ...] = ()  # files in the folder the manifest does not list

    def __str__(self) -> str:
        return (f"published {self.variant} at {self.url} (commit {self.commit[:12]}); the "
                f"distribution pins it as submodule {self.path} in commit "
                f"{self.dist_commit[:12]}.")

    @property
    def warning(self) -> str:
        """One line naming the files that were left out ("" when none): the caller shows it."""
        return left_out_warning(list(self.left_out))


# ---------------------------------------------------------------------------- public API


def publish_variant(variant_dir: Path, remote: str, dist: Path | None = None,
                    message: str | None = None, *, hub: bool = False,
                    api: object | None = None) -> PublishResult:
    """Push a variant to its own repository and pin it as a submodule of the distribution.

    Args:
        variant_dir: the variant folder, inside the distribution's work tree.
        remote: a git URL (file://, path, SSH, HTTPS, or `../name.git` relative to the
            distribution's remote); with `hub=True`, a Hugging Face repo id `owner/name`.
        dist: the distribution repository; default: the one containing `variant_dir`.
        message: commit message for the variant commit (default "Publish <name>").
        hub: upload with huggingface_hub instead of `git push` (token from `hf auth login`
            or HF_TOKEN, never from arguments that end up in files).
        api: an `HfApi`-like object for hub mode (tests inject a fake).
    Only manifest.json and the files it lists are published; anything else in the folder
    (an `.env`, notes) is left out and named in `PublishResult.warning`.

    Returns:
        The PublishResult; the distribution commit is made but not pushed.
    Raises:
        VariantError: the folder does not match its manifest.
        PublishError: bad URL, git or Git LFS missing, push/upload failed, or the
            distribution's .gitmodules/README.md have uncommitted changes.
    """
    variant_dir = Path(variant_dir).resolve()
    require_verified(variant_dir)
    dist = _find_dist(variant_dir, dist)
    _require_clean(dist)  # fail before pushing, not after
    path = variant_dir.relative_to(dist).as_posix()
    message = message or f"Publish {variant_dir.name}"
    if hub:
        repo_id = parse_repo_id(remote)  # refuse a bad id before touching .gitattributes
        ensure_gitattributes(variant_dir)
        files, _ = published_files(variant_dir)
        url, sha = upload_to_hub(variant_dir, repo_id, files, message=message, api=api)
        local_url = None
    else:
        url, local_url = remote_urls(remote, dist)
        sha = push_variant(variant_dir, local_url, message)
    dist_commit = register_submodule(dist, path, url, sha, local_url=local_url)
    _, left_out = published_files(variant_dir)
    return PublishResult(variant_dir.name, path, url, sha, dist_commit, tuple(left_out))


def require_verified(variant_dir: Path) -> None:
    """Refuse to publish a folder that is missing or does not match its manifest.

    Args:
        variant_dir: the variant folder.
    Raises:
        VariantError: the folder is missing, or lists what check_files found (sha256 too).
    """
    if not variant_dir.is_dir():
        raise VariantError(f"{variant_dir} is not a folder; export the variant first.")
    problems = check_files(variant_dir, sha256=True)
    if problems:
        raise VariantError(f"{variant_dir} was not published because it does not match its "
                           f"manifest: {' '.join(problems)}")


# ---------------------------------------------------------------------------- git helpers


def _git(*args: str, cwd: Path, env: dict[str, str] | None = None,
         stdin: bytes | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", *args], cwd=cwd, env=env, input=stdin,
                              capture_output=True, check=False)
    except FileNotFoundError:
        raise PublishError("git is not installed; install git and publish again.") from None


def _git_out(*args: str, cwd: Path, env: dict[str, str] | None = None,
             stdin: bytes | None = None, check: bool = True) -> str:
    """Run git and return its stripped stdout; on failure raise (check) or return ''."""
    proc = _git(*args, cwd=cwd, env=env, stdin=stdin)
    if proc.returncode == 0:
        return proc.stdout.decode("utf-8", "replace").strip()
    if not check:
        return ""
    err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
    raise PublishError(f"`git {' '.join(args[:3])}` failed in {cwd} ({' '.join(err[-3:])}); "
                       "fix what git reports and publish again.")


def _identity_args(repo: Path) -> list[str]:
    """`-c user.*=` options for keys the user's git config lacks (the commit only)."""
    args = []
    for key, fallback in FALLBACK_IDENTITY.items():
        if not _git_out("config", key, cwd=repo, check=False):
            args += ["-c", f"{key}={fallback}"]
    return args


def _find_dist(variant_dir: Path, dist: Path | None) -> Path:
    """The distribution repository's top folder; it must contain `variant_dir`."""
    start = Path(dist) if dist is not None else variant_dir.parent
    if not start.is_dir():
        raise PublishError(f"{start} is not a folder; pass the distribution repository.")
    top = _git_out("rev-parse", "--show-toplevel", cwd=start, check=False)
    if not top:
        raise PublishError(f"{start} is not inside a git repository; export the variant into "
                           "a clone of the distribution or pass dist=<its folder>.")
    top_path = Path(top).resolve()
    if top_path == variant_dir or top_path not in variant_dir.parents:
        raise PublishError(f"{variant_dir} is not a folder inside the distribution {top_path}; "
                           "export the variant into the distribution's work tree.")
    return top_path


# ---------------------------------------------------------------------------- variant repo


def push_variant(variant_dir: Path, url: str, message: str) -> str:
    """Make the folder a git + LFS repository, commit its published files, push to `url`.

    The commit holds exactly manifest.json and the files it lists (see `published_files`);
    other files in the folder stay out of it, and out of the remote.

    LFS objects are pushed with `git lfs push` before `git push` (whose pre-push hook,
    installed by `git lfs install --local`, would push them too), so a missing hook cannot
    leave the remote with pointers only.

    Args:
        variant_dir: the variant folder (made its own repository if it is not one).
        url: where to push (any git URL; `main` is created or fast-forwarded, never forced).
        message: commit message, used only if the folder changed since the last commit.
    Returns:
        The pushed commit (the remote's `main` points at it).
    Raises:
        PublishError: Git LFS is missing or the push was refused.
    """
    check_url(url)
    _require_own_history(variant_dir)  # before anything in the folder changes
    _init_variant_repo(variant_dir)
    ensure_gitattributes(variant_dir)
    files, _ = published_files(variant_dir)
    sha = _commit_files(variant_dir, files, message)
    _set_origin(variant_dir, url)
    pushes = (("lfs", "push", "origin", "HEAD"), ("push", "origin", f"HEAD:refs/heads/{BRANCH}"))
    for args in pushes:
        proc = _git(*args, cwd=variant_dir)
        if proc.returncode:
            _push_failed(variant_dir, url, proc)
    if _git_out("ls-remote", "origin", f"refs/heads/{BRANCH}", cwd=variant_dir)[:40] != sha:
        raise PublishError(f"{url} does not show {sha} on {BRANCH} after the push; check that "
                           "nothing else pushes there and publish again.")
    return sha


def _require_own_history(variant_dir: Path) -> None:
    """Refuse a folder whose git history has a commit publish did not make.

    Pushing HEAD sends every commit behind it, so each must hold only what the manifest check
    covers: its own manifest.json and the files that manifest lists. Publish's commits are
    exactly that (those of earlier publishes too, and those of a clone of the published
    repository); a commit the user made with an `.env` in it is not, even when a later commit
    deleted the file.
    """
    if not (variant_dir / ".git").exists():
        return  # publish makes the repository
    head = _git_out("rev-parse", "-q", "--verify", "HEAD", cwd=variant_dir, check=False)
    history = _git_out("rev-list", head, cwd=variant_dir).split() if head else []
    foreign = {c: why for c in history if (why := _outside_manifest(variant_dir, c))}
    if not foreign:
        return
    commit = next(c for c in reversed(history) if c in foreign)  # the oldest
    fix = f"move {variant_dir / '.git'} away if that history was never pushed"
    base = _clean_base(variant_dir, head, set(foreign))
    if base:
        fix = (f"`git -C {variant_dir} reset --soft {base[:12]}` drops the commits after the "
               f"last clean one (the files stay in the folder), or {fix}")
    raise PublishError(f"{variant_dir} was not published because its git history has commit "
                       f"{commit[:12]}, which publish did not make ({foreign[commit]}) and which "
                       f"a push would send along; publish from a clean copy: {fix}.")


def _clean_base(variant_dir: Path, head: str, foreign: set[str]) -> str:
    """The newest first-parent ancestor of `head` with no foreign commit behind it, or ""."""
    for commit in _git_out("rev-list", "--first-parent", head, cwd=variant_dir).split():
        if commit not in foreign and foreign.isdisjoint(
                _git_out("rev-list", commit, cwd=variant_dir).split()):
            return commit
    return ""


def _outside_manifest(variant_dir: Path, commit: str) -> str:
    """What in `commit`'s tree its own manifest.json does not cover ("" when nothing)."""
    blob = _git("cat-file", "blob", f"{commit}:{MANIFEST}", cwd=variant_dir)
    try:
        listed = parse_manifest(blob.stdout, f"{commit}:{MANIFEST}")["files"] \
            if blob.returncode == 0 else None
    except VariantError:
        listed = None
    if listed is None:
        return f"it has no readable {MANIFEST}"
    tree = _git("ls-tree", "-r", "-z", "--name-only", commit, cwd=variant_dir).stdout
    names = tree.decode("utf-8", "surrogateescape").split("\0")
    stray = [rel for rel in names if rel and rel != MANIFEST and rel not in listed]
    return f"it holds {stray[0]}, which its {MANIFEST} does not list" if stray else ""


# What git and Git LFS say when a push goes to a repository that does not exist (LFS says
# only "EOF" when its own transfer to a missing local repository fails).
MISSING_REMOTE = re.compile(r"does not appear to be a git repository|repository not found|"
                            r"not found|\beof\b", re.IGNORECASE)


def _local_path(url: str) -> Path | None:
    """The folder a local remote names (a path or a file:// URL); None for a network URL or
    git's scp-like `host:path`."""
    if url.startswith("file://"):
        return Path(url[len("file://"):])
    if "://" in url or (re.match(r"^[^/\\]+:", url) and not re.match(r"^[A-Za-z]:[/\\]", url)):
        return None
    return Path(url)


def _push_failed(variant_dir: Path, url: str, proc: subprocess.CompletedProcess) -> None:
    err = " ".join(proc.stderr.decode("utf-8", "replace").strip().splitlines()[-4:])
    hint = ""
    local = _local_path(url)
    if local is not None and not local.exists():
        raise PublishError(f"the remote {url} does not exist; create it first (an empty "
                           f"repository: `git init --bare {local}`), then publish again.")
    if "non-fast-forward" in err or "fetch first" in err:
        hint = " The remote has commits this folder lacks: push to a new remote, or run " \
               f"`git -C {variant_dir} pull origin {BRANCH}` first."
    elif MISSING_REMOTE.search(err):
        hint = " The remote repository may not exist: create it first (an empty one: " \
               "`git init --bare PATH` for a path, or on the host's website), then publish again."
    raise PublishError(f"pushing {variant_dir.name} to {url} failed ({err}); check the URL and "
                       f"that you may push there (credentials come from git, never the URL).{hint}")


def _init_variant_repo(variant_dir: Path) -> None:
    """`git init` (if needed), `git lfs install --local`, and exclude runtime caches."""
    if _git_out("lfs", "version", cwd=variant_dir, check=False) == "":
        raise PublishError("Git LFS is not installed; install it (https://git-lfs.com, or "
                           "`apt install git-lfs`) and publish again.")
    if not (variant_dir / ".git").exists():
        _git_out("init", "-q", f"--initial-branch={BRANCH}", cwd=variant_dir)
    _git_out("lfs", "install", "--local", cwd=variant_dir)
    exclude = Path(_git_out("rev-parse", "--git-path", "info/exclude", cwd=variant_dir))
    exclude = exclude if exclude.is_absolute() else variant_dir / exclude
    exclude.parent.mkdir(parents=True, exist_ok=True)
    text = exclude.read_text(encoding="utf-8") if exclude.is_file() else ""
    missing = [p for p in EXCLUDED if p not in text.splitlines()]
    if missing:
        sep = "" if not text or text.endswith("\n") else "\n"
        exclude.write_text(text + sep + "\n".join(missing) + "\n", encoding="utf-8")


def ensure_gitattributes(variant_dir: Path) -> bool:
    """Make `.gitattributes` track the large files with LFS; keep the manifest in step.

    Args:
        variant_dir: a verified variant folder.
    Returns:
        True when the file had to be changed.
    """
    path = variant_dir / GITATTRIBUTES
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    tracked = {line.split()[0] for line in text.splitlines()
               if line.strip() and "filter=lfs" in line.split()[1:]}
    missing = [p for p in LFS_PATTERNS if p not in tracked]
    if not missing:
        return False
    sep = "" if not text or text.endswith("\n") else "\n"
    write_text_atomic(path, text + sep + "".join(f"{p} {LFS_ATTRS}\n" for p in missing))
    refresh_manifest_entry(variant_dir, GITATTRIBUTES)
    return True


def _commit_files(variant_dir: Path, files: list[str], message: str) -> str:
    """Make the index hold exactly `files` (large ones through LFS), commit if anything
    changed; return HEAD. Paths are literal (no globbing) and added even if git ignores them."""
    literal = {**os.environ, "GIT_LITERAL_PATHSPECS": "1"}
    indexed = _git("ls-files", "-z", cwd=variant_dir).stdout.decode("utf-8", "surrogateescape")
    keep = set(files)
    stale = [rel for rel in indexed.split("\0") if rel and rel not in keep]
    for command, paths in ((("rm", "-q", "--cached"), stale), (("add", "-f"), files)):
        if paths:
            _git_out(*command, "--pathspec-from-file=-", "--pathspec-file-nul", cwd=variant_dir,
                     env=literal, stdin="\0".join(paths).encode("utf-8", "surrogateescape"))
    head = _git_out("rev-parse", "-q", "--verify", "HEAD", cwd=variant_dir, check=False)
    if head and _git(*("diff", "--cached", "--quiet"), cwd=variant_dir).returncode == 0:
        return head
    _git_out(*_identity_args(variant_dir), "commit", "-q", "-m", message, cwd=variant_dir)
    return _git_out("rev-parse", "HEAD", cwd=variant_dir)


def _set_origin(variant_dir: Path, url: str) -> None:
    if _git_out("remote", "get-url", "origin", cwd=variant_dir, check=False):
        _git_out("remote", "set-url", "origin", url, cwd=variant_dir)
    else:
        _git_out("remote", "add", "origin", url, cwd=variant_dir)


# ---------------------------------------------------------------------------- distribution


def register_submodule(dist: Path, path: str, url: str, sha: str,
                       local_url: str | None = None) -> str:
    """Pin `path` in the distribution at `sha` with `url` in .gitmodules, in one commit.

    The new tree is built in a temporary index from HEAD (so other staged work is not swept
    in) and committed with a compare-and-swap `update-ref`; only then are the work tree and
    the real index brought in step.

    Args:
        dist: the distribution repository's top folder.
        path: the submodule path, relative to `dist`, posix.
        url: the URL for .gitmodules (may be relative, `../name.git`).
        sha: the variant commit to pin.
        local_url: the resolved URL for `.git/config` when `path` is a checked-out repository.
    Returns:
        The distribution commit recording the pin (HEAD unchanged if it already did).
    Raises:
        PublishError: bad URL or sha, or uncommitted changes to .gitmodules / README.md.
    """
    check_url(url)
    if not GIT_SHA.match(sha):
        raise PublishError(f"{sha!r} is not a full commit id; publish again.")
    _require_clean(dist)
    head = _git_out("rev-parse", "-q", "--verify", "HEAD", cwd=dist, check=False) or None
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(tmp) / "index")}
        _git_out("read-tree", *([head] if head else ["--empty"]), cwd=dist, env=env)
        name, gitmodules = _stage_pin(dist, env, head, path, url, sha)
        readme = _stage_readme(dist, env, head, path)
        commit = _commit_index(dist, env, head, f"Publish {Path(path).name} at {sha}")
    _sync_worktree(dist, path, gitmodules, readme)
    if local_url and (dist / path / ".git").exists():
        _git_out("config", f"submodule.{name}.url", local_url, cwd=dist)
    return commit


def _require_clean(dist: Path) -> None:
    for rel in (GITMODULES, README):
        if _git_out("status", "--porcelain", "--", rel, cwd=dist):
            raise PublishError(f"{dist / rel} has uncommitted changes; commit or discard them, "
                               "then publish again.")


def _stage_pin(dist: Path, env: dict[str, str], head: str | None, path: str, url: str,
               sha: str) -> tuple[str, str]:
    """Replace whatever is at `path` by a gitlink; update .gitmodules. Returns (name, text)."""
    old = _git_out("ls-files", "-z", "--", f":(literal){path}", cwd=dist, env=env)
    if old:
        _git_out("update-index", "--force-remove", "-z", "--stdin", cwd=dist, env=env,
                 stdin=old.encode())
    _git_out("update-index", "--add", "--cacheinfo", f"160000,{sha},{path}", cwd=dist, env=env)
    name, text = _gitmodules_with(dist, _blob_text(dist, head, GITMODULES) or "", path, url)
    _stage_text(dist, env, GITMODULES, text)
    return name, text


def _gitmodules_with(dist: Path, text: str, path: str, url: str) -> tuple[str, str]:
    """.gitmodules text with submodule `path` set to `url`: the section that has this path
    keeps its name; a new one is named after the path, or `<path>-2`, `-3`... when another
    submodule's section already has that name (its path and URL are never changed)."""
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "gitmodules"
        file.write_text(text, encoding="utf-8")
        found = _git_out("config", "-f", str(file), "--get-regexp", r"^submodule\..*\.path$",
                         cwd=dist, check=False)
        paths = {key[len("submodule."):-len(".path")]: value
                 for key, _, value in (line.partition(" ") for line in found.splitlines())}
        sections = _git_out("config", "-f", str(file), "--name-only", "--get-regexp",
                            r"^submodule\.", cwd=dist, check=False)
        taken = {key[len("submodule."):].rpartition(".")[0] for key in sections.splitlines()}
        names = [name for name, value in paths.items() if value == path]
        name = names[0] if names else next(
            n for n in (path, *(f"{path}-{i}" for i in range(2, len(taken) + 3))) if n not in taken)
        _git_out("config", "-f", str(file), f"submodule.{name}.path", path, cwd=dist)
        _git_out("config", "-f", str(file), f"submodule.{name}.url", url, cwd=dist)
        return name, file.read_text(encoding="utf-8")


def _blob_text(dist: Path, head: str | None, rel: str) -> str | None:
    if head is None:
        return None
    proc = _git("cat-file", "blob", f"{head}:{rel}", cwd=dist)
    return proc.stdout.decode("utf-8") if proc.returncode == 0 else None


def _stage_text(dist: Path, env: dict[str, str], rel: str, text: str) -> None:
    blob = _git_out("hash-object", "-w", "--stdin", f"--path={rel}", cwd=dist, env=env,
                    stdin=text.encode("utf-8"))
    entry = _git_out("ls-files", "-s", "--", f":(literal){rel}", cwd=dist, env=env)
    mode = entry.split()[0] if entry else "100644"
    _git_out("update-index", "--add", "--cacheinfo", f"{mode},{blob},{rel}", cwd=dist, env=env)


def _commit_index(dist: Path, env: dict[str, str], head: str | None, message: str) -> str:
    tree = _git_out("write-tree", cwd=dist, env=env)
    if head and tree == _git_out("rev-parse", f"{head}^{{tree}}", cwd=dist):
        return head
    parents = ["-p", head] if head else []
    commit = _git_out(*_identity_args(dist), "commit-tree", tree, *parents, "-m", message,
                      cwd=dist)
    # Compare-and-swap: fails (and changes nothing) if HEAD moved while we worked.
    _git_out("update-ref", "-m", message, "HEAD", commit, head or "0" * 40, cwd=dist)
    return commit


def _sync_worktree(dist: Path, path: str, gitmodules: str, readme: str | None) -> None:
    """Bring the work tree and the real index in step with the new HEAD for our paths."""
    write_text_atomic(dist / GITMODULES, gitmodules)
    paths = [GITMODULES, f":(literal){path}"]
    if readme is not None:
        write_text_atomic(dist / README, readme)
        paths.append(README)
    _git_out("reset", "-q", "HEAD", "--", *paths, cwd=dist)


# ---------------------------------------------------------------------------- README table


def _stage_readme(dist: Path, env: dict[str, str], head: str | None, path: str) -> str | None:
    """Regenerate the variant table in README.md; None when there is none to regenerate."""
    text = _blob_text(dist, head, README)
    block = _table_block(text) if text else None
    if text is None or block is None:
        return None
    pins = _gitlinks(dist, env)
    previous = _previous_sizes(block)
    table = variant_table(pins, _sizes(dist, pins, previous), extra=[*previous, path])
    new = text.replace(block, f"\n{table}\n", 1)
    _stage_text(dist, env, README, new)
    return new


def _table_block(text: str) -> str | None:
    """The text between the markers, or None when they are missing."""
    start = text.find(TABLE_START)
    end = text.find(TABLE_END, start + len(TABLE_START)) if start >= 0 else -1
    return None if end < 0 else text[start + len(TABLE_START):end]


def _gitlinks(dist: Path, env: dict[str, str]) -> dict[str, str]:
    staged = _git_out("ls-files", "-s", cwd=dist, env=env)
    links = [line.split("\t", 1) for line in staged.splitlines() if line.startswith("160000 ")]
    return {rel: meta.split()[1] for meta, rel in links}


def _previous_sizes(block: str) -> dict[str, str]:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in block.splitlines() if line.strip().startswith("|")]
    return {row[0].strip("`"): row[3] for row in rows[2:] if len(row) >= 4}


def _sizes(dist: Path, pins: dict[str, str], previous: dict[str, str]) -> dict[str, str]:
    """Size per variant from its manifest when checked out, else the table's last value."""
    sizes = dict(previous)
    for rel in {*pins, *(s.name for s in SLOTS)}:
        try:
            manifest = read_manifest(dist / rel) if (dist / rel).is_dir() else None
        except VariantError:
            manifest = None
        if manifest is not None:
            sizes[rel] = human_size(sum(e["size"] for e in manifest["files"].values()))
    return sizes


def variant_table(pins: dict[str, str], sizes: dict[str, str], extra: list[str]) -> str:
    """Markdown table of the slots (plus `extra` published paths) with state and size.

    Args:
        pins: submodule path -> pinned commit, for every published variant.
        sizes: variant name -> human-readable size ("—" when unknown).
        extra: paths to list even though they are not in SLOTS.
    Returns:
        The table, without the markers.
    """
    rows = [(s.name, s.description) for s in SLOTS]
    names = {s.name for s in SLOTS}
    rows += [(p, "custom variant") for p in dict.fromkeys(extra) if p not in names]
    lines = ["| Variant | Model | State | Size |", "|---|---|---|---|"]
    for name, description in rows:
        state = f"published at `{pins[name][:12]}`" if name in pins else "not published yet"
        lines.append(f"| `{name}` | {description} | {state} | {sizes.get(name, '—')} |")
    return "\n".join(lines)


def human_size(n_bytes: int) -> str:
    """Bytes in decimal units for the README table.

    Args:
        n_bytes: a size in bytes.
    Returns:
        e.g. "512 B", "20.5 KB", "13.5 GB".
    """
    if n_bytes < 1000:
        return f"{n_bytes} B"
    size, unit = n_bytes / 1000, "KB"
    for bigger in ("MB", "GB"):
        if size < 1000:
            break
        size, unit = size / 1000, bigger
    return f"{size:.1f} {unit}"
