"""VQAv2 accuracy: every normalisation rule on hand-worked cases, the 10-subset formula, breakdowns, rank mode,
and equality with an independent implementation of the official formula on the real VQAv2 sample."""

import itertools
import json
import re

import pytest
import torch

from mlm.eval.vqa import (
    CONTRACTIONS,
    candidate_answers,
    load_vqa_annotations,
    load_vqa_results,
    normalize_answer,
    process_punctuation,
    question_accuracy,
    rank_answers,
    vqa_accuracy,
    vqa_scores,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Yes", "yes"),  # lower-case
        ("  two\tdogs\n", "2 dogs"),  # tabs/newlines become spaces, then stripped; number word -> digit
        ("none", "0"),  # "none" counts as zero
        ("ten", "10"),
        ("eleven", "eleven"),  # only zero..ten are mapped
        ("a dog", "dog"),  # articles dropped
        ("An Apple", "apple"),
        ("the Red car", "red car"),
        ("theatre", "theatre"),  # whole words only
        ("yes.", "yes"),  # period not followed by a digit is removed
        ("2.5", "2.5"),  # decimal point kept
        ("3.", "3"),
        ("a.b.c", "abc"),
        ("black/white", "black white"),  # punctuation inside a word separates words
        ("black / white", "black white"),  # punctuation touching a space is deleted
        ("red, white", "red white"),
        ("1,000", "1000"),  # digit,digit: every punctuation mark is deleted...
        ("1,000 red-ish", "1000 redish"),  # ...even away from the number
        ("red-ish", "red ish"),
        ("what?!", "what"),
        ("(left)", "left"),
        ("10:30", "10:30"),  # colon is not in the official list
        ("man's", "man's"),  # nor the apostrophe (it feeds the contractions)
        ("dont", "don't"),  # contractions get their apostrophe back
        ("Isnt it", "isn't it"),
        ("somebody'd", "somebodyd"),  # an official-table oddity, kept for exact numbers
        ("hes one", "he's 1"),
    ],
)
def test_normalize_answer_rules(raw, expected):
    assert normalize_answer(raw) == expected


def test_period_strip_stops_after_32_like_the_official_script():
    # The official script passes re.UNICODE (32) as `count`, so only the first 32 periods go.
    assert process_punctuation("." * 40) == "." * 8


@pytest.mark.parametrize(("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_accuracy_is_mean_over_ten_leave_one_out_subsets(matches, expected):
    # k matching annotators: k subsets keep k-1 matches, 10-k keep k; each scores min(1, n/3).
    answers = ["cat"] * matches + ["dog", "cow", "pig", "hen", "fox", "owl", "elk", "yak", "ram", "bee"][matches:]
    assert question_accuracy("Cat.", answers) == pytest.approx(expected)


def test_ground_truth_gets_punctuation_processing_only_when_annotators_disagree():
    # Disagreeing annotators: "black/white" is processed to "black white" and matches the prediction.
    assert question_accuracy("black/white", ["black/white"] * 3 + ["black white"] * 7) == pytest.approx(1.0)
    # Unanimous ground truth is left as written, so "yes." never matches the normalised prediction "yes".
    assert question_accuracy("yes.", ["yes."] * 10) == 0.0
    # Ground truth never gets number-word mapping: "two" does not match the normalised prediction "2".
    assert question_accuracy("two", ["two"] * 10) == 0.0


def _annotation(qid, answers, answer_type=None, question_type=None):
    ann = {"question_id": qid, "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)]}
    if answer_type:
        ann["answer_type"] = answer_type
    if question_type:
        ann["question_type"] = question_type
    return ann


def test_breakdown_per_answer_and_question_type():
    annotations = [
        _annotation(1, ["yes"] * 10, "yes/no", "is the"),
        _annotation(2, ["no"] * 10, "yes/no", "is the"),
        _annotation(3, ["2"] * 2 + ["3"] * 8, "number", "how many"),
        _annotation(4, ["red"] * 10, "other", "what color"),
    ]
    predictions = {1: "yes", 2: "yes", 3: "two", 4: "Red"}
    metrics = vqa_accuracy(predictions, annotations)
    assert metrics["overall"] == pytest.approx(100 * (1 + 0 + 0.6 + 1) / 4)
    assert metrics["per_answer_type"] == pytest.approx({"yes/no": 50.0, "number": 60.0, "other": 100.0})
    assert metrics["per_question_type"] == pytest.approx({"is the": 50.0, "how many": 60.0, "what color": 100.0})
    assert metrics["num_questions"] == 4


def test_predictions_must_cover_exactly_the_annotated_questions():
    annotations = [_annotation(1, ["yes"] * 10), _annotation(2, ["no"] * 10)]
    with pytest.raises(ValueError, match=r"1 question\(s\) without a prediction \(e.g. \[2\]\)"):
        vqa_accuracy({1: "yes"}, annotations)
    with pytest.raises(ValueError, match=r"1 prediction\(s\) for unknown question ids \(e.g. \[7\]\)"):
        vqa_accuracy({1: "yes", 2: "no", 7: "x"}, annotations)


def test_results_file_errors_name_the_entry(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps([{"question_id": 1, "answer": "a"}, {"question_id": 1, "answer": "b"}]))
    with pytest.raises(ValueError, match=r"results.json: entry 1 repeats question_id 1"):
        load_vqa_results(path)
    path.write_text(json.dumps([{"question_id": 1}]))
    with pytest.raises(ValueError, match=r"entry 0 must have a number or string 'question_id' and a string 'answer'"):
        load_vqa_results(path)


# ---- independent implementation of the official formula (char loops, explicit 9-annotator subsets) ----
_REF_MARKS = ';/[]"{}()=+\\_-><@`,?!'


def _ref_punctuation(text):
    digit_comma = any(text[i].isdigit() and text[i + 1] == "," and text[i + 2].isdigit() for i in range(len(text) - 2))
    delete = {m: digit_comma or (m + " ") in text or (" " + m) in text for m in _REF_MARKS}
    spaced = "".join(("" if delete[ch] else " ") if ch in _REF_MARKS else ch for ch in text)
    out, removed = [], 0
    for i, ch in enumerate(spaced):
        next_is_digit = i + 1 < len(spaced) and spaced[i + 1].isdigit()
        if ch == "." and not next_is_digit and removed < 32:
            removed += 1
            continue
        out.append(ch)
    return "".join(out)


def _ref_normalize(text):
    numbers = "zero one two three four five six seven eight nine ten".split()
    words = []
    for word in _ref_punctuation(text.replace("\n", " ").replace("\t", " ").strip()).lower().split():
        word = "0" if word == "none" else str(numbers.index(word)) if word in numbers else word
        if word not in ("a", "an", "the"):
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def _ref_accuracy(prediction, answers):
    if len(set(answers)) > 1:
        answers = [_ref_punctuation(a) for a in answers]
    predicted = _ref_normalize(prediction)
    subsets = list(itertools.combinations(range(len(answers)), len(answers) - 1))
    return sum(min(1.0, sum(answers[i] == predicted for i in keep) / 3) for keep in subsets) / len(subsets)


def test_equals_independent_official_formula_on_real_vqav2_sample(realdata):
    sample = realdata / "vqav2-sample"
    annotations = load_vqa_annotations(sample / "annotations.json", sample / "questions.json")
    assert [a["question"] for a in annotations][0] == "What is this photo taken looking through?"
    variants = [
        ["net", "pitcher", "orange"],  # majority answers
        ["Net.", "The pitcher!", "ORANGE"],
        ["mesh", "catcher", "orange."],
        ["netting", "a catcher", "an orange"],
        ["the net, 1,000", "pitcher/catcher", "orange/blue"],
        ["", "two", "0"],
    ]
    for answers in variants:
        predictions = {ann["question_id"]: answer for ann, answer in zip(annotations, answers, strict=True)}
        ours = vqa_scores(predictions, annotations)
        reference = {
            ann["question_id"]: _ref_accuracy(predictions[ann["question_id"]], [a["answer"] for a in ann["answers"]])
            for ann in annotations
        }
        assert ours == pytest.approx(reference, abs=1e-12), answers
        expected_overall = 100 * sum(reference.values()) / len(reference)
        assert vqa_accuracy(predictions, annotations)["overall"] == pytest.approx(expected_overall, abs=1e-9)
    # Hand-checked values: 7 of 10 say "net"; one says "mesh"; 9 say "pitcher".
    scores = vqa_scores(dict(zip([a["question_id"] for a in annotations], variants[2], strict=True)), annotations)
    assert list(scores.values()) == pytest.approx([0.3, 0.3, 1.0])


def test_candidate_answers_are_most_frequent_normalised_answers():
    annotations = [_annotation(1, ["Two"] * 4 + ["2"] * 3 + ["three"] * 3), _annotation(2, ["red."] * 10)]
    assert candidate_answers(annotations, top_k=2) == ["red", "2"]


def test_rank_answers_picks_the_best_candidate_in_any_chunking():
    questions = ["aaa", "a", "aaaaa", "aa"]
    candidates = ["x", "xx", "xxx", "xxxx", "xxxxx"]
    calls = []

    def score_fn(batch, names):  # prefers the candidate as long as the question
        calls.append((len(batch), len(names)))
        return -torch.tensor([[abs(len(q) - len(c)) for c in names] for q in batch], dtype=torch.float)

    expected = ["xxx", "x", "xxxxx", "xx"]
    assert rank_answers(questions, candidates, score_fn) == expected
    calls.clear()
    assert rank_answers(questions, candidates, score_fn, batch_size=3, candidate_chunk=2) == expected
    assert calls == [(3, 2), (3, 2), (3, 1), (1, 2), (1, 2), (1, 1)]
    with pytest.raises(ValueError, match=re.escape("score_fn returned shape (4,), expected (batch, candidates)")):
        rank_answers(questions, candidates, lambda batch, names: torch.zeros(len(batch)))
