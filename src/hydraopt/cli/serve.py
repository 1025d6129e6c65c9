"""``hydraopt serve BUNDLE``: an OpenAI-compatible HTTP server, one task per ``model`` name.

Loads the base model once, installs the bundle (a base model that does not fit the bundle is
refused here, before anything listens: one line on stderr, exit 2), then serves
``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` with uvicorn on 127.0.0.1 unless
``--host`` says otherwise. See docs/serving.md.

FastAPI, uvicorn and torch are imported inside :func:`run`, so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from hydraopt.errors import HydraoptError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a bundle over an OpenAI-compatible HTTP API (model = task name)",
        description="Serve every task of a bundle from one base model (OpenAI-compatible API).",
    )
    p.add_argument(
        "bundle", type=Path, metavar="BUNDLE_DIR", help="a bundle dir written by hydraopt merge"
    )
    p.add_argument("--base-model", type=Path, help="HF model dir or GGUF (default: see docs)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-batch", type=int, default=16, help="most requests per batch (default 16)")
    p.add_argument(
        "--max-tokens-limit",
        type=int,
        default=1024,
        help="largest max_tokens allowed (default 1024)",
    )
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.max_batch < 1 or args.max_tokens_limit < 1:
        raise HydraoptError("--max-batch and --max-tokens-limit must be >= 1")
    if not 0 <= args.port <= 65535:
        raise HydraoptError(f"--port must be in 0..65535, got {args.port}")
    try:
        import uvicorn

        from hydraopt.serve import create_app
    except ImportError as e:
        raise HydraoptError(f"serving needs {e.name}: pip install 'hydraopt[serve]'") from e
    from hydraopt.runtime import load_model

    print(f"loading {args.bundle} ...", file=sys.stderr)
    runtime = load_model(args.bundle, args.base_model, threads=args.threads)
    app = create_app(runtime, max_batch=args.max_batch, max_tokens_limit=args.max_tokens_limit)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    print(
        f"serving tasks {list(runtime.tasks)} on http://{args.host}:{args.port}/v1",
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="warning")
    return 0
