"""A checkpoint written before the model took its own config (config.json = the whole run config) still loads and
computes what the code that wrote it computed (tests/fixtures/make_checkpoint_v1.py wrote the fixture)."""

from pathlib import Path

import torch
from safetensors.torch import load_file

from mlm.model import MLMModel
from tests.fixtures.make_checkpoint_v1 import inputs

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint_v1"


def test_v1_checkpoint_loads_and_computes_the_same():
    model = MLMModel.from_pretrained(FIXTURE)
    expected = load_file(str(FIXTURE / "expected.safetensors"))
    images, texts = inputs()
    ids, mask = model.tokenizer.encode_batch(texts, 12)
    with torch.no_grad():
        output = model(images, ids, mask)
        generated = model.generate_ids(images)  # the decoding default (6 new tokens) comes from the old eval section
    torch.testing.assert_close(output.image_embeds, expected["image_embeds"])
    torch.testing.assert_close(output.text_embeds, expected["text_embeds"])
    torch.testing.assert_close(output.logits, expected["logits"])
    assert [seq + [-1] * (6 - len(seq)) for seq in generated] == expected["generated"].tolist()
