"""The Gradio web app of ``mlm demo``: upload an image to caption it, ask about it and see its attention maps, or
type a text to search an image folder. Each button calls a :class:`~mlm.demo.service.DemoService` method; refused
uploads and empty inputs show their reason as a Gradio error message, and log one line on the server (no
traceback). Gradio's cache of uploads and outputs is swept while the app runs, and emptied when it stops.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from mlm.demo.service import DemoService

logger = logging.getLogger(__name__)

TITLE = "mlm: shared-weight MLA vision-language model"
CACHE_SWEEP_S = 600  # how often Gradio deletes the cached uploads and outputs ...
CACHE_MAX_AGE_S = 3600  # ... that are older than this (a page left open longer must upload its image again)


def _gradio():
    """Import gradio with its usage analytics off (the demo never calls out)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    return gr


def guarded(fn: Callable) -> Callable:
    """Wrap a service call so that a ValueError (refused upload, empty input) shows as a Gradio error message."""
    gr = _gradio()

    def call(*args):
        try:
            return fn(*args)
        except ValueError as err:
            logger.info("refused: %s", err)
            error = gr.Error(str(err))
            # The user's mistake, not the server's: Gradio prints a full traceback for every gr.Error unless told
            # not to. Set as an attribute because gradio before 5.9 has no print_exception argument (it always prints).
            error.print_exception = False
            raise error from err

    call.__name__ = getattr(fn, "__name__", "call")
    return call


def _image_tab(gr, service: DemoService) -> None:
    """Upload → preview and caption; question → answer; caption → attention maps."""
    with gr.Row():
        upload = gr.File(label="Image", file_types=["image"], type="filepath", elem_id="upload")
        preview = gr.Image(label="Preview", type="pil", interactive=False, height=256, elem_id="preview")
    with gr.Row():
        beams = gr.Slider(1, 5, value=1, step=1, label="Beams (1 = greedy)")
        caption_button = gr.Button("Caption", variant="primary", elem_id="caption-button")
    caption = gr.Textbox(label="Caption", interactive=False, elem_id="caption")
    with gr.Row():
        question = gr.Textbox(label="Question", placeholder="what color is the shape?", elem_id="question")
        ask_button = gr.Button("Ask", elem_id="ask-button")
    answer = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
    with gr.Row():
        to_explain = gr.Textbox(label="Caption to explain (empty: the model's caption)", elem_id="to-explain")
        explain_button = gr.Button("Attention maps", elem_id="explain-button")
    maps = gr.Image(label="Pooling weights per level and cross-attention per word", type="filepath", elem_id="maps")

    def on_upload(path, n_beams):
        image, _ = service.load_upload(path)
        return image, service.caption(path, int(n_beams))

    def on_explain(path, text):
        explained, png = service.explain(path, text)
        return explained, str(png)

    upload.upload(guarded(on_upload), [upload, beams], [preview, caption])
    caption_button.click(guarded(lambda path, n: service.caption(path, int(n))), [upload, beams], caption)
    ask_button.click(guarded(service.ask), [upload, question], answer)
    question.submit(guarded(service.ask), [upload, question], answer)
    explain_button.click(guarded(on_explain), [upload, to_explain], [to_explain, maps])


def _search_tab(gr, service: DemoService) -> None:
    """Text → the best matching images of the folder."""
    if service.index is None:
        gr.Markdown("No image folder: start the demo with `--images DIR` to search one.")
        return
    gr.Markdown(f"Searching {len(service.index.paths)} images under `{service.index.folder}`.")
    with gr.Row():
        text = gr.Textbox(label="Text", placeholder="a red circle at the top left", elem_id="search-text")
        k = gr.Slider(1, 24, value=8, step=1, label="Results")
    button = gr.Button("Search", variant="primary", elem_id="search-button")
    gallery = gr.Gallery(label="Best matches", columns=4, height="auto", elem_id="results")
    button.click(guarded(service.search), [text, k], gallery)
    text.submit(guarded(service.search), [text, k], gallery)


def build_app(service: DemoService):
    """The Gradio Blocks app around a service."""
    gr = _gradio()
    sweep = (CACHE_SWEEP_S, CACHE_MAX_AGE_S)  # also makes Gradio delete this app's cached files when it stops
    with gr.Blocks(title="mlm demo", analytics_enabled=False, delete_cache=sweep) as app:
        gr.Markdown(f"# {TITLE}\nUpload an image (at most {service.max_upload_mb:g} MB).")
        with gr.Tab("Image"):
            _image_tab(gr, service)
        with gr.Tab("Search"):
            _search_tab(gr, service)
    return app


def launch(
    app,
    service: DemoService,
    host: str = "127.0.0.1",
    port: int = 7860,
    max_upload_mb: float = 10.0,
    block: bool = True,
):
    """Serve the app on host:port (local only by default); Gradio itself also refuses uploads over the limit."""
    allowed = [str(service.out_dir)] + ([str(service.index.folder)] if service.index is not None else [])
    return app.launch(
        server_name=host,
        server_port=port,
        max_file_size=int(max_upload_mb * 2**20),  # bytes
        share=False,
        show_error=True,
        ssr_mode=False,
        quiet=True,
        prevent_thread_lock=not block,
        allowed_paths=allowed,  # search results and attention maps are served from these folders only
    )
