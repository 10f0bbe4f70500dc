"""train.word_targets: image — the word objective learns every caption word of a row's image, VQA rows included;
answers — also the answers of the image's questions that name a thing."""

import io

import pytest
import torch
from PIL import Image

from mlm.config import ConfigError, TrainConfig, load_config
from mlm.data.collate import Collate
from mlm.data.dataset import ImageTextDataset
from mlm.data.records import Record
from mlm.data.transforms import build_transform
from mlm.data.turns import image_key
from mlm.data.word_targets import image_texts, names_a_thing, resolve_targets, word_documents
from mlm.train.losses import ImageTextLoss, WordLoss, learned_words


def test_captions_are_grouped_by_image_and_questions_left_out():
    records = [
        Record(image="a.png", captions=["one", "two"]), Record(image="a.png", question="q", answers=["x"]),
        Record(image="b.png", captions=["three"]), Record(image="a.png", captions=["four"]),
    ]  # fmt: skip
    assert image_texts(records) == {("path", "a.png"): ["one", "two", "four"], ("path", "b.png"): ["three"]}


def test_answers_that_name_a_thing_join_their_images_words():
    records = [
        Record(image="a.png", captions=["one"]), Record(image="a.png", question="colour?", answers=["Blue"]),
        Record(image="a.png", question="is it?", answers=["yes"]), Record(image="b.png", question="how many?",
        answers=["2"]), Record(image="b.png", question="what?", answers=["cat"], answer_type="number"),
        Record(image="c.png", question="what shape?", answers=["triangle", "triangle", "circle"]),
    ]  # fmt: skip
    assert [names_a_thing(r) for r in records] == [False, True, False, False, False, True]
    assert image_texts(records, answers=True) == {("path", "a.png"): ["one", "Blue"], ("path", "c.png"): ["triangle"]}
    assert word_documents(records, "image") == ["one"]
    assert word_documents(records, "answers") == ["one", "Blue", "triangle"]  # each image's answers: one text
    assert resolve_targets(records, "caption") == "caption"  # it has a caption
    assert resolve_targets(records[1:], "caption") == "answers"  # questions alone: their answers
    assert resolve_targets(records[1:], "image") == "image"  # asked for explicitly
    assert resolve_targets(records[2:4], "caption") == "caption"  # nothing to learn either way


def test_records_with_no_image_key_keep_their_own_words(tok):
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, format="PNG")
    pixels = buffer.getvalue()  # an image given as bytes: no path, no id, so no other record is known to show it
    records = [Record(image=pixels, captions=["a red circle"]), Record(image=pixels, question="c?", answers=["blue"]),
               Record(image=pixels, question="s?", answers=["square"])]  # fmt: skip
    assert image_texts(records, answers=True) == {}  # not one pool of every keyless image's words
    assert word_documents(records, "answers") == ["a red circle", "blue", "square"]  # each answer its own image
    ds = ImageTextDataset(records, tok, build_transform(32), max_len=64, image_words="answers")
    assert ds[1]["word_ids"] == tok.tokenize("blue") and ds[0]["word_ids"] == sorted(set(tok.tokenize("a red circle")))
    with pytest.raises(ValueError, match="image_words=True: expected None, 'image' or 'answers'"):
        ImageTextDataset(records, tok, build_transform(32), max_len=64, image_words=True)


def test_the_words_learned_are_those_with_idf(tok):
    texts = ["a red circle.", "a blue square.", "green."]
    learned = learned_words(tok, texts)
    assert learned[tok.tokenize("red blue circle square green")].all()
    assert not learned[tok.tokenize(".")].any()  # in every text: IDF 0, the objective ignores it
    assert not learned[tok.tokenize("triangle")].any() and learned[tok.pad_id] == 0


def test_every_row_gets_its_images_caption_words(synth_source, tok):
    ds = ImageTextDataset(synth_source, tok, build_transform(32), max_len=64, train=True, image_words="image")
    captions = image_texts(synth_source)
    vqa = next(i for i in range(len(synth_source)) if synth_source[i].is_vqa)
    caption_row = next(i for i in range(len(synth_source)) if not synth_source[i].is_vqa)
    for index in (vqa, caption_row):
        words = {i for c in captions[image_key(synth_source[index])] for i in tok.tokenize(c)}
        assert ds[index]["word_ids"] == sorted(words)  # all five captions, not the one the row trains on
    assert "word_ids" not in ImageTextDataset(synth_source, tok, build_transform(32), max_len=64)[vqa]
    with_answers = ImageTextDataset(synth_source, tok, build_transform(32), max_len=64, image_words="answers")
    texts = image_texts(synth_source, answers=True)[image_key(synth_source[vqa])]
    assert with_answers[vqa]["word_ids"] == sorted({i for t in texts for i in tok.tokenize(t)})
    assert len(texts) > len(captions[image_key(synth_source[vqa])])  # its answers are among them
    lone = [Record(image=synth_source[vqa].image, question="what?", answers=["x"], image_id=999)]
    lone_ds = ImageTextDataset(lone, tok, build_transform(32), max_len=64, image_words="image")
    batch = Collate(tok.pad_id)([ds[vqa], lone_ds[0]])
    assert batch["word_ids"].shape[0] == 2
    assert (batch["word_ids"][1] == tok.pad_id).all()  # an image with no caption: nothing to learn


def test_the_loss_learns_word_ids_on_every_row():
    torch.manual_seed(0)
    vocab, idf = 11, torch.ones(11)
    idf[0] = 0.0  # the pad id
    out = type("Out", (), {})()
    out.image_embeds = out.text_embeds = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    out.logit_scale, out.logit_bias = torch.tensor(10.0), torch.tensor(0.0)
    out.logits, out.word_logits = torch.randn(3, 5, vocab), torch.randn(3, vocab)
    batch = {"is_vqa": torch.tensor([False, True, True]), "labels": torch.randint(0, vocab, (3, 5)),
             "text_ids": torch.randint(1, vocab, (3, 5)),
             "word_ids": torch.tensor([[3, 4], [5, 0], [0, 0]])}  # fmt: skip
    loss_fn = ImageTextLoss.from_config(TrainConfig(word_weight=1.0), idf=idf)
    _, parts = loss_fn(out, batch)
    logp = out.word_logits.log_softmax(-1)
    # row 0: half of its target on each of two words; row 1 (a VQA row) one word; row 2 has none and is left out
    torch.testing.assert_close(parts["words"], -((logp[0, 3] + logp[0, 4]) / 2 + logp[1, 5]) / 2)
    del batch["word_ids"]  # train.word_targets: caption — the caption rows' own ids
    _, parts = loss_fn(out, batch)
    torch.testing.assert_close(parts["words"], WordLoss(idf)(out.word_logits, batch["text_ids"], ~batch["is_vqa"]))


def test_word_targets_choice_is_checked():
    with pytest.raises(
        ConfigError, match="train.word_targets='images' is not allowed; choose one of caption, image, answers"
    ):
        load_config(None, ["train.word_targets=images"])
