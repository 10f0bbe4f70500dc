"""Config loading: YAML files, type-checked overrides, and error messages that name the field."""

from pathlib import Path

import pytest

from mlm.config import Config, ConfigError, config_from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert len(cfg.model.levels) == cfg.model.n_layers


def test_override_changes_value_and_type():
    cfg = load_config(CONFIGS / "tiny-synthetic.yaml", ["train.lr=3e-4", "model.mla.kv_lora_rank=64"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.model.mla.kv_lora_rank == 64


def test_override_list_value():
    cfg = load_config(None, ["model.n_layers=2", "model.levels=[local, global]"])
    assert cfg.model.levels == ["local", "global"]


def test_int_is_accepted_for_float_but_not_str_for_int():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0
    with pytest.raises(ConfigError, match=r"train.max_steps: expected an integer, got 'many'"):
        load_config(None, ["train.max_steps=many"])


def test_unknown_key_lists_valid_keys_and_suggests_closest():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.learning_rat=1e-3"])
    assert "unknown config key 'train.learning_rat'" in str(err.value)
    assert "valid keys:" in str(err.value) and "batch_size" in str(err.value)
    with pytest.raises(ConfigError, match="did you mean 'kv_lora_rank'"):
        load_config(None, ["model.mla.kv_lora_rnk=8"])


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  dimm: 64\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'model.dimm'.*did you mean 'dim'"):
        load_config(path)


def test_bad_choice_and_cross_field_rules():
    with pytest.raises(ConfigError, match="model.attention='mqa' is not allowed; choose one of mla, mha, gqa"):
        load_config(None, ["model.attention=mqa"])
    with pytest.raises(ConfigError, match=r"model.levels has 3 entries but model.n_layers=4"):
        load_config(None, ["model.levels=[local, regional, global]"])
    with pytest.raises(ConfigError, match=r"model.levels\[1\]='medium'"):
        load_config(None, ["model.n_layers=2", "model.levels=[local, medium]"])


def test_override_malformed_and_section_errors():
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="'model.mla' is a section"):
        load_config(None, ["model.mla=3"])
    with pytest.raises(ConfigError, match="'train.lr' is not a section"):
        load_config(None, ["train.lr.x=3"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(bad)


def test_round_trip_through_yaml_and_dict(tmp_path):
    cfg = load_config(CONFIGS / "tiny-synthetic.yaml", ["train.seed=7"])
    path = tmp_path / "config.yaml"
    cfg.save(path)
    assert load_config(path) == cfg
    assert config_from_dict(cfg.to_dict()) == cfg
    assert Config() == config_from_dict({})


def test_float_field_accepts_exponent_string_but_not_words():
    assert load_config(None, ["train.lr=3e-4"]).train.lr == pytest.approx(3e-4)
    with pytest.raises(ConfigError, match=r"train.lr: expected a number, got 'fast'"):
        load_config(None, ["train.lr=fast"])


def test_errors_name_the_file_or_the_set_argument_that_caused_them(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("model:\n  n_layers: 2\n  levels: [local, global]\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: abc\n")
    with pytest.raises(ConfigError, match=r"^--set train.lr=abc: train.lr: expected a number, got 'abc'$"):
        load_config(good, ["train.lr=abc"])
    with pytest.raises(ConfigError, match=r"^--set model.n_layers=3: model.levels has 2 entries"):
        load_config(good, ["train.lr=1", "model.n_layers=3"])
    with pytest.raises(ConfigError, match=rf"^{bad}: train.lr: expected a number"):
        load_config(bad)
    assert load_config(bad, ["train.lr=0.5"]).train.lr == 0.5  # an override may repair the file
    with pytest.raises(ConfigError, match=r"^--set train.lrr=1: unknown config key 'train.lrr'"):
        load_config(good, ["train.lrr=1"])


def test_hostile_values_give_short_messages_naming_the_field(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    nested = ["&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]
    bomb.write_text(f"train: {{lr: [{', '.join(nested)}]}}\n")  # 10^7 numbers from a few hundred bytes
    with pytest.raises(ConfigError) as err:
        load_config(bomb)
    assert len(str(err.value)) < 400
    with pytest.raises(ConfigError, match=r"--set train.lr=\[1: train.lr: expected a number, got '\[1'"):
        load_config(None, ["train.lr=[1"])  # not YAML: taken as the text itself
    assert load_config(None, ["data.train=*.json"]).data.train == "*.json"
    with pytest.raises(ConfigError, match=r"--set model.patch_size=0: model.patch_size=0 is out of range"):
        load_config(None, ["model.patch_size=0"])
    with pytest.raises(ConfigError, match=r"model.mla.n_kv_heads=0 is out of range"):
        load_config(None, ["model.attention=gqa", "model.mla.n_kv_heads=0"])
    with pytest.raises(ConfigError, match=r"train.log_every=0 is out of range"):
        load_config(None, ["train.log_every=0"])
    with pytest.raises(ConfigError, match=r"'train' is a section; set one of its keys, e.g. train.output_dir"):
        load_config(None, ["train=5"])
