"""The demo without a browser: upload checks, the service's answers, its temporary files, and the Gradio app."""

import json
import logging
import os
import socket
import urllib.request

import pytest
from PIL import Image

from mlm.demo.service import GRADIO_TEMP_DIR, DemoService, UploadError
from mlm.inference import checkpoint_id


@pytest.fixture
def service(tiny_model, tiny_run, tmp_path):
    service = DemoService(tiny_model, checkpoint_id(tiny_run[0]), tiny_run[1] / "images", 0.05, tmp_path / "cache")
    yield service
    service.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
    with pytest.raises(UploadError, match="gone.png is no longer on the server; upload it again"):
        service.caption(tmp_path / "gone.png")  # as when Gradio's cache sweep has deleted an old upload


def test_caption_ask_explain_and_search(service, tiny_run):
    photo = sorted((tiny_run[1] / "images").glob("*.png"))[0]
    assert service.caption(photo).strip()
    assert service.ask(photo, "what color is the shape?").strip()
    with pytest.raises(UploadError, match="type a question"):
        service.ask(photo, " ")
    with pytest.raises(ValueError, match="question: 10,000 characters; the limit is 2,000"):
        service.ask(photo, "x" * 10_000)
    with pytest.raises(ValueError, match=r"question: \d+ tokens with the prompt and an answer; this model reads"):
        service.ask(photo, "what color is the shape " * 10)
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
    assert app.delete_cache  # Gradio sweeps its cached uploads while running and empties it on close
    port = free_port()
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


def test_the_temporary_folder_holds_maps_and_gradio_cache_and_goes_on_close(tiny_model, monkeypatch):
    monkeypatch.delenv(GRADIO_TEMP_DIR, raising=False)
    service = DemoService(tiny_model, "id")
    root = service.temp_root
    assert root.is_dir() and service.out_dir.parent == root and service.gradio_dir.parent == root
    assert os.environ[GRADIO_TEMP_DIR] == str(service.gradio_dir) and service.gradio_dir.is_dir()
    with DemoService(tiny_model, "id") as inner:  # a second service (tests, notebooks) takes over, then hands back
        assert os.environ[GRADIO_TEMP_DIR] == str(inner.gradio_dir) != str(service.gradio_dir)
    assert not inner.temp_root.exists() and os.environ[GRADIO_TEMP_DIR] == str(service.gradio_dir)
    (service.gradio_dir / "upload.png").write_bytes(b"cached")
    service.close()
    assert not root.exists() and GRADIO_TEMP_DIR not in os.environ
    service.close()  # twice is harmless


def test_a_gradio_temp_dir_set_by_the_user_is_used_and_left_alone(tiny_model, monkeypatch, tmp_path):
    mine = tmp_path / "my-gradio"
    mine.mkdir()
    (mine / "keep.txt").write_text("the user's")
    monkeypatch.setenv(GRADIO_TEMP_DIR, str(mine))
    with DemoService(tiny_model, "id") as service:
        assert service.gradio_dir == mine and not service.owns_gradio_dir
        assert os.environ[GRADIO_TEMP_DIR] == str(mine) and not (service.temp_root / "gradio").exists()
    assert not service.temp_root.exists()
    assert os.environ[GRADIO_TEMP_DIR] == str(mine) and (mine / "keep.txt").read_text() == "the user's"


def test_only_the_newest_attention_maps_are_kept(tiny_model, tiny_run):
    photo = sorted((tiny_run[1] / "images").glob("*.png"))[0]
    with pytest.raises(ValueError, match="max_maps must be at least 1, got 0"):
        DemoService(tiny_model, "id", max_maps=0)
    with DemoService(tiny_model, "id", max_maps=2) as service:
        made = [service.explain(photo, "a red circle")[1] for _ in range(5)]
        assert len(set(made)) == 5
        assert sorted(service.out_dir.glob("*.png")) == sorted(made[-2:])


def test_refused_uploads_show_one_line_in_the_browser_and_no_traceback_on_the_server(
    tiny_model, tmp_path, capfd, caplog
):
    import httpx
    from gradio.route_utils import API_PREFIX
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from mlm.demo.app import build_app, launch

    big = tmp_path / "big.png"
    Image.effect_noise((256, 256), 64).convert("RGB").save(big)  # ~190 KB: over the service's 0.05 MB
    fake = tmp_path / "holiday.jpg"
    fake.write_text("this is not a photo")
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(getattr(h, "stream", None), "closed", False)]:
        # An earlier test's `mlm` run (its basicConfig(force=True)) left it writing to a capture pytest has closed:
        # each record would print a "Logging error" traceback that is not the server's.
        root.removeHandler(handler)
    caplog.set_level(logging.INFO, logger="mlm.demo.app")
    with DemoService(tiny_model, "id", max_upload_mb=0.05) as service:
        app, port = build_app(service), free_port()
        # Gradio's own limit is set above the service's so that the 190 KB upload reaches the service's check.
        launch(app, service, port=port, max_upload_mb=1, block=False)
        try:
            client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
            reasons = []
            for path in (big, fake):
                with pytest.raises(AppError) as refused:
                    client.predict(handle_file(str(path)), 1, api_name="/on_upload")
                reasons.append(str(refused.value))
            huge = httpx.post(
                f"http://127.0.0.1:{port}{API_PREFIX}/upload",
                files={"files": ("huge.png", os.urandom(2**21))},
                timeout=30,
            )
            assert list(service.gradio_dir.rglob("holiday.jpg"))  # Gradio cached the upload in the service's folder
        finally:
            app.close()
    assert reasons[0] == "big.png is 0.2 MB; the upload limit is 0.05 MB"
    assert reasons[1].startswith("holiday.jpg is not a usable image (not an image)") and "\n" not in reasons[1]
    assert huge.status_code == 413 and "maximum allowed size of 1048576 bytes" in huge.text
    server = capfd.readouterr()
    assert "Traceback" not in server.err + server.out and "Traceback" not in caplog.text
    assert [r.getMessage() for r in caplog.records if r.name == "mlm.demo.app"] == [f"refused: {r}" for r in reasons]
