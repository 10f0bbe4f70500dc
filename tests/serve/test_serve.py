"""``mlm serve`` for real: a server subprocess on a free 127.0.0.1 port, spoken to over HTTP."""

import base64
import concurrent.futures
from pathlib import Path

import httpx
import pytest
import torch

from mlm import inference as infer
from mlm.serve.launch import start_server, stop_server


@pytest.fixture(scope="module")
def server(tiny_run):
    """(base URL, synth folder): the tiny checkpoint served with batching and a small upload limit."""
    run, synth = tiny_run
    options = ["--max-batch", "8", "--max-wait-ms", "50", "--max-upload-mb", "0.05", "--images", str(synth / "images")]
    process, url = start_server(str(run), *options)
    try:
        yield url, synth
    finally:
        stop_server(process)


def _image(synth: Path, n: int = 0) -> tuple[Path, str]:
    path = sorted((synth / "images").glob("*.png"))[n]
    return path, base64.b64encode(path.read_bytes()).decode()


def test_caption_and_answer_equal_the_model_and_forms_work(server, tiny_model):
    url, synth = server
    path, data = _image(synth)
    pixels = infer.image_transform(tiny_model)(infer.decode_any(path))[None]
    with torch.no_grad():
        expected = tiny_model.generate(pixels, max_new_tokens=6, min_new_tokens=1)[0]
        answer = tiny_model.answer(pixels, ["what color is the shape?"], max_new_tokens=6, min_new_tokens=1)[0]
    reply = httpx.post(f"{url}/v1/caption", json={"image": data, "max_new_tokens": 6}, timeout=30)
    assert reply.status_code == 200 and reply.json()["caption"] == expected
    form = httpx.post(f"{url}/v1/caption", files={"image": path.read_bytes()}, data={"max_new_tokens": "6"}, timeout=30)
    assert form.status_code == 200 and form.json()["caption"] == expected
    body = {"image": data, "question": "what color is the shape?", "max_new_tokens": 6}
    assert httpx.post(f"{url}/v1/answer", json=body, timeout=30).json()["answer"] == answer


def test_embed_and_search(server, tiny_model):
    url, synth = server
    path, data = _image(synth, 1)
    reply = httpx.post(f"{url}/v1/embed", json={"images": [data], "texts": ["a red circle."]}, timeout=30).json()
    pixels = infer.image_transform(tiny_model)(infer.decode_any(path))[None]
    torch.testing.assert_close(torch.tensor(reply["image_embeds"]), infer.embed_images(tiny_model, pixels))
    torch.testing.assert_close(torch.tensor(reply["text_embeds"]), infer.embed_texts(tiny_model, ["a red circle."]))
    hits = httpx.post(f"{url}/v1/search", json={"text": "a red circle", "k": 3}, timeout=30).json()["results"]
    assert len(hits) == 3 and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]


@pytest.mark.parametrize(
    ("path", "request_kwargs", "status", "field"),
    [
        ("/v1/caption", {"json": {"image": base64.b64encode(b"not an image").decode()}}, 400, "image"),
        ("/v1/caption", {"json": {"image": "%%%"}}, 422, "image"),
        ("/v1/caption", {"json": {}}, 422, "image"),
        ("/v1/caption", {"json": {"image": 7}}, 422, "image"),
        ("/v1/caption", {"json": {"image": "aGk=", "num_beams": "many"}}, 422, "num_beams"),
        ("/v1/caption", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "body"),
        ("/v1/caption", {"content": b"x" * 60_000, "headers": {"content-type": "application/json"}}, 413, "body"),
        ("/v1/answer", {"json": {"image": "aGk=", "question": "   "}}, 422, "question"),
        ("/v1/answer", {"json": {"image": "aGk=", "question": "why " * 2500}}, 422, "question"),
        ("/v1/embed", {"json": {"texts": []}}, 422, "images"),
        ("/v1/search", {"json": {"text": "a circle", "k": 0}}, 422, "k"),
    ],
)
def test_bad_requests_get_a_4xx_naming_the_field(server, path, request_kwargs, status, field):
    url, _ = server
    reply = httpx.post(f"{url}{path}", timeout=30, **request_kwargs)
    assert reply.status_code == status and reply.json()["field"] == field, reply.text


def test_a_long_question_fails_alone_and_unknown_paths_are_404(server):
    url, synth = server
    _, data = _image(synth)
    reply = httpx.post(f"{url}/v1/answer", json={"image": data, "question": "is it red " * 30}, timeout=30)
    assert reply.status_code == 422 and "tokens" in reply.json()["error"]  # too long for the model's text length
    assert httpx.get(f"{url}/v1/nothing", timeout=10).status_code == 404


def test_concurrent_mixed_requests_batch_and_bad_ones_fail_alone(server):
    url, synth = server
    _, data = _image(synth, 2)
    good = {"image": data, "max_new_tokens": 4}
    bad = {"image": base64.b64encode(b"GIF89a broken").decode()}
    bodies = [bad if i % 5 == 0 else good for i in range(20)]
    with httpx.Client(timeout=60) as client, concurrent.futures.ThreadPoolExecutor(10) as pool:
        replies = list(pool.map(lambda body: client.post(f"{url}/v1/caption", json=body), bodies))
    assert [r.status_code for r in replies] == [400 if body is bad else 200 for body in bodies]
    captions = {r.json()["caption"] for r in replies if r.status_code == 200}
    assert len(captions) == 1  # the same image gives the same caption whatever its batch
    assert max(r.json()["batch_size"] for r in replies if r.status_code == 200) > 1
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert 'mlm_requests_total{endpoint="/v1/caption",status="400"}' in metrics
    assert "mlm_batch_size_bucket" in metrics


def test_the_apis_without_a_server_batched_and_unbatched(tiny_run, tiny_model):
    from mlm.serve.apis import CaptionAPI, ItemError

    run, synth = tiny_run
    _, data = _image(synth)
    batched, single = (
        CaptionAPI(str(run), api_path="/v1/caption", max_batch_size=n, batch_timeout=0.01) for n in (4, 1)
    )
    for api in (batched, single):
        api.setup("cpu")
    request = {"image": data, "num_beams": 1, "top_p": 0.0, "max_new_tokens": 5, "seed": 0}
    short = {**request, "max_new_tokens": 2}
    junk = batched.decode_request({**request, "image": base64.b64encode(b"junk").decode()})
    assert isinstance(junk, ItemError) and junk.status == 400
    out = batched.predict([batched.decode_request(request), junk, batched.decode_request(short)])
    assert isinstance(out[1], ItemError) and out[0]["batch_size"] == 2  # the two good ones ran together
    alone = single.predict(single.decode_request(request))  # LitServe passes one request when max_batch_size is 1
    assert alone["caption"] == out[0]["caption"] and alone["batch_size"] == 1
    assert out[0]["caption"].split()[:2] == out[2]["caption"].split()  # greedy, cut at its own max_new_tokens
    assert batched.encode_response(junk).status_code == 400


def test_a_sampled_request_does_not_depend_on_its_batch(tiny_run):
    from mlm.serve.apis import CaptionAPI

    run, synth = tiny_run
    api = CaptionAPI(str(run), "/v1/caption", max_batch_size=4, batch_timeout=0.01)
    api.setup("cpu")
    sampled = {"num_beams": 1, "top_p": 0.9, "max_new_tokens": 6, "seed": 3}
    a = api.decode_request({"image": _image(synth, 0)[1], **sampled})
    b = api.decode_request({"image": _image(synth, 1)[1], **sampled})
    together = api.predict([a, b, api.decode_request({"image": _image(synth, 2)[1], **sampled, "top_p": 0.0})])
    assert together[0]["caption"] == api.predict([a])[0]["caption"]
    assert together[1]["caption"] == api.predict([b])[0]["caption"]
