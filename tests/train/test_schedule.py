"""AdamW parameter groups and the warmup + cosine schedule."""

import math

import pytest
import torch
from torch import nn

from mlm.config import Config, TrainConfig
from mlm.model import MLMModel
from mlm.train.schedule import FIT_FROM, REFIT_EVERY, TimeFit, build_optimizer, build_scheduler, param_groups


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


@pytest.mark.parametrize(("warmup", "total"), [(0, 10), (4, 12), (50, 1100)])
def test_the_schedule_equals_transformers_cosine_with_warmup(warmup, total):
    from transformers import get_cosine_schedule_with_warmup

    train = TrainConfig(lr=1.0, warmup_steps=warmup, max_steps=total)
    ours, theirs = nn.Linear(2, 2), nn.Linear(2, 2)
    opt_a, opt_b = build_optimizer(ours, train), build_optimizer(theirs, train)
    a, b = build_scheduler(opt_a, train), get_cosine_schedule_with_warmup(opt_b, warmup, total)
    for _ in range(total + 2):
        assert a.get_last_lr() == pytest.approx(b.get_last_lr(), abs=1e-12)
        a.step()
        b.step()


def test_time_fit_times_after_the_first_steps_and_fits_the_budget():
    train = TrainConfig(warmup_steps=50, max_steps=1000, max_time_s=100.0)
    fit = TimeFit(train)
    assert fit.end == 50
    # each step takes 0.5 s except the first five (2 s each)
    elapsed = {step: 2.0 * min(step, FIT_FROM) + 0.5 * max(0, step - FIT_FROM) for step in range(1, 51)}
    paces = [fit.pace(step, elapsed[step]) for step in range(1, 51)]
    assert paces[:-1] == [None] * 49 and paces[-1] == pytest.approx(0.5)
    # at step 50, 32.5 s in: (100 * 0.97 - 32.5) / 0.5 = 129 more steps
    assert fit.total(50, elapsed[50], 0.5) == 179
    assert fit.total(50, elapsed[50], 0.01) == 1000  # never past train.max_steps
    assert fit.total(50, 99.0, 0.5) == 51  # over budget already: the schedule ends at the next step


def test_time_fit_follows_a_machine_that_slows_down():
    """1 s a step to step 60, then 2 s: fitted at step 25 (194 steps), again at 75 (pace 1.3 over 25..75: 155) and
    at 125 (pace 2: 127); a single fit would have run into the 200 s limit at step 130 with the lr still high."""
    fit = TimeFit(TrainConfig(warmup_steps=10, max_steps=1000, max_time_s=200.0))
    ends = {}
    for step in range(1, 128):
        elapsed = step if step <= 60 else 60 + 2 * (step - 60)
        pace = fit.pace(step, float(elapsed))
        if pace is not None:
            ends[step] = fit.total(step, float(elapsed), pace)
    assert ends == {25: 194, 75: 155, 125: 127}


def test_time_fit_resumed_past_the_first_steps_times_twenty_steps():
    fit = TimeFit(TrainConfig(warmup_steps=10, max_steps=1000, max_time_s=100.0))
    assert fit.end == FIT_FROM + 20
    assert fit.pace(40, 30.0) is None  # resumed at step 40: timing starts here
    assert all(fit.pace(step, 30.0 + (step - 40)) is None for step in range(41, 60))
    assert fit.pace(60, 50.0) == pytest.approx(1.0)
    assert all(fit.pace(step, 50.0 + (step - 60)) is None for step in range(61, 60 + REFIT_EVERY))
    assert fit.pace(60 + REFIT_EVERY, 50.0 + 2 * REFIT_EVERY) == pytest.approx(2.0)
