"""VQAv2 accuracy exactly as the official evaluation script computes it, and answer ranking for the rank mode.

Follows "Making the V in VQA Matter" (Goyal et al., 2017) and the official ``vqaEval.py`` of the VQA API
(GT-Vision-Lab/VQA). The normalisation rules below are re-written from that script, keeping its quirks so the
numbers match it to the last digit:

- A predicted answer has newlines/tabs turned into spaces and is stripped, then goes through
  :func:`process_punctuation` and :func:`process_digit_article`.
- Ground-truth answers get only :func:`process_punctuation`, and only when the 10 annotators disagree.
- Accuracy of one question = mean over the 10 leave-one-annotator-out subsets of ``min(1, #matches / 3)``.
- Overall and per answer type / question type accuracies are means of the per-question accuracies.

Two deliberate differences, both about inputs the official data never has: leave-one-out drops annotators by
position (the script drops every answer dict *equal* to the left-out one, which only coincides when dicts carry a
unique ``answer_id``), and we report unrounded percentages (the script rounds to 2 decimals).
"""

from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mlm.eval.results_io import is_id, read_json, read_results

logger = logging.getLogger(__name__)

# Official contraction table, "written form:canonical form" (its few oddities, e.g. somebody'd -> somebodyd, kept).
_CONTRACTION_TABLE = """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've couldnt've:couldn't've
didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've hadn'tve:hadn't've hasnt:hasn't
havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's howd:how'd howll:how'll hows:how's Id've:I'd've
I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am
mightnt:mightn't mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've
neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at
shant:shan't shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't
shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've
somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's someoned:someone'd someoned've:someone'd've
someone'dve:someone'd've someonell:someone'll someones:someone's somethingd:something'd somethingd've:something'd've
something'dve:something'd've somethingll:something'll thats:that's thered:there'd thered've:there'd've
there'dve:there'd've therere:there're theres:there's theyd:they'd theyd've:they'd've they'dve:they'd've
theyll:they'll theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've
werent:weren't whatll:what'll whatre:what're whats:what's whatve:what've whens:when's whered:where'd wheres:where's
whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll
whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've wouldn'tve:wouldn't've
yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've
youd:you'd youd've:you'd've you'dve:you'd've youll:you'll youre:you're youve:you've
"""
CONTRACTIONS: dict[str, str] = dict(pair.split(":") for pair in _CONTRACTION_TABLE.split())
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = ("a", "an", "the")
# Apostrophes, colons and periods are not here: apostrophes feed the contraction table, periods have their own rule.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# The official "(?!<=\d)" is a typo for a look-behind; as written it never blocks, so any period not followed by a
# digit is removed ("2.5" keeps its period, "3." does not).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# The script passes re.UNICODE (== 32) positionally as sub()'s `count`, so at most 32 periods are removed.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """Delete or space out punctuation the way the official script does."""
    out = text
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    for mark in PUNCTUATION:
        # A mark that touches a space, or any mark in a text with a "1,000"-style number, is deleted; otherwise it
        # separates words ("black/white" -> "black white"). Both tests look at the original text.
        if (mark + " " in text or " " + mark in text) or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """Lower-case, map number words to digits, drop articles and restore apostrophes of known contractions."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(answer: str) -> str:
    """Normalise a predicted answer: whitespace, punctuation, number words, articles, contractions."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def question_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against its annotators' answers, in [0, 1]."""
    if not answers:
        raise ValueError("a VQA question needs at least one ground-truth answer, got none")
    predicted = normalize_answer(prediction)
    if len(set(answers)) > 1:
        answers = [process_punctuation(answer) for answer in answers]
    hits = [answer == predicted for answer in answers]
    total = sum(hits)
    # Leaving annotator i out removes their own vote from the matches.
    return sum(min(1.0, (total - hit) / 3.0) for hit in hits) / len(answers)


def _answers_of(annotation: Mapping[str, Any], where: str) -> list[str]:
    """The annotators' answer strings of one official-format annotation."""
    answers = annotation.get("answers")
    if not isinstance(answers, list) or not answers:
        raise ValueError(f"{where}: 'answers' must be a non-empty list of {{'answer': str}}, got {answers!r}")
    try:
        return [str(item["answer"]) for item in answers]
    except (TypeError, KeyError) as err:
        raise ValueError(f"{where}: every entry of 'answers' needs an 'answer' key, got {answers!r}") from err


def _check_coverage(predictions: Mapping[Any, str], question_ids: Sequence[Any]) -> None:
    """Raise when predictions and annotations do not cover the same questions (as the official loader does)."""
    known = set(question_ids)
    if len(known) != len(question_ids):
        dupes = [qid for qid, n in Counter(question_ids).items() if n > 1][:5]
        raise ValueError(f"annotations repeat question ids, e.g. {dupes}")
    missing = [qid for qid in question_ids if qid not in predictions]
    extra = [qid for qid in predictions if qid not in known]
    if missing or extra:
        raise ValueError(
            f"predictions do not match the annotated questions: {len(missing)} question(s) without a prediction "
            f"(e.g. {missing[:5]}), {len(extra)} prediction(s) for unknown question ids (e.g. {extra[:5]})"
        )


def vqa_scores(predictions: Mapping[Any, str], annotations: Sequence[Mapping[str, Any]]) -> dict[Any, float]:
    """Per-question VQA accuracy in [0, 1], keyed by question id; every annotated question needs a prediction."""
    _check_coverage(predictions, [ann.get("question_id") for ann in annotations])
    n_answers = Counter(len(ann["answers"]) for ann in annotations)
    if set(n_answers) != {10}:
        logger.warning("VQAv2 questions have 10 answers; these have %s (count: questions)", dict(n_answers))
    return {
        ann["question_id"]: question_accuracy(predictions[ann["question_id"]], _answers_of(ann, f"annotation {i}"))
        for i, ann in enumerate(annotations)
    }


def vqa_accuracy(predictions: Mapping[Any, str], annotations: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Official VQAv2 accuracy (percent): overall, per answer type and per question type.

    Args:
        predictions: question id -> predicted answer string.
        annotations: official-format annotation dicts (``question_id``, ``answers`` = list of ``{"answer"}``,
            optional ``answer_type`` and ``question_type``; questions without a type are left out of that
            breakdown only).

    Returns:
        ``{"overall", "per_answer_type", "per_question_type", "num_questions"}``.
    """
    if not annotations:
        raise ValueError("no VQA annotations to evaluate")
    scores = vqa_scores(predictions, annotations)
    by_answer_type: dict[str, list[float]] = defaultdict(list)
    by_question_type: dict[str, list[float]] = defaultdict(list)
    for ann in annotations:
        score = scores[ann["question_id"]]
        if "answer_type" in ann:
            by_answer_type[str(ann["answer_type"])].append(score)
        if "question_type" in ann:
            by_question_type[str(ann["question_type"])].append(score)

    def percent(values) -> float:
        return 100.0 * sum(values) / len(values)

    return {
        "overall": percent(scores.values()),
        "per_answer_type": {name: percent(values) for name, values in sorted(by_answer_type.items())},
        "per_question_type": {name: percent(values) for name, values in sorted(by_question_type.items())},
        "num_questions": len(scores),
    }


def load_vqa_annotations(annotations_path: str | Path, questions_path: str | Path | None = None) -> list[dict]:
    """Read an official VQAv2 annotations file, adding ``question`` and ``image_id`` from the questions file."""
    data = read_json(annotations_path)
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        raise ValueError(f"{annotations_path}: expected an object with an 'annotations' list (official VQAv2 format)")
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or not is_id(ann.get("question_id")):
            raise ValueError(
                f"{annotations_path}: annotations[{i}] has no number or string 'question_id': {ann!r:.200}"
            )
        _answers_of(ann, f"{annotations_path}: annotations[{i}]")
    if questions_path is None:
        return annotations
    data = read_json(questions_path)
    questions = data.get("questions") if isinstance(data, dict) else None
    if not isinstance(questions, list):
        raise ValueError(f"{questions_path}: expected an object with a 'questions' list (official VQAv2 format)")
    by_id = {q.get("question_id"): q for q in questions if isinstance(q, dict) and is_id(q.get("question_id"))}
    unmatched = [ann["question_id"] for ann in annotations if ann["question_id"] not in by_id]
    if unmatched or len(by_id) != len(annotations):
        raise ValueError(
            f"{questions_path} and {annotations_path} do not describe the same questions: {len(by_id)} questions, "
            f"{len(annotations)} annotations, {len(unmatched)} annotation(s) without a question (e.g. {unmatched[:5]})"
        )
    merged = []
    for ann in annotations:
        question = by_id[ann["question_id"]]
        merged.append({**ann, "question": question.get("question", ""), "image_id": question.get("image_id")})
    return merged


def load_vqa_results(path: str | Path) -> dict[Any, str]:
    """Read a results file in the official format ``[{"question_id": ..., "answer": ...}]``."""
    return read_results(path, "question_id", "answer")


def candidate_answers(annotations: Sequence[Mapping[str, Any]], top_k: int = 3129) -> list[str]:
    """The ``top_k`` most frequent normalised ground-truth answers: the candidate list of the rank mode.

    3129 is the answer vocabulary size of Teney et al. (2018) on VQAv2 train; ties keep first-seen order.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    counts = Counter(
        normalize_answer(answer) for i, ann in enumerate(annotations) for answer in _answers_of(ann, f"annotation {i}")
    )
    counts.pop("", None)
    return [answer for answer, _ in counts.most_common(top_k)]


def rank_answers(
    items: Sequence[Any],
    candidates: Sequence[str],
    score_fn: Callable[[Sequence[Any], list[str]], torch.Tensor],
    batch_size: int = 64,
    candidate_chunk: int = 0,
) -> list[str]:
    """Rank mode: pick for each item the candidate answer with the highest ``score_fn`` score.

    Args:
        items: one entry per question, passed through to ``score_fn`` (e.g. dicts with image and question).
        candidates: candidate answers (see :func:`candidate_answers`).
        score_fn: ``score_fn(batch_items, candidate_answers) -> Tensor (B, C)``, e.g. the answer log-likelihood.
        batch_size: items per ``score_fn`` call.
        candidate_chunk: candidates per call; 0 = all at once.
    """
    if not candidates:
        raise ValueError("rank mode needs at least one candidate answer")
    if batch_size < 1 or candidate_chunk < 0:
        raise ValueError(f"batch_size must be >= 1 and candidate_chunk >= 0, got {batch_size} and {candidate_chunk}")
    chunk = candidate_chunk or len(candidates)
    chosen: list[str] = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        parts = []
        for c0 in range(0, len(candidates), chunk):
            names = list(candidates[c0 : c0 + chunk])
            scores = score_fn(batch, names)  # (B, C_chunk)
            if tuple(scores.shape) != (len(batch), len(names)):
                raise ValueError(
                    f"score_fn returned shape {tuple(scores.shape)}, expected (batch, candidates) = "
                    f"({len(batch)}, {len(names)})"
                )
            parts.append(scores.detach().float().cpu())
        best = torch.cat(parts, dim=1).argmax(dim=1)  # (B,)
        chosen.extend(candidates[i] for i in best.tolist())
    return chosen
