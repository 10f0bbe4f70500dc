"""Zero-shot classification: metrics on hand-checked logits, class folders and CSVs, templates, the CLI end to end,
and the same predictions as CLIP_benchmark's classifier."""

import csv
import json

import pytest
import torch
from PIL import Image

from mlm.cli import main
from mlm.data.synthetic_classify import VIEWS, write_classification
from mlm.eval.zeroshot import (
    DEFAULT_TEMPLATES,
    choose_templates,
    class_embeddings,
    open_classification,
    read_templates,
    zeroshot_classify,
    zeroshot_metrics,
)


def test_metrics_on_a_hand_checked_case():
    logits = torch.tensor(
        [[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4], [0.1, 0.3, 0.6], [0.3, 0.2, 0.1]]
    )  # predicted: 0, 1, 0, 2, 0
    labels = torch.tensor([0, 1, 2, 2, 1])
    m = zeroshot_metrics(logits, labels, ["cat", "dog", "bird"])
    assert m["top1"] == 60.0  # images 0, 1, 3
    assert m["top3"] == 100.0  # k is capped at the number of classes
    assert m["per_class"] == {"cat": 100.0, "dog": 50.0, "bird": 50.0}
    assert m["mean_per_class"] == 66.67
    assert m["confusion"] == [[1, 0, 0], [1, 1, 0], [1, 0, 1]]  # rows: true class
    top2 = zeroshot_metrics(logits[:, :2], torch.tensor([0, 1, 1, 1, 1]), ["cat", "dog"])  # predicted 0, 1, 0, 1, 0
    assert top2["top1"] == 60.0 and top2["top2"] == 100.0


def test_templates_file_is_checked_line_by_line(tmp_path):
    good = tmp_path / "t.txt"
    good.write_text("# a comment\n\na photo of a {}.\na {c} drawing.\n")
    assert read_templates(good) == ["a photo of a {}.", "a {} drawing."]
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {}.\nno placeholder here\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2: a template needs exactly one \{\}"):
        read_templates(bad)
    (tmp_path / "two.txt").write_text("a {} and a {}.\n")
    with pytest.raises(ValueError, match="two.txt:1"):
        read_templates(tmp_path / "two.txt")
    with pytest.raises(FileNotFoundError, match="--templates: no such file"):
        read_templates(tmp_path / "missing.txt")


def _png(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 12), colour).save(path)


def test_image_folder_and_csv_give_the_same_classes(tmp_path):
    for name, colour in (("red_car", (255, 0, 0)), ("blue", (0, 0, 255))):
        for k in range(2):
            _png(tmp_path / "folders" / name / f"{k}.png", colour)
    (tmp_path / "folders" / "notes.txt").write_text("not a class")
    folders = open_classification(tmp_path / "folders")
    assert folders.classes == ["blue", "red_car"] and folders.labels == [0, 0, 1, 1]
    assert folders.templates_file is None and choose_templates(folders, None) == list(DEFAULT_TEMPLATES)
    (tmp_path / "folders" / "templates.txt").write_text("a {} thing.\n")
    assert choose_templates(open_classification(tmp_path / "folders"), None) == ["a {} thing."]

    table = tmp_path / "set.csv"
    rows = [("folders/red_car/0.png", "red_car"), ("folders/blue/1.png", "blue")]
    table.write_text("path,name\n" + "".join(f"{p},{c}\n" for p, c in rows))
    with pytest.raises(ValueError, match=r"set\.csv: no column 'filepath', 'label' \(it has path, name\)"):
        open_classification(table)
    data = open_classification(table, image_column="path", label_column="name")
    assert data.classes == ["blue", "red_car"] and data.labels == [1, 0]
    assert data.images[0] == tmp_path / "folders" / "red_car" / "0.png"
    table.write_text("path,name\nfolders/blue/0.png,blue\nfolders/none.png,blue\n")
    with pytest.raises(FileNotFoundError, match=r"set\.csv:3: no such image"):
        open_classification(table, image_column="path", label_column="name")
    with pytest.raises(ValueError, match="zero-shot reads an image folder"):
        open_classification(tmp_path / "folders" / "notes.txt")


def test_synthetic_view_is_deterministic_and_balanced_enough(tmp_path):
    first = write_classification(tmp_path / "a", 60, 32, seed=3)
    second = write_classification(tmp_path / "b", 60, 32, seed=3)
    for a, b in zip(first, second, strict=True):
        assert a.read_text() == b.read_text()
        assert a.with_name(f"{a.stem}_templates.txt").is_file()
    assert (tmp_path / "a/classify/000007.png").read_bytes() == (tmp_path / "b/classify/000007.png").read_bytes()
    with (tmp_path / "a/classify_shape.csv").open() as handle:
        shapes = [row["label"] for row in csv.DictReader(handle)]
    assert len(shapes) == 60 and len(set(shapes)) == 6
    assert set(VIEWS) == {"shape", "color"}


def test_class_embeddings_average_the_normalised_templates(tiny_model):
    from mlm.inference import embed_texts

    templates = ["a {} shape.", "one {} object."]
    weights = class_embeddings(tiny_model, ["red", "blue"], templates)
    red = embed_texts(tiny_model, ["a red shape.", "one red object."]).mean(0)
    assert torch.allclose(weights[0], red / red.norm(), atol=1e-6)
    assert torch.allclose(weights.norm(dim=1), torch.ones(2), atol=1e-6)


def test_cli_writes_metrics_and_confusion(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    view = write_classification(tmp_path, 24, 32, seed=1)[1]  # by colour
    out = tmp_path / "report"
    assert main(["eval", "--checkpoint", str(run), "--data", str(view), "--task", "zeroshot", "--out", str(out)]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("zero-shot classify_color.csv: top-1 ") and "(24 images, " in line
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["templates"] == list(VIEWS["color"]) and metrics["num_images"] == 24
    assert sum(map(sum, metrics["confusion"])) == 24 and (out / "confusion.png").stat().st_size > 0
    assert main(["eval", "--checkpoint", str(run), "--data", str(view), "--task", "zeroshot,vqa"]) == 2
    assert "run it on its own" in capsys.readouterr().err


def test_same_predictions_as_clip_benchmark(tiny_model, tmp_path):
    pytest.importorskip("clip_benchmark")
    from clip_benchmark.metrics import zeroshot_classification
    from torchvision.datasets import ImageFolder

    from mlm.factory import Tokenize
    from mlm.inference import image_transform

    view = write_classification(tmp_path / "synth", 30, 32, seed=2)[0]  # by shape
    data = open_classification(view)
    folders = tmp_path / "folders"
    for image, label in zip(data.images, data.labels, strict=True):
        (folders / data.classes[label]).mkdir(parents=True, exist_ok=True)
        Image.open(image).save(folders / data.classes[label] / image.name)
    templates = list(VIEWS["shape"])
    ours = zeroshot_classify(tiny_model, open_classification(folders), templates)
    folder = ImageFolder(str(folders), transform=image_transform(tiny_model))
    tokenizer = Tokenize(tiny_model.tokenizer, tiny_model.config.max_text_len)
    harness_templates = [t.replace("{}", "{c}") for t in templates]  # the harness formats with c=
    classifier = zeroshot_classification.zero_shot_classifier(
        tiny_model, tokenizer, folder.classes, harness_templates, "cpu", amp=False
    )
    loader = torch.utils.data.DataLoader(folder, batch_size=8)
    logits, target = zeroshot_classification.run_classification(tiny_model, classifier, loader, "cpu", amp=False)
    confusion = torch.zeros(len(folder.classes), len(folder.classes), dtype=torch.long)
    confusion.index_put_((target, logits.argmax(1)), torch.ones_like(target), accumulate=True)
    assert ours["confusion"] == confusion.tolist()


def test_one_class_and_unreadable_images(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    for k in range(2):
        _png(tmp_path / "only" / "red" / f"{k}.png", (255, 0, 0))
    assert main(["eval", "--checkpoint", str(run), "--data", str(tmp_path / "only"), "--task", "zeroshot",
                 "--out", str(tmp_path / "r1")]) == 0  # fmt: skip
    assert "top-1 100.00" in capsys.readouterr().out  # one class: every image is in it
    (tmp_path / "bad" / "red").mkdir(parents=True)
    (tmp_path / "bad" / "red" / "x.png").write_bytes(b"not a png")
    code = main(["eval", "--checkpoint", str(run), "--data", str(tmp_path / "bad"), "--task", "zeroshot"])
    err = capsys.readouterr().err
    assert code in (1, 2) and "none of its 1 images could be read" in err and "Traceback" not in err
