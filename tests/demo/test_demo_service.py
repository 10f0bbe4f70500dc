"""The demo without a browser: upload checks, the service's answers, and the Gradio app wiring."""

import json
import socket
import urllib.request

import pytest
from PIL import Image

from mlm.demo.service import DemoService, UploadError
from mlm.eval.inference import checkpoint_id


@pytest.fixture
def service(tiny_model, tiny_run, tmp_path):
    return DemoService(tiny_model, checkpoint_id(tiny_run[0]), tiny_run[1] / "images", 0.05, tmp_path / "cache")


def test_uploads_over_the_limit_or_not_images_are_refused_with_a_reason(service, tmp_path):
    big = tmp_path / "big.png"
    Image.effect_noise((256, 256), 64).convert("RGB").save(big)  # ~190 KB of noise > 0.05 MB
    with pytest.raises(UploadError, match=r"big.png is 0.\d MB; the upload limit is 0.05 MB"):
        service.caption(big)
    text = tmp_path / "photo.jpg"
    text.write_text("definitely not a JPEG")
    with pytest.raises(UploadError, match=r"photo.jpg is not a usable image \(not an image\)"):
        service.caption(text)
    truncated = tmp_path / "cut.png"
    Image.new("RGB", (64, 64), "red").save(tmp_path / "full.png")
    truncated.write_bytes((tmp_path / "full.png").read_bytes()[:60])
    with pytest.raises(UploadError, match="cut.png is not a usable image"):
        service.caption(truncated)
    with pytest.raises(UploadError, match="upload an image first"):
        service.caption(None)


def test_caption_ask_explain_and_search(service, tiny_run):
    photo = sorted((tiny_run[1] / "images").glob("*.png"))[0]
    assert service.caption(photo).strip()
    assert service.ask(photo, "what color is the shape?").strip()
    with pytest.raises(UploadError, match="type a question"):
        service.ask(photo, " ")
    caption, png = service.explain(photo, "a red circle")
    assert caption == "a red circle" and png.stat().st_size > 1000 and png.parent == service.out_dir
    results = service.search("a red circle", 4)
    assert len(results) == 4 and all(path.startswith(str(service.index.folder)) for path, _ in results)


def test_search_without_a_folder_says_how_to_get_one(tiny_model):
    with pytest.raises(UploadError, match="--images DIR"):
        DemoService(tiny_model, "id").search("a red circle")


def test_app_wires_the_service_and_serves_on_localhost(service, tiny_run):
    import gradio as gr

    from mlm.demo.app import build_app, guarded, launch

    with pytest.raises(gr.Error, match="upload an image first"):
        guarded(service.caption)(None)
    app = build_app(service)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launch(app, service, port=port, max_upload_mb=0.05, block=False)
    try:
        assert app.server_name == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=30) as reply:
            config = json.loads(reply.read())
        ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
        assert {"upload", "caption", "caption-button", "ask-button", "explain-button", "search-button"} <= ids
    finally:
        app.close()


def test_mlm_demo_checks_its_arguments_before_serving(tiny_run, capsys):
    from mlm.cli import main

    assert main(["demo", "--checkpoint", str(tiny_run[0]), "--port", "70000"]) == 2
    assert "--port 70000 is not a TCP port" in capsys.readouterr().err
    assert main(["demo", "--checkpoint", str(tiny_run[0]), "--images", str(tiny_run[1] / "nowhere")]) == 2
    assert "image folder not found" in capsys.readouterr().err
