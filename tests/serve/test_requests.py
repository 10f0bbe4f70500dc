"""What the service's gateway refuses, field by field, before a request reaches a worker (no server needed)."""

import base64

import pytest

from mlm.serve.requests import BadRequest, check_request

IMAGE = base64.b64encode(b"\x89PNG some bytes").decode()


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/caption", {"image": IMAGE, "num_beams": "--1"}, "num_beams"),
        ("/v1/caption", {"image": IMAGE, "seed": "²"}, "seed"),
        ("/v1/caption", {"image": IMAGE, "seed": "0" * 5000}, "seed"),
        ("/v1/caption", {"image": IMAGE, "max_new_tokens": b"12"}, "max_new_tokens"),  # a form field sent as a file
        ("/v1/caption", {"image": IMAGE, "top_p": float("nan")}, "top_p"),
        ("/v1/caption", {"image": IMAGE, "num_beams": 2.5}, "num_beams"),
        ("/v1/caption", {"image": IMAGE, "num_beams": True}, "num_beams"),
        ("/v1/caption", {"image": IMAGE, "num_beams": 2, "top_p": 0.5}, "top_p"),
        ("/v1/answer", {"image": IMAGE, "question": "what\x00 colour?"}, "question"),
        ("/v1/answer", {"image": IMAGE, "question": "x\u202e"}, "question"),
        ("/v1/embed", {"texts": ["fine", 3]}, "texts[1]"),
        ("/v1/embed", {"images": [IMAGE] * 65}, "images"),
        ("/v1/search", {"text": "a circle", "k": "7", "extra": 1}, "extra"),
    ],
)
def test_bad_fields_are_named(path, body, field):
    with pytest.raises(BadRequest) as caught:
        check_request(path, body)
    assert caught.value.field == field and caught.value.status == 422


def test_form_values_are_read_as_their_types():
    checked = check_request("/v1/caption", {"image": b"\x89PNG bytes", "num_beams": "3", "max_new_tokens": " 7 "})
    assert checked["num_beams"] == 3 and checked["max_new_tokens"] == 7 and checked["top_p"] == 0.0
    assert base64.b64decode(checked["image"]) == b"\x89PNG bytes"
    assert check_request("/v1/answer", {"image": IMAGE, "question": "is it\tred?\n"})["question"] == "is it\tred?"


def test_server_settings_are_checked_before_anything_starts(tmp_path):
    from mlm.serve.server import build_server

    with pytest.raises(ValueError, match="--threads >= 0; got 32, 10.0, 1, 10.0, 30.0, -1"):
        build_server(str(tmp_path), threads=-1)
    with pytest.raises(FileNotFoundError, match="--images .*: no such folder"):
        build_server(str(tmp_path), images=str(tmp_path / "none"))
