"""Folder search: the on-disk index reuses embeddings of unchanged files and re-encodes only what changed."""

import os
import shutil

import pytest
import torch

from mlm import inference as infer
from mlm.eval.image_index import ImageIndex


@pytest.fixture
def folder(tiny_run, tmp_path):
    images = tmp_path / "photos"
    (images / "sub").mkdir(parents=True)
    for i, path in enumerate(sorted((tiny_run[1] / "images").glob("*.png"))[:5]):
        shutil.copy(path, images / ("sub" if i == 4 else "") / path.name)
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return images


def counting(model):
    """Wrap model.encode_image to count the images it encodes."""
    calls = []
    original = model.encode_image

    def encode_image(images, normalize=False):
        calls.append(images.shape[0])
        return original(images, normalize)

    model.encode_image = encode_image
    return calls


def test_a_second_search_encodes_nothing_and_a_changed_file_is_encoded_again(tiny_model, folder, tmp_path):
    calls = counting(tiny_model)
    cache = tmp_path / "cache"
    first = ImageIndex(folder, tiny_model, "model-a", cache)
    assert first.refresh() == {"images": 5, "reused": 0, "encoded": 5, "bad": 1}
    assert sum(calls) == 5 and len(list(cache.iterdir())) == 1
    again = ImageIndex(folder, tiny_model, "model-a", cache)
    assert again.refresh() == {"images": 5, "reused": 5, "encoded": 0, "bad": 1}
    assert sum(calls) == 5  # nothing encoded, the broken file not retried
    assert torch.equal(again.embeds, first.embeds) and again.paths == first.paths
    changed = again.paths[1]
    os.utime(changed, ns=(1, 1))  # a new modification time: the key changes
    (folder / "sub" / again.paths[4].name).unlink()
    assert ImageIndex(folder, tiny_model, "model-a", cache).refresh() == {
        "images": 4, "reused": 3, "encoded": 1, "bad": 1
    }  # fmt: skip
    assert calls[-1] == 1
    other_model = ImageIndex(folder, tiny_model, "model-b", cache)
    assert other_model.refresh()["encoded"] == 4  # another checkpoint never reuses these embeddings


def test_search_ranks_by_cosine_similarity(tiny_model, folder, tmp_path):
    index = ImageIndex(folder, tiny_model, "m", tmp_path / "cache")
    index.refresh()
    text = "a large red circle at the top left."
    hits = index.search(text, k=3)
    pixels = torch.stack([infer.image_transform(tiny_model)(infer.decode_any(p)) for p in index.paths])
    scores = infer.embed_texts(tiny_model, [text])[0] @ infer.embed_images(tiny_model, pixels).T
    best = torch.sort(scores, descending=True, stable=True).indices[:3].tolist()
    assert [h.path for h in hits] == [index.paths[i] for i in best]
    assert [h.score for h in hits] == pytest.approx(scores[best].tolist(), abs=1e-5)
    with pytest.raises(ValueError, match="search text is empty"):
        index.search("  ")
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        ImageIndex(tmp_path / "nowhere", tiny_model, "m")
