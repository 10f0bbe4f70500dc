"""``mlm data synth``, ``mlm data check`` (tables, --strict, a messy folder) and ``mlm bench data``."""

import json
import shutil

from mlm.cli import main
from mlm.data import records as R
from tests.data.conftest import BAD_IMAGES, write_images, write_json


def test_synth_then_check(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(out), "--images", "20", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert (
        "wrote 22 images" in printed
        and "2 single-object images for classify_shape.csv and classify_color.csv" in printed
    )
    assert len(list((out / "classify").glob("*.png"))) == 2  # the classification view: as many as test
    assert main(["data", "check", str(out / "captions_val.json"), "--json", str(tmp_path / "r.json")]) == 0
    text = capsys.readouterr().out
    assert "records read" in text and "total: 1 source(s), 0 unreadable, records read 2, kept 2" in text
    report = json.loads((tmp_path / "r.json").read_text())
    assert report[0]["read"] == 2 and report[0]["skipped"] == {}


def test_synth_classification_view_size(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(out), "--images", "10", "--classify-images", "0"]) == 0
    assert not (out / "classify_shape.csv").exists() and "single-object" not in capsys.readouterr().out
    assert main(["data", "synth", "--out", str(out), "--images", "10", "--classify-images", "-1"]) == 2
    assert "--classify-images=-1" in capsys.readouterr().err


def test_strict_exits_one_at_first_problem(coco_dir, capsys):
    assert main(["data", "check", str(coco_dir / "captions.json")]) == 0
    assert main(["data", "check", str(coco_dir / "captions.json"), "--strict"]) == 1
    err = capsys.readouterr().err
    assert "captions.json:images[11]: missing image: missing.jpg not found under" in err


def test_lenient_check_counts_decode_problems(coco_dir, tmp_path, capsys):
    path = tmp_path / "r.json"
    assert main(["data", "check", str(coco_dir / "captions.json"), "--json", str(path)]) == 0
    (report,) = json.loads(path.read_text())
    assert report["read"] == 12 and report["kept"] == 7
    assert report["skipped"] == {R.MISSING_IMAGE: 1, R.EMPTY_IMAGE: 1, R.TRUNCATED_IMAGE: 1, R.NOT_AN_IMAGE: 1,
                                 R.IMAGE_TOO_LARGE: 1}  # fmt: skip
    conversions = {f"converted {mode} to RGB": 1 for mode in ("CMYK", "LA", "P", "I;16")}
    assert report["fixed"] == {R.CAPTION_TRUNCATED: 1, "EXIF orientation applied": 1, **conversions}
    out = capsys.readouterr().out
    assert "skipped: image too large" in out and "e.g. " in out


def test_messy_folder_reports_everything_without_crashing(coco_dir, tmp_path, capsys):
    messy = tmp_path / "messy"
    shutil.copytree(coco_dir, messy)
    write_images(messy / "photos", {"x.jpg": "rgb", **BAD_IMAGES})
    (messy / "photos" / "notes.txt").write_text("not data")
    (messy / "broken.json").write_text('{"images": [\n  {"id": 1,,}\n]}')
    write_json(messy / "other.json", {"categories": []})
    (messy / "empty.jsonl").write_bytes(b"")
    (messy / "captions.jsonl").write_bytes(b'{"image": "photos/x.jpg", "caption": "ok"}\n{oops\n')
    (messy / "table.csv").write_bytes(b"filepath,title\nphotos/x.jpg,fine\nphotos/gone.jpg,lost\n\xff\xfe\x00\n")
    (messy / "shard.tar").write_bytes(b"\x00" * 100)
    path = tmp_path / "r.json"
    assert main(["data", "check", str(messy), "--json", str(path)]) == 0
    report = {e["source"].split(" (")[0].removeprefix(f"{messy}/"): e for e in json.loads(path.read_text())}
    assert report["broken.json"]["error"].endswith("broken.json:2:12: malformed JSON: Expecting property name "
                                                   "enclosed in double quotes")  # fmt: skip
    assert "missing key 'images' or 'questions'" in report["other.json"]["error"]
    assert "empty file" in report["empty.jsonl"]["error"]
    assert "truncated header" in report["shard.tar"]["examples"]["skipped:truncated file"][0]
    assert report["captions.jsonl"]["skipped"] == {R.MALFORMED_JSON: 1} and report["captions.jsonl"]["kept"] == 1
    assert report["table.csv"]["skipped"] == {R.MISSING_IMAGE: 1, R.MALFORMED_LINE: 1}
    assert report["captions.json"]["kept"] == 7
    images = report[str(messy)]
    assert images["skipped"][R.EMPTY_IMAGE] == 2 and images["skipped"][R.IMAGE_TOO_LARGE] == 2
    out = capsys.readouterr().out
    assert "unreadable" in out and "total:" in out


def test_bench_data_writes_json(tmp_path, capsys):
    argv = ["bench", "data", "--images", "20", "--image-size", "32", "--batch-size", "8", "--workers", "0"]
    assert main([*argv, "--json", str(tmp_path / "b.json")]) == 0
    result = json.loads((tmp_path / "b.json").read_text())
    (row,) = result["results"]
    assert row["num_workers"] == 0 and row["samples"] > 0 and row["samples_per_s"] > 0
    assert "samples/s" in capsys.readouterr().out
