"""Building the LitServe server of ``mlm serve``: one LitAPI per endpoint behind the checking :class:`Gateway`.

LitServe runs each endpoint's model in its own worker process (``workers`` per device), batches concurrent requests
by load (``max_batch`` requests or ``max_wait_ms``, whichever comes first) and serves ``GET /health`` itself; the
gateway adds request checks, the upload limit and ``GET /metrics``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

ENDPOINTS = ("/v1/caption", "/v1/answer", "/v1/embed", "/v1/search")


def build_server(
    checkpoint: str,
    *,
    max_batch: int = 32,
    max_wait_ms: float = 10.0,
    workers: int = 1,
    device: str = "cpu",
    max_upload_mb: float = 10.0,
    timeout_s: float = 30.0,
    images: str | None = None,
    cache_dir: str | None = None,
    threads: int = 0,
):
    """The LitServer for a checkpoint (``images``: a folder to index for /v1/search; without it that path is 404;
    ``threads``: torch threads per worker, 0 = the machine's cores shared among the workers)."""
    import litserve as ls

    from mlm.inference import load_model
    from mlm.run_folder import resolve_checkpoint
    from mlm.serve.apis import AnswerAPI, CaptionAPI, EmbedAPI, SearchAPI
    from mlm.serve.gateway import Gateway, Metrics

    if max_batch < 1 or max_wait_ms < 0 or workers < 1 or max_upload_mb <= 0 or timeout_s <= 0 or threads < 0:
        raise ValueError(
            f"need --max-batch >= 1, --max-wait-ms >= 0, --workers >= 1, --max-upload-mb > 0, --timeout-s > 0 and "
            f"--threads >= 0; got {max_batch}, {max_wait_ms}, {workers}, {max_upload_mb}, {timeout_s}, {threads}"
        )
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: use cpu or cuda")
    if images is not None and not Path(images).is_dir():
        raise FileNotFoundError(f"--images {images}: no such folder")
    folder = str(resolve_checkpoint(checkpoint))
    load_model(folder, "cpu")  # a broken checkpoint is named here in one line, not in a traceback from every worker
    n_workers = (4 if images is not None else 3) * workers
    # measured on 2 cores: one thread per worker captions 1.2x faster than two (the HTTP process needs a core too)
    threads = threads or max(1, (os.cpu_count() or 1) // n_workers)
    batching = {"max_batch_size": max_batch, "batch_timeout": max_wait_ms / 1000.0, "threads": threads}
    apis = [cls(folder, api_path=path, **batching) for cls, path in
            ((CaptionAPI, "/v1/caption"), (AnswerAPI, "/v1/answer"), (EmbedAPI, "/v1/embed"))]  # fmt: skip
    paths = {"/v1/caption", "/v1/answer", "/v1/embed"}
    if images is not None:
        apis.append(SearchAPI(folder, images, cache_dir, api_path="/v1/search", **batching))
        paths.add("/v1/search")
    logger.info("%d model workers, %d torch thread(s) each", n_workers, threads)
    gateway = (Gateway, {"max_upload_bytes": int(max_upload_mb * 2**20), "metrics": Metrics(), "paths": paths})
    return ls.LitServer(apis, accelerator=device, devices=1, workers_per_device=workers, timeout=timeout_s,
                        middlewares=[gateway], fast_queue=True)  # fmt: skip


def serve(server, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run until interrupted (one API process, so that /metrics counts every request)."""
    server.run(host=host, port=port, num_api_servers=1, generate_client_file=False, log_level="warning")
