"""Export Llama 2 weights to a verified ONNX variant folder, publish it, or verify one.

    python tools/export_and_publish.py export --hf Llama-2-7b-chat-hf --precision float16 \\
        --variant 7B_FT_float16 --chat
    python tools/export_and_publish.py export --meta llama-2-7b-chat --tokenizer tokenizer.model \\
        --precision float16 --variant 7B_FT_float16 --chat
    python tools/export_and_publish.py export --gguf SmolLM2-135M-Instruct.Q4_1.gguf \\
        --precision int4 --variant SmolLM2_int4
    python tools/export_and_publish.py publish --variant 7B_FT_float16 --remote ../7B_FT_float16.git
    python tools/export_and_publish.py verify --variant 7B_FT_float16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama2_onnx import require_core_packages  # noqa: E402

require_core_packages()

from llama2_onnx.cli import add_checkpoint_args, run_main, spell_both  # noqa: E402
from llama2_onnx.commands import export_command, publish_command, verify_command  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="checkpoint -> verified variant folder")
    add_checkpoint_args(export)
    export.add_argument("--precision", choices=("float32", "float16", "int4"), required=True,
                        help="weights of the variant: float32, float16 or int4 (4-bit weights)")
    export.add_argument("--block-size", type=int, help="int4 only: weights per quantization "
                        "block, 32 (default), 64 or 128")
    export.add_argument("--int4-output", choices=("int4", "float16"),
                        help="int4 only: the output projection's weights (default: int4, or "
                        "float16 from a GGUF file whose output is not 4-bit); float16 costs "
                        "speed on small models and gains quality (docs/export.md)")
    export.add_argument("--variant", required=True, help="variant name, e.g. 7B_FT_float16")
    export.add_argument("--out", type=Path, default=ROOT, help="parent folder (default: repo)")
    export.add_argument("--max-seq-len", type=int, help="context length (default: the model's)")
    export.add_argument("--chat", action="store_true", help="weights are a Llama-2-chat model")
    export.add_argument("--force", action="store_true", help="replace an existing variant")
    export.add_argument("--skip-verify", action="store_true",
                        help="skip the ONNX Runtime vs PyTorch check (for models too big for RAM)")
    export.add_argument("--no-progress", action="store_true", help="no progress bar")
    export.add_argument("--no-lfs", action="store_true", help="no .gitattributes: for a small "
                        "variant committed to a plain git repository, like the demo")
    add_publish_args(export, required=False)
    publish = sub.add_parser("publish", help="variant folder -> git+LFS repo and submodule")
    publish.add_argument("--variant", required=True,
                         help="variant name (a folder in the repository) or folder")
    add_publish_args(publish, required=True)
    verify = sub.add_parser("verify", help="check a variant's files against its manifest")
    verify.add_argument("--variant", help="variant name (a folder in the repository) or folder")
    verify.add_argument("variant_arg", nargs="?", metavar="VARIANT",
                        help="the same, without --variant (as earlier versions took it)")
    return spell_both(parser).parse_args(argv)


def add_publish_args(parser: argparse.ArgumentParser, required: bool) -> None:
    if not required:
        parser.add_argument("--publish", action="store_true", help="publish after exporting")
    target = parser.add_mutually_exclusive_group(required=required)
    target.add_argument("--remote", help="git URL to push the variant to (file://, SSH, HTTPS, "
                        "or ../NAME.git relative to the distribution's origin)")
    target.add_argument("--hub", metavar="ORG/NAME", help="Hugging Face model repository")
    parser.add_argument("--dist", type=Path, default=None,
                        help="distribution repository to add the submodule to (default: the "
                        "repository holding the variant)")


def main() -> None:
    args = parse_args()
    commands = {"export": export_command, "publish": publish_command, "verify": verify_command}
    run_main(lambda: commands[args.command](args, ROOT))


if __name__ == "__main__":
    main()
