"""``mlm serve --checkpoint DIR``: an HTTP inference service with dynamic batching (see :mod:`mlm.serve`)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``serve`` command."""
    parser = sub.add_parser("serve", help="serve the model over HTTP with dynamic batching (LitServe)",
                            description="POST /v1/caption, /v1/answer, /v1/embed, /v1/search (with --images); "
                            "GET /health, /metrics; OpenAPI schema at /docs.")  # fmt: skip
    parser.add_argument("--checkpoint", required=True, help="model folder, checkpoint step_* folder or run folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=32, help="requests run together at most (1: no batching)")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a batch waits to fill")
    parser.add_argument("--workers", type=int, default=1, help="model worker processes per device and endpoint")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="a request waiting longer gets 504")
    parser.add_argument("--images", help="a folder to index at start-up for /v1/search")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per worker (default: the cores shared among the workers)")  # fmt: skip
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the server and run it until interrupted."""
    from mlm.serve.server import build_server, serve

    server = build_server(args.checkpoint, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                          workers=args.workers, device=args.device, max_upload_mb=args.max_upload_mb,
                          timeout_s=args.timeout_s, images=args.images, threads=args.threads)  # fmt: skip
    print(f"serving {args.checkpoint} on http://{args.host}:{args.port} (max batch {args.max_batch}, "
          f"wait {args.max_wait_ms:g} ms); Ctrl+C stops it", flush=True)  # fmt: skip
    serve(server, args.host, args.port)
    return 0
