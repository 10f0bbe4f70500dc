"""Periodic validation: caption-to-image bookkeeping across batches, VQA scoring, and logging from the loop."""

import pytest
import torch
from tiny_run import tiny_config

from mlm.data.tokenizer import MLMTokenizer
from mlm.eval.retrieval import retrieval_metrics
from mlm.model import MLMModel
from mlm.train.loop import Trainer
from mlm.train.setup import open_split
from mlm.train.tracking import read_metrics
from mlm.train.validation import Validator

pytestmark = pytest.mark.usefixtures("one_thread")


def test_retrieval_matches_embeddings_computed_one_image_at_a_time(synth_dir, tmp_path):
    config = tiny_config(synth_dir, tmp_path, "eval.max_samples=3", "eval.batch_size=2", "eval.max_new_tokens=3")
    source = open_split(config, str(synth_dir), "val")
    tokenizer = MLMTokenizer.train_wordpiece(source.texts(), 200)
    config.model.vocab_size = tokenizer.vocab_size
    model = MLMModel(config.model, tokenizer).train()
    validator = Validator(config, source, tokenizer)
    assert len(validator.captions) == 3 and len(validator.questions) == 3

    metrics = validator(model, torch.device("cpu"))
    assert model.training  # restored after evaluation
    with torch.no_grad():
        model.eval()
        images, texts, owner = [], [], []
        for i, record in enumerate(validator.captions):
            images.append(model.encode_image(validator.images.load(i)["image"][None], normalize=True))
            ids, mask = tokenizer.encode_batch(record.captions, config.model.max_text_len)
            texts.append(model.encode_text(ids, normalize=True, text_mask=mask))
            owner += [i] * len(record.captions)
    expected = retrieval_metrics(torch.cat(images), torch.cat(texts), torch.tensor(owner))
    assert metrics["val/image_to_text_R@1"] == expected["image_to_text_R@1"]
    assert metrics["val/text_to_image_R@1"] == expected["text_to_image_R@1"]
    assert 0.0 <= metrics["val/vqa_accuracy"] <= 100.0
    types = {r.question_type for r in validator.questions}
    assert types and {k for k in metrics if k.startswith("val/vqa/")} == {
        f"val/vqa/{t.replace(' ', '_')}" for t in types
    }


def test_the_loop_logs_validation_metrics(synth_dir, tmp_path):
    config = tiny_config(synth_dir, tmp_path, "train.max_steps=3", "train.eval_every=2", f"data.val={synth_dir}",
                         "eval.max_samples=4", "eval.max_new_tokens=2")  # fmt: skip
    summary = Trainer(config).fit()
    series = read_metrics(tmp_path / "metrics.csv")
    assert [step for step, _ in series["val/R@1"]] == [2, 3]  # on schedule, and once more at the end
    assert summary["validation"]["val/R@1"] == series["val/R@1"][-1][1]
    assert "val/vqa_accuracy" in summary["validation"]
