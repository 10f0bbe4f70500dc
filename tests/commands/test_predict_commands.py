"""mlm caption / ask / search / explain on a tiny trained checkpoint, real COCO photos included."""

import json

import pytest
from PIL import Image

from mlm.cli import main


def run_json(capsys, argv):
    assert main(argv) in (0, 1)
    return json.loads(capsys.readouterr().out)


def test_caption_gives_one_non_empty_caption_per_real_coco_photo(tiny_run, realdata, capsys):
    photos = sorted(str(p) for p in (realdata / "coco-mini-train" / "images").glob("*.jpg"))
    assert len(photos) == 80
    rows = run_json(capsys, ["caption", *photos, "--checkpoint", str(tiny_run[0]), "--json", "--batch-size", "32"])
    assert [row["image"] for row in rows] == photos
    assert all(isinstance(row["caption"], str) and row["caption"].strip() for row in rows)


def test_caption_decoding_options_and_a_bad_file(tiny_run, tmp_path, capsys):
    images = sorted(str(p) for p in (tiny_run[1] / "images").glob("*.png"))[:3]
    checkpoint = ["--checkpoint", str(tiny_run[0]), "--json"]
    greedy = run_json(capsys, ["caption", *images, *checkpoint])
    one_beam = run_json(capsys, ["caption", *images, *checkpoint, "--beams", "1"])
    assert one_beam == greedy
    assert len(run_json(capsys, ["caption", *images, *checkpoint, "--beams", "3"])) == 3
    sampled = [run_json(capsys, ["caption", *images, *checkpoint, "--top-p", "0.9", "--seed", "7"]) for _ in range(2)]
    assert sampled[0] == sampled[1]  # seeded
    (tmp_path / "fake.jpg").write_text("hello")
    assert main(["caption", images[0], str(tmp_path / "fake.jpg"), *checkpoint]) == 1  # the good one still captioned
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["caption"] and "not an image" in rows[1]["error"]
    with pytest.raises(SystemExit):
        main(["caption", images[0], *checkpoint, "--beams", "2", "--top-p", "0.9"])
    assert main(["caption", images[0], *checkpoint, "--max-tokens", "0"]) == 2
    assert "--max-tokens 0" in capsys.readouterr().err
    short = run_json(capsys, ["caption", images[0], *checkpoint, "--max-tokens", "2"])
    assert len(short[0]["caption"].split()) <= 2


def test_ask_answers_each_question(tiny_run, capsys):
    image = str(sorted((tiny_run[1] / "images").glob("*.png"))[0])
    questions = ["what color is the shape?", "how many shapes are there?"]
    rows = run_json(capsys, ["ask", image, *questions, "--checkpoint", str(tiny_run[0]), "--json"])
    assert [row["question"] for row in rows] == questions
    assert all(row["answer"].strip() for row in rows)  # --min-tokens 1 by default
    assert main(["ask", image, "what shape is it?", "--checkpoint", str(tiny_run[0])]) == 0
    assert capsys.readouterr().out.strip()


def test_search_reuses_the_cached_index(tiny_run, tmp_path, capsys):
    argv = ["search", "a small red circle", "--images", str(tiny_run[1] / "images"), "--checkpoint", str(tiny_run[0])]
    argv += ["--cache-dir", str(tmp_path), "-k", "3", "--json"]
    n = len(list((tiny_run[1] / "images").glob("*.png")))
    first = run_json(capsys, argv)
    second = run_json(capsys, argv)
    assert first["index"]["encoded"] == first["index"]["images"] == n
    assert second["index"] == {"images": n, "reused": n, "encoded": 0, "bad": 0}
    assert second["results"] == first["results"] and len(first["results"]) == 3
    scores = [row["score"] for row in first["results"]]
    assert scores == sorted(scores, reverse=True)


def test_explain_writes_a_png_for_the_given_or_generated_caption(tiny_run, tmp_path, capsys):
    image = str(sorted((tiny_run[1] / "images").glob("*.png"))[0])
    out = tmp_path / "maps.png"
    assert main(["explain", image, "a red circle", "--checkpoint", str(tiny_run[0]), "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith("a red circle\nwrote ")
    with Image.open(out) as png:
        assert png.format == "PNG"
    assert main(["explain", image, "--checkpoint", str(tiny_run[0]), "--out", str(tmp_path / "own.png")]) == 0
    assert capsys.readouterr().out.split("\n")[0].strip()  # the model's own caption, not empty
    assert main(["explain", str(tmp_path / "none.png"), "x", "--checkpoint", str(tiny_run[0])]) == 2
    assert "missing image" in capsys.readouterr().err
