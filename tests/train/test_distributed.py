"""Two gloo processes on CPU: gathered losses and DDP-averaged gradients equal one process on the global batch."""

import math
from types import SimpleNamespace

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from mlm.config import TrainConfig
from mlm.train.losses import ImageTextLoss

VARIANTS = [
    {"contrastive_loss": "infonce", "local_loss": False, "hard_negative_strength": 0.0},
    {"contrastive_loss": "infonce", "local_loss": True, "hard_negative_strength": 0.0},
    {"contrastive_loss": "infonce", "local_loss": True, "hard_negative_strength": 0.5},
    {"contrastive_loss": "infonce", "local_loss": False, "hard_negative_strength": 0.5},
    {"contrastive_loss": "siglip", "local_loss": False, "hard_negative_strength": 0.0},
]
GLOBAL_BATCH, SEQ, VOCAB, DIM = 8, 6, 13, 8


class TinyTwoTower(nn.Module):
    """A few parameters producing the MLMOutput fields, so that the loss has something to send gradients to."""

    def __init__(self):
        super().__init__()
        self.image_proj = nn.Linear(12, DIM)
        self.token_embed = nn.Embedding(VOCAB, DIM)
        self.lm_head = nn.Linear(DIM, VOCAB)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    def forward(self, images, text_ids, text_mask):
        image = self.image_proj(images)  # (B, E)
        tokens = self.token_embed(text_ids)  # (B, T, E)
        pooled = (tokens * text_mask[..., None]).sum(1) / text_mask.sum(1, keepdim=True)  # (B, E)
        return SimpleNamespace(
            image_embeds=F.normalize(image, dim=-1),
            text_embeds=F.normalize(pooled, dim=-1),
            logit_scale=self.logit_scale.exp().clamp(max=100),
            logit_bias=self.logit_bias,
            logits=self.lm_head(tokens + image[:, None]),  # (B, T, V)
        )


def _global_batch():
    g = torch.Generator().manual_seed(1)
    text_ids = torch.randint(1, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    text_mask = torch.ones(GLOBAL_BATCH, SEQ, dtype=torch.bool)
    text_mask[:, -2:] = torch.rand(GLOBAL_BATCH, 2, generator=g) > 0.5
    labels = text_ids.masked_fill(~text_mask, -100)
    # Uneven split of the two record kinds: rank 0 holds 3 caption rows, rank 1 holds 2.
    is_vqa = torch.tensor([False, True, False, False, False, False, True, True])
    labels[is_vqa, :3] = -100
    return {
        "images": torch.randn(GLOBAL_BATCH, 12, generator=g),
        "text_ids": text_ids,
        "text_mask": text_mask,
        "labels": labels,
        "is_vqa": is_vqa,
    }


def _loss_and_grads(model, loss_fn, batch):
    out = model(batch["images"], batch["text_ids"], batch["text_mask"])
    total, parts = loss_fn(out, batch)
    total.backward()
    losses = torch.stack([total.detach(), parts["contrastive"], parts["caption"], parts["vqa"]])
    return losses, {name: p.grad.clone() for name, p in model.named_parameters()}


def _worker(rank, world_size, init_file, out_file):
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        batch = _global_batch()
        shard = {k: v.chunk(world_size)[rank] for k, v in batch.items()}
        results = []
        for variant in VARIANTS:
            torch.manual_seed(0)
            model = nn.parallel.DistributedDataParallel(TinyTwoTower())
            loss_fn = ImageTextLoss.from_config(TrainConfig(**variant), rank=rank, world_size=world_size)
            losses, grads = _loss_and_grads(model, loss_fn, shard)
            torch.distributed.all_reduce(losses)  # the logged value: the mean over processes
            results.append((losses / world_size, {k.removeprefix("module."): v for k, v in grads.items()}))
        if rank == 0:
            torch.save(results, out_file)
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_gloo_matches_one_process(tmp_path):
    # fork: the children start in a second instead of re-importing torch (which takes >10 s on a busy machine).
    args = (2, str(tmp_path / "init"), tmp_path / "rank0.pt")
    mp.start_processes(_worker, args=args, nprocs=2, start_method="fork")
    results = torch.load(tmp_path / "rank0.pt")
    for i, variant in enumerate(VARIANTS):
        torch.manual_seed(0)
        model = TinyTwoTower()
        loss_fn = ImageTextLoss.from_config(TrainConfig(**variant))
        expected_losses, expected_grads = _loss_and_grads(model, loss_fn, _global_batch())
        losses, grads = results[i]
        torch.testing.assert_close(losses, expected_losses, rtol=1e-5, atol=1e-6, msg=f"{variant}: losses differ")
        assert expected_losses[1] > 0 and expected_losses[3] > 0  # every part took part
        for name, grad in expected_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=f"{variant}: {name} grad differs")
