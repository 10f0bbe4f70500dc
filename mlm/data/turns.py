"""Several questions about one image in one training row, as turns of a conversation (LLaVA-style packing).

A VQA record becomes ``[BOS] question: q1 answer: a1 [EOS] [BOS] question: q2 answer: a2 [EOS] ...`` (with the
default ``model.vqa_prompt``): its own
question first, then other questions about the same image (in a random order) while they fit ``max_len``. Every
answer and its EOS is a target; each turn starts with BOS, so a first turn is exactly the single-question row
that evaluation decodes. One image pass then feeds several answers, and each answer routes its gradient to the
part of the image its question names.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

from mlm.data.records import Record
from mlm.data.tokenizer import VQA_PROMPT, MLMTokenizer, vqa_prompt


def image_key(record: Record):
    """A hashable name of the record's image (its path, else its image id); None when neither identifies it."""
    if isinstance(record.image, str):
        return ("path", record.image)
    if record.image_id is not None:
        return ("id", record.image_id)
    return None


def same_image_questions(records: Sequence[Record]) -> dict[int, list[int]]:
    """For each VQA record's index, the indices of the other VQA records about the same image."""
    groups: dict = defaultdict(list)
    for index, record in enumerate(records):
        key = image_key(record) if record.is_vqa else None
        if key is not None:
            groups[key].append(index)
    return {i: [j for j in members if j != i] for members in groups.values() if len(members) > 1 for i in members}


def answer_of(record: Record) -> str:
    """The answer a VQA record is trained on: the canonical one, else the first given."""
    return record.answer or record.answers[0]


def encode_turns(
    tokenizer: MLMTokenizer,
    first: tuple[str, str],
    others: list[tuple[str, str]],
    max_len: int,
    template: str = VQA_PROMPT,
) -> tuple[list[int], list[bool]]:
    """Ids of the packed turns and, per id, whether it is a target (answers and their EOS)."""
    ids, n_prompt = tokenizer.encode_vqa(*first, max_len, template)
    targets = [False] * n_prompt + [True] * (len(ids) - n_prompt)
    for question, answer in others:
        prompt, reply = tokenizer.tokenize(vqa_prompt(question, template)), tokenizer.tokenize(answer)
        turn = [tokenizer.bos_id, *prompt, *reply, tokenizer.eos_id]
        if len(ids) + len(turn) > max_len:
            break
        ids += turn
        targets += [False] * (1 + len(prompt)) + [True] * (len(reply) + 1)
    return ids, targets


def packed_sample(dataset, index: int, record: Record, turns: int) -> tuple[list[int], list[bool]]:
    """Ids and targets of a VQA record with up to ``turns - 1`` other questions about its image."""
    pool = dataset.same_image.get(index, [])
    chosen = random.sample(pool, min(len(pool), turns - 1))
    others = [(dataset.source[j].question, answer_of(dataset.source[j])) for j in chosen]
    first = (record.question, answer_of(record))
    return encode_turns(dataset.tokenizer, first, others, dataset.max_len, dataset.vqa_prompt)
