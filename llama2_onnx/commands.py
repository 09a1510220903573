"""The subcommands of tools/export_and_publish.py: export, publish, verify."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import UserError
from .export import ExportRequest, export_variant
from .variant_folder import CONFIG, MANIFEST, check_files, check_folder
from .variants import check_variant_name, resolve_variant


def export_command(args: argparse.Namespace, root: Path) -> int:
    """Export (and with --publish, publish) one variant."""
    if args.publish and not (args.remote or args.hub):
        raise UserError("--publish needs --remote URL or --hub ORG/NAME.")
    if not args.publish and (args.remote or args.hub):
        raise UserError("--remote/--hub only apply with --publish; add --publish.")
    request = ExportRequest(variant=args.variant, precision=args.precision,
                            block_size=args.block_size, int4_output=args.int4_output, hf=args.hf,
                            meta=args.meta, gguf=args.gguf, tokenizer=args.tokenizer, out=args.out,
                            max_seq_len=args.max_seq_len, chat=args.chat, force=args.force,
                            skip_verify=args.skip_verify, progress=not args.no_progress,
                            lfs=not args.no_lfs,
                            on_verified=lambda report: print(report.summary(), flush=True))
    try:
        folder = export_variant(request)
    except KeyboardInterrupt:  # the staging folder is gone by now (export's finally clauses)
        print(f"interrupted: the partial export of {args.variant} was removed; nothing was "
              "written.", file=sys.stderr)
        raise
    print(f"exported {folder}")
    if args.publish:
        _publish(folder, args)
    return 0


def publish_command(args: argparse.Namespace, root: Path) -> int:
    folder = resolve_variant(str(args.variant), root)
    check_variant_name(folder.resolve().name)  # it becomes the submodule's path
    if not (folder / CONFIG).is_file():
        raise UserError(f"{folder} is not an exported variant folder (no {CONFIG}); export "
                        "it first with `tools/export_and_publish.py export`.")
    _publish(folder, args)
    return 0


def _publish(folder: Path, args: argparse.Namespace) -> None:
    from .publish import publish_variant

    if args.hub:
        result = publish_variant(folder, args.hub, dist=args.dist, hub=True)
    else:
        result = publish_variant(folder, args.remote, dist=args.dist)
    print(result)
    if result.warning:
        print(f"warning: {result.warning}", file=sys.stderr)


def verify_command(args: argparse.Namespace, root: Path) -> int:
    """Check sizes and sha256 of every file in the manifest; exit 1 when something is wrong."""
    if (args.variant is None) == (args.variant_arg is None):
        raise UserError("name the variant once: `verify --variant NAME_OR_FOLDER`.")
    folder = resolve_variant(args.variant or args.variant_arg, root)
    check_folder(folder)
    problems = check_files(folder, sha256=True)
    for problem in problems:
        print(f"FAIL {problem}")
    if problems:
        return 1
    print(f"OK {folder}: every file matches {MANIFEST}")
    return 0
