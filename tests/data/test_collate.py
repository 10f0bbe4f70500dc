"""Batches: the shared batch-dict contract, VQA label masking, and bad records skipped (or raised) at load time."""

import pytest
import torch

from mlm.config import Config
from mlm.data import records as R
from mlm.data.collate import IGNORE_INDEX, Collate
from mlm.data.dataset import ImageTextDataset, build_loader
from mlm.data.records import DataError, Record
from mlm.data.transforms import build_transform
from tests.data.conftest import image_bytes


def _dataset(records, tok, **kw):
    return ImageTextDataset(records, tok, build_transform(32), max_len=24, **kw)


def test_batch_contract(synth_source, tok):
    records = [synth_source[0], synth_source[len(synth_source) - 1]]  # a caption record and a VQA record
    assert not records[0].is_vqa and records[1].is_vqa
    ds = _dataset(records, tok)
    batch = Collate(tok.pad_id)([ds[0], ds[1]])
    assert set(batch) == {"images", "text_ids", "text_mask", "labels", "is_vqa", "image_ids"}
    assert batch["images"].shape == (2, 3, 32, 32) and batch["images"].dtype == torch.float32
    ids, mask, labels = batch["text_ids"], batch["text_mask"], batch["labels"]
    assert ids.dtype == labels.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape
    assert batch["is_vqa"].tolist() == [False, True] and batch["image_ids"] == [r.image_id for r in records]
    assert (ids[:, 0] == tok.bos_id).all()
    assert tok.decode(ids[0]) == tok.decode(tok.encode(records[0].captions[0]))  # eval mode: first caption
    assert (labels[~mask] == IGNORE_INDEX).all() and (labels[0][mask[0]] == ids[0][mask[0]]).all()
    # VQA row: every prompt token up to and including "answer :" is ignored; the answer and EOS are targets
    vqa = records[1]
    prompt_len = len(tok.encode(f"question: {vqa.question} answer:", eos=False))
    assert (labels[1, :prompt_len] == IGNORE_INDEX).all()
    targets = labels[1][labels[1] != IGNORE_INDEX].tolist()
    assert targets == tok.tokenize(vqa.answer) + [tok.eos_id]


def test_bad_image_at_load_time_is_replaced_and_counted(tmp_path, tok):
    good = tmp_path / "good.png"
    good.write_bytes(image_bytes("png"))
    records = [Record(image=image_bytes("truncated"), captions=["a cut picture"], origin="x.json:images[0]"),
               Record(image=str(good), captions=["a good picture"], origin="x.json:images[1]")]  # fmt: skip
    ds = _dataset(records, tok)
    sample = ds[0]
    assert tok.decode(sample["ids"]) == tok.decode(tok.encode("a good picture"))
    assert ds.stats.skipped == {R.TRUNCATED_IMAGE: 1}
    assert ds.stats.examples["skipped:truncated image"][0].startswith("x.json:images[0]: truncated image")
    strict = _dataset(records, tok, strict=True)
    with pytest.raises(DataError, match=r"x.json:images\[0\]: truncated image"):
        strict[0]


def test_all_bad_records_raise_a_clear_error(tok):
    records = [Record(image=b"", captions=["x"], origin=f"f:{i}") for i in range(3)]
    with pytest.raises(ValueError, match="all failed to load.*mlm data check"):
        _dataset(records, tok, max_retries=2)[0]


def test_odd_modes_are_counted_as_fixed(tok):
    ds = _dataset([Record(image=image_bytes("cmyk"), captions=["ink"], origin="o")], tok)
    assert ds[0]["image"].shape == (3, 32, 32) and ds.stats.fixed == {"converted CMYK to RGB": 1}


def test_loader_with_a_worker(synth_source, tok):
    cfg = Config()
    cfg.model.image_size, cfg.model.max_text_len, cfg.data.num_workers = 32, 24, 1
    loader = build_loader(synth_source, tok, cfg, train=True, batch_size=16)
    batches = list(loader)
    assert len(batches) == len(synth_source) // 16  # drop_last in training
    assert all(b["images"].shape == (16, 3, 32, 32) for b in batches)
    assert sum(b["is_vqa"].sum().item() for b in batches) > 0


def test_empty_source_is_rejected(tok):
    with pytest.raises(ValueError, match="has no usable record"):
        _dataset([], tok)
