"""LAION's CLIP_benchmark scores an mlm checkpoint with its own zero-shot classification and retrieval code."""

import json
import random
import shutil

import pytest
import torch

from mlm.data.synthetic import sample_scene
from mlm.eval.retrieval import retrieval_metrics
from mlm.factory import register_clip_benchmark

clip_benchmark = pytest.importorskip("clip_benchmark")


def _colour_folders(synth, out):
    """An ImageFolder view of the synthetic training split: each image filed under its first object's colour."""
    captions = json.loads((synth / "captions_train.json").read_text())
    seed, holdout = captions["info"]["seed"], bool(captions["info"]["holdout"])
    for image in captions["images"]:
        first = sample_scene(random.Random(f"mlm-synth:{seed}:{image['id']}"), "train", holdout)[0][0]
        (out / first.color).mkdir(parents=True, exist_ok=True)
        shutil.copy(synth / "images" / image["file_name"], out / first.color / image["file_name"])
    return captions


def test_zero_shot_classification_and_retrieval_through_clip_benchmark(tiny_run, tmp_path):
    from clip_benchmark.datasets.builder import image_captions_collate_fn
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
    from clip_benchmark.models import load_clip
    from PIL import Image
    from torchvision.datasets import ImageFolder

    run, synth = tiny_run
    register_clip_benchmark()
    model, transform, tokenizer = load_clip("mlm", str(run), pretrained=None, cache_dir=None, device="cpu")
    captions = _colour_folders(synth, tmp_path / "by-colour")
    folder = ImageFolder(str(tmp_path / "by-colour"), transform=transform)
    loader = torch.utils.data.DataLoader(folder, batch_size=8)
    templates = ["a {c} shape.", "a picture of a {c} object."]
    # the harness's classifier and classification loop; its evaluate()'s accuracy() calls float() on a 1-element
    # array, which NumPy 2.4 refuses (TypeError), so the accuracy is taken from its logits here
    classifier = zeroshot_classification.zero_shot_classifier(model, tokenizer, folder.classes, templates, "cpu", False)
    logits, target = zeroshot_classification.run_classification(model, classifier, loader, "cpu", amp=False)
    # the same zero-shot classifier by hand: averaged normalised prompt embeddings per class, argmax over classes
    with torch.no_grad():
        classes = []
        for name in folder.classes:
            ids = tokenizer([t.format(c=name) for t in templates])
            mean = model.encode_text(ids, normalize=True).mean(0)
            classes.append(mean / mean.norm())
        images = torch.stack([folder[i][0] for i in range(len(folder))])
        predicted = (model.encode_image(images, normalize=True) @ torch.stack(classes).T).argmax(1)
    assert target.tolist() == folder.targets and logits.shape == (len(folder), len(folder.classes))
    assert logits.argmax(1).tolist() == predicted.tolist()

    texts = {}
    for ann in captions["annotations"]:
        texts.setdefault(ann["image_id"], []).append(ann["caption"])
    pairs = [(transform(Image.open(synth / "images" / im["file_name"]).convert("RGB")), texts[im["id"]])
             for im in captions["images"]]  # fmt: skip
    loader = torch.utils.data.DataLoader(pairs, batch_size=8, collate_fn=image_captions_collate_fn)
    harness = zeroshot_retrieval.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5])
    with torch.no_grad():
        ours = retrieval_metrics(
            model.encode_image(torch.stack([p for p, _ in pairs]), normalize=True),
            model.encode_text(tokenizer([t for _, ts in pairs for t in ts]), normalize=True),
            torch.tensor([i for i, (_, ts) in enumerate(pairs) for _ in ts]),
        )
    assert harness["image_retrieval_recall@1"] == pytest.approx(ours["text_to_image_R@1"] / 100, abs=1e-6)
    assert harness["text_retrieval_recall@5"] == pytest.approx(ours["image_to_text_R@5"] / 100, abs=1e-6)
