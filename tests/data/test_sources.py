"""Sources: every format reads a fixture built here; every bad-input class is counted with file and line/field."""

import io
import json
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlm.config import DataConfig
from mlm.data import records as R
from mlm.data.records import DataError
from mlm.data.sources import detect_format, open_source
from tests.data.conftest import image_bytes, write_images, write_json


def test_coco_counts_every_caption_problem(coco_dir):
    src = open_source(coco_dir / "captions.json")
    s = src.stats
    assert src.kind == "coco" and s.read == 12
    assert s.skipped == {R.MISSING_IMAGE: 1} and s.kept == 11 == len(src)
    assert s.dropped == {R.EMPTY_CAPTION: 1, R.NON_UTF8: 1, R.WRONG_SCHEMA: 2}
    assert s.fixed == {R.CAPTION_TRUNCATED: 1}
    first = src[0]
    assert first.image_id == 1 and first.image.endswith("images/a.jpg")
    assert first.captions[0] == "a photo number 0" and len(first.captions[1]) <= R.MAX_CAPTION_CHARS
    messages = " | ".join(m for v in s.examples.values() for m in v)
    assert "captions.json:images[11] (id 12)" not in messages  # missing image is reported by its entry...
    assert "captions.json:images[11]: missing image: missing.jpg not found" in messages
    assert "captions.json:annotations[14]: non-UTF-8 text: caption b'bad \\xff bytes'" in messages
    assert "captions.json:annotations[16]: wrong schema: missing key 'caption'" in messages
    assert "captions.json:annotations[15]: wrong schema: image_id 99 is not in images" in messages


def test_strict_raises_at_first_problem_with_location(coco_dir):
    with pytest.raises(DataError, match=r"captions.json:images\[11\]: missing image"):
        open_source(coco_dir / "captions.json", DataConfig(strict=True))


@pytest.mark.parametrize(
    ("content", "reason", "where"),
    [
        (b"", R.EMPTY_FILE, "bad.json"),
        (b'{"images": [1, 2,\n  ]}', R.MALFORMED_JSON, "bad.json:2:3"),
        (b'{"images": [], "info": {}}', R.WRONG_SCHEMA, "bad.json"),
        (b'{"info": {}, "licenses": []}', R.WRONG_SCHEMA, "bad.json"),
        (b"[1, 2, 3]", R.WRONG_SCHEMA, "bad.json"),
    ],
)
def test_unreadable_json_files_name_file_and_position(tmp_path, content, reason, where):
    (tmp_path / "bad.json").write_bytes(content)
    with pytest.raises(DataError) as info:
        open_source(tmp_path / "bad.json")
    assert info.value.reason == reason and info.value.origin.endswith(where)


def test_wrong_schema_names_the_missing_key(tmp_path):
    write_json(tmp_path / "c.json", {"images": [], "info": {}})
    with pytest.raises(DataError, match="missing key 'annotations'"):
        open_source(tmp_path / "c.json", DataConfig(format="coco"))
    with pytest.raises(DataError, match="missing key 'images' or 'questions'.*top-level keys: info, licenses"):
        open_source(write_json(tmp_path / "d.json", {"info": {}, "licenses": []}))


def test_karpathy_splits_restval_and_flickr_layout(tmp_path):
    write_images(tmp_path / "flickr30k-images", {"1.jpg": "rgb", "2.jpg": "rgb", "3.jpg": "rgb"})
    images = [
        {"filename": "1.jpg", "imgid": 0, "split": "train", "sentences": [{"raw": "a dog runs", "tokens": []}]},
        {"filename": "2.jpg", "imgid": 1, "split": "restval", "sentences": [{"tokens": ["a", "cat"]}]},
        {"filename": "3.jpg", "imgid": 2, "split": "test", "sentences": [{"raw": ""}]},
    ]
    path = write_json(tmp_path / "dataset_flickr30k.json", {"dataset": "flickr30k", "images": images})
    assert detect_format(str(path)) == "karpathy"
    train = open_source(path, split="train")
    assert [r.captions for r in train] == [["a dog runs"], ["a cat"]]
    test = open_source(path, split="test")
    assert len(test) == 0 and test.stats.skipped == {R.NO_CAPTION: 1} and test.stats.dropped == {R.EMPTY_CAPTION: 1}
    with pytest.raises(ValueError, match="no image has split 'val'; splits present: restval, test, train"):
        open_source(path, split="val")


def _vqa(tmp_path: Path, subtype="val2014", questions_name="questions.json", answers_name="annotations.json"):
    write_images(tmp_path / "images", {f"COCO_{subtype}_000000000007.jpg": "rgb", "000000000008.jpg": "rgb"})
    qs = [{"image_id": 7, "question": "what color?", "question_id": 70},
          {"image_id": 8, "question": "how many?", "question_id": 80},
          {"image_id": 9, "question": "where?", "question_id": 90},
          {"image_id": 7, "question": "", "question_id": 71},
          {"image_id": 7, "question": "unanswered?", "question_id": 72}]  # fmt: skip
    answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(["red"] * 9 + [""])]
    anns = [
        {
            "question_id": q,
            "image_id": i,
            "question_type": "what color is the",
            "answer_type": "other",
            "multiple_choice_answer": "red",
            "answers": answers,
        }
        for q, i in ((70, 7), (80, 8), (90, 9), (71, 7))
    ]
    write_json(tmp_path / questions_name, {"data_subtype": subtype, "questions": qs})
    write_json(tmp_path / answers_name, {"data_subtype": subtype, "annotations": anns})
    return tmp_path / questions_name


def test_vqav2_questions_with_annotations_beside(tmp_path):
    src = open_source(_vqa(tmp_path))
    assert src.kind == "vqav2" and [r.question_id for r in src] == [70, 80]
    first = src[0]
    assert first.is_vqa and first.answer == "red" and first.answers == ["red"] * 9
    assert first.question_type == "what color is the" and first.answer_type == "other"
    assert first.image.endswith("COCO_val2014_000000000007.jpg") and src[1].image.endswith("000000000008.jpg")
    assert src.stats.skipped == {R.MISSING_IMAGE: 1, "no valid question": 1, R.NO_ANSWER: 1}
    assert src.stats.dropped == {"empty answer": 3, "empty question": 1}


def test_vqav2_official_names_and_explicit_pair(tmp_path):
    q = _vqa(
        tmp_path, "train2014", "v2_OpenEnded_mscoco_train2014_questions.json", "v2_mscoco_train2014_annotations.json"
    )
    assert len(open_source(q)) == 2
    pair = f"{q}:{tmp_path / 'v2_mscoco_train2014_annotations.json'}"
    assert detect_format(pair) == "vqav2" and len(open_source(pair)) == 2
    (tmp_path / "v2_mscoco_train2014_annotations.json").unlink()
    with pytest.raises(FileNotFoundError, match="no VQAv2 annotations file beside it"):
        open_source(q)


def test_vqav2_annotations_file_alone_is_explained(tmp_path):
    _vqa(tmp_path)
    with pytest.raises(DataError, match="this is a VQAv2 annotations file"):
        open_source(tmp_path / "annotations.json")


def test_open_clip_csv_and_custom_columns(tmp_path):
    write_images(tmp_path, {"a.jpg": "rgb", "b.jpg": "rgb"})
    (tmp_path / "train.csv").write_text("filepath\ttitle\na.jpg\ta red thing\nb.jpg\ta blue thing\n")
    src = open_source(tmp_path / "train.csv")
    assert src.kind == "csv" and [r.captions[0] for r in src] == ["a red thing", "a blue thing"]
    (tmp_path / "other.csv").write_text("path,desc\na.jpg,first\n")
    cfg = DataConfig(csv_img_key="path", csv_caption_key="desc")
    assert open_source(tmp_path / "other.csv", cfg)[0].captions == ["first"]
    with pytest.raises(DataError, match=r"other.csv:1: wrong schema: no caption column: 'title'"):
        open_source(tmp_path / "other.csv")


def test_csv_bad_lines_are_counted_with_line_numbers(tmp_path):
    write_images(tmp_path, {"a.jpg": "rgb"})
    rows = b"image\tcaption\na.jpg\tgood\na.jpg\tbad \xff\xfe\nnope.jpg\tgone\na.jpg\nhttp://x/y.jpg\tweb\na.jpg\t\n"
    (tmp_path / "t.tsv").write_bytes(rows)
    src = open_source(tmp_path / "t.tsv")
    assert len(src) == 1 and src.stats.read == 6
    assert src.stats.skipped == {R.NO_CAPTION: 2, R.MISSING_IMAGE: 2, R.MALFORMED_LINE: 1}
    assert src.stats.dropped == {R.NON_UTF8: 1, R.EMPTY_CAPTION: 1}
    examples = " | ".join(m for v in src.stats.examples.values() for m in v)
    assert (
        "t.tsv:3:caption: non-UTF-8 text" in examples
        and "t.tsv:5: malformed line: expected 2 fields, got 1" in examples
    )


def test_jsonl_malformed_and_non_utf8_lines(tmp_path):
    write_images(tmp_path, {"a.jpg": "rgb"})
    lines = [
        json.dumps({"image": "a.jpg", "caption": ["one", "two"]}).encode(),
        b'{"image": "a.jpg", "caption": ',
        b'{"image": "a.jpg", "caption": "caf\xe9"}',
        b"",
        b"[1, 2]",
        json.dumps({"caption": "no image"}).encode(),
    ]
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    src = open_source(tmp_path / "d.jsonl")
    assert src[0].captions == ["one", "two"] and len(src) == 1 and src.stats.read == 5
    assert src.stats.skipped == {R.MALFORMED_JSON: 1, R.NON_UTF8: 1, R.WRONG_SCHEMA: 2}
    examples = " | ".join(m for v in src.stats.examples.values() for m in v)
    assert "d.jsonl:2:31: malformed JSON" in examples and "d.jsonl:3: non-UTF-8 text: byte b'\\xe9'" in examples
    assert "d.jsonl:6: wrong schema: missing or empty 'image'" in examples


def test_imagefolder_matches_datasets_reading(tmp_path):
    import datasets

    write_images(tmp_path, {"0.jpg": "rgb", "1.png": "png"})
    meta = [{"file_name": "0.jpg", "text": "zero"}, {"file_name": "1.png", "text": "one"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    src = open_source(tmp_path)
    assert src.kind == "imagefolder"
    ref = datasets.load_dataset("imagefolder", data_dir=str(tmp_path), split="train")
    ref = ref.cast_column("image", datasets.Image(decode=False))
    assert sorted((Path(r.image).name, r.captions[0]) for r in src) == sorted(
        (Path(row["image"]["path"]).name, row["text"]) for row in ref
    )


def test_parquet_and_save_to_disk(tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    rows = {"image": [{"bytes": image_bytes("rgb"), "path": None}, {"bytes": image_bytes("text"), "path": None},
                      {"bytes": image_bytes("png"), "path": None}],
            "text": ["first", "second", None]}  # fmt: skip
    ds = datasets.Dataset.from_dict(rows, features=features)
    ds.to_parquet(str(tmp_path / "part.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for spec, kind in ((tmp_path / "part.parquet", "parquet"), (tmp_path / "saved", "arrow")):
        src = open_source(spec)
        assert src.kind == kind and len(src) == 2 and src.stats.skipped == {R.NO_CAPTION: 1}
        assert src.stats.dropped == {R.WRONG_SCHEMA: 1}  # None is not text
        assert src[0].captions == ["first"] and src[0].image == image_bytes("rgb")
        assert list(src.texts()) == ["first", "second"]


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_brace_pattern_and_bad_samples(tmp_path):
    jpg = image_bytes("rgb")
    _tar(tmp_path / "shard-000.tar", {"a.jpg": jpg, "a.txt": b"first", "b.jpg": jpg, "c.txt": b"orphan text",
                                       "d.jpg": jpg, "d.txt": b"bad \xff", "e.jpg": jpg,
                                       "e.json": json.dumps({"caption": "from json"}).encode()})  # fmt: skip
    _tar(tmp_path / "shard-001.tar", {"f.jpg": jpg, "f.txt": b"sixth"})
    (tmp_path / "shard-002.tar").write_bytes(
        (tmp_path / "shard-000.tar").read_bytes()[:2100]
    )  # a.jpg and a.txt, then cut
    src = open_source(str(tmp_path / "shard-{000..002}.tar"))
    assert src.kind == "webdataset"
    assert [r.captions[0] for r in src] == ["first", "from json", "sixth", "first"]
    assert src[0].origin.endswith("shard-000.tar:a.jpg")
    from mlm.data.images import decode_image

    assert decode_image(src[2].image)[0].size == (24, 16)
    assert src.stats.skipped[R.NO_CAPTION] == 2 and src.stats.skipped[R.MISSING_IMAGE] == 1
    assert src.stats.skipped[R.TRUNCATED_FILE] == 1 and src.stats.dropped[R.NON_UTF8] == 1
    assert len(open_source(tmp_path / "shard-001.tar")) == 1


@pytest.mark.parametrize(
    ("name", "expected"),
    [("a.csv", "csv"), ("a.tsv", "tsv"), ("a.jsonl", "jsonl"), ("a.parquet", "parquet"), ("a.tar", "webdataset")],
)
def test_detect_format_by_suffix(tmp_path, name, expected):
    (tmp_path / name).write_text("x")
    assert detect_format(str(tmp_path / name)) == expected


def test_unknown_folder_and_format_are_explained(tmp_path):
    with pytest.raises(ValueError, match="cannot tell the data format of this folder"):
        open_source(tmp_path)
    with pytest.raises(ValueError, match="data.format='yaml' is not allowed"):
        open_source(tmp_path, DataConfig(format="yaml"))
    with pytest.raises(FileNotFoundError, match="data source not found"):
        open_source(tmp_path / "nothing.json")


def test_concat_sources(coco_dir):
    spec = f"{coco_dir / 'captions.json'}+{coco_dir / 'captions.json'}"
    src = open_source(spec)
    assert len(src) == 22 and src[11].image_id == 1 and src[-1].image_id == src[10].image_id
    assert src.stats.read == 24


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
ENTRY_KEYS = st.sampled_from(["id", "file_name", "image_id", "caption", "sentences", "filename", "question",
                              "question_id", "answers", "raw", "split", "image", "text"])  # fmt: skip
ENTRIES = st.lists(st.dictionaries(ENTRY_KEYS, JSON_VALUES | st.just("a.jpg"), max_size=5) | JSON_VALUES, max_size=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["coco", "karpathy", "vqav2", "jsonl"]), first=ENTRIES, second=ENTRIES)
def test_random_annotation_content_never_crashes(tmp_path, kind, first, second):
    (tmp_path / "a.jpg").write_bytes(image_bytes("rgb"))
    if kind == "coco":
        path = write_json(tmp_path / "c.json", {"images": first, "annotations": second})
    elif kind == "karpathy":
        path = write_json(tmp_path / "k.json", {"images": [{"sentences": [], "filename": "a.jpg"}, *first]})
    elif kind == "vqav2":
        write_json(tmp_path / "annotations.json", {"annotations": second})
        path = write_json(tmp_path / "questions.json", {"questions": first})
    else:
        path = tmp_path / "d.jsonl"
        path.write_text("\n".join(json.dumps(e) for e in first + second))
    try:
        src = open_source(path, DataConfig(format=kind))
    except (DataError, ValueError, FileNotFoundError) as err:
        assert str(path.name) in str(err) or "no usable" in str(err)
        return
    assert src.stats.kept == len(src)
    for record in src:
        assert record.captions or record.question


def test_a_brace_pattern_is_counted_before_it_is_expanded():
    from mlm.data.shards import expand_shards

    assert expand_shards("s-{00..02}-{a,b}.tar") == ["s-00-a.tar", "s-00-b.tar", "s-01-a.tar", "s-01-b.tar",
                                                     "s-02-a.tar", "s-02-b.tar"]  # fmt: skip
    with pytest.raises(ValueError, match=r"names 100,000,000,000 shards; the limit is 100,000"):
        expand_shards("x{0..99999999999}.tar")
