"""Where a variant is published to: git remote URLs and Hugging Face model repositories.

Git URLs are checked for credentials (refused: they would be written to .gitmodules or
.git/config) and relative URLs (`../name.git`) are resolved the way git resolves submodule
URLs. Hugging Face uploads go through `huggingface_hub`, whose token comes from
`hf auth login` or HF_TOKEN and is never written anywhere by this module.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

from .errors import PublishError

HUB_URL = "https://huggingface.co"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
GIT_SHA = re.compile(r"^[0-9a-f]{40}$")  # a commit id, from git or from the Hub
CREDENTIAL_FIX = ("remove them from the URL and let git get them from a credential helper or "
                  "SSH (or, for the Hub, `hf auth login` / HF_TOKEN).")


def url_secret(url: str) -> str:
    """Where `url` carries something that may be a credential ("" when nowhere).

    User info (a password, or any user name in an http(s) URL: tokens hide there), a query
    string (`?access_token=...`) or a fragment, in a `scheme://` or an scp-like `host:path` URL.
    Local paths may hold any character.
    """
    if "://" in url:
        parts = urlsplit(url)
        http = parts.scheme.lower() in ("http", "https")
        if parts.password is not None or (http and parts.username):
            return "user name or password"
    elif _is_local_relative(url) or os.path.isabs(url):
        return ""
    if "?" in url:
        return "query string"
    if "#" in url:
        return "fragment"
    return ""


def check_url(url: str, what: str = "the URL") -> None:
    """Refuse a URL that carries credentials (they would end up in .gitmodules or .git/config).

    Raises:
        PublishError: `url_secret` found a place where a credential may hide.
    """
    where = url_secret(url)
    if where:
        raise PublishError(f"{what} {url} contains credentials (in its {where}); "
                           + CREDENTIAL_FIX)


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
        base = _dist_remote_url(dist)
        check_url(base, what=f"the distribution's remote URL (which {remote} is relative to)")
        resolved = resolve_relative_url(remote, base)
        if _is_local_relative(resolved):
            resolved = str((dist / resolved).resolve())
        check_url(resolved, what=f"the URL that {remote} resolves to,")
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


def upload_to_hub(variant_dir: Path, repo_id: str, files: list[str], message: str | None = None,
                  token: str | None = None, api: object | None = None) -> tuple[str, str]:
    """Create the model repository if needed and make one commit holding exactly `files`.

    Args:
        variant_dir: the variant folder.
        repo_id: `owner/name` or its https://huggingface.co URL.
        files: paths relative to `variant_dir` to upload (nothing else is); files already in
            the repository but not in this list are deleted by the same commit.
        message: the commit message (default "Publish <name>").
        token: passed to huggingface_hub only.
        api: an `HfApi`-like object (tests inject a fake); default `HfApi()`.
    Returns:
        (git URL of the repository, the commit id the upload made).
    Raises:
        PublishError: bad repo id, huggingface_hub missing, or the upload failed (no
            connection, refused token, server error).
    """
    repo_id = parse_repo_id(repo_id)
    api = api if api is not None else _default_api()
    message = message or f"Publish {variant_dir.name}"
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True, token=token)
        info = api.upload_folder(folder_path=str(variant_dir), repo_id=repo_id,
                                 repo_type="model", commit_message=message, token=token,
                                 allow_patterns=[glob.escape(rel) for rel in files],
                                 delete_patterns="*")
    except _hub_errors() as exc:
        raise PublishError(f"uploading {variant_dir.name} to {HUB_URL}/{repo_id} failed "
                           f"({type(exc).__name__}: {_first_line(exc)}); check the connection "
                           "to the Hub, log in with `hf auth login` (or set HF_TOKEN) with write "
                           "access to that repository, and publish again.") from exc
    oid = getattr(info, "oid", None)
    if not isinstance(oid, str) or not GIT_SHA.match(oid):
        raise PublishError(f"the upload to {repo_id} returned no commit id ({oid!r}); update "
                           "huggingface_hub with `pip install -U huggingface_hub`.")
    return f"{HUB_URL}/{repo_id}", oid


def _hub_errors() -> tuple[type[Exception], ...]:
    """What a failed Hub call raises: OSError (no token, offline mode, HTTP status errors),
    ValueError (ids the Hub rejects) and the HTTP client's own base error (a refused
    connection or a timeout is an httpx error, not an OSError)."""
    errors: list[type[Exception]] = [OSError, ValueError]
    try:
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:
        return tuple(errors)
    errors += [base for base in HfHubHTTPError.__mro__[1:] if base.__name__ == "HTTPError"]
    return tuple(errors)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else "no details"


def _default_api() -> object:
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise PublishError("huggingface_hub is not installed; run "
                           "`pip install 'llama2-onnx[publish]'` and publish again.") from None
    return HfApi()
