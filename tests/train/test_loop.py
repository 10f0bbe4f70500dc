"""The training loop end to end on tiny synthetic data: exact resume after SIGTERM, NaN skipping, learning."""

import math
import os
import signal

import pytest
import torch
from tiny_run import tiny_config

from mlm.config import ConfigError
from mlm.data.dataset import build_dataset
from mlm.data.word_targets import word_documents
from mlm.model import MLMModel
from mlm.train import checkpoint as ckpt
from mlm.train.guards import NonFiniteLossError
from mlm.train.loop import Trainer
from mlm.train.losses import learned_words
from mlm.train.setup import open_split
from mlm.train.tracking import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


class Tap:
    """Wraps the training dataset: calls ``hook(n, sample)`` on the n-th item fetched (1-based) and returns it."""

    def __init__(self, dataset, hook):
        self.dataset, self.hook, self.fetched = dataset, hook, 0

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):
        return getattr(self.dataset, name)

    def __getitem__(self, index):
        self.fetched += 1
        return self.hook(self.fetched, self.dataset[index])


_TOKENIZERS = {}


def _trainer(config, hook=None, resume=None):
    from mlm.data.tokenizer import MLMTokenizer

    source = open_split(config, config.data.train, "train")
    # One vocabulary per data folder, trained once: a test compares several runs and need not retrain it each time.
    if config.data.train not in _TOKENIZERS:
        _TOKENIZERS[config.data.train] = MLMTokenizer.train_wordpiece(source.texts(), config.data.vocab_size)
    dataset = build_dataset(source, _TOKENIZERS[config.data.train], config, train=True)
    return Trainer(config, resume=resume, train_dataset=Tap(dataset, hook or (lambda n, s: s)))


def _losses(run_dir):
    return {step: value for step, value in read_metrics(run_dir / "metrics.csv")["loss"]}


def test_sigterm_saves_a_loadable_checkpoint_and_resume_is_exact(synth_dir, tmp_path):
    overrides = ["train.max_steps=6", "train.grad_accum_steps=2", "train.deterministic=true"]
    whole = _trainer(tiny_config(synth_dir, tmp_path / "whole", *overrides)).fit()
    assert whole["status"] == "completed" and whole["steps"] == 6

    def sigterm_in_step_3(n, sample):
        if n == 2 * 2 * 8 + 1:  # first record of step 3 (2 steps x 2 micro-batches x 8 records)
            os.kill(os.getpid(), signal.SIGTERM)
        return sample

    cut_dir = tmp_path / "cut"
    first = _trainer(tiny_config(synth_dir, cut_dir, *overrides), sigterm_in_step_3).fit()
    assert first["status"] == "interrupted" and first["steps"] == 3
    latest = ckpt.latest_checkpoint(cut_dir)
    assert latest.name == "step_000003"
    loaded = MLMModel.from_pretrained(latest / "model")
    assert loaded.tokenizer is not None and loaded.config.dim == 32

    second = _trainer(tiny_config(synth_dir, cut_dir, *overrides), resume="latest").fit()
    assert second["status"] == "completed" and second["steps"] == 6
    assert _losses(cut_dir) == _losses(tmp_path / "whole")  # every step, 6 significant digits
    final_whole = MLMModel.from_pretrained(ckpt.latest_checkpoint(tmp_path / "whole") / "model").state_dict()
    final_cut = MLMModel.from_pretrained(ckpt.latest_checkpoint(cut_dir) / "model").state_dict()
    assert all(torch.equal(final_whole[k], final_cut[k]) for k in final_whole)  # bit for bit


def test_a_nan_batch_is_skipped_and_counted(synth_dir, tmp_path):
    def nan_in_step_2(n, sample):
        if n == 8 + 3:  # a record of step 2
            sample = {**sample, "image": torch.full_like(sample["image"], float("nan"))}
        return sample

    trainer = _trainer(tiny_config(synth_dir, tmp_path, "train.max_steps=4"), nan_in_step_2)
    summary = trainer.fit()
    assert summary["status"] == "completed" and summary["steps"] == 4
    assert summary["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in trainer.unwrapped.parameters())
    losses = _losses(tmp_path)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())


def test_too_many_nonfinite_steps_stop_with_the_last_good_checkpoint(synth_dir, tmp_path):
    def nan_from_step_3(n, sample):
        if n > 2 * 8:
            sample = {**sample, "image": torch.full_like(sample["image"], float("nan"))}
        return sample

    config = tiny_config(synth_dir, tmp_path, "train.max_steps=10", "train.save_every=2", "train.max_nonfinite_steps=3")
    with pytest.raises(NonFiniteLossError, match=r"stopped at step 5: 3 non-finite steps in a row.*step_000002"):
        _trainer(config, nan_from_step_3).fit()
    assert MLMModel.from_pretrained(tmp_path / "checkpoints" / "step_000002" / "model") is not None


def test_a_short_run_clearly_lowers_every_loss(synth_dir, tmp_path):
    """60 steps: the decoder losses fall steadily; the contrastive loss falls below chance (ln 8 = 2.08 for 8
    caption rows a batch)."""
    config = tiny_config(synth_dir, tmp_path, "train.max_steps=60", "train.batch_size=16", "train.lr=5e-3",
                         "train.warmup_steps=10")  # fmt: skip
    summary = _trainer(config).fit()
    assert summary["skipped_steps"] == 0
    series = read_metrics(tmp_path / "metrics.csv")

    def start_end(name):
        values = [v for _, v in series[f"loss/{name}"]]
        return sum(values[:3]) / 3, sum(values[-5:]) / 5

    # Measured: contrastive about 3.0 -> 1.7 (with the image position table; 5.8 -> 1.9 before it).
    contrastive, caption, vqa = start_end("contrastive"), start_end("caption"), start_end("vqa")
    assert contrastive[1] < min(0.7 * contrastive[0], math.log(8))
    assert caption[1] < 0.8 * caption[0]
    assert vqa[1] < 0.7 * vqa[0]
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "summary.json").is_file()


def test_resuming_into_another_model_shape_names_the_setting(synth_dir, tmp_path):
    _trainer(tiny_config(synth_dir, tmp_path, "train.max_steps=1")).fit()
    with pytest.raises(ConfigError, match=r"model.dim: 32 -> 48"):
        _trainer(tiny_config(synth_dir, tmp_path, "train.max_steps=2", "model.dim=48"), resume="latest")


def test_hard_negative_batches_hold_similar_captions_and_train(synth_dir, tmp_path):
    config = tiny_config(synth_dir, tmp_path, "train.max_steps=2", "train.hard_negative_sampler=true",
                         "train.hard_negative_strength=0.5")  # fmt: skip
    trainer = _trainer(config)
    records = trainer.dataset.source
    features = trainer.sampler.features
    assert features is not None

    def within_batch_similarity(batches):
        sims = []
        for batch in batches:
            rows = torch.tensor([i for i in batch if not records[i].is_vqa])
            block = features[rows] @ features[rows].T  # (n, n) TF-IDF cosine of the batch's captions
            sims.append((block.sum() - block.trace()) / (len(rows) * (len(rows) - 1)))
        return float(torch.stack(sims).mean())

    grouped = within_batch_similarity(trainer.sampler.epoch_batches(0))
    trainer.sampler.set_features(None)
    shuffled = within_batch_similarity(trainer.sampler.epoch_batches(0))
    trainer.sampler.set_features(features)
    assert grouped > shuffled + 0.05
    summary = trainer.fit()
    assert summary["skipped_steps"] == 0 and summary["final_losses"]["loss/contrastive"] > 0


@pytest.mark.slow
def test_a_longer_run_learns_to_retrieve(synth_dir, tmp_path):
    """300 steps: contrastive loss well below chance and training-image retrieval far above chance."""
    from mlm.train.validation import Validator

    config = tiny_config(synth_dir, tmp_path, "train.max_steps=300", "train.batch_size=16", "train.lr=5e-3",
                         "train.warmup_steps=10", "train.log_every=10", "eval.max_samples=32")  # fmt: skip
    trainer = _trainer(config)
    trainer.fit()
    series = read_metrics(tmp_path / "metrics.csv")
    last = {name: sum(v for _, v in series[f"loss/{name}"][-5:]) / 5 for name in ("contrastive", "caption", "vqa")}
    # Measured: contrastive 1.39 (chance ln 8 = 2.08), caption 1.27 and VQA ~1.5 (from 5.3).
    assert last["contrastive"] < 0.8 * math.log(8)
    assert last["caption"] < 0.4 * math.log(200) and last["vqa"] < 0.5 * math.log(200)
    metrics = Validator(config, trainer.dataset.source, trainer.tokenizer)(trainer.unwrapped, torch.device("cpu"))
    chance = 100 / 32  # 32 training images
    assert metrics["val/text_to_image_R@1"] > 2.5 * chance  # measured about 17


def test_embedding_grouping_after_the_first_epoch_resumes_exactly(synth_dir, tmp_path):
    # 32 caption records, 4 caption rows a batch: 8 steps an epoch; the cut falls inside epoch 1.
    overrides = ["train.max_steps=12", "train.hard_negative_sampler=true", "train.deterministic=true"]
    whole = _trainer(tiny_config(synth_dir, tmp_path / "whole", *overrides))
    assert len(whole.sampler) == 8
    whole.fit()
    assert whole.state.grouping.shape == (len(whole.dataset), 32)  # text embeddings took over from TF-IDF
    torch.testing.assert_close(whole.sampler.features, whole.state.grouping.float())

    def sigterm_in_step_10(n, sample):
        if n == 9 * 8 + 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return sample

    cut_dir = tmp_path / "cut"
    assert _trainer(tiny_config(synth_dir, cut_dir, *overrides), sigterm_in_step_10).fit()["steps"] == 10
    _trainer(tiny_config(synth_dir, cut_dir, *overrides), resume="latest").fit()
    assert _losses(cut_dir) == _losses(tmp_path / "whole")


def test_the_word_objective_trains_its_head_and_lowers_its_loss(synth_dir, tmp_path):
    config = tiny_config(synth_dir, tmp_path, "train.max_steps=40", "train.batch_size=16", "train.lr=5e-3",
                         "train.warmup_steps=5", "model.word_head=true", "train.word_weight=1.0")  # fmt: skip
    trainer = _trainer(config)
    head = trainer.unwrapped.word_head.weight.detach().clone()
    trainer.fit()
    words = [v for _, v in read_metrics(tmp_path / "metrics.csv")["loss/words"]]
    assert words[0] > 0 and sum(words[-3:]) / 3 < 0.8 * sum(words[:3]) / 3
    assert not torch.equal(head, trainer.unwrapped.word_head.weight)


def test_a_questions_only_source_trains_with_the_word_objective_off_and_says_so(synth_dir, tmp_path, caplog):
    questions = synth_dir / "vqa_questions_train.json"
    config = tiny_config(synth_dir, tmp_path, f"data.train={questions}", "train.max_steps=3", "model.word_head=true",
                         "train.word_weight=1.0", "model.word_head_patches=true", "model.decoder_grounding=2",
                         "train.word_targets=image")  # fmt: skip
    with caplog.at_level("WARNING", logger="mlm.train.loop"):
        trainer = _trainer(config)
        trainer.fit()
    assert "train.word_weight=1: data.train has no words to learn (no captions;" in caplog.text
    metrics = read_metrics(tmp_path / "metrics.csv")
    assert all(v == 0 for _, v in metrics["loss/words"]) and all(v > 0 for _, v in metrics["loss/vqa"])
    # word grounding would read an untrained word head: it stays at its start, a no-op
    assert "model.decoder_grounding: frozen; its word maps have no words to learn from" in caplog.text
    assert not trainer.unwrapped.decoder.grounding.out.weight.any()


def test_questions_alone_teach_the_word_head_from_their_answers(synth_dir, tmp_path, caplog):
    questions = synth_dir / "vqa_questions_train.json"
    config = tiny_config(synth_dir, tmp_path, f"data.train={questions}", "train.max_steps=3", "model.word_head=true",
                         "train.word_weight=1.0", "model.word_head_patches=true",
                         "model.decoder_grounding=2")  # fmt: skip
    with caplog.at_level("WARNING", logger="mlm.train.loop"):
        trainer = _trainer(config)
        # train.word_targets=caption with no caption to learn: the answers that name a thing instead, and the run
        # says so and saves that setting
        assert "the word objective learns the answers that name a thing (answers)" in caplog.text
        # the search starts from the words the objective learns: the answers' ("red", "circle"), not "is" or "?"
        learned = learned_words(trainer.tokenizer, word_documents(trainer.dataset.source, "answers"))
        assert 0 < learned.sum() < 30 and learned[trainer.tokenizer.tokenize("circle")].all()
        assert not learned[trainer.tokenizer.tokenize("is there ?")].any()
        assert torch.equal(trainer.unwrapped.decoder.grounding.word_weight.detach(), learned.float())
        trainer.fit()
    assert "has no words to learn" not in caplog.text
    assert all(v > 0 for _, v in read_metrics(tmp_path / "metrics.csv")["loss/words"])
    assert "word_targets: answers" in (tmp_path / "config.yaml").read_text()
    assert trainer.unwrapped.decoder.grounding.out.weight.any()  # grounding trains on the maps the answers teach


def test_fit_steps_to_time_ends_the_schedule_within_the_budget_and_resume_keeps_it(synth_dir, tmp_path, monkeypatch):
    """With a clock at one second a step, a 32 s budget fits 31 steps (25 timed, then (32 * 0.97 - 25) more); the
    cosine reaches zero there, and resuming the finished run trains nothing more."""
    monkeypatch.setattr(Trainer, "_elapsed", lambda self: float(self.state.step))
    config = tiny_config(synth_dir, tmp_path, "train.max_steps=500", "train.max_time_s=32",
                         "train.fit_steps_to_time=true")  # fmt: skip
    summary = _trainer(config).fit()
    assert (summary["status"], summary["steps"], summary["schedule_steps"]) == ("completed", 31, 31)
    assert summary["final_lr"] == pytest.approx(0.0, abs=1e-9)
    assert ckpt.read_trainer_state(ckpt.resolve_resume(tmp_path, "latest"))["max_steps"] == 31
    again = _trainer(config, resume="latest").fit()
    assert (again["steps"], again["schedule_steps"]) == (31, 31)


def test_without_fitting_the_time_limit_cuts_the_schedule(synth_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "_elapsed", lambda self: float(self.state.step))
    config = tiny_config(synth_dir, tmp_path, "train.max_steps=500", "train.max_time_s=12")
    summary = _trainer(config).fit()
    assert (summary["status"], summary["steps"], summary["schedule_steps"]) == ("time limit", 12, 500)
    assert summary["final_lr"] > 0.9 * config.train.lr
