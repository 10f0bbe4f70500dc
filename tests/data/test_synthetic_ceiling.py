"""The benchmark's text→image R@1 ceiling: which captions fit which scenes."""

import json
import random

import pytest

from mlm.data import synthetic as S
from mlm.data.synthetic_ceiling import possible_captions, split_ceiling, text_to_image_ceiling


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    sizes = S.generate(out, n_images=60, size=64, seed=3, holdout=True, workers=1)
    return out, sizes


def test_every_written_caption_is_among_the_possible_ones(synth):
    out, _ = synth
    data = json.loads((out / "captions_test.json").read_text())
    for image in data["images"]:
        objects, _ = S.sample_scene(random.Random(f"mlm-synth:3:{image['id']}"), "test", True)
        written = [a["caption"] for a in data["annotations"] if a["image_id"] == image["id"]]
        assert set(written) <= possible_captions(objects)


def test_text_to_image_ceiling_on_a_hand_built_case():
    here = [S.SceneObject("circle", "red", "large", 0, 0)]
    there = [S.SceneObject("circle", "red", "large", 2, 2)]
    other = [S.SceneObject("star", "blue", "small", 1, 1)]
    captions = {
        1: ["a large red circle at the top left.", "a large red circle."],  # the second also fits image 2
        2: ["a large red circle at the bottom right."],
        3: ["a small blue star."],
    }
    # (1 + 1/2 + 1 + 1) / 4 captions
    assert text_to_image_ceiling(captions, {1: here, 2: there, 3: other}) == pytest.approx(100 * 3.5 / 4)


def test_split_ceiling_reads_the_scenes_back(synth):
    out, _ = synth
    ceiling = split_ceiling(out, "test")
    assert 50.0 < ceiling <= 100.0
