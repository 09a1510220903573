"""Serve a Llama 2 variant over the OpenAI API (/v1/models, /v1/chat/completions,
/v1/completions), so the `openai` client, curl and OpenAI-compatible tools can use it.

    python tools/serve.py                        # http://127.0.0.1:8000/v1, demo or first ready
    python tools/serve.py --variant 7B_FT_float16 --provider cuda --api-key "$KEY"
    python tools/serve.py --parallel 8           # 8 requests decoded together (CPU or CUDA)
                                                 # (default auto: up to 16 on CUDA, 1 elsewhere)

It binds 127.0.0.1 unless --host says otherwise. With --api-key (or LLAMA2_ONNX_API_KEY) every
request needs `Authorization: Bearer KEY`. Needs `pip install -e .[serve]`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama2_onnx import require_core_packages  # noqa: E402

require_core_packages()

from llama2_onnx.cli import (  # noqa: E402
    add_engine_args,
    check_engine_flags,
    run_main,
    run_options_from_args,
    spell_both,
)
from llama2_onnx.errors import UserError  # noqa: E402
from llama2_onnx.http_guard import (  # noqa: E402
    BODY_TIMEOUT_S,
    HEADER_TIMEOUT_S,
    MAX_CONNECTIONS,
    check_allowed_host,
)
from llama2_onnx.server import (  # noqa: E402
    API_KEY_ENV,
    ServerOptions,
    check_api_key,
    serve,
)
from llama2_onnx.variants import resolve_variant  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one `error:` line and exit code 2, through run_main
        raise UserError(message)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this computer only; "
                        "0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any)")
    parser.add_argument("--allowed-host", "--allowed_host", action="append", default=[],
                        metavar="NAME", help="also answer requests whose Host header is NAME "
                        "(repeatable); on 127.0.0.1 only localhost, 127.0.0.1 and [::1] are "
                        "answered without it, keeping web pages out (DNS rebinding)")
    parser.add_argument("--api-key", "--api_key", default=None,
                        help=f"require `Authorization: Bearer KEY` (default: ${API_KEY_ENV})")
    parser.add_argument("--max-queue", "--max_queue", type=int, default=32,
                        help="requests that may wait while every slot is busy; more get 503 "
                        "(default 32; 0: a request runs only when a slot is free)")
    parser.add_argument("--max-connections", "--max_connections", type=int,
                        default=MAX_CONNECTIONS, help="connections open at once; past it the "
                        f"one idle longest is closed, or a new one gets 503 (default "
                        f"{MAX_CONNECTIONS})")
    add_engine_args(parser)
    parser.set_defaults(parallel="auto")  # a server's slots: placement.auto_slots
    parser.add_argument("--token_delay", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--body_timeout", type=float, default=BODY_TIMEOUT_S,
                        help=argparse.SUPPRESS)  # tests only, as --token_delay
    parser.add_argument("--header_timeout", type=float, default=HEADER_TIMEOUT_S,
                        help=argparse.SUPPRESS)
    return spell_both(parser).parse_args(argv)


def options_from_args(args: argparse.Namespace) -> ServerOptions:
    check_engine_flags(args)
    if args.api_key is not None:
        key = check_api_key(args.api_key, "--api-key")
    else:
        key = check_api_key(os.environ.get(API_KEY_ENV), f"${API_KEY_ENV}")
    return ServerOptions(variant=resolve_variant(args.variant, ROOT),
                         run=run_options_from_args(args), host=args.host, port=args.port,
                         allowed_hosts=tuple(map(check_allowed_host, args.allowed_host)),
                         api_key=key, max_queue=args.max_queue,
                         max_connections=args.max_connections,
                         header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                         token_delay=args.token_delay)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    run_main(lambda: serve(options_from_args(parse_args())))


if __name__ == "__main__":
    main()
