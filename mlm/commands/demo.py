"""``mlm demo``: the Gradio web app (caption, ask, attention maps, search a folder), local-only by default."""

from __future__ import annotations

import argparse
import importlib.util
import signal
import threading

from mlm.commands.predict import add_model_args


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``demo`` command."""
    parser = sub.add_parser("demo", help="web demo: caption, ask, attention maps, search a folder (Gradio)")
    add_model_args(parser)
    parser.add_argument("--images", metavar="DIR", help="a folder of images to search by text")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload (default: 10)")
    parser.add_argument("--cache-dir", help="where the search index is cached (default: ~/.cache/mlm/search)")
    parser.set_defaults(func=run)


def _interrupt(signum, frame) -> None:
    """Treat SIGTERM (``kill``, ``docker stop``) as Ctrl+C, so that Gradio stops and the temporary folder goes."""
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    """Load the model, index the folder and serve until interrupted; the demo's temporary files go with it."""
    # Only looked for, not imported: the service points GRADIO_TEMP_DIR at its own folder first, and some gradio
    # modules read that variable when imported.
    if importlib.util.find_spec("gradio") is None:
        raise ValueError('the demo needs gradio: pip install -e ".[demo]"')
    from mlm.demo.app import build_app, launch
    from mlm.demo.service import DemoService
    from mlm.inference import checkpoint_id, load_model

    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port} is not a TCP port (1-65535)")
    model = load_model(args.checkpoint, args.device, args.exit_threshold)
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers can only be set there
    key = checkpoint_id(args.checkpoint) + (f"-exit{args.exit_threshold}" if args.exit_threshold is not None else "")
    service = DemoService(model, key, args.images, args.max_upload_mb, args.cache_dir)
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        with service:
            print(f"mlm demo on http://{args.host}:{args.port} (Ctrl+C stops it)")
            launch(build_app(service), service, args.host, args.port, args.max_upload_mb)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return 0
