"""The distribution's variants: the slots and their states, the default, and `--variant`."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import VariantError
from .variant_folder import (
    CONFIG,
    VariantState,
    looks_like_variant,
    pull_command,
    submodule_paths,
    variant_state,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_VARIANT = "demo"

# A variant name is one safe path component: it names a folder, a submodule path and a file.
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")


def check_variant_name(name: str) -> str:
    """Return `name` when it is a valid variant name.

    A variant name is a single path component of letters, digits, `_`, `-` and `.`, at most
    100 characters, not starting with `.` or `-` (so never `.`, `..` or a flag).

    Raises:
        VariantError naming the rule.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise VariantError(f"variant name {name!r} is not allowed; use letters, digits, '_', "
                           "'-' and '.' only, not starting with '.' or '-' (e.g. 7B_FT_float16).")
    return name


def describe(path: Path) -> tuple[str, int | None]:
    """One line saying what a variant is, and its context length (None if unreadable), read
    from its config.json without loading the model."""
    from .config import Config
    from .errors import UserError
    from .slots import SLOTS

    path = Path(path)
    try:
        config = Config.load(path / CONFIG)
    except UserError:
        return f"{path.name}: original Llama-2-Onnx format", None
    if path.name == DEMO_VARIANT:
        what = ("the demo: a 4.5 M-parameter model this project trained on the King James "
                "Bible; it writes KJV-style English and is not Llama 2")
    else:
        slot = next((s for s in SLOTS if s.name == path.name), None)
        kind = "chat" if config.chat else "base (continues text)"
        what = slot.description if slot else f"{path.name}: {kind}, {config.dtype}"
    return f"{what}; context {config.max_seq_len} tokens.", config.max_seq_len


def slot_names(root: Path) -> list[str]:
    """Every variant slot: the distribution's list, declared submodules and folders that look
    like variants, with the demo variant last."""
    from .slots import SLOT_NAMES

    names = list(SLOT_NAMES)
    declared = submodule_paths(root)
    for name in declared + sorted(p.name for p in root.iterdir() if p.is_dir()):
        if name not in names and name != DEMO_VARIANT and (
                name in declared or looks_like_variant(root / name)):
            names.append(name)
    return names + [DEMO_VARIANT]


def list_variants(root: Path = REPO_ROOT) -> list[VariantState]:
    """The state of every slot (see slot_names)."""
    return [variant_state(root / name) for name in slot_names(root)]


def default_variant(root: Path = REPO_ROOT) -> Path:
    """The first ready variant that is not the demo, else the demo variant.

    Raises:
        VariantError when nothing is ready, naming what to run.
    """
    states = list_variants(root)
    for state in states:
        if state.ready:
            return state.path
    first = states[0].name if states else "7B_FT_float16"
    raise VariantError(f"no variant is ready and the demo variant is missing; run "
                       f"`{pull_command(first)}` in {root}, or export one with "
                       "tools/export_and_publish.py.")


def resolve_variant(arg: str | None, root: Path = REPO_ROOT) -> Path:
    """The folder `--variant` names, the same way for every command (the CLI, the chat app,
    the server, the tools, publish and verify).

    A path (absolute, with a separator, or `.`/`..`-relative: `./demo`, `demo/`) is that
    folder. A bare name is a slot of `root`, else a folder of that name in the current
    directory. None picks the default (the first ready variant, else the demo).

    Raises:
        VariantError naming what to run: a missing folder, a bad name, a slot not ready.
    """
    if arg is None:
        return default_variant(root)
    path = Path(arg)
    if path.is_absolute() or "/" in arg or "\\" in arg or path.name in (".", ".."):
        if not path.is_dir():
            raise VariantError(f"--variant {arg}: no such folder; check the path, or list the "
                               "variants with `python MinimumExample/Example_ONNX_LlamaV2.py "
                               "--list`.")
        return path
    check_variant_name(arg)
    if (root / arg).exists():
        return root / arg
    if path.is_dir():
        return path  # a folder of that name in the current directory
    names = slot_names(root)
    if arg in names:
        state = variant_state(root / arg)
        raise VariantError(f"variant {arg} is {state.state} in {root}: {state.hint}.")
    raise VariantError(f"variant {arg!r} is neither a folder nor a slot of {root}; choose one "
                       f"of {', '.join(names)} (see --list).")


def slot_hint(path: Path) -> str:
    """'; <slot> is <state>: <what to run>' when `path` lies in a variant slot of the checkout
    that is not ready (else '')."""
    resolved = path.resolve()
    parts = resolved.relative_to(REPO_ROOT).parts if resolved.is_relative_to(REPO_ROOT) \
        else path.parts
    if parts and parts[0] in slot_names(REPO_ROOT):
        state = variant_state(REPO_ROOT / parts[0])
        if not state.ready:
            return f"; {parts[0]} is {state.state}: {state.hint}"
    return ""
