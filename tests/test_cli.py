"""The `mlm` command line: help, config show, one-line errors with exit code 2."""

import subprocess
import sys
from pathlib import Path

from mlm.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_config_show_prints_resolved_yaml(capsys):
    assert main(["config", "show", str(ROOT / "configs/tiny-synthetic.yaml"), "--set", "train.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.5" in out and "kv_lora_rank: 32" in out


def test_config_error_is_one_line_and_exit_2(capsys):
    code = main(["config", "show", str(ROOT / "configs/tiny-synthetic.yaml"), "--set", "model.dimm=3"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "did you mean 'dim'" in err


def test_console_script_help_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "mlm.cli", "--help"], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    for command in ("config", "data", "bench"):
        assert command in out


def test_quiet_logging_drops_torchs_enum_notice_and_verbose_keeps_it():
    import logging

    from mlm.cli import _DROP_NOISE, setup_logging

    notice = "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by torch.compile"
    pytree = logging.getLogger("torch.utils._pytree")
    record = pytree.makeRecord(pytree.name, logging.WARNING, __file__, 1, notice, None, None)
    other = pytree.makeRecord(pytree.name, logging.WARNING, __file__, 1, "something else", None, None)
    try:
        setup_logging(False)
        setup_logging(False)  # a second main() in one process adds no second filter
        assert not pytree.filter(record) and pytree.filter(other) and pytree.filters.count(_DROP_NOISE) == 1
        setup_logging(True)
        assert pytree.filter(record)
    finally:
        setup_logging(False)
