"""Chat with a Llama 2 variant in your browser (Gradio), running on ONNX Runtime.

    python ChatApp/app.py                 # then open http://127.0.0.1:7860

It lists the variants that are checked out and pulled (else the small demo variant shipped in
the repository) and says how to pull the others. Needs `pip install -e .[chat]`.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama2_onnx import require_core_packages  # noqa: E402

require_core_packages()

from llama2_onnx.chat_ui import AppOptions, build_app, check_port, launch  # noqa: E402
from llama2_onnx.cli import add_engine_args, run_main, run_options_from_args, spell_both  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this computer only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--share", action="store_true",
                        help="also publish a temporary public gradio.live link (off by default)")
    add_engine_args(parser)
    # Hidden, for tests: another repository root (default $LLAMA2_ONNX_ROOT, else this one)
    # and a pause after each token so a browser can watch an answer stream and stop it.
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("LLAMA2_ONNX_ROOT",
                                                                         ROOT)),
                        help=argparse.SUPPRESS)
    parser.add_argument("--token_delay", type=float, default=0.0, help=argparse.SUPPRESS)
    return spell_both(parser).parse_args(argv)


def serve(args: argparse.Namespace) -> None:
    check_port(args.port)  # before the model and Gradio load
    run = run_options_from_args(args)
    if run.parallel != 1:  # docs/serving.md says why
        print(f"note: the chat app answers one message at a time per variant, so it keeps one "
              f"slot; --parallel {run.parallel} decodes requests together in tools/serve.py.",
              flush=True)
        run = replace(run, parallel=1)
    options = AppOptions(root=args.root, variant=args.variant, run=run,
                         token_delay=args.token_delay)
    app = build_app(options)
    print(f"Chat on http://{args.host}:{args.port} (Ctrl-C stops it; --share adds a public "
          "link, off unless asked for).", flush=True)
    launch(app, host=args.host, port=args.port, share=args.share)


def main() -> None:
    args = parse_args()
    run_main(lambda: serve(args))


if __name__ == "__main__":
    main()
