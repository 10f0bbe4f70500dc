"""Tests for ``mlm bench mla`` on a tiny configuration."""

import json
import subprocess
import sys

from mlm.cli import main


def test_add_arguments_imports_no_torch():
    code = (
        "import sys, argparse, mlm.bench.mla as m; m.add_arguments(argparse.ArgumentParser()); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_bench_mla_tiny_run_writes_the_issue_keys(tmp_path, capsys):
    out = tmp_path / "mla.json"
    argv = (
        "bench mla --dim 32 --n-heads 4 --n-kv-heads 2 --qk-nope-head-dim 8 --qk-rope-head-dim 4 --v-head-dim 8 "
        f"--kv-lora-rank 8 --contexts 16 32 --decode-steps 2 --devices cpu --json {out}"
    )
    assert main(argv.split()) == 0
    report = json.loads(out.read_text())
    # bytes per token read off the filled caches: MHA 4 heads x (12 + 8), GQA 2 heads x (12 + 8), MLA 8 + 4; fp32
    assert report["kv_cache_bytes_per_token"] == {"mha": 4 * 20 * 4, "gqa": 2 * 20 * 4, "mla": 12 * 4}
    assert set(report["decode_tokens_per_s"]) == {"16", "32"}
    for context in ("16", "32"):
        speeds = report["decode_tokens_per_s"][context]
        assert set(speeds) == {"mha", "gqa", "mla_naive", "mla_absorbed"} and min(speeds.values()) > 0
    assert report["targets"]["mla_over_mha_cache"] == 12 / 80
    table = capsys.readouterr().out
    assert "KV cache bytes/token" in table and "mla_absorbed" in table and str(out) in table
