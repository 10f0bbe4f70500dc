"""``mlm bench mla``: MHA vs GQA vs MLA at equal head count and head dims.

Measures, for one attention layer: parameters, KV-cache bytes per token (read off the filled caches), prefill time
over a causal mask, and decode tokens/s with a cache holding each context length, MLA both naive (K and V recomputed
from the cached latent at every step) and absorbed (attention over the latent itself), as in DeepSeek-V2 §2.1.
Runs on CPU and, when one is present, on CUDA. The defaults follow DeepSeek-V2-Lite's ratios at a smaller width:
16 heads, qk_nope_head_dim = v_head_dim = 64, qk_rope_head_dim = 32 (half), kv_lora_rank = 256 (4 x head dim).
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import time

logger = logging.getLogger(__name__)

CACHE_TARGET = 1 / 8  # MLA cache at most this fraction of MHA's
DECODE_TARGET = (2048, 1.5)  # absorbed decode at least this many times naive at this context
MHA_TARGET = (4096, 3.5)  # absorbed decode at least this many times MHA at this context (batch 32 in the issue)
VARIANTS = ("mha", "gqa", "mla_naive", "mla_absorbed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options (no heavy imports here)."""
    parser.add_argument("--dim", type=int, default=512, help="model width (default 512)")
    parser.add_argument("--n-heads", type=int, default=16, help="query heads of every kind (default 16)")
    parser.add_argument("--n-kv-heads", type=int, default=4, help="key/value heads of GQA (default 4)")
    parser.add_argument("--qk-nope-head-dim", type=int, default=64, help="(default 64)")
    parser.add_argument("--qk-rope-head-dim", type=int, default=32, help="(default 32)")
    parser.add_argument("--v-head-dim", type=int, default=64, help="(default 64)")
    parser.add_argument("--kv-lora-rank", type=int, default=256, help="MLA latent size (default 256)")
    parser.add_argument("--q-lora-rank", type=int, default=0, help="0 = no query compression (default)")
    parser.add_argument(
        "--contexts", type=int, nargs="+", default=[512, 2048, 8192], help="cached tokens (default 512 2048 8192)"
    )
    parser.add_argument("--decode-steps", type=int, default=8, help="timed decode steps per context (default 8)")
    parser.add_argument("--batch-size", type=int, default=1, help="(default 1)")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="(default fp32)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="(default 0)")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(args, kind: str, device, dtype):
    """Return an eval-mode attention module of kind (mha | gqa | mla) with the benchmark's head settings."""
    from mlm.config import MLAConfig
    from mlm.layers.mla import build_attention

    cfg = MLAConfig(
        n_heads=args.n_heads,
        q_lora_rank=args.q_lora_rank,
        kv_lora_rank=args.kv_lora_rank,
        qk_nope_head_dim=args.qk_nope_head_dim,
        qk_rope_head_dim=args.qk_rope_head_dim,
        v_head_dim=args.v_head_dim,
        n_kv_heads=args.n_kv_heads,
    )
    return build_attention(args.dim, cfg, kind).to(device=device, dtype=dtype).eval()


def _prefill(module, args, context: int, absorbed: bool, device, dtype):
    """Run one causal prefill of context tokens; return (seconds, filled cache)."""
    import torch

    from mlm.layers.masks import level_mask
    from mlm.layers.rope import rope_1d

    x = torch.randn(args.batch_size, context, args.dim, device=device, dtype=dtype)
    rope = rope_1d(torch.arange(context, device=device), args.qk_rope_head_dim)
    sizes = dict(window=0, window_2d=1, region=1, region_2d=1)  # unused by the global level
    mask = level_mask("global", context, causal=True, grid=None, device=device, **sizes)
    cache = module.new_cache()
    _sync(device)
    start = time.perf_counter()
    module(x, rope=rope, mask=mask, cache=cache, absorbed=absorbed)
    _sync(device)
    return time.perf_counter() - start, cache


def _decode(module, args, cache, absorbed: bool, device, dtype) -> float:
    """Decode args.decode_steps tokens one at a time after a cached context; return tokens/s (all batch rows).

    The median step time is used: on a shared machine a single slow step says more about the neighbours.
    """
    import torch

    from mlm.layers.rope import rope_1d

    warmup, steps, context = 2, args.decode_steps, cache.length
    cache = cache.copy()  # the next variant decodes from the same context
    x = torch.randn(args.batch_size, warmup + steps, args.dim, device=device, dtype=dtype)
    cos, sin = rope_1d(torch.arange(context, context + warmup + steps, device=device), args.qk_rope_head_dim)
    times = []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        # one new query may see every key so far, so no mask is needed
        module(x[:, i : i + 1], rope=(cos[i : i + 1], sin[i : i + 1]), cache=cache, absorbed=absorbed)
        _sync(device)
        times.append(time.perf_counter() - start)
    return args.batch_size / statistics.median(times[warmup:])


def _step_flops(module, args, cache, absorbed: bool, device, dtype) -> int:
    """FLOPs of one decode step after a cached context (torch.utils.flop_counter), on a copy of the cache."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    from mlm.layers.rope import rope_1d

    def cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)  # torch counts the CUDA fused kernels only

    x = torch.randn(args.batch_size, 1, args.dim, device=device, dtype=dtype)
    cos, sin = rope_1d(torch.arange(cache.length, cache.length + 1, device=device), args.qk_rope_head_dim)
    cpu_fused = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa_flops}
    with FlopCounterMode(display=False, custom_mapping=cpu_fused) as counter:
        module(x, rope=(cos, sin), cache=cache.copy(), absorbed=absorbed)
    return counter.get_total_flops()


def copy_bandwidth_gbs(device, n_bytes: int = 1 << 28, repeats: int = 5) -> float:
    """Measured memory bandwidth (GB/s, read + write) of copying a 256 MiB tensor: the bandwidth-bound limit."""
    import torch

    src = torch.empty(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n_bytes / min(times) / 1e9


def _measure_device(args, device_name: str) -> dict:
    """Measure every kind on one device and return its results."""
    import torch

    device, dtype = torch.device(device_name), getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    modules = {kind: _build(args, kind, device, dtype) for kind in ("mha", "gqa", "mla")}
    result = {"params": {k: sum(p.numel() for p in m.parameters()) for k, m in modules.items()}}
    result["kv_cache_bytes_per_token"], result["prefill_s"], result["decode_tokens_per_s"] = {}, {}, {}
    result["decode_gflops"], result["decode_cache_gbs"] = {}, {}
    with torch.inference_mode():
        for variant in VARIANTS:  # warm-up: first calls pay for kernel selection and allocation
            _prefill(modules[variant[:3]], args, 64, variant == "mla_absorbed", device, dtype)
        for context in args.contexts:
            prefill, decode = {}, {}
            for variant in VARIANTS:
                kind, absorbed = variant[:3], variant == "mla_absorbed"
                prefill[variant], cache = _prefill(modules[kind], args, context, absorbed, device, dtype)
                decode[variant] = _decode(modules[kind], args, cache, absorbed, device, dtype)
                result["kv_cache_bytes_per_token"][kind] = cache.bytes_per_token()
                step_s = args.batch_size / decode[variant]
                flops = _step_flops(modules[kind], args, cache, absorbed, device, dtype)
                cache_bytes = cache.bytes_per_token() * cache.length * args.batch_size  # read at least once a step
                result["decode_gflops"].setdefault(str(context), {})[variant] = flops / step_s / 1e9
                result["decode_cache_gbs"].setdefault(str(context), {})[variant] = cache_bytes / step_s / 1e9
                step = f"{device} ctx={context} {variant}: prefill {prefill[variant]:.3f}s"
                logger.info("%s, decode %.1f tok/s", step, decode[variant])
            result["prefill_s"][str(context)], result["decode_tokens_per_s"][str(context)] = prefill, decode
    from mlm.bench.train import gemm_peak_gflops

    result["machine"] = {"copy_gbs": copy_bandwidth_gbs(device)}
    if device.type == "cpu":
        result["machine"]["gemm_peak_gflops"] = gemm_peak_gflops()
    result["targets"] = _targets(result)
    return result


def _targets(result: dict) -> dict:
    """Return the ratios the issue sets targets for, with whether each is met."""
    cache = result["kv_cache_bytes_per_token"]
    out = {"mla_over_mha_cache": cache["mla"] / cache["mha"]}
    out["mla_cache_target_met"] = out["mla_over_mha_cache"] <= CACHE_TARGET
    context, factor = DECODE_TARGET
    decode = result["decode_tokens_per_s"].get(str(context))
    if decode is not None:
        out[f"absorbed_over_naive_decode_{context}"] = decode["mla_absorbed"] / decode["mla_naive"]
        out["absorbed_decode_target_met"] = out[f"absorbed_over_naive_decode_{context}"] >= factor
    for ctx, speeds in result["decode_tokens_per_s"].items():
        out[f"absorbed_over_mha_decode_{ctx}"] = speeds["mla_absorbed"] / speeds["mha"]
        out[f"gqa_over_mha_decode_{ctx}"] = speeds["gqa"] / speeds["mha"]
    context, factor = MHA_TARGET
    if f"absorbed_over_mha_decode_{context}" in out:
        out["absorbed_over_mha_target_met"] = out[f"absorbed_over_mha_decode_{context}"] >= factor
        out["gqa_at_least_mha_met"] = out[f"gqa_over_mha_decode_{context}"] >= 1.0
    return out


def _table(device_name: str, result: dict) -> str:
    """Format one device's results as a readable text table."""
    cache, params = result["kv_cache_bytes_per_token"], result["params"]
    lines = [f"== {device_name} ==", f"{'':24}{'mha':>12}{'gqa':>12}{'mla':>12}"]
    lines.append(f"{'parameters':24}" + "".join(f"{params[k]:>12,}" for k in ("mha", "gqa", "mla")))
    lines.append(f"{'KV cache bytes/token':24}" + "".join(f"{cache[k]:>12,}" for k in ("mha", "gqa", "mla")))
    header = f"{'context':>8}  {'':14}" + "".join(f"{v:>14}" for v in VARIANTS)
    lines += ["", header]
    for context in result["prefill_s"]:
        prefill, decode = result["prefill_s"][context], result["decode_tokens_per_s"][context]
        lines.append(f"{context:>8}  {'prefill s':14}" + "".join(f"{prefill[v]:>14.4f}" for v in VARIANTS))
        lines.append(f"{'':>8}  {'decode tok/s':14}" + "".join(f"{decode[v]:>14.1f}" for v in VARIANTS))
        flops, gbs = result["decode_gflops"][context], result["decode_cache_gbs"][context]
        lines.append(f"{'':>8}  {'GFLOP/s':14}" + "".join(f"{flops[v]:>14.1f}" for v in VARIANTS))
        lines.append(f"{'':>8}  {'cache GB/s':14}" + "".join(f"{gbs[v]:>14.1f}" for v in VARIANTS))
    peaks = result["machine"]
    lines.append(
        f"\nmachine: copy {peaks['copy_gbs']:.1f} GB/s"
        + (f", fp32 GEMM {peaks['gemm_peak_gflops']:.1f} GFLOP/s" if "gemm_peak_gflops" in peaks else "")
    )
    lines.append("")
    for name, value in result["targets"].items():
        lines.append(f"{name}: {value:.3f}" if isinstance(value, float) else f"{name}: {value}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> tuple[dict, str]:
    """Measure every device; return the JSON report and a readable table per device."""
    import torch

    if args.decode_steps < 1 or min(args.contexts) < 1:
        raise ValueError(f"--decode-steps={args.decode_steps} and --contexts={args.contexts} must be >= 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    by_device = {}
    for name in devices:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--devices {name}: CUDA is not available on this machine")
        by_device[name] = _measure_device(args, name)
    first = by_device[devices[0]]
    report = {
        "device": devices[0],
        "kv_cache_bytes_per_token": first["kv_cache_bytes_per_token"],
        "decode_tokens_per_s": first["decode_tokens_per_s"],
        "prefill_s": first["prefill_s"],
        "decode_gflops": first["decode_gflops"],
        "decode_cache_gbs": first["decode_cache_gbs"],
        "machine": first["machine"],
        "params": first["params"],
        "targets": first["targets"],
        "by_device": by_device,
        "settings": {k: v for k, v in vars(args).items() if k not in ("func", "json_out") and not callable(v)},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    return report, "\n\n".join(_table(name, result) for name, result in by_device.items())
