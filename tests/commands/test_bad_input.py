"""Bad input to caption / ask / search / explain / eval: one line naming the file, field or argument, the documented
exit code (2: nothing done; 1: some inputs failed, the rest processed), never a traceback."""

import json
import shutil
from pathlib import Path

import pytest

from mlm.cli import main


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err


def _image(tiny_run) -> str:
    return str(sorted((tiny_run[1] / "images").glob("*.png"))[0])


@pytest.fixture
def model_copy(tiny_run, tmp_path):
    """A copy of the tiny model folder to break."""
    from mlm.run_folder import resolve_checkpoint

    folder = tmp_path / "model"
    shutil.copytree(resolve_checkpoint(tiny_run[0]), folder)
    return folder


@pytest.mark.parametrize("damage", ["truncated", "empty", "random"])
@pytest.mark.parametrize("command", ["caption", "ask", "search", "explain", "eval"])
def test_a_broken_weights_file_is_named(tiny_run, model_copy, capsys, damage, command):
    import os

    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "random": os.urandom(4096)}[damage])
    image = _image(tiny_run)
    argv = {
        "caption": ["caption", image],
        "ask": ["ask", image, "what color is it?"],
        "search": ["search", "a red circle", "--images", str(tiny_run[1] / "images")],
        "explain": ["explain", image, "a red circle"],
        "eval": ["eval", "--data", str(tiny_run[1]), "--task", "retrieval"],
    }[command]
    assert main([*argv, "--checkpoint", str(model_copy)]) == 2
    err = _err(capsys)
    assert len(err.splitlines()) == 1 and f"{weights}: not usable weights" in err


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        ('{"model": {"dim": "x"}}', "model.dim: expected an integer"),
    ],
)
def test_a_broken_config_json_is_named(tiny_run, model_copy, capsys, content, expected):
    path = model_copy / "config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["caption", _image(tiny_run), "--checkpoint", str(model_copy)]) == 2
    err = _err(capsys)
    assert len(err.splitlines()) == 1 and err.startswith(f"mlm caption: error: {path}: {expected}")


def test_questions_are_checked_before_anything_runs(tiny_run, capsys):
    image, checkpoint = _image(tiny_run), ["--checkpoint", str(tiny_run[0])]
    cases = {
        "\udcff\udcfe what color": "question 1: not valid UTF-8 text (byte 0xff at character 0)",  # argv b"\xff\xfe"
        "   ": "question 1: the text is empty",
        "what " * 2000: "question 1: 9,999 characters; the limit is 2,000",
        "what color is the shape " * 10: "tokens with the prompt and an answer; this model reads at most 24 "
        "(model.max_text_len)",
    }
    for question, message in cases.items():
        assert main(["ask", image, question, *checkpoint]) == 2
        assert message in _err(capsys)
    assert main(["ask", image, "what color?", "", *checkpoint]) == 2
    assert "question 2: the text is empty" in _err(capsys)
    assert main(["search", "\udcff", "--images", str(tiny_run[1] / "images"), *checkpoint]) == 2
    assert "search text: not valid UTF-8" in _err(capsys)
    assert main(["explain", image, "a red \udcff", *checkpoint]) == 2
    assert "caption: not valid UTF-8" in _err(capsys)


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--max-tokens", "100000", "--max-tokens 100000: must be between 1 and 512"),
    ("--max-tokens", "0", "--max-tokens 0: must be between 1 and 512"),
    ("--beams", "1000", "--beams 1000: must be between 1 and 32"),
    ("--min-tokens", "-1", "--min-tokens -1: must be between 0 and --max-tokens"),
    ("--batch-size", "0", "--batch-size 0: must be between 1 and 1024"),
])  # fmt: skip
def test_decoding_bounds_are_checked(tiny_run, capsys, option, value, message):
    assert main(["caption", _image(tiny_run), option, value, "--checkpoint", str(tiny_run[0])]) == 2
    assert message in _err(capsys)


def test_a_bad_file_is_reported_once_and_the_others_captioned(tiny_run, tmp_path, capsys):
    (tmp_path / "fake.jpg").write_text("hello")
    image = _image(tiny_run)
    assert main(["caption", image, str(tmp_path / "fake.jpg"), "--checkpoint", str(tiny_run[0])]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{image}\t") and len(captured.out.strip().splitlines()) == 1
    assert captured.err.count("fake.jpg") == 2 and len(captured.err.strip().splitlines()) == 1  # path + reason


def test_search_skips_a_dangling_link_and_searches_the_rest(tiny_run, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted((tiny_run[1] / "images").glob("*.png"))[:3]:
        shutil.copy(path, folder / path.name)
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")
    argv = ["search", "a red circle", "--images", str(folder), "--checkpoint", str(tiny_run[0])]
    assert main([*argv, "--cache-dir", str(tmp_path / "cache"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["index"]["images"] == 3 and result["index"]["bad"] == 1 and len(result["results"]) == 3


def test_a_tampered_search_cache_is_rebuilt(tiny_run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    argv = ["search", "a red circle", "--images", str(tiny_run[1] / "images"), "--checkpoint", str(tiny_run[0])]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--json"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    cache = next((tmp_path / "cache").glob("*.safetensors"))
    from safetensors import safe_open

    with safe_open(str(cache), framework="pt") as f:
        meta = f.metadata()
    save_file({"embeds": load_file(str(cache))["embeds"][:, :7].contiguous()}, str(cache), metadata=meta)
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["results"] == first["results"] and again["index"]["encoded"] == first["index"]["images"]


def test_os_errors_devices_and_outputs_are_one_line(tiny_run, tmp_path, capsys):
    image, checkpoint = _image(tiny_run), ["--checkpoint", str(tiny_run[0])]
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    argv = ["search", "a red circle", "--images", str(tiny_run[1] / "images"), "--cache-dir", str(a_file)]
    assert main([*argv, *checkpoint]) == 2
    assert "File exists" in _err(capsys) or "Not a directory" in _err(capsys)
    assert main(["caption", image, "--device", "foo", *checkpoint]) == 2
    assert "--device foo: not a device name" in _err(capsys)
    assert main(["caption", image, "--device", "meta", *checkpoint]) == 2
    assert "--device meta: use cpu, cuda, cuda:N or mps" in _err(capsys)
    assert main(["explain", image, "a red circle", "--out", str(tmp_path / "maps.jpg"), *checkpoint]) == 2
    assert "--out" in _err(capsys) and not (tmp_path / "maps.jpg").exists()
    assert main(["explain", image, "a red circle", "--out", str(tmp_path), *checkpoint]) == 0
    assert (tmp_path / f"{Path(image).stem}.explain.png").is_file()
    capsys.readouterr()


def test_prediction_files_with_unusable_ids_are_named(tmp_path, capsys):
    predictions = tmp_path / "results.json"
    predictions.write_text('[{"question_id": [1], "answer": "a"}]')
    questions, annotations = tmp_path / "q.json", tmp_path / "a.json"
    questions.write_text('{"questions": [{"question_id": 1, "image_id": 1, "question": "what?"}]}')
    annotations.write_text('{"annotations": [{"question_id": 1, "answers": [{"answer": "a"}]}]}')
    argv = ["eval", "vqa", "--predictions", str(predictions), "--questions", str(questions)]
    assert main([*argv, "--annotations", str(annotations)]) == 2
    assert "entry 0 must have a number or string 'question_id'" in _err(capsys)
    predictions.write_text("[" * 100_000)
    captions = tmp_path / "captions.json"
    captions.write_text('{"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": "a red circle"}]}')
    assert main(["eval", "caption", "--predictions", str(predictions), "--annotations", str(captions)]) == 2
    assert "nested too deeply" in _err(capsys)


def test_data_check_refuses_an_unknown_format(tiny_run, capsys):
    assert main(["data", "check", str(tiny_run[1]), "--format", "bogus"]) == 2
    assert "--format bogus: not a data format" in _err(capsys)
