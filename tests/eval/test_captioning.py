"""Caption metrics: equality with pycocoevalcap's COCOEvalCap on real COCO captions, the no-Java fallback."""

import json
import logging

import pytest

from mlm.eval.captioning import (
    caption_metrics,
    load_caption_results,
    load_coco_captions,
    simple_tokenize,
    tokenize_captions,
)

OFFICIAL_NAMES = {
    "BLEU-1": "Bleu_1",
    "BLEU-2": "Bleu_2",
    "BLEU-3": "Bleu_3",
    "BLEU-4": "Bleu_4",
    "METEOR": "METEOR",
    "ROUGE-L": "ROUGE_L",
    "CIDEr": "CIDEr",
}


@pytest.fixture
def coco_fixture(realdata, tmp_path):
    """12 real COCO images: references = captions 2..5, prediction = caption 1 (with some borrowed/mangled)."""
    data = json.loads((realdata / "coco-mini-train" / "captions_train2017.json").read_text())
    by_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    image_ids = sorted(by_image)[:12]
    references = [ann for i in image_ids for ann in by_image[i][1:]]
    results = [{"image_id": i, "caption": by_image[i][0]["caption"]} for i in image_ids]
    results[3]["caption"] = by_image[image_ids[4]][0]["caption"]  # a caption of another image
    results[5]["caption"] = "A A A, the the THE!"  # degenerate output
    gt = {"images": [{"id": i} for i in image_ids], "annotations": references, "info": {}, "licenses": []}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "results.json").write_text(json.dumps(results))
    return tmp_path / "gt.json", tmp_path / "results.json"


class _Skipped:
    """Stand-in for a COCOEvalCap scorer the test does not run (SPICE needs downloads, METEOR is slow)."""

    def __init__(self, name):
        self.name = name

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)

    def method(self):
        return self.name


def _official(gt_path, results_path, monkeypatch, run_meteor):
    """Scores from pycocoevalcap's own COCOEvalCap pipeline (pycocotools loading, PTB tokenizer, scorers)."""
    import pycocoevalcap.eval as coco_eval
    from pycocotools.coco import COCO

    monkeypatch.setattr(coco_eval, "Spice", lambda: _Skipped("SPICE"))
    if not run_meteor:
        monkeypatch.setattr(coco_eval, "Meteor", lambda: _Skipped("METEOR"))
    coco = COCO(str(gt_path))
    evaluator = coco_eval.COCOEvalCap(coco, coco.loadRes(str(results_path)))
    evaluator.params["image_id"] = evaluator.cocoRes.getImgIds()
    evaluator.evaluate()
    return evaluator.eval


def test_equals_coco_eval_cap_bleu_rouge_cider(coco_fixture, monkeypatch):
    gt_path, results_path = coco_fixture
    official = _official(gt_path, results_path, monkeypatch, run_meteor=False)
    ours = caption_metrics(
        load_caption_results(results_path), load_coco_captions(gt_path), metrics=("BLEU", "ROUGE-L", "CIDEr")
    )
    assert ours["tokenizer"] == "ptb" and ours["missing"] == [] and ours["num_images"] == 12
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert ours[name] == pytest.approx(100 * official[OFFICIAL_NAMES[name]], abs=1e-9), name
    assert "METEOR" not in ours
    assert 0 < ours["BLEU-4"] < ours["BLEU-1"] < 100


@pytest.mark.slow
def test_equals_coco_eval_cap_with_meteor(coco_fixture, monkeypatch):
    gt_path, results_path = coco_fixture
    official = _official(gt_path, results_path, monkeypatch, run_meteor=True)
    ours = caption_metrics(load_caption_results(results_path), load_coco_captions(gt_path))
    for name, official_name in OFFICIAL_NAMES.items():
        assert ours[name] == pytest.approx(100 * official[official_name], abs=1e-9), name


def test_simple_tokenizer_rules():
    assert simple_tokenize("A man's Black-and-white dog,  running!\n") == "a mans black and white dog running"
    assert simple_tokenize("It’s 3.5 m") == "its 3 5 m"


def test_without_java_falls_back_and_reports_meteor_missing(coco_fixture, monkeypatch, caplog):
    import shutil

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gt_path, results_path = coco_fixture
    predictions, references = load_caption_results(results_path), load_coco_captions(gt_path)
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: None)
    with caplog.at_level(logging.WARNING, logger="mlm.eval.captioning"):
        ours = caption_metrics(predictions, references)
    assert "no 'java' on PATH" in caplog.text
    assert ours["tokenizer"] == "simple" and ours["METEOR"] is None and ours["missing"] == ["METEOR"]
    # Same numbers as the pycocoevalcap scorers on simply tokenised captions.
    ids = list(predictions)
    gts = {i: [simple_tokenize(c) for c in references[i]] for i in ids}
    res = {i: [simple_tokenize(predictions[i])] for i in ids}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert [ours[f"BLEU-{n}"] for n in (1, 2, 3, 4)] == pytest.approx([100 * b for b in bleu], abs=1e-9)
    assert ours["ROUGE-L"] == pytest.approx(100 * Rouge().compute_score(gts, res)[0], abs=1e-9)
    assert ours["CIDEr"] == pytest.approx(100 * Cider().compute_score(gts, res)[0], abs=1e-9)
    with pytest.raises(ValueError, match="tokenizer 'ptb' needs Java"):
        caption_metrics(predictions, references, tokenizer="ptb")


def test_ptb_tokenizer_keeps_one_line_per_caption():
    tokens = tokenize_captions({1: ["A dog.\nTwo cats!", ""], 2: ["Hi, there"]}, "ptb")
    assert tokens == {1: ["a dog two cats", ""], 2: ["hi there"]}


def test_prediction_equal_to_every_reference_scores_full_marks():
    ours = caption_metrics({7: "a red bus"}, {7: ["A red bus.", "a red bus"]}, metrics=("BLEU", "ROUGE-L"))
    assert ours["BLEU-1"] == pytest.approx(100.0, abs=1e-4) and ours["ROUGE-L"] == pytest.approx(100.0)


def test_input_errors():
    with pytest.raises(ValueError, match=r"1 prediction\(s\) for images without reference captions, e.g. \[9\]"):
        caption_metrics({9: "x"}, {1: ["y"]}, metrics=("BLEU",))
    with pytest.raises(ValueError, match=r"unknown caption metric\(s\) \['SPICE'\]"):
        caption_metrics({1: "x"}, {1: ["y"]}, metrics=("SPICE",))
