"""The open_clip contract: code written for open_clip runs on an mlm checkpoint after changing the import."""

import re
from pathlib import Path

import pytest
import torch

import mlm

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    """The Python block under the README's "Use it like open_clip" heading."""
    text = README.read_text()
    section = text[text.index("### Use it like open_clip") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_open_clip_example_runs_on_a_checkpoint(tiny_run):
    run, synth = tiny_run
    image = next((Path(synth) / "images").glob("*.png"))
    code = readme_example().replace('"runs/tiny-synthetic"', repr(str(run))).replace('"photo.png"', repr(str(image)))
    scope = {}
    exec(compile(code, "README example", "exec"), scope)  # the README's own code, run as a user would
    probs = scope["text_probs"]
    assert probs.shape == (1, 3) and torch.allclose(probs.sum(-1), torch.ones(1))


def test_embeddings_follow_open_clip_normalize_and_pad_conventions(tiny_run):
    model, _, preprocess = mlm.create_model_and_transforms(str(tiny_run[0]))
    tokenizer = mlm.get_tokenizer(str(tiny_run[0]))
    texts = ["a red circle.", "two objects: a small blue star at the top left and a cross."]
    ids = tokenizer(texts)
    assert ids.shape == (2, model.config.max_text_len) and ids.dtype == torch.long
    assert tokenizer("a red circle.").shape == (1, model.config.max_text_len)
    with torch.no_grad():
        raw, unit = model.encode_text(ids), model.encode_text(ids, normalize=True)
        mask = ids != model.tokenizer.pad_id
        torch.testing.assert_close(unit, model.encode_text(ids, normalize=True, text_mask=mask))  # pads ignored
        torch.testing.assert_close(unit, raw / raw.norm(dim=-1, keepdim=True))
        images = torch.randn(2, 3, 32, 32)
        image_raw = model.encode_image(images)
        torch.testing.assert_close(model.encode_image(images, normalize=True), torch.nn.functional.normalize(image_raw))
    assert not torch.allclose(image_raw.norm(dim=-1), torch.ones(2))  # normalize=False really is unnormalised
    assert isinstance(model.logit_scale, torch.nn.Parameter)
    with pytest.raises(TypeError, match="text_mask="):
        model.encode_text(ids, mask)


def test_config_names_give_fresh_models_and_bad_names_are_refused():
    assert {"tiny-synthetic", "small", "base"} <= set(mlm.list_models())
    model = mlm.create_model("tiny-synthetic", precision="fp32")
    assert not model.training and model.tokenizer is None  # learns its WordPiece vocabulary from data
    with pytest.raises(ValueError, match="learns its tokenizer"):
        mlm.get_tokenizer("tiny-synthetic")
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder nor a shipped config"):
        mlm.create_model("no-such-model")
    with pytest.raises(ValueError, match="precision='int3'"):
        mlm.create_model("tiny-synthetic", precision="int3")
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        mlm.nothing  # noqa: B018
