"""Knowledge distillation: the KL terms on hand-checked values, and ``mlm distill`` as a resumable ``mlm train`` run
whose student keeps the teacher's tokenizer and moves towards the teacher."""

import math
from types import SimpleNamespace

import pytest
import tiny_checkpoint
import torch
from safetensors.torch import load_file

from mlm.cli import main
from mlm.config import load_config
from mlm.train import checkpoint as ckpt
from mlm.train.distill import DistillLoss, add_distillation, teacher_outputs
from mlm.train.loop import Trainer
from mlm.train.tracking import read_metrics


def _output(image, text, logits, scale=1.0):
    return SimpleNamespace(image_embeds=image, text_embeds=text, logits=logits, logit_scale=torch.tensor(scale))


def test_the_kl_terms_are_zero_for_the_teacher_itself_and_match_a_hand_computation():
    image = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    logits = torch.randn(3, 5, 7)
    labels = torch.tensor([[1, 2, 3, -100, -100], [1, 4, -100, -100, -100], [-100, -100, 2, 5, -100]])
    batch = {"is_vqa": torch.tensor([False, False, True]), "labels": labels}
    loss = DistillLoss(1.0, 1.0, temperature=2.0)
    total, parts = loss(_output(image, text, logits), _output(image, text, logits), batch)
    assert total.item() == pytest.approx(0.0, abs=1e-6)

    # one caption pair against a two-row batch: the rows' softmaxes over [s00, s01] compared by hand
    student = _output(image, text, torch.zeros(3, 5, 7))
    total, parts = loss(student, _output(image, text, logits), batch)
    p = (logits[:, :-1][labels[:, 1:] != -100] / 2).softmax(-1)  # teacher at T = 2; the student is uniform
    by_hand = 4 * (p * (p.log() + math.log(7))).sum(-1).mean()
    assert parts["tokens"].item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert parts["contrastive"].item() == pytest.approx(0.0, abs=1e-6)  # same embeddings, same scale
    same = torch.nn.functional.normalize(torch.ones(3, 4), dim=-1)
    flat = _output(same, same, logits)
    _, parts = loss(flat, _output(image, text, logits), batch)
    s = image[:2] @ text[:2].T  # the teacher's similarities (scale 1); the student's are all equal: uniform
    kl = lambda rows: (rows.softmax(-1) * (rows.log_softmax(-1) + math.log(2))).sum(-1).mean()  # noqa: E731
    assert parts["contrastive"].item() == pytest.approx(((kl(s) + kl(s.T)) / 2).item(), rel=1e-5)


def test_without_a_teacher_the_loss_is_unchanged():
    loss = torch.tensor(2.5)
    same, parts = add_distillation(None, DistillLoss(), None, {}, loss, {"caption": torch.tensor(1.0)})
    assert same is loss and parts["distill"].item() == 0.0 and parts["caption"].item() == 1.0


def _student(synth, out, teacher, *extra):
    sets = [f"data.train={synth}", f"train.output_dir={out}", "train.batch_size=8", "train.warmup_steps=2",
            "train.lr=3e-3", "train.max_steps=6", "train.save_every=3", "train.trackers=[csv]",
            "train.mixed_precision='no'", "train.log_every=1", f"train.distill.teacher={teacher}", "model.dim=16",
            "model.embed_dim=16", "model.mla.n_heads=1", *extra]  # fmt: skip
    return load_config(None, tiny_checkpoint.TINY_MODEL + sets)


def test_a_student_keeps_the_teachers_tokenizer_logs_the_term_and_resumes_exactly(tiny_run, tmp_path):
    run, synth = tiny_run
    Trainer(_student(synth, tmp_path / "a", run)).fit()
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()
    distilled = dict(read_metrics(tmp_path / "a" / "metrics.csv")["loss/distill"])
    assert len(distilled) == 6 and all(v > 0 for v in distilled.values())
    cut = tmp_path / "cut"
    Trainer(_student(synth, cut, run, "train.max_time_s=0.05")).fit()  # stopped by its time limit
    assert 0 < ckpt.read_trainer_state(ckpt.latest_checkpoint(cut))["step"] < 6
    Trainer(_student(synth, cut, run), resume="latest").fit()
    a, b = (load_file(str(ckpt.latest_checkpoint(d) / "model" / "model.safetensors")) for d in (tmp_path / "a", cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_distillation_pulls_the_student_towards_the_teacher(tiny_run, tmp_path):
    run, synth = tiny_run
    gaps = {}
    only_teacher = ["train.contrastive_weight=0", "train.caption_weight=0", "train.vqa_weight=0"]
    for name, extra in (("plain", ["train.distill.token_weight=0", "train.distill.contrastive_weight=0"]),
                        ("distilled", only_teacher)):  # fmt: skip
        trainer = Trainer(_student(synth, tmp_path / name, run, "train.max_steps=20", "train.save_every=0", *extra))
        batch = next(trainer._micro_batches())

        def gap(trainer=trainer, batch=batch):
            with torch.no_grad():
                out = trainer.unwrapped.eval()(batch["images"], batch["text_ids"], batch["text_mask"])
                return DistillLoss()(out, teacher_outputs(trainer.teacher, batch), batch)[1]

        before = gap()
        trainer.fit()
        gaps[name] = gap()
    # measured: tokens 0.276 -> 0.126, contrastive 0.121 -> 0.006 (0.012 from the ground truth alone)
    assert gaps["distilled"]["tokens"] < 0.6 * before["tokens"]
    assert gaps["distilled"]["contrastive"] < 0.1 * before["contrastive"]
    assert gaps["distilled"]["contrastive"] < gaps["plain"]["contrastive"]


def test_mlm_distill_names_a_missing_teacher_in_one_line(tiny_run, tmp_path, capsys):
    run, synth = tiny_run
    path = tmp_path / "student.yaml"
    _student(synth, tmp_path / "s", run).save(path)
    assert main(["distill", "--teacher", str(tmp_path / "nothing"), "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "nothing" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s" / "checkpoints").exists()
