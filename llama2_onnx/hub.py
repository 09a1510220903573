"""Where a variant is published to: git remote URLs and Hugging Face model repositories.

Git URLs are checked for credentials (refused: they would be written to .gitmodules or
.git/config) and relative URLs (`../name.git`) are resolved the way git resolves submodule
URLs. Hugging Face uploads go through `huggingface_hub`, whose token comes from
`hf auth login` or HF_TOKEN and is never written anywhere by this module.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

from .errors import UserError

HUB_URL = "https://huggingface.co"
# Never uploaded: runtime caches and interrupted writes (huggingface_hub skips .git itself).
HUB_IGNORE = [".cache/*", "*.tmp", "*.partial-*"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_SHA = re.compile(r"^[0-9a-f]{40}$")


class PublishError(UserError):
    """A publish that cannot go ahead: bad remote URL, failed push or upload, unusable repo."""



def check_url(url: str) -> None:
    """Refuse a URL that carries credentials (they would end up in .gitmodules or .git/config).

    Raises:
        PublishError: the URL has a password, or a user name in an http(s) URL (tokens hide
            there too).
    """
    if "://" not in url:
        return
    parts = urlsplit(url)
    http = parts.scheme.lower() in ("http", "https")
    if parts.password is not None or (http and parts.username):
        shown = f"{parts.scheme}://***@{parts.hostname}{parts.path}"
        raise PublishError(f"the URL {shown} contains credentials; remove them from the URL and "
                           "let a git credential helper (or `hf auth login`) supply them.")


def _is_relative_url(url: str) -> bool:
    """True for submodule URLs that git resolves against the superproject's remote."""
    return url.startswith(("./", "../"))


def remote_urls(remote: str, dist: Path) -> tuple[str, str]:
    """The URL for .gitmodules and the URL to push to, for a remote given by the publisher.

    Relative URLs (`../name.git`) stay relative in .gitmodules, as git intends, and are
    resolved against the distribution's remote for pushing. A local path becomes absolute.
    """
    check_url(remote)
    if _is_relative_url(remote):
        resolved = resolve_relative_url(remote, _dist_remote_url(dist))
        if _is_local_relative(resolved):
            resolved = str((dist / resolved).resolve())
        check_url(resolved)
        return remote, resolved
    if _is_local_relative(remote):
        remote = str(Path(remote).resolve())
    return remote, remote


def _dist_remote_url(dist: Path) -> str:
    """URL of the distribution's default remote (its branch's remote, else origin)."""
    branch = _git_config(dist, "symbolic-ref", "--short", "-q", "HEAD")
    name = "origin"
    if branch:
        name = _git_config(dist, "config", f"branch.{branch}.remote") or name
    url = _git_config(dist, "config", f"remote.{name}.url")
    if not url:
        raise PublishError(f"{dist} has no `{name}` remote to resolve a relative URL against; "
                           "add one with `git remote add origin <URL>` or pass an absolute URL.")
    return url


def resolve_relative_url(url: str, base: str) -> str:
    """Resolve `./` and `../` in a submodule URL against `base`, as git's relative_url() does."""
    base = base[:-1] if base.endswith("/") else base
    is_relative = _is_local_relative(base)
    if is_relative and not base.startswith(("./", "../")):
        base = "./" + base
    colon = False
    while True:
        if url.startswith("../"):
            url = url[3:]
            base, chopped_colon = _chop_last_dir(base, is_relative)
            colon = colon or chopped_colon
        elif url.startswith("./"):
            url = url[2:]
        else:
            break
    out = base + (":" if colon else "/") + url
    out = out[:-1] if url.endswith("/") else out
    return out[2:] if out.startswith("./") else out


def _chop_last_dir(base: str, is_relative: bool) -> tuple[str, bool]:
    if "/" in base:
        return base.rsplit("/", 1)[0], False
    if ":" in base:
        return base.rsplit(":", 1)[0], True
    if is_relative or base == ".":
        raise PublishError(f"cannot go up one directory from the remote URL {base!r}; "
                           "pass an absolute URL for the variant instead.")
    return ".", False


def _is_local_relative(url: str) -> bool:
    """A local path that is not absolute (git's url_is_local_not_ssh and not absolute)."""
    if "://" in url or os.path.isabs(url):
        return False
    colon, slash = url.find(":"), url.find("/")
    return colon < 0 or (0 <= slash < colon)



def _git_config(cwd: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, check=False)
    return proc.stdout.decode("utf-8", "replace").strip() if proc.returncode == 0 else ""


# ---------------------------------------------------------------------------- Hugging Face


def parse_repo_id(repo: str) -> str:
    """`owner/name` from a repo id or a https://huggingface.co/owner/name URL.

    Raises:
        PublishError: credentials in the URL, or not an `owner/name` id.
    """
    check_url(repo)
    repo_id = repo.removeprefix(HUB_URL + "/").strip("/")
    if not _REPO_ID.match(repo_id):
        raise PublishError(f"{repo!r} is not a Hugging Face repository id; pass it as "
                           "`owner/name`, e.g. `my-org/Llama-2-7b-chat-onnx`.")
    return repo_id


def hub_upload(variant_dir: Path, repo_id: str, token: str | None = None,
               api: object | None = None) -> str:
    """Upload a verified variant folder to a Hugging Face model repository.

    Args:
        variant_dir: the variant folder (checked against its manifest first).
        repo_id: `owner/name`; the repository is created if missing.
        token: passed to huggingface_hub only; None lets it use `hf auth login` / HF_TOKEN.
        api: an `HfApi`-like object (tests inject a fake); default `HfApi()`.
    Returns:
        The repository's git URL, `https://huggingface.co/<repo_id>`, for .gitmodules.
    Raises:
        VariantError: the folder does not match its manifest.
        PublishError: bad repo id, huggingface_hub missing, or the upload failed.
    """
    from .publish import ensure_gitattributes, require_verified

    variant_dir = Path(variant_dir).resolve()
    require_verified(variant_dir)
    ensure_gitattributes(variant_dir)
    url, _ = upload_to_hub(variant_dir, repo_id, token=token, api=api)
    return url


def upload_to_hub(variant_dir: Path, repo_id: str, message: str | None = None,
                  token: str | None = None, api: object | None = None) -> tuple[str, str]:
    """Create the model repository if needed and upload the folder as one commit.

    Returns:
        (git URL of the repository, the commit id the upload made).
    Raises:
        PublishError: bad repo id, huggingface_hub missing, or the upload failed.
    """
    repo_id = parse_repo_id(repo_id)
    api = api if api is not None else _default_api()
    message = message or f"Publish {variant_dir.name}"
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True, token=token)
        info = api.upload_folder(folder_path=str(variant_dir), repo_id=repo_id,
                                 repo_type="model", commit_message=message, token=token,
                                 ignore_patterns=HUB_IGNORE)
    except OSError as exc:  # huggingface_hub's HTTP and missing-token errors are OSErrors
        raise PublishError(f"uploading {variant_dir.name} to {HUB_URL}/{repo_id} failed ({exc}); "
                           "log in with `hf auth login` (or set HF_TOKEN) with write access "
                           "to that repository and publish again.") from exc
    oid = getattr(info, "oid", None)
    if not isinstance(oid, str) or not _SHA.match(oid):
        raise PublishError(f"the upload to {repo_id} returned no commit id ({oid!r}); update "
                           "huggingface_hub with `pip install -U huggingface_hub`.")
    return f"{HUB_URL}/{repo_id}", oid


def _default_api() -> object:
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise PublishError("huggingface_hub is not installed; run "
                           "`pip install 'llama2-onnx[publish]'` and publish again.") from None
    return HfApi()
