"""The model takes its own settings: MLMModel(ModelConfig), decoding as a DecodingConfig saved beside the weights,
and a checkpoint's config.json that holds the model settings only."""

import json

import pytest
import torch

from mlm.config import Config, load_config
from mlm.generation import DecodingConfig
from mlm.model import MLMModel
from tests.test_model import TINY


def test_the_model_refuses_a_whole_run_config():
    with pytest.raises(TypeError, match=r"pass config\.model \(a ModelConfig\)"):
        MLMModel(Config())


def test_decoding_settings_are_checked_and_updated():
    assert DecodingConfig().update(num_beams=3, top_p=None).num_beams == 3
    with pytest.raises(ValueError, match="not both"):
        DecodingConfig(num_beams=2, top_p=0.9)
    with pytest.raises(ValueError, match="min_new_tokens=5 must lie in"):
        DecodingConfig(max_new_tokens=4, min_new_tokens=5)
    with pytest.raises(ValueError, match="g.json: unknown decoding setting"):
        DecodingConfig.from_dict({"temperature": 0.7}, "g.json")
    with pytest.raises(ValueError, match="must be numbers"):
        DecodingConfig(max_new_tokens="5")


def test_checkpoint_holds_the_model_settings_and_the_decoding_defaults(tmp_path):
    config = load_config(None, [*TINY, "eval.max_new_tokens=3", "train.lr=0.5", "data.train=somewhere"])
    model = MLMModel(config.model, generation_config=config.eval.decoding()).eval()
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["format"] == 2 and saved["dim"] == config.model.dim
    assert not {"model", "data", "train", "eval"} & set(saved)  # the run's settings stay in the run folder
    assert json.loads((tmp_path / "m" / "generation_config.json").read_text())["max_new_tokens"] == 3
    loaded = MLMModel.from_pretrained(tmp_path / "m")
    assert loaded.config == config.model and loaded.generation_config == DecodingConfig(max_new_tokens=3)
    images = torch.randn(2, 3, 16, 16)
    prompts = [[1], [1]]
    assert all(len(ids) <= 3 for ids in loaded.generate_ids(images, prompts, eos_id=-1))
    assert all(len(ids) == 5 for ids in loaded.generate_ids(images, prompts, eos_id=-1, max_new_tokens=5))
    longer = DecodingConfig(max_new_tokens=4)
    assert all(len(ids) == 4 for ids in loaded.generate_ids(images, prompts, eos_id=-1, decoding=longer))

    (tmp_path / "m" / "generation_config.json").write_text('{"num_beams": 0}')
    with pytest.raises(ValueError, match=r"generation_config\.json: need 1 <= max_new_tokens"):
        MLMModel.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**saved, "dim": 0}))
    with pytest.raises(ValueError, match=r"config\.json: model\.dim=0 is out of range"):
        MLMModel.from_pretrained(tmp_path / "m")


def test_decoding_integers_must_be_integers():
    with pytest.raises(ValueError, match="integers but top_p"):
        DecodingConfig(max_new_tokens=3.5)
    with pytest.raises(ValueError, match=r"g\.json: .*integers"):
        DecodingConfig.from_dict({"num_beams": 2.0}, "g.json")
