"""``mlm bench scale`` at tiny sizes: the report's keys, the fitted exponents and the error on a bad device."""

import json

import pytest

from mlm.cli import main
from mlm.config import Config
from mlm.config_rules import ConfigError, check_model, check_run


def test_bench_scale_tiny_run_writes_every_level_and_exponent(tmp_path, capsys):
    out = tmp_path / "scale.json"
    argv = (f"bench scale --lengths 64 128 --grids 8 12 --heads 2 --head-dim 8 --window 4 --window-2d 3 --region 8 "
            f"--region-2d 4 --routed-tokens 8 --fit-from 64 --repeats 1 --json {out}")  # fmt: skip
    assert main(argv.split()) == 0
    report = json.loads(out.read_text())
    for part, sizes in (("one_d", ("64", "128")), ("two_d", ("64", "144"))):
        assert set(report[part]) == {"global", "local", "regional", "routed"}
        for level, paths in report[part].items():
            assert set(paths["sparse"]) == set(sizes)
            assert set(paths["dense"]) == (set() if level == "global" else set(sizes))
            for point in paths["sparse"].values():
                assert point["seconds"] > 0 and point["saved_bytes"] > 0
        assert "local_sparse" in report["exponents"][part] and "local_dense" in report["exponents"][part]
    assert "met" in report["targets"]
    table = capsys.readouterr().out
    assert "1-D (tokens)" in table and "2-D (patches)" in table and "n^" in table


def test_bench_scale_refuses_a_missing_cuda(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main("bench scale --lengths 8 --grids 2 --device cuda".split()) == 2
    assert "--device cuda: CUDA is not available on this machine" in capsys.readouterr().err


@pytest.mark.parametrize(("field", "value", "levels", "message"), [
    ("routed_tokens", 100, ["local", "routed"], "model.routed_tokens=100 is larger than the sequence: at most 64"),
    ("region_size_2d", 9, ["regional", "global"], "model.region_size_2d=9 is larger than the sequence: at most 8"),
    ("local_window", 40, ["local", "global"], "model.local_window=40 is larger than the sequence: at most 31"),
    ("level_impl", "flash", ["local", "global"], "model.level_impl='flash' is not allowed; choose one of auto"),
])  # fmt: skip
def test_level_sizes_larger_than_the_sequence_name_the_setting(field, value, levels, message):
    cfg = Config()
    m = cfg.model
    m.image_size, m.patch_size, m.max_text_len, m.levels, m.n_layers = 64, 8, 32, levels, len(levels)
    setattr(m, field, value)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        check_run(cfg)
    if field in ("local_window", "region_size_2d"):
        check_model(m)  # a saved model with such sizes still loads


def test_bench_scale_times_flex_for_inference_and_refuses_its_cpu_backward(tmp_path, capsys, monkeypatch):
    """--paths flex --forward-only adds a flex row per level but routed; without --forward-only the CPU refuses."""
    from torch.nn.attention.flex_attention import flex_attention

    from mlm.layers import flex

    monkeypatch.setattr(flex, "_compiled", lambda: flex_attention)  # the unfused reference: no compilation here
    out = tmp_path / "scale.json"
    argv = (f"bench scale --lengths 32 --grids 6 --heads 2 --head-dim 8 --window 4 --window-2d 3 --region 8 "
            f"--region-2d 3 --routed-tokens 4 --repeats 1 --paths sparse flex --forward-only --json {out}")  # fmt: skip
    assert main(argv.split()) == 0
    report = json.loads(out.read_text())
    for part, n in (("one_d", "32"), ("two_d", "36")):
        assert set(report[part]["routed"]["flex"]) == set()
        for level in ("global", "local", "regional"):
            assert report[part][level]["flex"][n]["seconds"] > 0 and report[part][level]["flex"][n]["saved_bytes"] == 0
    capsys.readouterr()
    assert main("bench scale --lengths 8 --grids 2 --paths flex".split()) == 2
    assert "--paths flex on the CPU needs --forward-only" in capsys.readouterr().err
