"""VQA with shuffled images: the pairing, the per-type gains, a blind model's zero gain, the report and CLI."""

import argparse
import json

import pytest
import torch

from mlm import inference as infer
from mlm.commands import eval as eval_command
from mlm.config import EvalConfig
from mlm.data.turns import image_key
from mlm.eval.image_reliance import reliance, shuffled_partners
from mlm.eval.report import summary_table
from mlm.eval.runner import evaluate, open_eval_source
from mlm.eval.vqa import vqa_accuracy


def test_each_question_gets_another_image_and_the_pairing_repeats():
    keys = ["b.png", "a.png", "b.png", "c.png", "a.png", "c.png", "d.png"]
    partners = shuffled_partners(keys)
    assert partners == shuffled_partners(list(keys))
    assert sorted(partners) == list(range(len(keys)))  # every image is still asked about once
    assert all(keys[p] != keys[i] for i, p in enumerate(partners))
    with pytest.raises(ValueError, match="at least two different images"):
        shuffled_partners(["a.png", "a.png"])


def test_gains_are_the_own_image_minus_the_shuffled_accuracy_per_type():
    own = {"overall": 80.0, "per_answer_type": {"yes/no": 90.0, "other": 70.0}, "per_question_type": {"is": 90.0}}
    other = {"overall": 55.0, "per_answer_type": {"yes/no": 90.0, "other": 20.0}, "per_question_type": {"is": 90.0}}
    out = reliance(own, other)
    assert out["image_gain"] == 25.0 and out["overall"] == 55.0
    assert out["image_gain_per_answer_type"] == {"yes/no": 0.0, "other": 50.0}
    assert out["image_gain_per_question_type"] == {"is": 0.0}


def test_shuffled_answers_are_the_models_answers_about_the_partner_images(tiny_model, tiny_run, tmp_path):
    source = open_eval_source(tiny_run[1] / "vqa_questions_test.json")
    metrics = evaluate(tiny_model, source, "vqa", EvalConfig(vqa_shuffled=True), out_dir=tmp_path)["vqa"]
    shuffled = metrics["shuffled_images"]
    assert shuffled["image_gain"] == pytest.approx(metrics["overall"] - shuffled["overall"])
    partners = shuffled_partners([image_key(r) for r in source])
    pixels = torch.stack([infer.image_transform(tiny_model)(infer.decode_any(source[p].image)) for p in partners])
    answers = tiny_model.answer(pixels, [r.question for r in source])
    alone = evaluate(tiny_model, source, "vqa", EvalConfig())["vqa"]  # its own images: the same as above
    assert alone["overall"] == pytest.approx(metrics["overall"])
    annotations = [{"question_id": r.question_id, "answers": [{"answer": a} for a in r.answers]} for r in source]
    expected = vqa_accuracy({r.question_id: a for r, a in zip(source, answers, strict=True)}, annotations)
    assert shuffled["overall"] == pytest.approx(expected["overall"])
    table = summary_table({"vqa": metrics})
    assert f"| VQA, shuffled images | accuracy (own image's gain) | {shuffled['overall']:.2f} / " in table
    saved = json.loads((tmp_path / "metrics.json").read_text())["vqa"]["shuffled_images"]
    assert saved["image_gain"] == pytest.approx(shuffled["image_gain"])


def test_a_model_that_ignores_the_image_gains_nothing_from_it(tiny_model, tiny_run, monkeypatch):
    source = open_eval_source(tiny_run[1] / "vqa_questions_test.json")
    blind = tiny_model.answer
    monkeypatch.setattr(tiny_model, "answer", lambda pixels, questions, **kw: blind(pixels[:1].expand_as(pixels),
                                                                                     questions, **kw))  # fmt: skip
    shuffled = evaluate(tiny_model, source, "vqa", EvalConfig(vqa_shuffled=True))["vqa"]["shuffled_images"]
    assert shuffled["image_gain"] == 0.0
    assert set(shuffled["image_gain_per_answer_type"].values()) == {0.0}


def test_mlm_eval_shuffled_images_flag_prints_the_rows(tiny_run, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="mlm")
    eval_command.register(parser.add_subparsers(dest="command", required=True))
    run, synth = tiny_run
    args = parser.parse_args(["eval", "--checkpoint", str(run), "--data", str(synth / "vqa_questions_test.json"),
                              "--task", "vqa", "--shuffled-images", "--markdown", "--out", str(tmp_path)])  # fmt: skip
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    gain = json.loads((tmp_path / "metrics.json").read_text())["vqa"]["shuffled_images"]["image_gain"]
    assert "| VQA, shuffled images | accuracy (own image's gain) |" in printed and f" / {gain:.2f} |" in printed
