"""AdamW parameter groups and the warmup + cosine schedule."""

import math

import pytest
import torch
from torch import nn

from mlm.config import Config, TrainConfig
from mlm.model import MLMModel
from mlm.train.schedule import build_optimizer, build_scheduler, param_groups


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.token_embed = nn.Embedding(10, 4)
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        self.norm = nn.LayerNorm(4)
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.token_embed.weight  # tied: must not appear twice
        self.logit_scale = nn.Parameter(torch.tensor(2.0))


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return sorted(name for name, p in model.named_parameters() if id(p) in ids)


def test_no_decay_on_norms_biases_embeddings_and_logit_scale():
    model = Block()
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert _names(model, decay) == ["proj.weight"]
    assert _names(model, no_decay) == [
        "logit_scale",
        "norm.bias",
        "norm.weight",
        "pos_embed",
        "proj.bias",
        "token_embed.weight",
    ]
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_mlm_model_groups_cover_every_parameter_once():
    model = MLMModel(Config().model)
    decay, no_decay = param_groups(model, 0.1)
    ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    no_decay_names = set(_names(model, no_decay))
    assert {"logit_scale", "logit_bias"} <= no_decay_names
    assert all(p.ndim >= 2 for p in decay["params"])
    assert {"encoder.token_embed.weight", "encoder.modality_embed.weight"} <= no_decay_names
    assert "encoder.patch_embed.proj.weight" in _names(model, decay)  # a projection, not a lookup table


def test_warmup_then_cosine_to_zero():
    model = nn.Linear(2, 2)
    train = TrainConfig(lr=1.0, warmup_steps=4, max_steps=12)
    opt = build_optimizer(model, train)
    sched = build_scheduler(opt, train)
    lrs = []
    for _ in range(13):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    # Halfway through the decay (step 8 of 4..12) the cosine is at 0.5; it ends at 0.
    assert lrs[8] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[12] == pytest.approx(0.0, abs=1e-12)


def test_bad_betas_name_the_field():
    with pytest.raises(ValueError, match="train.betas"):
        build_optimizer(nn.Linear(2, 2), TrainConfig(betas=[0.9]))
