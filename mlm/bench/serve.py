"""``mlm bench serve``: throughput and latency of ``mlm serve`` with dynamic batching on and off, in one run.

The bench starts the server twice on a free 127.0.0.1 port (``--max-batch 32 --max-wait-ms 10``, then
``--max-batch 1``: no batching) and drives it with an asyncio + httpx client: for each endpoint (caption, embed) and
concurrency level, a bounded number of requests, each timed from send to reply. Then a mixed run on the batching
server: caption, answer and embed requests with 10% bad ones (bytes that are no image, unknown fields, empty
questions) at concurrency 16, counting good requests that failed and the resident memory of the server and its
workers after the first and the last 100 requests. Each server is stopped by its process group at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import random
import statistics
import time
from pathlib import Path

ENDPOINTS = ("caption", "embed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mlm bench serve`` (``--json OUT`` is added by the bench command)."""
    parser.add_argument("--checkpoint", default="runs/tiny-synthetic", help="the model to serve")
    parser.add_argument("--images", default="data/synth/images", help="a folder of images to send")
    parser.add_argument("--concurrency", default="1,4,16,64", help="comma-separated concurrency levels")
    parser.add_argument("--requests", type=int, default=64, help="requests per level (at least 2 x concurrency)")
    parser.add_argument("--mixed", type=int, default=500, help="requests of the mixed run (10%% bad)")
    parser.add_argument("--max-batch", type=int, default=32, help="the batching server's --max-batch")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="the batching server's --max-wait-ms")
    parser.add_argument("--workers", type=int, default=1, help="the batching server's --workers")
    parser.add_argument("--quick", action="store_true", help="levels 1,4, 8 requests, a 40-request mixed run")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


async def _drive(url: str, bodies: list[tuple[str, dict]], concurrency: int) -> tuple[list[float], list[int], float]:
    """Send (path, json) bodies with at most ``concurrency`` in flight; (latencies s, statuses, wall s)."""
    import httpx

    gate = asyncio.Semaphore(concurrency)
    latencies, statuses = [0.0] * len(bodies), [0] * len(bodies)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one(i: int, path: str, body: dict) -> None:
            async with gate:
                start = time.perf_counter()
                try:
                    statuses[i] = (await client.post(path, json=body)).status_code
                except httpx.HTTPError:
                    statuses[i] = -1
                latencies[i] = time.perf_counter() - start

        start = time.perf_counter()
        await asyncio.gather(*(one(i, path, body) for i, (path, body) in enumerate(bodies)))
    return latencies, statuses, time.perf_counter() - start


def _bodies(endpoint: str, images: list[str], n: int) -> list[tuple[str, dict]]:
    if endpoint == "caption":
        return [("/v1/caption", {"image": images[i % len(images)], "max_new_tokens": 16}) for i in range(n)]
    return [("/v1/embed", {"images": [images[i % len(images)]], "texts": ["a small red circle."]}) for i in range(n)]


def _level(url: str, endpoint: str, images: list[str], concurrency: int, n: int) -> dict:
    asyncio.run(_drive(url, _bodies(endpoint, images, min(n, 2 * concurrency)), concurrency))  # warm the workers
    latencies, statuses, wall = asyncio.run(_drive(url, _bodies(endpoint, images, n), concurrency))
    ms = [1000 * x for x in latencies]
    return {"endpoint": endpoint, "concurrency": concurrency, "requests": n, "failed": sum(s != 200 for s in statuses),
            "throughput_rps": round(n / wall, 2), "p50_ms": round(statistics.median(ms), 1),
            "p95_ms": round(_percentile(ms, 95), 1), "p99_ms": round(_percentile(ms, 99), 1)}  # fmt: skip


def _mixed(url: str, process, images: list[str], n: int) -> dict:
    """Good and bad requests (10% bad) at concurrency 16; failed good ones and RSS after the first / last 100."""
    from mlm.serve.launch import server_processes

    rng = random.Random(0)
    junk = base64.b64encode(b"this is not an image").decode()
    bad = [("/v1/caption", {"image": junk}), ("/v1/caption", {"image": images[0], "beams": 2}),
           ("/v1/answer", {"image": images[0], "question": "  "}), ("/v1/embed", {"images": [junk]})]  # fmt: skip
    plan = []
    for i in range(n):
        if rng.random() < 0.1:
            plan.append((False, bad[i % len(bad)]))
        else:
            image = images[i % len(images)]
            good = [("/v1/caption", {"image": image, "max_new_tokens": 12}),
                    ("/v1/answer", {"image": image, "question": "what color is the shape?", "max_new_tokens": 4}),
                    ("/v1/embed", {"images": [image], "texts": ["a blue square."]})]  # fmt: skip
            plan.append((True, good[i % 3]))

    def rss_mb() -> float:
        return sum(p.memory_info().rss for p in server_processes(process)) / 2**20

    head = min(100, n // 4)
    _, first, _ = asyncio.run(_drive(url, [b for _, b in plan[:head]], 16))
    rss_first = rss_mb()
    _, middle, _ = asyncio.run(_drive(url, [b for _, b in plan[head:-head]], 16))
    _, last, _ = asyncio.run(_drive(url, [b for _, b in plan[-head:]], 16))
    rss_last = rss_mb()
    statuses = first + middle + last
    return {"requests": n, "bad": sum(not g for g, _ in plan), "failed_good": sum(g and s != 200 for (g, _), s in
            zip(plan, statuses, strict=True)), "bad_answered_4xx": sum((not g) and 400 <= s < 500 for (g, _), s in
            zip(plan, statuses, strict=True)), "rss_first_mb": round(rss_first, 1), "rss_last_mb": round(rss_last, 1),
            "rss_change": round(rss_last / rss_first - 1, 4)}  # fmt: skip


def run(args: argparse.Namespace) -> tuple[dict, str]:
    """Both servers, every level, the mixed run; the report and a Markdown table."""
    from mlm.serve.launch import start_server, stop_server

    levels = [1, 4] if args.quick else [int(c) for c in args.concurrency.split(",") if c.strip()]
    n_requests = 8 if args.quick else args.requests
    n_mixed = 40 if args.quick else args.mixed
    files = sorted(p for p in Path(args.images).glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:32]
    if not files:
        raise FileNotFoundError(f"--images {args.images}: no .png/.jpg images to send")
    if not levels or min(levels) < 1 or n_requests < 2:
        raise ValueError(
            f"--concurrency {args.concurrency} / --requests {args.requests}: need levels >= 1, >= 2 requests"
        )
    images = [base64.b64encode(p.read_bytes()).decode() for p in files]
    report: dict = {"checkpoint": args.checkpoint, "rows": [], "mixed": None}
    batched = ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    batched += ["--workers", str(args.workers)]
    report.update(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, workers=args.workers)
    for batching, options in (("on", batched), ("off", ["--max-batch", "1"])):
        process, url = start_server(args.checkpoint, *options)
        try:
            for endpoint in ENDPOINTS:
                for concurrency in levels:
                    row = _level(url, endpoint, images, concurrency, max(n_requests, 2 * concurrency))
                    report["rows"].append({"batching": batching, **row})
            if batching == "on":
                report["mixed"] = _mixed(url, process, images, n_mixed)
        finally:
            stop_server(process)
    report.update(_ratios(report["rows"], levels))
    return report, _table(report)


def _ratios(rows: list[dict], levels: list[int]) -> dict:
    """At the highest level <= 16: batched / unbatched caption throughput, and the batched p99 over the latency of a
    request alone (p50 at the lowest level) on the same batching server and on the unbatched one."""
    at = max([c for c in levels if c <= 16] or levels)
    pick = {(r["batching"], r["endpoint"], r["concurrency"]): r for r in rows}
    on, off = pick[("on", "caption", at)], pick[("off", "caption", at)]
    alone_on, alone_off = pick[("on", "caption", min(levels))], pick[("off", "caption", min(levels))]
    return {"ratio_concurrency": at, "caption_throughput_ratio": round(on["throughput_rps"] / off["throughput_rps"], 2),
            "caption_p99_over_single": round(on["p99_ms"] / alone_on["p50_ms"], 2),
            "caption_p99_over_single_unbatched": round(on["p99_ms"] / alone_off["p50_ms"], 2)}  # fmt: skip


def _table(report: dict) -> str:
    lines = ["| batching | endpoint | concurrency | requests | req/s | p50 ms | p95 ms | p99 ms | failed |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in report["rows"]:
        lines.append(f"| {r['batching']} | {r['endpoint']} | {r['concurrency']} | {r['requests']} | "
                     f"{r['throughput_rps']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['failed']} |")  # fmt: skip
    c = report["ratio_concurrency"]
    lines.append(f"\ncaption at concurrency {c}: batched / unbatched throughput {report['caption_throughput_ratio']}×; "
                 f"batched p99 / a request alone {report['caption_p99_over_single']}× (on the batching server), "
                 f"{report['caption_p99_over_single_unbatched']}× (on the unbatched one)")  # fmt: skip
    m = report["mixed"]
    if m:
        lines.append(f"mixed run: {m['requests']} requests, {m['bad']} bad ({m['bad_answered_4xx']} answered 4xx), "
                     f"{m['failed_good']} good ones failed; RSS {m['rss_first_mb']:.0f} → {m['rss_last_mb']:.0f} MB "
                     f"({100 * m['rss_change']:+.1f}%)")  # fmt: skip
    return "\n".join(lines)
