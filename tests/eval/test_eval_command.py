"""``mlm eval vqa|caption|retrieval --predictions FILE``: scoring official-format result files without a model."""

import argparse
import json

import pytest
import torch

from mlm.commands import eval as eval_command
from mlm.eval.retrieval import save_embeddings


def _run(argv):
    parser = argparse.ArgumentParser(prog="mlm")
    eval_command.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_eval_vqa_scores_an_official_results_file(realdata, tmp_path, capsys):
    sample = realdata / "vqav2-sample"
    results = [
        {"question_id": 458752000, "answer": "Net."},  # 7 of 10 annotators: 100%
        {"question_id": 458752001, "answer": "catcher"},  # 1 of 10: 30%
        {"question_id": 458752002, "answer": "orange"},  # 10 of 10: 100%
    ]
    (tmp_path / "results.json").write_text(json.dumps(results))
    argv = ["eval", "vqa", "--predictions", str(tmp_path / "results.json"), "--out", str(tmp_path / "report")]
    argv += ["--questions", str(sample / "questions.json"), "--annotations", str(sample / "annotations.json")]
    assert _run(argv) == 0
    assert "| overall | 76.67 |" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["overall"] == pytest.approx(100 * 2.3 / 3) and metrics["num_questions"] == 3
    assert (tmp_path / "report" / "vqa_types.png").is_file()


def test_eval_vqa_rejects_results_for_unknown_questions(realdata, tmp_path):
    sample = realdata / "vqav2-sample"
    (tmp_path / "results.json").write_text(json.dumps([{"question_id": 1, "answer": "x"}]))
    argv = ["eval", "vqa", "--predictions", str(tmp_path / "results.json")]
    argv += ["--questions", str(sample / "questions.json"), "--annotations", str(sample / "annotations.json")]
    with pytest.raises(ValueError, match=r"3 question\(s\) without a prediction"):
        _run(argv)


def test_eval_caption_scores_a_coco_results_file(tmp_path, capsys):
    gt = {"annotations": [{"image_id": 1, "caption": "A red bus."}, {"image_id": 2, "caption": "two dogs play"}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps([{"image_id": 1, "caption": "a red bus"}]))
    argv = ["eval", "caption", "--predictions", str(tmp_path / "res.json"), "--annotations", str(tmp_path / "gt.json")]
    assert _run(argv + ["--tokenizer", "simple", "--metrics", "BLEU,ROUGE-L", "--out", str(tmp_path / "out")]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["ROUGE-L"] == pytest.approx(100.0) and metrics["num_images"] == 1
    assert "| tokenizer | simple |" in capsys.readouterr().out


def test_eval_retrieval_scores_saved_embeddings(tmp_path, capsys):
    save_embeddings(tmp_path / "emb.safetensors", torch.eye(3), torch.eye(3)[[0, 0, 1, 2]], torch.tensor([0, 0, 1, 2]))
    assert _run(["eval", "retrieval", "--predictions", str(tmp_path / "emb.safetensors"), "--chunk-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "| image_to_text_R@1 | 100.00 |" in out and "| text_to_image_median_rank | 1.00 |" in out


def test_eval_needs_a_prediction_source():
    with pytest.raises(SystemExit):
        _run(["eval", "retrieval"])
