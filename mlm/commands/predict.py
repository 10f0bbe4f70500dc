"""``mlm caption``, ``mlm ask``, ``mlm search`` and ``mlm explain``: use a trained model on your own images.

- ``mlm caption IMAGE... [--beams N | --top-p P] [--json]``: batch captioning (decoding runs on the latent KV cache);
- ``mlm ask IMAGE "question"``: answer a question about an image;
- ``mlm search --images DIR "text"``: rank a folder's images for a text (embeddings cached on disk);
- ``mlm explain IMAGE ["caption"]``: a PNG of the pooling weights and each caption word's cross-attention.

Every command takes ``--checkpoint`` (a model, checkpoint or run folder; default: the run ``make demo`` trains).
Exit codes: 0 done; 1 some images failed (each named on stderr, the others still processed); 2 nothing was done
(a bad argument, question or checkpoint, named in one line).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_CHECKPOINT = "runs/tiny-synthetic"  # the run `make demo` trains
MAX_BATCH = 1024


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--checkpoint DIR`` and ``--device``."""
    parser.add_argument(
        "--checkpoint", default=DEFAULT_CHECKPOINT, metavar="DIR", help=f"default: {DEFAULT_CHECKPOINT}"
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda when available)")
    parser.add_argument(
        "--exit-threshold",
        type=float,
        metavar="T",
        help="early exit: an image stops at its first exit with agreement >= T (model.early_exit)",
    )


def _add_decoding(parser: argparse.ArgumentParser) -> None:
    way = parser.add_mutually_exclusive_group()
    way.add_argument("--beams", type=int, default=1, metavar="N", help="beam search with N beams (default: greedy)")
    way.add_argument("--top-p", type=float, default=0.0, metavar="P", help="nucleus sampling with this top-p")
    parser.add_argument("--seed", type=int, default=0, help="seed of nucleus sampling")
    parser.add_argument(
        "--max-tokens", type=int, help="longest output in tokens (default: the checkpoint's generation_config.json)"
    )
    parser.add_argument(
        "--min-tokens", type=int, default=1, help="EOS is not allowed before this many tokens (default: 1, never empty)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``caption``, ``ask``, ``search`` and ``explain`` commands."""
    caption = sub.add_parser("caption", help="caption images with a trained model")
    caption.add_argument("images", nargs="+", metavar="IMAGE")
    add_model_args(caption)
    _add_decoding(caption)
    caption.add_argument("--batch-size", type=int, default=16, help=f"images per batch, 1-{MAX_BATCH} (default: 16)")
    caption.add_argument("--runtime", choices=("torch", "onnx"), default="torch",
                         help="onnx: run a folder written by `mlm export onnx` with ONNX Runtime (CPU)")  # fmt: skip
    caption.set_defaults(func=run_caption)

    ask = sub.add_parser("ask", help="answer a question about an image")
    ask.add_argument("image", metavar="IMAGE")
    ask.add_argument("questions", nargs="+", metavar="QUESTION")
    add_model_args(ask)
    _add_decoding(ask)
    ask.set_defaults(func=run_ask)

    search = sub.add_parser("search", help="rank the images of a folder for a text (index cached on disk)")
    search.add_argument("text")
    search.add_argument("--images", required=True, metavar="DIR", help="folder of images (searched recursively)")
    search.add_argument("-k", "--top-k", type=int, default=5, help="results to show (default: 5)")
    search.add_argument("--cache-dir", help="where the index is cached (default: ~/.cache/mlm/search)")
    search.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_model_args(search)
    search.set_defaults(func=run_search)

    explain = sub.add_parser("explain", help="PNG of pooling weights and per-word cross-attention over an image")
    explain.add_argument("image", metavar="IMAGE")
    explain.add_argument("caption", nargs="?", help="the caption to explain (default: the model's own caption)")
    explain.add_argument("--out", help="PNG to write (default: IMAGE's name + .explain.png in the current folder)")
    add_model_args(explain)
    explain.set_defaults(func=run_explain)


def _decoding(args: argparse.Namespace) -> dict:
    """generate() keyword arguments from the decoding options, each checked against its bounds."""
    import torch

    from mlm.generation import MAX_BEAMS, MAX_NEW_TOKENS

    if not 1 <= args.beams <= MAX_BEAMS:
        raise ValueError(f"--beams {args.beams}: must be between 1 and {MAX_BEAMS}")
    if not 0.0 <= args.top_p <= 1.0:
        raise ValueError(f"--top-p {args.top_p}: must be between 0 and 1")
    if args.max_tokens is not None and not 1 <= args.max_tokens <= MAX_NEW_TOKENS:
        raise ValueError(f"--max-tokens {args.max_tokens}: must be between 1 and {MAX_NEW_TOKENS}")
    if args.min_tokens < 0 or (args.max_tokens is not None and args.min_tokens > args.max_tokens):
        raise ValueError(f"--min-tokens {args.min_tokens}: must be between 0 and --max-tokens")
    generator = torch.Generator().manual_seed(args.seed) if args.top_p > 0 else None
    return {
        "num_beams": args.beams,
        "top_p": args.top_p,
        "max_new_tokens": args.max_tokens,
        "min_new_tokens": args.min_tokens,
        "generator": generator,
    }


def _generator_on(model, kwargs: dict) -> dict:
    """Move the sampling generator to the model's device (CUDA sampling needs a CUDA generator)."""
    import torch

    if kwargs["generator"] is not None and model.device.type != "cpu":
        seed = kwargs["generator"].initial_seed()
        kwargs["generator"] = torch.Generator(device=model.device).manual_seed(seed)
    return kwargs


def run_caption(args: argparse.Namespace) -> int:
    """Caption every image; bad files are reported and the rest still captioned (exit 1 if any failed)."""
    from tqdm.auto import tqdm

    from mlm.inference import image_batches, image_transform, load_model

    kwargs = _decoding(args)
    if not 1 <= args.batch_size <= MAX_BATCH:
        raise ValueError(f"--batch-size {args.batch_size}: must be between 1 and {MAX_BATCH}")
    if args.runtime == "onnx":
        from mlm.runtime.onnx_model import load_onnx_model

        if args.device not in (None, "cpu"):
            raise ValueError(f"--device {args.device}: --runtime onnx runs on the CPU")
        if args.exit_threshold is not None:
            raise ValueError("--exit-threshold: the ONNX graphs run every block; use --runtime torch for early exit")
        model = load_onnx_model(args.checkpoint)
    else:
        model = load_model(args.checkpoint, args.device, args.exit_threshold)
    kwargs = _generator_on(model, kwargs)
    errors: dict[int, str] = {}
    captions: dict[int, str] = {}
    batches = image_batches(args.images, image_transform(model), args.batch_size, errors=errors)
    total = -(-len(args.images) // args.batch_size)
    for index, pixels in tqdm(batches, total=total, desc="caption", unit="batch", disable=None, leave=False):
        texts = model.generate(pixels, **kwargs)
        captions.update(zip(index, texts, strict=True))
    rows = []
    for i, image in enumerate(args.images):
        rows.append({"image": image, "caption": captions[i]} if i in captions else {"image": image, "error": errors[i]})
    _print_rows(rows, args.json, "caption")
    return 1 if errors else 0


def _print_rows(rows: list[dict], as_json: bool, key: str) -> None:
    """Rows as JSON, or ``image<TAB>value`` lines with errors on stderr."""
    if as_json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    for row in rows:
        if "error" in row:
            print(f"{row['image']}\terror: {row['error']}", file=sys.stderr)
        else:
            print(f"{row['image']}\t{row[key]}")


def _one_image(model, path: str):
    """Normalised pixels (1, 3, H, W) and the decoded PIL image of one file; bad files raise ValueError."""
    from mlm.data.records import DataError
    from mlm.inference import decode_any, image_transform

    try:
        image = decode_any(path)
    except DataError as err:
        raise ValueError(str(err)) from err
    return image_transform(model)(image)[None], image


def run_ask(args: argparse.Namespace) -> int:
    """Answer each question about the image."""
    from mlm.data.text import check_text
    from mlm.inference import check_question, load_model

    kwargs = _decoding(args)
    questions = [check_text(q, f"question {i + 1}") for i, q in enumerate(args.questions)]
    model = load_model(args.checkpoint, args.device, args.exit_threshold)
    for i, question in enumerate(questions):
        check_question(model, question, f"question {i + 1}")
    pixels, _ = _one_image(model, args.image)
    answers = model.answer(pixels.expand(len(questions), -1, -1, -1), questions, **_generator_on(model, kwargs))
    rows = [{"image": args.image, "question": q, "answer": a} for q, a in zip(questions, answers, strict=True)]
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        for row in rows:
            print(f"{row['question']}\t{row['answer']}" if len(rows) > 1 else row["answer"])
    return 0


def run_search(args: argparse.Namespace) -> int:
    """Print the best matching images of the folder for the text."""
    from mlm.data.text import check_text
    from mlm.eval.image_index import ImageIndex
    from mlm.inference import checkpoint_id, load_model

    if args.top_k < 1:
        raise ValueError(f"-k/--top-k must be >= 1, got {args.top_k}")
    text = check_text(args.text, "search text")
    model = load_model(args.checkpoint, args.device, args.exit_threshold)
    key = checkpoint_id(args.checkpoint) + (f"-exit{args.exit_threshold}" if args.exit_threshold is not None else "")
    index = ImageIndex(args.images, model, key, args.cache_dir)  # early exit: other embeddings, another index
    counts = index.refresh()
    hits = index.search(text, args.top_k)
    if args.json:
        rows = [{"image": str(hit.path), "score": hit.score} for hit in hits]
        print(json.dumps({"query": text, "index": counts, "results": rows}, indent=2, ensure_ascii=False))
        return 0
    skipped = f", {counts['bad']} skipped: not readable images" if counts["bad"] else ""
    print(f"# {counts['images']} images ({counts['encoded']} encoded now, {counts['reused']} from the cache{skipped})")
    for rank, hit in enumerate(hits, start=1):
        print(f"{rank}\t{hit.score:.4f}\t{hit.path}")
    return 0


def run_explain(args: argparse.Namespace) -> int:
    """Write the attention-map PNG for the image and caption (the model's own caption when none is given)."""
    from mlm.data.text import check_text
    from mlm.eval.attention_maps import attention_maps, plot_attention_maps
    from mlm.inference import load_model

    given = check_text(args.caption, "caption") if args.caption and args.caption.strip() else None
    out = Path(args.out) if args.out else Path(f"{Path(args.image).stem}.explain.png")
    if out.is_dir():
        out = out / f"{Path(args.image).stem}.explain.png"
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {args.out}: the attention maps are a PNG; give a file name ending in .png")
    model = load_model(args.checkpoint, args.device, args.exit_threshold)
    pixels, image = _one_image(model, args.image)
    caption = given or model.generate(pixels, min_new_tokens=1)[0]
    plot_attention_maps(image, attention_maps(model, pixels, caption), out)
    print(f"{caption}\nwrote {out}")
    return 0
