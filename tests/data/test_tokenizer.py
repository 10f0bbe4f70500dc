"""Tokenizer: WordPiece training, round trips, framing, padding/truncation, VQA prompt masking, file formats."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from mlm.data.tokenizer import MLMTokenizer, vqa_prompt, vqa_text

TEXTS = [
    "a large red circle at the top left and a small blue square in the center.",
    "two objects: a red circle and a blue square.",
    "the red circle is left of the blue square.",
    "question: what color is the circle? answer: red",
    "question: how many objects are there? answer: 2",
    "a small green triangle at the bottom right.",
]


@pytest.fixture(scope="module")
def tok() -> MLMTokenizer:
    return MLMTokenizer.train_wordpiece(TEXTS * 4, vocab_size=300)


def test_special_ids_are_distinct_and_framed(tok):
    assert len({tok.pad_id, tok.bos_id, tok.eos_id, tok.sep_id}) == 4
    ids = tok.encode("a red circle")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.encode("a red circle", eos=False) == ids[:-1]
    assert tok.vocab_size == len(tok.tokenizer.get_vocab())


@pytest.mark.parametrize("text", TEXTS)
def test_wordpiece_round_trip(tok, text):
    # BERT pre-tokenisation splits punctuation off; decoding re-joins word pieces and drops BOS/EOS
    decoded = tok.decode(tok.encode(text))
    assert decoded.replace(" ", "") == text.lower().replace(" ", "")
    assert tok.encode(decoded) == tok.encode(text)


def test_unseen_word_pieces_and_case(tok):
    ids = tok.encode("A RED Circle")
    assert ids == tok.encode("a red circle")


def test_encode_batch_pads_truncates_and_masks(tok):
    ids, mask = tok.encode_batch(["a red circle", TEXTS[0]], max_len=8)
    assert ids.shape == mask.shape == (2, 8) and ids.dtype == torch.long and mask.dtype == torch.bool
    short = tok.encode("a red circle")
    assert ids[0, : len(short)].tolist() == short
    assert (ids[0, len(short) :] == tok.pad_id).all() and mask[0].sum().item() == len(short)
    assert ids[1, -1].item() == tok.eos_id and mask[1].all()  # truncated row keeps its EOS
    assert ids[1, :7].tolist() == tok.encode(TEXTS[0])[:7]


def test_encode_batch_pads_to_longest_only(tok):
    ids, mask = tok.encode_batch(["a", "a red"], max_len=64)
    assert ids.shape[1] == len(tok.encode("a red"))


def test_vqa_prompt_length_matches_separate_encoding(tok):
    ids, n_prompt = tok.encode_vqa("what color is the circle?", "red", max_len=32)
    assert ids == tok.encode(vqa_text("what color is the circle?", "red"))
    assert ids[:n_prompt] == tok.encode(vqa_prompt("what color is the circle?"), eos=False)
    assert tok.decode(ids[n_prompt:]) == "red"


def test_vqa_truncation_keeps_answer_and_marker(tok):
    ids, n_prompt = tok.encode_vqa("how many objects are there at the top left of the square?", "2", max_len=9)
    assert len(ids) == 9 and ids[-1] == tok.eos_id
    assert tok.decode(ids[n_prompt:]) == "2"
    assert tok.decode(ids[:n_prompt]).endswith("answer :")


def test_a_compact_vqa_prompt_frames_training_rows_and_keeps_its_marker_when_cut(tok):
    template = "{question} [SEP]"
    ids, n_prompt = tok.encode_vqa("what color is the circle?", "red", 32, template)
    assert ids[:n_prompt] == tok.encode("what color is the circle? [SEP]", eos=False)
    assert ids[n_prompt - 1] == tok.sep_id and tok.decode(ids[n_prompt:]) == "red"
    assert len(ids) == len(tok.encode_vqa("what color is the circle?", "red", 32)[0]) - 3  # 4 words -> 1 token
    cut, n_cut = tok.encode_vqa("how many objects are there at the top left of the square?", "2", 6, template)
    assert len(cut) == 6 and cut[n_cut - 1] == tok.sep_id and tok.decode(cut[n_cut:]) == "2"


def test_save_and_load_round_trip(tok, tmp_path):
    path = tok.save(tmp_path / "tok")
    assert path.name == "tokenizer.json"
    loaded = MLMTokenizer.from_file(path)
    roles = ("pad_id", "bos_id", "eos_id", "sep_id")
    assert [getattr(loaded, r) for r in roles] == [getattr(tok, r) for r in roles]
    for text in TEXTS:
        assert loaded.encode(text) == tok.encode(text)
    # the saved file frames text by itself too, for users of plain `tokenizers`
    assert Tokenizer.from_file(str(path)).encode(TEXTS[0]).ids == tok.encode(TEXTS[0])


def test_foreign_tokenizer_gets_missing_special_tokens(tmp_path):
    plain = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "<unk>": 2}, unk_token="<unk>"))
    plain.pre_tokenizer = pre_tokenizers.Whitespace()
    plain.save(str(tmp_path / "tokenizer.json"))
    tok = MLMTokenizer.from_file(tmp_path)
    assert tok.vocab_size == 7 and {tok.pad_id, tok.bos_id, tok.eos_id, tok.sep_id} == {3, 4, 5, 6}
    assert tok.encode("hello world") == [tok.bos_id, 0, 1, tok.eos_id]
    assert tok.decode([tok.bos_id, 0, 1, tok.eos_id, tok.pad_id]) == "hello world"


def test_bad_tokenizer_file_names_the_file(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json: not a valid tokenizer.json"):
        MLMTokenizer.from_file(bad)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        MLMTokenizer.from_file(tmp_path / "nowhere.json")


def test_from_config_requires_texts_for_wordpiece():
    with pytest.raises(ValueError, match="training texts"):
        MLMTokenizer.from_config("wordpiece")


@pytest.mark.slow
def test_openclip_bpe_matches_open_clip_tokenize():
    import open_clip

    tok = MLMTokenizer.openclip()
    texts = ["A photo of a CAT!", "question: what color is the circle? answer: red", "it's 2 o'clock; café"]
    ref = open_clip.tokenize(texts)  # (3, 77), padded with 0
    for text, row in zip(texts, ref, strict=True):
        ids = tok.encode(text)
        assert ids == row[: len(ids)].tolist()
        ref_text = open_clip.decode(row[: len(ids)]).replace("<start_of_text>", "").replace("<end_of_text>", "")
        assert tok.decode(ids) == ref_text.strip()
    # [PAD] and [SEP] are new ids after CLIP's 49408, so no real token is mistaken for padding
    assert (tok.pad_id, tok.sep_id, tok.vocab_size) == (49408, 49409, 49410)


def test_prompt_words_are_whole_tokens_even_if_absent_from_the_texts():
    tok = MLMTokenizer.train_wordpiece(["a red circle", "what color is it?"], vocab_size=200)
    assert len(tok.tokenize("question: answer:")) == 4  # question : answer :
