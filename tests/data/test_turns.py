"""Packed VQA turns: several questions about one image in one row, only answers as targets."""

import pytest

from mlm.config import ConfigError, load_config
from mlm.data.collate import IGNORE_INDEX, Collate
from mlm.data.dataset import ImageTextDataset
from mlm.data.records import Record
from mlm.data.transforms import build_transform
from mlm.data.turns import encode_turns, same_image_questions
from mlm.train.sampler import SeededItems


@pytest.fixture(scope="module")
def source(synth_source):
    return synth_source


def test_questions_are_grouped_by_image_path_or_id_and_captions_left_out():
    records = [
        Record(image="a.png", question="q1", answers=["x"]), Record(image="a.png", question="q2", answers=["y"]),
        Record(image="b.png", question="q3", answers=["z"]), Record(image="a.png", captions=["a caption"]),
        Record(image=b"...", image_id=7, question="q4", answers=["u"]),
        Record(image=b"...", image_id=7, question="q5", answers=["v"]),
    ]  # fmt: skip
    assert same_image_questions(records) == {0: [1], 1: [0], 4: [5], 5: [4]}


def test_first_turn_is_the_single_question_row_and_only_answers_are_targets(tok):
    first, second = ("what shape is red?", "circle"), ("where is the red circle?", "top left")
    single, n_prompt = tok.encode_vqa(*first, 40)
    ids, targets = encode_turns(tok, first, [second], 40)
    assert ids[: len(single)] == single
    assert targets[: len(single)] == [False] * n_prompt + [True] * (len(single) - n_prompt)
    answers = [i for i, t in zip(ids, targets, strict=True) if t]
    assert answers == tok.tokenize("circle") + [tok.eos_id] + tok.tokenize("top left") + [tok.eos_id]
    assert ids[len(single)] == tok.bos_id  # each turn starts as a fresh question
    assert encode_turns(tok, first, [second], len(single) + 3) == (single, targets[: len(single)])  # no room: one turn


def test_dataset_packs_turns_of_the_same_image_deterministically(source, tok):
    vqa = [i for i in range(len(source)) if source[i].is_vqa]
    ds = ImageTextDataset(source, tok, build_transform(32), max_len=64, train=True, vqa_turns=3)
    items = SeededItems(ds, seed=0)
    samples = [items[(0, i)] for i in vqa[:4]]
    assert [s["ids"] for s in samples] == [items[(0, i)]["ids"] for i in vqa[:4]]  # same seed, same rows
    batch = Collate(tok.pad_id)(samples)
    for row, index in enumerate(vqa[:4]):
        text = tok.tokenizer.decode(batch["text_ids"][row].tolist(), skip_special_tokens=False)
        assert text.count("[BOS]") == 3  # the synthetic images have 5 questions each
        own = tok.encode_vqa(source[index].question, source[index].answer, 64)[0]
        assert batch["text_ids"][row, : len(own)].tolist() == own  # the record's own question comes first
        assert set(batch["text_ids"][row][batch["labels"][row] != IGNORE_INDEX].tolist()) <= set(
            sum((tok.tokenize(source[j].answer) for j in [index, *ds.same_image[index]]), [tok.eos_id])
        )  # only answers and EOS are targets
    plain = ImageTextDataset(source, tok, build_transform(32), max_len=64, train=False, vqa_turns=3)
    assert plain[vqa[0]]["ids"] == tok.encode_vqa(source[vqa[0]].question, source[vqa[0]].answer, 64)[0]


def test_every_turn_and_the_model_s_answer_prompt_use_model_vqa_prompt(source, tok, tmp_path):
    from mlm.config import ModelConfig
    from mlm.model import MLMModel

    template = "{question} [SEP]"
    first, second = ("what shape is red?", "circle"), ("where is the red circle?", "top left")
    ids, targets = encode_turns(tok, first, [second], 40, template)
    assert ids.count(tok.sep_id) == 2 and not set(tok.tokenize("question answer")) & set(ids)
    vqa = next(i for i in range(len(source)) if source[i].is_vqa)
    ds = ImageTextDataset(source, tok, build_transform(32), max_len=64, train=False, vqa_prompt=template)
    assert ds[vqa]["ids"] == tok.encode_vqa(source[vqa].question, source[vqa].answer, 64, template)[0]
    model = MLMModel(ModelConfig(dim=32, n_layers=1, levels=["global"], image_size=16, patch_size=8,
                                 vocab_size=tok.vocab_size, vqa_prompt=template), tokenizer=tok)  # fmt: skip
    model.save_pretrained(tmp_path / "m")
    assert MLMModel.from_pretrained(tmp_path / "m").config.vqa_prompt == template  # saved with the model
    with pytest.raises(ConfigError, match="model.vqa_prompt"):
        load_config(None, ["model.vqa_prompt=question: answer:"])


def test_vqa_turns_range_is_checked():
    with pytest.raises(ConfigError, match="train.vqa_turns"):
        load_config(None, ["train.vqa_turns=0"])
