"""Model-based evaluation: evaluate() on a synthetic split, its files re-scored by the predictions form, mlm eval."""

import argparse
import json

import pytest
import torch

from mlm import inference as infer
from mlm.commands import eval as eval_command
from mlm.config import EvalConfig
from mlm.data.records import Record
from mlm.eval.retrieval import retrieval_metrics
from mlm.eval.runner import candidate_list, caption_groups, evaluate, open_eval_source

FAST_CAPTION = dict(caption_tokenizer="simple", caption_metric_names=["BLEU", "ROUGE-L", "CIDEr"])


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="mlm")
    eval_command.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_retrieval_matches_embeddings_computed_by_hand_with_every_caption_of_an_image(tiny_model, tiny_run):
    source = open_eval_source(tiny_run[1] / "captions_test.json")
    tiny_model.train()  # as the training loop calls it
    metrics = evaluate(tiny_model, source, "retrieval")["retrieval"]
    assert tiny_model.training  # its mode is given back
    tiny_model.eval()
    groups = caption_groups(source)
    pixels = torch.stack([infer.image_transform(tiny_model)(infer.decode_any(g.image)) for g in groups])
    texts = [c for g in groups for c in g.captions]
    owners = torch.tensor([i for i, g in enumerate(groups) for _ in g.captions])
    ids, mask = tiny_model.tokenizer.encode_batch(texts, tiny_model.config.max_text_len)
    with torch.no_grad():
        expected = retrieval_metrics(
            tiny_model.encode_image(pixels, True), tiny_model.encode_text(ids, True, text_mask=mask), owners
        )
    assert metrics["num_texts"] == 5 * metrics["num_images"] == 5 * len(source)  # 5 captions per image
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key


def test_all_tasks_write_official_results_that_the_predictions_form_scores_identically(tiny_model, tiny_run, tmp_path):
    synth, out = tiny_run[1], tmp_path / "report"
    results = evaluate(tiny_model, synth, "all", out_dir=out, **FAST_CAPTION)
    assert list(results) == ["retrieval", "vqa", "caption"]
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(results))
    report = (out / "report.md").read_text()
    for figure in (
        "retrieval_text_to_image.png",
        "retrieval_image_to_text.png",
        "vqa_types.png",
        "caption_examples.png",
    ):
        assert (out / figure).stat().st_size > 1000 and f"({figure})" in report
    vqa = ["eval", "vqa", "--predictions", str(out / "vqa_results.json"), "--out", str(tmp_path / "vqa")]
    vqa += [
        "--questions",
        str(synth / "vqa_questions_test.json"),
        "--annotations",
        str(synth / "vqa_annotations_test.json"),
    ]
    assert run_cli(vqa) == 0
    rescored = json.loads((tmp_path / "vqa" / "metrics.json").read_text())
    assert rescored["overall"] == pytest.approx(results["vqa"]["overall"])
    assert rescored["per_question_type"] == pytest.approx(results["vqa"]["per_question_type"])
    caption = ["eval", "caption", "--predictions", str(out / "caption_results.json"), "--tokenizer", "simple"]
    caption += ["--annotations", str(synth / "captions_test.json"), "--metrics", "BLEU,ROUGE-L,CIDEr"]
    caption += ["--out", str(tmp_path / "caption")]
    assert run_cli(caption) == 0
    rescored = json.loads((tmp_path / "caption" / "metrics.json").read_text())
    assert rescored["CIDEr"] == pytest.approx(results["caption"]["CIDEr"])
    assert rescored["BLEU-4"] == pytest.approx(results["caption"]["BLEU-4"])


def test_rank_mode_picks_the_most_likely_candidate(tiny_model, tiny_run, tmp_path):
    source = open_eval_source(tiny_run[1] / "vqa_questions_test.json")
    candidates = ["red", "two", "yes", "top left"]
    cfg = EvalConfig(vqa_mode="rank")
    metrics = evaluate(tiny_model, source, "vqa", cfg, out_dir=tmp_path, candidates=candidates)["vqa"]
    assert metrics["mode"] == "rank" and metrics["num_candidates"] == 4
    predicted = {r["question_id"]: r["answer"] for r in json.loads((tmp_path / "vqa_results.json").read_text())}
    pixels = torch.stack([infer.image_transform(tiny_model)(infer.decode_any(r.image)) for r in source])
    scores = infer.answer_log_likelihood(tiny_model, pixels, [r.question for r in source], candidates)
    assert [predicted[r.question_id] for r in source] == [candidates[i] for i in scores.argmax(dim=1).tolist()]


def test_candidate_list_counts_normalised_answers_and_keeps_the_common_spelling():
    records = [
        Record(image="a.png", question="q", answers=["two", "2", "two", "Two"]),
        Record(image="b.png", question="q", answers=["red", "red.", "a red"]),
        Record(image="c.png", question="q", answers=["yes"]),
    ]
    # "two"/"2"/"Two" normalise to "2" (4 votes), "red"/"red."/"a red" to "red" (3 votes)
    assert candidate_list(records) == ["two", "red", "yes"]
    assert candidate_list(records, top_k=1) == ["two"]


def test_evaluate_names_what_is_missing(tiny_model, tiny_run):
    with pytest.raises(ValueError, match="task captions is not one of retrieval, vqa, caption, all"):
        evaluate(tiny_model, tiny_run[1], "retrieval,captions")
    both = evaluate(tiny_model, tiny_run[1], ["vqa", "retrieval"])
    assert list(both) == ["retrieval", "vqa"] and both == evaluate(tiny_model, tiny_run[1], "retrieval, vqa")
    with pytest.raises(ValueError, match="VQA needs question records"):
        evaluate(tiny_model, tiny_run[1] / "captions_test.json", "vqa")
    only_questions = evaluate(tiny_model, tiny_run[1] / "vqa_questions_test.json", "all")
    assert list(only_questions) == ["vqa"]


def test_mlm_eval_checkpoint_form_prints_a_markdown_table_and_writes_the_report(tiny_run, tmp_path, capsys):
    run, synth = tiny_run
    argv = ["eval", "--checkpoint", str(run), "--data", str(synth / "captions_test.json"), "--task", "retrieval"]
    assert run_cli(argv + ["--markdown", "--out", str(tmp_path), "--set", "eval.batch_size=3"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| task | metric | value |\n| --- | --- | ---: |\n| retrieval (4 images, 20 captions)")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert f"| | mean recall | {metrics['retrieval']['mean_recall']:.2f} |" in printed
    with pytest.raises(ValueError, match="only eval.\\* and data.\\*"):
        run_cli(argv + ["--set", "model.dim=8"])
    with pytest.raises(ValueError, match="--predictions FILE, or --checkpoint DIR"):
        run_cli(["eval"])
    with pytest.raises(ValueError, match="give --data SOURCE: .* has no run config naming data.test"):
        run_cli(["eval", "--checkpoint", str(run)])
