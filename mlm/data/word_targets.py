"""What the word objective (``train.word_weight``) learns an image's words from, by ``train.word_targets``.

- ``caption``: each caption row's own caption (VQA rows learn no words);
- ``image``: every caption of the row's image, VQA rows included;
- ``answers``: as ``image``, plus the answers of the image's questions that name something shown ("blue",
  "triangle"; not yes/no and not counts), so data with questions alone still teaches the word head — and the word
  grounding that reads its maps (``model.decoder_grounding``).

``caption`` on data with no captions at all learns as ``answers`` (:func:`resolve_targets`): what else there is.
"""

from __future__ import annotations

from collections.abc import Sequence

from mlm.data import turns
from mlm.data.records import Record

NOT_SHOWN_TYPES = ("yes/no", "number")  # VQAv2 answer types whose answers are not a word for what is shown


def names_a_thing(record: Record) -> bool:
    """True for a VQA record whose canonical answer names something in the image (not yes/no, not a count)."""
    answer = (record.answer or "").strip().lower()
    if not record.is_vqa or not answer or record.answer_type in NOT_SHOWN_TYPES:
        return False
    return answer not in ("yes", "no") and not answer.replace(".", "", 1).isdigit()


def record_texts(record: Record, answers: bool = False) -> list[str]:
    """The record's captions and, with ``answers``, its answer when it names a thing."""
    return list(record.captions) + ([record.answer] if answers and names_a_thing(record) else [])


def image_texts(records: Sequence[Record], answers: bool = False) -> dict:
    """Every caption of each image (by :func:`mlm.data.turns.image_key`) and, with ``answers``, the answers of its
    questions that name a thing (:func:`names_a_thing`). Records with no image key are left out: nothing says
    which other records show their image (:func:`record_texts` gives their own)."""
    out: dict = {}
    for record in records:
        key, texts = turns.image_key(record), record_texts(record, answers)
        if texts and key is not None:
            out.setdefault(key, []).extend(texts)
    return out


def word_documents(records: Sequence[Record], targets: str) -> list[str]:
    """The texts whose words the objective learns, for its IDF: every caption, and with ``answers`` each image's
    answers as one text. Empty when there is nothing to learn (then the word loss is off)."""
    texts = [text for record in records for text in record.captions]
    if targets == "answers":
        by_image: dict = {}
        for index, record in enumerate(records):
            if names_a_thing(record):  # a record with no image key is an image of its own
                key = turns.image_key(record)
                by_image.setdefault(("record", index) if key is None else key, []).append(record.answer)
        texts += [" ".join(group) for group in by_image.values()]
    return texts


def resolve_targets(records: Sequence[Record], targets: str) -> str:
    """``targets``, or ``answers`` for ``caption`` when no record has a caption and some answer names a thing."""
    if targets != "caption" or any(record.captions for record in records):
        return targets
    return "answers" if any(names_a_thing(record) for record in records) else targets
