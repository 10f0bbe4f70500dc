"""Compressed DDP gradients: quantization round trips, and two gloo processes with the hooks of mlm/train/comm.py."""

from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from mlm.train.comm import CHUNK, QuantizedAllReduce, dequantize, quantize, quantized_hook, register


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_round_trip_is_within_half_a_step(bits):
    x = torch.randn(3 * CHUNK + 17) * torch.linspace(0.01, 10, 3 * CHUNK + 17)
    codes, scales = quantize(x, bits)
    assert codes.numel() == (4 * CHUNK if bits == 8 else 2 * CHUNK) and scales.numel() == 4
    error = (dequantize(codes, scales, bits, x.numel()) - x).abs().view(-1)
    step = scales.repeat_interleave(CHUNK)[: x.numel()]
    assert bool((error <= step / 2 + 1e-6).all())
    assert torch.equal(dequantize(*quantize(torch.zeros(10), bits), bits, 10), torch.zeros(10))  # zero stays exact


def _worker(rank, world_size, init_file, out_file, mode):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(nn.Linear(300, 4, bias=False))
        if mode == "int4-no-ef":
            hook = QuantizedAllReduce(4, error_feedback=False)
            model.register_comm_hook(hook, quantized_hook)
        else:
            train = SimpleNamespace(grad_compression=mode, grad_compression_full_every=0, grad_compression_rank=2)
            hook = register(model, train, SimpleNamespace(num_processes=world_size))
        x = torch.randn(8, 300, generator=torch.Generator().manual_seed(rank + 1))  # each rank its own data
        applied = torch.zeros_like(model.module.weight)
        steps = 20
        for _ in range(steps):
            model.zero_grad()
            model(x).square().sum().backward()  # the same gradient every step
            applied += model.module.weight.grad
        if rank == 0:
            torch.save(
                {
                    "applied": applied / steps,
                    "last": model.module.weight.grad.clone(),
                    "bytes": getattr(hook, "bytes_sent", None),
                    "numel": applied.numel(),
                    "steps": steps,
                },
                out_file,
            )
    finally:
        torch.distributed.destroy_process_group()


def _run(tmp_path, mode):
    out = tmp_path / f"{mode}.pt"
    mp.start_processes(_worker, args=(2, str(tmp_path / f"init-{mode}"), out, mode), nprocs=2, start_method="fork")
    return torch.load(out)


def _true_mean():
    torch.manual_seed(0)
    layer = nn.Linear(300, 4, bias=False)
    grads = []
    for rank in range(2):
        layer.zero_grad()
        layer(torch.randn(8, 300, generator=torch.Generator().manual_seed(rank + 1))).square().sum().backward()
        grads.append(layer.weight.grad.clone())
    return sum(grads) / 2


def test_int8_and_int4_with_error_feedback_track_the_true_gradient(tmp_path):
    truth = _true_mean()

    def error(x):
        return float((x - truth).norm() / truth.norm())

    # measured: one int8 step is off by 1.0%, one int4 step by 18.6%; over 20 steps of the same gradient error
    # feedback sends what rounding dropped (0.04% / 0.7% off on average), and without it int4 stays 18.6% off
    runs = {}
    for mode, one_step, average, bytes_bound in (("int8", 0.02, 0.002, 0.3), ("int4", 0.25, 0.02, 1 / 7)):
        got = runs[mode] = _run(tmp_path, mode)
        assert error(got["last"]) < one_step and error(got["applied"]) < average
        assert got["bytes"] <= bytes_bound * 4 * got["numel"] * got["steps"]  # fp32 sends 4 bytes a value
    plain = _run(tmp_path, "int4-no-ef")
    assert error(plain["applied"]) > 10 * error(runs["int4"]["applied"])


def test_fp16_hook_and_bad_modes(tmp_path):
    truth = _true_mean()
    got = _run(tmp_path, "fp16")
    torch.testing.assert_close(got["last"], truth, rtol=2e-3, atol=5e-3)  # fp16 keeps ~3 significant digits
    assert got["bytes"] == 2 * got["numel"] * got["steps"]
    one = register(None, SimpleNamespace(grad_compression="int4"), SimpleNamespace(num_processes=1))
    assert one is None  # one process: nothing to compress
    with pytest.raises(ValueError, match="bits=3"):
        QuantizedAllReduce(3)
    with pytest.raises(ValueError, match="'int2' is not one of none, fp16"):
        register(None, SimpleNamespace(grad_compression="int2"), SimpleNamespace(num_processes=2))


def test_unknown_mode_lists_the_valid_ones():
    from mlm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.grad_compression='int2' is not allowed; choose one of none, fp16"):
        load_config(None, ["train.grad_compression=int2"])
